"""The device edge: accepts sockets, upgrades them to WebSocket, runs their connections.

Each accepted socket gets one task. It reads the HTTP upgrade request into
`websockets.server.ServerProtocol` (the Sans-I/O core of `websockets`: C-accelerated
masking and UTF-8 checks, Autobahn-tested), refuses it before the upgrade when it must
(a wrong path, draining, the `Origin` allow-list, the connection caps, the handshake
rate), and otherwise accepts it and becomes the `Connection`'s task. The whole upgrade is
bounded by `[server] handshake_timeout`, TLS included, so a slowloris client holds its
socket for no longer.

`Edge` also keeps the table of live connections (for the drain, `/metrics` and presence)
and what tests and the admin API wait on: the close code of a device's next close, and
the end of the drain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio
from websockets.http11 import Request
from websockets.protocol import Protocol
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from gateway.admission import Admission, Refusal
from gateway.connection import CLOSE_TIMEOUT, RECEIVE_SIZE, Connection, EdgeContext
from gateway.drain import drain_plan
from gateway.session import CloseCode

log = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol("gateway.v1")
WS_PATH = "/ws"

# The Sans-I/O core logs every opened and closed connection at INFO; the gateway keeps
# its own (one line per session), so the core's go to a logger that shows warnings only.
_protocol_log = logging.getLogger("gateway.edge.websocket")
_protocol_log.setLevel(logging.WARNING)


class Edge:
    """Serves device sockets accepted on the listeners; see the module docstring."""

    def __init__(self, ctx: EdgeContext, admission: Admission) -> None:
        self._ctx = ctx
        self._admission = admission
        self.connections: dict[int, Connection] = {}  # by id, including those before hello
        self.draining = False
        self.drained = trio.Event()  # set once draining and every connection has ended
        self._close_waiters: dict[tuple[str, str], list[tuple[trio.Event, list[int]]]] = {}

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        handlers: trio.Nursery,
    ) -> None:
        """Accept on every listener until cancelled; each socket's task runs in `handlers`."""
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(self._accept, listener, handlers)

    async def _accept(
        self, listener: trio.abc.Listener[trio.abc.Stream], handlers: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                handlers.start_soon(self._serve_stream, stream)

    def open_connections(self) -> int:
        """Open connections, including those before `hello`."""
        return len(self.connections)

    def outbox_depths(self) -> list[int]:
        """Frames buffered for each open connection."""
        return [len(conn.outbox) for conn in list(self.connections.values())]

    async def wait_for_close(self, user: str, device: str) -> int:
        """Wait until the next connection of (user, device) ends; return its close code."""
        event, code = trio.Event(), [0]
        self._close_waiters.setdefault((user, device), []).append((event, code))
        await event.wait()
        return code[0]

    async def drain(self, drain_seconds: float) -> None:
        """Refuse new connections, then close every connection with 1012, spread over
        `drain_seconds`, each with its reconnect hint; return once all have ended."""
        self.draining = True
        plan = drain_plan(list(self.connections.values()), drain_seconds)
        log.info("draining %d connections over %.1fs", len(plan), drain_seconds)
        start = trio.current_time()
        for step in plan:
            await trio.sleep_until(start + step.offset)
            step.target.request_close(CloseCode.RESTARTING, step.reason)
        # Connections that finished their upgrade while the plan ran.
        for conn in list(self.connections.values()):
            conn.request_close(CloseCode.RESTARTING, "server restarting")
        if self.connections:
            await self.drained.wait()

    # -- one socket ------------------------------------------------------------------------

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        """Upgrade one socket and run its connection; never raises."""
        ip = _peer_ip(stream)
        proto: ServerProtocol | None = None
        admitted = upgraded = False
        try:
            with trio.move_on_after(self._ctx.server.handshake_timeout):
                proto, admitted = await self._upgrade(stream, ip)
                upgraded = proto is not None
            if proto is not None:
                await self._run(Connection(stream, proto, self._ctx))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away during the upgrade
        except Exception:
            log.exception("websocket upgrade failed")
        finally:
            if admitted:
                self._admission.release(ip)
            if not upgraded:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await trio.aclose_forcefully(stream)

    async def _upgrade(
        self, stream: trio.abc.Stream, ip: str
    ) -> tuple[ServerProtocol | None, bool]:
        """Read the upgrade request and answer it: the protocol, open, if it was accepted
        (else None), and whether a place was taken for the connection."""
        proto = ServerProtocol(
            select_subprotocol=_select_subprotocol,
            max_size=self._ctx.server.max_message_size,
            logger=_protocol_log,
        )
        request, alone = await _read_request(stream, proto)
        if request is None:
            return None, False
        refusal = self._refusal(request, ip)
        if refusal is None:
            response = proto.accept(request)
        else:
            response = proto.reject(refusal.status, f"refused: {refusal.reason}\n")
            for name, value in refusal.headers():
                response.headers[name.decode()] = value.decode()
        proto.send_response(response)
        admitted = refusal is None
        try:
            await stream.send_all(b"".join(proto.data_to_send()))
        except BaseException:
            if admitted:
                self._admission.release(ip)
            raise
        if response.status_code != 101:
            return None, admitted
        if alone:
            _forget_request(proto)
        return proto, admitted

    def _refusal(self, request: Request, ip: str) -> Refusal | None:
        """Why the upgrade is refused, or None once a place is taken for it."""
        if request.path.split("?", 1)[0] != WS_PATH:
            return Refusal(404, "the device endpoint is /ws")
        if self.draining:
            return self._admission.refuse("draining")
        origins = request.headers.get_all("Origin")
        origin = origins[0] if origins else None
        return self._admission.admit(ip, origin, trio.current_time())

    async def _run(self, conn: Connection) -> None:
        self._ctx.counters.connections_opened += 1
        self.connections[conn.id] = conn
        try:
            await conn.run()
        finally:
            del self.connections[conn.id]
            code = conn.close_code or CloseCode.NORMAL
            for event, box in self._close_waiters.pop((conn.user, conn.device), []):
                box[0] = code
                event.set()
            if self.draining and not self.connections:
                self.drained.set()


async def _read_request(
    stream: trio.abc.Stream, proto: ServerProtocol
) -> tuple[Request | None, bool]:
    """Read until the upgrade request is parsed: the request (None if the client sent
    none: a request line or headers too long are answered 414 or 431 by the protocol
    and written here, anything else that is not HTTP is just closed), and whether
    nothing came after it."""
    received = b""
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return None, False
        received += data
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Request):
                # A GET has no body: the request ends at its first blank line.
                return event, received.find(b"\r\n\r\n") + 4 == len(received)
        answer = proto.data_to_send()
        if answer:
            await stream.send_all(b"".join(answer))
            return None, False


def _forget_request(proto: ServerProtocol) -> None:
    """Let the upgrade request's headers go: the server side's parser keeps the request
    in its frame for the connection's life (2-3 KB per idle connection). Called only when
    nothing came after the request, so the parser waits at the start of a frame with
    nothing consumed, and a fresh frame parser takes its place with no state lost."""
    proto.parser = Protocol.parse(proto)
    next(proto.parser)


def _select_subprotocol(
    proto: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """`gateway.v1` when the client offers it; the upgrade goes ahead without otherwise."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def _peer_ip(stream: Any) -> str:
    """The client's IP address, from the TCP socket under any TLS layer."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        return str(transport.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "?"

"""The device edge: accepts sockets, upgrades them to WebSocket, runs their connections.

Each accepted socket gets one task. It reads the HTTP upgrade request into
`websockets.server.ServerProtocol` (the Sans-I/O core of `websockets`: C-accelerated
masking and UTF-8 checks, Autobahn-tested), refuses it before the upgrade when it must
(a wrong path, draining, the `Origin` allow-list, the connection caps, the handshake
rate), and otherwise accepts it and becomes the `Connection`'s task. The whole upgrade is
bounded by `[server] handshake_timeout`, TLS included, so a slowloris client holds its
socket for no longer.

A browser cannot read an HTTP 503 or its `Retry-After` (page scripts see only a failed
socket, 1006), so a 503 refusal of an upgrade that carries an `Origin` header is
delivered the way a browser can see it: the upgrade is accepted and at once closed with
1013 (1012 while draining) and a reason that carries the same hint, as
``<why>; reconnect_after_ms=N``. No place is taken for such a connection and nothing is
read from it but the close handshake. A refused `Origin` is logged, at most once per
`ORIGIN_LOG_INTERVAL`.

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
from gateway.logthrottle import LogThrottle
from gateway.session import CloseCode

log = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol("gateway.v1")
WS_PATH = "/ws"
# A misconfigured web app refuses every one of its users: one line per minute says so
# without one line per attempt. The logged Origin is cut to this many characters.
ORIGIN_LOG_INTERVAL = 60.0
ORIGIN_LOG_CHARS = 200
# The close reason's hint, as in a drain's 1012 (see docs/protocol.md, close codes).
HINT = "reconnect_after_ms="

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
        self._origin_log = LogThrottle(ORIGIN_LOG_INTERVAL)

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
        proto = _GatewayProtocol(
            max_size=self._ctx.server.max_message_size,
            logger=_protocol_log,
        )
        admitted = upgraded = False
        try:
            with trio.move_on_after(self._ctx.server.handshake_timeout):
                upgraded, admitted = await self._upgrade(stream, proto, ip)
            if upgraded:
                await self._run(Connection(stream, proto, self._ctx))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away during the upgrade
        except Exception:
            log.exception("websocket upgrade failed")
        finally:
            _release(proto)
            if admitted:
                self._admission.release(ip)
            if not upgraded:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await trio.aclose_forcefully(stream)

    async def _upgrade(
        self, stream: trio.abc.Stream, proto: ServerProtocol, ip: str
    ) -> tuple[bool, bool]:
        """Read the upgrade request and answer it: whether it was accepted (`proto` is
        then open), and whether a place was taken for the connection."""
        request, alone = await _read_request(stream, proto)
        if request is None:
            return False, False
        refusal = self._refusal(request, ip)
        if refusal is not None and refusal.status == 503 and "Origin" in request.headers:
            await _refuse_after_upgrade(stream, proto, request, refusal)
            return False, False
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
            return False, admitted
        if alone:
            _forget_request(proto)
        return True, admitted

    def _refusal(self, request: Request, ip: str) -> Refusal | None:
        """Why the upgrade is refused, or None once a place is taken for it."""
        if request.path.split("?", 1)[0] != WS_PATH:
            return Refusal(404, "the device endpoint is /ws")
        if self.draining:
            return self._admission.refuse("draining")
        origins = request.headers.get_all("Origin")
        origin = origins[0] if origins else None
        now = trio.current_time()
        refusal = self._admission.admit(ip, origin, now)
        if refusal is not None and refusal.status == 403:
            held = self._origin_log.take(now)
            if held is not None:
                log.warning(
                    "refused an upgrade from Origin %r: not in [limits] allowed_origins"
                    " (%d more refused since the last line)",
                    (origin or "")[:ORIGIN_LOG_CHARS],
                    held,
                )
        return refusal

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


async def _refuse_after_upgrade(
    stream: trio.abc.Stream, proto: ServerProtocol, request: Request, refusal: Refusal
) -> None:
    """Accept the upgrade, then close it at once with the refusal's retry hint: 1012 while
    draining, else 1013. A request that is not a valid upgrade gets its HTTP error."""
    response = proto.accept(request)
    proto.send_response(response)
    if response.status_code != 101:
        await stream.send_all(b"".join(proto.data_to_send()))
        return
    code = CloseCode.RESTARTING if refusal.reason == "draining" else CloseCode.OVERLOADED
    retry_ms = (refusal.retry_after or 0) * 1000
    proto.send_close(code, f"{refusal.reason}; {HINT}{retry_ms}")
    await stream.send_all(b"".join(proto.data_to_send()))
    # Wait for the client's close frame (the rest of the handshake), then close TCP, as
    # the server does first (RFC 6455, 7.1.1): the client's close event fires then.
    with trio.move_on_after(CLOSE_TIMEOUT):
        while proto.close_rcvd is None:
            chunk = await stream.receive_some(RECEIVE_SIZE)
            if not chunk:
                break
            proto.receive_data(chunk)


def _release(proto: ServerProtocol) -> None:
    """Break the protocol's reference cycle once its socket is done with: its frame
    parser, a generator, holds the protocol that holds it. Left alone, every connection
    would stay in memory until the next full collection of the cyclic garbage collector,
    which the gateway's collector settings make rare (see `gateway.cli`); closed, the
    parser lets go and reference counting frees the connection at once."""
    proto.parser.close()


def _forget_request(proto: ServerProtocol) -> None:
    """Let the upgrade request's headers go: the server side's parser keeps the request
    in its frame for the connection's life (2-3 KB per idle connection). Called only when
    nothing came after the request, so the parser waits at the start of a frame with
    nothing consumed, and a fresh frame parser takes its place with no state lost."""
    proto.parser = Protocol.parse(proto)
    next(proto.parser)


class _GatewayProtocol(ServerProtocol):
    """The server side of one WebSocket, with the gateway's subprotocol choice.

    The choice is a method of the class, not the constructor's `select_subprotocol`
    argument, which `websockets` binds to each instance: a reference cycle per socket.
    """

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        """`gateway.v1` when the client offers it; the upgrade goes ahead without otherwise."""
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None


def _peer_ip(stream: Any) -> str:
    """The client's IP address, from the TCP socket under any TLS layer."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        return str(transport.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "?"

"""A small HTTP server on Trio for the fake push services: HTTP/2 (h2) and HTTP/1.1 (h11).

Both protocol libraries are sans-IO, so this module is the thin Trio layer that moves bytes
in and out, as the rest of the gateway does. (Hypercorn's Trio worker would also do, but an
ASGI layer would cost a large share of the CPU the benchmark needs, and a fake must be able
to hang one stream, reset it, or answer out of order, which is simplest with the frames in
hand.) A connection speaks HTTP/2 when TLS negotiated ALPN ``h2`` or the client sends the
HTTP/2 preface (prior knowledge, as aioapns does); otherwise HTTP/1.1 with keep-alive.

Handlers are plain functions, called on the Trio thread, that return an `HttpResponse`
at once; a response with a `delay` (``math.inf`` to hang) is sent later from its own task,
so one slow stream never holds up the others.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11
import trio

from push.apns import PlainEncoder

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0"
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError)


@dataclass(slots=True)
class HttpRequest:
    """One request as the handler sees it. Header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    http2: bool
    arrived: float  # time.monotonic() when the request was complete
    peer_cert: dict[str, Any] | None = None


@dataclass(slots=True)
class HttpResponse:
    """What to answer; `delay` seconds later (``math.inf``: never), after `gate` is set."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    delay: float = 0.0
    gate: trio.Event | None = None


Handler = Callable[[HttpRequest], HttpResponse]


async def serve_http(
    handler: Handler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    h2_window: int | None = 1 << 20,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` until cancelled; report the bound port through `task_status`.

    `h2_window` is the HTTP/2 receive window offered to clients (None: the protocol's
    default of 64 KiB, which makes a busy client wait for flow-control credit).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]
    task_status.started(bound)
    await trio.serve_listeners(partial(_connection, handler, ssl_context, h2_window), listeners)


async def _connection(
    handler: Handler, context: ssl.SSLContext | None, window: int | None, raw: trio.SocketStream
) -> None:
    stream: trio.abc.Stream = raw
    peer_cert = None
    try:
        if context is not None:
            tls = trio.SSLStream(raw, context, server_side=True)
            await tls.do_handshake()
            stream = tls
            peer_cert = tls.getpeercert() or None
            alpn = tls.selected_alpn_protocol()
        else:
            alpn = None
        first = bytes(await stream.receive_some(65536))
        if not first:
            return
        if alpn == "h2" or first.startswith(PREFACE):
            await _Http2(handler, stream, peer_cert, window).run(first)
        else:
            await _http1(handler, stream, first, peer_cert)
    except (*_GONE, ssl.SSLError, OSError) as exc:
        log.debug("fake http connection ended: %s", exc)
    except h11.ProtocolError as exc:
        log.info("fake http connection: protocol error: %s", exc)
    except Exception:  # a fake server outlives any one bad connection
        log.exception("fake http connection failed")
    finally:
        await trio.aclose_forcefully(stream)


class _Http2:
    """One HTTP/2 server connection."""

    def __init__(
        self, handler: Handler, stream: trio.abc.Stream, peer_cert: Any, window: int | None
    ) -> None:
        self.handler = handler
        self.window = window
        self.stream = stream
        self.peer_cert = peer_cert
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding="utf-8",
            validate_inbound_headers=False,  # the handler checks what matters to APNs/FCM
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.encoder = PlainEncoder()  # no Huffman: cheaper in pure Python
        self.pending: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.send_lock = trio.Lock()

    async def run(self, first: bytes) -> None:
        self.conn.initiate_connection()
        # Like APNs: up to 1000 streams, and generous flow-control windows.
        settings: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000
        }
        if self.window is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = self.window
            self.conn.increment_flow_control_window(self.window * 16)
        self.conn.update_settings(settings)
        async with trio.open_nursery() as nursery:
            try:
                await self._serve(first, nursery)
            except _GONE as exc:
                log.debug("fake http/2 connection ended: %s", exc)
            nursery.cancel_scope.cancel()

    async def _serve(self, first: bytes, nursery: trio.Nursery) -> None:
        data = first
        while data:
            for event in self.conn.receive_data(data):
                if not self._event(event, nursery):
                    data = b""
                    break
            await self.flush()
            if data:
                data = bytes(await self.stream.receive_some(65536))

    def _event(self, event: Any, nursery: trio.Nursery) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            headers = {str(k).lower(): str(v) for k, v in event.headers or []}
            assert event.stream_id is not None
            self.pending[event.stream_id] = (headers, bytearray())
            if event.stream_ended is not None:
                self._complete(event.stream_id, nursery)
        elif isinstance(event, h2.events.DataReceived):
            sid = event.stream_id
            assert sid is not None
            entry = self.pending.get(sid)
            if entry is not None:
                entry[1].extend(event.data or b"")
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self._complete(event.stream_id, nursery)
        elif isinstance(event, h2.events.StreamReset):
            self.pending.pop(event.stream_id or 0, None)
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _complete(self, stream_id: int, nursery: trio.Nursery) -> None:
        entry = self.pending.pop(stream_id, None)
        if entry is None:
            return
        headers, body = entry
        request = HttpRequest(
            headers.get(":method", ""),
            headers.get(":path", ""),
            headers,
            bytes(body),
            True,
            time.monotonic(),
            self.peer_cert,
        )
        response = self.handler(request)
        if response.delay <= 0 and response.gate is None:
            self._respond(stream_id, response)
        else:
            nursery.start_soon(self._respond_later, stream_id, response)

    def _respond(self, stream_id: int, response: HttpResponse) -> None:
        headers = [(":status", str(response.status)), *response.headers]
        headers.append(("content-length", str(len(response.body))))
        try:
            if response.body:
                self.conn.send_headers(stream_id, headers)
                self.conn.send_data(stream_id, response.body, end_stream=True)
            else:
                self.conn.send_headers(stream_id, headers, end_stream=True)
        except h2.exceptions.StreamClosedError:
            pass  # the client gave up on it

    async def _respond_later(self, stream_id: int, response: HttpResponse) -> None:
        await _wait(response)
        self._respond(stream_id, response)
        with contextlib.suppress(*_GONE):
            await self.flush()

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)


async def _http1(handler: Handler, stream: trio.abc.Stream, first: bytes, peer_cert: Any) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    while True:
        request = await _read_request(conn, stream, peer_cert)
        if request is None:
            return
        response = handler(request)
        await _wait(response)
        headers = [*response.headers, ("content-length", str(len(response.body)))]
        out = conn.send(h11.Response(status_code=response.status, headers=headers))
        out += conn.send(h11.Data(data=response.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out or b"")
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _wait(response: HttpResponse) -> None:
    """Hold a response back for its delay and its gate."""
    if response.gate is not None:
        await response.gate.wait()
    if math.isinf(response.delay):
        await trio.sleep_forever()
    if response.delay > 0:
        await trio.sleep(response.delay)


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, peer_cert: Any
) -> HttpRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body.extend(event.data)
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            headers = {k.decode().lower(): v.decode() for k, v in head.headers}
            return HttpRequest(
                head.method.decode(),
                head.target.decode(),
                headers,
                bytes(body),
                False,
                time.monotonic(),
                peer_cert,
            )
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None

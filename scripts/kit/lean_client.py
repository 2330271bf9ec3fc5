"""A lean WebSocket client on a bare socket, for generating load and for misbehaving.

It frames binary messages, pings, pongs and closes itself, nothing else, and costs a
fraction of trio-websocket per received message, so that a load generator does not limit
what it measures. Its errors are trio-websocket's (`ConnectionClosed`, `HandshakeError`),
so that callers can use either client. Client frames carry the all-zero masking key
(legal; masking becomes a no-op), fine on loopback.

It only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import socket
import struct
import urllib.parse
from collections.abc import Callable

import trio
from trio_websocket import CloseReason, ConnectionClosed, HandshakeError

from scripts.kit.loopback import HOST

SUBPROTOCOL = "gateway.v1"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECEIVE_BUFFER = 64 * 1024
# Linux's SO_TIMESTAMPNS (also its control message's type), which Python does not name:
# the kernel stamps each received packet with the wall-clock time it reached the socket.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
# A loop that waits for frames never runs more than this many times.
MAX_LOOP = 10_000_000
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class LeanClient:
    """A minimal RFC 6455 client: binary messages, pings, pongs, close; nothing else.

    Open one with `open`. `get_message` answers pings and returns whole data messages;
    `next_frame` returns every frame as it comes and answers nothing, for a peer that
    must not look alive.
    """

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self.stream = stream
        self._buf = bytearray(buffered)
        self._lock = trio.Lock()  # tasks of one device may send concurrently
        self._fragments: list[bytes] = []
        self._stamped = False
        # When the data of the latest read reached this socket (seconds since the epoch,
        # the kernel's stamp), once `stamp_arrivals` is on; NaN before.
        self.arrived_at = math.nan

    @classmethod
    async def open(
        cls, url: str, *, rcvbuf: int | None = None, subprotocol: str | None = SUBPROTOCOL
    ) -> LeanClient:
        """Connect and complete the opening handshake.

        Args:
            url: ``ws://127.0.0.1:PORT/PATH``.
            rcvbuf: The socket's receive buffer in bytes, set before connecting (a small
                one makes a slow reader's window fill up soon).
            subprotocol: Offered in ``Sec-WebSocket-Protocol``; None offers none.

        Raises:
            ValueError: `url` is not on 127.0.0.1 with a port.
            OSError: The connection failed.
            HandshakeError: The server did not switch protocols.
            ConnectionClosed: The server hung up during the handshake.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.hostname != HOST or parts.port is None:
            raise ValueError(f"the lean client connects only to {HOST}, not {url}")
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect((HOST, parts.port))
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            offer = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
            request = (
                f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {HOST}:{parts.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
            )
            await stream.send_all(request.encode())
            buf = b""
            for _ in range(64):
                if b"\r\n\r\n" in buf:
                    break
                data = await stream.receive_some(RECEIVE_BUFFER)
                if not data:
                    raise ConnectionClosed(CloseReason(1006, "eof in handshake"))
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest())
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                raise HandshakeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(stream, rest)

    def stamp_arrivals(self) -> None:
        """Have the kernel stamp what arrives: `arrived_at` then tells when the bytes of
        the latest read reached the socket, however long this process took to read them
        (a load generator serving many devices reads some of them late)."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._stamped = True

    async def _receive(self) -> bytes:
        if not self._stamped:
            return await self.stream.receive_some(RECEIVE_BUFFER)
        data, ancillary, _, _ = await self.stream.socket.recvmsg(
            RECEIVE_BUFFER, socket.CMSG_SPACE(_TIMESPEC.size)
        )
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack(value[: _TIMESPEC.size])
                self.arrived_at = seconds + nanoseconds / 1e9
        return data

    async def send_message(self, payload: bytes, opcode: int = BINARY) -> None:
        """Send one frame: a whole message, or a control frame with `opcode`.

        Raises:
            ConnectionClosed: The connection is broken.
        """
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        async with self._lock:
            try:
                await self.stream.send_all(header + b"\0\0\0\0" + payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(CloseReason(1006, "broken")) from None

    async def next_frame(self) -> tuple[bool, int, bytes]:
        """The next frame from the server, whatever it is, answering nothing.

        Returns:
            (fin, opcode, payload).

        Raises:
            ConnectionClosed: The TCP stream ended (code 1006).
        """
        buf = self._buf
        for _ in range(MAX_LOOP):
            if len(buf) >= 2:
                length, offset = buf[1] & 0x7F, 2
                if length == 126 and len(buf) >= 4:
                    length, offset = struct.unpack_from("!H", buf, 2)[0], 4
                elif length == 127 and len(buf) >= 10:
                    length, offset = struct.unpack_from("!Q", buf, 2)[0], 10
                if length < 126 or offset > 2:
                    end = offset + length
                    if len(buf) >= end:
                        first = buf[0]
                        payload = bytes(buf[offset:end])
                        del buf[:end]
                        return bool(first & 0x80), first & 0x0F, payload
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                raise ConnectionClosed(CloseReason(1006, "eof"))
            buf += data
        raise RuntimeError("frame loop bound")

    async def get_message(self, *, on_ping: Callable[[bytes], None] | None = None) -> bytes:
        """The next whole data message; pings are answered on the way, or handed to
        `on_ping` (for a reader that must never wait on a write: the pong would queue
        behind its own pipelined sends).

        Raises:
            ConnectionClosed: The server closed (with its code; the close is answered and
                the socket closed), or the TCP stream ended (1006).
        """
        for _ in range(MAX_LOOP):
            fin, opcode, payload = await self.next_frame()
            if opcode == PING:
                if on_ping is None:
                    await self.send_message(payload, PONG)
                else:
                    on_ping(payload)
            elif opcode == CLOSE:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(ConnectionClosed):
                    await self.send_message(payload[:2], CLOSE)
                await trio.aclose_forcefully(self.stream)
                raise ConnectionClosed(CloseReason(code, payload[2:].decode(errors="replace")))
            elif opcode in (CONTINUATION, TEXT, BINARY):
                self._fragments.append(payload)
                if fin:
                    message = b"".join(self._fragments)
                    self._fragments.clear()
                    return message
        raise RuntimeError("message loop bound")

    async def ping(self) -> float:
        """Round trip of a WebSocket ping: the gateway answers it from its event loop, so
        this measures how responsive that loop is. Other frames are skipped."""
        sent = trio.current_time()
        await self.send_message(b"probe", PING)
        for _ in range(MAX_LOOP):
            _, opcode, _ = await self.next_frame()
            if opcode == PONG:
                return trio.current_time() - sent
            if opcode == CLOSE:
                raise ConnectionClosed(CloseReason(1006, "closed"))
        raise RuntimeError("ping loop bound")

    async def read_until_closed(self) -> int | None:
        """Read every frame until the TCP stream ends, answering nothing (not even a ping);
        the close code the server sent, if one arrived."""
        code = None
        with contextlib.suppress(ConnectionClosed):
            for _ in range(MAX_LOOP):
                _, opcode, payload = await self.next_frame()
                if opcode == CLOSE:
                    code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
        return code

    async def abort(self) -> None:
        """Drop the connection as a lost network does: a TCP reset, no close frame; bytes
        not yet read by either side are discarded."""
        with contextlib.suppress(OSError):
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        await trio.aclose_forcefully(self.stream)

    async def aclose(self) -> None:
        """Close handshake (bounded to 2 s), then the socket, also when cancelled."""
        try:
            with trio.move_on_after(2):
                await self.send_message(struct.pack("!H", 1000), CLOSE)
                for _ in range(MAX_LOOP):
                    await self.next_frame()
        except ConnectionClosed:
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

"""What the benchmark scripts share: a lean WebSocket client and process limits.

The benchmarks only ever connect to 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import resource
import socket
import struct
import urllib.parse

import trio
from trio_websocket import CloseReason, ConnectionClosed, HandshakeError

HOST = "127.0.0.1"
SUBPROTOCOL = "gateway.v1"
FD_CAP = 20_000  # open files per process, the workplace's limit
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECEIVE_BUFFER = 64 * 1024
# A loop that waits for frames never runs more than this many times.
MAX_LOOP = 10_000_000


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to min(hard, 20,000); child processes inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_CAP)
    if soft != want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (released again for the gateway to bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class LeanClient:
    """A minimal RFC 6455 client: binary messages, pongs, close; nothing else.

    It keeps the load generator cheap (a fraction of trio-websocket's cost per received
    message) so that the generator does not limit what is measured. Client frames carry the
    all-zero masking key (legal; masking becomes a no-op), fine on loopback.
    """

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self._stream = stream
        self._buf = bytearray(buffered)
        self._lock = trio.Lock()  # tasks of one device may send concurrently
        self._fragments: list[bytes] = []

    @classmethod
    async def open(cls, url: str) -> LeanClient:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname != HOST or parts.port is None:
            raise ValueError(f"the benchmark connects only to {HOST}, not {url}")
        stream = await trio.open_tcp_stream(HOST, parts.port)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {HOST}:{parts.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
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

    async def send_message(self, payload: bytes, opcode: int = 0x2) -> None:
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        async with self._lock:
            try:
                await self._stream.send_all(header + b"\0\0\0\0" + payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(CloseReason(1006, "broken")) from None

    async def _frame(self) -> tuple[bool, int, bytes]:
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
                data = await self._stream.receive_some(RECEIVE_BUFFER)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ConnectionClosed(CloseReason(1006, "eof"))
            buf += data
        raise RuntimeError("frame loop bound")

    async def get_message(self) -> bytes:
        for _ in range(MAX_LOOP):
            fin, opcode, payload = await self._frame()
            if opcode == 0x9:
                await self.send_message(payload, 0xA)
            elif opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(ConnectionClosed):
                    await self.send_message(payload[:2], 0x8)
                await trio.aclose_forcefully(self._stream)
                raise ConnectionClosed(CloseReason(code, payload[2:].decode(errors="replace")))
            elif opcode in (0x0, 0x1, 0x2):
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
        await self.send_message(b"probe", 0x9)
        for _ in range(MAX_LOOP):
            _, opcode, _ = await self._frame()
            if opcode == 0xA:
                return trio.current_time() - sent
            if opcode == 0x8:
                raise ConnectionClosed(CloseReason(1006, "closed"))
        raise RuntimeError("ping loop bound")

    async def abort(self) -> None:
        """Drop the connection as a lost network does: a TCP reset, no close frame; bytes
        not yet read by either side are discarded."""
        sock = self._stream.socket
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """Close handshake (bounded to 2 s), then the socket, also when cancelled."""
        try:
            with trio.move_on_after(2):
                await self.send_message(struct.pack("!H", 1000), 0x8)
                for _ in range(MAX_LOOP):
                    await self._frame()
        except ConnectionClosed:
            pass
        finally:
            await trio.aclose_forcefully(self._stream)

"""Protocol-level helpers for tests that need to misbehave on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url


@asynccontextmanager
async def raw_ws(url: str, **kw: Any) -> AsyncIterator[WebSocketConnection]:
    """A plain WebSocket to the gateway, no protocol handling."""
    async with open_websocket_url(url, max_message_size=16 * 1024 * 1024, **kw) as ws:
        yield ws


async def send(ws: WebSocketConnection, item: Any) -> None:
    """Send one CBOR item (a frame or a batch)."""
    await ws.send_message(cbor2.dumps(item))


async def recv(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """Receive one message and return its frames."""
    item = cbor2.loads(await ws.get_message())
    return item if isinstance(item, list) else [item]


async def recv_until(ws: WebSocketConnection, kind: str) -> list[dict[str, Any]]:
    """Frames up to and including the first of type `kind`."""
    seen: list[dict[str, Any]] = []
    while True:
        for frame in await recv(ws):
            seen.append(frame)
            if frame.get("t") == kind:
                return seen


async def hello(ws: WebSocketConnection, token: str) -> list[dict[str, Any]]:
    """Authenticate and return every frame up to `drained`."""
    await send(ws, {"t": "hello", "v": 1, "token": token})
    return await recv_until(ws, "drained")


async def close_code(ws: WebSocketConnection) -> int | None:
    """Read until the server closes; return its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as exc:
        return exc.reason.code
    finally:
        await trio.lowlevel.checkpoint()


class StubbornPeer:
    """A WebSocket client on a bare socket that only reads when told to.

    trio-websocket answers pings and drains the socket on its own; this peer does
    neither, so tests can model a phone whose app froze or whose radio went quiet.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        import wsproto

        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> StubbornPeer:
        import socket

        from wsproto.events import AcceptConnection, Request

        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        peer = cls(trio.SocketStream(sock))
        await peer.stream.send_all(peer.ws.send(Request(host="127.0.0.1", target="/ws")))
        while not any(isinstance(e, AcceptConnection) for e in await peer._events()):
            pass
        return peer

    async def _events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def send(self, item: Any) -> None:
        from wsproto.events import BytesMessage

        await self.stream.send_all(self.ws.send(BytesMessage(data=cbor2.dumps(item))))

    async def read_until_closed(self) -> int | None:
        """Read everything the server sends until the TCP stream ends (never answering a
        ping); return the close code the server sent, if one arrived."""
        from wsproto.events import CloseConnection

        code = None
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return code
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    code = event.code

    async def aclose(self) -> None:
        await self.stream.aclose()

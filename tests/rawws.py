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

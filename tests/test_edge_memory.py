"""A finished socket's memory goes back at once, by reference counting.

The gateway keeps the cyclic garbage collector's full collections rare (`gateway.cli`),
so anything a connection leaves in a reference cycle would pile up between them: under
churn, tens of thousands of objects, and a resident size that grows for as long.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.testing
from websockets.server import ServerProtocol

from gateway.client import connect


def protocols() -> int:
    """WebSocket protocol objects still in memory (the gateway's; the client's differ)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, ServerProtocol))


@contextmanager
def collector_off() -> Iterator[None]:
    """No cyclic collection inside the block: what is freed is freed by refcounting."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_closed_connections_leave_no_cycle_behind(server, token):
    with collector_off():
        before = protocols()
        for n in range(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.edge.wait_for_close, f"churn{n}", "phone")
                await trio.testing.wait_all_tasks_blocked()
                async with connect(server.url, token(f"churn{n}", "phone")) as device:
                    await device.wait_drained()
                    assert protocols() == before + 1  # the live one is counted
            await trio.testing.wait_all_tasks_blocked()  # its task has ended
            assert protocols() == before


async def test_refused_upgrades_leave_no_cycle_behind(server):
    with collector_off():
        before = protocols()
        for _ in range(5):
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(
                    b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                answer = b""
                with trio.fail_after(10):
                    while chunk := await stream.receive_some(4096):  # until the server hangs up
                        answer += chunk
                assert answer.startswith(b"HTTP/1.1 404")
            await trio.testing.wait_all_tasks_blocked()
            assert protocols() == before

"""Push provider faults: online delivery unaffected, retries bounded, the push queue bounded.

The real APNs provider (aioapns over HTTP/2 and TLS) talks to the fake APNs, scripted to
answer 503, to answer slowly, or to hang; or to a listener that resets every TLS
handshake. While six idle devices are being woken through the failing provider, two online
devices exchange messages, which must all arrive in order.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.client import GatewayClient, SendRefused, connect
from push.dispatcher import PushDispatcher
from push.settings import ApnsSettings
from scripts.fakes import FakeApns, Reply
from tests.conftest import make_settings, running_server

TOPIC = "com.example.app"
IDLE = 6
MAX_ATTEMPTS = 3
WORKERS = 2
QUEUE = 3


@pytest.fixture
async def fake_apns(tmp_path: Path) -> AsyncIterator[FakeApns]:
    fake = FakeApns.create(tmp_path / "apns", topics={TOPIC})
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        nursery.cancel_scope.cancel()


class ResettingListener:
    """Accepts TCP, reads the TLS ClientHello, answers with a reset."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started(self.port)
        async with listener:
            while True:
                stream = await listener.accept()
                self.connections += 1
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                with trio.move_on_after(1):
                    await stream.receive_some(4096)
                stream.socket.close()  # linger 0: an RST instead of a FIN


async def register(client: GatewayClient, push_token: str) -> None:
    await client.register_push("apns", push_token, topic=TOPIC)
    with pytest.raises(SendRefused):  # frames are handled in order: the token is stored
        await client.send("nobody-at-all", b"barrier")


def dispatcher(server: Any) -> PushDispatcher:
    push = server.push
    assert push is not None
    return push


@pytest.mark.parametrize("fault", ["503", "slow", "hang", "tls-reset"])
async def test_push_faults_leave_online_delivery_alone_and_retries_bounded(
    tmp_path: Path, fake_apns: FakeApns, token: Any, fault: str
) -> None:
    apns = fake_apns.settings()
    resetter = ResettingListener()
    if fault == "503":
        fake_apns.script.default = Reply(503, "ServiceUnavailable")
    elif fault == "slow":
        fake_apns.script.default = Reply(delay=0.3)  # slow, but within request_timeout
    elif fault == "hang":
        fake_apns.script.default = Reply.hang()
    settings = make_settings(
        tmp_path,
        push={
            "apns": ApnsSettings(**apns),
            "workers": WORKERS,
            "queue_size": QUEUE,
            "max_attempts": MAX_ATTEMPTS,
            "retry_base": 0.05,
            "max_retry_delay": 1.0,
            # aioapns keeps reconnecting within an attempt: the timeout ends each one
            "request_timeout": 0.3 if fault == "tls-reset" else 1.0,
        },
    )
    async with trio.open_nursery() as nursery:
        if fault == "tls-reset":
            port = await nursery.start(resetter.serve)
            apns["endpoint"] = f"https://127.0.0.1:{port}"
            settings = settings.replace(push={"apns": ApnsSettings(**apns)})
        async with running_server(settings) as server:
            for i in range(IDLE):
                async with connect(server.url, token(f"idle{i}", "phone")) as idle:
                    await register(idle, f"{i:064x}")
            push = dispatcher(server)
            high_water = Counter[str]()

            async def watch_queue() -> None:
                while True:
                    gauges = push.metrics()
                    high_water["queued"] = max(high_water["queued"], gauges["queued"])
                    high_water["in_flight"] = max(high_water["in_flight"], gauges["in_flight"])
                    await trio.sleep(0.01)

            nursery.start_soon(watch_queue)
            async with (
                connect(server.url, token("carol", "phone")) as carol,
                connect(server.url, token("alice", "phone")) as alice,
            ):
                for i in range(IDLE):
                    await alice.send(f"idle{i}", b"wake up")
                with trio.fail_after(20):
                    for n in range(30):
                        await alice.send("carol", f"{n}".encode())
                        assert (await carol.next_delivery()).frame["body"] == f"{n}".encode()
                    if fault != "hang":
                        await push.wait_idle()
            counters = push.counters
            nursery.cancel_scope.cancel()

    # Bounded: never more requests per wake-up than max_attempts, never more queued or in
    # flight than configured, whatever the provider does.
    per_token = Counter(r.token for r in fake_apns.records)
    assert all(n <= MAX_ATTEMPTS for n in per_token.values()), per_token
    assert high_water["queued"] <= QUEUE and high_water["in_flight"] <= WORKERS
    sent = counters[("apns", "sent_alert")]
    if fault == "slow":
        assert sent + push.dropped == IDLE and sent >= WORKERS
    elif fault == "503":
        assert sent == 0 and counters[("apns", "retried")] > 0
        assert max(per_token.values()) == MAX_ATTEMPTS  # retried up to the bound, no further
    elif fault == "tls-reset":
        # one TLS connection per attempt, each attempt bounded by request_timeout
        assert sent == 0 and 0 < resetter.connections <= (IDLE - push.dropped) * MAX_ATTEMPTS
        assert counters[("apns", "retried")] > 0
    else:  # hang: both workers stuck on the fake until request_timeout, then retried
        assert sent == 0 and len(fake_apns.records) >= WORKERS

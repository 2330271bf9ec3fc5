"""Zombie sockets: a connected device that leaves an urgent message unanswered and sends
nothing for `[push] ack_timeout` gets an alert wake-up as though it were offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

from gateway.ack_watch import AckWatch
from gateway.client import connect
from push.settings import ApnsSettings
from scripts.fakes import FakeApns
from tests.conftest import make_settings, running_server
from tests.test_push_e2e import APNS_TOKEN, TOPIC, fake_apns, register  # noqa: F401 (fixture)
from tests.wakers import LogWaker


class Rescues(LogWaker):
    def __init__(self) -> None:
        super().__init__()
        self.rescued: list[tuple[str, str, float]] = []

    def rescue(self, user: str, device: str) -> None:
        self.rescued.append((user, device, trio.current_time()))


@dataclass
class Conn:
    user: str
    device: str
    urgent_since: float | None = None


async def test_only_a_connection_heard_from_nothing_since_is_rescued(
    autojump_clock: Any,
) -> None:
    waker = Rescues()
    watch = AckWatch(15.0, waker)
    silent, answering, ended = Conn("bob", "phone"), Conn("carol", "phone"), Conn("dan", "pad")
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        start = trio.current_time()
        for conn in (silent, answering, ended):
            conn.urgent_since = trio.current_time()
            watch.watch(conn)
        await trio.sleep(5)
        answering.urgent_since = None  # an ack, a pong, any frame
        ended.urgent_since = None  # the connection ended
        await trio.sleep(20)
        nursery.cancel_scope.cancel()

    assert waker.rescued == [("bob", "phone", start + 15.0)]
    assert watch.rescues == 1


async def test_a_later_urgent_message_is_watched_from_its_own_time(autojump_clock: Any) -> None:
    waker = Rescues()
    watch = AckWatch(15.0, waker)
    conn = Conn("bob", "phone")
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        start = trio.current_time()
        conn.urgent_since = start
        watch.watch(conn)
        await trio.sleep(10)
        conn.urgent_since = None  # it answered the first
        conn.urgent_since = trio.current_time()  # a second urgent message, at +10 s
        watch.watch(conn)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()

    assert waker.rescued == [("bob", "phone", start + 25.0)]


async def test_a_silent_connected_phone_gets_an_alert_through_apns(
    tmp_path: Path, fake_apns: FakeApns, token: Any  # noqa: F811
) -> None:
    settings = make_settings(
        tmp_path,
        push={
            "apns": ApnsSettings(**fake_apns.settings(topic="com.example.default")),
            "ack_timeout": 0.5,
            "linger": 3600.0,
            "request_timeout": 30.0,
        },
    )
    async with running_server(settings) as server:
        async with connect(server.url, token("bob", "phone"), auto_ack=False) as bob:
            await register(bob, "apns", APNS_TOKEN, topic=TOPIC)
            async with connect(server.url, token("alice", "phone")) as alice:
                await alice.send("bob", b"ciphertext", urgent=True)
                await bob.next_delivery()  # it arrives, and the app never answers
                with trio.fail_after(10):
                    (record,) = await fake_apns.wait_requests(1)
        assert record.token == APNS_TOKEN
        assert record.headers["apns-push-type"] == "alert"
        assert b"ciphertext" not in str(record).encode()
        assert server.push is not None and server.push.metrics()["zombie_rescues"] == 1

"""Wake-ups across two gateway nodes on one shared Redis, with real push dispatchers and
the fake APNs: a connect on either node cancels what the other had pending for the
device, and an alert sent by one node is cleared by a read stored on the other."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from gateway.client import connect
from gateway.server import GatewayServer
from push.dispatcher import PushDispatcher
from push.settings import ApnsSettings
from scripts.fakes import FakeApns
from tests.conftest import running_server
from tests.test_cluster import DEADLINE, cluster_settings, shared_redis, tokens
from tests.test_push_e2e import APNS_TOKEN, TOPIC, fake_apns, go_idle

__all__ = ["fake_apns", "shared_redis"]  # fixtures


@asynccontextmanager
async def two_pushing_nodes(
    tmp_path: Path, shared: tuple[str, bool], apns: FakeApns
) -> AsyncIterator[tuple[GatewayServer, GatewayServer]]:
    redis_url, redis_cluster = shared
    settings = cluster_settings(
        tmp_path,
        redis_url,
        redis_cluster=redis_cluster,
        push={
            "apns": ApnsSettings(**apns.settings(topic="com.example.default")),
            "linger": 3600.0,
            "alert_retry": 60.0,  # not due within a test: only whether it is pending counts
            "request_timeout": 30.0,
        },
    )
    async with running_server(settings) as a, running_server(settings) as b:
        yield a, b


def push(node: GatewayServer) -> PushDispatcher:
    assert node.push is not None
    return node.push


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for a condition that crosses Redis pub/sub to hold."""
    with trio.fail_after(DEADLINE):
        while not condition():  # noqa: ASYNC110 (state without an event, polled with a bound)
            await trio.sleep(0.01)


async def test_a_connect_on_the_other_node_cancels_the_alert_retry_and_no_more(
    tmp_path: Path, shared_redis: tuple[str, bool], fake_apns: FakeApns
) -> None:
    token = tokens(tmp_path)
    async with two_pushing_nodes(tmp_path, shared_redis, fake_apns) as (a, b):
        # The phone's last connection was on A, so what A stores for it rings A (its claim
        # there, or none): A decides its wake-ups.
        await go_idle(a, token, "apns", APNS_TOKEN, topic=TOPIC)
        async with connect(a.url, token("alice", "phone")) as alice:
            with trio.fail_after(DEADLINE):
                await alice.send("bob", b"ciphertext", urgent=True)
                await fake_apns.wait_requests(1)
                await push(a).wait_idle()
            assert push(a).counters[("apns", "sent_alert")] == 1
            assert push(a).policy.next_deadline() is not None  # its retry is pending

            await go_idle(b, token, "apns", APNS_TOKEN, topic=TOPIC)  # on B, and gone again
            await until(lambda: len(push(a).policy) == 0)  # nothing pending on A
            assert not push(a).policy.is_online("bob", "phone")  # nor connected there

            # Connected nowhere again: a new message wakes it (from whichever node rings).
            with trio.fail_after(DEADLINE):
                await alice.send("bob", b"ciphertext", urgent=True)
                await fake_apns.wait_requests(2)
                await push(a).wait_idle()
                await push(b).wait_idle()
        sent = [push(n).counters[("apns", "sent_alert")] for n in (a, b)]
        assert sum(sent) == 2 and len(fake_apns.records) == 2


async def test_a_read_stored_on_one_node_clears_the_alert_sent_by_the_other(
    tmp_path: Path, shared_redis: tuple[str, bool], fake_apns: FakeApns
) -> None:
    token = tokens(tmp_path)
    async with two_pushing_nodes(tmp_path, shared_redis, fake_apns) as (a, b):
        await go_idle(a, token, "apns", APNS_TOKEN, topic=TOPIC)  # the phone, via A
        async with (
            connect(b.url, token("bob", "tablet")) as tablet,
            connect(a.url, token("alice", "phone")) as alice,
        ):
            await tablet.wait_drained()
            with trio.fail_after(DEADLINE):
                sent = await alice.send("bob", b"ciphertext", urgent=True)  # stored on A
                (alert,) = await fake_apns.wait_requests(1)
                await push(a).wait_idle()
                assert (await tablet.next_delivery()).frame["id"] == sent.id
            assert push(a).counters[("apns", "sent_alert")] == 1
            await until(lambda: b.counters.redis["alert_announcements_received"] >= 1)

            await tablet.read("alice", [sent.id])  # stored on B, which decides the clear
            with trio.fail_after(DEADLINE):
                (_, clear) = await fake_apns.wait_requests(2)
                await push(b).wait_idle()
        assert alert.headers["apns-push-type"] == "alert"
        assert clear.payload == {"aps": {"content-available": 1}, "clear": 1}
        assert (push(b).metrics()["clears"], push(a).metrics()["clears"]) == (1, 0)
        assert a.counters.redis["alert_announcements_sent"] >= 1


async def test_a_device_moving_to_the_other_node_starts_no_linger_where_it_was(
    tmp_path: Path, shared_redis: tuple[str, bool], fake_apns: FakeApns
) -> None:
    token = tokens(tmp_path)
    async with two_pushing_nodes(tmp_path, shared_redis, fake_apns) as (a, b):
        async with connect(a.url, token("bob", "phone"), reconnect=False) as on_a:
            await on_a.wait_drained()
            closed, codes = trio.Event(), []

            async def watch() -> None:
                codes.append(await a.edge.wait_for_close("bob", "phone"))
                closed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await trio.testing.wait_all_tasks_blocked()
                async with connect(b.url, token("bob", "phone")) as on_b:
                    await on_b.wait_drained()
                    with trio.fail_after(DEADLINE):
                        await closed.wait()
        assert codes == [4009]
        # Closed on A because it is connected on B: A has no linger check to run for it.
        assert len(push(a).policy) == 0
        assert a.counters.redis["kicks_received"] == 1

"""Graceful drain: 1012 spread over drain_seconds with a reconnect hint, nothing lost;
and the client SDK's backoff when told to go away."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack

import pytest
import trio
from trio_websocket import ConnectionClosed

from gateway.auth import mint_token
from gateway.client import Backoff, ClientClosed, SendRefused, connect
from gateway.drain import parse_reconnect_hint
from gateway.store.sqlite import SqliteStore
from tests.conftest import make_settings, running_server
from tests.rawws import hello, raw_ws
from tests.test_push_e2e import fake_apns  # noqa: F401 (a fixture)


async def test_drain_closes_everyone_with_1012_spread_over_drain_seconds_and_loses_nothing(
    tmp_path,
):
    drain_seconds = 1.5
    settings = make_settings(tmp_path, server={"port": 0, "drain_seconds": drain_seconds})
    auth = settings.auth
    closes: list[tuple[float, int, str | None]] = []
    acknowledged: list[str] = []
    fifty_acknowledged, all_closed = trio.Event(), trio.Event()

    async def watch(ws) -> None:
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            closes.append((trio.current_time(), exc.reason.code, exc.reason.reason))
            if len(closes) == 12:
                all_closed.set()

    async with running_server(settings) as server:
        async with connect(server.url, mint_token(auth, "bob", "phone")):
            pass  # bob is known, and offline: everything sent to him must be stored
        async with AsyncExitStack() as stack:
            idle = []
            for i in range(12):
                ws = await stack.enter_async_context(raw_ws(server.url))
                await hello(ws, mint_token(auth, f"idle{i}", "phone"))
                idle.append(ws)
            alice = await stack.enter_async_context(
                connect(server.url, mint_token(auth, "alice", "phone"), reconnect=False)
            )

            async def stream() -> None:
                for i in range(100_000):
                    try:
                        acknowledged.append((await alice.send("bob", b"m", id=f"m{i:06d}")).id)
                        if len(acknowledged) == 50:
                            fifty_acknowledged.set()
                    except (ClientClosed, SendRefused):
                        return

            async with trio.open_nursery() as nursery:
                for ws in idle:
                    nursery.start_soon(watch, ws)
                nursery.start_soon(stream)
                await fifty_acknowledged.wait()
                started = trio.current_time()
                server.shutdown()
                with trio.fail_after(settings.server.shutdown_timeout):
                    await all_closed.wait()

    times = sorted(t for t, _, _ in closes)
    assert {code for _, code, _ in closes} == {1012}
    hints = [parse_reconnect_hint(reason) for _, _, reason in closes]
    assert all(h is not None and 0 <= h < drain_seconds for h in hints)
    assert len(set(hints)) > 1  # jittered, not one value for everyone
    assert times[-1] - started < drain_seconds + 2.0
    assert times[-1] - times[0] > drain_seconds / 3  # spread, not all at once

    # Every acknowledged message is in the store after the drain.
    store = SqliteStore(settings.store.path, doorbell=lambda *a: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        items = await store.fetch("bob", "phone", 0, 1_000_000, 0)
        store.close()
    assert set(acknowledged) <= {item.msg_id for item in items}
    assert len(acknowledged) >= 50


async def test_upgrades_during_the_drain_are_refused_with_503(tmp_path):
    settings = make_settings(tmp_path, server={"port": 0, "drain_seconds": 4.0})
    async with running_server(settings) as server, raw_ws(server.url) as a, raw_ws(server.url) as b:
        # Two connections: the second is closed 2 s into the drain, so it is still going.
        await hello(a, mint_token(settings.auth, "a", "phone"))
        await hello(b, mint_token(settings.auth, "b", "phone"))
        server.shutdown()
        with trio.fail_after(5):
            while not server.edge.draining:  # noqa: ASYNC110 (a flag, polled with a bound)
                await trio.sleep(0.01)
        with pytest.raises(ClientClosed):
            async with connect(server.url, mint_token(settings.auth, "c", "d"), reconnect=False):
                pass
        assert server.admission.refused["draining"] == 1


def test_backoff_follows_the_reconnect_hint_of_1012_with_jitter():
    backoff = Backoff(base=0.2, rng=random.Random(1))

    delays = [backoff.after_close(1012, "restarting; reconnect_after_ms=3000") for _ in range(3)]

    assert all(3.0 <= d <= 3.0 + 0.2 * 2**i for i, d in enumerate(delays))
    assert len(set(delays)) == 3


def test_backoff_spreads_over_a_window_after_1013_or_a_bare_1012():
    for code in (1013, 1012):
        delays = [
            Backoff(overload_window=5.0, rng=random.Random(seed)).after_close(code, None)
            for seed in range(200)
        ]
        assert max(delays) <= 5.0
        assert max(delays) > 4.0 and min(delays) < 1.0  # spread over the window


def test_backoff_after_a_503_waits_at_least_retry_after():
    delays = [
        Backoff(overload_window=2.0, rng=random.Random(seed)).after_refusal(503, 7.0)
        for seed in range(50)
    ]
    assert all(7.0 <= d <= 9.0 for d in delays)
    assert Backoff(rng=random.Random(1)).after_refusal(404, None) <= 0.2


def test_a_normal_close_reconnects_on_the_plain_exponential_backoff():
    backoff = Backoff(base=0.2, overload_window=60.0, rng=random.Random(3))

    assert backoff.after_close(1000, None) <= 0.2
    assert backoff.after_close(1006, None) <= 0.4


async def test_drain_flushes_wake_ups_already_queued(tmp_path, fake_apns) -> None:
    from functools import partial

    from gateway.server import serve_gateway
    from push.settings import ApnsSettings
    from scripts.fakes import Reply
    from tests.test_push_e2e import APNS_TOKEN, TOPIC, go_idle

    settings = make_settings(
        tmp_path, push={"apns": ApnsSettings(**fake_apns.settings(topic=TOPIC)), "linger": 3600.0}
    )
    gate = trio.Event()
    fake_apns.script.add(Reply(200, gate=gate), token=APNS_TOKEN)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_gateway, settings))
        await go_idle(server, lambda u, d: mint_token(settings.auth, u, d), "apns", APNS_TOKEN, topic=TOPIC)  # fmt: skip
        async with connect(server.url, mint_token(settings.auth, "alice", "phone")) as alice:
            await alice.send("bob", b"wake up", urgent=True)
            with trio.fail_after(10):
                await fake_apns.wait_requests(1)  # in flight, held by the gate
            server.shutdown()
            with trio.fail_after(10):
                while not server.edge.draining:  # noqa: ASYNC110 (a flag, polled with a bound)
                    await trio.sleep(0.01)
        gate.set()  # the provider answers only now, during the drain
    # serve_gateway has returned: the wake-up completed instead of being cancelled.
    push = server.push
    assert push is not None
    assert push.counters[("apns", "sent_alert")] == 1

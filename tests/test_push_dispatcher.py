"""The dispatcher driving the policy on Trio's clock (autojump), with a scripted provider."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from gateway.errors import StoreError
from push.dispatcher import PushDispatcher
from push.notification import Outcome, PushResult
from push.policy import WakeKind
from push.store import ItemKind
from tests.pushkit import MemoryStore, ScriptedProvider, push_settings

ALERT, BACKGROUND = WakeKind.ALERT, WakeKind.BACKGROUND
RETRY_503 = PushResult(Outcome.RETRY, 503, "ServiceUnavailable")
GONE = PushResult(Outcome.INVALID_TOKEN, 410, "Unregistered")


@asynccontextmanager
async def running(
    store: MemoryStore, provider: ScriptedProvider | None = None, **settings: Any
) -> AsyncIterator[PushDispatcher]:
    providers = {"apns": provider} if provider is not None else {}
    dispatcher = PushDispatcher(
        push_settings(**settings), providers, wall_ms=WallClock(), rng=random.Random(7)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run, store)
        yield dispatcher
        dispatcher.close()


class WallClock:
    """Wall-clock milliseconds that follow Trio's (mock) clock."""

    def __call__(self) -> int:
        return 1_700_000_000_000 + int(trio.current_time() * 1000)


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    s.register("bob", "phone", "ab" * 32)
    return s


@pytest.fixture
def apns() -> ScriptedProvider:
    return ScriptedProvider("apns")


def kinds(provider: ScriptedProvider) -> list[WakeKind]:
    return [a.notification.kind for a in provider.attempts]


async def test_urgent_alert_at_once_then_one_coalesced_alert_after_the_cooldown(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns, alert_retries=0) as dispatcher:
        start = trio.current_time()
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        assert apns.attempts[0].at == start
        await trio.sleep(2)
        dispatcher.stored("bob", "phone", urgent=True)
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(2)
        assert apns.attempts[1].at == pytest.approx(start + 10)
        await trio.sleep(60)
        assert kinds(apns) == [ALERT, ALERT]


async def test_an_unanswered_alert_is_sent_again_until_the_device_connects(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns) as dispatcher:
        await trio.testing.wait_all_tasks_blocked()  # the timer task sleeps: nothing is due
        start = trio.current_time()
        store.queue("bob", "phone", urgent=True)
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(2)  # the alert, and its retry once 20 s passed unanswered
        assert apns.attempts[1].at == pytest.approx(start + 20)
        first, again = (a.notification for a in apns.attempts)
        assert again.collapse_id == first.collapse_id
        dispatcher.connected("bob", "phone")
        await trio.sleep(600)
        assert kinds(apns) == [ALERT, ALERT]
        assert dispatcher.metrics()["alert_retries"] == 1


async def test_no_retry_once_the_urgent_message_is_acked(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    # The queue drained (acked through a connection this node did not see, or expired):
    # the retry finds nothing to alert about, and no later retry is tried either.
    async with running(store, apns) as dispatcher:
        store.queue("bob", "phone", urgent=True)
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        store.ack("bob", "phone")
        await trio.sleep(600)
        assert kinds(apns) == [ALERT]
        assert dispatcher.metrics()["alert_retries"] == 0
        assert dispatcher.counters[("none", "retry_skipped")] == 1
        assert len(dispatcher.policy) == 0  # nothing left pending for the device


async def test_no_retry_for_an_urgent_message_read_on_another_device(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns) as dispatcher:
        store.queue("bob", "phone", urgent=True, msg_id="m1")
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        # bob read m1 on his laptop: the read receipt is queued for the phone too.
        store.queue("bob", "phone", urgent=False, kind=ItemKind.READ, sender="bob", ids=("m1",))
        await trio.sleep(600)
        assert kinds(apns) == [ALERT]
        assert dispatcher.counters[("none", "retry_skipped")] == 1


async def test_a_retry_goes_out_for_an_urgent_message_still_unread(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns, alert_retries=1) as dispatcher:
        store.queue("bob", "phone", urgent=True, msg_id="m1")
        store.queue("bob", "phone", urgent=True, msg_id="m2")
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        # A read by bob of m1, and alice's read receipt for one of bob's own messages
        # (not a read of bob's): m2 is still unread.
        store.queue("bob", "phone", urgent=False, kind=ItemKind.READ, sender="bob", ids=("m1",))
        store.queue("bob", "phone", urgent=False, kind=ItemKind.READ, sender="alice", ids=("m2",))
        await apns.wait_attempts(2)
        await trio.sleep(600)
        assert kinds(apns) == [ALERT, ALERT]
        assert dispatcher.metrics()["alert_retries"] == 1


async def test_background_at_most_once_per_background_cooldown(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns) as dispatcher:
        start = trio.current_time()
        dispatcher.stored("bob", "phone", urgent=False)
        await trio.sleep(60)
        dispatcher.stored("bob", "phone", urgent=False)
        dispatcher.stored("bob", "phone", urgent=False)
        await trio.sleep(600)
        assert kinds(apns) == [BACKGROUND]
        await apns.wait_attempts(2)
        assert apns.attempts[1].at == pytest.approx(start + 1200)
        assert kinds(apns) == [BACKGROUND, BACKGROUND]


async def test_disconnect_with_unacked_items_wakes_once_after_linger(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    store.queue("bob", "phone", urgent=False, kind=ItemKind.DELIVERED)
    async with running(store, apns) as dispatcher:
        dispatcher.connected("bob", "phone")
        start = trio.current_time()
        dispatcher.disconnected("bob", "phone")
        await apns.wait_attempts(1)
        assert apns.attempts[0].at == pytest.approx(start + 60)
        assert kinds(apns) == [BACKGROUND]
        await trio.sleep(3600)
        assert len(apns.attempts) == 1


async def test_linger_wake_up_is_an_alert_when_an_urgent_message_is_unacked(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    store.queue("bob", "phone", urgent=True)
    async with running(store, apns) as dispatcher:
        dispatcher.disconnected("bob", "phone")
        await apns.wait_attempts(1)
        assert kinds(apns) == [ALERT]


async def test_disconnect_with_nothing_unacked_sends_nothing(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns) as dispatcher:
        dispatcher.disconnected("bob", "phone")
        await trio.sleep(120)
        await dispatcher.wait_idle()
        assert apns.attempts == []
        assert dispatcher.counters[("none", "linger_skipped")] == 1


async def test_connect_cancels_the_linger_and_a_pending_coalesced_alert(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    store.queue("bob", "phone", urgent=True)
    async with running(store, apns) as dispatcher:
        dispatcher.disconnected("bob", "phone")
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        await trio.sleep(1)
        dispatcher.stored("bob", "phone", urgent=True)  # a trailing alert is owed at +10 s
        await trio.sleep(5)
        dispatcher.connected("bob", "phone")
        await trio.sleep(600)
        assert len(apns.attempts) == 1


async def test_a_503_is_retried_with_exponential_backoff_and_jitter(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.extend([RETRY_503, RETRY_503, RETRY_503])
    async with running(store, apns, retry_base=1.0) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        attempts = await apns.wait_attempts(4)
        gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
        for n, gap in enumerate(gaps):
            ceiling = 1.0 * 2**n
            assert ceiling / 2 <= gap <= ceiling
        await dispatcher.wait_idle()
        assert dispatcher.counters[("apns", "retried")] == 3
        assert dispatcher.counters[("apns", "sent_alert")] == 1


async def test_a_429_waits_at_least_retry_after(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.append(PushResult(Outcome.RETRY, 429, "TooManyRequests", retry_after=30))
    async with running(store, apns, retry_base=1.0) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        first, second = await apns.wait_attempts(2)
        assert second.at - first.at == pytest.approx(30)


async def test_a_retry_after_beyond_the_limit_is_given_up_not_shortened(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.append(PushResult(Outcome.RETRY, 429, "TooManyRequests", retry_after=3600))
    async with running(store, apns, max_retry_delay=60.0) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        await dispatcher.wait_idle()
        assert len(apns.attempts) == 1
        assert dispatcher.counters[("apns", "failed")] == 1


async def test_retries_are_bounded(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.extend([RETRY_503] * 10)
    async with running(store, apns, max_attempts=3) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        await dispatcher.wait_idle()
        assert len(apns.attempts) == 3
        assert dispatcher.counters[("apns", "failed")] == 1


async def test_a_hanging_provider_times_out_and_is_retried(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.append("hang")
    async with running(store, apns, request_timeout=10.0) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        first, second = await apns.wait_attempts(2)
        assert second.at - first.at >= 10.0
        await dispatcher.wait_idle()
        assert dispatcher.counters[("apns", "sent_alert")] == 1


async def test_a_reconnect_during_backoff_abandons_the_retry(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.append(RETRY_503)
    async with running(store, apns, retry_base=8.0) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        dispatcher.connected("bob", "phone")
        await dispatcher.wait_idle()
        assert len(apns.attempts) == 1
        assert dispatcher.counters[("apns", "cancelled")] == 1


async def test_an_invalid_token_is_cleared(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.append(GONE)
    async with running(store, apns) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        await dispatcher.wait_idle()
        assert ("bob", "phone") not in store.tokens
        assert dispatcher.counters[("apns", "token_cleared")] == 1


async def test_a_token_registered_again_after_the_push_survives_a_late_410(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    held = trio.Event()
    apns.answers.extend([held, GONE])
    async with running(store, apns) as dispatcher:
        dispatcher.stored("bob", "phone", urgent=True)
        await apns.wait_attempts(1)
        await trio.sleep(1)
        store.register("bob", "phone", "ab" * 32, at=WallClock()())  # the app registered again
        held.set()
        await dispatcher.wait_idle()
        assert store.tokens[("bob", "phone")].token == "ab" * 32
        assert dispatcher.counters[("apns", "token_kept")] == 1


async def test_credential_failures_are_loud_counted_and_not_fatal(
    store: MemoryStore,
    apns: ScriptedProvider,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = PushResult(Outcome.CREDENTIALS, 403, "InvalidProviderToken")
    apns.answers.extend([refused, refused])
    store.register("carol", "phone", "cd" * 32)
    async with running(store, apns) as dispatcher:
        with caplog.at_level(logging.ERROR, logger="push.dispatcher"):
            dispatcher.stored("bob", "phone", urgent=True)
            dispatcher.stored("carol", "phone", urgent=True)
            await apns.wait_attempts(2)
            await dispatcher.wait_idle()
        assert dispatcher.counters[("apns", "credentials")] == 2
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "InvalidProviderToken" in errors[0].getMessage()
        dispatcher.stored("dave", "phone", urgent=True)  # still serving
        await dispatcher.wait_idle()


async def test_a_device_without_a_token_gets_no_push(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns) as dispatcher:
        dispatcher.stored("nobody", "phone", urgent=True)
        await dispatcher.wait_idle()
        assert apns.attempts == []
        assert dispatcher.counters[("none", "no_token")] == 1


async def test_a_store_failure_skips_the_wake_up_and_is_counted_not_reported_as_a_bug(
    store: MemoryStore,
    apns: ScriptedProvider,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def unavailable(user: str, device: str) -> None:
        raise StoreError("database is locked")

    monkeypatch.setattr(store, "push_token", unavailable)
    async with running(store, apns) as dispatcher:
        with caplog.at_level(logging.WARNING, logger="push.dispatcher"):
            dispatcher.stored("bob", "phone", urgent=True)
            await dispatcher.wait_idle()
        assert apns.attempts == []
        assert dispatcher.counters[("store", "error")] == 1
        assert dispatcher.counters[("internal", "error")] == 0
        assert "database is locked" in caplog.text
        assert not any(record.exc_info for record in caplog.records)


async def test_a_provider_without_credentials_falls_back_to_the_log_provider(
    store: MemoryStore, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    token = "ef" * 32
    store.register("erin", "pixel", token, provider="fcm")
    async with running(store) as dispatcher:
        with caplog.at_level(logging.INFO, logger="push.log_provider"):
            dispatcher.stored("erin", "pixel", urgent=False)
            await dispatcher.wait_idle()
        assert dispatcher.counters[("log", "sent_background")] == 1
        text = caplog.text
        assert "background" in text and token not in text and token[:10] not in text


async def test_a_storm_is_bounded_by_the_queue_and_counted(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    apns.answers.append("hang")  # the only worker is stuck
    for i in range(100):
        store.register(f"u{i}", "phone", "ab" * 32)
    async with running(store, apns, workers=1, queue_size=10, request_timeout=5.0) as dispatcher:
        for i in range(100):
            dispatcher.stored(f"u{i}", "phone", urgent=True)
        assert dispatcher.metrics()["queued"] <= 10 + 1  # the queue plus a waiting worker
        assert dispatcher.dropped >= 89
        await dispatcher.wait_idle()
        assert len({a.notification.token.token for a in apns.attempts}) == 1
        assert dispatcher.counters[("apns", "sent_alert")] <= 11


async def test_wake_ups_for_a_queued_device_merge_and_an_alert_wins(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    store.register("carol", "phone", "cd" * 32)
    apns.answers.append("hang")
    async with running(store, apns, workers=1, request_timeout=5.0) as dispatcher:
        dispatcher.stored("carol", "phone", urgent=True)  # occupies the worker
        await apns.wait_attempts(1)
        dispatcher.stored("bob", "phone", urgent=False)
        dispatcher.policy.connected("bob", "phone")  # reset its cooldowns only
        dispatcher.policy.disconnected("bob", "phone")
        dispatcher.stored("bob", "phone", urgent=True)
        assert dispatcher.coalesced == 1
        await dispatcher.wait_idle()
        bob = [a for a in apns.attempts if a.notification.token.token == "ab" * 32]
        assert [a.notification.kind for a in bob] == [ALERT]


async def test_a_read_elsewhere_sends_one_clear_to_an_alerted_device(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, apns) as dispatcher:
        dispatcher.read_elsewhere("bob", "phone")  # no alert yet: nothing to clear
        dispatcher.stored("bob", "phone", urgent=True)
        await dispatcher.wait_idle()
        dispatcher.read_elsewhere("bob", "phone")
        dispatcher.read_elsewhere("bob", "phone")  # within the clear cooldown
        await dispatcher.wait_idle()

        assert kinds(apns) == [ALERT, WakeKind.CLEAR]
        assert dispatcher.metrics()["clears"] == 1
        assert dispatcher.counters[("apns", "sent_clear")] == 1


async def test_a_clear_merged_into_a_queued_background_wake_up_wins(
    store: MemoryStore, apns: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    store.register("carol", "phone", "cd" * 32)
    apns.answers.append("hang")
    async with running(store, apns, workers=1, request_timeout=60.0, alert_retries=0) as d:
        d.stored("carol", "phone", urgent=True)  # occupies the worker
        await apns.wait_attempts(1)
        assert d.policy.stored("bob", "phone", urgent=True) is not None  # alerted, not queued
        await trio.sleep(d.settings.urgent_cooldown)  # past the alert's cover
        d.stored("bob", "phone", urgent=False)  # a background wake-up waits in the queue
        d.read_elsewhere("bob", "phone")
        assert d.coalesced == 1
        await d.wait_idle()
        bob = [a for a in apns.attempts if a.notification.token.token == "ab" * 32]
        assert [a.notification.kind for a in bob] == [WakeKind.CLEAR]


def test_backoff_grows_exponentially_within_jitter_bounds() -> None:
    dispatcher = PushDispatcher(push_settings(retry_base=1.0, max_retry_delay=60.0))
    for attempt in range(1, 10):
        ceiling = min(60.0, 2.0 ** (attempt - 1))
        for _ in range(50):
            delay = dispatcher.backoff(attempt, None)
            assert delay is not None and ceiling / 2 <= delay <= ceiling
    assert dispatcher.backoff(1, 12.0) == 12.0
    assert dispatcher.backoff(1, 61.0) is None


StoreFactory = Callable[[], MemoryStore]

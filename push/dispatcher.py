"""The push dispatcher: the Trio service that turns wake-up decisions into provider requests.

```
PushDispatcher.run
└─ nursery
   ├─ one task per provider (its asyncio island, for APNs and FCM)
   ├─ timer: sleeps until the policy's next deadline, then queues what came due
   └─ `workers` workers: take a job, look up the token, send, retry, clean up
```

The gateway calls `stored`, `read_elsewhere`, `connected` and `disconnected` synchronously
from the store's doorbell (it is the gateway's `Waker`; in a cluster also
`connected_elsewhere` and `alerted_elsewhere`, from the cluster link); those calls only
consult the policy and put a job on a bounded queue, never wait.

Resource handling: at most `queue_size` jobs wait and `workers` requests are in flight, so
a push storm costs bounded memory and sockets. A job for a device that already has one
queued is merged into it (an alert wins over a clear, a clear over a background wake-up);
when the queue is full the wake-up is dropped and counted in `dropped` (the items stay in
the store and the device gets them on its next connection).

Error handling: a failed request is retried on 429, 5xx, timeouts and lost connections with
exponential backoff and jitter, never sooner than `Retry-After`, at most `max_attempts`
times. An invalid token is cleared unless it was registered again after the push was sent.
Credential failures are logged at error level (at most once a minute per provider) and
counted. A store call that fails with `StoreFailure` skips that wake-up with a warning and is
counted (the items stay queued). No outcome of a push, and no bug in one job, ends the service.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from push.answers import WakeAnswers
from push.errors import StoreFailure
from push.log_provider import LogProvider
from push.notification import Notification, Outcome, Provider, PushResult, token_hash
from push.policy import Decision, WakeKind, WakePolicy, WakeRules, WakeUp
from push.settings import PushSettings
from push.store import ItemKind, PushStore, PushToken

log = logging.getLogger(__name__)

# How many queued items a linger check reads to decide between an alert and a background
# wake-up: enough to find an urgent message among a few receipts, cheap for big backlogs.
LINGER_PEEK = 64
CREDENTIAL_LOG_INTERVAL = 60.0
DROP_LOG_INTERVAL = 10.0
TIMEOUT = PushResult(Outcome.RETRY, None, "timeout")
# Tokens read from the store are kept briefly. A device can only register a new token over
# its own connection, so `connected` drops its entry (and a read that raced with any
# connect is not kept); the time limit covers changes made through the backend API.
TOKEN_CACHE_SECONDS = 60.0
TOKEN_CACHE_SIZE = 100_000


# Which wake-up a queued job becomes when another is merged into it: an alert wakes the
# device anyway, and a clear is a background wake-up that also says "notifications read".
_MERGE_RANK: dict[WakeKind | None, int] = {
    None: 0,  # a linger check
    WakeKind.BACKGROUND: 1,
    WakeKind.CLEAR: 2,
    WakeKind.ALERT: 3,
}


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Job:
    user: str
    device: str
    kind: WakeKind | None  # None: a linger check
    reason: str


class PushDispatcher:
    """Wake-up policy, bounded queue, workers and providers; the gateway's waker.

    Args:
        settings: The `[push]` settings.
        providers: Provider per token provider name (``"apns"``, ``"fcm"``, ``"webpush"``).
            Tokens of any other provider go to the `log` provider.
        clock: The policy's clock (default `trio.current_time`).
        wall_ms: Wall-clock milliseconds, comparable with push token registration times.
        rng: Randomness for the backoff jitter.
        run_providers: Whether `run` starts the providers (False when the caller runs
            them itself, for example to share warm connections between dispatchers).
    """

    def __init__(
        self,
        settings: PushSettings,
        providers: Mapping[str, Provider] | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_ms: Callable[[], int] = _wall_ms,
        rng: random.Random | None = None,
        run_providers: bool = True,
    ) -> None:
        self.settings = settings
        self.fallback = LogProvider()
        self.providers: dict[str, Provider] = dict(providers or {})
        rules = WakeRules(
            urgent_cooldown=settings.urgent_cooldown,
            background_cooldown=settings.background_cooldown,
            linger=settings.linger,
            alert_retry=settings.alert_retry,
            alert_retries=settings.alert_retries,
            background_per_hour=settings.background_per_hour,
            clear_cooldown=settings.clear_cooldown,
        )
        self.policy = WakePolicy(rules, clock)
        self.counters: Counter[tuple[str, str]] = Counter()
        # Final answers by (provider, outcome, the provider's reason), e.g. APNs's
        # ("apns", "invalid_token", "Unregistered"): a bounded set of names.
        self.responses: Counter[tuple[str, str, str]] = Counter()
        self.dropped = 0
        self.coalesced = 0
        self.alert_retries = 0  # alerts sent again because the device did not connect
        self.zombie_rescues = 0  # alerts to connected devices that stopped answering
        self.clears = 0  # clear wake-ups: their user read on another device
        self.answers = WakeAnswers(clock)
        self._wall_ms = wall_ms
        self._rng = rng or random.Random()
        self._send, self._receive = trio.open_memory_channel[_Job](settings.queue_size)
        self._queued: dict[tuple[str, str], _Job] = {}
        self._sending: Counter[tuple[str, str]] = Counter()  # devices with a job in a worker
        self._store: PushStore | None = None
        self._timer_wake = trio.Event()
        self._sleeping_until = math.inf
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._last_drop_log = -math.inf
        self._last_credential_log: dict[str, float] = {}
        self._scope: trio.CancelScope | None = None
        self._run_providers = run_providers
        self._tokens: dict[tuple[str, str], tuple[float, PushToken | None]] = {}
        self._token_epoch = 0
        #: Told of every alert a provider accepted (in a cluster: announce it to the
        #: other nodes, see `alerted_elsewhere`).
        self.on_alert_sent: Callable[[str, str], None] | None = None

    # -- the wake calls (made synchronously from the store's doorbell) ----------------------

    def stored(self, user: str, device: str, urgent: bool) -> None:
        """An item was committed for a device that is connected nowhere."""
        decision = self.policy.stored(user, device, urgent)
        if decision is not None:
            self._enqueue(decision)
        self._poke_timer()  # a held-back wake-up, or the retry of one sent, is due later

    def read_elsewhere(self, user: str, device: str) -> None:
        """The user read on another device, and the read receipt was stored for this one,
        connected nowhere: a clear wake-up if the policy allows one (see
        `WakePolicy.cleared`)."""
        decision = self.policy.cleared(user, device)
        if decision is not None:
            self.clears += 1
            self._enqueue(decision)
        self._poke_timer()  # the clear's cooldown, or its budget, ends later

    def connected(self, user: str, device: str) -> None:
        """A device authenticated: whatever was pending for it is cancelled."""
        self.policy.connected(user, device)
        self._cancel(user, device)

    def connected_elsewhere(self, user: str, device: str) -> None:
        """The device authenticated on another node: whatever was pending for it here is
        cancelled (it is not connected here)."""
        self.policy.connected_elsewhere(user, device)
        self._cancel(user, device)

    def alerted_elsewhere(self, user: str, device: str) -> None:
        """Another node sent the device an alert: a read elsewhere clears it from here."""
        self.policy.alerted_elsewhere(user, device)

    def _cancel(self, user: str, device: str) -> None:
        self.answers.connected(user, device)
        self._forget_token(user, device)  # a device changes its token only while connected
        job = self._queued.pop((user, device), None)
        if job is not None:
            job.kind, job.reason = None, "cancelled"  # still in the channel; the worker skips it

    def disconnected(self, user: str, device: str) -> None:
        """A device's connection ended: its linger timer starts."""
        self.policy.disconnected(user, device)
        self._poke_timer()

    def rescue(self, user: str, device: str) -> None:
        """A connected device did not answer an urgent message in time: wake it with an
        alert as though it were offline (the urgent cooldown applies)."""
        decision = self.policy.zombie(user, device)
        if decision is not None:
            self.zombie_rescues += 1
            self._enqueue(decision)
        self._poke_timer()

    # -- the service ------------------------------------------------------------------------

    async def run(
        self, store: PushStore, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the providers, the timer and the workers; serve until `close` or cancel.

        Args:
            store: Where tokens and queue counts are read and invalid tokens cleared.
            task_status: Reports once every provider has started.
        """
        self._store = store
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                unique = {id(p): p for p in (*self.providers.values(), self.fallback)}
                for provider in unique.values() if self._run_providers else [self.fallback]:
                    await nursery.start(provider.run)
                nursery.start_soon(self._timer)
                for _ in range(self.settings.workers):
                    nursery.start_soon(self._worker)
                names = ", ".join(sorted(self.providers)) or "none (log only)"
                log.info("push dispatcher started: providers %s", names)
                task_status.started()
        if self._queued:
            log.info("push dispatcher stopped with %d wake-ups unsent", len(self._queued))

    def close(self) -> None:
        """Stop the service: queued wake-ups are abandoned (their items stay stored)."""
        if self._scope is not None:
            self._scope.cancel()

    async def wait_idle(self) -> None:
        """Wait until no wake-up is queued or in flight (timers may still be running)."""
        await self._idle.wait()

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges for `/metrics`: per (provider, outcome), queue and policy."""
        return {
            "outcomes": {f"{p}:{o}": n for (p, o), n in sorted(self.counters.items())},
            "queued": len(self._queued),
            "queue_capacity": self.settings.queue_size,
            "in_flight": self._in_flight,
            "dropped": self.dropped,
            "coalesced": self.coalesced,
            "alert_retries": self.alert_retries,
            "zombie_rescues": self.zombie_rescues,
            "clears": self.clears,
            "unanswered": {
                f"{p}:{k}": n for (p, k), n in sorted(self.answers.unanswered().items())
            },
            "tracked_devices": len(self.policy),
        }

    # -- queueing ---------------------------------------------------------------------------

    def _enqueue(self, decision: Decision) -> None:
        key = (decision.user, decision.device)
        kind = decision.kind if isinstance(decision, WakeUp) else None
        reason = decision.reason if isinstance(decision, WakeUp) else "linger"
        if reason == "retry" and self._sending[key]:
            return  # the alert is still being sent (a provider's 429 or 5xx backoff)
        job = self._queued.get(key)
        if job is not None:
            self.coalesced += 1
            if kind is WakeKind.ALERT or _MERGE_RANK[kind] > _MERGE_RANK[job.kind]:
                job.kind, job.reason = kind, reason
            return
        job = _Job(decision.user, decision.device, kind, reason)
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            self.dropped += 1
            now = trio.current_time()
            if now - self._last_drop_log >= DROP_LOG_INTERVAL:
                self._last_drop_log = now
                log.warning(
                    "push queue full (%d): dropping wake-ups (%d dropped so far)",
                    self.settings.queue_size,
                    self.dropped,
                )
            return
        self._queued[key] = job
        self._busy()

    def _busy(self) -> None:
        if self._idle.is_set():
            self._idle = trio.Event()

    def _check_idle(self) -> None:
        if not self._queued and self._in_flight == 0:
            self._idle.set()

    def _poke_timer(self) -> None:
        deadline = self.policy.next_deadline()
        if deadline is not None and deadline < self._sleeping_until:
            self._timer_wake.set()

    async def _timer(self) -> None:
        while True:
            deadline = self.policy.next_deadline()
            self._sleeping_until = math.inf if deadline is None else deadline
            self._timer_wake = trio.Event()
            with trio.move_on_at(self._sleeping_until):
                await self._timer_wake.wait()
            for decision in self.policy.due():
                self._enqueue(decision)

    # -- workers ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        async for job in self._receive:
            key = (job.user, job.device)
            if self._queued.get(key) is job:
                del self._queued[key]
            self._in_flight += 1
            self._sending[key] += 1
            try:
                await self._handle(job)
            except StoreFailure as exc:
                self.counters[("store", "error")] += 1
                log.warning("push for %s/%s skipped: %s", job.user, job.device, exc)
            except Exception:
                self.counters[("internal", "error")] += 1
                log.exception("push for %s/%s failed", job.user, job.device)
            finally:
                self._in_flight -= 1
                self._sending[key] -= 1
                if not self._sending[key]:
                    del self._sending[key]
                self._check_idle()

    async def _handle(self, job: _Job) -> None:
        store = self._store
        assert store is not None
        kind = job.kind
        if job.reason == "cancelled":
            return
        if kind is None:
            kind = await self._resolve_linger(store, job)
            if kind is None:
                return
        if job.reason != "zombie" and self.policy.is_online(job.user, job.device):
            self.counters[("none", "cancelled")] += 1
            return
        if job.reason == "retry":
            if not await self._retry_wanted(store, job):
                return
            self.alert_retries += 1
        token = await self._token(store, job.user, job.device)
        if token is None:
            self.counters[("none", "no_token")] += 1
            return
        provider = self.providers.get(token.provider, self.fallback)
        notification = Notification(
            token, kind, self.settings.ttl, self.settings.collapse_id, self.settings.alert_loc_key
        )
        sent_at = self._wall_ms()
        result = await self._attempts(provider, notification, job)
        if result is None:
            return
        await self._conclude(store, provider.name, job, notification, result, sent_at)

    async def _token(self, store: PushStore, user: str, device: str) -> PushToken | None:
        """The device's token, from the cache when fresh (see `TOKEN_CACHE_SECONDS`)."""
        key = (user, device)
        now = trio.current_time()
        cached = self._tokens.get(key)
        if cached is not None and now - cached[0] < TOKEN_CACHE_SECONDS:
            return cached[1]
        epoch = self._token_epoch
        token = await store.push_token(user, device)
        if epoch == self._token_epoch:  # no connect happened while reading: safe to keep
            if len(self._tokens) >= TOKEN_CACHE_SIZE:
                self._tokens.clear()
            self._tokens[key] = (now, token)
        return token

    def _forget_token(self, user: str, device: str) -> None:
        self._tokens.pop((user, device), None)
        self._token_epoch += 1

    async def _resolve_linger(self, store: PushStore, job: _Job) -> WakeKind | None:
        now = self._wall_ms()
        unacked = await store.count(job.user, job.device, now)
        urgent = False
        if unacked:
            items = await store.fetch(job.user, job.device, 0, LINGER_PEEK, now)
            urgent = any(i.urgent and i.kind is ItemKind.MESSAGE for i in items)
        wake = self.policy.linger_checked(job.user, job.device, unacked, urgent)
        self._poke_timer()  # an alert's retry, or a wake-up the budget holds back
        if wake is None:
            self.counters[("none", "linger_skipped")] += 1
            return None
        return wake.kind

    async def _retry_wanted(self, store: PushStore, job: _Job) -> bool:
        """Whether an alert retry still has something to alert about: an urgent message
        among the device's first queued items that no read of its own user (made on
        another device, on any node) covers. If not, the policy sends no further retries."""
        items = await store.fetch(job.user, job.device, 0, LINGER_PEEK, self._wall_ms())
        read = {
            msg_id
            for item in items
            if item.kind is ItemKind.READ and item.sender == job.user
            for msg_id in item.ids
        }
        if any(i.urgent and i.kind is ItemKind.MESSAGE and i.msg_id not in read for i in items):
            return True
        self.policy.retry_skipped(job.user, job.device)
        self.counters[("none", "retry_skipped")] += 1
        return False

    async def _attempts(
        self, provider: Provider, notification: Notification, job: _Job
    ) -> PushResult | None:
        """Send with retries; None if the device connected while waiting to retry."""
        settings = self.settings
        result = TIMEOUT
        for attempt in range(1, settings.max_attempts + 1):
            result = TIMEOUT
            with trio.move_on_after(settings.request_timeout):
                result = await provider.send(notification)
            if result.outcome is not Outcome.RETRY or attempt == settings.max_attempts:
                break
            self.counters[(provider.name, "retried")] += 1
            delay = self.backoff(attempt, result.retry_after)
            if delay is None:
                break
            await trio.sleep(delay)
            if self.policy.is_online(job.user, job.device):
                self.counters[(provider.name, "cancelled")] += 1
                return None
        return result

    def backoff(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds before attempt `attempt + 1`: exponential with equal jitter, at least
        `retry_after`; None if that would exceed `max_retry_delay`."""
        settings = self.settings
        ceiling = min(settings.max_retry_delay, settings.retry_base * 2 ** (attempt - 1))
        delay: float = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            if retry_after > settings.max_retry_delay:
                return None
            delay = max(delay, retry_after)
        return delay

    async def _conclude(
        self,
        store: PushStore,
        name: str,
        job: _Job,
        notification: Notification,
        result: PushResult,
        sent_at: int,
    ) -> None:
        outcome = result.outcome
        token = notification.token
        self.responses[(name, outcome.value, result.reason or "-")] += 1
        if outcome is Outcome.SENT:
            self.counters[(name, f"sent_{notification.kind.value}")] += 1
            self.answers.sent(job.user, job.device, name, notification.kind.value)
            if notification.kind is WakeKind.ALERT and self.on_alert_sent is not None:
                self.on_alert_sent(job.user, job.device)
        elif outcome is Outcome.INVALID_TOKEN:
            self._forget_token(job.user, job.device)
            cleared = await store.clear_push_token(job.user, job.device, token.token, sent_at)
            self.counters[(name, "token_cleared" if cleared else "token_kept")] += 1
            log.info(
                "%s token~%s of %s/%s is invalid (%s): %s",
                name,
                token_hash(token.token),
                job.user,
                job.device,
                result.reason,
                "cleared" if cleared else "kept, it was registered again since",
            )
        elif outcome is Outcome.CREDENTIALS:
            self.counters[(name, "credentials")] += 1
            now = trio.current_time()
            if now - self._last_credential_log.get(name, -math.inf) >= CREDENTIAL_LOG_INTERVAL:
                self._last_credential_log[name] = now
                log.error(
                    "%s refused our credentials (%s %s); wake-ups through %s are failing "
                    "(%d so far) - check the [push.%s] keys",
                    name,
                    result.status or "-",
                    result.reason,
                    name,
                    self.counters[(name, "credentials")],
                    name,
                )
        elif outcome is Outcome.REJECTED:
            self.counters[(name, "rejected")] += 1
            log.warning("%s rejected a wake-up: %s %s", name, result.status or "-", result.reason)
        else:
            self.counters[(name, "failed")] += 1
            log.warning(
                "%s wake-up for %s/%s given up after retries: %s %s",
                name,
                job.user,
                job.device,
                result.status or "-",
                result.reason,
            )

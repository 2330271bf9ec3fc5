"""Phones, users and a gateway on one virtual clock: one discrete-event simulation.

The gateway side is reduced to what decides wake-ups: which devices are connected, the
items queued for those that are not, the policy under test, and (for policies that
have it) the watch for silent sockets. The phone side follows the knobs in `Knobs`,
each a documented model of platform behaviour. Every random draw comes from one seeded
generator, so a run is reproducible.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from push.policy import LingerCheck, WakeKind, WakeUp
from scripts.wakelab.policies import make_policy, rescues_zombies

# Event codes (the policy's own timers are a queue of their own).
OPEN, BACKGROUND, CLOSE, MESSAGE, PUSH, ACK_CHECK, ZOMBIE_END = range(7)
URGENT, NORMAL, RECEIPT = 0, 1, 2
KINDS = ("urgent", "normal", "receipt")


@dataclass(frozen=True)
class Knobs:
    """The models' parameters; defaults from public platform behaviour (see docs/push.md).

    Rates are per hour; times in seconds.
    """

    devices: int = 10_000
    hours: float = 24.0
    seed: int = 1
    ios_share: float = 0.5  # the rest is Android
    second_device_share: float = 0.3  # users with two devices (a phone and a tablet)
    urgent_per_hour: float = 1.0  # urgent messages to each user
    normal_per_hour: float = 1.0  # non-urgent messages to each user
    receipts_per_hour: float = 2.0  # receipts and read syncs to each user (never urgent)
    opens_per_hour: float = 2.0  # the user opens the app on each device (Poisson)
    session: float = 60.0  # mean time in the foreground
    ios_background_close: float = 10.0  # an app's socket closes this long after backgrounding
    android_background_close: float = 30.0
    zombie_share: float = 0.05  # backgroundings that leave the socket open and silent
    heartbeat: float = 30.0  # the gateway closes a silent socket after two of these
    wake_session: float = 10.0  # a woken app (or iOS's service extension) stays connected
    push_latency: float = 1.0
    alert_loss: float = 0.1
    background_loss: float = 0.1
    ios_background_per_hour: int = 3  # Apple delivers this many, and drops the rest
    android_doze_after: float = 1800.0  # idle this long, normal priority waits for a window
    android_doze_window: float = 900.0  # maintenance windows this far apart
    ack_timeout: float = 15.0  # zombie rescue, for policies that have it


@dataclass
class Device:
    """One phone or tablet, and the gateway's view of it."""

    user: str
    name: str
    ios: bool
    connected: bool = False  # the gateway holds a connection for it
    zombie: bool = False  # ...whose app is suspended and silent
    session: int = 0  # bumped by every connect, so stale closes are ignored
    last_open: float = 0.0
    urgent_since: float | None = None  # an urgent item sent to a silent socket
    pending: list[tuple[float, int]] = field(default_factory=list)  # (arrival, class)
    throttle: deque[float] = field(default_factory=deque)  # iOS background pushes delivered
    sent_background: deque[float] = field(default_factory=deque)  # the last hour's, sent
    last_alert: float = -math.inf


@dataclass
class Tally:
    """What a run measured."""

    latencies: tuple[list[float], list[float], list[float]] = field(
        default_factory=lambda: ([], [], [])
    )
    undelivered: list[int] = field(default_factory=lambda: [0, 0, 0])  # at the end
    pushes: dict[str, int] = field(default_factory=dict)  # by "kind:reason"
    lost: int = 0
    throttled: int = 0
    deferred: int = 0
    max_background_per_hour: int = 0
    repeated_alerts: int = 0  # delivered within 60 s of another, collapsed into one


class World:
    """One policy, one population, one virtual day (or more)."""

    def __init__(self, knobs: Knobs, policy: str) -> None:
        self.knobs = knobs
        self.now = 0.0
        self.rng = random.Random(knobs.seed)
        self.policy = make_policy(policy, lambda: self.now)
        self.rescue = rescues_zombies(policy)
        self.tally = Tally()
        self.devices: list[Device] = []
        self.users: list[list[int]] = []
        self.by_key: dict[tuple[str, str], int] = {}
        self._events: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._populate()

    # -- set-up -----------------------------------------------------------------------------

    def _populate(self) -> None:
        k, rng = self.knobs, self.rng
        while len(self.devices) < k.devices:
            user = f"u{len(self.users)}"
            count = 2 if rng.random() < k.second_device_share else 1
            members = []
            for n in range(min(count, k.devices - len(self.devices))):
                index = len(self.devices)
                self.devices.append(Device(user, f"d{n}", rng.random() < k.ios_share))
                self.by_key[(user, f"d{n}")] = index
                members.append(index)
                self._at(rng.expovariate(k.opens_per_hour / 3600), OPEN, index)
            self.users.append(members)
            rate = (k.urgent_per_hour + k.normal_per_hour + k.receipts_per_hour) / 3600
            self._at(rng.expovariate(rate), MESSAGE, len(self.users) - 1)

    def _at(self, when: float, code: int, index: int, token: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, code, index, token))

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Tally:
        """Simulate `hours`, then count what is still undelivered."""
        end = self.knobs.hours * 3600
        events = self._events
        handlers = (
            self._open, self._background, self._close, self._message, self._push,
            self._ack_check, self._zombie_end,
        )  # fmt: skip
        next_deadline, heappop = self.policy.next_deadline, heapq.heappop
        # The policy's timers are a queue of their own: whichever is due first runs (the
        # world's events first at the same time).
        while True:
            deadline = next_deadline()
            if events and events[0][0] <= end and (deadline is None or events[0][0] <= deadline):
                when, _, code, index, token = heappop(events)
                self.now = when
                handlers[code](index, token)
            elif deadline is not None and deadline <= end:
                self.now = deadline
                self._policy_due()
            else:
                break
        for device in self.devices:
            for _, cls in device.pending:
                self.tally.undelivered[cls] += 1
        return self.tally

    # -- the phones -------------------------------------------------------------------------

    def _open(self, index: int, _: int) -> None:
        device = self.devices[index]
        device.last_open = self.now
        self._connect(index)
        k = self.knobs
        self._at(self.now + self.rng.expovariate(1 / k.session), BACKGROUND, index, device.session)
        self._at(self.now + self.rng.expovariate(k.opens_per_hour / 3600), OPEN, index)

    def _background(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session != device.session or not device.connected:
            return
        k = self.knobs
        if self.rng.random() < k.zombie_share:
            device.zombie = True  # suspended, socket open: the gateway notices only later
            self._at(self.now + 2 * k.heartbeat, ZOMBIE_END, index, device.session)
            return
        close = k.ios_background_close if device.ios else k.android_background_close
        self._at(self.now + close, CLOSE, index, device.session)

    def _close(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session == device.session and device.connected and not device.zombie:
            self._disconnect(index)

    def _zombie_end(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session == device.session and device.zombie:
            self._disconnect(index)  # the heartbeat closed the silent socket

    def _connect(self, index: int) -> None:
        device = self.devices[index]
        if device.connected and not device.zombie:
            return
        device.session += 1
        device.connected, device.zombie, device.urgent_since = True, False, None
        self.policy.connected(device.user, device.name)
        latencies = self.tally.latencies
        for arrival, cls in device.pending:
            latencies[cls].append(self.now - arrival)
        device.pending.clear()

    def _disconnect(self, index: int) -> None:
        device = self.devices[index]
        device.connected = device.zombie = False
        device.urgent_since = None
        self.policy.disconnected(device.user, device.name)

    # -- traffic ----------------------------------------------------------------------------

    def _message(self, user: int, _: int) -> None:
        k, rng = self.knobs, self.rng
        total = k.urgent_per_hour + k.normal_per_hour + k.receipts_per_hour
        draw = rng.random() * total
        cls = URGENT if draw < k.urgent_per_hour else NORMAL
        if draw >= k.urgent_per_hour + k.normal_per_hour:
            cls = RECEIPT
        for index in self.users[user]:
            self._arrive(index, cls)
        self._at(self.now + rng.expovariate(total / 3600), MESSAGE, user)

    def _arrive(self, index: int, cls: int) -> None:
        device = self.devices[index]
        if device.connected and not device.zombie:
            self.tally.latencies[cls].append(0.0)
            return
        device.pending.append((self.now, cls))
        if device.zombie:  # the gateway sends it into the silent socket
            if cls == URGENT and self.rescue and device.urgent_since is None:
                device.urgent_since = self.now
                self._at(self.now + self.knobs.ack_timeout, ACK_CHECK, index, device.session)
            return
        self._decide(self.policy.stored(device.user, device.name, cls == URGENT))

    def _ack_check(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session == device.session and device.zombie and device.urgent_since is not None:
            self._decide(self.policy.zombie(device.user, device.name))

    # -- the policy and the pushes ----------------------------------------------------------

    def _policy_due(self) -> None:
        for decision in self.policy.due():
            if isinstance(decision, LingerCheck):
                index = self.by_key[(decision.user, decision.device)]
                pending = self.devices[index].pending
                urgent = any(cls == URGENT for _, cls in pending)
                self._decide(
                    self.policy.linger_checked(decision.user, decision.device, len(pending), urgent)
                )
            elif decision.reason == "retry":
                # As the dispatcher does: a retry only while an urgent message is unacked.
                pending = self.devices[self.by_key[(decision.user, decision.device)]].pending
                if any(cls == URGENT for _, cls in pending):
                    self._decide(decision)
                else:
                    self.policy.retry_skipped(decision.user, decision.device)
            else:
                self._decide(decision)

    def _decide(self, wake: WakeUp | None) -> None:
        if wake is None:
            return
        tally, k, rng = self.tally, self.knobs, self.rng
        key = f"{wake.kind.value}:{wake.reason}"
        tally.pushes[key] = tally.pushes.get(key, 0) + 1
        index = self.by_key[(wake.user, wake.device)]
        device = self.devices[index]
        alert = wake.kind is WakeKind.ALERT
        if not alert:
            sent = device.sent_background
            sent.append(self.now)
            while sent[0] + 3600 <= self.now:
                sent.popleft()
            tally.max_background_per_hour = max(tally.max_background_per_hour, len(sent))
        if rng.random() < (k.alert_loss if alert else k.background_loss):
            tally.lost += 1
            return
        delay = k.push_latency
        if not alert and device.ios:
            throttle = device.throttle
            while throttle and throttle[0] + 3600 <= self.now:
                throttle.popleft()
            if len(throttle) >= k.ios_background_per_hour:
                tally.throttled += 1
                return
            throttle.append(self.now)
        if not alert and not device.ios and self.now - device.last_open > k.android_doze_after:
            tally.deferred += 1
            delay += rng.uniform(0, k.android_doze_window)
        self._at(self.now + delay, PUSH, index, 1 if alert else 0)

    def _push(self, index: int, alert: int) -> None:
        device = self.devices[index]
        if alert:
            if self.now - device.last_alert < 60:
                self.tally.repeated_alerts += 1
            device.last_alert = self.now
        if device.connected and not device.zombie:
            return
        self._connect(index)  # the app (or the service extension) wakes and connects
        self._at(self.now + self.knobs.wake_session, CLOSE, index, device.session)

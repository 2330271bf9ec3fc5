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
from math import log

from push.policy import LingerCheck, WakeKind, WakeUp
from scripts.wakelab.policies import make_policy, rescues_zombies

# Event codes (the policy's own timers are a queue of their own).
OPEN, BACKGROUND, CLOSE, MESSAGE, PUSH, ACK_CHECK, ZOMBIE_END = range(7)
URGENT, NORMAL, RECEIPT = 0, 1, 2
KINDS = ("urgent", "normal", "receipt")
SLOT = 16.0  # seconds of simulated time per slot of the event calendar
ALERT = WakeKind.ALERT
Event = tuple[float, int, int, int, int]  # (when, sequence, code, index, token)


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


@dataclass(slots=True)
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
    urgent_pending: int = 0  # how many of them are urgent
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
        # The world's events, a calendar queue: `_near` is a heap of every event in the
        # slots up to `_slot`, and `_far[n]` an unsorted list of those in slot n (the
        # events in [n * SLOT, (n + 1) * SLOT)), heapified when the run reaches it. A small
        # heap is much cheaper to pop than one of the whole day's pending events.
        self._near: list[Event] = []
        self._far: list[list[Event]] = [[] for _ in range(int(knobs.hours * 3600 // SLOT) + 1)]
        self._slot = -1
        self._seq = 0
        self._asked = False  # the policy was called since its next deadline was read
        self._pushes: dict[tuple[str, str], int] = {}  # by (kind, reason)
        # Draws: every one takes one `random()`; an exponential is -log(1 - u) / rate, as
        # `random.expovariate` computes it.
        self._random = self.rng.random
        self._message_total = (
            knobs.urgent_per_hour + knobs.normal_per_hour + knobs.receipts_per_hour
        )
        self._message_rate = self._message_total / 3600
        self._open_rate = knobs.opens_per_hour / 3600
        self._background_rate = 1 / knobs.session
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
                self._at(rng.expovariate(self._open_rate), OPEN, index)
            self.users.append(members)
            self._at(rng.expovariate(self._message_rate), MESSAGE, len(self.users) - 1)

    def _at(self, when: float, code: int, index: int, token: int = 0) -> None:
        self._seq += 1
        slot = int(when // SLOT)
        if slot <= self._slot:
            heapq.heappush(self._near, (when, self._seq, code, index, token))
        elif slot < len(self._far):
            self._far[slot].append((when, self._seq, code, index, token))
        # Later slots are past the end of the run: those events would never happen.

    def _next_event(self) -> Event | None:
        """The earliest event (the first queued at that time), left queued; None if none."""
        if not self._near:
            far = self._far
            while self._slot + 1 < len(far):
                self._slot += 1
                bucket, far[self._slot] = far[self._slot], []
                if bucket:
                    heapq.heapify(bucket)
                    self._near = bucket
                    break
            else:
                return None
        return self._near[0]

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Tally:
        """Simulate `hours`, then count what is still undelivered."""
        end = self.knobs.hours * 3600
        handlers = (
            self._open, self._background, self._close, self._message, self._push,
            self._ack_check, self._zombie_end,
        )  # fmt: skip
        next_deadline, next_event, heappop = (
            self.policy.next_deadline,
            self._next_event,
            heapq.heappop,
        )
        deadline = next_deadline()
        # The policy's timers are a queue of their own: whichever is due first runs (the
        # world's events first at the same time). Its next deadline changes only when the
        # policy is called (`_asked` says so).
        while True:
            if self._asked:
                self._asked = False
                deadline = next_deadline()
            near = self._near
            event = near[0] if near else next_event()
            if event is not None and event[0] <= end and (deadline is None or event[0] <= deadline):
                when, _, code, index, token = heappop(self._near)
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
        self.tally.pushes = {f"{kind}:{reason}": n for (kind, reason), n in self._pushes.items()}
        return self.tally

    # -- the phones -------------------------------------------------------------------------

    def _open(self, index: int, _: int) -> None:
        device = self.devices[index]
        now = device.last_open = self.now
        self._connect(index, device)
        random = self._random
        self._at(
            now - log(1.0 - random()) / self._background_rate, BACKGROUND, index, device.session
        )
        self._at(now - log(1.0 - random()) / self._open_rate, OPEN, index)

    def _background(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session != device.session or not device.connected:
            return
        k = self.knobs
        if self._random() < k.zombie_share:
            device.zombie = True  # suspended, socket open: the gateway notices only later
            self._at(self.now + 2 * k.heartbeat, ZOMBIE_END, index, session)
            return
        close = k.ios_background_close if device.ios else k.android_background_close
        self._at(self.now + close, CLOSE, index, session)

    def _close(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session == device.session and device.connected and not device.zombie:
            self._disconnect(device)

    def _zombie_end(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session == device.session and device.zombie:
            self._disconnect(device)  # the heartbeat closed the silent socket

    def _connect(self, index: int, device: Device) -> None:
        if device.connected and not device.zombie:
            return
        device.session += 1
        device.connected, device.zombie, device.urgent_since = True, False, None
        self._asked = True
        self.policy.connected(device.user, device.name)
        pending = device.pending
        if pending:
            latencies, now = self.tally.latencies, self.now
            for arrival, cls in pending:
                latencies[cls].append(now - arrival)
            pending.clear()
            device.urgent_pending = 0

    def _disconnect(self, device: Device) -> None:
        device.connected = device.zombie = False
        device.urgent_since = None
        self._asked = True
        self.policy.disconnected(device.user, device.name)

    # -- traffic ----------------------------------------------------------------------------

    def _message(self, user: int, _: int) -> None:
        k, random = self.knobs, self._random
        draw = random() * self._message_total
        cls = URGENT if draw < k.urgent_per_hour else NORMAL
        if draw >= k.urgent_per_hour + k.normal_per_hour:
            cls = RECEIPT
        for index in self.users[user]:
            self._arrive(index, cls)
        self._at(self.now - log(1.0 - random()) / self._message_rate, MESSAGE, user)

    def _arrive(self, index: int, cls: int) -> None:
        device = self.devices[index]
        if device.connected and not device.zombie:
            self.tally.latencies[cls].append(0.0)
            return
        device.pending.append((self.now, cls))
        if cls == URGENT:
            device.urgent_pending += 1
        if device.zombie:  # the gateway sends it into the silent socket
            if cls == URGENT and self.rescue and device.urgent_since is None:
                device.urgent_since = self.now
                self._at(self.now + self.knobs.ack_timeout, ACK_CHECK, index, device.session)
            return
        self._asked = True
        wake = self.policy.stored(device.user, device.name, cls == URGENT)
        if wake is not None:
            self._decide(wake)

    def _ack_check(self, index: int, session: int) -> None:
        device = self.devices[index]
        if session == device.session and device.zombie and device.urgent_since is not None:
            self._asked = True
            wake = self.policy.zombie(device.user, device.name)
            if wake is not None:
                self._decide(wake)

    # -- the policy and the pushes ----------------------------------------------------------

    def _policy_due(self) -> None:
        policy, by_key, devices = self.policy, self.by_key, self.devices
        self._asked = True
        for decision in policy.due():
            if isinstance(decision, LingerCheck):
                device = devices[by_key[(decision.user, decision.device)]]
                wake = policy.linger_checked(
                    decision.user, decision.device, len(device.pending), device.urgent_pending > 0
                )
                if wake is not None:
                    self._decide(wake)
            elif decision.reason == "retry":
                # As the dispatcher does: a retry only while an urgent message is unacked.
                if devices[by_key[(decision.user, decision.device)]].urgent_pending:
                    self._decide(decision)
                else:
                    policy.retry_skipped(decision.user, decision.device)
            else:
                self._decide(decision)

    def _decide(self, wake: WakeUp) -> None:
        tally, k, now = self.tally, self.knobs, self.now
        alert = wake.kind is ALERT
        kind = "alert" if alert else wake.kind.value
        pushes, key = self._pushes, (kind, wake.reason)
        pushes[key] = pushes.get(key, 0) + 1
        index = self.by_key[(wake.user, wake.device)]
        device = self.devices[index]
        if not alert:
            sent = device.sent_background
            sent.append(now)
            while sent[0] + 3600 <= now:
                sent.popleft()
            if len(sent) > tally.max_background_per_hour:
                tally.max_background_per_hour = len(sent)
        if self._random() < (k.alert_loss if alert else k.background_loss):
            tally.lost += 1
            return
        delay = k.push_latency
        if not alert:
            if device.ios:
                throttle = device.throttle
                while throttle and throttle[0] + 3600 <= now:
                    throttle.popleft()
                if len(throttle) >= k.ios_background_per_hour:
                    tally.throttled += 1
                    return
                throttle.append(now)
            elif now - device.last_open > k.android_doze_after:
                tally.deferred += 1
                delay += k.android_doze_window * self._random()  # uniform(0, window)
        self._at(now + delay, PUSH, index, 1 if alert else 0)

    def _push(self, index: int, alert: int) -> None:
        device = self.devices[index]
        if alert:
            if self.now - device.last_alert < 60:
                self.tally.repeated_alerts += 1
            device.last_alert = self.now
        if device.connected and not device.zombie:
            return
        self._connect(index, device)  # the app (or the service extension) wakes and connects
        self._at(self.now + self.knobs.wake_session, CLOSE, index, device.session)

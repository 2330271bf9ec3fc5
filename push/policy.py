"""The wake-up policy: which idle device gets which push, and when. Plain code, no I/O.

The rules (protocol v1, "Wake-up"):

- An urgent item stored for an offline device gets an **alert** wake-up at once. Further
  urgent items within `urgent_cooldown` are coalesced into one trailing alert at the end of
  the cooldown, so a device gets at most one alert per `urgent_cooldown` until it reconnects.
- Anything else (receipts, non-urgent messages) gets a **background** wake-up, at most one
  per `background_cooldown`; items within the cooldown are coalesced into one trailing
  background wake-up at its end. An alert sent within `urgent_cooldown` already covers them.
- A disconnect starts a `linger` timer. When it runs out and the device is still offline,
  the driver is asked to check the store (`LingerCheck`); if items are still unacked, the
  device gets one wake-up (`linger_checked`): an alert if one of them is an urgent message,
  a background wake-up otherwise. Any wake-up sent in between replaces it.
- A connected device that left an urgent message unacked and sent nothing for
  `ack_timeout` (a "zombie": its app suspended with the socket still open) is rescued: it
  gets an alert as though it were offline (reason ``zombie``), within the urgent cooldown.
- An alert not followed by a connection of the device within `alert_retry` is sent again
  (reason ``retry``), at most `alert_retries` times, each delay doubling. The driver sends
  a retry only while the device still has something to alert about (an urgent message
  neither acked nor read on another device); when it has not, it says so
  (`retry_skipped`) and no further retry follows.
- No device gets more than `background_per_hour` background wake-ups in any rolling hour,
  whatever connects and disconnects happen in between: one the budget holds back is owed
  (coalesced) until the oldest of the hour's wake-ups is an hour old.
- When the user reads on another device, a device that is offline and got an alert since
  its last connection gets a **clear** wake-up (`cleared`), so the app can remove the
  notifications of what was read: at most one per `clear_cooldown`, whatever connects
  happen in between, not held by the background cooldown, but counted against (and held
  back by) the background budget. A clear the budget holds back is not owed: the
  notification stays until the device next wakes. An alert older than `ALERT_MEMORY`
  (a day) without a connection since is no longer cleared.
- A connect forgets everything else about the device: pending wake-ups, retries, timers,
  cooldowns and whether it got an alert. In a cluster, so does a connect on another node
  (`connected_elsewhere`), and an alert sent by another node counts for clears as one sent
  here (`alerted_elsewhere`).
- Nothing happens at start-up: a device is only ever woken because of an event.

The policy holds state only for devices with a cooldown, a timer or a background budget
running, plus the set of connected device keys and the devices alerted since their last
connection (each kept until that device connects, or for `ALERT_MEMORY`), and drops a
device's state as soon as nothing is left to enforce. Time comes from an injected clock in
seconds (`trio.current_time` in the dispatcher, a plain float in unit tests).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

DeviceKey = tuple[str, str]
HOUR = 3600.0
# How long an alert is remembered for a clear when its device does not connect. Devices
# that never connect (no push token, an uninstalled app) are alerted too; without a limit
# their marks would pile up for the life of the process. A day matches the default
# `[push] ttl`, beyond which an undelivered alert has expired anyway.
ALERT_MEMORY = 24 * HOUR
# Stale timer entries tolerated beyond two per tracked device before the heap is rebuilt
# without them (so each rebuild is paid for by at least this many reschedules).
STALE_TIMER_SLACK = 256


class WakeKind(enum.Enum):
    """The kinds of wake-up push: a visible alert, a silent background wake-up, and a
    silent clear (a background wake-up telling the app that notifications were read)."""

    ALERT = "alert"
    BACKGROUND = "background"
    CLEAR = "clear"


@dataclass(frozen=True, slots=True)
class WakeUp:
    """Send one wake-up of `kind` to a device now. `reason` is for counters and logs."""

    user: str
    device: str
    kind: WakeKind
    reason: str


@dataclass(frozen=True, slots=True)
class LingerCheck:
    """The device's linger ran out while it was offline: ask the store what is unacked."""

    user: str
    device: str


Decision = WakeUp | LingerCheck


@dataclass(frozen=True, slots=True)
class WakeRules:
    """The policy's timing, in seconds, and limits (the `[push]` keys of the same names).

    `alert_retries` 0 sends no retries; `background_per_hour` 0 sets no budget.
    """

    urgent_cooldown: float = 10.0
    background_cooldown: float = 20 * 60.0
    linger: float = 60.0
    alert_retry: float = 20.0
    alert_retries: int = 2
    background_per_hour: int = 3
    clear_cooldown: float = 60.0


class _Device:
    """Per-device state while offline; every time is on the policy's clock."""

    __slots__ = (
        "alert_at",
        "alert_due",
        "background_at",
        "background_due",
        "budget",
        "checking",
        "clear_at",
        "linger_due",
        "retries_left",
        "retry_delay",
        "retry_due",
        "timer_at",
    )

    def __init__(self) -> None:
        self.alert_at: float | None = None  # when the last alert was sent
        self.background_at: float | None = None  # when the last background push was sent
        self.alert_due: float | None = None  # a coalesced alert is owed at this time
        self.background_due: float | None = None  # a coalesced background push is owed
        self.linger_due: float | None = None  # the linger check runs at this time
        self.retry_due: float | None = None  # the last alert is sent again at this time
        self.retry_delay = 0.0  # the wait before the next retry after that one
        self.retries_left = 0
        self.checking = False  # a LingerCheck was handed out and not answered yet
        self.timer_at: float | None = None  # the one live heap entry for this device
        # When each background wake-up of the last hour was sent; survives a connect.
        self.budget: deque[float] = deque()
        self.clear_at: float | None = None  # when the last clear was sent; survives a connect

    def reset(self) -> None:
        """The device connected: forget all but the background budget and the last clear."""
        self.alert_at = self.background_at = None
        self.alert_due = self.background_due = self.linger_due = self.retry_due = None
        self.retries_left = 0
        self.checking = False


class WakePolicy:
    """Decides wake-ups from store and connection events; see the module docstring.

    Every method returns at once. `stored` returns a `WakeUp` to send now (or None); timed
    decisions come out of `due`, which the driver calls once `next_deadline` has passed.
    """

    def __init__(self, rules: WakeRules, clock: Callable[[], float]) -> None:
        self.rules = rules
        self._clock = clock
        self._devices: dict[DeviceKey, _Device] = {}
        self._online: set[DeviceKey] = set()
        # Devices alerted since their last connection, with when, oldest alert first.
        self._alerted: dict[DeviceKey, float] = {}
        self._timers: list[tuple[float, int, DeviceKey]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        """How many offline devices the policy is tracking."""
        return len(self._devices)

    def is_online(self, user: str, device: str) -> bool:
        """Whether the device is connected (a queued wake-up for it is moot)."""
        return (user, device) in self._online

    # -- events -----------------------------------------------------------------------------

    def stored(self, user: str, device: str, urgent: bool) -> WakeUp | None:
        """An item was committed for a device with no live connection.

        Returns:
            The wake-up to send now, or None when a cooldown holds it back (a trailing
            wake-up is then scheduled) or the device is in fact connected.
        """
        key = (user, device)
        if key in self._online:
            return None
        now = self._clock()
        state = self._devices.get(key)
        if state is None:
            state = self._devices[key] = _Device()
        if urgent:
            if state.alert_at is None or now - state.alert_at >= self.rules.urgent_cooldown:
                return self._send(key, state, WakeKind.ALERT, "urgent", now)
            if state.alert_due is None:
                state.alert_due = state.alert_at + self.rules.urgent_cooldown
                self._schedule(key, state)
            return None
        if self._alert_covers(state, now):
            return None
        bg_cooldown = self.rules.background_cooldown
        if state.background_at is None or now - state.background_at >= bg_cooldown:
            return self._background(key, state, "background", now)
        if state.background_due is None:
            state.background_due = state.background_at + bg_cooldown
            self._schedule(key, state)
        return None

    def zombie(self, user: str, device: str) -> WakeUp | None:
        """A connected device did not answer an urgent message in time: an alert as though
        it were offline, unless one was sent within the urgent cooldown (then None). Its
        connection stays counted as connected: no other wake-up is decided for it."""
        key = (user, device)
        now = self._clock()
        state = self._devices.get(key)
        if state is None:
            state = self._devices[key] = _Device()
        if state.alert_at is not None and now - state.alert_at < self.rules.urgent_cooldown:
            self._settle(key, state, now)
            return None
        wake = self._send(key, state, WakeKind.ALERT, "zombie", now)
        state.retry_due = None  # no retries: the device may answer on this very socket
        state.retries_left = 0
        self._settle(key, state, now)
        return wake

    def cleared(self, user: str, device: str) -> WakeUp | None:
        """The user read on another device, and the read was stored for this device,
        which has no live connection.

        Returns:
            A clear wake-up to send now, or None: the device is connected, got no alert
            since its last connection, got a clear within `clear_cooldown`, or the
            background budget is spent (the clear is then dropped, not owed).
        """
        key = (user, device)
        now = self._clock()
        self._forget_old_alerts(now)
        if key in self._online or key not in self._alerted:
            return None
        state = self._devices.get(key)
        if state is None:
            state = self._devices[key] = _Device()
        recent = state.clear_at is not None and now - state.clear_at < self.rules.clear_cooldown
        if recent or self._budget_frees_at(state, now) > now:
            self._settle(key, state, now)
            return None
        state.clear_at = now
        if self.rules.background_per_hour > 0:
            state.budget.append(now)
        self._settle(key, state, now)
        return WakeUp(user, device, WakeKind.CLEAR, "clear")

    def retry_skipped(self, user: str, device: str) -> None:
        """The driver found nothing left for an alert retry to alert about (the messages
        were acked, or read on another device): send no further retries."""
        key = (user, device)
        state = self._devices.get(key)
        if state is None or (state.retry_due is None and state.retries_left == 0):
            return
        state.retry_due = None
        state.retries_left = 0
        self._settle(key, state, self._clock())

    def connected(self, user: str, device: str) -> None:
        """A device authenticated: cancel everything pending (retries included) and forget
        its cooldowns and alerts; only its background budget and last clear are kept."""
        self._online.add((user, device))
        self.connected_elsewhere(user, device)

    def connected_elsewhere(self, user: str, device: str) -> None:
        """The device authenticated on another node sharing the store: as `connected`,
        but it is not counted as connected here (its wake-ups are that node's concern
        until it disconnects there, and then this node's again should it store for it)."""
        key = (user, device)
        self._alerted.pop(key, None)
        state = self._devices.get(key)
        if state is not None:
            state.reset()
            self._settle(key, state, self._clock())

    def alerted_elsewhere(self, user: str, device: str) -> None:
        """Another node sent the device an alert: remember it for a clear (`cleared`) as
        though it had been sent here. Ignored while the device is connected here."""
        key = (user, device)
        if key in self._online:
            return
        now = self._clock()
        self._alerted.pop(key, None)  # moves to the end: the newest alert
        self._alerted[key] = now
        self._forget_old_alerts(now)

    def disconnected(self, user: str, device: str) -> None:
        """A device's connection ended: start its linger timer."""
        key = (user, device)
        self._online.discard(key)
        state = self._devices.get(key)
        if state is None:
            state = self._devices[key] = _Device()
        state.linger_due = self._clock() + self.rules.linger
        state.checking = False
        self._schedule(key, state)

    def linger_checked(self, user: str, device: str, unacked: int, urgent: bool) -> WakeUp | None:
        """The driver's answer to a `LingerCheck`.

        Args:
            user: The device's user.
            device: The device.
            unacked: How many items the device still has queued.
            urgent: Whether one of them is an urgent message.

        Returns:
            The wake-up to send now, or None if nothing is unacked, the device reconnected
            meanwhile, or another wake-up was sent in between.
        """
        key = (user, device)
        state = self._devices.get(key)
        if state is None or not state.checking or key in self._online:
            return None
        state.checking = False
        now = self._clock()
        if unacked > 0:
            if urgent:
                return self._send(key, state, WakeKind.ALERT, "linger", now)
            return self._background(key, state, "linger", now)
        self._settle(key, state, now)
        return None

    # -- timers -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The clock time at which `due` next has something to do, if any."""
        timers = self._timers
        while timers:
            if self._live(timers[0]) is not None:
                return timers[0][0]
            heapq.heappop(timers)
        return None

    def due(self) -> list[Decision]:
        """Every timed decision whose time has come, in time order."""
        now = self._clock()
        decisions: list[Decision] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            state = self._live(entry)
            if state is None:
                continue
            state.timer_at = None
            decisions.extend(self._fire(entry[2], state, now))
        return decisions

    # -- internals --------------------------------------------------------------------------

    def _alert_covers(self, state: _Device, now: float) -> bool:
        """An alert sent or owed within the urgent cooldown wakes the device anyway."""
        if state.alert_due is not None:
            return True
        return state.alert_at is not None and now - state.alert_at < self.rules.urgent_cooldown

    def _forget_old_alerts(self, now: float) -> None:
        """Drop the marks of alerts older than `ALERT_MEMORY` (the dict is in time order)."""
        alerted = self._alerted
        while alerted:
            key, at = next(iter(alerted.items()))
            if now - at < ALERT_MEMORY:
                return
            del alerted[key]

    def _budget_frees_at(self, state: _Device, now: float) -> float:
        """When the background budget next allows a wake-up (`now` if it does)."""
        per_hour = self.rules.background_per_hour
        budget = state.budget
        while budget and budget[0] + HOUR <= now:  # the same sum as the time it frees
            budget.popleft()
        if per_hour <= 0 or len(budget) < per_hour:
            return now
        return budget[-per_hour] + HOUR

    def _background(self, key: DeviceKey, state: _Device, reason: str, now: float) -> WakeUp | None:
        """A background wake-up now, or owed until the budget allows one."""
        frees_at = self._budget_frees_at(state, now)
        if frees_at <= now:
            return self._send(key, state, WakeKind.BACKGROUND, reason, now)
        state.background_due = frees_at
        state.linger_due = None  # the owed wake-up replaces the linger one
        state.checking = False
        self._schedule(key, state)
        return None

    def _send(
        self, key: DeviceKey, state: _Device, kind: WakeKind, reason: str, now: float
    ) -> WakeUp:
        if kind is WakeKind.ALERT:
            self._alerted.pop(key, None)  # moves to the end: the newest alert
            self._alerted[key] = now
            self._forget_old_alerts(now)
            state.alert_at = now
            state.alert_due = None
            state.background_due = None
            if reason != "retry":  # a new alert starts its own retries
                state.retries_left = self.rules.alert_retries
                state.retry_delay = self.rules.alert_retry
            state.retry_due = None
            if state.retries_left > 0:
                state.retry_due = now + state.retry_delay
        else:
            state.background_at = now
            state.background_due = None
            if self.rules.background_per_hour > 0:
                state.budget.append(now)
        state.linger_due = None  # the device has been woken; no separate linger wake-up
        state.checking = False
        self._schedule(key, state)
        return WakeUp(key[0], key[1], kind, reason)

    def _fire(self, key: DeviceKey, state: _Device, now: float) -> list[Decision]:
        out: list[Decision] = []
        if state.alert_due is not None and state.alert_due <= now:
            out.append(self._send(key, state, WakeKind.ALERT, "coalesced", now))
        if state.retry_due is not None and state.retry_due <= now:
            state.retries_left -= 1
            state.retry_delay *= 2
            out.append(self._send(key, state, WakeKind.ALERT, "retry", now))
        if state.background_due is not None and state.background_due <= now:
            state.background_due = None
            if not self._alert_covers(state, now):
                wake = self._background(key, state, "coalesced", now)
                if wake is not None:
                    out.append(wake)
        if state.linger_due is not None and state.linger_due <= now:
            state.linger_due = None
            state.checking = True
            out.append(LingerCheck(key[0], key[1]))
        self._settle(key, state, now)
        return out

    def _settle(self, key: DeviceKey, state: _Device, now: float) -> None:
        """Schedule the device's next timer, or forget it when nothing is left to enforce."""
        when = self._next_time(state, now)
        if when is None and not state.checking:
            del self._devices[key]
            return
        self._schedule_at(key, state, when)

    def _next_time(self, state: _Device, now: float) -> float | None:
        """When the device's timer must next fire: its earliest due time, or, with nothing
        due, the moment its last cooldown runs out and the last background wake-up leaves
        the budget's hour (its state is then dropped; expiries before that change nothing
        the timestamps do not already say). Wake-ups out of the hour are let go here."""
        # Unrolled (no tuples, no max()): this runs for every event of every device.
        due = state.alert_due
        t = state.background_due
        if t is not None and (due is None or t < due):
            due = t
        t = state.linger_due
        if t is not None and (due is None or t < due):
            due = t
        t = state.retry_due
        if t is not None and (due is None or t < due):
            due = t
        if due is not None:
            return due
        rules = self.rules
        last = -math.inf
        budget = state.budget
        while budget and budget[0] + HOUR <= now:  # no longer counts against the budget
            budget.popleft()
        if budget:
            last = budget[-1] + HOUR
        if state.clear_at is not None:
            t = state.clear_at + rules.clear_cooldown
            if t > last:
                last = t
        if state.alert_at is not None:
            t = state.alert_at + rules.urgent_cooldown
            if t > last:
                last = t
        if state.background_at is not None:
            t = state.background_at + rules.background_cooldown
            if t > last:
                last = t
        return last if last > now else None

    def _schedule(self, key: DeviceKey, state: _Device) -> None:
        self._schedule_at(key, state, self._next_time(state, self._clock()))

    def _schedule_at(self, key: DeviceKey, state: _Device, when: float | None) -> None:
        if when is None or state.timer_at == when:
            return
        if state.timer_at is not None and state.timer_at < when:
            # An earlier entry is live; it reschedules when it fires.
            return
        state.timer_at = when
        timers = self._timers
        heapq.heappush(timers, (when, next(self._seq), key))
        if len(timers) > 2 * len(self._devices) + STALE_TIMER_SLACK:
            self._compact_timers()

    def _live(self, entry: tuple[float, int, DeviceKey]) -> _Device | None:
        """The device a timer entry is for, if the entry is still its timer; None if it
        is stale (the device connected, or its timer was set again)."""
        state = self._devices.get(entry[2])
        return state if state is not None and state.timer_at == entry[0] else None

    def _compact_timers(self) -> None:
        """Drop the stale timer entries: one left behind by every reschedule and connect
        would otherwise stay until its time, up to an hour away (the budget's), and the
        heap would grow with the rate of reconnects rather than with the devices."""
        live = [entry for entry in self._timers if self._live(entry) is not None]
        heapq.heapify(live)
        self._timers = live

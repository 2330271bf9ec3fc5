"""Jepsen-style histories: devices record every send and every delivery while faults hit.

Pairs of devices talk through a gateway: sender ``s{i}/phone`` sends numbered messages to
receiver ``r{i}/phone``, one at a time, retrying the same id until the gateway answers
`sent` (what a correct client does). Meanwhile a fault is injected again and again (the
gateway SIGKILLed and restarted, Redis killed or paused, a Redis Cluster primary killed).
Every client's history is kept: what each sender got `sent` for, and every delivery each
receiver saw, redeliveries included. The checker then proves, per pair:

- nothing acknowledged was lost: every id that got `sent` was delivered;
- nothing was invented: every delivered id was sent by that sender, with its body;
- exactly once after dedup: an id is delivered under a single sid (redelivering the same
  stored item is at-least-once; a second sid would be a second stored copy);
- order held: after dedup, ids arrive in the order they were sent.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from gateway.auth import mint_token
from gateway.client import Backoff, ClientClosed, GatewayClient, SendRefused, connect
from gateway.settings import Settings

Fault = Callable[[], Awaitable[None]]
RETRY_PAUSE = 0.05
SETTLE_TIMEOUT = 30.0
RECHECK_TRIES = 10
RECHECK_PAUSE = 1.0


@dataclass
class Delivery:
    """One `msg` as a receiver saw it."""

    sender: str
    msg_id: str
    sid: int
    body: bytes


@dataclass
class PairHistory:
    """What one sender and its receiver saw."""

    sender: str
    receiver: str
    acknowledged: list[str] = field(default_factory=list)  # ids answered `sent`, in order
    refused: int = 0  # error answers (store unavailable), retried with the same id
    interrupted: int = 0  # connection lost before the answer, resent by the client
    deliveries: list[Delivery] = field(default_factory=list)


@dataclass
class HistoryReport:
    """The histories and the checker's verdict."""

    pairs: list[PairHistory]
    faults: int = 0
    acknowledged_after_last_fault: int = 0
    problems: list[str] = field(default_factory=list)
    # Acknowledged messages a live connection did not get within SETTLE_TIMEOUT, found
    # stored by a new connection (at-least-once kept, but late): reported apart.
    delayed: list[str] = field(default_factory=list)

    @property
    def acknowledged(self) -> int:
        """Messages that got `sent` (each one checked)."""
        return sum(len(p.acknowledged) for p in self.pairs)

    @property
    def deliveries(self) -> int:
        """Deliveries seen, redeliveries included."""
        return sum(len(p.deliveries) for p in self.pairs)

    @property
    def lost(self) -> int:
        """Messages that got `sent` and were never delivered."""
        return sum(len(set(p.acknowledged) - {d.msg_id for d in p.deliveries}) for p in self.pairs)

    @property
    def redelivered(self) -> int:
        """Deliveries of an item a receiver had already seen (allowed: at-least-once)."""
        return self.deliveries - sum(len({d.msg_id for d in p.deliveries}) for p in self.pairs)

    def summary(self) -> str:
        """The figures, one line."""
        return (
            f"faults {self.faults}, messages acknowledged {self.acknowledged} "
            f"(after the last fault {self.acknowledged_after_last_fault}), deliveries "
            f"{self.deliveries} ({self.redelivered} redelivered), refused "
            f"{sum(p.refused for p in self.pairs)}, interrupted "
            f"{sum(p.interrupted for p in self.pairs)}, delayed {len(self.delayed)}, "
            f"lost {self.lost}, problems {len(self.problems)}"
        )


def body_of(sender: str, seq: int) -> bytes:
    """The body a sender puts in its message number `seq`."""
    return f"{sender}:{seq}".encode()


def check(pair: PairHistory) -> list[str]:
    """Every violation of the guarantees in one pair's history, as sentences."""
    problems: list[str] = []
    sids: dict[str, set[int]] = {}
    first_seen: list[str] = []
    for d in pair.deliveries:
        if d.sender != pair.sender or not d.msg_id.startswith(f"{pair.sender}-"):
            problems.append(f"{pair.receiver} got {d.msg_id!r} from {d.sender}: never sent")
            continue
        seq = int(d.msg_id.rsplit("-", 1)[1])
        if d.body != body_of(pair.sender, seq):
            problems.append(f"{pair.receiver} got {d.msg_id} with a wrong body")
        if d.msg_id not in sids:
            first_seen.append(d.msg_id)
        sids.setdefault(d.msg_id, set()).add(d.sid)
    for msg_id, stored in sids.items():
        if len(stored) > 1:
            problems.append(f"{msg_id} stored {len(stored)} times (sids {sorted(stored)})")
    lost = [i for i in pair.acknowledged if i not in sids]
    if lost:
        problems.append(f"{len(lost)} acknowledged messages lost, first {lost[:3]}")
    order = [int(i.rsplit("-", 1)[1]) for i in first_seen if i in sids]
    if order != sorted(order):
        problems.append(f"{pair.receiver}: order broken: {order[:20]}")
    return problems


async def _sender(client: GatewayClient, pair: PairHistory, stop: trio.Event) -> None:
    seq = 0
    while not stop.is_set():
        msg_id = f"{pair.sender}-{seq:07d}"
        while True:
            try:
                await client.send(pair.receiver, body_of(pair.sender, seq), id=msg_id)
                break
            except SendRefused as exc:
                if exc.code != "internal":
                    raise
                pair.refused += 1
            except ClientClosed:
                pair.interrupted += 1
            await trio.sleep(RETRY_PAUSE)
        pair.acknowledged.append(msg_id)
        seq += 1


async def _receiver(client: GatewayClient, pair: PairHistory) -> None:
    async for delivery in client.deliveries():
        await _record(pair, delivery.frame)


async def _record(pair: PairHistory, frame: dict[str, Any]) -> None:
    if frame["t"] == "msg":
        pair.deliveries.append(Delivery(frame["from"], frame["id"], frame["sid"], frame["body"]))
    await trio.lowlevel.checkpoint()


async def run_histories(
    url: str,
    *,
    pairs: int,
    faults: int,
    fault: Fault,
    gap: tuple[float, float],
    seed: int,
    tail: float = 1.0,
) -> HistoryReport:
    """Run the pairs under `faults` injections of `fault`, spaced by a random `gap`
    (seconds, uniform), then let them run `tail` more seconds, settle, and check.

    Args:
        url: The gateway's device endpoint (the same across restarts).
        pairs: Sender/receiver pairs.
        faults: How many times to call `fault`.
        fault: Breaks something and repairs it (returns once the repair is under way).
        gap: Bounds of the random wait before each fault.
        seed: Seeds the fault timing.
        tail: Seconds of load after the last fault.
    """
    rng = random.Random(seed)
    auth = Settings().auth
    report = HistoryReport([PairHistory(f"s{i}", f"r{i}") for i in range(pairs)])
    stop = trio.Event()

    def client(user: str) -> Callable[[], str]:
        return lambda: mint_token(auth, user, "phone")

    options = {"backoff": Backoff(base=0.05, cap=0.5), "reconnect": True}
    async with trio.open_nursery() as held:
        for pair in report.pairs:
            receiver = await held.start(_hold, url, client(pair.receiver), options)
            held.start_soon(_receiver, receiver, pair)
        for pair in report.pairs:
            sender = await held.start(_hold, url, client(pair.sender), options)
            held.start_soon(_sender, sender, pair, stop)
        for _ in range(faults):
            await trio.sleep(rng.uniform(*gap))
            await fault()
            report.faults += 1
        before = report.acknowledged
        await trio.sleep(tail)
        report.acknowledged_after_last_fault = report.acknowledged - before
        stop.set()
        with trio.move_on_after(SETTLE_TIMEOUT):
            for pair in report.pairs:
                # polling, bounded by SETTLE_TIMEOUT: deliveries arrive from many tasks, and
                # a send in flight at `stop` may still be acknowledged, so `acknowledged` is
                # read afresh each time
                while not set(pair.acknowledged) <= {d.msg_id for d in pair.deliveries}:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        held.cancel_scope.cancel()
    for pair in report.pairs:
        missing = set(pair.acknowledged) - {d.msg_id for d in pair.deliveries}
        if missing:
            # Not delivered live in time: are they still stored? A new connection says.
            report.delayed.append(
                f"{pair.receiver}: {len(missing)} acknowledged messages not delivered live "
                f"within {SETTLE_TIMEOUT:.0f} s: {sorted(missing)[:3]}, last delivered "
                f"{[d.msg_id for d in pair.deliveries[-2:]]}"
            )
            failure = await _read_again(url, client(pair.receiver), pair)
            if failure:
                report.problems.append(failure)
    for pair in report.pairs:
        report.problems += check(pair)
    return report


async def _read_again(url: str, token: Callable[[], str], pair: PairHistory) -> str:
    """Record what a new connection of the receiver finds stored (a few tries: the
    gateway may still be refusing connections after the last fault); the failure, if
    every try failed."""
    failure = ""
    for _ in range(RECHECK_TRIES):
        try:
            async with connect(url, token(), reconnect=False) as again:
                await again.wait_drained()
                for delivery in again.take_buffered():
                    await _record(pair, delivery.frame)
                return ""
        except ClientClosed as exc:
            failure = f"{pair.receiver} could not connect again to read its queue: {exc}"
            await trio.sleep(RECHECK_PAUSE)
    return failure


async def _hold(
    url: str,
    token: Callable[[], str],
    options: dict[str, object],
    *,
    task_status: trio.TaskStatus[GatewayClient] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep one client connected (reconnecting through faults) until cancelled."""
    async with connect(url, token, **options) as client:
        task_status.started(client)
        await trio.sleep_forever()

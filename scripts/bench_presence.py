"""Presence fan-out benchmark: batched (`[presence] batch_ms = 250`) against unbatched (0).

Run it from the repository root:

    python -m scripts.bench_presence              # 3 runs of each mode, ~2.5-3.5 minutes
    python -m scripts.bench_presence --quick      # 1 small run of each mode, ~30 s

Workload (defaults): 2,000 devices, one per user (``u0000`` .. ``u1999``, device ``d``),
each subscribed to 50 users. 400 of them are *churners*: they disconnect and reconnect on
a fixed, staggered schedule, 200 events per second in all (100 disconnects + 100 connects),
each churner offline for ``churners / rate`` = 2 s at a time, well past ``offline_grace``
(0.5 s here), so every disconnect becomes an offline change and every connect an online
change. Every churner is watched by exactly 50 of the 1,600 always-connected devices
(chosen at random), so each churn event fans out to 50 connected subscribers; the rest of
every device's 50 subscriptions go to random always-connected users, which never change.
A churner re-subscribes (and gets a snapshot) on every reconnect, as an app does.

Measured over a window of ``--duration`` seconds, after a warm-up that brings the churn
to its steady state:

* presence change frames per second, counted as the subscribers receive them (snapshots,
  the reply to ``sub``, are counted apart);
* the gateway's CPU share: utime + stime of its process (all threads) from
  ``/proc/<pid>/stat`` over the window, divided by wall time (1.0 = one core busy); the
  same over a quiet window with every device connected and no churn is shown as "idle";
* latency from a churn event to each subscriber receiving the change: for an online change,
  from the moment the churner sends ``hello``; for an offline change, from the moment the
  churner starts the close handshake, minus ``offline_grace`` (which is by design);
* the *added* latency: batched minus unbatched, at p50 and p99.

The gateway runs in its own OS process (``python -m gateway.cli serve --config
gateway.toml`` on a free 127.0.0.1 port, with a fresh SQLite file), one process per run
and mode; the load generator is this script's process. Both raise RLIMIT_NOFILE to
min(hard, 20,000). The generator checks itself: its own CPU share and how late its event
loop wakes a sleeping task are reported, and a run whose generator was saturated is
flagged. The gateway is stopped on the way out, also on error or Ctrl-C.

The gateway's in-process counter (``PresenceService.frames_sent``) is not reachable from
another process (the gateway has no metrics endpoint yet), so frames are counted where the
subscribers receive them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from gateway.auth import mint_token
from gateway.settings import AuthSettings
from presence.service import COARSEN_FACTOR
from scripts.kit.gateway_process import GatewayProcess
from scripts.kit.lean_client import SUBPROTOCOL, LeanClient
from scripts.kit.limits import FD_CAP, raise_fd_limit
from scripts.kit.procfs import cpu_seconds, fd_limit, machine_busy_seconds

JWT_SECRET = "bench-presence-secret-not-for-production"
DEVICE = "d"
TARGET_RATIO = 5.0
SETUP_TIMEOUT = 120.0
# Concurrent connection set-ups during the initial connect storm: enough to be quick,
# few enough that no handshake waits anywhere near its timeout.
SETUP_CONCURRENCY = 64
# The generator's loop-lag probe period, and the CPU share past which it is called saturated.
PROBE_INTERVAL = 0.01
GENERATOR_SATURATED = 0.9
# Other processes' CPU (in cores) below which the machine counts as quiet for a run.
QUIET_CORES = 0.3


Frame = dict[str, Any]


# ---- processes and /proc -------------------------------------------------------------------


def problems(gateway: GatewayProcess) -> list[str]:
    """Log lines at WARNING or above, apart from the notice of the drain at the end."""
    return [ln for ln in gateway.warnings() if "draining" not in ln]


def wait_for_quiet(limit: float, patience: float) -> float:
    """Wait (at most `patience` s) until the machine's busy CPU over 1 s is below `limit`
    cores; return the last reading. Other people's jobs on a shared host skew every
    figure here, so each run starts in a quiet moment when there is one."""
    deadline = time.monotonic() + patience
    while True:
        b0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        busy = (machine_busy_seconds() - b0) / (time.monotonic() - t0)
        if busy < limit or time.monotonic() >= deadline:
            return busy


@contextlib.contextmanager
def running(workdir: Path, args: argparse.Namespace, batch_ms: int) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        workdir,
        server=f"drain_seconds = 0.5\nshutdown_timeout = 3.0\noverload_lag = {args.overload_lag}",
        store=f'path = "{workdir / "gateway.db"}"\nsynchronous = "{args.synchronous}"',
        config=f'[auth]\njwt_secret = "{JWT_SECRET}"\n'
        f"[presence]\nbatch_ms = {batch_ms}\noffline_grace = {args.grace}",
        log_level="warning",
    )
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop(grace=6)


# ---- clients ----------------------------------------------------------------------------------


class Wire(Protocol):
    """What a device needs of a WebSocket client."""

    async def send_message(self, message: bytes) -> None: ...

    async def get_message(self) -> bytes | str: ...


@contextlib.asynccontextmanager
async def open_wire(url: str, lean: bool) -> AsyncIterator[Wire]:
    """A connection with the lean client or trio-websocket (`--client`); closed on exit
    with a close handshake bounded to 2 s."""
    if lean:
        with trio.fail_after(30):
            client = await LeanClient.open(url)
        try:
            yield client
        finally:
            await client.aclose()
        return
    async with open_websocket_url(
        url,
        subprotocols=[SUBPROTOCOL],
        connect_timeout=30,
        disconnect_timeout=2,
        max_message_size=16 * 1024 * 1024,
    ) as ws:
        yield ws


# ---- workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Who watches whom, and who churns."""

    users: list[str]
    churners: list[int]  # device indices
    watch: list[list[str]]  # per device, the users it subscribes to
    watchers_per_churner: float


def build_workload(args: argparse.Namespace, seed: int) -> Workload:
    """Each churner gets `--watchers` distinct always-connected watchers; every device's
    remaining subscriptions go to random always-connected users."""
    rng = random.Random(seed)
    users = [f"u{i:04d}" for i in range(args.devices)]
    order = list(range(args.devices))
    rng.shuffle(order)
    churners = sorted(order[: args.churners])
    churner_set = set(churners)
    stable = [i for i in range(args.devices) if i not in churner_set]
    # With --hot N, only N always-connected devices watch churners (many changes each).
    pool = stable[: args.hot] if args.hot else stable
    watch: list[set[str]] = [set() for _ in users]
    for c in churners:
        placed = 0
        # Least-loaded watchers first (ties at random): every subscriber ends up with
        # about the same number of churners.
        for s in sorted(pool, key=lambda s: (len(watch[s]), rng.random())):
            if len(watch[s]) < args.watch:
                watch[s].add(users[c])
                placed += 1
                if placed == args.watchers:
                    break
    for i in range(args.devices):
        while len(watch[i]) < args.watch:
            s = rng.choice(stable)
            if s != i:
                watch[i].add(users[s])
    per_churner = [
        sum(1 for s in stable if users[c] in watch[s]) for c in churners[: min(50, len(churners))]
    ]
    return Workload(
        users, churners, [sorted(w) for w in watch], statistics.fmean(per_churner or [0])
    )


# ---- load generator --------------------------------------------------------------------------


@dataclass
class Tally:
    """What the subscribers saw, filled in by the device tasks."""

    grace: float
    window: tuple[float, float] = (math.inf, math.inf)
    last_connect: dict[str, float] = field(default_factory=dict)
    last_disconnect: dict[str, float] = field(default_factory=dict)
    change_frames: int = 0
    change_items: int = 0
    snapshot_frames: int = 0
    connects: int = 0  # churn connects in the window
    disconnects: int = 0  # churn disconnects in the window
    matched_items: int = 0  # deliveries whose event lies in the window
    online_lat: list[float] = field(default_factory=list)
    connect_lat: list[float] = field(default_factory=list)  # hello sent -> snapshot, churners
    offline_lat: list[float] = field(default_factory=list)
    errors: int = 0
    lost_connections: int = 0
    failed_connects: int = 0
    ready: int = 0

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]


def decode(message: bytes | str) -> list[Frame]:
    if isinstance(message, str):
        return []
    item = cbor2.loads(message)
    return item if isinstance(item, list) else [item]


def take_frames(tally: Tally, frames: list[Frame], now: float, expect_snapshot: bool) -> bool:
    """Count presence frames; return whether the snapshot is still awaited."""
    counted = tally.in_window(now)
    for frame in frames:
        kind = frame.get("t")
        if kind == "error":
            tally.errors += 1
        if kind != "presence":
            continue
        if expect_snapshot:
            expect_snapshot = False
            tally.snapshot_frames += counted
            continue
        items = frame["items"]
        if counted:
            tally.change_frames += 1
            tally.change_items += len(items)
        for item in items:
            user = item["user"]
            if item["online"]:
                t0 = tally.last_connect.get(user)
                lat = tally.online_lat
                offset = 0.0
            else:
                t0 = tally.last_disconnect.get(user)
                lat = tally.offline_lat
                offset = tally.grace
            if t0 is not None and tally.in_window(t0) and t0 <= now:
                lat.append(now - t0 - offset)
                tally.matched_items += 1
    return expect_snapshot


@dataclass
class ChurnPlan:
    """The churn schedule, fixed once every device is connected and subscribed."""

    period: float  # each churner disconnects and reconnects once per period
    offline: float  # how long a churner stays away
    first: dict[int, float] = field(default_factory=dict)  # device -> first disconnect
    first_scopes: dict[int, trio.CancelScope] = field(default_factory=dict)

    def start(self, at: float, churners: Sequence[int]) -> None:
        """Disconnects every `period / n` s; each reconnect falls `offline` later, which
        with `offline = period / 2` and the half-slot offset interleaves the two kinds."""
        n = len(churners)
        for k, c in enumerate(churners):
            self.first[c] = at + (k + 0.5) * self.period / n
            self.first_scopes[c].deadline = self.first[c]


async def device(
    index: int,
    url: str,
    user: str,
    token: str,
    users: list[str],
    tally: Tally,
    gate: trio.Semaphore,
    all_ready: trio.Event,
    expected: int,
    plan: ChurnPlan | None,
    lean: bool,
) -> None:
    """One device; a churner (`plan` given) disconnects and reconnects on the plan's clock.

    A device subscribes in the same message as its `hello`, and counts the first presence
    frame as the snapshot.
    """
    hello = cbor2.dumps([{"t": "hello", "v": 1, "token": token}, {"t": "sub", "users": users}])
    session = 0
    while True:
        scope = trio.CancelScope()
        if plan is not None:
            if session == 0:
                plan.first_scopes[index] = scope
            else:
                scope.deadline = plan.first[index] + session * plan.period
        gated = session == 0
        if gated:
            await gate.acquire()
        try:
            async with open_wire(url, lean) as ws:
                sent_at = trio.current_time()
                if session > 0:
                    tally.last_connect[user] = sent_at
                    tally.connects += tally.in_window(sent_at)
                await ws.send_message(hello)
                expect_snapshot = True
                while expect_snapshot:
                    message = await ws.get_message()
                    expect_snapshot = take_frames(tally, decode(message), trio.current_time(), True)
                if session > 0 and tally.in_window(sent_at):
                    tally.connect_lat.append(trio.current_time() - sent_at)
                if gated:
                    gated = False
                    gate.release()
                    tally.ready += 1
                    if tally.ready == expected:
                        all_ready.set()
                with scope:
                    while True:
                        message = await ws.get_message()
                        take_frames(tally, decode(message), trio.current_time(), False)
                closed_at = trio.current_time()
                tally.last_disconnect[user] = closed_at
                tally.disconnects += tally.in_window(closed_at)
        except ConnectionClosed:
            tally.lost_connections += 1
            return  # the gateway closed it: not part of the plan
        except (OSError, HandshakeError, trio.TooSlowError):
            tally.failed_connects += 1
            if session == 0:
                raise
        finally:
            if gated:
                gate.release()
        assert plan is not None
        await trio.sleep_until(plan.first[index] + session * plan.period + plan.offline)
        session += 1


async def probe_gateway(url: str, token: str, samples: list[float], stop: trio.Event) -> None:
    """Ping the gateway every 50 ms over an authenticated, unsubscribed connection."""
    client = await LeanClient.open(url)
    try:
        await client.send_message(cbor2.dumps({"t": "hello", "v": 1, "token": token}))
        while not stop.is_set():
            samples.append(await client.ping())
            await trio.sleep(0.05)
    finally:
        await trio.aclose_forcefully(client.stream)


async def probe_lag(samples: list[float], stop: trio.Event) -> None:
    """How late a 10 ms sleep wakes up in the generator's own loop."""
    while not stop.is_set():
        before = trio.current_time()
        await trio.sleep(PROBE_INTERVAL)
        samples.append(max(0.0, trio.current_time() - before - PROBE_INTERVAL))


@dataclass
class Sample:
    """One run of one mode."""

    mode: str
    batch_ms: int
    wall: float
    churn_events_per_s: float
    change_frames_per_s: float
    frames_per_event: float  # change frames per churn event: fair when churn fell short
    cpu_ms_per_event: float  # gateway CPU per churn event
    change_items_per_s: float
    snapshot_frames_per_s: float
    items_per_frame: float
    delivered_share: float  # deliveries of in-window events / (events x watchers)
    online_delivered: float  # the same for connects only
    offline_delivered: float  # the same for disconnects only
    connect_p50_ms: float  # a churner's hello sent -> its snapshot received
    connect_p99_ms: float
    gateway_ping_p50_ms: float  # WebSocket ping round trip to the gateway
    gateway_ping_p99_ms: float
    gateway_ping_max_ms: float
    gateway_cpu: float
    gateway_cpu_idle: float
    generator_cpu: float
    others_cpu: float  # every other process on the machine, in cores
    generator_lag_p99_ms: float
    generator_lag_max_ms: float
    online_p50_ms: float
    online_p99_ms: float
    offline_p50_ms: float
    offline_p99_ms: float
    all_p50_ms: float
    all_p99_ms: float
    setup_s: float
    errors: int
    lost_connections: int
    failed_connects: int
    gateway_problems: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def generate(
    gateway: GatewayProcess, work: Workload, tokens: list[str], probe_token: str,
    args: argparse.Namespace, mode: str, batch_ms: int,
) -> Sample:  # fmt: skip
    """Connect everyone, measure an idle window, start the churn, measure, stop."""
    tally = Tally(grace=args.grace)
    gate = trio.Semaphore(SETUP_CONCURRENCY)
    all_ready = trio.Event()
    stop = trio.Event()
    lag: list[float] = []
    rtt: list[float] = []
    period = 2 * len(work.churners) / args.rate
    plan = ChurnPlan(period=period, offline=period / 2)
    churner_set = set(work.churners)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(args.devices):
            nursery.start_soon(
                device, i, gateway.url, work.users[i], tokens[i], work.watch[i], tally, gate,
                all_ready, args.devices, plan if i in churner_set else None,
                args.client == "lean",
            )  # fmt: skip
        with trio.move_on_after(SETUP_TIMEOUT):
            await all_ready.wait()
        if not all_ready.is_set():
            raise RuntimeError(f"only {tally.ready}/{args.devices} devices connected in time")
        setup_s = trio.current_time() - started
        # The generator's long-lived objects (2,000 connections) need no more scanning;
        # full collections over them would otherwise stall its loop for tens of ms.
        gc.collect()
        gc.freeze()
        nursery.start_soon(probe_lag, lag, stop)
        nursery.start_soon(probe_gateway, gateway.url, probe_token, rtt, stop)
        await trio.sleep(0.5)  # let the connect storm's last writes settle
        # Idle: everyone connected and subscribed, nothing changes.
        g0, c0 = cpu_seconds(gateway.pid), trio.current_time()
        await trio.sleep(args.idle)
        idle_cpu = (cpu_seconds(gateway.pid) - g0) / (trio.current_time() - c0)
        churn_start = trio.current_time() + 0.05
        plan.start(churn_start, work.churners)
        # Steady state: every churner has been away once and the first offline changes
        # (due `offline_grace` after their disconnects) are out.
        w0 = churn_start + plan.offline + args.grace + 0.5
        w1 = w0 + args.duration
        tally.window = (w0, w1)
        await trio.sleep_until(w0)
        lag_from, rtt_from = len(lag), len(rtt)
        m0, g0 = machine_busy_seconds(), cpu_seconds(gateway.pid)
        p0, c0 = time.process_time(), trio.current_time()
        await trio.sleep_until(w1)
        m1, g1 = machine_busy_seconds(), cpu_seconds(gateway.pid)
        p1, c1 = time.process_time(), trio.current_time()
        lag_window, rtt_window = lag[lag_from:], rtt[rtt_from:]
        # Deliveries of the window's last events may still be in flight: wait them out,
        # also through a window the gateway coarsened under overload.
        await trio.sleep(args.grace + COARSEN_FACTOR * batch_ms / 1000 + 0.5)
        stop.set()
        nursery.cancel_scope.cancel()
    gc.unfreeze()
    wall = c1 - c0
    all_lat = tally.online_lat + tally.offline_lat
    events = tally.connects + tally.disconnects
    return Sample(
        mode=mode,
        batch_ms=batch_ms,
        wall=wall,
        churn_events_per_s=events / wall,
        change_frames_per_s=tally.change_frames / wall,
        frames_per_event=tally.change_frames / max(1, events),
        cpu_ms_per_event=(g1 - g0) * 1000 / max(1, events),
        change_items_per_s=tally.change_items / wall,
        snapshot_frames_per_s=tally.snapshot_frames / wall,
        items_per_frame=tally.change_items / max(1, tally.change_frames),
        delivered_share=tally.matched_items / max(1, events * args.watchers),
        online_delivered=len(tally.online_lat) / max(1, tally.connects * args.watchers),
        offline_delivered=len(tally.offline_lat) / max(1, tally.disconnects * args.watchers),
        connect_p50_ms=percentile(tally.connect_lat, 0.5) * 1000,
        connect_p99_ms=percentile(tally.connect_lat, 0.99) * 1000,
        gateway_ping_p50_ms=percentile(rtt_window, 0.5) * 1000,
        gateway_ping_p99_ms=percentile(rtt_window, 0.99) * 1000,
        gateway_ping_max_ms=max(rtt_window, default=math.nan) * 1000,
        gateway_cpu=(g1 - g0) / wall,
        gateway_cpu_idle=idle_cpu,
        generator_cpu=(p1 - p0) / wall,
        others_cpu=max(0.0, (m1 - m0) - (g1 - g0) - (p1 - p0)) / wall,
        generator_lag_p99_ms=percentile(lag_window, 0.99) * 1000,
        generator_lag_max_ms=max(lag_window, default=math.nan) * 1000,
        online_p50_ms=percentile(tally.online_lat, 0.5) * 1000,
        online_p99_ms=percentile(tally.online_lat, 0.99) * 1000,
        offline_p50_ms=percentile(tally.offline_lat, 0.5) * 1000,
        offline_p99_ms=percentile(tally.offline_lat, 0.99) * 1000,
        all_p50_ms=percentile(all_lat, 0.5) * 1000,
        all_p99_ms=percentile(all_lat, 0.99) * 1000,
        setup_s=setup_s,
        errors=tally.errors,
        lost_connections=tally.lost_connections,
        failed_connects=tally.failed_connects,
    )


# ---- driver ------------------------------------------------------------------------------------

MODES = (("batched", None), ("unbatched", 0))


def run_one(
    workdir: Path, args: argparse.Namespace, work: Workload, tokens: list[str],
    probe_token: str, run: int, mode: str, batch_ms: int,
) -> Sample:  # fmt: skip
    busy = wait_for_quiet(QUIET_CORES, args.quiet_wait)
    if busy >= QUIET_CORES:
        print(f"  (machine still busy: {busy:.2f} cores in use by others before this run)")
    with running(workdir / f"run{run}-{mode}", args, batch_ms) as gateway:
        print(
            f"  run {run + 1} {mode:9} (batch_ms={batch_ms}, gateway pid {gateway.pid}, "
            f"RLIMIT_NOFILE {fd_limit(gateway.pid)}) ...",
            end="",
            flush=True,
        )
        sample = trio.run(generate, gateway, work, tokens, probe_token, args, mode, batch_ms)
        found = problems(gateway)
    sample.gateway_problems = len(found)
    for line in found[:8]:
        print(f"\n    gateway: {line}", end="")
    print(
        f" {sample.change_frames_per_s:8.0f} frames/s, cpu {sample.gateway_cpu:.2f}, "
        f"p50/p99 {sample.all_p50_ms:.0f}/{sample.all_p99_ms:.0f} ms, "
        f"ping p99 {sample.gateway_ping_p99_ms:.0f} ms, "
        f"generator cpu {sample.generator_cpu:.2f}, others {sample.others_cpu:.2f}, "
        f"delivered {sample.delivered_share:.2f}, lost conns {sample.lost_connections}, "
        f"failed connects {sample.failed_connects}, errors {sample.errors}",
        flush=True,
    )
    return sample


def median(samples: Sequence[Sample], key: str) -> float:
    values = [getattr(s, key) for s in samples]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


ROWS = (
    ("churn events/s (connects + disconnects)", "churn_events_per_s", "{:.0f}"),
    ("presence change frames/s received", "change_frames_per_s", "{:.0f}"),
    ("change frames per churn event", "frames_per_event", "{:.2f}"),
    ("presence change items/s received", "change_items_per_s", "{:.0f}"),
    ("items per change frame", "items_per_frame", "{:.2f}"),
    ("snapshot frames/s (re-subscribes)", "snapshot_frames_per_s", "{:.0f}"),
    ("deliveries / (events x watchers)", "delivered_share", "{:.3f}"),
    ("  of connects (online changes)", "online_delivered", "{:.3f}"),
    ("  of disconnects (offline changes)", "offline_delivered", "{:.3f}"),
    ("gateway CPU share, churning (cores)", "gateway_cpu", "{:.3f}"),
    ("gateway CPU per churn event (ms)", "cpu_ms_per_event", "{:.2f}"),
    ("gateway CPU share, idle (cores)", "gateway_cpu_idle", "{:.3f}"),
    ("reconnect: hello -> snapshot p50 (ms)", "connect_p50_ms", "{:.1f}"),
    ("reconnect: hello -> snapshot p99 (ms)", "connect_p99_ms", "{:.1f}"),
    ("gateway ping round trip p50 (ms)", "gateway_ping_p50_ms", "{:.1f}"),
    ("gateway ping round trip p99 (ms)", "gateway_ping_p99_ms", "{:.1f}"),
    ("gateway ping round trip max (ms)", "gateway_ping_max_ms", "{:.1f}"),
    ("latency p50, all changes (ms)", "all_p50_ms", "{:.1f}"),
    ("latency p99, all changes (ms)", "all_p99_ms", "{:.1f}"),
    ("latency p50, online (ms)", "online_p50_ms", "{:.1f}"),
    ("latency p99, online (ms)", "online_p99_ms", "{:.1f}"),
    ("latency p50, offline - grace (ms)", "offline_p50_ms", "{:.1f}"),
    ("latency p99, offline - grace (ms)", "offline_p99_ms", "{:.1f}"),
    ("generator CPU share (cores)", "generator_cpu", "{:.3f}"),
    ("other processes' CPU (cores)", "others_cpu", "{:.3f}"),
    ("generator loop lag p99 (ms)", "generator_lag_p99_ms", "{:.1f}"),
    ("generator loop lag max (ms)", "generator_lag_max_ms", "{:.1f}"),
    ("setup: connect + subscribe all (s)", "setup_s", "{:.1f}"),
)


def report(args: argparse.Namespace, results: dict[str, list[Sample]]) -> dict[str, Any]:
    batched, unbatched = results["batched"], results["unbatched"]
    width = max(len(r[0]) for r in ROWS)
    print(f"\nmedians over {args.runs} run(s), window {args.duration:g} s each:")
    print(f"  {'':{width}}  {'batched':>10}  {'unbatched':>10}")
    for label, key, fmt in ROWS:
        b, u = median(batched, key), median(unbatched, key)
        print(f"  {label:{width}}  {fmt.format(b):>10}  {fmt.format(u):>10}")
    frames_b = median(batched, "change_frames_per_s")
    frames_u = median(unbatched, "change_frames_per_s")
    ratio = frames_u / frames_b if frames_b else math.inf
    run_ratios = [
        u.change_frames_per_s / b.change_frames_per_s
        for b, u in zip(batched, unbatched, strict=True)
        if b.change_frames_per_s
    ]
    added = {
        q: median(batched, f"{q}_ms") - median(unbatched, f"{q}_ms")
        for q in ("all_p50", "all_p99", "online_p50", "online_p99", "offline_p50", "offline_p99")
    }
    cpu_b, cpu_u = median(batched, "gateway_cpu"), median(unbatched, "gateway_cpu")
    per_event = median(unbatched, "frames_per_event") / median(batched, "frames_per_event")
    print(
        f"\nframe ratio unbatched/batched: {ratio:.2f}x (per run: "
        f"{', '.join(f'{r:.2f}' for r in run_ratios)}); per churn event {per_event:.2f}x; "
        f"CPU ratio {cpu_u / cpu_b:.2f}x"
    )
    short = [s for s in batched + unbatched if s.churn_events_per_s < 0.9 * args.rate]
    if short:
        print(
            f"WARNING: churn fell short of {args.rate:g} events/s in {len(short)} run(s) "
            "(the gateway accepted reconnects too slowly; see 'reconnect: hello -> "
            "snapshot'): compare frames per churn event there"
        )
    print(
        f"added latency (batched - unbatched): p50 {added['all_p50']:+.1f} ms, "
        f"p99 {added['all_p99']:+.1f} ms (online p50/p99 {added['online_p50']:+.1f}/"
        f"{added['online_p99']:+.1f}, offline {added['offline_p50']:+.1f}/"
        f"{added['offline_p99']:+.1f})"
    )
    limit = float(args.batch_ms)
    ok_ratio = ratio >= TARGET_RATIO
    ok_latency = added["all_p99"] <= limit
    verdict = "PASS" if ok_ratio and ok_latency else "MISS"
    print(
        f"target: frames cut >= {TARGET_RATIO:g}x ({'met' if ok_ratio else 'not met'}: "
        f"{ratio:.2f}x) at <= {limit:g} ms added p99 latency "
        f"({'met' if ok_latency else 'not met'}: {added['all_p99']:+.1f} ms) -> {verdict}"
    )
    # What the workload allows: a subscriber whose changes arrive independently at rate r
    # gets, from a batcher that sends the first change of a quiet window at once and then
    # at most one frame per window w, r / (r*w + exp(-r*w)) frames/s instead of r; so the
    # expected cut is r*w + exp(-r*w), whatever the implementation's speed.
    subscribers = args.hot or args.devices - args.churners
    per_sub = args.rate * args.watchers / subscribers
    rw = per_sub * args.batch_ms / 1000
    expected = rw + math.exp(-rw)
    print(
        f"workload: {per_sub:.2f} changes/s per watching subscriber; a {args.batch_ms} ms "
        f"window can cut that by about {expected:.2f}x (>= {TARGET_RATIO:g}x needs about "
        f"{(TARGET_RATIO - 0.007) * 1000 / args.batch_ms:.0f} changes/s per subscriber)"
    )
    generator_hot = [s for s in batched + unbatched if s.generator_cpu >= GENERATOR_SATURATED]
    contended = [s for s in batched + unbatched if s.others_cpu >= QUIET_CORES]
    if contended:
        print(
            f"WARNING: other processes used >= {QUIET_CORES:g} cores during "
            f"{len(contended)} run(s) (see 'other processes' CPU'); those figures are skewed"
        )
    if generator_hot:
        print(
            f"WARNING: the generator was near saturation in {len(generator_hot)} run(s); "
            "the figures of those runs are bounded by it"
        )
    return {
        "ratio": ratio,
        "run_ratios": run_ratios,
        "cpu_ratio": cpu_u / cpu_b,
        "ratio_per_event": per_event,
        "added_ms": added,
        "verdict": verdict,
        "expected_cut": expected,
        "changes_per_subscriber_per_s": per_sub,
    }


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small run of each mode")
    parser.add_argument("--runs", type=int, help="runs of each mode (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="measured seconds (default 8, quick 4)")
    parser.add_argument("--devices", type=int, help="devices = users (default 2000, quick 400)")
    parser.add_argument("--churners", type=int, help="churning devices (default 400, quick 80)")
    parser.add_argument("--rate", type=float, help="churn events/s (default 200, quick 40)")
    parser.add_argument("--watch", type=int, default=50, help="subscriptions per device")
    parser.add_argument("--watchers", type=int, default=50, help="subscribers per churner")
    parser.add_argument(
        "--hot", type=int, default=0,
        help="only this many always-connected devices watch churners (default 0: all)",
    )  # fmt: skip
    parser.add_argument("--grace", type=float, default=0.5, help="[presence] offline_grace")
    parser.add_argument("--batch-ms", type=int, default=250, help="batched mode's batch_ms")
    parser.add_argument("--idle", type=float, default=1.0, help="idle CPU window (s)")
    parser.add_argument(
        "--synchronous", choices=("full", "normal"), default="full",
        help="[store] synchronous (default: the product default, full)",
    )  # fmt: skip
    parser.add_argument(
        "--client", choices=("lean", "trio-websocket"), default="lean",
        help="the generator's WebSocket client (default: lean, the cheaper one)",
    )  # fmt: skip
    parser.add_argument(
        "--quiet-wait", type=float, default=5.0,
        help="seconds to wait before each run for other processes to go quiet (default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--overload-lag", type=float, default=0.25,
        help="[server] overload_lag (default: the product default, 0.25 s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, small in (
        ("runs", 3, 1),
        ("duration", 5.0, 4.0),
        ("devices", 2000, 400),
        ("churners", 400, 80),
        ("rate", 200.0, 40.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    stable = args.devices - args.churners
    if not 0 < args.churners < args.devices:
        parser.error("--churners must be between 0 and --devices")
    if args.watchers > stable or args.watch >= stable:
        parser.error("not enough always-connected devices for --watch / --watchers")
    if args.hot and not args.watchers <= args.hot <= stable:
        parser.error("--hot must be between --watchers and the always-connected devices")
    if args.churners * args.watchers > (args.hot or stable) * args.watch:
        parser.error("--churners x --watchers exceeds the subscriptions available")
    if args.churners / args.rate <= args.grace + 0.25:
        parser.error("churners must stay offline (churners / rate s) well past --grace")
    if not 0 < args.duration <= 120 or not 1 <= args.runs <= 10:
        parser.error("--duration must be in (0, 120] and --runs in [1, 10]")
    if args.devices + 100 > FD_CAP:
        parser.error(f"at most {FD_CAP - 100} devices (one fd each, {FD_CAP} fds per process)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_fd_limit()
    if limit < args.devices + 100:
        print(f"RLIMIT_NOFILE is {limit}: too low for {args.devices} devices", file=sys.stderr)
        return 2
    host = machine()
    print(
        f"bench_presence: {args.devices} devices ({args.churners} churners), {args.watch} "
        f"subscriptions each, {args.watchers} subscribers per churner, churn {args.rate:g} "
        f"events/s{f' (watched by {args.hot} hot subscribers only)' if args.hot else ''}, "
        f"offline_grace {args.grace:g} s, window {args.duration:g} s, "
        f"{args.runs} run(s) per mode"
    )
    print(
        f"machine: nproc {host['nproc']}, {host['model']}, Python {host['python']}; "
        f"generator RLIMIT_NOFILE {limit}"
    )
    work = build_workload(args, args.seed)
    print(f"  subscribers per churner (sampled): {work.watchers_per_churner:.1f}")
    auth = AuthSettings(jwt_secret=JWT_SECRET)
    tokens = [mint_token(auth, user, DEVICE, 3600) for user in work.users]
    probe_token = mint_token(auth, "probe", DEVICE, 3600)
    results: dict[str, list[Sample]] = {"batched": [], "unbatched": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_presence-") as tmp:
        for run in range(args.runs):
            # Alternate the order so that drift over the invocation hits both modes alike.
            order = MODES if run % 2 == 0 else MODES[::-1]
            for mode, batch_ms in order:
                batch = args.batch_ms if batch_ms is None else batch_ms
                results[mode].append(
                    run_one(Path(tmp), args, work, tokens, probe_token, run, mode, batch)
                )
    summary = report(args, results)
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": host,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "samples": {m: [asdict(s) for s in ss] for m, ss in results.items()},
                    "summary": summary,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

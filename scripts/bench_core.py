"""Core benchmark of the gateway: routing, latency, idle memory, backlog drain, handshakes,
and CPU per unit of work at a fixed rate.

Run it from the repository root:

    python -m scripts.bench_core            # full: 3 runs of every scenario
    python -m scripts.bench_core --quick    # one small, fast run
    python -m scripts.bench_core --quick --only rate --baseline-commit 9195dc8

The gateway under test runs in its own OS process (``python -m gateway.cli serve`` with a
temporary TOML file and SQLite file on a free loopback port). The load generator is this
script's main process. A baseline server runs the same scenarios in the same invocation:

- by default the *floor*: the same gateway on ``[store] backend = "memory"`` (queues in
  process memory, not durable), which shows what the gateway costs without a store's I/O;
- with ``--baseline-commit REV``, the gateway as it was at git commit REV instead (add
  ``--with-floor`` to run the floor as well): REV is checked out with ``git worktree add
  --detach`` into a temporary directory outside the repository, and that gateway is
  started with the same Python and ``PYTHONPATH=<worktree>``, so that ``-m gateway.cli``
  imports the worktree's packages (checked once: the script prints where ``gateway``
  comes from for each side). The worktree is removed (``git worktree remove --force``) on
  the way out. The summary then prints, next to the medians, the ratio new / baseline for
  every figure.

Each scenario gets a fresh server process. A server that does not start is reported, that
side is skipped for the rest of the invocation, and the exit status is 1.

Scenarios (defaults; ``--quick`` shrinks them; ``--only`` names them):

1. ``route``: routed durable messages/s between online devices: 500 senders -> 500
   receivers, 200-byte bodies, each sender keeps at most ``--window`` sends without a
   ``sent`` outstanding, receivers ack every delivery and senders ack every receipt;
2. ``latency``: p50/p99 send -> arrival latency at half the gateway's median rate from (1),
   paced;
3. ``idle``: VmRSS growth per idle authenticated connection, 10,000 connections;
4. ``drain``: hello -> ``drained`` time for a backlog of 10,000 queued messages, acking as
   it goes;
5. ``hs``: connect + hello + welcome + close per second, with ``--handshake-concurrency`` at
   once;
6. ``rate``: CPU per unit of work at a fixed rate below saturation, which stays steady from
   run to run where saturated rates on a shared machine do not. (a) ``--rate-total`` msgs/s
   in total (default 1,500: ``--rate-pairs`` 40 senders -> 40 receivers, 37.5/s each), one
   ``send`` per WebSocket message, each on its own schedule whatever the answers (open
   loop, so that every run and every server gets the same work; at most ``--window``
   unanswered); each receiver acks every ``msg`` on its own, in its own WebSocket message,
   and each sender acks every ``receipt`` the same way. Over ``--duration`` s after
   ``--warmup`` s: the server process's CPU (user + sys of all its threads, /proc/PID/stat)
   per routed message in microseconds (CPU seconds / ``msg`` frames delivered in the
   window), the achieved rate and p50/p99 send -> arrival latency. A server that does not
   keep up (achieved below 97% of the rate, messages missing, p50 above 20 ms, or a core at
   ~100%) is flagged: CPU per message falls as batching grows near saturation, so such a
   figure is not comparable; lower ``--rate-total``. (b) Then, on the same server with the
   load stopped, ``--reconnect-pool`` known devices (each said hello once before, untimed)
   reconnect one after another at ``--reconnect-rate``/s (default 100), at most
   ``--reconnect-concurrency`` at once, ``--reconnect-rate`` x ``--duration`` times:
   upgrade, ``hello``, wait for ``welcome`` and ``drained``, close handshake. Reported: the
   server's CPU per reconnect in milliseconds (CPU from the first reconnect until 0.25 s
   after the last / reconnects completed).
7. ``group``: fan-out of one message to a group of M members with 2 devices each (M in
   ``--group-sizes``, default 16, 256, 1024), every device online and acking each
   delivery; the sender's other device is a recipient, the sending device is not. Per
   size, ``--group-messages`` group sends (``send`` with ``group``, ``--group-body``
   bytes) alternate with the same fan-out done the v1 way, one ``send`` per member
   (pipelined, each in its own WebSocket message; done when the last ``sent`` arrived).
   Each fan-out starts once the previous one has settled (every device's delivered
   receipt is back at the sender), so each is measured at rest, not queued behind the
   acks and receipts of the one before. Reported for each: send -> ``sent`` p50/p99,
   send -> the last member device's ``msg`` p50/p99, deliveries per second (devices
   reached / fan-out time), and store bytes per message: the SQLite file's used pages
   (page_count - freelist_count) grown by a few fan-outs whose items are held unacked
   (not measured on the floor, whose store is memory). Targets, for 1,024 members:
   ``sent`` p99 <= 50 ms, last device <= 250 ms p99, >= 10x fewer stored bytes than the
   v1 way.

Only 127.0.0.1 is used. Every loop is bounded in count and time, and every server process
this script starts is stopped on the way out, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from gateway.auth import mint_token
from gateway.settings import Settings
from scripts.kit import procfs
from scripts.kit.child_process import ChildProcess, ProcessFailed
from scripts.kit.gateway_process import GatewayProcess
from scripts.kit.lean_client import MAX_LOOP, PONG, RECEIVE_BUFFER, SUBPROTOCOL, LeanClient
from scripts.kit.limits import raise_fd_limit
from scripts.kit.loopback import HOST, free_port
from scripts.kit.route_bench import apply_quick, print_machine, scales_line

BODY_BYTES = 200
CLIENT_MAX_MESSAGE = 16 * 1024 * 1024
CONNECT_TIMEOUT = 30.0
# Scenario 6: a median send -> arrival latency above this means messages queue in the
# server, which then batches more and spends less CPU per message: not "below saturation".
RATE_QUEUEING_P50_MS = 20.0

Frame = dict[str, Any]


# ---- targets and results ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    unit: str
    op: str  # ">=" or "<="
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


TARGETS = (
    Target("msgs_per_s", "routed durable msgs/s", "msg/s", ">=", 8000),
    Target("p99_ms", "p99 latency @ half rate", "ms", "<=", 25),
    Target("rss_kb_per_conn", "RSS per idle connection", "KB", "<=", 12),
    Target("drain_s", "drain 10k backlog", "s", "<=", 1.0),
    Target("handshakes_per_s", "handshakes + hello/s", "conn/s", ">=", 2000),
)


@dataclass(frozen=True)
class Row:
    """One line of the summary: a figure of one scenario, with or without a target."""

    key: str
    label: str
    unit: str
    scenario: str
    field: str | None = None  # None: Sample.value; else a key of Sample.extra
    target: Target | None = None


ROWS = (
    *(
        Row(t.key, t.label, t.unit, scenario, None, t)
        for t, scenario in zip(TARGETS, ("route", "latency", "idle", "drain", "hs"), strict=True)
    ),
    Row("rate_routed_per_s", "routed msgs/s @ fixed rate", "msg/s", "rate", "routed_per_s"),
    Row("cpu_us_per_msg", "CPU per routed msg @ rate", "µs", "rate"),
    Row("rate_p50_ms", "p50 latency @ fixed rate", "ms", "rate", "p50_ms"),
    Row("rate_p99_ms", "p99 latency @ fixed rate", "ms", "rate", "p99_ms"),
    Row("cpu_ms_per_reconnect", "CPU per reconnect", "ms", "rate", "reconnect_cpu_ms"),
)
SCENARIOS = ("route", "latency", "idle", "drain", "hs", "rate", "group")
# Scenario 7: the backend API key of every server under test (loopback only), and the
# figures it reports for the largest group size, with the targets.
BENCH_API_KEY = "bench-core-admin-key"
GROUP_ROWS = (
    Row("group_sent_p99_ms", "group: sent p99, largest", "ms", "group",
        "group_sent_p99_ms", Target("group_sent_p99_ms", "", "ms", "<=", 50)),
    Row("group_last_p99_ms", "group: last device p99, largest", "ms", "group",
        "group_last_p99_ms", Target("group_last_p99_ms", "", "ms", "<=", 250)),
    Row("group_read_p99_ms", "group: last read by the generator p99", "ms", "group",
        "group_read_p99_ms"),
    Row("v1_sent_p99_ms", "v1: sent p99, largest", "ms", "group", "v1_sent_p99_ms"),
    Row("v1_last_p99_ms", "v1: last device p99, largest", "ms", "group",
        "v1_last_p99_ms"),
    Row("group_store_ratio", "store bytes v1/group, largest", "x", "group",
        "store_ratio", Target("group_store_ratio", "", "x", ">=", 10)),
)  # fmt: skip
ROWS = (*ROWS, *GROUP_ROWS)


@dataclass
class Usage:
    """CPU use over a measured window, as fractions of one core."""

    wall: float
    server: float
    server_main: float
    generator: float


@dataclass
class Sample:
    """One measurement of one scenario on one server kind."""

    value: float
    usage: Usage | None = None
    extra: dict[str, float] = field(default_factory=dict)


# ---- processes and /proc ---------------------------------------------------------------


class Meter:
    """CPU of the server process (and its main thread) and of this process, over a window."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._t0 = self._g0 = self._s0 = self._m0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._g0 = time.process_time()
        self._s0 = procfs.cpu_seconds(self.pid)
        self._m0 = procfs.cpu_seconds(self.pid, self.pid)

    def stop(self) -> Usage:
        wall = time.perf_counter() - self._t0
        return Usage(
            wall=wall,
            server=(procfs.cpu_seconds(self.pid) - self._s0) / wall,
            server_main=(procfs.cpu_seconds(self.pid, self.pid) - self._m0) / wall,
            generator=(time.process_time() - self._g0) / wall,
        )


class ServerStartError(RuntimeError):
    """A server under test could not be started."""


def server_env(kind: str, args: argparse.Namespace) -> dict[str, str]:
    """Variables a server of `kind` gets on top of ours: for ``baseline``, the baseline
    worktree first on PYTHONPATH."""
    if kind != "baseline":
        return {}
    tree = getattr(args, "baseline_tree", None)
    if tree is None:
        raise RuntimeError("kind 'baseline' needs --baseline-commit")
    return {"PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.getenv("PYTHONPATH")])])}


def gateway_origin(kind: str, args: argparse.Namespace, cwd: Path) -> str:
    """The file `import gateway` finds in a server of `kind` (same Python, env and cwd)."""
    done = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **server_env(kind, args)},
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise ServerStartError(f"{kind}: `import gateway` failed:\n{done.stderr[-2000:]}")
    return str(Path(done.stdout.strip()).resolve())


class ServerProcess:
    """The gateway (``kind="gateway"``), the gateway of ``--baseline-commit``
    (``kind="baseline"``) or the gateway on the memory store (``kind="floor"``), in its own
    OS process."""

    def __init__(self, kind: str, workdir: Path, args: argparse.Namespace, tag: str) -> None:
        self.kind = kind
        self.dir = workdir / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.process = self.launch()

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.process.port}/ws"

    @property
    def pid(self) -> int:
        return self.process.pid

    def meter(self) -> Meter:
        """What measures the CPU of the server under test."""
        return Meter(self.pid)

    def launch(self) -> ChildProcess:
        """The server's process, not started yet."""
        launcher = ["-m", "gateway.cli"]  # the baseline: its worktree, by PYTHONPATH
        if self.args.gateway_launcher and self.kind == "gateway":
            launcher = [str(Path(self.args.gateway_launcher).resolve())]
        store = f'path = "{self.dir / "gateway.db"}"\nsynchronous = "{self.args.synchronous}"'
        if self.kind == "floor":  # this tree's gateway, its queues in memory
            store = 'backend = "memory"'
        self.admin_url = f"http://{HOST}:{(admin_port := free_port())}"
        admin = {"GATEWAY__ADMIN__PORT": str(admin_port), "GATEWAY__ADMIN__API_KEY": BENCH_API_KEY}
        return GatewayProcess(
            self.dir,
            store=store,
            log_level=self.args.log_level,
            env={**server_env(self.kind, self.args), **admin},
            launcher=launcher,
            cwd=self.dir,  # not the repository: the baseline's `gateway` must come first
        )

    def start(self) -> None:
        _LIVE.add(self)
        try:
            self.process.start()
        except ProcessFailed as exc:
            raise ServerStartError(str(exc)) from None

    def stop(self) -> None:
        _LIVE.discard(self)
        self.process.stop(grace=5)

    def log_tail(self, lines: int = 20) -> str:
        return self.process.log_tail(lines)

    def warnings(self) -> list[str]:
        """Log lines at WARNING or above, for the run report."""
        return self.process.warnings() if isinstance(self.process, GatewayProcess) else []


_LIVE: set[ServerProcess] = set()


def stop_all_servers() -> None:
    for server in list(_LIVE):
        server.stop()


@contextlib.contextmanager
def running(
    kind: str, workdir: Path, args: argparse.Namespace, tag: str
) -> Iterator[ServerProcess]:
    server = ServerProcess(kind, workdir, args, tag)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _git(repo: Path, *argv: str, timeout: float = 120) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


class BaselineTree:
    """A git worktree of ``--baseline-commit`` in a temporary directory outside the
    repository: ``git worktree add --detach``, and ``git worktree remove --force`` after."""

    def __init__(self, rev: str) -> None:
        self.repo = Path(_git(Path(__file__).resolve().parent, "rev-parse", "--show-toplevel"))
        self.commit = _git(self.repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        self.short = _git(self.repo, "rev-parse", "--short", self.commit)
        self.subject = _git(self.repo, "log", "-1", "--format=%s", self.commit)
        self.tmp: Path | None = None
        self.path: Path | None = None

    def create(self) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_core_base_{self.short}_")).resolve()
        self.tmp = tmp
        if tmp.is_relative_to(self.repo):
            raise RuntimeError(f"the temp dir {tmp} is inside the repository {self.repo}")
        path = tmp / "tree"
        self.path = path  # set first: remove() cleans up after a half-done add too
        _git(self.repo, "worktree", "add", "--detach", str(path), self.commit, timeout=300)
        return path

    def remove(self) -> None:
        path, self.path = self.path, None
        tmp, self.tmp = self.tmp, None
        if path is not None:
            try:
                _git(self.repo, "worktree", "remove", "--force", str(path))
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                print(f"  !! removing the baseline worktree: {exc}", file=sys.stderr)
                with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
                    shutil.rmtree(path, ignore_errors=True)
                    _git(self.repo, "worktree", "prune")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- load generator helpers --------------------------------------------------------------


def frames_of(message: bytes | str) -> list[Frame]:
    if isinstance(message, str):
        return []
    item = cbor2.loads(message)
    return item if isinstance(item, list) else [item]


def encode(frame: Frame) -> bytes:
    return cbor2.dumps(frame)


class Tokens:
    """Development tokens for the default auth settings, minted before any timing."""

    def __init__(self) -> None:
        self._auth = Settings().auth

    def of(self, user: str, device: str) -> str:
        """A token for one device."""
        return mint_token(self._auth, user, device)

    def many(self, prefix: str, count: int) -> list[tuple[str, str]]:
        """[(user, token)]: user ``prefix-i`` with device ``phone``."""
        users = [f"{prefix}-{i}" for i in range(count)]
        return [(u, mint_token(self._auth, u, "phone")) for u in users]


Wire = WebSocketConnection | LeanClient
CLIENT = {"kind": "lean"}


async def connect(nursery: trio.Nursery, url: str) -> Wire:
    """A connection to the server under test, with the client chosen by ``--client``."""
    with trio.fail_after(CONNECT_TIMEOUT):
        if CLIENT["kind"] == "lean":
            return await LeanClient.open(url)
        return await connect_websocket_url(
            nursery,
            url,
            subprotocols=[SUBPROTOCOL],
            max_message_size=CLIENT_MAX_MESSAGE,
            receive_buffer_size=RECEIVE_BUFFER,
        )


async def hello(ws: Wire, token: str, *, until: str = "drained") -> Frame:
    """Send hello; return the welcome once `until` (``welcome`` or ``drained``) arrived."""
    await ws.send_message(encode({"t": "hello", "v": 1, "token": token}))
    welcome: Frame | None = None
    with trio.fail_after(CONNECT_TIMEOUT):
        for _ in range(MAX_LOOP):
            sids: list[int] = []
            for f in frames_of(await ws.get_message()):
                kind = f.get("t")
                if kind == "welcome":
                    welcome = f
                    if until == "welcome":
                        return f
                elif kind in ("msg", "receipt"):
                    sids.append(f["sid"])
                elif kind == "drained" and welcome is not None:
                    return welcome
            if sids:
                await ws.send_message(encode({"t": "ack", "sids": sids}))
    raise RuntimeError("no welcome")


async def open_many(
    nursery: trio.Nursery, url: str, tokens: Sequence[tuple[str, str]], concurrency: int
) -> list[Wire]:
    """Connect and authenticate every device (hello -> drained), `concurrency` at a time."""
    result: list[Wire | None] = [None] * len(tokens)
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int, token: str) -> None:
        async with limiter:
            ws = await connect(nursery, url)
            await hello(ws, token)
            result[i] = ws

    async with trio.open_nursery() as opening:
        for i, (_, token) in enumerate(tokens):
            opening.start_soon(one, i, token)
    return [ws for ws in result if ws is not None]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---- scenario 1 and 2: routed messages ------------------------------------------------------


@dataclass
class RouteState:
    stop: bool = False
    delivered: int = 0
    sent_ok: int = 0
    errors: int = 0
    closed: int = 0
    send_times: list[float] = field(default_factory=list)  # paced mode only
    lateness: list[float] = field(default_factory=list)  # paced mode only
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (t_send, latency)


async def _route_receiver(ws: Wire, st: RouteState, *, ack_each: bool = False) -> None:
    """Ack the ``msg`` frames of each WebSocket message in one ``ack``, or (`ack_each`)
    every ``msg`` on its own, in its own WebSocket message, as phones do."""
    try:
        for _ in range(MAX_LOOP):
            message = await ws.get_message()
            now = trio.current_time()
            sids: list[int] = []
            for f in frames_of(message):
                if f["t"] == "msg":
                    sids.append(f["sid"])
                    t_send = struct.unpack_from("<d", f["body"])[0]
                    st.arrivals.append((t_send, now - t_send))
            st.delivered += len(sids)
            batches = [[sid] for sid in sids] if ack_each else [sids] if sids else []
            for acked in batches:
                await ws.send_message(encode({"t": "ack", "sids": acked}))
    except ConnectionClosed:
        st.closed += 1


async def _route_sender(
    ws: Wire,
    to: str,
    st: RouteState,
    window: int,
    pad: bytes,
    first_at: float,
    interval: float | None,
    max_sends: int,
) -> None:
    room = trio.Semaphore(window)

    async def replies() -> None:
        for _ in range(MAX_LOOP):
            sids: list[int] = []
            for f in frames_of(await ws.get_message()):
                kind = f["t"]
                if kind == "sent":
                    st.sent_ok += 1
                    room.release()
                elif kind == "receipt":
                    sids.append(f["sid"])
                elif kind == "error":
                    st.errors += 1
                    if "ref" in f:
                        room.release()
            if sids:
                await ws.send_message(encode({"t": "ack", "sids": sids}))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replies)
            await trio.sleep_until(first_at)
            for n in range(max_sends):
                if interval is not None:
                    await trio.sleep_until(first_at + n * interval)
                await room.acquire()
                if st.stop:
                    break
                now = trio.current_time()
                body = struct.pack("<d", now) + pad
                await ws.send_message(encode({"t": "send", "id": f"m{n}", "to": to, "body": body}))
                if interval is not None:
                    st.send_times.append(now)
                    st.lateness.append(now - (first_at + n * interval))
            nursery.cancel_scope.cancel()
    except* ConnectionClosed:
        st.closed += 1


async def scenario_route(
    server: ServerProcess,
    tokens: Tokens,
    args: argparse.Namespace,
    rate: float | None,
) -> Sample:
    """Scenario 1 (``rate`` None: saturation) or 2 (paced at ``rate`` msgs/s in total)."""
    pairs = args.pairs
    pad = random.Random(1).randbytes(BODY_BYTES - 8)
    receivers = tokens.many("rx", pairs)
    senders = tokens.many("tx", pairs)
    st = RouteState()
    meter = server.meter()
    hard_limit = args.warmup + args.duration + 120
    with trio.fail_after(hard_limit):
        async with trio.open_nursery() as nursery:
            rx = await open_many(nursery, server.url, receivers, args.connect_concurrency)
            tx = await open_many(nursery, server.url, senders, args.connect_concurrency)
            if len(rx) != pairs or len(tx) != pairs:
                raise RuntimeError(f"only {len(rx)}+{len(tx)} of {2 * pairs} devices connected")
            start = trio.current_time() + 0.2
            interval = None if rate is None else pairs / rate
            total_time = args.warmup + args.duration + 1
            for ws in rx:
                nursery.start_soon(_route_receiver, ws, st)
            for i, ws in enumerate(tx):
                if interval is None:
                    first_at, max_sends = start, 10_000_000
                else:
                    first_at = start + i * interval / pairs
                    max_sends = int(total_time / interval) + 1
                to = receivers[i][0]
                nursery.start_soon(
                    _route_sender, ws, to, st, args.window, pad, first_at, interval, max_sends
                )
            await trio.sleep_until(start + args.warmup)
            t0 = trio.current_time()
            meter.start()
            d0, s0 = st.delivered, st.sent_ok
            await trio.sleep(args.duration)
            usage = meter.stop()
            t1 = trio.current_time()
            d1, s1 = st.delivered, st.sent_ok
            st.stop = True
            await trio.sleep(2.0 if rate is not None else 0.1)  # in-flight arrivals
            nursery.cancel_scope.cancel()
    measured = t1 - t0
    in_window = [lat for ts, lat in st.arrivals if t0 <= ts < t1]
    extra: dict[str, float] = {
        "sent_per_s": (s1 - s0) / measured,
        "errors": st.errors,
        "closed": st.closed,
    }
    if rate is None:
        extra["p50_ms_at_saturation"] = percentile(in_window, 0.5) * 1000
        extra["p99_ms_at_saturation"] = percentile(in_window, 0.99) * 1000
        return Sample((d1 - d0) / measured, usage, extra)
    sent_in_window = sum(1 for ts in st.send_times if t0 <= ts < t1)
    missing = max(0, sent_in_window - len(in_window))
    samples = in_window + [math.inf] * missing  # not arrived within 2 s: counted as worst
    extra.update(
        offered_per_s=rate,
        achieved_per_s=sent_in_window / measured,
        p50_ms=percentile(samples, 0.5) * 1000,
        missing=missing,
        sender_lateness_p99_ms=percentile(st.lateness, 0.99) * 1000,
        samples=len(samples),
    )
    return Sample(percentile(samples, 0.99) * 1000, usage, extra)


# ---- scenario 3: idle connections ------------------------------------------------------------


async def scenario_idle(server: ServerProcess, tokens: Tokens, args: argparse.Namespace) -> Sample:
    warm = tokens.many("warm", 100)
    idle = tokens.many("idle", args.idle_conns)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await open_many(nursery, server.url, warm, args.connect_concurrency)
            nursery.cancel_scope.cancel()
        await trio.sleep(1.0)
        rss0 = procfs.rss_kib(server.pid)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            conns = await open_many(nursery, server.url, idle, args.connect_concurrency)
            opened = time.perf_counter() - t0
            await trio.sleep(2.0)  # let transient buffers go
            rss1 = procfs.rss_kib(server.pid)
            fds = procfs.fd_count(server.pid)
            nursery.cancel_scope.cancel()
    if len(conns) != len(idle):
        raise RuntimeError(f"only {len(conns)} of {len(idle)} idle connections opened")
    extra = {
        "rss_before_mb": rss0 / 1024,
        "rss_after_mb": rss1 / 1024,
        "server_fds": fds,
        "open_seconds": opened,
    }
    return Sample((rss1 - rss0) / len(conns), None, extra)


# ---- scenario 4: backlog drain ----------------------------------------------------------------


async def scenario_drain(server: ServerProcess, tokens: Tokens, args: argparse.Namespace) -> Sample:
    ((rx_user, rx_token),) = tokens.many("drain-rx", 1)
    ((_, tx_token),) = tokens.many("drain-tx", 1)
    n = args.backlog
    pad = random.Random(2).randbytes(BODY_BYTES - 8)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:  # make the receiver known, then offline
            ws = await connect(nursery, server.url)
            await hello(ws, rx_token)
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:  # queue the backlog
            ws = await connect(nursery, server.url)
            await hello(ws, tx_token)
            room = trio.Semaphore(256)
            done = trio.Event()
            answered = 0

            async def replies() -> None:
                nonlocal answered
                for _ in range(MAX_LOOP):
                    for f in frames_of(await ws.get_message()):
                        if f["t"] in ("sent", "error"):
                            answered += 1
                            room.release()
                    if answered >= n:
                        done.set()
                        return

            nursery.start_soon(replies)
            for i in range(n):
                await room.acquire()
                body = struct.pack("<d", 0.0) + pad
                await ws.send_message(
                    encode({"t": "send", "id": f"b{i}", "to": rx_user, "body": body})
                )
            await done.wait()
            nursery.cancel_scope.cancel()
        await trio.sleep(1.0)
        meter = server.meter()
        async with trio.open_nursery() as nursery:
            ws = await connect(nursery, server.url)
            meter.start()
            t0 = trio.current_time()
            await ws.send_message(encode({"t": "hello", "v": 1, "token": rx_token}))
            queued = received = 0
            first_msg = math.nan
            t1 = math.nan
            for _ in range(MAX_LOOP):
                message = await ws.get_message()
                sids: list[int] = []
                finished = False
                for f in frames_of(message):
                    kind = f["t"]
                    if kind == "welcome":
                        queued = f["queued"]
                    elif kind == "msg":
                        sids.append(f["sid"])
                    elif kind == "drained":
                        finished = True
                if sids:
                    if not received:
                        first_msg = trio.current_time() - t0
                    received += len(sids)
                    await ws.send_message(encode({"t": "ack", "sids": sids}))
                if finished:
                    t1 = trio.current_time()
                    break
            usage = meter.stop()
            nursery.cancel_scope.cancel()
    if received != n or queued != n:
        raise RuntimeError(f"drain: queued {queued}, received {received}, expected {n}")
    extra = {"first_msg_ms": first_msg * 1000, "msgs_per_s": n / (t1 - t0)}
    return Sample(t1 - t0, usage, extra)


# ---- scenario 5: handshakes --------------------------------------------------------------------


async def _handshake(url: str, token: str, until: str = "welcome") -> bool:
    """Connect, hello, wait for `until` (``welcome`` or ``drained``), close handshake."""
    ok = False
    try:
        async with trio.open_nursery() as nursery:
            ws = await connect(nursery, url)
            await hello(ws, token, until=until)
            await ws.aclose()
            nursery.cancel_scope.cancel()
            ok = True
    except* (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError):
        pass
    return ok


async def scenario_handshakes(
    server: ServerProcess, tokens: Tokens, args: argparse.Namespace
) -> Sample:
    c = args.handshake_concurrency
    pool = tokens.many("hs", c * max(1, args.handshake_pool // c))
    total = args.handshakes
    failures = 0

    async def worker(w: int, rounds: int, counts: list[int]) -> None:
        nonlocal failures
        mine = pool[w::c]  # each device belongs to one worker: no two live at once
        for r in range(rounds):
            if await _handshake(server.url, mine[r % len(mine)][1]):
                counts[0] += 1
            else:
                failures += 1

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:  # known devices, warmed up (untimed)
            for w in range(c):
                nursery.start_soon(worker, w, len(pool) // c, [0])
        failures = 0
        await trio.sleep(0.5)
        meter = server.meter()
        counts = [0]
        meter.start()
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(c):
                nursery.start_soon(worker, w, total // c, counts)
        elapsed = time.perf_counter() - t0
        usage = meter.stop()
    return Sample(counts[0] / elapsed, usage, {"failures": failures, "completed": counts[0]})


# ---- scenario 6: CPU per unit of work at a fixed rate ----------------------------------------


@dataclass
class RateState(RouteState):
    receipts: int = 0


async def _rate_sender(
    ws: Wire, to: str, st: RateState, pad: bytes, first_at: float, interval: float, count: int,
    window: int,
) -> None:  # fmt: skip
    """One ``send`` per WebSocket message every `interval` s, whatever the answers (open
    loop), with at most `window` unanswered; every ``receipt`` acked on its own."""
    answered = trio.Semaphore(window)

    async def replies() -> None:
        for _ in range(MAX_LOOP):
            for f in frames_of(await ws.get_message()):
                kind = f["t"]
                if kind == "sent":
                    st.sent_ok += 1
                    answered.release()
                elif kind == "receipt":
                    st.receipts += 1
                    await ws.send_message(encode({"t": "ack", "sids": [f["sid"]]}))
                elif kind == "error":
                    st.errors += 1
                    if "ref" in f:
                        answered.release()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replies)
            for n in range(count):
                due = first_at + n * interval
                await trio.sleep_until(due)
                await answered.acquire()
                if st.stop:
                    break
                now = trio.current_time()
                body = struct.pack("<d", now) + pad
                await ws.send_message(encode({"t": "send", "id": f"r{n}", "to": to, "body": body}))
                st.send_times.append(now)
                st.lateness.append(now - due)
            nursery.cancel_scope.cancel()
    except* ConnectionClosed:
        st.closed += 1


async def _close_all(conns: Sequence[Wire]) -> None:
    """Close handshakes of all `conns` at once, bounded to 5 s in all."""
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            for ws in conns:
                nursery.start_soon(_close_quietly, ws)


async def _close_quietly(ws: Wire) -> None:
    with contextlib.suppress(ConnectionClosed, OSError, trio.BrokenResourceError):
        await ws.aclose()


async def _reconnects(
    server: ServerProcess, tokens: Tokens, args: argparse.Namespace
) -> dict[str, float]:
    """Known devices reconnect one after another at a fixed rate: CPU per reconnect."""
    c = max(1, args.reconnect_concurrency)
    rate = args.reconnect_rate
    pool = tokens.many("rc", c * max(1, math.ceil(args.reconnect_pool / c)))
    total = max(c, round(rate * args.duration))
    durations: list[float] = []
    lateness: list[float] = []
    failures = 0

    async def known(token: str, limiter: trio.CapacityLimiter) -> None:
        nonlocal failures
        async with limiter:
            if not await _handshake(server.url, token, until="drained"):
                failures += 1

    async def worker(w: int, start: float) -> None:
        nonlocal failures
        for k in range(w, total, c):  # device k % len(pool) belongs to worker w only
            due = start + k / rate
            await trio.sleep_until(due)
            began = trio.current_time()
            lateness.append(began - due)
            if await _handshake(server.url, pool[k % len(pool)][1], until="drained"):
                durations.append(trio.current_time() - began)
            else:
                failures += 1

    with trio.fail_after(total / rate + 180):
        limiter = trio.CapacityLimiter(args.connect_concurrency)
        async with trio.open_nursery() as nursery:  # every device says hello once (untimed)
            for _, token in pool:
                nursery.start_soon(known, token, limiter)
        if failures:
            raise RuntimeError(f"reconnect: {failures} of {len(pool)} first hellos failed")
        await trio.sleep(1.0)
        meter = server.meter()
        meter.start()
        start = trio.current_time() + 0.05
        async with trio.open_nursery() as nursery:
            for w in range(c):
                nursery.start_soon(worker, w, start)
        finished = trio.current_time()
        await trio.sleep(0.25)  # the server's last disconnects finish
        usage = meter.stop()
    done = len(durations)
    return {
        "reconnect_cpu_ms": usage.server * usage.wall / done * 1000 if done else math.nan,
        "reconnects": done,
        "reconnect_failures": failures,
        "reconnects_offered_per_s": rate,
        "reconnects_per_s": done / (finished - start) if done else 0.0,
        "reconnect_p50_ms": percentile(durations, 0.5) * 1000,
        "reconnect_p99_ms": percentile(durations, 0.99) * 1000,
        "reconnect_lateness_p99_ms": percentile(lateness, 0.99) * 1000,
        "reconnect_server_cores": usage.server,
        "reconnect_generator_cores": usage.generator,
    }


async def scenario_rate(server: ServerProcess, tokens: Tokens, args: argparse.Namespace) -> Sample:
    """Scenario 6: server CPU per routed message at a fixed rate, then per reconnect."""
    pairs = args.rate_pairs
    rate = args.rate_total
    interval = pairs / rate  # between two sends of one sender
    pad = random.Random(3).randbytes(BODY_BYTES - 8)
    receivers = tokens.many("rate-rx", pairs)
    senders = tokens.many("rate-tx", pairs)
    st = RateState()
    meter = server.meter()
    with trio.fail_after(args.warmup + args.duration + 120):
        async with trio.open_nursery() as nursery:
            rx = await open_many(nursery, server.url, receivers, args.connect_concurrency)
            tx = await open_many(nursery, server.url, senders, args.connect_concurrency)
            if len(rx) != pairs or len(tx) != pairs:
                raise RuntimeError(f"only {len(rx)}+{len(tx)} of {2 * pairs} devices connected")
            start = trio.current_time() + 0.2
            count = int((args.warmup + args.duration + 3) / interval) + 1
            async with trio.open_nursery() as load:
                for ws in rx:
                    load.start_soon(partial(_route_receiver, ack_each=True), ws, st)
                for i, ws in enumerate(tx):
                    first_at = start + i * interval / pairs  # spread evenly over the interval
                    load.start_soon(
                        _rate_sender, ws, receivers[i][0], st, pad, first_at, interval, count,
                        args.window,
                    )  # fmt: skip
                await trio.sleep_until(start + args.warmup)
                t0 = trio.current_time()
                meter.start()
                user0, sys0 = procfs.cpu_split(server.pid)
                d0, s0 = st.delivered, st.sent_ok
                await trio.sleep(args.duration)
                usage = meter.stop()
                user1, sys1 = procfs.cpu_split(server.pid)
                t1 = trio.current_time()
                d1, s1 = st.delivered, st.sent_ok
                st.stop = True
                await trio.sleep(2.0)  # in-flight arrivals
                load.cancel_scope.cancel()
            await _close_all(rx + tx)
            nursery.cancel_scope.cancel()
    measured = t1 - t0
    routed = d1 - d0
    in_window = [lat for ts, lat in st.arrivals if t0 <= ts < t1]
    sent_in_window = sum(1 for ts in st.send_times if t0 <= ts < t1)
    missing = max(0, sent_in_window - len(in_window))
    samples = in_window + [math.inf] * missing  # not arrived within 2 s: counted as worst
    cpu = usage.server * usage.wall
    extra: dict[str, float] = {
        "offered_per_s": rate,
        "routed": routed,
        "routed_per_s": routed / measured,
        "sent_per_s": (s1 - s0) / measured,
        "server_cpu_s": cpu,
        "server_user_s": user1 - user0,
        "server_sys_s": sys1 - sys0,
        "p50_ms": percentile(samples, 0.5) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
        "missing": missing,
        "samples": len(samples),
        "sender_lateness_p99_ms": percentile(st.lateness, 0.99) * 1000,
        "errors": st.errors,
        "closed": st.closed,
    }
    await trio.sleep(1.0)
    extra.update(await _reconnects(server, tokens, args))
    return Sample(cpu / routed * 1e6 if routed else math.nan, usage, extra)


# ---- scenario 7: group fan-out against one send per member -----------------------------------


@dataclass
class Fanout:
    """What the receivers of scenario 7 saw: per fan-out key, devices still to reach."""

    left: dict[str, int] = field(default_factory=dict)
    done: dict[str, trio.Event] = field(default_factory=dict)
    last_at: dict[str, float] = field(default_factory=dict)
    # per key, the latest kernel arrival stamp (wall clock) of a member device's `msg`
    arrived: dict[str, float] = field(default_factory=dict)
    hold: bool = False  # leave deliveries unacked (while the store's size is measured)
    errors: int = 0
    receipts_left: dict[str, int] = field(default_factory=dict)  # at the sending device
    settled: dict[str, trio.Event] = field(default_factory=dict)

    def expect(self, key: str, devices: int) -> trio.Event:
        self.left[key] = devices
        self.done[key] = event = trio.Event()
        self.receipts_left[key] = devices
        self.settled[key] = trio.Event()
        return event

    def receipt(self, msg_id: str) -> None:
        key = _fanout_key(msg_id)
        left = self.receipts_left.get(key, 0) - 1
        self.receipts_left[key] = left
        if left == 0:
            self.settled[key].set()


async def _ack(ws: Wire, sids: list[int]) -> None:
    """Ack `sids`, in as few `ack` frames as the per-frame limit allows."""
    for start in range(0, len(sids), 1000):
        await ws.send_message(encode({"t": "ack", "sids": sids[start : start + 1000]}))


def _fanout_key(msg_id: str) -> str:
    """A per-member send's id is ``KEY~N``; a group send's is ``KEY``."""
    return msg_id.split("~", 1)[0]


async def _fanout_receiver(ws: Wire, st: Fanout) -> None:
    with contextlib.suppress(ConnectionClosed):
        for _ in range(MAX_LOOP):
            message = await ws.get_message()
            now = trio.current_time()
            sids: list[int] = []
            for f in frames_of(message):
                kind = f.get("t")
                if kind in ("msg", "receipt", "group"):
                    sids.append(f["sid"])
                if kind == "msg":
                    key = _fanout_key(f["id"])
                    arrived = getattr(ws, "arrived_at", math.nan)
                    if not arrived <= st.arrived.get(key, -math.inf):
                        st.arrived[key] = arrived
                    left = st.left.get(key, 0) - 1
                    st.left[key] = left
                    if left == 0:
                        st.last_at[key] = now
                        st.done[key].set()
            if sids and not st.hold:
                await _ack(ws, sids)


async def _fanout_sender_replies(ws: Wire, answered: dict[str, trio.Event], st: Fanout) -> None:
    """The sending device's reader: `sent` (or an error) per id; receipts acked.

    The acks (and the pongs) go out from a task of their own, so this reader never waits
    on a write: the fan-out's own pipelined sends can fill the socket while the gateway,
    with replies piling up for this device, waits for it to read, and would close it as
    too slow a reader. A close ends the benchmark with an error instead of a wait for ever.
    """
    send_acks, receive_acks = trio.open_memory_channel[list[int] | bytes](math.inf)

    async def acker() -> None:
        with contextlib.suppress(ConnectionClosed):  # the reader reports the close
            async for item in receive_acks:
                if isinstance(item, bytes):
                    await ws.send_message(item, PONG)
                else:
                    await _ack(ws, item)

    async def next_message() -> bytes | str:
        if isinstance(ws, LeanClient):
            return await ws.get_message(on_ping=send_acks.send_nowait)
        return await ws.get_message()  # trio-websocket answers pings from its own task

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acker)
        try:
            for _ in range(MAX_LOOP):
                sids: list[int] = []
                for f in frames_of(await next_message()):
                    kind = f.get("t")
                    if kind in ("sent", "error"):
                        if kind == "error":
                            st.errors += 1
                            if st.errors == 1:
                                print(f"    error: {f.get('code')}: {f.get('reason')}", flush=True)
                        event = answered.get(f.get("id") or f.get("ref", ""))
                        if event is not None:
                            event.set()
                    elif kind in ("msg", "receipt", "group"):
                        sids.append(f["sid"])
                        if kind == "receipt" and f.get("kind") == "delivered":
                            for msg_id in f["ids"]:
                                st.receipt(msg_id)
                if sids:
                    send_acks.send_nowait(sids)
            send_acks.close()
        except ConnectionClosed as exc:
            raise RuntimeError(f"the sending device's connection closed: {exc}") from None


def _store_bytes(server: ServerProcess) -> float:
    """Bytes in use in the server's SQLite file (WAL included); NaN on the floor."""
    if server.kind == "floor":
        return math.nan
    import sqlite3

    conn = sqlite3.connect(server.dir / "gateway.db", timeout=30)
    try:
        pages, free, size = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_count", "freelist_count", "page_size")
        )
    finally:
        conn.close()
    return float((pages - free) * size)


async def _quiet_store_bytes(server: ServerProcess) -> float:
    """`_store_bytes` once the store has stopped changing: the acks of earlier fan-outs
    (sent by the receivers as they read) commit a little after the last delivery."""
    last = await trio.to_thread.run_sync(_store_bytes, server)
    for _ in range(100):
        await trio.sleep(0.3)
        now = await trio.to_thread.run_sync(_store_bytes, server)
        if now == last or math.isnan(now):
            return now
        last = now
    return last


async def scenario_group(server: ServerProcess, tokens: Tokens, args: argparse.Namespace) -> Sample:
    import httpx

    sizes = sorted(args.group_sizes)
    users = [f"gm-{i}" for i in range(max(sizes))]
    sender_user = users[0]
    body = random.Random(7).randbytes(args.group_body)
    st = Fanout()
    answered: dict[str, trio.Event] = {}
    extra: dict[str, float] = {}
    usage: Usage | None = None
    headers = {"authorization": f"Bearer {BENCH_API_KEY}"}
    async with httpx.AsyncClient(base_url=server.admin_url, timeout=60) as http:
        for size in sizes:
            response = await http.put(
                f"/v1/groups/bench-{size}", json={"members": users[:size]}, headers=headers
            )
            if response.status_code not in (200, 201):
                raise RuntimeError(f"group set-up: {response.status_code} {response.text[:200]}")
    devices = [(u, d) for u in users for d in ("phone", "tablet")]
    receivers = [(u, d) for u, d in devices if (u, d) != (sender_user, "phone")]
    with trio.fail_after(1800):
        async with trio.open_nursery() as nursery:
            sender = await connect(nursery, server.url)
            await hello(sender, tokens.of(sender_user, "phone"))
            conns = await open_many(
                nursery, server.url,
                [(u, tokens.of(u, d)) for u, d in receivers], args.connect_concurrency,
            )  # fmt: skip
            if len(conns) != len(receivers):
                raise RuntimeError(f"only {len(conns)} of {len(receivers)} devices connected")
            nursery.start_soon(_fanout_sender_replies, sender, answered, st)
            for ws in conns:
                if isinstance(ws, LeanClient):
                    ws.stamp_arrivals()
                nursery.start_soon(_fanout_receiver, ws, st)

            async def fan_out(key: str, size: int, group: bool) -> tuple[float, float, float]:
                """One fan-out to the first `size` users: seconds to `sent`, to the last
                device's `msg` in its socket (the kernel's stamp), and to the load
                generator's read of it."""
                done = st.expect(key, 2 * size - 1)
                if group:
                    ids = [key]
                    frames = [{"t": "send", "id": key, "group": f"bench-{size}", "body": body}]
                else:
                    ids = [f"{key}~{n}" for n in range(size)]
                    frames = [
                        {"t": "send", "id": msg_id, "to": users[n], "body": body}
                        for n, msg_id in enumerate(ids)
                    ]
                events = [answered.setdefault(msg_id, trio.Event()) for msg_id in ids]
                t0, wall0 = trio.current_time(), time.time()
                for frame in frames:
                    await sender.send_message(encode(frame))
                for event in events:
                    await event.wait()
                sent_at = trio.current_time()
                await done.wait()
                if not st.hold:  # at rest: the next one starts once every receipt is back
                    await st.settled[key].wait()
                last_read = st.last_at[key] - t0
                arrival = st.arrived.get(key, math.nan) - wall0
                if args.group_trace:
                    print(
                        f"    {key} at {wall0:.3f}: sent {(sent_at - t0) * 1000:.1f} ms,"
                        f" last device {arrival * 1000:.1f} ms, read {last_read * 1000:.1f} ms,"
                        f" settled {(trio.current_time() - t0) * 1000:.1f} ms",
                        flush=True,
                    )
                # Without stamps (another client), the generator's read is the measure.
                return sent_at - t0, last_read if math.isnan(arrival) else arrival, last_read

            for size in sizes:
                for n in range(2):  # warm-up, not measured
                    await fan_out(f"w{size}.{n}", size, True)
                    await fan_out(f"wv{size}.{n}", size, False)
                timings: dict[str, list[tuple[float, float, float]]] = {"group": [], "v1": []}
                meter = server.meter()
                meter.start()
                for n in range(args.group_messages):
                    timings["group"].append(await fan_out(f"g{size}.{n}", size, True))
                    timings["v1"].append(await fan_out(f"v{size}.{n}", size, False))
                usage = meter.stop()  # the last size's is reported
                for mode, triples in timings.items():
                    to_sent = [a for a, _, _ in triples]
                    to_last = [b for _, b, _ in triples]
                    to_read = [c for _, _, c in triples]
                    extra[f"{mode}{size}_sent_p50_ms"] = percentile(to_sent, 0.5) * 1000
                    extra[f"{mode}{size}_sent_p99_ms"] = percentile(to_sent, 0.99) * 1000
                    extra[f"{mode}{size}_last_p50_ms"] = percentile(to_last, 0.5) * 1000
                    extra[f"{mode}{size}_last_p99_ms"] = percentile(to_last, 0.99) * 1000
                    extra[f"{mode}{size}_read_p50_ms"] = percentile(to_read, 0.5) * 1000
                    extra[f"{mode}{size}_read_p99_ms"] = percentile(to_read, 0.99) * 1000
                    extra[f"{mode}{size}_deliveries_per_s"] = (
                        (2 * size - 1) * len(to_last) / sum(to_last)
                    )
                # Store bytes: a few fan-outs whose deliveries stay unacked, so that what
                # each one stored is still there to be counted.
                st.hold = True
                for mode, group in (("group", True), ("v1", False)):
                    before = await _quiet_store_bytes(server)
                    for n in range(args.group_store_messages):
                        await fan_out(f"s{mode}{size}.{n}", size, group)
                    after = await _quiet_store_bytes(server)
                    grown = (after - before) / args.group_store_messages
                    extra[f"{mode}{size}_store_bytes"] = grown
                st.hold = False
            nursery.cancel_scope.cancel()
    largest = sizes[-1]
    for mode in ("group", "v1"):
        for what in ("sent_p99_ms", "last_p99_ms", "read_p99_ms"):
            extra[f"{mode}_{what}"] = extra[f"{mode}{largest}_{what}"]
    group_bytes, v1_bytes = extra[f"group{largest}_store_bytes"], extra[f"v1{largest}_store_bytes"]
    extra["store_ratio"] = v1_bytes / group_bytes if group_bytes > 0 else math.nan
    extra["errors"] = st.errors
    return Sample(extra["group_sent_p99_ms"], usage, extra)


# ---- orchestration -----------------------------------------------------------------------------


Scenario = Callable[[ServerProcess, Tokens, argparse.Namespace], Awaitable[Sample]]
KINDS = ("gateway", "baseline", "floor")


def run_one(
    kind: str, name: str, run: int, workdir: Path, args: argparse.Namespace, tokens: Tokens,
    scenario: Scenario,
) -> Sample:  # fmt: skip
    with running(kind, workdir, args, f"{name}-{kind}-{run}") as server:
        if run == 0 and name == "idle":
            limit = procfs.fd_limit(server.pid)
            print(f"    ({kind} pid {server.pid}, RLIMIT_NOFILE {limit})", flush=True)
        profiler = _start_profiler(args, server, f"{name}-{kind}-{run}")
        try:
            sample: Sample = trio.run(scenario, server, tokens, args)
        except Exception as exc:
            raise ScenarioError(f"{_leaf(exc)}\n{_indent(server.log_tail(8))}") from exc
        finally:
            _stop_profiler(profiler)
        for line in server.warnings()[:5]:
            print(f"    {kind} log: {line}", flush=True)
        return sample


class ScenarioError(RuntimeError):
    """A scenario failed against one server (the others still run)."""


def _leaf(exc: BaseException) -> str:
    """The first innermost exception of `exc`, with where it was raised, on one line."""
    for _ in range(100):
        if not isinstance(exc, BaseExceptionGroup) or not exc.exceptions:
            break
        exc = exc.exceptions[0]
    where = ""
    tb = exc.__traceback__
    for _ in range(1000):
        if tb is None or tb.tb_next is None:
            break
        tb = tb.tb_next
    if tb is not None:
        where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _indent(text: str, prefix: str = "      | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _start_profiler(
    args: argparse.Namespace, server: ServerProcess, tag: str
) -> subprocess.Popen[bytes] | None:
    if not args.profile_dir:
        return None
    out = Path(args.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "--pid", str(server.pid), "--format", "raw", "--rate", "200"]
    command += ["--gil"] if args.profile_mode == "gil" else ["--threads"]
    command += ["--output", str(out / f"{tag}-{args.profile_mode}.txt")]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is None:
        return
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(timeout=20)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait(timeout=5)


def describe(name: str, sample: Sample) -> str:
    if name == "route":
        text = (
            f"{sample.value:,.0f} delivered msg/s (sent {sample.extra['sent_per_s']:,.0f}/s,"
            f" p50 {sample.extra['p50_ms_at_saturation']:.0f} ms /"
            f" p99 {sample.extra['p99_ms_at_saturation']:.0f} ms at saturation)"
        )
    elif name == "latency":
        text = (
            f"p99 {sample.value:.1f} ms, p50 {sample.extra['p50_ms']:.1f} ms at"
            f" {sample.extra['achieved_per_s']:,.0f} msg/s ({int(sample.extra['samples']):,}"
            f" samples, {int(sample.extra['missing'])} missing, sender lateness p99"
            f" {sample.extra['sender_lateness_p99_ms']:.1f} ms)"
        )
    elif name == "idle":
        text = (
            f"{sample.value:.1f} KB/conn (VmRSS {sample.extra['rss_before_mb']:.1f} ->"
            f" {sample.extra['rss_after_mb']:.1f} MB, {int(sample.extra['server_fds']):,} fds,"
            f" opened in {sample.extra['open_seconds']:.1f} s)"
        )
    elif name == "drain":
        text = (
            f"{sample.value:.3f} s hello->drained ({sample.extra['msgs_per_s']:,.0f} msg/s,"
            f" first msg after {sample.extra['first_msg_ms']:.0f} ms)"
        )
    elif name == "rate":
        x = sample.extra
        sys_share = x["server_sys_s"] / max(1e-9, x["server_user_s"] + x["server_sys_s"])
        text = (
            f"{sample.value:,.1f} µs CPU per routed msg ({sys_share:.0%}"
            f" sys; {int(x['routed']):,} routed = {x['routed_per_s']:,.0f}/s of"
            f" {x['offered_per_s']:,.0f} offered; p50 {x['p50_ms']:.1f} ms / p99"
            f" {x['p99_ms']:.1f} ms, {int(x['missing'])} missing, sender lateness p99"
            f" {x['sender_lateness_p99_ms']:.1f} ms)"
            f"\n      reconnects: {x['reconnect_cpu_ms']:.2f} ms CPU each"
            f" ({int(x['reconnects']):,} at {x['reconnects_per_s']:,.0f}/s of"
            f" {x['reconnects_offered_per_s']:,.0f} offered, {int(x['reconnect_failures'])} failed;"
            f" p50 {x['reconnect_p50_ms']:.1f} / p99 {x['reconnect_p99_ms']:.1f} ms each;"
            f" server {x['reconnect_server_cores']:.0%} of a core,"
            f" generator {x['reconnect_generator_cores']:.0%})"
        )
    elif name == "group":
        x = sample.extra
        lines = []
        for size in sorted({int(k[5:].split("_")[0]) for k in x if k.startswith("group") and
                            k[5:].split("_")[0].isdigit()}):  # fmt: skip
            for mode in ("group", "v1"):
                p = f"{mode}{size}_"
                lines.append(
                    f"{size:5} members x 2, {'group' if mode == 'group' else 'v1   '}: sent p50"
                    f" {x[p + 'sent_p50_ms']:.1f} / p99 {x[p + 'sent_p99_ms']:.1f} ms; last"
                    f" device p50 {x[p + 'last_p50_ms']:.1f} / p99 {x[p + 'last_p99_ms']:.1f}"
                    f" ms (read by the generator p50 {x[p + 'read_p50_ms']:.1f} / p99"
                    f" {x[p + 'read_p99_ms']:.1f} ms); {x[p + 'deliveries_per_s']:,.0f}"
                    " deliveries/s;"
                    f" store {x[p + 'store_bytes'] / 1024:,.1f} KiB/msg"
                )
        text = "\n      ".join(lines) + f"\n      store bytes v1 / group: {x['store_ratio']:.1f}x"
    else:
        text = (
            f"{sample.value:,.0f} handshakes/s ({int(sample.extra['completed']):,} done,"
            f" {int(sample.extra['failures'])} failed)"
        )
    for key in ("errors", "closed"):
        if sample.extra.get(key):
            text += f" [{key}: {int(sample.extra[key])}]"
    if name == "rate":
        x, u = sample.extra, sample.usage
        if (
            x["routed_per_s"] < 0.97 * x["offered_per_s"]
            or x["missing"]
            or x["p50_ms"] > RATE_QUEUEING_P50_MS
            or (u is not None and max(u.server, u.server_main) >= 0.9)
        ):
            text += (
                "\n      !! not below saturation (achieved < 97% of offered, messages missing,"
                f" p50 > {RATE_QUEUEING_P50_MS:g} ms or server at ~100% of a core): CPU per msg"
                " is lower when messages queue; try a lower --rate-total"
            )
        if x["reconnects_per_s"] < 0.97 * x["reconnects_offered_per_s"]:
            text += "\n      !! reconnects fell behind their rate: try a lower --reconnect-rate"
    if sample.usage is not None and sample.usage.wall >= 0.5:  # /proc counts 10 ms ticks
        u = sample.usage
        text += (
            f"\n      cpu over {u.wall:.2f} s: server {u.server:.0%} of a core (main thread"
            f" {u.server_main:.0%}), generator {u.generator:.0%}"
        )
        if max(u.server, u.server_main) >= 0.9:
            text += "  (server at ~100% of a core)"
        if u.generator >= 0.9:
            text += "  !! generator near 100%: result may be generator-bound"
    return text


def main_bench(args: argparse.Namespace) -> int:
    fd_limit = raise_fd_limit()
    CLIENT["kind"] = args.client
    apply_quick(args)
    if args.quick:
        args.idle_conns = args.idle_set or 2000
        args.backlog = args.backlog_set or 2000
        args.handshakes = args.handshakes_set or 1000
        args.group_messages = args.group_messages_set or 5
    if args.idle_conns + 100 > fd_limit - 200:
        print(f"--idle-conns {args.idle_conns} needs more fds than {fd_limit}", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    if only - set(SCENARIOS):
        print(f"--only: unknown {sorted(only - set(SCENARIOS))}", file=sys.stderr)
        return 2
    if args.rate_total <= 0 or args.rate_pairs <= 0 or args.reconnect_rate <= 0:
        print("--rate-total, --rate-pairs and --reconnect-rate must be > 0", file=sys.stderr)
        return 2
    tree: BaselineTree | None = None
    if args.baseline_commit:
        try:
            tree = BaselineTree(args.baseline_commit)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            print(f"--baseline-commit: not a commit ({exc})", file=sys.stderr)
            return 2
    kinds = ["gateway"]
    if args.baseline_commit:
        kinds.append("baseline")
    if not args.no_baseline and (not args.baseline_commit or args.with_floor):
        kinds.append("floor")
    tokens = Tokens()
    if print_machine() > 0.2:
        print("  !! the machine is busy with other work: expect noisier, lower results", flush=True)
    print(
        f"{scales_line(args)}; idle {args.idle_conns:,};"
        f" backlog {args.backlog:,}; handshakes {args.handshakes:,} x"
        f" {args.handshake_concurrency} concurrent; fixed rate {args.rate_total:,g} msg/s over"
        f" {args.rate_pairs} pairs, reconnects {args.reconnect_rate:g}/s x"
        f" {args.reconnect_concurrency} concurrent (pool {args.reconnect_pool});"
        f" store synchronous={args.synchronous}, gateway log level {args.log_level};"
        f" client {args.client}; RLIMIT_NOFILE {fd_limit}",
        flush=True,
    )
    results: dict[str, dict[str, list[Sample]]] = {k: {} for k in kinds}
    failed: dict[str, str] = {}
    errors: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_core_", dir=args.tmpdir))

    def series(name: str, scenario: Scenario, title: str) -> None:
        print(f"\n== {title}", flush=True)
        for run in range(args.runs):
            for kind in kinds:
                if kind in failed:
                    if run == 0:
                        print(f"  {kind:8}: skipped, it did not start", flush=True)
                    continue
                try:
                    sample = run_one(kind, name, run, workdir, args, tokens, scenario)
                except ServerStartError as exc:
                    failed[kind] = str(exc)
                    head, _, tail = str(exc).partition("\n")
                    print(f"  run {run + 1} {kind:8}: DID NOT START: {head}", flush=True)
                    print(_indent("\n".join(tail.splitlines()[-8:])), flush=True)
                    continue
                except ScenarioError as exc:
                    errors.append(f"{name} on {kind}, run {run + 1}")
                    print(f"  run {run + 1} {kind:8}: FAILED: {exc}", flush=True)
                    continue
                results[kind].setdefault(name, []).append(sample)
                print(f"  run {run + 1} {kind:8}: {describe(name, sample)}", flush=True)

    async def saturate(server: ServerProcess, tok: Tokens, a: argparse.Namespace) -> Sample:
        return await scenario_route(server, tok, a, None)

    try:
        if tree is not None:
            args.baseline_tree = tree.create()
            args.baseline_label = f"{tree.short} ({tree.subject})"
        _print_origins(kinds, args, workdir, tree, failed)
        if "route" in only or ("latency" in only and not args.rate):
            series("route", saturate, "1. routed durable msgs/s at saturation")
        if "latency" in only:
            rate = args.rate
            if not rate:
                first = next((results[k]["route"] for k in kinds if results[k].get("route")), [])
                medians = [s.value for s in first]
                rate = statistics.median(medians) / 2 if medians else None
            if rate:

                async def paced(
                    server: ServerProcess, tok: Tokens, a: argparse.Namespace
                ) -> Sample:
                    return await scenario_route(server, tok, a, rate)

                how = "" if args.rate else " (half of 1.)"
                series("latency", paced, f"2. latency, paced at {rate:,.0f} msg/s{how}")
            else:
                print("\n== 2. latency: skipped, 1. gave no rate", flush=True)
        if "idle" in only:
            series("idle", scenario_idle, f"3. RSS per idle connection ({args.idle_conns:,})")
        if "drain" in only:
            series("drain", scenario_drain, f"4. drain a backlog of {args.backlog:,} on reconnect")
        if "hs" in only:
            series("hs", scenario_handshakes, "5. handshakes + hello/welcome + close per second")
        if "rate" in only:
            series(
                "rate",
                scenario_rate,
                f"6. server CPU per routed msg at a fixed {args.rate_total:,g} msg/s"
                f" ({args.rate_pairs} -> {args.rate_pairs} devices, one send per message, paced,"
                f" every msg and receipt acked on its own), then per reconnect of a known device"
                f" at {args.reconnect_rate:g}/s",
            )
        if "group" in only:
            series(
                "group",
                scenario_group,
                f"7. group fan-out to {'/'.join(map(str, args.group_sizes))} members x 2 devices"
                f" ({args.group_body:,}-byte body, {args.group_messages} messages each) against"
                " one send per member",
            )
    finally:
        stop_all_servers()
        if tree is not None:
            tree.remove()
        args.baseline_tree = None
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(results, args)
    summary["failed_to_start"] = failed
    summary["failed_runs"] = errors
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    for kind, why in failed.items():
        print(f"!! {kind} did not start: {why.splitlines()[0]}", flush=True)
    for what in errors:
        print(f"!! failed: {what}", flush=True)
    return 1 if failed or errors else 0


def _print_origins(
    kinds: Sequence[str], args: argparse.Namespace, workdir: Path, tree: BaselineTree | None,
    failed: dict[str, str],
) -> None:  # fmt: skip
    """Where each gateway server imports `gateway` from, checked before any scenario."""
    for kind in kinds:
        if kind == "gateway" and args.gateway_launcher:
            print(f"gateway : started by {Path(args.gateway_launcher).resolve()}", flush=True)
            continue
        try:
            origin = gateway_origin(kind, args, workdir)
        except ServerStartError as exc:
            failed[kind] = str(exc)
            print(f"!! {exc}", flush=True)
            continue
        line = f"{kind:8}: the server imports gateway from {origin}"
        if kind == "baseline":
            assert tree is not None and tree.path is not None
            if not Path(origin).is_relative_to(tree.path.resolve()):
                raise RuntimeError(f"the baseline imports {origin}, not the worktree {tree.path}")
            line += f"\n          = commit {tree.short}: {tree.subject}"
        print(line, flush=True)


def _median(samples: Sequence[Sample], row: Row) -> float:
    values = [s.value if row.field is None else s.extra.get(row.field, math.nan) for s in samples]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def summarize(
    results: dict[str, dict[str, list[Sample]]], args: argparse.Namespace
) -> dict[str, Any]:
    kinds = list(results)
    others = [k for k in kinds if k != "gateway"]
    ratio_head = {"baseline": "new/base", "floor": "gw/floor"}
    print(f"\n== summary: medians of {args.runs} run(s)")
    if "baseline" in kinds:
        new = f"started by {args.gateway_launcher}" if args.gateway_launcher else "working tree"
        print(
            f"   baseline = the gateway at commit {getattr(args, 'baseline_label', '?')};"
            f" new/base = gateway ({new}) / baseline"
        )
    if "floor" in kinds:
        print('   floor = the gateway on [store] backend = "memory"; gw/floor = gateway / floor')
    header = (
        f"{'metric':36} {'gateway':>10}"
        + "".join(f" {k:>10} {ratio_head[k]:>8}" for k in others)
        + f"  {'target':>12}  {'result':6}  gateway at ~100% of a core?"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "metrics": {},
    }
    for row in ROWS:
        runs = {k: results[k].get(row.scenario, []) for k in kinds}
        if not any(runs.values()):
            continue
        med = {k: _median(runs[k], row) for k in kinds}
        g = med["gateway"]
        ratios = {k: g / med[k] if med[k] else math.nan for k in others}
        verdict = "-"
        if row.target is not None and not math.isnan(g):
            verdict = "PASS" if row.target.met(g) else "MISS"
        busy = "-"
        usages = [s.usage for s in runs["gateway"] if s.usage is not None and s.usage.wall >= 0.5]
        if usages and row.field is None:
            main = statistics.median(u.server_main for u in usages)
            proc = statistics.median(u.server for u in usages)
            gen = statistics.median(u.generator for u in usages)
            busy = (
                f"{'yes' if max(main, proc) >= 0.9 else 'no'} (process {proc:.0%},"
                f" main thread {main:.0%}; generator {gen:.0%})"
            )
        bound = f"{row.target.op} {row.target.bound:,g}" if row.target else "-"
        print(
            f"{row.label + ' (' + row.unit + ')':36} {_fmt(g):>10}"
            + "".join(f" {_fmt(med[k]):>10} {_fmt_ratio(ratios[k]):>8}" for k in others)
            + f"  {bound:>12}  {verdict:6}  {busy}"
        )
        metric: dict[str, Any] = {f"{k}_median": med[k] for k in kinds}
        if "floor" in ratios:
            metric["ratio"] = ratios["floor"]
        if "baseline" in ratios:
            metric["ratio_baseline"] = ratios["baseline"]
        metric["target"] = f"{row.target.op} {row.target.bound:g}" if row.target else None
        metric["result"] = verdict
        metric.update({f"{k}_runs": [asdict(s) for s in runs[k]] for k in kinds})
        summary["metrics"][row.key] = metric
    if args.quick:
        print("(--quick: smaller scales than the targets assume; use the full run for verdicts)")
    return summary


def _fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) or math.isinf(value) else f"{value:.2f}"


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small, fast run")
    p.add_argument(
        "--client",
        choices=("lean", "trio-websocket"),
        default="lean",
        help="the generator's WebSocket client (default: lean, see LeanClient)",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per scenario (default 3)")
    p.add_argument("--pairs", type=int, default=None, help="sender->receiver pairs (default 500)")
    p.add_argument("--window", type=int, default=16, help="outstanding sends per sender")
    p.add_argument("--duration", type=float, default=None, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default 3)")
    p.add_argument(
        "--rate", type=float, default=None, help="paced rate for 2. (default: half of 1.)"
    )
    p.add_argument("--idle-conns", type=int, default=None, help="idle connections (default 10000)")
    p.add_argument("--backlog", type=int, default=None, help="queued messages (default 10000)")
    p.add_argument("--handshakes", type=int, default=None, help="timed handshakes (default 5000)")
    p.add_argument("--handshake-concurrency", type=int, default=50)
    p.add_argument("--handshake-pool", type=int, default=1000, help="devices reconnecting")
    p.add_argument("--connect-concurrency", type=int, default=200)
    p.add_argument("--synchronous", choices=("full", "normal"), default="full",
                   help="[store] synchronous of the gateway under test")  # fmt: skip
    p.add_argument("--log-level", default="info", help="[log] level of the gateway under test")
    p.add_argument(
        "--gateway-launcher",
        help="a Python file run instead of `-m gateway.cli` (A/B tests of patched gateways)",
    )
    p.add_argument(
        "--rate-total",
        type=float,
        default=1500.0,
        help="6.: msgs/s in total, paced, below saturation (default 1500)",
    )
    p.add_argument("--rate-pairs", type=int, default=40, help="6.: senders -> receivers (40)")
    p.add_argument(
        "--reconnect-rate", type=float, default=100.0, help="6.: reconnects/s (default 100)"
    )
    p.add_argument(
        "--reconnect-concurrency", type=int, default=10, help="6.: reconnects at once at most"
    )
    p.add_argument("--reconnect-pool", type=int, default=200, help="6.: known devices (200)")
    p.add_argument(
        "--group-sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[16, 256, 1024],
        help="7.: members per group, comma-separated (default 16,256,1024; at most 1024)",
    )
    p.add_argument("--group-messages", type=int, default=None,
                   help="7.: measured fan-outs per size and mode (default 20)")  # fmt: skip
    p.add_argument("--group-store-messages", type=int, default=3,
                   help="7.: fan-outs held unacked to measure store bytes (default 3)")  # fmt: skip
    p.add_argument("--group-trace", action="store_true",
                   help="7.: print each fan-out's wall-clock start and timings")  # fmt: skip
    p.add_argument("--group-body", type=int, default=1024, help="7.: body bytes (default 1024)")
    p.add_argument("--only", help="comma list of " + ",".join(SCENARIOS))
    p.add_argument(
        "--baseline-commit",
        metavar="REV",
        help="baseline = the gateway at git commit REV (a temporary worktree), not the floor",
    )
    p.add_argument(
        "--with-floor", action="store_true", help="with --baseline-commit: run the floor too"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the floor (debugging only)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--profile-dir", help="record each server with py-spy (raw stacks) here")
    p.add_argument(
        "--profile-mode",
        choices=("cpu", "gil"),
        default="cpu",
        help="py-spy: every thread's CPU, or only the thread holding the GIL",
    )
    p.add_argument("--tmpdir", help="where server files go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep server logs and databases")
    p.set_defaults(baseline_tree=None, baseline_label=None)
    args = p.parse_args(argv)
    # Remember what was given explicitly, so that --quick only changes the rest.
    for name, default in (
        ("runs", 3), ("pairs", 500), ("duration", 10.0), ("warmup", 3.0), ("idle_conns", 10_000),
        ("backlog", 10_000), ("handshakes", 5000), ("group_messages", 20),
    ):  # fmt: skip
        given = getattr(args, name)
        short = {"idle_conns": "idle", "handshakes": "handshakes"}.get(name, name)
        setattr(args, f"{short}_set", given)
        setattr(args, name, default if given is None else given)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return main_bench(args)
    finally:
        stop_all_servers()


if __name__ == "__main__":
    sys.exit(main())

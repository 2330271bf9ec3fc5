"""Scale-out benchmark: the core routing workload on SQLite, on Redis, and on Redis with two
processes sharing the port (``gateway serve --workers 2``, SO_REUSEPORT).

Run it from the repository root:

    python -m scripts.bench_scale            # 3 runs of each configuration
    python -m scripts.bench_scale --quick    # one small, fast run

Configurations, each on a fresh gateway (and a fresh redis-server with AOF and
``appendfsync always``, as docs/scaling.md recommends):

1. ``sqlite-1``: one process on the embedded SQLite backend (the baseline);
2. ``redis-1``: one process on Redis;
3. ``redis-2``: two processes on Redis, ``--workers 2``; the kernel spreads the load
   generator's connections over both.

For each: routed durable msgs/s at saturation (scenario 1 of scripts/bench_core.py: pairs
of devices, a window of sends in flight, every delivery and receipt acked) with the p99
send -> arrival latency at saturation, then p99 latency paced at half of ``redis-1``'s
rate (the same offered load for every configuration). The load generator is this
process; the gateway processes and redis-server are others. CPU use of each (in cores)
is printed with every run, so a generator or a machine that is the bottleneck shows.

The scaling ratio is msgs/s of ``redis-2`` over ``redis-1``. A second ratio normalises by
CPU: msgs per gateway CPU-second with two processes over the same with one; on a machine
whose cores are shared with the generator and Redis, this is what two processes would give
with a core each.

Last, a micro-measure on Redis alone: the CPU cost of one claim renewal (the heartbeat of
one connected device) and the memory of one connected device's keys; with the per-message
costs above, these feed the projection for one million devices in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from scripts.bench_core import (
    Meter,
    Sample,
    ServerProcess,
    Tokens,
    Usage,
    scenario_route,
)
from scripts.bench_core import parse_args as core_args
from scripts.kit.gateway_process import GatewayProcess
from scripts.kit.limits import raise_fd_limit
from scripts.kit.procfs import cpu_seconds
from scripts.kit.redis_server import RedisServer
from scripts.kit.route_bench import apply_quick, print_preamble, result_line

CONFIGS = ("sqlite-1", "redis-1", "redis-2")
HEARTBEAT_DEVICES = 20_000
TARGET_RATIO = 1.6


# ---- the gateway under test ------------------------------------------------------------------


@dataclass
class ScaleUsage(Usage):
    """CPU (cores) of the gateway processes together, of each, and of redis-server."""

    workers: tuple[float, ...] = ()
    redis: float = 0.0


class GroupMeter(Meter):
    """CPU of every worker of a gateway (the parent only supervises) and of redis-server."""

    def __init__(self, pids: list[int], redis_pid: int | None) -> None:
        super().__init__(pids[0])
        self.pids = pids
        self.redis_pid = redis_pid
        self._w0: list[float] = []
        self._r0 = 0.0

    def start(self) -> None:
        super().start()
        self._w0 = [cpu_seconds(pid) for pid in self.pids]
        self._r0 = cpu_seconds(self.redis_pid) if self.redis_pid else 0.0

    def stop(self) -> Usage:
        base = super().stop()
        wall = base.wall
        workers = tuple(
            (cpu_seconds(pid) - t0) / wall for pid, t0 in zip(self.pids, self._w0, strict=True)
        )
        redis = (cpu_seconds(self.redis_pid) - self._r0) / wall if self.redis_pid else 0.0
        return ScaleUsage(
            wall=wall,
            server=sum(workers),
            server_main=base.server_main,
            generator=base.generator,
            workers=workers,
            redis=redis,
        )


class ScaleServer(ServerProcess):
    """``gateway serve`` on a backend with some number of workers."""

    def __init__(
        self, workdir: Path, args: argparse.Namespace, tag: str, redis: RedisServer | None,
        workers: int,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.workers = workers
        super().__init__("gateway", workdir, args, tag)

    def launch(self) -> GatewayProcess:
        store = (
            f'backend = "redis"\nredis_url = "{self.redis.url}"'
            if self.redis
            else f'path = "{self.dir / "gateway.db"}"'
        )
        return GatewayProcess(
            self.dir, store=store, log_level=self.args.log_level, workers=self.workers,
            cwd=self.dir,
        )  # fmt: skip

    def meter(self) -> Meter:
        assert isinstance(self.process, GatewayProcess)
        pids = self.process.worker_pids()
        return GroupMeter(pids, self.redis.pid if self.redis else None)


@contextlib.contextmanager
def running(
    config: str, workdir: Path, args: argparse.Namespace, tag: str
) -> Iterator[ScaleServer]:
    backend, workers = config.split("-")
    redis = (
        RedisServer(workdir / tag / "redis", appendfsync=args.appendfsync)
        if backend == "redis"
        else None
    )
    server = ScaleServer(workdir, args, tag, redis, int(workers))
    try:
        if redis:
            redis.start()
        server.start()
        yield server
    finally:
        server.stop()
        if redis:
            redis.stop()


# ---- measuring ---------------------------------------------------------------------------------


def describe(sample: Sample) -> str:
    u = sample.usage
    text = result_line(sample, saturation_note=" at saturation")
    if isinstance(u, ScaleUsage):
        each = "+".join(f"{w:.2f}" for w in u.workers)
        text += f" | cpu: gateway {each}, redis {u.redis:.2f}, generator {u.generator:.2f}"
        if u.generator >= 0.9:
            text += "  !! generator-bound"
    return text


def run_config(
    config: str, name: str, run: int, workdir: Path, args: argparse.Namespace, tokens: Tokens,
    rate: float | None,
) -> Sample:  # fmt: skip
    async def scenario(server: ServerProcess, tok: Tokens, a: argparse.Namespace) -> Sample:
        return await scenario_route(server, tok, a, rate)

    with running(config, workdir, args, f"{name}-{config}-{run}") as server:
        sample: Sample = trio.run(scenario, server, tokens, args)
        for line in [w for w in server.warnings() if "development JWT" not in w][:5]:
            print(f"    log: {line}", flush=True)
        return sample


async def heartbeat_cost(redis: RedisServer, devices: int) -> dict[str, float]:
    """Redis CPU per claim renewal, and memory per connected device, measured directly."""
    import coredis

    from gateway.store.redis_scripts import SCRIPTS, prefix

    async with coredis.Redis.from_url(redis.url) as client:
        sha = {name: await client.script_load(SCRIPTS[name]) for name in SCRIPTS}
        claim = ["node1|1", 30_000]
        before = (await client.info("memory"))["used_memory"]
        for start in range(0, devices, 1000):
            async with client.pipeline(transaction=False) as pipe:
                for n in range(start, min(devices, start + 1000)):
                    p = prefix(f"user-{n}")
                    pipe.evalsha(sha["register"], [f"{p}:devs", f"{p}:d:phone"], ["phone", 1])
                    pipe.evalsha(sha["claim"], [f"{p}:node:phone"], [*claim, "x", "node1"])
        after = (await client.info("memory"))["used_memory"]
        cpu0 = cpu_seconds(redis.pid)
        t0 = time.perf_counter()
        for start in range(0, devices, 1000):
            async with client.pipeline(transaction=False) as pipe:
                for n in range(start, min(devices, start + 1000)):
                    pipe.evalsha(sha["refresh"], [f"{prefix(f'user-{n}')}:node:phone"], claim)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(redis.pid) - cpu0
    return {
        "redis_cpu_us_per_refresh": cpu / devices * 1e6,
        "refreshes_per_s": devices / wall,
        "redis_bytes_per_device": (after - before) / devices,
    }


# ---- orchestration -----------------------------------------------------------------------------


def main_bench(args: argparse.Namespace) -> int:
    raise_fd_limit()
    apply_quick(args)
    tokens = Tokens()
    print_preamble(
        args, f"redis appendfsync {args.appendfsync}; gateway log level {args.log_level}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.tmpdir))
    saturated: dict[str, list[Sample]] = {c: [] for c in CONFIGS}
    paced: dict[str, list[Sample]] = {c: [] for c in CONFIGS}
    try:
        print("\n== 1. routed durable msgs/s at saturation", flush=True)
        for run in range(args.runs):
            for config in CONFIGS:
                sample = run_config(config, "route", run, workdir, args, tokens, None)
                saturated[config].append(sample)
                print(f"  run {run + 1} {config:8}: {describe(sample)}", flush=True)
        rate = args.rate or statistics.median(s.value for s in saturated["redis-1"]) / 2
        print(f"\n== 2. latency, paced at {rate:,.0f} msg/s (half of redis-1's rate)", flush=True)
        for run in range(args.runs):
            for config in CONFIGS:
                sample = run_config(config, "latency", run, workdir, args, tokens, rate)
                paced[config].append(sample)
                print(f"  run {run + 1} {config:8}: {describe(sample)}", flush=True)
        print("\n== 3. Redis alone: claim renewals and memory per connected device", flush=True)
        redis = RedisServer(workdir / "heartbeat", appendfsync=args.appendfsync)
        redis.start()
        try:
            micro = trio.run(heartbeat_cost, redis, HEARTBEAT_DEVICES)
        finally:
            redis.stop()
        print(
            f"  {micro['redis_cpu_us_per_refresh']:.1f} us of redis CPU per renewal"
            f" ({micro['refreshes_per_s']:,.0f}/s from one pipelining client),"
            f" {micro['redis_bytes_per_device']:.0f} bytes per connected device",
            flush=True,
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(saturated, paced, micro, rate, args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


def summarize(
    saturated: dict[str, list[Sample]],
    paced: dict[str, list[Sample]],
    micro: dict[str, float],
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    rows: dict[str, dict[str, float]] = {}
    for config in CONFIGS:
        runs = saturated[config]
        usages = [s.usage for s in runs if isinstance(s.usage, ScaleUsage)]
        msgs = med([s.value for s in runs])
        gateway_cpu = med([u.server for u in usages])
        rows[config] = {
            "msgs_per_s": msgs,
            "p99_ms_at_saturation": med([s.extra["p99_ms_at_saturation"] for s in runs]),
            "p99_ms_paced": med([s.value for s in paced[config]]),
            "gateway_cpu_cores": gateway_cpu,
            "redis_cpu_cores": med([u.redis for u in usages]),
            "generator_cpu_cores": med([u.generator for u in usages]),
            "gateway_cpu_ms_per_msg": gateway_cpu / msgs * 1000 if msgs else float("nan"),
            "redis_cpu_ms_per_msg": med([u.redis for u in usages]) / msgs * 1000 if msgs else 0.0,
        }
    one, two = rows["redis-1"], rows["redis-2"]
    ratio = two["msgs_per_s"] / one["msgs_per_s"]
    per_cpu_ratio = (two["msgs_per_s"] / two["gateway_cpu_cores"]) / (
        one["msgs_per_s"] / one["gateway_cpu_cores"]
    )
    print(f"\n== summary: medians of {args.runs} run(s); paced latency at {rate:,.0f} msg/s")
    print(
        f"  {'config':9} {'msgs/s':>9} {'p99 sat':>9} {'p99 paced':>10} {'gw cpu':>7}"
        f" {'redis cpu':>9} {'gen cpu':>8} {'gw ms/msg':>10} {'redis ms/msg':>12}"
    )
    for config, r in rows.items():
        print(
            f"  {config:9} {r['msgs_per_s']:9,.0f} {r['p99_ms_at_saturation']:8.0f}ms"
            f" {r['p99_ms_paced']:8.1f}ms {r['gateway_cpu_cores']:7.2f}"
            f" {r['redis_cpu_cores']:9.2f} {r['generator_cpu_cores']:8.2f}"
            f" {r['gateway_cpu_ms_per_msg']:10.3f} {r['redis_cpu_ms_per_msg']:12.3f}"
        )
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"  scaling redis-2 / redis-1: {ratio:.2f}x (target >= {TARGET_RATIO}x: {verdict})")
    print(f"  per gateway CPU-second, redis-2 / redis-1: {per_cpu_ratio:.2f}x")
    machine = one["gateway_cpu_cores"] + one["redis_cpu_cores"] + one["generator_cpu_cores"]
    if two["generator_cpu_cores"] >= 0.9 or machine >= 1.8:
        print(
            "  !! the generator and Redis share this machine's two cores with the gateway:"
            " redis-2 cannot get a core per process; read the per-CPU ratio"
        )
    print(f"  redis-1 / sqlite-1 msgs/s: {one['msgs_per_s'] / rows['sqlite-1']['msgs_per_s']:.2f}x")
    if args.quick:
        print("(--quick: smaller scales; use the full run for figures)")
    return {
        "configs": rows,
        "scaling_ratio": ratio,
        "scaling_ratio_per_cpu": per_cpu_ratio,
        "paced_rate": rate,
        "redis_micro": micro,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--appendfsync", choices=("always", "everysec"), default="always")
    known, rest = extra.parse_known_args(argv)
    args = core_args(rest)
    args.appendfsync = known.appendfsync
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return main_bench(args)


if __name__ == "__main__":
    os.environ.pop("GATEWAY__STORE__BACKEND", None)
    sys.exit(main())

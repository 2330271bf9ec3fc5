"""What ``[store] redis_replicas = 1`` costs: routed msgs/s and latency with and without
``WAIT`` on the same Redis Cluster (3 primaries, a replica each, AOF with ``appendfsync
always`` on every node), in one invocation.

Run it from the repository root:

    python -m scripts.bench_replicas            # 3 runs of each setting
    python -m scripts.bench_replicas --quick    # one small, fast run

Each run starts a fresh gateway process on the cluster (emptied first) with
``redis_replicas`` 0, then 1, alternating, and measures scenario 1 of
scripts/bench_core.py (pairs of devices, a window of sends in flight, every delivery and
receipt acked): msgs/s at saturation with the p99 send -> arrival latency there, then p99
paced at half of the ``redis_replicas = 0`` median rate. Prints each run, the medians and
the ratios (1 over 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from scripts.bench_core import Meter, Sample, ServerProcess, Tokens, scenario_route
from scripts.bench_core import parse_args as core_args
from scripts.kit.gateway_process import CLUSTER_PRIMARIES, CLUSTER_REPLICAS, GatewayProcess
from scripts.kit.limits import raise_fd_limit
from scripts.kit.redis_cluster import RedisCluster
from scripts.kit.route_bench import apply_quick, print_preamble, result_line

SETTINGS = (0, 1)


class ReplicaServer(ServerProcess):
    """``gateway serve`` on the cluster with ``redis_replicas = replicas``, run from this
    process's working directory (so that it imports this tree's `gateway`)."""

    def __init__(
        self, workdir: Path, args: argparse.Namespace, tag: str, cluster: RedisCluster,
        replicas: int,
    ) -> None:  # fmt: skip
        self.cluster = cluster
        self.replicas = replicas
        super().__init__("gateway", workdir, args, tag)

    def launch(self) -> GatewayProcess:
        store = (
            f'backend = "redis"\nredis_url = "{self.cluster.url}"\nredis_cluster = true\n'
            f"redis_replicas = {self.replicas}"
        )
        return GatewayProcess(self.dir, store=store, log_level=self.args.log_level)

    def meter(self) -> Meter:
        return Meter(self.pid)


def measure(
    cluster: RedisCluster, workdir: Path, args: argparse.Namespace, tokens: Tokens,
    replicas: int, tag: str, rate: float | None,
) -> Sample:  # fmt: skip
    """One run of scenario 1 (or 2, paced at `rate`) on a fresh gateway."""
    for primary in cluster.live_primaries():
        primary.command("FLUSHALL")
    server = ReplicaServer(workdir, args, tag, cluster, replicas)
    server.start()
    try:
        sample: Sample = trio.run(scenario_route, server, tokens, args, rate)
        for line in [w for w in server.warnings() if "development JWT" not in w][:5]:
            print(f"    log: {line}", flush=True)
        return sample
    finally:
        server.stop()


def describe(sample: Sample) -> str:
    """One run, one line."""
    text = result_line(sample)
    if sample.usage is not None:
        text += f" | cpu: gateway {sample.usage.server:.2f}, generator {sample.usage.generator:.2f}"
    return text


def main_bench(args: argparse.Namespace) -> int:
    """Both settings, alternating, `args.runs` times each; then medians and ratios."""
    raise_fd_limit()
    apply_quick(args)
    tokens = Tokens()
    print_preamble(
        args,
        f"Redis Cluster of {CLUSTER_PRIMARIES} primaries with {CLUSTER_REPLICAS} replica each",
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench_replicas_", dir=args.tmpdir))
    cluster = RedisCluster(
        workdir / "cluster", primaries=CLUSTER_PRIMARIES, replicas=CLUSTER_REPLICAS
    )
    saturated: dict[int, list[Sample]] = {r: [] for r in SETTINGS}
    paced: dict[int, list[Sample]] = {r: [] for r in SETTINGS}
    try:
        cluster.start()
        print("\n== routed durable msgs/s at saturation", flush=True)
        for run in range(args.runs):
            for r in SETTINGS:
                sample = measure(cluster, workdir, args, tokens, r, f"sat-{r}-{run}", None)
                saturated[r].append(sample)
                print(f"  run {run + 1} redis_replicas = {r}: {describe(sample)}", flush=True)
        rate = args.rate or statistics.median(s.value for s in saturated[0]) / 2
        print(f"\n== latency, paced at {rate:,.0f} msg/s", flush=True)
        for run in range(args.runs):
            for r in SETTINGS:
                sample = measure(cluster, workdir, args, tokens, r, f"lat-{r}-{run}", rate)
                paced[r].append(sample)
                print(f"  run {run + 1} redis_replicas = {r}: {describe(sample)}", flush=True)
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    def med(samples: list[Sample], key: str | None = None) -> float:
        return statistics.median(s.value if key is None else s.extra[key] for s in samples)

    print("\n== medians (redis_replicas = 0 | 1 | ratio 1/0)")
    rows = [
        ("msgs/s at saturation", med(saturated[0]), med(saturated[1])),
        (
            "p99 ms at saturation",
            med(saturated[0], "p99_ms_at_saturation"),
            med(saturated[1], "p99_ms_at_saturation"),
        ),
        (f"p99 ms paced at {rate:,.0f} msg/s", med(paced[0]), med(paced[1])),
        (f"p50 ms paced at {rate:,.0f} msg/s", med(paced[0], "p50_ms"), med(paced[1], "p50_ms")),
    ]
    for name, off, on in rows:
        print(f"  {name:32} {off:10,.1f} | {on:10,.1f} | {on / off if off else 0:.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = core_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return main_bench(args)


if __name__ == "__main__":
    os.environ.pop("GATEWAY__STORE__BACKEND", None)
    sys.exit(main())

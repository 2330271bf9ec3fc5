"""Soak: devices churn (connect, talk, disconnect, come back) against a real `gateway serve`
for a configurable time while its resident memory and open files are sampled.

    python -m scripts.soak --minutes 10 --devices 200 [--store redis]
    python -m scripts.soak --minutes 60 --store redis-cluster --ttl 120

Checked: every message answered `sent` is delivered; memory plateaus (the highest sample
of the last third of the run is within `--tolerance` of the highest of the middle third,
the first third being warm-up), the gateway's resident memory and, on Redis, Redis
`used_memory` (summed over the primaries); open files never exceed one per device, and
once every device has left they are back to where they were before the first device
came. Prints a table of samples.

Redis remembers every message for its TTL (idempotency and read permission), so its
memory can only level off in a run several TTLs long: `--ttl` gives each message a
shorter one than the gateway's `max_ttl`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.auth import mint_token
from gateway.client import ClientClosed, SendRefused, connect
from gateway.settings import Settings
from scripts.kit.gateway_process import STORES, GatewayProcess, StoreBackend, Usage, open_store
from scripts.kit.limits import raise_fd_limit
from scripts.kit.procfs import tcp_connections_on, tcp_connections_to
from scripts.kit.redis_server import RedisServer

AUTH = Settings().auth
SLACK_KIB = 4 * 1024  # allocator noise a plateau may show on top of the tolerance
# Open files the store may add once warm: SQLite's WAL and shared memory, or the Redis
# client's connection pool.
FD_SLACK = 16


@dataclass
class SoakReport:
    """Samples and counts of a soak run."""

    samples: list[Usage] = field(default_factory=list)
    sessions: int = 0
    sent: set[str] = field(default_factory=set)
    delivered: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    idle_fds_before: int = 0
    idle_fds_after: int = 0
    devices: int = 0
    device_sockets_after: int = 0  # TCP connections to the device port once all have left
    store_conns: list[int] = field(default_factory=list)  # pooled store connections, per sample
    store_conns_after: int = 0
    redis_kib: list[int] = field(default_factory=list)  # Redis used_memory, per sample

    def thirds(self) -> tuple[list[Usage], list[Usage]]:
        """The middle and last thirds of the samples."""
        n = len(self.samples)
        return self.samples[n // 3 : 2 * n // 3], self.samples[2 * n // 3 :]

    def failures(self, tolerance: float) -> list[str]:
        """Every check that failed."""
        problems = list(self.errors)
        lost = self.sent - self.delivered
        if lost:
            problems.append(f"{len(lost)} sent messages never delivered, e.g. {sorted(lost)[:3]}")
        middle, last = self.thirds()
        if not middle or not last:
            problems.append("too few samples to judge a plateau")
            return problems
        before = max(u.rss_kib for u in middle)
        after = max(u.rss_kib for u in last)
        if after > before * (1 + tolerance) + SLACK_KIB:
            problems.append(f"RSS still growing: {before} KiB -> {after} KiB")
        if self.redis_kib:
            n = len(self.redis_kib)
            before = max(self.redis_kib[n // 3 : 2 * n // 3])
            after = max(self.redis_kib[2 * n // 3 :])
            if after > before * (1 + tolerance) + SLACK_KIB:
                problems.append(f"Redis memory still growing: {before} KiB -> {after} KiB")
        # Open files follow how many devices happen to be connected: bounded by one
        # connection per device at any time (plus the store's pooled connections), and
        # back to the idle count at the end.
        ceiling = self.idle_fds_before + self.devices + FD_SLACK
        peak = max(u.fds - pooled for u, pooled in zip(self.samples, self.store_conns, strict=True))
        if peak > ceiling:
            problems.append(f"open files past one per device: {peak}")
        if self.device_sockets_after:
            problems.append(f"{self.device_sockets_after} device sockets open after all left")
        if self.idle_fds_after - self.store_conns_after > self.idle_fds_before + FD_SLACK:
            problems.append(
                f"open files after every device left: {self.idle_fds_after}"
                f" (before any came: {self.idle_fds_before})"
            )
        return problems

    def table(self, rows: int = 12) -> str:
        """Samples at even intervals: time, RSS, open files (and Redis memory)."""
        step = max(1, len(self.samples) // rows)
        picked = list(range(0, len(self.samples), step))
        if self.samples and picked[-1] != len(self.samples) - 1:
            picked.append(len(self.samples) - 1)
        redis = bool(self.redis_kib)
        lines = ["   t (s)   RSS (MiB)   open files" + ("   Redis (MiB)" if redis else "")]
        for i in picked:
            u = self.samples[i]
            line = f"{u.at:8.1f}   {u.rss_kib / 1024:9.1f}   {u.fds:10d}"
            lines.append(line + (f"   {self.redis_kib[i] / 1024:11.1f}" if redis else ""))
        return "\n".join(lines)


def redis_used_kib(servers: Sequence[RedisServer]) -> int:
    """Redis `used_memory` summed over `servers`, in KiB (blocks, briefly)."""
    total = 0
    for server in servers:
        info = server.command("INFO", "memory").decode()
        total += int(info.split("used_memory:", 1)[1].split("\r\n", 1)[0])
    return total // 1024


async def _device(
    url: str,
    name: str,
    peers: list[str],
    deadline: float,
    rng: random.Random,
    report: SoakReport,
    ttl: int | None,
) -> None:
    """One device's life: sessions of a few messages each, with pauses between."""
    while trio.current_time() < deadline:
        try:
            async with connect(url, mint_token(AUTH, name, "phone"), reconnect=False) as client:
                report.sessions += 1
                await client.wait_drained()
                for delivery in client.take_buffered():
                    report.delivered.add(delivery.frame.get("id", ""))
                for n in range(rng.randint(0, 5)):
                    msg_id = f"{name}-{report.sessions}-{n}"
                    # not to itself: a send to one's own user skips the sending device
                    to = rng.choice([p for p in peers if p != name])
                    await client.send(to, b"soak" * rng.randint(1, 64), id=msg_id, ttl=ttl)
                    report.sent.add(msg_id)
                with trio.move_on_after(rng.uniform(0.05, 1.0)):
                    async for delivery in client.deliveries():
                        report.delivered.add(delivery.frame.get("id", ""))
                if client.errors:
                    report.errors.append(f"{name}: {client.errors}")
        except (ClientClosed, SendRefused) as exc:
            report.errors.append(f"{name}: {exc}")
        await trio.sleep(rng.uniform(0.05, 1.0))


async def _collect(url: str, devices: list[str], report: SoakReport) -> None:
    """Each device connects one last time and takes what is still queued for it."""
    for name in devices:
        async with connect(url, mint_token(AUTH, name, "phone"), reconnect=False) as client:
            await client.wait_drained()
            report.delivered.update(d.frame.get("id", "") for d in client.take_buffered())


async def run_soak(
    gateway: GatewayProcess,
    *,
    seconds: float,
    devices: int,
    sample_every: float,
    seed: int,
    redis: Sequence[RedisServer] = (),
    ttl: int | None = None,
) -> SoakReport:
    """Churn `devices` devices for `seconds`, sampling the gateway; return the report.

    With `redis` (a Redis store's server, or a cluster's primaries), the gateway's
    connections to them are counted apart from other files, and their `used_memory` is
    sampled and summed. `ttl` is each message's, in seconds (default: `max_ttl`).
    """

    def pooled() -> int:
        return sum(tcp_connections_to(server.port) for server in redis)

    report = SoakReport(devices=devices)
    rng = random.Random(seed)
    names = [f"soak{i}" for i in range(devices)]
    report.idle_fds_before = gateway.usage().fds
    for name in names:  # every device is known before anyone sends to it
        async with connect(gateway.url, mint_token(AUTH, name, "phone"), reconnect=False):
            pass
    deadline = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:

        async def sample() -> None:
            while True:
                report.samples.append(gateway.usage())
                report.store_conns.append(pooled())
                if redis:
                    report.redis_kib.append(await trio.to_thread.run_sync(redis_used_kib, redis))
                await trio.sleep(sample_every)

        nursery.start_soon(sample)
        async with trio.open_nursery() as churn:
            for name in names:
                churn.start_soon(
                    _device, gateway.url, name, names, deadline, random.Random(rng.random()),
                    report, ttl,
                )  # fmt: skip
        nursery.cancel_scope.cancel()
    await _collect(gateway.url, names, report)
    report.delivered.discard("")
    # The gateway closes its side of each connection as it ends; wait (bounded) for it.
    with trio.move_on_after(10):
        while tcp_connections_on(gateway.port):  # noqa: ASYNC110 - bounded poll
            await trio.sleep(0.05)
    report.device_sockets_after = tcp_connections_on(gateway.port)
    report.idle_fds_after = gateway.usage().fds
    report.store_conns_after = pooled()
    return report


def redis_servers(store: StoreBackend) -> tuple[RedisServer, ...]:
    """The servers that hold a store's data: a cluster's primaries, or its one Redis."""
    if store.cluster is not None:
        return tuple(store.cluster.primaries)
    return () if store.redis is None else (store.redis,)


async def _main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        async with open_store(args.store, Path(tmp)) as store:
            gateway = GatewayProcess(Path(tmp) / "gateway", store=store.toml)
            await gateway.astart()
            try:
                report = await run_soak(
                    gateway,
                    seconds=args.minutes * 60,
                    devices=args.devices,
                    sample_every=args.sample,
                    seed=args.seed,
                    redis=redis_servers(store),
                    ttl=args.ttl,
                )
            finally:
                gateway.kill()
    delivered = len(report.sent & report.delivered)
    print(f"{args.store}, {args.minutes:g} min, {args.devices} devices, "
          f"{report.sessions} sessions, {len(report.sent)} messages sent, "
          f"{delivered} delivered")  # fmt: skip
    print(report.table())
    middle, last = report.thirds()
    if middle and last:
        print(f"peak RSS middle third {max(u.rss_kib for u in middle) / 1024:.1f} MiB, last third "
              f"{max(u.rss_kib for u in last) / 1024:.1f} MiB; peak open files "
              f"{max(u.fds for u in middle)} / {max(u.fds for u in last)}")  # fmt: skip
        if report.redis_kib:
            n = len(report.redis_kib)
            print(f"peak Redis used_memory middle third "
                  f"{max(report.redis_kib[n // 3 : 2 * n // 3]) / 1024:.1f} MiB, last third "
                  f"{max(report.redis_kib[2 * n // 3 :]) / 1024:.1f} MiB")  # fmt: skip
    print(f"open files idle: before {report.idle_fds_before}, after {report.idle_fds_after}"
          f" ({report.store_conns_after} of them pooled store connections);"
          f" device sockets left open: {report.device_sockets_after}")  # fmt: skip
    failures = report.failures(args.tolerance)
    for problem in failures:
        print("FAILED:", problem)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", choices=STORES, default="sqlite")
    parser.add_argument("--ttl", type=int, help="each message's TTL in seconds (default: max_ttl)")
    return trio.run(_main, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())

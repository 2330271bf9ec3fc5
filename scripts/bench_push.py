"""Push wake-up benchmark: throughput and latency against the fake APNs over real HTTP/2.

    python -m scripts.bench_push [--devices 10000] [--repeat 3] [--rate 1000] [--seconds 5]

The fake APNs and FCM run in a child process (``python -m scripts.fake_push``), so the
server's CPU is not charged to the gateway side; both processes time with the same
monotonic clock. The gateway side is the real thing: a SQLite store holding every device's
token, the `PushDispatcher` (policy, bounded queue, workers), and the aioapns provider on
its asyncio island, over TLS and HTTP/2.

Measured, each `--repeat` times, medians reported:

1. **Throughput**: `--devices` distinct idle devices get an urgent item at once; time until
   every wake-up has been answered by the fake. Run three ways in the same invocation:
   - ``log``: the dispatcher with the `log` provider (the dispatcher and store cost alone);
   - ``raw``: the aioapns provider driven directly with as many concurrent sends as the
     dispatcher has workers (the HTTP/2 client and fake server cost alone);
   - ``apns``: the dispatcher with the aioapns provider (the product path);
   - ``fcm``: the dispatcher with firebase-admin against the fake FCM (HTTP/1.1), smaller.
2. **Latency**: messages stored through the SQLite store at `--rate` per second for
   `--seconds`, one per idle device; the time from the store's commit (its doorbell) to
   the push request arriving at the fake APNs, p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway.store import Envelope, PushToken
from gateway.store.sqlite import SqliteStore
from push.apns import ApnsProvider
from push.dispatcher import PushDispatcher
from push.fcm import FcmProvider
from push.notification import Notification, Provider
from push.policy import WakeKind
from push.settings import ApnsSettings, FcmSettings, PushSettings
from scripts.kit.child_process import SOURCE_ROOT

TOPIC = "com.example.app"


def _token(i: int) -> str:
    return f"{i:064x}"


class Bench:
    """The fixture: the fake services' child process, the store and the settings."""

    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.dir = directory
        self.rings: dict[str, float] = {}
        self.cpu_us: dict[str, float] = {}  # gateway-process CPU per wake-up, last run
        self.all_rung = trio.Event()  # every message of the latency run was committed
        self.expected = 0
        self.dispatcher: PushDispatcher | None = None
        self.store = SqliteStore(
            directory / "bench.db", doorbell=self._doorbell, synchronous="normal"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scripts.fake_push",
                "--dir",
                str(directory / "fake"),
                "--apns-port",
                "0",
                "--fcm-port",
                "0",
                "--ready-json",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            cwd=SOURCE_ROOT,
        )
        assert self.proc.stdout is not None
        ready = json.loads(self.proc.stdout.readline())
        fake = directory / "fake"
        self.apns_url = f"https://127.0.0.1:{ready['apns']}"
        self.fcm_url = f"http://127.0.0.1:{ready['fcm']}"
        self.ca = fake / "ca.pem"
        self.apns = ApnsSettings(
            key_file=fake / "AuthKey_FAKEKEY123.p8",
            key_id="FAKEKEY123",
            team_id="FAKETEAM01",
            topic=TOPIC,
            endpoint=self.apns_url,
            ca_file=self.ca,
        )
        self.fcm = FcmSettings(
            service_account_file=fake / "service-account.json", endpoint=self.fcm_url
        )
        self.settings = PushSettings(
            workers=args.workers, queue_size=10 * args.devices, apns=self.apns, fcm=self.fcm
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)

    def _doorbell(self, user: str, device: str, urgent: bool, item: object = None) -> None:
        self.rings[user] = time.monotonic()
        if self.dispatcher is not None:
            self.dispatcher.stored(user, device, urgent)
        if len(self.rings) >= self.expected:
            self.all_rung.set()

    def control(self, base: str, path: str, method: str = "GET") -> Any:
        with httpx.Client(verify=str(self.ca), timeout=60) as client:
            return client.request(method, base + path).json()

    async def setup(self, nursery: trio.Nursery, devices: int) -> None:
        await nursery.start(self.store.run)
        now = int(time.time() * 1000)
        for provider, prefix in (("apns", "u"), ("fcm", "f")):
            for i in range(devices):
                await self.store.register_device(f"{prefix}{i}", "phone", now)
            async with trio.open_nursery() as batch:
                for i in range(devices):
                    token = PushToken(provider, _token(i), TOPIC, False, now)
                    batch.start_soon(self.store.set_push_token, f"{prefix}{i}", "phone", token)

    async def dispatch_all(self, providers: dict[str, Provider], prefix: str, n: int) -> float:
        """Wake `n` idle devices at once through a fresh dispatcher; wake-ups per second.
        Also records this process's CPU time per wake-up in `cpu_us`."""
        dispatcher = PushDispatcher(self.settings, providers, run_providers=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run, self.store)
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(n):
                dispatcher.stored(f"{prefix}{i}", "phone", True)
            await dispatcher.wait_idle()
            elapsed = time.perf_counter() - started
            self.cpu_us[prefix + str(len(providers) and next(iter(providers)))] = (
                (time.process_time() - cpu) / n * 1e6
            )
            dispatcher.close()
        sent = sum(v for (_, o), v in dispatcher.counters.items() if o.startswith("sent"))
        assert sent == n, dict(dispatcher.counters)
        return n / elapsed

    async def raw(self, apns: ApnsProvider, n: int) -> float:
        """The aioapns provider driven directly, `workers` sends at a time."""
        limiter = trio.CapacityLimiter(self.args.workers)

        async def one(i: int) -> None:
            async with limiter:
                token = PushToken("apns", _token(i), TOPIC, False, 0)
                note = Notification(token, WakeKind.ALERT, 3600, "incoming-message", "K")
                await apns.send(note)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        return n / (time.perf_counter() - started)

    async def latency(self, apns: ApnsProvider, rate: float, seconds: float) -> list[float]:
        """Store one urgent message per idle device at `rate`/s; commit-to-arrival, in ms."""
        count = int(rate * seconds)
        self.control(self.apns_url, "/_fake/reset", "POST")
        self.rings.clear()
        dispatcher = PushDispatcher(self.settings, {"apns": apns}, run_providers=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run, self.store)
            self.dispatcher = dispatcher
            start = trio.current_time()
            now = int(time.time() * 1000)
            for i in range(count):
                await trio.sleep_until(start + i / rate)
                envelope = Envelope(
                    "bench",
                    "server",
                    f"m{i}-{now}",
                    f"u{i}",
                    b"\0" * 64,
                    None,
                    True,
                    now,
                    now + 3_600_000,
                )
                await self.store.submit_send(envelope)
            self.all_rung = trio.Event()
            self.expected = count
            if len(self.rings) < count:
                await self.all_rung.wait()
            await dispatcher.wait_idle()
            self.dispatcher = None
            dispatcher.close()
        arrivals = self.control(self.apns_url, "/_fake/arrivals")
        by_token = {token: arrived for token, arrived, _ in arrivals}
        return [(by_token[_token(i)] - self.rings[f"u{i}"]) * 1000 for i in range(count)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, `repeat` times; the raw figures."""
    results: dict[str, list[float]] = {
        "log": [],
        "raw": [],
        "apns": [],
        "fcm": [],
        "p50": [],
        "p99": [],
        "cpu_log": [],
        "cpu_apns": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, Path(tmp))
        try:
            async with trio.open_nursery() as nursery:
                devices = max(args.devices, int(args.rate * args.seconds))
                await bench.setup(nursery, devices)
                apns = ApnsProvider(bench.apns)
                fcm = FcmProvider(bench.fcm)
                await nursery.start(apns.run)
                await nursery.start(fcm.run)
                n = args.devices
                await bench.raw(apns, min(n, 2000))  # warm-up: connections, JWT, caches
                for rep in range(args.repeat):
                    results["log"].append(await bench.dispatch_all({}, "u", n))
                    results["cpu_log"].append(bench.cpu_us["u0"])
                    results["raw"].append(await bench.raw(apns, n))
                    results["apns"].append(await bench.dispatch_all({"apns": apns}, "u", n))
                    results["cpu_apns"].append(bench.cpu_us["uapns"])
                    results["fcm"].append(await bench.dispatch_all({"fcm": fcm}, "f", n // 5))
                    lat = sorted(await bench.latency(apns, args.rate, args.seconds))
                    results["p50"].append(lat[len(lat) // 2])
                    results["p99"].append(lat[int(len(lat) * 0.99) - 1])
                    print(
                        f"  run {rep + 1}: "
                        + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in results.items()),
                        flush=True,
                    )
                bench.store.close()
                nursery.cancel_scope.cancel()
        finally:
            bench.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print medians and ratios."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_push",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=10000, help="wake-ups per throughput run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="wake-ups/s in the latency run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the latency run")
    parser.add_argument("--workers", type=int, default=PushSettings().workers)
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for this process (default: Python's 5 ms)",
    )
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    logging.basicConfig(level=logging.WARNING)
    results = trio.run(run, args)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nmedians of {args.repeat} runs ({args.devices:,} wake-ups per throughput run, "
        f"{args.workers} workers):"
    )
    print(f"  log provider (dispatcher + store only)  {med['log']:>9,.0f} wake-ups/s")
    print(f"  raw aioapns, no dispatcher              {med['raw']:>9,.0f} wake-ups/s")
    print(
        f"  dispatcher -> fake APNs (HTTP/2, TLS)   {med['apns']:>9,.0f} wake-ups/s"
        f"   (x{med['apns'] / med['log']:.2f} of log, x{med['apns'] / med['raw']:.2f} of raw)"
    )
    print(f"  dispatcher -> fake FCM (HTTP/1.1)       {med['fcm']:>9,.0f} wake-ups/s")
    print(
        f"  gateway-process CPU per wake-up: {med['cpu_log']:.0f} us with the log provider, "
        f"{med['cpu_apns']:.0f} us with APNs (~{1e6 / med['cpu_apns']:,.0f}/s per core)"
    )
    print(
        f"  commit -> APNs request at {args.rate:,.0f}/s: p50 {med['p50']:.1f} ms, "
        f"p99 {med['p99']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crash and dependency-fault durability, with Jepsen-style histories (scripts/histories.py).

Faults, injected again and again at random points under load:

- ``gateway-kill``: SIGKILL the gateway, start it again on the same store;
- ``redis-kill``: SIGKILL redis-server (AOF, ``appendfsync always``), start it again;
- ``redis-pause``: SIGSTOP redis-server for `--pause` seconds, then SIGCONT (what
  ``DEBUG SLEEP`` does, without enabling debug commands).

    python -m scripts.crash --fault gateway-kill --kills 50 --pairs 16
    python -m scripts.crash --fault redis-kill --kills 10 --store redis

Prints the figures and every violated guarantee; exits non-zero if there was one. Redis
faults need `redis-server` on the PATH; the script starts its own on a loopback port.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import trio

from scripts.histories import Fault, HistoryReport, run_histories
from scripts.kit.gateway_process import STORES, GatewayProcess, open_store
from scripts.kit.redis_server import RedisServer


def gateway_kill(gateway: GatewayProcess) -> Fault:
    """SIGKILL the gateway at once, then start it again on the same store."""

    async def fault() -> None:
        gateway.kill()
        await gateway.astart()

    return fault


def redis_kill(redis: RedisServer, down: float) -> Fault:
    """SIGKILL Redis, leave it down for `down` seconds, start it again."""

    async def fault() -> None:
        redis.kill()
        await trio.sleep(down)
        await redis.astart()

    return fault


def redis_pause(redis: RedisServer, pause: float) -> Fault:
    """Freeze Redis for `pause` seconds."""

    async def fault() -> None:
        redis.pause()
        try:
            await trio.sleep(pause)
        finally:
            redis.resume()

    return fault


async def run(args: argparse.Namespace, workdir: Path) -> tuple[HistoryReport, GatewayProcess]:
    """Start what the fault needs, run the histories, stop everything."""
    async with open_store(args.store, workdir) as store:
        gateway = GatewayProcess(workdir / "gateway", store=store.toml)
        await gateway.astart()
        try:
            if args.fault == "gateway-kill":
                fault = gateway_kill(gateway)
            elif store.redis is None:
                raise SystemExit(f"--fault {args.fault} needs --store redis")
            elif args.fault == "redis-kill":
                fault = redis_kill(store.redis, args.down)
            else:
                fault = redis_pause(store.redis, args.pause)
            report = await run_histories(
                gateway.url,
                pairs=args.pairs,
                faults=args.kills,
                fault=fault,
                gap=(args.min_gap, args.max_gap),
                seed=args.seed,
                tail=args.tail,
            )
        finally:
            gateway.kill()
    return report, gateway


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-crash-") as tmp:
        report, gateway = await run(args, Path(tmp))
        print(f"{args.fault} on {args.store}, {args.pairs} pairs: {report.summary()}")
        print(f"gateway starts: {gateway.starts}")
    for problem in report.problems + report.delayed:
        print("FAILED:", problem)
    return 1 if report.problems or report.delayed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=["gateway-kill", "redis-kill", "redis-pause"],
                        default="gateway-kill")  # fmt: skip
    parser.add_argument("--store", choices=STORES, default="sqlite")
    parser.add_argument("--kills", type=int, default=20, help="faults to inject")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--min-gap", type=float, default=0.5)
    parser.add_argument("--max-gap", type=float, default=2.0)
    parser.add_argument("--tail", type=float, default=2.0)
    parser.add_argument("--down", type=float, default=1.0, help="seconds Redis stays down")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds Redis is frozen")
    parser.add_argument("--seed", type=int, default=1)
    return trio.run(_main, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())

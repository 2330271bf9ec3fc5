"""Redis memory per queued and per remembered message, through a real gateway.

    python -m scripts.redis_footprint                  # 20,000 messages, 200-byte bodies
    python -m scripts.redis_footprint --messages 5000 --body 64

It starts redis-server and a gateway on it (both on 127.0.0.1, stopped on the way out),
registers one recipient device, and has `--senders` devices send `--messages` messages to
it while it is offline. Redis `used_memory` is read three times:

1. after the devices are registered (the baseline);
2. with every message queued: (2 - 1) / messages is the memory per *queued* message;
3. after the recipient has drained and acked everything and the senders have acked their
   delivered receipts, so that no queue holds anything: (3 - 1) / messages is what Redis
   keeps per *remembered* message until its TTL runs out (idempotency and read-permission
   records).

Every message gets the default TTL of the gateway (`[server] max_ttl`). Everything stops
by itself; nothing but loopback is used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import coredis
import trio

from gateway.auth import mint_token
from gateway.client import GatewayClient, connect
from gateway.settings import Settings
from scripts.kit.gateway_process import GatewayProcess
from scripts.kit.redis_server import RedisServer

RECIPIENT = ("reader", "phone")
SEND_WINDOW = 64  # sends in flight per sender
DEADLINE = 300.0  # seconds for each phase at most
POLL = 0.1  # seconds between looks at the queues while the last acks commit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000, help="messages sent (default 20,000)")
    p.add_argument("--senders", type=int, default=20, help="sending devices (default 20)")
    p.add_argument("--body", type=int, default=200, help="body bytes (default 200)")
    args = p.parse_args(argv)
    if args.messages < 1 or args.senders < 1 or args.body < 0:
        p.error("--messages and --senders must be at least 1, --body at least 0")
    return args


async def used_memory(client: coredis.Redis[bytes]) -> tuple[int, int]:
    """Redis `used_memory` and its number of keys."""
    info = await client.info("memory")
    return int(info["used_memory"]), int(await client.dbsize())


async def queued(client: coredis.Redis[bytes]) -> int:
    """Items in every queue."""
    total = 0
    async for key in client.scan_iter(match="gw:{*}:q:*", count=1000):
        total += int(await client.zcard(key))
    return total


async def measure(args: argparse.Namespace, gateway: GatewayProcess, redis_url: str) -> None:
    auth = Settings().auth
    senders = [(f"sender-{n}", "phone") for n in range(args.senders)]
    body = b"x" * args.body

    def token(user: str, device: str) -> str:
        return mint_token(auth, user, device, None)

    async with coredis.Redis.from_url(redis_url) as redis:
        async with connect(gateway.url, token(*RECIPIENT)):
            pass  # the recipient is known, and offline from here on
        receipts = trio.Semaphore(0)

        async def send_all(client: GatewayClient, count: int, first: int) -> None:
            limiter = trio.CapacityLimiter(SEND_WINDOW)

            async def one(n: int) -> None:
                async with limiter:
                    await client.send(RECIPIENT[0], body, id=f"m{n}", urgent=False)

            async with trio.open_nursery() as nursery:
                for n in range(first, first + count):
                    nursery.start_soon(one, n)

        async def count_receipts(client: GatewayClient) -> None:
            async for delivery in client.deliveries():  # acked as they come
                for _ in delivery.frame.get("ids", ()):
                    receipts.release()

        async with trio.open_nursery() as running:
            clients = []
            for user, device in senders:
                clients.append(await running.start(_connected, gateway.url, token(user, device)))
            base, base_keys = await used_memory(redis)
            print(f"baseline: used_memory {base:,} B, {base_keys:,} keys", flush=True)

            per_sender, rest = divmod(args.messages, args.senders)
            with trio.fail_after(DEADLINE):
                async with trio.open_nursery() as sending:
                    first = 0
                    for n, client in enumerate(clients):
                        count = per_sender + (1 if n < rest else 0)
                        sending.start_soon(send_all, client, count, first)
                        first += count
            full, full_keys = await used_memory(redis)
            print(f"queued:   used_memory {full:,} B, {full_keys:,} keys", flush=True)

            for client in clients:
                running.start_soon(count_receipts, client)
            with trio.fail_after(DEADLINE):
                async with connect(gateway.url, token(*RECIPIENT)) as reader:
                    running.start_soon(_read_all, reader)
                    for _ in range(args.messages):
                        await receipts.acquire()
                for _ in range(int(DEADLINE / POLL)):  # the senders' receipt acks commit
                    if not await queued(redis):
                        break
                    await trio.sleep(POLL)
            done, done_keys = await used_memory(redis)
            print(f"acked:    used_memory {done:,} B, {done_keys:,} keys", flush=True)
            running.cancel_scope.cancel()

    n = args.messages
    print()
    print(f"{'per message':24} {'bytes':>10}  keys")
    print(f"{'queued (body ' + str(args.body) + ' B)':24} {(full - base) / n:>10,.1f}  "
          f"{(full_keys - base_keys) / n:.2f}")  # fmt: skip
    print(f"{'remembered after ack':24} {(done - base) / n:>10,.1f}  "
          f"{(done_keys - base_keys) / n:.2f}")  # fmt: skip


async def _read_all(client: GatewayClient) -> None:
    """Take every delivery (each is acked as it is taken)."""
    async for _ in client.deliveries():
        pass


async def _connected(
    url: str, token: str, *, task_status: trio.TaskStatus[GatewayClient] = trio.TASK_STATUS_IGNORED
) -> None:
    """A sender device, connected until cancelled."""
    async with connect(url, token) as client:
        task_status.started(client)
        await trio.sleep_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement; the exit status is 0 when it completed."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="redis-footprint-") as tmp:
        work = Path(tmp)
        redis = RedisServer(work / "redis", appendfsync="everysec")
        redis.start()
        try:
            gateway = GatewayProcess(
                work / "gateway",
                store=f'backend = "redis"\nredis_url = "{redis.url}"',
                log_level="warning",
            )
            gateway.start()
            try:
                trio.run(measure, args, gateway, redis.url)
            finally:
                gateway.stop(grace=5)
        finally:
            redis.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a cluster doorbell costs Redis as the cluster grows: classic against sharded pub/sub.

    python -m scripts.bench_doorbells                       # 1, 3 and 6 shards
    python -m scripts.bench_doorbells --shards 1,3 --messages 20000

A doorbell tells the node a device is connected to that an item is queued for it; today
it is a classic `PUBLISH` on the node's channel, from the script that queues the item. On
Redis Cluster a classic `PUBLISH` is forwarded over the cluster bus to every node,
whatever the channel, so each doorbell costs every shard something. A sharded `SPUBLISH`
goes to the one shard that owns the channel's hash slot (and its replicas).

For each cluster size this starts a fresh cluster on 127.0.0.1 (`scripts.kit.redis_cluster`,
one primary per shard, `--replicas` each), subscribes one reader to a node channel the
way a gateway node does, publishes `--messages` doorbells of the gateway's size from
another node, waits until the reader has them all, and reads the CPU time of every
redis-server from /proc. It prints Redis CPU per doorbell (all servers together, and on
the busiest one) for each way. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from coredis._utils import hash_slot

from scripts.kit import procfs
from scripts.kit.loopback import HOST
from scripts.kit.redis_cluster import RedisCluster
from scripts.kit.redis_server import RedisServer

BATCH = 500  # commands per pipelined write
PAYLOAD = b"b7:alice-15:phone-12345678" + b"x" * 70  # about a doorbell's size
DEADLINE = 120.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", default="1,3,6", help="cluster sizes (default 1,3,6)")
    p.add_argument("--replicas", type=int, default=0, help="replicas per primary (default 0)")
    p.add_argument("--messages", type=int, default=50_000, help="doorbells per way (50,000)")
    args = p.parse_args(argv)
    args.sizes = [int(n) for n in args.shards.split(",")]
    if any(n < 1 for n in args.sizes) or args.messages < 1 or args.replicas < 0:
        p.error("--shards and --messages must be positive, --replicas not negative")
    return args


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Reader(threading.Thread):
    """A subscriber that counts the messages of one channel it receives."""

    def __init__(self, server: RedisServer, verb: bytes, channel: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((HOST, server.port))
        self.sock.sendall(_command(verb, channel))
        self.channel = channel
        self.seen = -1  # the subscription's confirmation names the channel too
        self.subscribed = threading.Event()

    def run(self) -> None:
        tail = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            data = tail + chunk
            self.seen += data.count(self.channel)
            tail = data[-(len(self.channel) - 1) :]
            if self.seen >= 0:
                self.subscribed.set()

    def close(self) -> None:
        self.sock.close()


def publish(server: RedisServer, verb: bytes, channel: bytes, count: int) -> None:
    """`count` publishes, pipelined, each answer read."""
    with socket.create_connection((HOST, server.port)) as sock:
        sock.settimeout(DEADLINE)
        one = _command(verb, channel, PAYLOAD)
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            sock.sendall(one * n)
            answers = b""
            while answers.count(b"\r\n") < n:
                answers += sock.recv(65536)
            if b"-" in answers[:1] or b"\r\n-" in answers:
                raise RuntimeError(f"{verb.decode()} refused: {answers[:200]!r}")


def measure(cluster: RedisCluster, verb: bytes, channel: bytes, count: int) -> tuple[float, float]:
    """Redis CPU µs per message, all servers together and on the busiest one."""
    slot = hash_slot(channel)
    home = cluster.owner(slot)
    # Classic pub/sub: the reader on the first primary, the publisher on the last (another
    # node when there are several). Sharded: both on the channel's shard, as they must be.
    reader_at = home if verb == b"SPUBLISH" else cluster.primaries[0]
    writer_at = home if verb == b"SPUBLISH" else cluster.primaries[-1]
    reader = Reader(reader_at, b"SSUBSCRIBE" if verb == b"SPUBLISH" else b"SUBSCRIBE", channel)
    reader.start()
    if not reader.subscribed.wait(10):
        raise RuntimeError("the subscription was not confirmed")
    pids = cluster.pids()
    before = [procfs.cpu_seconds(pid) for pid in pids]
    publish(writer_at, verb, channel, count)
    deadline = time.monotonic() + DEADLINE
    while reader.seen < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the reader got {reader.seen} of {count}")
        time.sleep(0.01)
    time.sleep(0.2)  # let the cluster bus settle on the other nodes
    after = [procfs.cpu_seconds(pid) for pid in pids]
    reader.close()
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return sum(spent) / count * 1e6, max(spent) / count * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every cluster size; the exit status is 0 when all completed."""
    args = parse_args(argv)
    rows = []
    for shards in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-doorbells-") as tmp:
            cluster = RedisCluster(Path(tmp), primaries=shards, replicas=args.replicas)
            cluster.start()
            try:
                classic = measure(cluster, b"PUBLISH", b"gw:node:n1", args.messages)
                sharded = measure(cluster, b"SPUBLISH", b"gw:{node:n1}:bells", args.messages)
            finally:
                cluster.stop()
        rows.append((shards, classic, sharded))
        print(f"{shards} shard(s): done", flush=True)
    print()
    print(
        f"Redis CPU per doorbell, µs ({args.messages:,} each, {args.replicas} replica(s) per shard)"
    )
    print(f"{'shards':>6}  {'PUBLISH all':>11} {'busiest':>8}  {'SPUBLISH all':>12} {'busiest':>8}")
    for shards, (c_all, c_max), (s_all, s_max) in rows:
        print(f"{shards:>6}  {c_all:>11.2f} {c_max:>8.2f}  {s_all:>12.2f} {s_max:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

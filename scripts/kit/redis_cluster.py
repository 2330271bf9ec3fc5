"""A Redis Cluster of redis-server child processes on loopback: any number of primaries,
each with any number of replicas.

The cluster is joined by hand (``CLUSTER MEET``, ``CLUSTER ADDSLOTSRANGE``, ``CLUSTER
REPLICATE``) rather than by ``redis-cli --cluster create``, which needs three primaries at
least: a one-shard cluster is a valid baseline for measuring what more shards cost.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from scripts.kit.loopback import HOST, free_port
from scripts.kit.redis_server import RedisServer

SLOTS = 16384
CLUSTER_BUS_OFFSET = 10000
START_TIMEOUT = 20.0
FAILOVER_TIMEOUT = 30.0
POLL = 0.05
NODE_TIMEOUT_MS = 1000


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


class RedisCluster:
    """`primaries` shards, each a primary with `replicas` replicas, in `directory`.

    The slots are split evenly in order: shard k holds ``slot_ranges[k]``. `url` names the
    first primary; clients discover the rest. A node that misses `node_timeout_ms` of
    heartbeats counts as failed, and its replica takes over (Redis's own default is 15 s;
    a scratch cluster fails over in a second or two).

    Raises:
        RuntimeError: redis-server is not installed, or the cluster does not come up.
    """

    def __init__(
        self,
        directory: Path,
        *,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary")
        # A replica may always take over (validity factor 0): on loopback a replica is
        # never far behind, and a failover test must not stall on an old link.
        args = [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip
        self.primaries = [
            RedisServer(directory / f"primary{n}", port=free_cluster_port(), args=args)
            for n in range(primaries)
        ]
        self.replicas = [
            [
                RedisServer(directory / f"replica{n}-{r}", port=free_cluster_port(), args=args)
                for r in range(replicas)
            ]
            for n in range(primaries)
        ]
        step = SLOTS // primaries
        self.slot_ranges = [
            (n * step, SLOTS - 1 if n == primaries - 1 else (n + 1) * step - 1)
            for n in range(primaries)
        ]

    @property
    def servers(self) -> list[RedisServer]:
        """Every server, primaries first."""
        return [*self.primaries, *(r for shard in self.replicas for r in shard)]

    @property
    def url(self) -> str:
        """A URL naming the first primary."""
        return f"redis://{HOST}:{self.primaries[0].port}"

    def start(self) -> None:
        """Start every server, join them, give out the slots and wait until every server
        says ``cluster_state:ok``; on failure nothing is left running."""
        try:
            for server in self.servers:
                server.start()
            first = self.primaries[0]
            for server in self.servers[1:]:
                server.command("CLUSTER", "MEET", HOST, str(first.port))
            for server, (low, high) in zip(self.primaries, self.slot_ranges, strict=True):
                server.command("CLUSTER", "ADDSLOTSRANGE", str(low), str(high))
            self._wait(self._knows_all, "the nodes did not meet", again=self._meet_again)
            for primary, shard in zip(self.primaries, self.replicas, strict=True):
                node_id = primary.command("CLUSTER", "MYID").decode()
                for replica in shard:
                    replica.command("CLUSTER", "REPLICATE", node_id)
            self._wait(lambda s: b"cluster_state:ok" in s.command("CLUSTER", "INFO"),
                       "the cluster did not reach cluster_state:ok")  # fmt: skip
            self._wait(self._in_sync, "the replicas did not finish their first sync")
        except BaseException:
            self.stop()
            raise

    def _knows_all(self, server: RedisServer) -> bool:
        nodes = server.command("CLUSTER", "NODES").decode().splitlines()
        return len(nodes) == len(self.servers) and not any("handshake" in n for n in nodes)

    def _in_sync(self, server: RedisServer) -> bool:
        """A primary has its replicas; a replica's link to its primary is up."""
        info = server.command("INFO", "replication").decode()
        if "role:master" in info:
            wanted = len(self.replicas[self.primaries.index(server)])
            return f"connected_slaves:{wanted}" in info
        return "master_link_status:up" in info and "master_sync_in_progress:0" in info

    def _meet_again(self) -> None:
        """MEET every node again from those that do not yet know them all: a handshake
        that two nodes started at once can be dropped, and gossip alone may not redo it
        before the node timeout."""
        for server in self.servers:
            if not self._knows_all(server):
                for other in self.servers:
                    if other is not server:
                        server.command("CLUSTER", "MEET", HOST, str(other.port))

    def _wait(
        self,
        ready: Callable[[RedisServer], bool],
        failure: str,
        again: Callable[[], None] | None = None,
    ) -> None:
        """Poll until every server is `ready`; `again` runs once a second meanwhile."""
        deadline = time.monotonic() + START_TIMEOUT
        nudge = time.monotonic() + 1.0
        while not all(ready(s) for s in self.servers):
            if time.monotonic() > deadline:
                raise RuntimeError(failure)
            if again is not None and time.monotonic() > nudge:
                again()
                nudge = time.monotonic() + 1.0
            time.sleep(POLL)

    def role(self, server: RedisServer) -> str:
        """``master`` or ``slave``, as the running `server` says."""
        for line in server.command("INFO", "replication").decode().splitlines():
            if line.startswith("role:"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError(f"no role in INFO replication of port {server.port}")

    def live_primaries(self) -> list[RedisServer]:
        """The running servers that are primaries now (failovers move the role)."""
        return [s for s in self.servers if s.running and self.role(s) == "master"]

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        """The running servers that replicate `primary` now, their link up."""
        return [
            s
            for s in self.servers
            if s is not primary and s.running and _replicates(s, primary.port)
        ]

    async def fail_over(self, primary: RedisServer, replica_lag: float = 0.0) -> RedisServer:
        """SIGKILL `primary`, wait until one of its replicas has taken over and every
        running node says ``cluster_state:ok``, then start the killed one again, which
        rejoins as a replica of the new primary; returns the new primary once that replica
        has its first sync.

        With `replica_lag`, the replicas are frozen (SIGSTOP) that many seconds before the
        kill, then SIGKILLed and started again on their own files: what the primary
        acknowledged meanwhile never reached their data (it sat unread in their sockets),
        as when a replica lags behind its primary across a slow link. (Frozen and thawed
        instead, a replica would read it all from its socket and lose nothing.)

        Raises:
            RuntimeError: `primary` has no replica, or the failover or the rejoin did not
                finish within FAILOVER_TIMEOUT.
        """
        replicas = self.replicas_of(primary)
        if not replicas:
            raise RuntimeError(f"the primary on port {primary.port} has no replica")
        if replica_lag > 0:
            for replica in replicas:
                replica.pause()
            try:
                await trio.sleep(replica_lag)
                primary.kill()
            finally:
                for replica in replicas:
                    replica.kill()
            for replica in replicas:
                await replica.astart()
        else:
            primary.kill()
        deadline = time.monotonic() + FAILOVER_TIMEOUT
        promoted: RedisServer | None = None
        while promoted is None or not self._all_ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica of port {primary.port} took over")
            await trio.sleep(POLL)
            promoted = next((r for r in replicas if self.role(r) == "master"), None)
        await primary.astart()
        while not (_replicates(primary, promoted.port) and self._all_ok()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {primary.port} did not rejoin as a replica")
            await trio.sleep(POLL)
        return promoted

    def _all_ok(self) -> bool:
        return all(
            b"cluster_state:ok" in s.command("CLUSTER", "INFO") for s in self.servers if s.running
        )

    def owner(self, slot: int) -> RedisServer:
        """The primary that holds `slot`."""
        for server, (low, high) in zip(self.primaries, self.slot_ranges, strict=True):
            if low <= slot <= high:
                return server
        raise ValueError(f"no slot {slot}")

    def pids(self) -> list[int]:
        """Every server's process id."""
        return [s.pid for s in self.servers]

    def stop(self) -> None:
        """Stop every server (SIGKILL: nothing of a scratch cluster needs to survive)."""
        for server in self.servers:
            server.kill()


def _replicates(server: RedisServer, primary_port: int) -> bool:
    """`server` is a replica of the primary on `primary_port`, in sync with it."""
    info = server.command("INFO", "replication").decode()
    return (
        "role:slave" in info
        and f"master_port:{primary_port}\r" in info
        and "master_link_status:up" in info
        and "master_sync_in_progress:0" in info
    )

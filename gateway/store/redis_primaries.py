"""Long-lived clients of each Redis Cluster primary, for the commands that must visit every
primary in turn (SCAN, in the expiry sweep).

coredis's `RedisCluster.primaries` builds a new client, with a pool of its own, for each
primary on every call: one TCP connection opened and closed per primary per sweep and,
left behind by each close, a few hundred objects in reference cycles (cancelled tasks and
their tracebacks) that wait for a full garbage collection. Here each primary's client is
opened once and held open by a task of its own in the store's nursery (a coredis client
is closed by the task that opened it); it is closed when its node is no longer a primary,
when it fails, or when the store closes.
"""

from __future__ import annotations

import logging

import coredis
import trio
from coredis.cluster._node import ClusterNodeLocation

log = logging.getLogger(__name__)

Address = tuple[str, int]


class PrimaryClients:
    """One open client per current primary of `cluster`, held in `nursery`."""

    def __init__(self, cluster: coredis.RedisCluster[bytes], nursery: trio.Nursery) -> None:
        self._cluster = cluster
        self._nursery = nursery
        self._open: dict[Address, tuple[coredis.Redis[bytes], trio.CancelScope]] = {}

    async def clients(self) -> list[coredis.Redis[bytes]]:
        """A client of each primary of the cluster's current layout, opening those not yet
        open and closing those of nodes that are no longer primaries.

        Raises:
            Whatever coredis raises when a primary cannot be reached.
        """
        primaries = {
            (p.host, p.port): p for p in self._cluster.connection_pool.cluster_layout.primaries
        }
        for address in self._open.keys() - primaries.keys():
            self._open.pop(address)[1].cancel()
        clients = []
        for address, node in primaries.items():
            if address not in self._open:
                self._open[address] = await self._nursery.start(self._hold, address, node)
            clients.append(self._open[address][0])
        return clients

    async def _hold(
        self,
        address: Address,
        node: ClusterNodeLocation,
        *,
        task_status: trio.TaskStatus[tuple[coredis.Redis[bytes], trio.CancelScope]],
    ) -> None:
        """Open a client of `node` and keep it open until cancelled or failed."""
        client: coredis.Redis[bytes] = node.as_client(
            **self._cluster.connection_pool.connection_kwargs
        )
        started = False
        try:
            with trio.CancelScope() as scope:
                async with client:
                    task_status.started((client, scope))
                    started = True
                    await trio.sleep_forever()
        except Exception as exc:
            if not started:
                raise  # the caller's `start` fails with it
            # A node that went away: its client is opened again when next asked for.
            log.info("redis primary %s:%d: client closed: %s", *address, exc)
        finally:
            held = self._open.get(address)
            if held is not None and held[0] is client:
                del self._open[address]

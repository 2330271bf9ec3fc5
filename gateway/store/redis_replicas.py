"""Waiting for replicas: ``WAIT numreplicas timeout`` on every primary a pipeline wrote to.

Redis replicates asynchronously: a primary answers a write before any replica has it, and
a failover to a replica loses what had not reached it. With `replicas` > 0, the writer
appends, for each primary its pipeline's script calls go to, an ``INCR`` of a small
counter on that primary and then ``WAIT replicas timeout``. Both travel in the same
pipeline on the same connection as that primary's calls, so they cost no extra round trip,
only the time the replicas take to acknowledge.

``WAIT`` waits for the replication offset of the *connection's* last write. The counter
makes that offset cover every call before it on that primary, even a pipeline whose calls
wrote nothing (a resent message whose id is already stored): its `sent` then also waits
until the replicas have the original.

A primary's calls count as replicated only if its ``WAIT`` counted `replicas` replicas,
and, on Redis Cluster, if the slot map still names the same primary for their slots after
the pipeline (a call redirected to a new primary by ``MOVED`` was not covered by the
``WAIT`` sent to the old one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import coredis
from coredis._utils import hash_slot
from coredis.exceptions import RedisClusterError, RedisError
from coredis.response._callbacks import IntCallback

from gateway.errors import StoreError

WAIT = b"WAIT"
# The counter on a single Redis; on a cluster, one per primary, each named so that its
# hash tag falls in a slot the primary holds (found by trying tags in turn).
COUNTER = "gw:replicated"
CLUSTER_COUNTER = "gw:{replicated:%d}"
MAX_TAG_TRIES = 100_000


class NotReplicated(StoreError):
    """Fewer replicas than required acknowledged an operation's writes in time: they may
    be committed on the primary, but a failover could lose them."""


@dataclass(slots=True)
class _Primary:
    """The calls of one pipeline bound to one primary, and its WAIT."""

    node: str  # the primary's name in the slot map ("" on a single Redis)
    counter: str
    calls: list[int] = field(default_factory=list)
    slots: set[int] = field(default_factory=set)
    answers: list[Any] = field(default_factory=list)  # the INCR's and WAIT's requests


class ReplicaWait:
    """Adds the ``WAIT``s to a pipeline and says which calls they did not cover.

    Args:
        client: The client whose pipelines carry the calls.
        replicas: Replicas that must acknowledge each write (at least 1).
        timeout: Seconds each ``WAIT`` waits at most.
    """

    def __init__(self, client: Any, replicas: int, timeout: float) -> None:
        self._client = client
        self._cluster = isinstance(client, coredis.RedisCluster)
        self.replicas = replicas
        self.timeout_ms = max(1, round(timeout * 1000))
        self._counters: dict[str, str] = {}  # primary name -> its counter key

    def add(self, pipe: Any, keys: Sequence[Sequence[str]]) -> list[_Primary]:
        """Queue an ``INCR`` and a ``WAIT`` on `pipe` for each primary that the calls
        (given by their keys, in pipeline order) go to; call after the calls."""
        primaries: dict[str, _Primary] = {}
        for n, call_keys in enumerate(keys):
            if self._cluster:
                slot = hash_slot(call_keys[0].encode()) if call_keys else 0
                node = self._node(slot)
            else:
                slot, node = 0, ""
            if node not in primaries:
                primaries[node] = _Primary(node, self._counter(node))
            primaries[node].calls.append(n)
            primaries[node].slots.add(slot)
        for primary in primaries.values():
            wait = pipe.create_request(WAIT, self.replicas, self.timeout_ms, callback=IntCallback())
            if self._cluster:
                wait = wait.route(hash_slot(primary.counter.encode()))
            primary.answers = [pipe.incr(primary.counter), wait]
        return list(primaries.values())

    async def shortfall(self, primaries: list[_Primary]) -> dict[int, NotReplicated]:
        """Once the pipeline has run: the calls (by index) whose writes the replicas did
        not all acknowledge, each with its error."""
        failed: dict[int, NotReplicated] = {}
        for primary in primaries:
            error = await self._check(primary)
            if error is not None:
                failed.update(dict.fromkeys(primary.calls, error))
        return failed

    async def _check(self, primary: _Primary) -> NotReplicated | None:
        try:
            await primary.answers[0]
            acked = await primary.answers[1]
        except (RedisError, TimeoutError, OSError) as exc:
            return NotReplicated(f"not known to be replicated: {exc}")
        if acked < self.replicas:
            return NotReplicated(
                f"{acked} of {self.replicas} replicas acknowledged within {self.timeout_ms} ms"
            )
        if self._cluster:
            try:
                moved = any(self._node(s) != primary.node for s in primary.slots) or (
                    self._node(hash_slot(primary.counter.encode())) != primary.node
                )
            except RedisError as exc:
                return NotReplicated(f"not known to be replicated: {exc}")
            if moved:
                return NotReplicated("not known to be replicated: the slot moved meanwhile")
        return None

    def _node(self, slot: int) -> str:
        """The name of the primary holding `slot`, by the client's slot map."""
        node: str = self._client.connection_pool.cluster_layout.node_for_slot(slot).name
        return node

    def _counter(self, node: str) -> str:
        """The counter key on `node` (a key of a slot `node` holds)."""
        if not self._cluster:
            return COUNTER
        key = self._counters.get(node)
        if key is not None and self._owner(key) == node:
            return key
        for n in range(MAX_TAG_TRIES):
            key = CLUSTER_COUNTER % n
            if self._owner(key) == node:
                self._counters[node] = key
                return key
        raise RedisClusterError(f"no counter key found for the primary {node}")

    def _owner(self, key: str) -> str | None:
        try:
            return self._node(hash_slot(key.encode()))
        except RedisError:
            return None

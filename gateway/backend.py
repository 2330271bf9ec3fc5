"""The configured store, and on Redis what runs beside it: the cluster link and presence.

On SQLite the gateway is one process: doorbells and presence stay in memory; so on the
memory backend, which is not durable and serves tests and benchmarks. On Redis
(``[store] backend = "redis"``) many processes share the store, so the same settings
also bring a `ClusterLink` (the device -> node registry and the doorbells between nodes)
and a `ClusterPresence` (presence read from Redis into a local mirror).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.cluster import ClusterLink
from gateway.cluster_presence import ClusterPresence
from gateway.counters import Counters
from gateway.errors import ConfigError
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store.base import MessageStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Backend:
    """The store, with its cluster parts when it is shared (None on SQLite)."""

    store: MessageStore
    cluster: ClusterLink | None = None
    cluster_presence: ClusterPresence | None = None


def open_backend(
    settings: Settings, registry: Registry, counters: Counters, *, node_id: str
) -> Backend:
    """Build the configured backend; start its store with ``nursery.start(store.run)``.

    The store rings `registry` after each commit. `counters.redis` receives the Redis
    backend's and the cluster link's events; `node_id` names this process among the
    nodes sharing Redis.

    Raises:
        ConfigError: The backend named in `[store] backend` does not exist.
    """
    store_settings = settings.store
    receipt_ttl_ms = settings.server.max_ttl * 1000
    if store_settings.backend == "memory":
        from gateway.store.memory import MemoryStore

        log.warning("the memory store is not durable: everything queued is lost on exit")
        return Backend(
            MemoryStore(
                doorbell=registry.ring,
                max_batch=store_settings.max_batch,
                receipt_ttl_ms=receipt_ttl_ms,
            )
        )
    if store_settings.backend == "sqlite":
        from gateway.store.sqlite import SqliteStore

        sqlite = SqliteStore(
            store_settings.path,
            doorbell=registry.ring,
            synchronous=store_settings.synchronous,
            max_batch=store_settings.max_batch,
            receipt_ttl_ms=receipt_ttl_ms,
        )
        return Backend(sqlite)
    if store_settings.backend != "redis":
        raise ConfigError(f"[store] backend = {store_settings.backend!r} is not available")
    from gateway.store.redis import RedisStore
    from gateway.store.redis_bus import RedisBus

    redis = RedisStore(
        store_settings.redis_url,
        doorbell=registry.ring,
        max_batch=store_settings.max_batch,
        receipt_ttl_ms=receipt_ttl_ms,
        counters=counters.redis,
        node_id=node_id,
        cluster=store_settings.redis_cluster,
        on_recovered=registry.ring_all,
        replicas=store_settings.redis_replicas,
        replica_timeout=store_settings.redis_replica_timeout,
    )
    bus = RedisBus(redis)
    presence = ClusterPresence(bus, reconcile=settings.cluster.catchup_interval)
    link = ClusterLink(
        bus,
        registry,
        counters=counters.redis,
        node_ttl=settings.cluster.node_ttl,
        catchup_interval=settings.cluster.catchup_interval,
        offline_grace=settings.presence.offline_grace,
        on_event=presence.on_event,
    )
    return Backend(redis, link, presence)

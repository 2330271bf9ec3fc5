"""Durable per-device queues: the interface and its backends."""

from __future__ import annotations

from collections import Counter

from gateway.errors import ConfigError
from gateway.settings import Settings
from gateway.store.base import (
    DeviceRecord,
    Doorbell,
    Envelope,
    ItemKind,
    MessageStore,
    PushToken,
    QueueItem,
    SendOutcome,
    SessionOpening,
    Ticket,
)

__all__ = [
    "DeviceRecord",
    "Doorbell",
    "Envelope",
    "ItemKind",
    "MessageStore",
    "PushToken",
    "QueueItem",
    "SendOutcome",
    "SessionOpening",
    "Ticket",
    "open_store",
]


def open_store(
    settings: Settings,
    doorbell: Doorbell,
    *,
    counters: Counter[str] | None = None,
    node_id: str = "",
) -> MessageStore:
    """Build the configured backend; start it with ``await nursery.start(store.run)``.

    `counters` receives the Redis backend's error and recovery counts; `node_id` names
    this process among the nodes sharing Redis.
    """
    if settings.store.backend == "redis":
        from gateway.store.redis import RedisStore

        return RedisStore(
            settings.store.redis_url,
            doorbell=doorbell,
            max_batch=settings.store.max_batch,
            receipt_ttl_ms=settings.server.max_ttl * 1000,
            counters=counters,
            node_id=node_id,
            cluster=settings.store.redis_cluster,
        )
    from gateway.store.sqlite import SqliteStore

    if settings.store.backend != "sqlite":
        raise ConfigError(f"[store] backend = {settings.store.backend!r} is not available")
    return SqliteStore(
        settings.store.path,
        doorbell=doorbell,
        synchronous=settings.store.synchronous,
        max_batch=settings.store.max_batch,
        receipt_ttl_ms=settings.server.max_ttl * 1000,
    )

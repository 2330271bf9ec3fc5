"""Connects the presence service to this process's connections."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

from gateway import frames
from gateway.clock import now_ms
from gateway.registry import Registry
from gateway.settings import PresenceSettings
from presence.fanout import Fanout
from presence.service import PresenceService
from presence.state import MemoryPresence, PresenceItem, PresenceState
from presence.typing import TypingTracker

Refresh = Callable[[tuple[str, ...]], Awaitable[list[PresenceItem]]]


def build_presence(
    settings: PresenceSettings,
    registry: Registry,
    *,
    overloaded: Callable[[], bool],
    shed: Counter[str],
    state: PresenceState | None = None,
    refresh: Refresh | None = None,
) -> PresenceService:
    """A presence service whose frames go to the connections in `registry`.

    On a cluster, `state` is the mirror of the presence held in Redis and `refresh` reads
    users back from it (both from a `ClusterPresence`); on one node the state is kept in
    memory.

    Presence and typing are sheddable: they are offered to a connection's outbox, which
    refuses them once it is half full, while messages and receipts always get a place.
    """

    def deliver(conn_id: int, items: list[PresenceItem]) -> bool:
        conn = registry.by_id(conn_id)
        return conn is None or conn.offer(frames.presence(items))

    def relay_typing(sender: str, sender_device: str, target: str, on: bool) -> None:
        frame = frames.typing(sender, on)
        for conn in registry.of_user(target):
            if (conn.user, conn.device) == (sender, sender_device) or not conn.active:
                continue
            if not conn.offer(frame):
                shed["typing"] += 1

    return PresenceService(
        state if state is not None else MemoryPresence(settings.offline_grace),
        Fanout(settings.batch_ms / 1000, max_watch=settings.max_watch),
        TypingTracker(),
        deliver=deliver,
        relay_typing=relay_typing,
        wall_ms=now_ms,
        overloaded=overloaded,
        shed=shed,
        refresh=refresh,
    )

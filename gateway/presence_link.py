"""Connects the presence service to this process's connections."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import frames
from gateway.connection import now_ms
from presence.fanout import Fanout
from presence.service import PresenceService
from presence.state import MemoryPresence
from presence.typing import TypingTracker

if TYPE_CHECKING:
    from gateway.server import Gateway


def build_presence(gateway: Gateway) -> PresenceService:
    """A presence service whose frames go to `gateway`'s connections.

    Presence and typing are sheddable: they are offered to a connection's outbox, which
    refuses them once it is half full, while messages and receipts always get a place.
    """
    settings = gateway.settings.presence

    def deliver(conn_id: int, frame: dict[str, Any]) -> bool:
        conn = gateway.connections.get(conn_id)
        return conn is None or conn.outbox.offer(frame)

    def relay_typing(sender: str, sender_device: str, target: str, on: bool) -> None:
        frame = frames.typing(sender, on)
        for conn in gateway.registry.of_user(target):
            if (conn.user, conn.device) == (sender, sender_device) or not conn.active:
                continue
            if not conn.outbox.offer(frame):
                gateway.metrics.shed["typing"] += 1

    return PresenceService(
        MemoryPresence(settings.offline_grace),
        Fanout(settings.batch_ms / 1000, max_watch=settings.max_watch),
        TypingTracker(),
        deliver=deliver,
        relay_typing=relay_typing,
        wall_ms=now_ms,
        overloaded=lambda: gateway.load.overloaded,
        shed=gateway.metrics.shed,
    )


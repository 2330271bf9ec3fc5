"""Connects the presence service to this process's connections."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import frames
from gateway.clock import now_ms
from gateway.cluster_presence import ClusterPresence
from presence.fanout import Fanout
from presence.service import PresenceService
from presence.state import MemoryPresence, MirrorPresence, PresenceState
from presence.typing import TypingTracker

if TYPE_CHECKING:
    from gateway.server import Gateway


def build_presence(gateway: Gateway) -> PresenceService:
    """A presence service whose frames go to `gateway`'s connections.

    On a cluster, the service works on a mirror of the presence held in Redis, kept up to
    date by a `ClusterPresence` (which `serve_gateway` runs).

    Presence and typing are sheddable: they are offered to a connection's outbox, which
    refuses them once it is half full, while messages and receipts always get a place.
    """
    settings = gateway.settings.presence

    def deliver(conn_id: int, frame: dict[str, Any]) -> bool:
        conn = gateway.connections.get(conn_id)
        return conn is None or conn.offer(frame)

    def relay_typing(sender: str, sender_device: str, target: str, on: bool) -> None:
        frame = frames.typing(sender, on)
        for conn in gateway.registry.of_user(target):
            if (conn.user, conn.device) == (sender, sender_device) or not conn.active:
                continue
            if not conn.offer(frame):
                gateway.metrics.shed["typing"] += 1

    state: PresenceState = MemoryPresence(settings.offline_grace)
    refresh = None
    if gateway.cluster is not None:
        mirror = MirrorPresence()
        state = mirror
        link = gateway.cluster_presence = ClusterPresence(
            gateway.cluster.store, mirror, reconcile=gateway.settings.cluster.catchup_interval
        )
        mirror.on_hidden = link.on_hidden
        gateway.cluster.on_event = link.on_event
        refresh = link.refresh

    service = PresenceService(
        state,
        Fanout(settings.batch_ms / 1000, max_watch=settings.max_watch),
        TypingTracker(),
        deliver=deliver,
        relay_typing=relay_typing,
        wall_ms=now_ms,
        overloaded=lambda: gateway.load.overloaded,
        shed=gateway.metrics.shed,
        refresh=refresh,
    )
    if gateway.cluster_presence is not None:
        gateway.cluster_presence.service = service
    return service

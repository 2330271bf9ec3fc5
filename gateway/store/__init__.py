"""Durable per-device queues: the interface and its backends."""

from __future__ import annotations

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
]

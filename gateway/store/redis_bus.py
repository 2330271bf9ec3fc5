"""The cluster bus on Redis: claims, doorbells, kicks, revocations and presence events.

A claim is ``P:node:DEVICE`` = ``NODE|CONNECTION`` with a TTL. Messages travel on pub/sub:
each node listens on its own channel (``gw:node:NODE``: kicks ``k``, revocations ``r``,
and doorbells ``b`` on a single Redis) and on ``gw:events`` (connected ``c``,
disconnected ``d``, hidden changed ``h``, alert wake-up sent ``a``). On Redis Cluster
doorbells, the one message sent for every item queued for a device on another node, go on
the node's sharded channel (``gw:{node:NODE}:bells``, `SPUBLISH`), which one shard
carries, instead of a classic channel that every node of the cluster relays. Every message
starts with its kind and the device (see `wire_device`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import coredis
import trio

from gateway.errors import StoreError
from gateway.store.bus import (
    BusMessage,
    Claim,
    Event,
    EventKind,
    Kick,
    PresenceRecord,
    RemoteRing,
    Renewal,
    Revocation,
)
from gateway.store.redis import (
    NODE_CHANNEL,
    REDIS_ERRORS,
    Call,
    RedisStore,
    decode_member,
    doorbell_channel,
    uncancelled,
)
from gateway.store.redis_scripts import prefix, read_device, wire_device

log = logging.getLogger(__name__)

EVENTS = "gw:events"


class RedisBus:
    """`gateway.store.bus.ClusterBus` over a started `RedisStore`'s client and scripts."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    @property
    def node_id(self) -> str:
        """This node's name among the nodes sharing Redis."""
        return self._store.node_id

    def _value(self, claim: Claim) -> str:
        return f"{self.node_id}|{claim.conn_id}"

    async def claim(self, claim: Claim, ttl_ms: int) -> bool:
        """Set the claim; the script kicks the previous connection on its node."""
        user, device = claim.user, claim.device
        args: list[str | int | bytes] = [
            self._value(claim),
            ttl_ms,
            wire_device(user, device),
            self.node_id,
        ]
        [answer] = await self._store.run_scripts(
            [("claim", [f"{prefix(user)}:node:{device}"], args)]
        )
        if isinstance(answer, Exception):
            raise StoreError(f"claim failed: {answer}")
        return answer is not None and not answer.startswith(self.node_id.encode() + b"|")

    async def renew(self, claims: Sequence[Claim], ttl_ms: int) -> list[Renewal]:
        """Renew claims; one Redis refused is reported renewed and tried again next time."""
        calls: list[Call] = [
            ("refresh", [f"{prefix(c.user)}:node:{c.device}"], [self._value(c), ttl_ms])
            for c in claims
        ]
        answers = await self._store.run_scripts(calls)
        return [Renewal.RENEWED if isinstance(a, Exception) else Renewal(a) for a in answers]

    async def release(self, claims: Sequence[Claim], now: int, grace_ms: int) -> None:
        """Delete the claims still held by these connections, starting the grace period."""
        calls: list[Call] = []
        for c in claims:
            p = prefix(c.user)
            keys = [f"{p}:node:{c.device}", f"{p}:seen", f"{p}:grace"]
            args: list[str | int | bytes] = [
                self._value(c),
                now,
                grace_ms,
                wire_device(c.user, c.device),
            ]
            calls.append(("release", keys, args))
        await self._store.run_scripts(calls)

    async def close_revoked(self, user: str, device: str) -> bool:
        """Publish a revocation on the channel of the node holding the device."""
        client = self._store.client
        try:
            with uncancelled():
                claim = await client.get(f"{prefix(user)}:node:{device}")
                if claim is None:
                    return False
                node, _, conn_id = claim.partition(b"|")
                if node.decode() == self.node_id:
                    return False
                message = b"r" + wire_device(user, device) + conn_id
                await client.publish(NODE_CHANNEL + node.decode(), message)
        except REDIS_ERRORS as exc:
            raise StoreError(f"revocation not sent to the device's node: {exc}") from None
        return True

    async def announce_alerts(self, devices: Sequence[tuple[str, str]]) -> None:
        """Publish an ALERTED event per device on the events channel."""
        client = self._store.client
        messages = [b"a" + wire_device(user, device) for user, device in devices]
        try:
            with uncancelled():
                if isinstance(client, coredis.RedisCluster):  # PUBLISH names no key to route by
                    for message in messages:
                        await client.publish(EVENTS, message)
                else:
                    async with client.pipeline(transaction=False) as pipe:
                        for message in messages:
                            pipe.publish(EVENTS, message)
        except REDIS_ERRORS as exc:
            raise StoreError(f"alert wake-ups not announced: {exc}") from None

    async def listen(
        self, on_message: Callable[[BusMessage], None], on_listening: Callable[[], None]
    ) -> None:
        """Subscribe to this node's channel and the events channel (and on Redis Cluster
        to this node's sharded doorbell channel) until a subscription is lost; malformed
        messages are logged and skipped."""
        client = self._store.client
        subscriptions: list[Any] = [
            client.pubsub(
                channels=[NODE_CHANNEL + self.node_id, EVENTS],
                ignore_subscribe_messages=True,
                retry_policy=None,
            )
        ]
        if isinstance(client, coredis.RedisCluster):
            subscriptions.append(
                client.sharded_pubsub(
                    channels=[doorbell_channel(self.node_id)],
                    ignore_subscribe_messages=True,
                    retry_policy=None,
                )
            )
        pending = len(subscriptions)

        async def consume(subscription: Any) -> None:
            nonlocal pending
            async with subscription as pubsub:
                pending -= 1
                if pending == 0:
                    on_listening()
                async for raw in pubsub:
                    message = parse_message(raw["channel"], raw["data"])
                    if message is not None:
                        on_message(message)
            raise StoreError("cluster channel closed")

        try:
            async with trio.open_nursery() as nursery:
                for subscription in subscriptions:
                    nursery.start_soon(consume, subscription)
        except BaseException as exc:
            rest = _unless_connection_trouble(exc)
            if rest is not None:
                raise rest from None
            raise StoreError(f"cluster channel lost: {exc}") from None

    async def set_hidden(self, changes: Sequence[tuple[str, bool]]) -> None:
        """Set or delete each user's hidden flag; the script announces it."""
        calls: list[Call] = [
            ("hide", [f"{prefix(user)}:hidden"], ["1" if hidden else "0", wire_device(user, "")])
            for user, hidden in changes
        ]
        if calls:
            await self._store.run_scripts(calls)

    async def read_presence(self, users: Sequence[str]) -> list[PresenceRecord | None]:
        """Count each user's live claims and read their grace, last-seen and hidden keys."""
        calls: list[Call] = []
        for user in users:
            p = prefix(user)
            calls.append(("presence", [f"{p}:devs", f"{p}:grace", f"{p}:seen", f"{p}:hidden"], [p]))
        answers = await self._store.run_scripts(calls) if calls else []
        records: list[PresenceRecord | None] = []
        for user, answer in zip(users, answers, strict=True):
            if isinstance(answer, Exception):
                log.warning("presence of %s not read: %s", user, answer)
                records.append(None)
                continue
            connected, grace_ms, seen, hidden = answer
            records.append(
                PresenceRecord(int(connected), max(int(grace_ms), 0), int(seen) if seen else None,
                               hidden == 1)
            )  # fmt: skip
        return records


def parse_message(channel: object, data: object) -> BusMessage | None:
    """A pub/sub message as the bus delivers it (None when it is not one of ours)."""
    if not isinstance(data, bytes) or not data:
        return None
    try:
        kind = data[:1]
        user, device, rest = read_device(data, 1)
        if channel == EVENTS.encode():
            return Event(EventKind(kind.decode()), user, device)
        if kind == b"b":
            urgent = data[rest : rest + 1] == b"1"
            return RemoteRing(user, device, urgent, decode_member(data[rest + 1 :]))
        if kind == b"k":
            return Kick(user, device, data[rest:].decode())
        if kind == b"r":
            return Revocation(user, device, data[rest:].decode())
    except (ValueError, UnicodeDecodeError) as exc:  # never from our own scripts
        log.warning("malformed cluster message ignored: %s", exc)
    return None


# A subscription lost: its connection, or its end (StoreError from `listen`'s consumer).
LOST = (*REDIS_ERRORS, StoreError)


def _unless_connection_trouble(exc: BaseException) -> BaseException | None:
    """`exc` less the lost subscriptions in it (None if that was all of it)."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(_lost)
        return rest
    return None if _lost(exc) else exc


def _lost(exc: BaseException) -> bool:
    """Whether `exc` (not a group) says a subscription was lost.

    After a Cluster failover, coredis's sharded subscription, cleaning up after the lost
    connection to the old primary, raises a KeyError (it looks the shard up by a node id
    it no longer holds); that too is a lost subscription, not a fault of the gateway.
    """
    if isinstance(exc, BaseExceptionGroup):
        return False  # split() then looks inside
    if isinstance(exc, LOST):
        return True
    context = exc.__context__
    return isinstance(exc, KeyError) and context is not None and _all_lost(context)


def _all_lost(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(_lost)[1] is None
    return _lost(exc)

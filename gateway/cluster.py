"""Many gateway processes on one Redis: the device -> node registry, and the doorbells,
kicks and events that travel between nodes.

```
ClusterLink.run
├─ listener: this node's channel (doorbells, kicks) and the events channel
├─ heartbeat: renews the TTL of every device claimed here
├─ releaser: lets go of devices whose connection ended
└─ catch-up: rings every local connection now and then
```

A connection *claims* its device on `hello` (``P:node:DEVICE`` = ``NODE|CONNECTION``,
with a TTL). The claim closes the device's previous connection on another node with 4009
(a kick on that node's channel), and the heartbeat closes a connection whose claim was
taken over even if that kick was lost. A node that dies stops renewing its claims, so its
devices count as connected nowhere after `node_ttl` at most (and wake-ups resume).

Delivery never depends on pub/sub: a doorbell only wakes a connection's writer, which
reads the store after its cursor. A doorbell lost while the listener reconnects is made
good by ringing every local connection once it is back, and by the periodic catch-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from gateway.clock import now_ms
from gateway.errors import StoreError
from gateway.peer import Peer
from gateway.registry import Registry
from gateway.session import CloseCode
from gateway.store.redis import REDIS_ERRORS, Call, RedisStore, decode_member, uncancelled
from gateway.store.redis_scripts import prefix, read_device, wire_device

log = logging.getLogger(__name__)

EVENTS = "gw:events"
NODE_CHANNEL = "gw:node:"
RELEASE_QUEUE = 10_000
REFRESH_CHUNK = 1000
LISTEN_RETRY_MAX = 5.0

#: Told of other nodes' events: (kind, user, device); kind is "c" (connected), "d"
#: (disconnected) or "h" (hidden changed; device is "").
EventHook = Callable[[str, str, str], None]


class ClusterLink:
    """This node's part in the cluster; see the module docstring."""

    def __init__(
        self,
        store: RedisStore,
        registry: Registry,
        *,
        node_ttl: float,
        catchup_interval: float,
        offline_grace: float,
        on_event: EventHook,
    ) -> None:
        self.store = store
        self.registry = registry
        self.node_id = store.node_id
        self.node_ttl_ms = int(node_ttl * 1000)
        self.catchup_interval = catchup_interval
        self.grace_ms = int(offline_grace * 1000)
        self.counters = store.counters
        self.listening = False
        self.on_event = on_event
        self._releases, self._to_release = trio.open_memory_channel[tuple[str, str, str]](
            RELEASE_QUEUE
        )

    def claim_value(self, conn: Peer) -> str:
        """What the registry holds for a device connected through `conn`."""
        return f"{self.node_id}|{conn.id}"

    async def claim(self, conn: Peer) -> None:
        """Register `conn`'s device as connected here, closing any other connection of it
        in the cluster with 4009.

        Raises:
            StoreError: Redis is unavailable.
        """
        user, device = conn.user, conn.device
        [answer] = await self.store.run_scripts(
            [
                (
                    "claim",
                    [f"{prefix(user)}:node:{device}"],
                    [
                        self.claim_value(conn),
                        self.node_ttl_ms,
                        wire_device(user, device),
                        self.node_id,
                    ],
                )
            ]
        )
        if isinstance(answer, Exception):
            raise StoreError(f"claim failed: {answer}")
        if answer is not None and not answer.startswith(self.node_id.encode() + b"|"):
            self.counters["kicks_sent"] += 1

    def release(self, conn: Peer) -> None:
        """`conn` ended: let go of its device (soon; the TTL covers a failure)."""
        try:
            self._releases.send_nowait((conn.user, conn.device, self.claim_value(conn)))
        except trio.WouldBlock:
            self.counters["releases_dropped"] += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, renew claims, release and catch up until cancelled."""
        async with trio.open_nursery() as nursery:
            listening = trio.Event()
            nursery.start_soon(self._listen, listening)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._releaser)
            nursery.start_soon(self._catch_up)
            with trio.move_on_after(5):  # start without it rather than not at all
                await listening.wait()
            task_status.started()

    # -- listening ------------------------------------------------------------------------

    async def _listen(self, first: trio.Event) -> None:
        delay = 0.1
        channel = NODE_CHANNEL + self.node_id
        while True:
            try:
                async with self.store.client.pubsub(
                    channels=[channel, EVENTS], ignore_subscribe_messages=True, retry_policy=None
                ) as pubsub:
                    if self.listening is False and first.is_set():
                        log.info("cluster channel listening again; catching up")
                        self.counters["listen_recoveries"] += 1
                    self.listening = True
                    first.set()
                    delay = 0.1
                    self.registry.ring_all()  # anything rung while nobody listened
                    async for message in pubsub:
                        self._dispatch(message["channel"], message["data"])
            except BaseException as exc:
                rest = _unless_connection_trouble(exc)
                if rest is not None:
                    raise rest from None
                if self.listening:
                    log.error("cluster channel lost: %s", exc)
                self.counters["listen_errors"] += 1
            self.listening = False
            await trio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    def _dispatch(self, channel: object, data: object) -> None:
        if not isinstance(data, bytes) or not data:
            return
        try:
            kind = data[:1]
            user, device, rest = read_device(data, 1)
            if channel == EVENTS.encode():
                self._event(kind.decode(), user, device)
            elif kind == b"b":
                urgent = data[rest : rest + 1] == b"1"
                self._doorbell(user, device, urgent, data[rest + 1 :])
            elif kind == b"k":
                self._kick(user, device, data[rest:].decode())
            elif kind == b"r":
                self._revoked(user, device, data[rest:].decode())
        except (ValueError, UnicodeDecodeError) as exc:  # never from our own scripts
            log.warning("malformed cluster message ignored: %s", exc)

    def _doorbell(self, user: str, device: str, urgent: bool, member: bytes) -> None:
        self.counters["doorbells_received"] += 1
        self.registry.ring(user, device, urgent, decode_member(member))

    def _kick(self, user: str, device: str, conn_id: str) -> None:
        conn = self.registry.get(user, device)
        if conn is not None and str(conn.id) == conn_id:
            self.counters["kicks_received"] += 1
            conn.request_close(CloseCode.REPLACED, "replaced by a newer connection")

    def _revoked(self, user: str, device: str, conn_id: str) -> None:
        conn = self.registry.get(user, device)
        if conn is not None and str(conn.id) == conn_id:
            self.counters["revocations_received"] += 1
            conn.request_close(CloseCode.UNAUTHORIZED, "unauthorized")

    async def close_revoked(self, user: str, device: str) -> bool:
        """Close the device's connection with 4001 if another node holds it (the caller
        closes a local one); True if that node was told.

        Raises:
            StoreError: Redis is unavailable.
        """
        try:
            with uncancelled():
                claim = await self.store.client.get(f"{prefix(user)}:node:{device}")
                if claim is None:
                    return False
                node, _, conn_id = claim.partition(b"|")
                if node.decode() == self.node_id:
                    return False
                message = b"r" + wire_device(user, device) + conn_id
                await self.store.client.publish(NODE_CHANNEL + node.decode(), message)
        except REDIS_ERRORS as exc:
            raise StoreError(f"revocation not sent to the device's node: {exc}") from None
        self.counters["revocations_sent"] += 1
        return True

    def _event(self, kind: str, user: str, device: str) -> None:
        if kind == "c" and self.registry.get(user, device) is None:
            # Connected on another node: nothing pending here should wake it up.
            self.registry.waker.connected(user, device)
        self.on_event(kind, user, device)

    # -- claims ---------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Renew every claim of this node at a third of the TTL; a claim found taken by
        another connection means this one was replaced (and its kick lost)."""
        while True:
            await trio.sleep(self.node_ttl_ms / 3000)
            conns = self.registry.all()
            for start in range(0, len(conns), REFRESH_CHUNK):
                chunk = conns[start : start + REFRESH_CHUNK]
                calls: list[Call] = [
                    (
                        "refresh",
                        [f"{prefix(c.user)}:node:{c.device}"],
                        [self.claim_value(c), self.node_ttl_ms],
                    )
                    for c in chunk
                ]
                try:
                    answers = await self.store.run_scripts(calls)
                except StoreError as exc:
                    log.warning("cluster heartbeat failed: %s", exc)
                    break
                for conn, answer in zip(chunk, answers, strict=True):
                    if answer == 0:
                        self.counters["kicks_late"] += 1
                        conn.request_close(CloseCode.REPLACED, "replaced by a newer connection")
                    elif answer == 2:
                        self.counters["claims_renewed_after_outage"] += 1

    async def _releaser(self) -> None:
        while True:
            batch = [await self._to_release.receive()]
            while len(batch) < REFRESH_CHUNK:
                try:
                    batch.append(self._to_release.receive_nowait())
                except trio.WouldBlock:
                    break
            calls: list[Call] = []
            now = now_ms()
            for user, device, value in batch:
                p = prefix(user)
                keys = [f"{p}:node:{device}", f"{p}:seen", f"{p}:grace"]
                calls.append(
                    ("release", keys, [value, now, self.grace_ms, wire_device(user, device)])
                )
            try:
                await self.store.run_scripts(calls)
            except StoreError as exc:
                # The claims expire by their TTL; presence then follows by itself.
                log.warning("releasing %d devices failed: %s", len(batch), exc)

    async def _catch_up(self) -> None:
        """Ring every local connection now and then: a doorbell lost in pub/sub costs at
        most this long."""
        if math.isinf(self.catchup_interval):
            return
        while True:
            await trio.sleep(self.catchup_interval)
            self.registry.ring_all()


# What a lost or closed Redis connection raises from a coredis subscriber, alone or grouped.
CONNECTION_TROUBLE = REDIS_ERRORS


def _unless_connection_trouble(exc: BaseException) -> BaseException | None:
    """`exc` less the connection trouble in it (None if that was all of it)."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(CONNECTION_TROUBLE)
        return rest
    return None if isinstance(exc, CONNECTION_TROUBLE) else exc

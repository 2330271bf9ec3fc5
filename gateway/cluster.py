"""Many gateway processes on one shared store: the device -> node registry, and the doorbells,
kicks and events that travel between nodes.

```
ClusterLink.run
├─ listener: this node's channel (doorbells, kicks) and the events channel
├─ heartbeat: renews the TTL of every device claimed here
├─ releaser: lets go of devices whose connection ended
├─ announcer: tells every node of the alert wake-ups sent here
└─ catch-up: rings every local connection now and then
```

A connection *claims* its device on `hello` (its node and connection, with a TTL, in the
shared store, through the backend's `ClusterBus`). The claim closes the device's previous
connection on another node with 4009 (a kick on that node's channel), and the heartbeat
closes a connection whose claim was taken over even if that kick was lost. A node that
dies stops renewing its claims, so its devices count as connected nowhere after
`node_ttl` at most (and wake-ups resume).

Wake-ups follow devices across nodes: a connect on another node cancels whatever this
node's waker had pending for the device (retries included), and an alert wake-up sent by
any node is announced to all, so that whichever node stores a read made on another of the
user's devices knows to send a clear.

Delivery never depends on pub/sub: a doorbell only wakes a connection's writer, which
reads the store after its cursor. A doorbell lost while the listener reconnects is made
good by ringing every local connection once it is back, and by the periodic catch-up.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable

import trio

from gateway.clock import now_ms
from gateway.errors import StoreError
from gateway.peer import Peer
from gateway.registry import Registry
from gateway.session import CloseCode
from gateway.store.bus import (
    BusMessage,
    Claim,
    ClusterBus,
    Event,
    EventKind,
    Kick,
    RemoteRing,
    Renewal,
    Revocation,
)

log = logging.getLogger(__name__)

RELEASE_QUEUE = 10_000
ANNOUNCE_QUEUE = 10_000
REFRESH_CHUNK = 1000
LISTEN_RETRY_MAX = 5.0

#: Told of other nodes' events.
EventHook = Callable[[Event], None]


class ClusterLink:
    """This node's part in the cluster; see the module docstring."""

    def __init__(
        self,
        bus: ClusterBus,
        registry: Registry,
        *,
        counters: Counter[str],
        node_ttl: float,
        catchup_interval: float,
        offline_grace: float,
        on_event: EventHook,
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.node_id = bus.node_id
        self.node_ttl_ms = int(node_ttl * 1000)
        self.catchup_interval = catchup_interval
        self.grace_ms = int(offline_grace * 1000)
        self.counters = counters
        self.listening = False
        self.on_event = on_event
        self._releases, self._to_release = trio.open_memory_channel[Claim](RELEASE_QUEUE)
        self._alerts, self._to_announce = trio.open_memory_channel[tuple[str, str]](ANNOUNCE_QUEUE)

    async def claim(self, conn: Peer) -> None:
        """Register `conn`'s device as connected here, closing any other connection of it
        in the cluster with 4009.

        Raises:
            StoreError: Redis is unavailable.
        """
        if await self.bus.claim(Claim(conn.user, conn.device, conn.id), self.node_ttl_ms):
            self.counters["kicks_sent"] += 1

    def release(self, conn: Peer) -> None:
        """`conn` ended: let go of its device (soon; the TTL covers a failure)."""
        try:
            self._releases.send_nowait(Claim(conn.user, conn.device, conn.id))
        except trio.WouldBlock:
            self.counters["releases_dropped"] += 1

    def announce_alert(self, user: str, device: str) -> None:
        """This node sent the device an alert wake-up: tell every node (soon; one lost
        costs at most a clear wake-up)."""
        try:
            self._alerts.send_nowait((user, device))
        except trio.WouldBlock:
            self.counters["alert_announcements_dropped"] += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, renew claims, release and catch up until cancelled."""
        async with trio.open_nursery() as nursery:
            listening = trio.Event()
            nursery.start_soon(self._listen, listening)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._releaser)
            nursery.start_soon(self._announcer)
            nursery.start_soon(self._catch_up)
            with trio.move_on_after(5):  # start without it rather than not at all
                await listening.wait()
            task_status.started()

    # -- listening ------------------------------------------------------------------------

    async def _listen(self, first: trio.Event) -> None:
        delay = 0.1

        def listening() -> None:
            nonlocal delay
            if self.listening is False and first.is_set():
                log.info("cluster channel listening again; catching up")
                self.counters["listen_recoveries"] += 1
            self.listening = True
            first.set()
            delay = 0.1
            self.registry.ring_all()  # anything rung while nobody listened

        while True:
            try:
                await self.bus.listen(self._dispatch, listening)
            except StoreError as exc:
                if self.listening:
                    log.error("%s", exc)
                self.counters["listen_errors"] += 1
            self.listening = False
            await trio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    def _dispatch(self, message: BusMessage) -> None:
        if isinstance(message, RemoteRing):
            self.counters["doorbells_received"] += 1
            self.registry.ring(message.user, message.device, message.urgent, message.item)
        elif isinstance(message, Kick):
            conn = self.registry.get(message.user, message.device)
            if conn is not None and str(conn.id) == message.conn_id:
                self.counters["kicks_received"] += 1
                self.registry.moved(conn)
                conn.request_close(CloseCode.REPLACED, "replaced by a newer connection")
        elif isinstance(message, Revocation):
            conn = self.registry.get(message.user, message.device)
            if conn is not None and str(conn.id) == message.conn_id:
                self.counters["revocations_received"] += 1
                conn.request_close(CloseCode.UNAUTHORIZED, "unauthorized")
        else:
            self._event(message)

    async def close_revoked(self, user: str, device: str) -> bool:
        """Close the device's connection with 4001 if another node holds it (the caller
        closes a local one); True if that node was told.

        Raises:
            StoreError: Redis is unavailable.
        """
        told = await self.bus.close_revoked(user, device)
        if told:
            self.counters["revocations_sent"] += 1
        return told

    def _event(self, event: Event) -> None:
        waker = self.registry.waker
        if event.kind is EventKind.ALERTED:
            self.counters["alert_announcements_received"] += 1
            waker.alerted_elsewhere(event.user, event.device)
            return
        connected = event.kind is EventKind.CONNECTED
        if connected and self.registry.get(event.user, event.device) is None:
            # Connected on another node: nothing pending here should wake it up.
            waker.connected_elsewhere(event.user, event.device)
        self.on_event(event)

    # -- claims ---------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Renew every claim of this node at a third of the TTL; a claim found taken by
        another connection means this one was replaced (and its kick lost)."""
        while True:
            await trio.sleep(self.node_ttl_ms / 3000)
            conns = self.registry.all()
            for start in range(0, len(conns), REFRESH_CHUNK):
                chunk = conns[start : start + REFRESH_CHUNK]
                claims = [Claim(c.user, c.device, c.id) for c in chunk]
                try:
                    answers = await self.bus.renew(claims, self.node_ttl_ms)
                except StoreError as exc:
                    log.warning("cluster heartbeat failed: %s", exc)
                    break
                for conn, answer in zip(chunk, answers, strict=True):
                    if answer is Renewal.TAKEN:
                        self.counters["kicks_late"] += 1
                        self.registry.moved(conn)
                        conn.request_close(CloseCode.REPLACED, "replaced by a newer connection")
                    elif answer is Renewal.RESTORED:
                        self.counters["claims_renewed_after_outage"] += 1

    async def _releaser(self) -> None:
        while True:
            batch = [await self._to_release.receive()]
            while len(batch) < REFRESH_CHUNK:
                try:
                    batch.append(self._to_release.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self.bus.release(batch, now_ms(), self.grace_ms)
            except StoreError as exc:
                # The claims expire by their TTL; presence then follows by itself.
                log.warning("releasing %d devices failed: %s", len(batch), exc)

    async def _announcer(self) -> None:
        while True:
            batch = [await self._to_announce.receive()]
            while len(batch) < REFRESH_CHUNK:
                try:
                    batch.append(self._to_announce.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self.bus.announce_alerts(batch)
                self.counters["alert_announcements_sent"] += len(batch)
            except StoreError as exc:
                # Only a clear is at stake: a read elsewhere then leaves the notification.
                self.counters["alert_announcements_lost"] += len(batch)
                log.warning("%d alert wake-ups not announced: %s", len(batch), exc)

    async def _catch_up(self) -> None:
        """Ring every local connection now and then: a doorbell lost in pub/sub costs at
        most this long."""
        if math.isinf(self.catchup_interval):
            return
        while True:
            await trio.sleep(self.catchup_interval)
            self.registry.ring_all()

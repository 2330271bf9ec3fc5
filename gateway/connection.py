"""One device connection: `hello`, then a reader, a writer and a heartbeat in one nursery.

Failure domain: anything that goes wrong inside a connection ends that connection (with
1011 for an unexpected exception) and nothing else. Every close goes through
`request_close`, which records the first close code and cancels the connection's tasks;
the close frame itself is sent once, on the way out, under a shielded deadline.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from gateway import frames
from gateway.coalesce import coalesce
from gateway.codec import encode_frames
from gateway.errors import AuthError, Overloaded, StoreError
from gateway.frames import FrameParser, Hello
from gateway.logs import bind_connection
from gateway.outbox import Frame, Outbox
from gateway.ratelimit import SendLimiter
from gateway.session import Close, CloseCode, Command, Event, Reply, Session
from gateway.store.base import QueueItem

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)

# Items fetched from the store per writer flush, and the most bytes one outbound
# WebSocket message carries; clients commonly cap inbound messages at 1 MiB.
FETCH_LIMIT = 256
MAX_OUT_MESSAGE = 512 * 1024
CLOSE_TIMEOUT = 2.0
STORE_RETRY = 1.0

_ids = itertools.count(1)


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch, the protocol's time unit."""
    return time.time_ns() // 1_000_000


class Connection:
    """A device's WebSocket, from `hello` to close."""

    def __init__(self, ws: WebSocketConnection, gateway: Gateway, parser: FrameParser) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.gateway = gateway
        server = gateway.settings.server
        self.session = Session(parser, max_bad_frames=server.max_bad_frames)
        self.outbox = Outbox(server.outbox_limit)
        limits = gateway.settings.limits
        self.send_limit = SendLimiter(
            limits.send_rate, limits.send_burst, limits.rate_limit_strikes, now=trio.current_time()
        )
        self.user = ""
        self.device = ""
        self.active = True
        self.cursor = 0  # highest sid sent on this connection
        self.drained = False
        self.merged_sids: dict[int, tuple[int, ...]] = {}  # merged receipt sid -> absorbed
        self._reading = False  # a store read of this device's queue is in flight
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self._scope = trio.CancelScope()
        self._log_context: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.user}/{self.device}>"

    def request_close(self, code: CloseCode, reason: str) -> None:
        """Close this connection with `code` (the first request wins)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._scope.cancel()

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for the peer's behaviour."""
        attached = False
        self._log_context = bind_connection(self.id)
        try:
            with self._scope:
                events = await self._await_hello()
                if events is None:
                    return
                attached = await self._start_session(events[0])
                if not attached:
                    return
                await self._handle_events(events[1:])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._heartbeat)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        except Exception:
            log.exception("connection %s failed", self)
            self.request_close(CloseCode.INTERNAL, "internal error")
        finally:
            with trio.CancelScope(shield=True):
                if attached:
                    await self._detach()
                await self._flush_before_close()
                await self._send_close()

    # -- session start ---------------------------------------------------------------------

    async def _await_hello(self) -> list[Event] | None:
        with trio.move_on_after(self.gateway.settings.server.hello_timeout):
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return None
            events = self.session.receive(message)
            first = events[0] if events else Close(CloseCode.POLICY, "hello must come first")
            if isinstance(first, Close):
                self.request_close(first.code, first.reason)
                return None
            return events
        self.request_close(CloseCode.HELLO_TIMEOUT, "no hello in time")
        return None

    async def _start_session(self, event: Event) -> bool:
        assert isinstance(event, Command) and isinstance(event.frame, Hello)
        try:
            identity = self.gateway.verifier.verify(event.frame.token)
        except AuthError as exc:
            log.info("connection #%d: hello refused: %s", self.id, exc)
            self.request_close(CloseCode.UNAUTHORIZED, "unauthorized")
            return False
        gw = self.gateway
        revoked = await gw.store.revoked_at(identity.user, identity.device)
        if revoked is not None and (
            identity.issued_at is None or identity.issued_at * 1000 <= revoked
        ):
            log.info("connection #%d: hello refused: token issued before revocation", self.id)
            self.request_close(CloseCode.UNAUTHORIZED, "unauthorized")
            return False
        self.user, self.device, self.active = identity.user, identity.device, event.frame.active
        self._log_context.update(user=self.user, device=self.device)
        await gw.store.register_device(self.user, self.device, now_ms())
        previous = gw.registry.attach(self)
        if previous is not None:
            previous.request_close(CloseCode.REPLACED, "replaced by a newer connection")
        if gw.cluster is not None:
            await gw.cluster.claim(self)  # closes a connection of it on another node
        gw.presence.add_subscriber(self.id, active=self.active)
        gw.presence.device_connected(self.user, self.device)
        # Acks from this device's previous connection may still be queued for commit;
        # reading the backlog after them means nothing acked is delivered again.
        await gw.store.sync()
        queued = await gw.store.count(self.user, self.device, now_ms())
        server = gw.settings.server
        heartbeat = math.ceil(server.heartbeat)
        self.outbox.push(frames.welcome(self.user, self.device, now_ms(), heartbeat, queued))
        self.outbox.ring()
        log.info(
            "connection #%d: %s/%s authenticated, %d queued",
            self.id,
            self.user,
            self.device,
            queued,
        )
        return True

    async def _detach(self) -> None:
        gw = self.gateway
        gw.presence.remove_subscriber(self.id)
        if gw.registry.detach(self):
            if gw.cluster is not None:
                gw.cluster.release(self)
            gw.presence.device_disconnected(self.user, self.device)
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await gw.store.touch_device(self.user, self.device, now_ms())
                except StoreError as exc:
                    log.warning("connection #%d: last-seen not recorded: %s", self.id, exc)

    # -- tasks -----------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return
            self.gateway.metrics.messages_in += 1
            await self._handle_events(self.session.receive(message))

    async def _handle_events(self, events: list[Event]) -> None:
        router = self.gateway.router
        try:
            for event in events:
                if self.close_code is not None:
                    return  # a handler closed the connection: the rest of a batch is moot
                if isinstance(event, Command):
                    await router.handle(self, event.frame)
                elif isinstance(event, Reply):
                    self.outbox.push(event.frame)
                else:
                    self.request_close(event.code, event.reason)
                    return
        except Overloaded as exc:
            log.warning("connection %s: %s", self, exc)
            self.request_close(CloseCode.OVERLOADED, "too slow a reader")

    async def _writer(self) -> None:
        gw = self.gateway
        timeout = gw.settings.server.write_timeout
        while True:
            await self.outbox.wait()
            out = await self.outbox.take_frames()
            if self.outbox.take_ring():
                out += await self._read_queue()
            if not out:
                continue
            with trio.move_on_after(timeout) as scope:
                try:
                    for message in _pack(out):
                        await self.ws.send_message(message)
                        gw.metrics.messages_out += 1
                except ConnectionClosed:
                    self._scope.cancel()  # the peer is gone; its items stay stored
                    return
            gw.metrics.frames_out += len(out)
            if scope.cancelled_caught:
                log.warning("connection %s: send blocked for %.0fs", self, timeout)
                self.request_close(CloseCode.OVERLOADED, "too slow a reader")
                return

    async def _read_queue(self) -> list[Frame]:
        """The device's next stored items after the cursor, then `drained` once."""
        gw = self.gateway
        self._reading = True
        try:
            items = await gw.store.fetch(self.user, self.device, self.cursor, FETCH_LIMIT, now_ms())
        except StoreError as exc:
            log.warning("connection %s: queue read failed, will retry: %s", self, exc)
            await trio.sleep(STORE_RETRY)
            self.outbox.ring()
            return []
        finally:
            self._reading = False
        out, merged = coalesce(items)
        self.merged_sids.update(merged)
        if items:
            self.cursor = items[-1].sid
        if len(items) == FETCH_LIMIT:
            self.outbox.ring()
        elif not self.drained:
            self.drained = True
            out.append(frames.DRAINED)
        return out

    def deliver_live(self, item: QueueItem) -> None:
        """An item was just committed for this device: hand it to the writer directly
        when nothing older can be pending, else ring so the writer reads the store.

        With a store whose sids are consecutive per device, an item that is not the next
        one means an older one was never rung for: the store is read, so nothing is
        jumped over."""
        outbox = self.outbox
        if (
            self.drained
            and not self._reading
            and not outbox.rung
            and len(outbox) < outbox.limit // 2
            and (item.sid == self.cursor + 1 or not self.gateway.store.consecutive_sids)
        ):
            if item.sid > self.cursor:
                self.cursor = item.sid
                outbox.push(item.to_frame())
            return
        outbox.ring()

    def expand_acks(self, sids: tuple[int, ...]) -> tuple[int, ...]:
        """The stored items an ack stands for: merged receipts bring their absorbed sids."""
        if not self.merged_sids:
            return sids
        extra = [s for sid in sids for s in self.merged_sids.pop(sid, ())]
        return sids + tuple(extra) if extra else sids

    async def _heartbeat(self) -> None:
        interval = self.gateway.settings.server.heartbeat
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                self.request_close(CloseCode.GOING_AWAY, "no pong in time")
                return

    async def _flush_before_close(self) -> None:
        """Send what is already buffered (say, the errors before a 1008) if the peer reads."""
        if not len(self.outbox) or self.close_code in (CloseCode.OVERLOADED, CloseCode.REPLACED):
            return
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                for message in _pack(await self.outbox.take_frames()):
                    await self.ws.send_message(message)
            except ConnectionClosed:
                pass

    async def _send_close(self) -> None:
        code = self.close_code or CloseCode.NORMAL
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self.ws.aclose(int(code), self.close_reason or None)
            except Exception:  # the peer may already be gone; closing is best effort
                log.debug("connection #%d: close handshake failed", self.id, exc_info=True)


def _pack(out: list[Frame]) -> list[bytes]:
    """Encode frames into as few messages as possible, each at most MAX_OUT_MESSAGE bytes."""
    messages: list[bytes] = []
    chunk: list[Frame] = []
    size = 0
    for frame in out:
        weight = 64 + len(frame.get("body", b"")) + sum(len(i) + 2 for i in frame.get("ids", ()))
        if chunk and size + weight > MAX_OUT_MESSAGE:
            messages.append(encode_frames(chunk))
            chunk, size = [], 0
        chunk.append(frame)
        size += weight
    if chunk:
        messages.append(encode_frames(chunk))
    return messages

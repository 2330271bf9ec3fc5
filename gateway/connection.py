"""One device connection, served by one Trio task over the Sans-I/O core of `websockets`.

The task reads bytes, feeds them to `websockets.server.ServerProtocol`, handles the
frames that come out, and writes what is due, all in one loop. An idle connection holds
that one task, blocked in `receive_some`, and nothing else:

- Output queued by other tasks (deliveries, receipts, presence, typing) goes into the
  connection's bounded `Outbox` and is written at once, straight to the socket, when the
  kernel takes it. Only when it cannot (the socket's buffer is full) or when the device's
  doorbell asks for a store read does a short-lived *flush task* start in the shared
  flush nursery; it ends when there is nothing left to write. A `sent` that waits for its
  commit is written by the commit's own callback. Nothing polls.
- Pings come from the process-wide `Heartbeat`, which calls `heartbeat()` when due.

One writer at a time (`_writing`, `_handling`): the connection task right after handling
input, a flush task, or whoever queued output while neither was busy.

Failure domain: anything that goes wrong inside a connection ends that connection (1011
for an unexpected exception) and nothing else. Every close goes through `request_close`,
which records the first close code and cancels the connection's work; the close frame is
sent once, on the way out, and the close handshake is bounded by `CLOSE_TIMEOUT`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import trio
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway import frames
from gateway.ack_watch import AckWatch
from gateway.clock import now_ms
from gateway.coalesce import coalesce
from gateway.codec import encode_frames
from gateway.counters import Counters
from gateway.delivery_flush import DeliveryFlush
from gateway.errors import Overloaded, StoreError
from gateway.frames import FrameParser, Hello
from gateway.heartbeat import Heartbeat
from gateway.logs import bind_connection, rebind
from gateway.outbox import Frame, OnError, Outbox, Render
from gateway.ratelimit import SendLimiter
from gateway.session import Close, CloseCode, Command, Event, Reply, Session
from gateway.sessions import Opened
from gateway.settings import LimitsSettings, ServerSettings
from gateway.store.base import QueueItem, SessionOpening, Ticket

log = logging.getLogger(__name__)

# Items fetched from the store per queue read, and the most bytes one outbound
# WebSocket message carries; clients commonly cap inbound messages at 1 MiB.
FETCH_LIMIT = 256
MAX_OUT_MESSAGE = 512 * 1024
CLOSE_TIMEOUT = 2.0
STORE_RETRY = 1.0
RECEIVE_SIZE = 65536

_ids = itertools.count(1)
# With `[limits] send_rate = 0` a limiter lets everything through and keeps no state, so
# every connection shares this one.
_UNLIMITED = SendLimiter(0, 1, 1, now=0.0)


class Router(Protocol):
    """Carries out a client frame for a connection."""

    async def handle(self, conn: Connection, frame: Any) -> None:
        """Handle one validated frame from an authenticated connection."""
        ...


class Sessions(Protocol):
    """Session start and end: everything outside this connection's I/O."""

    async def open(self, hello: Hello, limit: int) -> Opened | None:
        """Verify `hello` and read the store; None if the token is refused."""
        ...

    async def attach(self, conn: Connection, opened: Opened) -> None:
        """Make the authenticated `conn` the device's live connection."""
        ...

    async def detach(self, conn: Connection) -> None:
        """`conn` has ended: let go of the device if it is still its connection."""
        ...


class QueueReader(Protocol):
    """The store reads a connection makes."""

    consecutive_sids: bool

    async def fetch(
        self, user: str, device: str, after_sid: int, limit: int, now: int
    ) -> list[QueueItem]:
        """Up to `limit` unexpired items with sid > `after_sid`, in order."""
        ...


@dataclass(frozen=True, slots=True)
class EdgeContext:
    """What every connection of the process shares, built once by the composition root."""

    server: ServerSettings
    limits: LimitsSettings
    parser: FrameParser
    router: Router
    sessions: Sessions
    queue: QueueReader
    heartbeat: Heartbeat
    ack_watch: AckWatch
    deliveries: DeliveryFlush
    counters: Counters
    flushes: trio.Nursery


class Connection:
    """A device's WebSocket, from the end of the upgrade to the close."""

    __slots__ = (
        "_awaiting_pong",
        "_broken",
        "_ctx",
        "_eof_due",
        "_fd",
        "_flush_done",
        "_flush_noted",
        "_flush_scope",
        "_fragments",
        "_handling",
        "_log_context",
        "_proto",
        "_reading",
        "_scope",
        "_stream",
        "_unsent",
        "_writing",
        "active",
        "close_code",
        "close_reason",
        "cursor",
        "device",
        "drained",
        "id",
        "merged_sids",
        "outbox",
        "send_limit",
        "session",
        "urgent_since",
        "user",
    )

    def __init__(self, stream: trio.abc.Stream, proto: ServerProtocol, ctx: EdgeContext) -> None:
        self.id = next(_ids)
        self._stream = stream
        self._proto = proto
        self._ctx = ctx
        server = ctx.server
        self.session = Session(ctx.parser, max_bad_frames=server.max_bad_frames)
        self.outbox = Outbox(server.outbox_limit)
        limits = ctx.limits
        self.send_limit = _UNLIMITED
        if limits.send_rate > 0:
            self.send_limit = SendLimiter(
                limits.send_rate,
                limits.send_burst,
                limits.rate_limit_strikes,
                now=trio.current_time(),
            )
        self.user = ""
        self.device = ""
        self.active = True
        self.cursor = 0  # highest sid sent on this connection
        self.drained = False
        # merged receipt sid -> the sids it absorbed; None until a receipt is merged
        self.merged_sids: dict[int, tuple[int, ...]] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        # When an urgent message was handed to this device with nothing heard from it
        # since (see gateway/ack_watch.py); None otherwise.
        self.urgent_since: float | None = None
        self._reading = False  # a store read of this device's queue is in flight
        self._writing = False  # a writer (this task or a flush task) is sending
        self._flush_noted = False  # deliveries queued for the `DeliveryFlush` to write
        self._handling = False  # this task is handling input, and writes right after
        self._awaiting_pong = False
        self._broken = False  # the peer is gone, or a write was cut off: write nothing more
        self._unsent = b""  # output the kernel has not taken yet
        self._eof_due = False  # half-close TCP once `_unsent` is out
        # Plain TCP is written to straight from its descriptor; TLS through its stream.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._fragments: list[bytes] | None = None  # of a message still arriving
        self._scope = trio.CancelScope()
        self._flush_scope: trio.CancelScope | None = None
        self._flush_done: trio.Event | None = None
        self._log_context: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.user}/{self.device}>"

    # -- what other tasks call (the `Peer` protocol) -------------------------------------

    def deliver(self, item: QueueItem) -> None:
        """An item was just committed for this device: send it directly when nothing
        older can be pending, else ring so that the queue is read.

        With a store whose sids are consecutive per device, an item that is not the next
        one means an older one was never rung for: the store is read, so nothing is
        jumped over."""
        outbox = self.outbox
        if (
            self.drained
            and not self._reading
            and not outbox.rung
            and not outbox.half_full
            and (item.sid == self.cursor + 1 or not self._ctx.queue.consecutive_sids)
        ):
            if item.sid > self.cursor:
                self.cursor = item.sid
                outbox.push(frames.delivery(item))
                if item.urgent:
                    self._note_urgent()
                if not self._flush_noted:  # written once the commit has rung every device
                    self._flush_noted = True
                    self._ctx.deliveries.add(self)
            return
        self.ring()

    def flush_deliveries(self) -> None:
        """Write what commits handed over (called by the process's `DeliveryFlush`)."""
        self._flush_noted = False
        try:
            self._wake_writer()
        except Exception:
            log.exception("connection %s: writing failed", self)
            self.request_close(CloseCode.INTERNAL, "internal error")

    def _note_urgent(self) -> None:
        """An urgent message is on its way to the device: watch for an answer."""
        if self.urgent_since is None:
            self.urgent_since = trio.current_time()
            self._ctx.ack_watch.watch(self)

    def ring(self) -> None:
        """The device's queue has new items: the writer reads it."""
        self.outbox.ring()
        self._wake_writer()

    def push(self, frame: Frame) -> None:
        """Send a frame that must not be dropped; raises `Overloaded` when full."""
        self.outbox.push(frame)
        self._wake_writer()

    def push_pending(self, ticket: Ticket[Any], render: Render, on_error: OnError) -> None:
        """Send what `render` makes of a commit's result once durable, in order."""
        self.outbox.push_pending(ticket, render, on_error)
        ticket.on_done(self._wake_writer)  # its answer is ready once it resolves

    def offer(self, frame: Frame) -> bool:
        """Send an ephemeral frame if there is ample room; False if it was dropped."""
        if not self.outbox.offer(frame):
            return False
        self._wake_writer()
        return True

    def request_close(self, code: CloseCode | int, reason: str) -> None:
        """Close this connection with `code` (the first request wins)."""
        if self.close_code is None:
            self.close_code, self.close_reason = int(code), reason
        self._scope.cancel()
        if self._flush_scope is not None:
            self._flush_scope.cancel()

    def expand_acks(self, sids: tuple[int, ...]) -> tuple[int, ...]:
        """The stored items an ack stands for: merged receipts bring their absorbed sids."""
        merged = self.merged_sids
        if not merged:
            return sids
        extra = [s for sid in sids for s in merged.pop(sid, ())]
        return sids + tuple(extra) if extra else sids

    def heartbeat(self) -> bool:
        """Called by the heartbeat when due: ping, or close if the last ping is unanswered."""
        if self.close_code is not None:
            return False
        if self._awaiting_pong:
            self.request_close(CloseCode.GOING_AWAY, "no pong in time")
            return False
        self._awaiting_pong = True
        self._proto.send_ping(b"")
        self._wake_writer()
        return True

    # -- the connection task ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for the peer's behaviour."""
        attached = False
        self._log_context = bind_connection(self.id)
        ctx = self._ctx
        try:
            with self._scope:
                messages = None
                with trio.move_on_after(ctx.server.hello_timeout) as waiting:
                    messages = await self._receive_messages()
                if waiting.cancelled_caught:
                    self.request_close(CloseCode.HELLO_TIMEOUT, "no hello in time")
                if not messages:
                    return
                events = self.session.receive(messages[0])
                first = events[0] if events else Close(CloseCode.POLICY, "hello must come first")
                if isinstance(first, Close):
                    self.request_close(first.code, first.reason)
                    return
                assert isinstance(first, Command) and isinstance(first.frame, Hello)
                opened = await ctx.sessions.open(first.frame, FETCH_LIMIT)
                if opened is None:
                    self.request_close(CloseCode.UNAUTHORIZED, "unauthorized")
                    return
                self.user, self.device = opened.user, opened.device
                self.active = first.frame.active
                self._log_context.update(user=self.user, device=self.device)
                attached = True
                self._handling = True  # what attaching rings is written after `welcome`
                try:
                    await ctx.sessions.attach(self, opened)
                    self._welcome(opened.opening)
                finally:
                    self._handling = False
                ctx.heartbeat.add(self.id, self)
                await self._handle(events[1:])
                await self._handle_messages(messages[1:])
                while (messages := await self._receive_messages()) is not None:
                    await self._handle_messages(messages)
        except StoreError as exc:
            log.warning("connection %s: session not started: %s", self, exc)
            self.request_close(CloseCode.INTERNAL, "store unavailable")
        except Exception:
            log.exception("connection %s failed", self)
            self.request_close(CloseCode.INTERNAL, "internal error")
        finally:
            ctx.heartbeat.discard(self.id)
            self.urgent_since = None
            with trio.CancelScope(shield=True):
                await self._wait_for_flush()
                if attached:
                    await ctx.sessions.detach(self)
                await self._close()

    def _welcome(self, opening: SessionOpening) -> None:
        """Queue `welcome` and the first page of the backlog read with the session."""
        heartbeat = math.ceil(self._ctx.server.heartbeat)
        self.outbox.push(
            frames.welcome(self.user, self.device, now_ms(), heartbeat, opening.queued)
        )
        more = opening.queued > len(opening.items)
        self.outbox.extend(self._take_items(opening.items, more=more))
        log.info(
            "connection #%d: %s/%s authenticated, %d queued",
            self.id,
            self.user,
            self.device,
            opening.queued,
        )

    async def _receive_messages(self) -> list[bytes | str] | None:
        """Read until at least one whole message arrived; None once the WebSocket is over.

        Control frames are handled on the way: pings are answered (by the protocol),
        pongs clear the heartbeat. A text message comes out as "" (the session closes the
        connection with 1003 for it). Messages that arrived with the peer's close frame
        are still returned, and the next call returns None."""
        proto = self._proto
        while proto.state is State.OPEN:
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lost()  # a reset: the network dropped it, the phone went away
                return None
            if not data:
                proto.receive_eof()
                return None
            self.urgent_since = None  # the device is alive
            proto.receive_data(data)
            messages: list[bytes | str] = []
            for frame in cast("list[WsFrame]", proto.events_received()):  # frames, once open
                opcode = frame.opcode
                if opcode is Opcode.BINARY or opcode is Opcode.CONT:
                    fragments = self._fragments
                    if frame.fin and fragments is None:
                        messages.append(bytes(frame.data))
                    elif fragments is None:
                        self._fragments = [bytes(frame.data)]
                    else:
                        fragments.append(bytes(frame.data))
                        if frame.fin:
                            messages.append(b"".join(fragments))
                            self._fragments = None
                elif opcode is Opcode.TEXT:
                    messages.append("")
                elif opcode is Opcode.PONG:
                    self._awaiting_pong = False
            self._note_protocol_failure()
            if messages:
                self._ctx.counters.messages_in += len(messages)
                return messages
            self._write_due()  # a pong to send, perhaps
        return None

    def _note_protocol_failure(self) -> None:
        """Keep the close code of a connection the protocol failed (1002, 1007, 1009)."""
        proto = self._proto
        sent = proto.close_sent
        if self.close_code is None and proto.close_rcvd is None and sent is not None:
            self.close_code, self.close_reason = int(sent.code), sent.reason

    async def _handle_messages(self, messages: list[bytes | str]) -> None:
        """Handle messages that arrived together, then write the answers."""
        for message in messages:
            await self._handle(self.session.receive(message))
        self._write_due()

    async def _make_room(self) -> None:
        """Answers pile up (behind a commit, or a slow reader): write what is ready and
        wait for the rest before reading more, so that a client that pipelines faster
        than its answers can go is slowed down by TCP instead of closed. A wait that
        sees no progress for `write_timeout` means the reader is too slow: 1013. Output
        that keeps arriving while answers keep leaving (receipts pouring in for a device
        that pipelines sends) is progress, however long the outbox stays this full."""
        outbox = self.outbox
        timeout = self._ctx.server.write_timeout
        while len(outbox) >= outbox.limit // 4 and self.close_code is None:
            with trio.move_on_after(timeout) as waiting:
                if self._writing and self._flush_done is not None:
                    await self._flush_done.wait()
                elif (ticket := outbox.first_pending()) is not None:
                    await ticket.wait()
            if waiting.cancelled_caught:
                self.request_close(CloseCode.OVERLOADED, "too slow a reader")
                return
            self._write_due()

    async def _handle(self, events: Sequence[Event]) -> None:
        router = self._ctx.router
        self._handling = True
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
                if len(self.outbox) >= self.outbox.limit // 4:
                    await self._make_room()
        except Overloaded as exc:
            log.warning("connection %s: %s", self, exc)
            self.request_close(CloseCode.OVERLOADED, "too slow a reader")
        finally:
            self._handling = False

    # -- writing ---------------------------------------------------------------------------
    # Output leaves through `_write_now`, which writes straight to the socket without
    # waiting: a write the kernel takes at once needs no task and no trip through the
    # scheduler. Whatever must wait (a full socket buffer, a store read after a doorbell)
    # goes to a flush task. A commit still in flight at the head of the outbox needs
    # neither: its ticket calls `_wake_writer` when it resolves.

    def _wake_writer(self) -> None:
        """Write what was just queued, now if the kernel takes it, else in a flush task."""
        if not self._handling:  # else the connection task writes once it has handled it
            self._write_due()

    def _start_flush(self) -> None:
        self._writing = True
        self._flush_done = trio.Event()
        # Made here, not in the task, so that a close before the task runs cancels it.
        self._flush_scope = trio.CancelScope()
        self._ctx.flushes.start_soon(self._flush, self._flush_scope)

    def _write_due(self) -> None:
        """Write what is ready, leaving any waiting to a flush task."""
        if self._writing or self.close_code is not None:
            return  # the running flush sends what was added; a close flushes on its own
        outbox = self.outbox
        if not self._write_now():
            self._start_flush()  # to wait until the socket takes the rest
        elif outbox.rung and not outbox.half_full:
            # A doorbell is answered by a store read only while the outbox has room for
            # it (as `_flush` does); until then a commit in flight holds the rest, and
            # its ticket wakes the writer. A flush started regardless would end at once,
            # and the wait in `_make_room` would start the next one: a busy loop.
            self._start_flush()

    async def _flush(self, scope: trio.CancelScope) -> None:
        """A flush task: write until nothing is ready, answer doorbells, then end."""
        rebind(self._log_context)
        outbox = self.outbox
        try:
            with scope:
                while True:
                    await self._send_ready()
                    if outbox.half_full:
                        # What is left waits behind a commit in flight: read on once it
                        # resolves (its ticket wakes the writer), not page after page into
                        # an outbox that cannot drain.
                        return
                    if not outbox.take_ring():
                        return
                    outbox.extend(await self._read_queue())
        except Exception:
            log.exception("connection %s: writing failed", self)
            self.request_close(CloseCode.INTERNAL, "internal error")
        finally:
            self._flush_scope = None
            self._writing = False
            assert self._flush_done is not None
            self._flush_done.set()

    async def _wait_for_flush(self) -> None:
        if self._writing and self._flush_done is not None:
            if self._flush_scope is not None:
                self._flush_scope.cancel()
            await self._flush_done.wait()

    def _take_output(self) -> None:
        """Move the ready frames into the protocol, and its output into `_unsent`."""
        out = self.outbox.take_ready()
        proto = self._proto
        if out and proto.state is State.OPEN:
            messages = _pack(out)
            for message in messages:
                proto.send_binary(message)
            counters = self._ctx.counters
            counters.frames_out += len(out)
            counters.messages_out += len(messages)
        data = proto.data_to_send()
        if data:
            if data[-1] == b"":  # the protocol is done: half-close once this is out
                data.pop()
                self._eof_due = True
            joined = data[0] if len(data) == 1 else b"".join(data)
            self._unsent = self._unsent + joined if self._unsent else joined

    def _write_now(self) -> bool:
        """Write what is ready without waiting; True once nothing is left unwritten.

        One pass is enough: nothing can be queued while it runs."""
        self._take_output()
        if self._unsent:
            if self._fd < 0 or self._broken:
                return self._broken  # TLS writes through its stream; a broken one, never
            try:
                written = os.write(self._fd, self._unsent)
            except BlockingIOError:
                return False
            except OSError:
                self._lost()
                return True
            self._unsent = self._unsent[written:]
            if self._unsent:
                return False
        if self._eof_due and not self._broken:
            self._eof_due = False
            self._half_close()
        return True

    async def _send_ready(self) -> None:
        """Write everything that is ready, waiting while the socket's buffer is full, each
        wait bounded by `write_timeout` (then 1013: too slow a reader). A wait is never
        cut short by a close: half a frame on the wire would corrupt what follows."""
        while not self._write_now():
            seconds = self._ctx.server.write_timeout
            with trio.CancelScope(shield=True), trio.move_on_after(seconds) as waiting:
                try:
                    if self._fd < 0:
                        data, self._unsent = self._unsent, b""
                        await self._stream.send_all(data)
                    else:
                        await self._stream.wait_send_all_might_not_block()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._lost()
                    return
            if waiting.cancelled_caught:
                self._broken = True  # a TLS record may be cut in half: nothing can follow
                log.warning("connection %s: send blocked for %.0fs", self, seconds)
                self.request_close(CloseCode.OVERLOADED, "too slow a reader")
                return

    def _half_close(self) -> None:
        """Send TCP's FIN after the close frame, so that the peer reads the frame first."""
        stream = self._stream
        if isinstance(stream, trio.SocketStream):
            try:
                stream.socket.shutdown(socket.SHUT_WR)
            except OSError:
                self._lost()

    def _lost(self) -> None:
        """The peer is gone: nothing more can be written; its items stay stored."""
        self._broken = True
        self._unsent = b""
        self._scope.cancel()

    async def _read_queue(self) -> list[Frame]:
        """The device's next stored items after the cursor, then `drained` once."""
        self._reading = True
        try:
            items = await self._ctx.queue.fetch(
                self.user, self.device, self.cursor, FETCH_LIMIT, now_ms()
            )
        except StoreError as exc:
            log.warning("connection %s: queue read failed, will retry: %s", self, exc)
            await trio.sleep(STORE_RETRY)
            self.outbox.ring()
            return []
        finally:
            self._reading = False
        return self._take_items(items, more=len(items) == FETCH_LIMIT)

    def _take_items(self, items: Sequence[QueueItem], *, more: bool) -> list[Frame]:
        """Frames for items read from the queue, advancing the cursor; `drained` after
        the first read that reached the end, and a ring for the next page otherwise."""
        out, merged = coalesce(list(items))
        if merged:
            if self.merged_sids is None:
                self.merged_sids = {}
            self.merged_sids.update(merged)
        if items:
            self.cursor = max(self.cursor, items[-1].sid)
            if any(item.urgent for item in items):
                self._note_urgent()
        if more:
            self.outbox.ring()
        elif not self.drained:
            self.drained = True
            out.append(frames.DRAINED)
        return out

    # -- closing ---------------------------------------------------------------------------

    async def _close(self) -> None:
        """Flush what is buffered, send the close frame, and end the close handshake, all
        within `CLOSE_TIMEOUT`; then close the stream."""
        proto = self._proto
        self._writing = True  # from here on, this task alone writes
        # Counted before the close frame goes out: a peer that has read it finds it counted.
        self._ctx.counters.closes[self.close_code or CloseCode.NORMAL] += 1
        with trio.move_on_after(CLOSE_TIMEOUT):
            if proto.state is State.OPEN:
                await self._flush_before_close()
                proto.send_close(self.close_code or CloseCode.NORMAL, self.close_reason)
            await self._send_ready()
            # Read until the peer's close frame and the end of its stream (the protocol
            # discards anything else), so that closing never resets a connection whose
            # peer has not yet read the close frame.
            while not self._broken and proto.state is not State.CLOSED:
                try:
                    chunk = await self._stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    proto.receive_eof()
                    break
                proto.receive_data(chunk)
                await self._send_ready()
        await trio.aclose_forcefully(self._stream)

    async def _flush_before_close(self) -> None:
        """Send what is already buffered (say, the errors before a 1008) if the peer reads."""
        if self._broken or not len(self.outbox):
            return
        if self.close_code in (CloseCode.OVERLOADED, CloseCode.REPLACED):
            return
        while (ticket := self.outbox.first_pending()) is not None:
            await ticket.wait()
            await self._send_ready()
        await self._send_ready()


def _pack(out: list[Frame]) -> list[bytes]:
    """Encode frames into as few messages as possible, each at most MAX_OUT_MESSAGE bytes."""
    if len(out) == 1:  # most writes: one delivery, one answer
        return [encode_frames(out)]
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

"""A typed Trio client for protocol v1, used by the tests, the simulator and the benchmarks.

```python
async with connect(url, token) as client:
    sent = await client.send("bob", b"ciphertext")
    async for delivery in client.deliveries():  # acked automatically after each step
        ...
```

The client reconnects by itself with exponential backoff and full jitter, re-sends every
`send` that has not been answered (the server deduplicates by id, so this is safe), and
keeps delivering from the new connection. After 1012 (server restarting) it waits for the
close reason's ``reconnect_after_ms`` hint plus jitter; after 1013 (overloaded), a 1012
without a hint, or an HTTP 503 refusal, it waits a random time over a window of several
seconds (at least `Retry-After`), so a fleet told to go away does not come back at once.
It stops for good on 4001 (unauthorized) and 4009 (replaced by another connection of the
same device).
"""

from __future__ import annotations

import logging
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto.utilities import LocalProtocolError

from gateway.drain import parse_reconnect_hint
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

FINAL_CLOSE_CODES = frozenset({4001, 4009})
RESTARTING, OVERLOADED = 1012, 1013
ACK_BATCH = 256


class ClientClosed(GatewayError):
    """The client stopped for good; `code` is the close code that ended it, if any."""

    def __init__(self, code: int | None, reason: str | None = None) -> None:
        super().__init__(f"connection closed ({code}: {reason})")
        self.code = code
        self.reason = reason


class SendRefused(GatewayError):
    """The server answered a `send` with an error frame."""

    def __init__(self, frame: Mapping[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('reason', '')}")
        self.code: str = frame.get("code", "")
        self.frame = dict(frame)


@dataclass(frozen=True, slots=True)
class Sent:
    """The server's durable acknowledgement of a send."""

    id: str
    ts: int
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delivery:
    """A `msg`, `receipt` or `group` frame delivered to this device (each is a stored
    item, acked by its `sid`)."""

    frame: dict[str, Any]

    @property
    def sid(self) -> int:
        """The server's id of this queue item, used to ack it."""
        sid: int = self.frame["sid"]
        return sid

    @property
    def is_message(self) -> bool:
        """True for `msg`, False for `receipt`."""
        return bool(self.frame["t"] == "msg")


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: sleep uniform(0, min(cap, base * 2**n)).

    When the server says why it went away, `after_close` and `after_refusal` wait longer:
    `overload_window` is the spread used after 1013 or a 1012 that carries no hint.
    """

    base: float = 0.2
    cap: float = 10.0
    overload_window: float = 5.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        # The exponent is bounded: 2**1024 overflows a float, and the cap is long reached.
        delay = self.rng.uniform(0, min(self.cap, self.base * 2 ** min(self.attempts, 64)))
        self.attempts += 1
        return delay

    def after_close(self, code: int | None, reason: str | None) -> float:
        """The delay before reconnecting after the server closed with `code`."""
        if code == RESTARTING:
            hint = parse_reconnect_hint(reason)
            if hint is not None:
                return hint + self.next_delay()
        if code in (RESTARTING, OVERLOADED):
            return max(self.next_delay(), self.rng.uniform(0, self.overload_window))
        return self.next_delay()

    def after_refusal(self, status: int, retry_after: float | None) -> float:
        """The delay after the server refused the upgrade with HTTP `status`."""
        if status in (429, 503):
            floor = retry_after if retry_after is not None else 0.0
            return floor + max(self.next_delay(), self.rng.uniform(0, self.overload_window))
        return self.next_delay()

    def reset(self) -> None:
        """Forget past failures after a successful connection."""
        self.attempts = 0


@dataclass(slots=True)
class _PendingSend:
    frame: dict[str, Any]
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None


class GatewayClient:
    """One device's connection to the gateway, kept alive across reconnects.

    Create it with `connect`, which runs its background tasks.
    """

    def __init__(
        self,
        url: str,
        token: str | Callable[[], str],
        *,
        active: bool = True,
        auto_ack: bool = True,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        inbox_size: int = 100_000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context  # for wss:// (default: the system's trust store)
        self._token = token
        self.active = active
        self.auto_ack = auto_ack
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.welcome: dict[str, Any] | None = None
        self.connected = trio.Event()
        self.drained = trio.Event()
        self.connections = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.final: ClientClosed | None = None
        self.errors: list[dict[str, Any]] = []
        self._ws: WebSocketConnection | None = None
        self._pending: dict[str, _PendingSend] = {}
        self._inbox_send, self._inbox = trio.open_memory_channel[Delivery](inbox_size)
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](inbox_size)
        self._acks: list[int] = []
        self._ack_wakeup = trio.Event()
        self._stopped = trio.Event()
        self._drained_ok = False

    # -- public API -------------------------------------------------------------------------

    async def send(
        self,
        to: str,
        body: bytes | None = None,
        *,
        bodies: Mapping[str, bytes] | None = None,
        id: str | None = None,
        urgent: bool = True,
        ttl: int | None = None,
    ) -> Sent:
        """Send a message and wait until the server has stored it durably.

        Raises:
            SendRefused: The server answered with an error (for example
                ``unknown_recipient``).
            ClientClosed: The client stopped before the send was answered.
        """
        msg_id = id or uuid.uuid4().hex
        frame: dict[str, Any] = {"t": "send", "id": msg_id, "to": to, "urgent": urgent}
        if bodies is not None:
            frame["bodies"] = dict(bodies)
        else:
            frame["body"] = body if body is not None else b""
        if ttl is not None:
            frame["ttl"] = ttl
        return await self._send_and_wait(msg_id, frame)

    async def send_group(
        self,
        group: str,
        body: bytes,
        *,
        id: str | None = None,
        urgent: bool = True,
        ttl: int | None = None,
    ) -> Sent:
        """Send one message to every member of `group` (`body` is the group's sender-key
        ciphertext) and wait until the server has stored it for every member device.

        Raises:
            SendRefused: The server answered with an error: ``not_member`` when this user
                is not a member of `group` or there is no such group.
            ClientClosed: The client stopped before the send was answered.
        """
        msg_id = id or uuid.uuid4().hex
        frame: dict[str, Any] = {
            "t": "send", "id": msg_id, "group": group, "body": body, "urgent": urgent,
        }  # fmt: skip
        if ttl is not None:
            frame["ttl"] = ttl
        return await self._send_and_wait(msg_id, frame)

    async def _send_and_wait(self, msg_id: str, frame: dict[str, Any]) -> Sent:
        """Send a `send` frame (again after a reconnect until answered) and wait for its
        `sent`."""
        if self._stopped.is_set():
            raise self.final or ClientClosed(self.close_code, self.close_reason)
        pending = self._pending.setdefault(msg_id, _PendingSend(frame))
        await self._send_frames([frame], required=False)
        await pending.done.wait()
        reply = pending.reply
        if reply is None:
            raise self.final or ClientClosed(self.close_code, self.close_reason)
        if reply["t"] == "error":
            raise SendRefused(reply)
        return Sent(reply["id"], reply["ts"], tuple(reply.get("skipped", ())))

    async def deliveries(self) -> AsyncIterator[Delivery]:
        """Yield delivered `msg` and `receipt` frames, acking each after the loop body runs
        when `auto_ack` is on."""
        async for delivery in self._inbox:
            yield delivery
            if self.auto_ack:
                self.ack_later(delivery.sid)

    async def next_delivery(self) -> Delivery:
        """The next delivered item (acked automatically if `auto_ack` is on)."""
        delivery = await self._inbox.receive()
        if self.auto_ack:
            self.ack_later(delivery.sid)
        return delivery

    def take_buffered(self) -> list[Delivery]:
        """Every delivery received so far and not yet consumed, without waiting.

        After `wait_drained`, this is the whole backlog of the connection. Acked
        automatically when `auto_ack` is on.
        """
        taken: list[Delivery] = []
        while True:
            try:
                delivery = self._inbox.receive_nowait()
            except trio.WouldBlock:
                break
            taken.append(delivery)
        if self.auto_ack and taken:
            self.ack_later(*(d.sid for d in taken))
        return taken

    async def next_event(self) -> dict[str, Any]:
        """The next frame that is neither a delivery nor a reply: presence, typing, errors."""
        return await self._events.receive()

    def ack_later(self, *sids: int) -> None:
        """Queue acks; they go out in batches from a background task."""
        self._acks.extend(sids)
        self._ack_wakeup.set()

    async def ack(self, sids: Sequence[int]) -> None:
        """Ack items now."""
        await self._send_frames([{"t": "ack", "sids": list(sids)}])

    async def read(self, to: str, ids: Sequence[str]) -> None:
        """Tell `to` that these of its messages were read."""
        await self._send_frames([{"t": "read", "to": to, "ids": list(ids)}])

    async def typing(self, to: str, on: bool = True) -> None:
        """Send a typing indicator."""
        await self._send_frames([{"t": "typing", "to": to, "on": on}])

    async def subscribe(self, users: Sequence[str]) -> None:
        """Subscribe to presence."""
        await self._send_frames([{"t": "sub", "users": list(users)}])

    async def set_active(self, active: bool) -> None:
        """Tell the server whether the app is in the foreground."""
        self.active = active
        await self._send_frames([{"t": "state", "active": active}])

    async def register_push(
        self, provider: str | None, token: str | None = None, *, topic: str | None = None,
        sandbox: bool = False, subscription: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Set, replace or (with provider None) remove this device's push token.

        A browser-like device registers with ``provider="webpush"`` and `subscription`
        (``{"endpoint": URL, "keys": {"p256dh": ..., "auth": ...}}``) instead of a token.
        """
        frame: dict[str, Any] = {"t": "push", "provider": provider}
        if provider == "webpush":
            frame["subscription"] = subscription
        elif provider is not None:
            frame.update(token=token, sandbox=sandbox)
            if topic is not None:
                frame["topic"] = topic
        await self._send_frames([frame])

    async def send_raw(self, message: bytes | str) -> None:
        """Send an arbitrary WebSocket message (for tests of hostile input)."""
        ws = await self._current_ws()
        await ws.send_message(message)

    async def wait_drained(self) -> None:
        """Wait until a connection has delivered its whole backlog (`drained`)."""
        while True:
            event = self.drained
            await event.wait()
            if self._drained_ok:
                return
            if self._stopped.is_set():
                raise self.final or ClientClosed(self.close_code, self.close_reason)

    async def aclose(self) -> None:
        """Close the connection normally and stop reconnecting."""
        self.reconnect = False
        self._stopped.set()
        if self._ws is not None:
            with trio.move_on_after(2):
                await self._ws.aclose()

    # -- background ----------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ack_flusher)
            while not self._stopped.is_set():
                refused: ConnectionRejected | None = None
                try:
                    await self._connect_once(None if started else task_status)
                except ConnectionRejected as exc:
                    refused = exc
                    log.debug("connection to %s refused: HTTP %d", self.url, exc.status_code)
                except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError) as exc:
                    log.debug("connection to %s failed: %r", self.url, exc)
                except LocalProtocolError:
                    # trio-websocket answers a ping that arrives during its own close
                    # handshake, and wsproto refuses a pong after a close frame
                    # (python-trio/trio-websocket#184): the connection is over all the same.
                    if not self._stopped.is_set():
                        raise
                started = self.connections > 0
                if self.close_code in FINAL_CLOSE_CODES or not self.reconnect:
                    break
                if refused is not None:
                    delay = self.backoff.after_refusal(refused.status_code, _retry_after(refused))
                else:
                    delay = self.backoff.after_close(self.close_code, self.close_reason)
                await trio.sleep(delay)
            self.final = ClientClosed(self.close_code, self.close_reason)
            self._stopped.set()
            self.connected.set()
            self.drained.set()
            for pending in self._pending.values():
                pending.done.set()
            nursery.cancel_scope.cancel()
        if self.connections == 0:
            raise self.final

    async def _connect_once(self, task_status: trio.TaskStatus[None] | None) -> None:
        token = self._token() if callable(self._token) else self._token
        async with open_websocket_url(
            self.url, self.ssl_context, subprotocols=["gateway.v1"],
            max_message_size=16 * 1024 * 1024,
            connect_timeout=10, disconnect_timeout=2,
        ) as ws:  # fmt: skip
            hello = {"t": "hello", "v": 1, "token": token, "active": self.active}
            await ws.send_message(cbor2.dumps(hello))
            try:
                await self._receive_until_closed(ws, task_status)
            finally:
                self._ws = None
                # Wake everyone waiting on this connection; they wait again for the next.
                lost, self.connected = self.connected, trio.Event()
                lost.set()
                self._drained_ok = False
                gone, self.drained = self.drained, trio.Event()
                gone.set()
                self.close_code = ws.closed.code if ws.closed else None
                self.close_reason = ws.closed.reason if ws.closed else None

    async def _receive_until_closed(
        self, ws: WebSocketConnection, task_status: trio.TaskStatus[None] | None
    ) -> None:
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
            if isinstance(message, str):
                continue  # the server never sends text; ignore rather than crash
            item = cbor2.loads(message)
            for frame in item if isinstance(item, list) else [item]:
                if frame.get("t") == "welcome":
                    self.welcome = frame
                    self._drained_ok = False
                    self.connections += 1
                    self.backoff.reset()
                    self._ws = ws
                    self.connected.set()
                    # Anything unanswered from an earlier connection goes out again.
                    unanswered = [p.frame for p in self._pending.values() if p.reply is None]
                    if unanswered:
                        await ws.send_message(cbor2.dumps(unanswered))
                    if task_status is not None:
                        task_status.started()
                        task_status = None
                else:
                    await self._dispatch(frame)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind in ("msg", "receipt", "group"):
            await self._inbox_send.send(Delivery(frame))
        elif kind == "drained":
            self._drained_ok = True
            self.drained.set()
        elif (
            kind in ("sent", "error")
            and (key := frame.get("ref", frame.get("id"))) in self._pending
        ):
            pending = self._pending.pop(key)
            pending.reply = frame
            pending.done.set()
        else:
            if kind == "error":
                self.errors.append(frame)
            await self._events_send.send(frame)

    async def _ack_flusher(self) -> None:
        while True:
            await self._ack_wakeup.wait()
            self._ack_wakeup = trio.Event()
            await trio.lowlevel.checkpoint()  # let acks of one burst accumulate
            while self._acks:
                batch, self._acks = self._acks[:ACK_BATCH], self._acks[ACK_BATCH:]
                try:
                    await self._send_frames([{"t": "ack", "sids": batch}])
                except ClientClosed:
                    return  # unacked items are delivered again on the next connection

    async def _current_ws(self) -> WebSocketConnection:
        while self._ws is None:
            if self._stopped.is_set():
                raise self.final or ClientClosed(self.close_code, self.close_reason)
            await self.connected.wait()
        return self._ws

    async def _send_frames(self, frames: list[dict[str, Any]], *, required: bool = True) -> None:
        """Send frames on the current connection. A send that is not `required` is
        resent after a reconnect anyway, so losing it here is fine."""
        try:
            ws = await self._current_ws()
            await ws.send_message(cbor2.dumps(frames[0] if len(frames) == 1 else frames))
        except ConnectionClosed:
            if required:
                raise ClientClosed(self.close_code, self.close_reason) from None
        except ClientClosed:
            if required:
                raise


def _retry_after(refusal: ConnectionRejected) -> float | None:
    for name, value in refusal.headers or ():
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


@asynccontextmanager
async def connect(
    url: str, token: str | Callable[[], str], **options: Any
) -> AsyncIterator[GatewayClient]:
    """Connect a device and keep it connected for the duration of the block.

    Returns once `welcome` has arrived. Options are those of `GatewayClient`.

    Raises:
        ClientClosed: The first connection could not be established and reconnecting is
            off, or the server refused the device (4001).
    """
    client = GatewayClient(url, token, **options)
    refused: ClientClosed | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(client._run)
        except ClientClosed as exc:
            refused = exc  # raised below, outside the nursery, as itself
        else:
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused

"""A simulated phone: registers a push token, drains, acks, goes idle, wakes on a push.

A browser device (``--web-share``) is the same phone with a Web Push subscription instead
of a token: its tab is closed while idle and a Web Push wake-up reopens it.

Two kinds of phone share this class:

- **idle-cycling** phones behave like an app that is mostly in the background: they close
  their socket after a while in the foreground, wait for a push, reconnect after a
  realistic delay once one arrives, drain and ack their queue, sometimes answer, and go
  idle again. With `zombie_share`, some of the times they go to the background they are
  suspended with the socket still open instead: once a frame arrives they read and answer
  nothing more, until a push (or the final drain) resumes the app, which then starts a
  new connection;
- **active** phones keep their socket open (an app in the foreground); they send the
  scenario's traffic and reconnect by themselves when the network drops them.

Both speak protocol v1 through the benchmarks' lean WebSocket client, and every
observation goes to the run's `Ledger`.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from scripts.kit.lean_client import LeanClient
from scripts.simulator.knobs import Scenario
from scripts.simulator.ledger import Ledger, member_key, now

CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
SEND_SETTLE = 2.0  # seconds an app waits for its last `sent` before it suspends
REGISTERED = "registered"  # the `ref` of the barrier that follows a push registration
NOBODY = "sim-nobody"  # a user with no device: sends to it are refused, in order
_USER_PREFIX = {"ios": "ios", "android": "and", "web": "web"}
_PROVIDER = {"ios": "apns", "android": "fcm", "web": "webpush"}


@dataclass
class FleetContext:
    """What every phone of one run shares."""

    url: str
    token: Callable[[str, str], str]  # (user, device) -> `hello` JWT
    scenario: Scenario
    ledger: Ledger
    final: trio.Event = field(default_factory=trio.Event)  # the final drain started
    stop: trio.Event = field(default_factory=trio.Event)  # everyone disconnects now
    phones: dict[str, Phone] = field(default_factory=dict)  # by user
    # Message ids must be new to the gateway: it answers a repeated id from the same
    # device with the original `sent` and stores nothing (a second run on one gateway).
    run_tag: str = field(default_factory=lambda: secrets.token_hex(4))


class Phone:
    """One simulated device (`user`, device ``phone``); run it with `run`."""

    def __init__(
        self, ctx: FleetContext, index: int, platform: str, cycles: bool, rng: random.Random
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.platform = platform  # "ios" | "android" | "web"
        self.cycles = cycles
        self.user = f"{_USER_PREFIX[platform]}{index:04d}"
        self.rng = rng
        self.push_rng = random.Random(rng.random())  # which of its pushes the provider drops
        self.provider = _PROVIDER[platform]
        self.push_token = (
            f"{rng.getrandbits(256):064x}"
            if platform == "ios"
            else f"fcm:{index}:{rng.getrandbits(128):032x}"
        )
        # A browser's Web Push subscription, made by the fake Web Push service (`subscribe`);
        # `push_token` is then the subscription's id, the last segment of its endpoint.
        self.subscription: dict[str, Any] | None = None
        self.online = False  # `welcome` received on the current connection
        self.waking = False  # a push (or the final drain) is making it reconnect
        self.ready = trio.Event()  # registered its push token
        self.poke = trio.Event()  # a push arrived, or the run changed phase
        self._wake_at: float | None = None
        self._client: LeanClient | None = None
        self._closed = trio.Event()
        self._drained = trio.Event()
        self._graceful = False
        self._pending: dict[str, dict[str, Any]] = {}  # sends without `sent` yet
        self._all_sent = trio.Event()  # set when `_pending` empties
        self._reads: dict[str, list[str]] = {}  # reads sent on this connection, by sender
        self._unconfirmed_reads: dict[str, list[str]] = {}  # from a connection that was reset
        self._seen: set[str] = set()
        self._last_senders: list[str] = []
        self._sent_count = 0
        self._nursery: trio.Nursery | None = None
        self._suspended = False  # the app is suspended with its socket open (a zombie)
        self._resumed = trio.Event()

    # -- what the rest of the simulator calls --------------------------------------------------

    async def run(self) -> None:
        """Live until the run stops: register, then cycle (or stay connected)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while not await self._connect(register=True):
                if await self._sleep(self.ctx.scenario.reconnect_delay.draw(self.rng)):
                    break
            if self.cycles:
                await self._run_cycling()
            else:
                await self._run_active()
            await self._close()
            nursery.cancel_scope.cancel()

    def on_push(self, at: float) -> None:
        """A wake-up reached the phone through the fake provider."""
        if self._suspended:  # the push resumes the suspended app: it connects afresh
            self._suspended = False
            self.waking = True
            self._wake_at = at
            self.ctx.ledger.note_wake(self.user, at)
            self.ctx.ledger.zombie_wakes += 1
            self._resumed.set()
            return
        if not self.cycles or self.online or self.waking:
            self.ctx.ledger.pushes_ignored += 1
            return
        self.waking = True
        self._wake_at = at
        self.ctx.ledger.note_wake(self.user, at)
        self.poke.set()

    def subscribe(self, subscription_id: str, subscription: dict[str, Any]) -> None:
        """Take the Web Push subscription a browser got from its push service."""
        self.push_token = subscription_id
        self.subscription = subscription

    async def send_message(self, to: Phone, *, urgent: bool, read_planned: bool) -> None:
        """Send one message to `to`; `sent` is awaited in the background (and the send is
        repeated on the next connection if this one ends first)."""
        self._sent_count += 1
        msg_id = f"{self.user}-{self.ctx.run_tag}-{self._sent_count}"
        body = self.rng.randbytes(self.ctx.scenario.body_bytes)
        frame = {"t": "send", "id": msg_id, "to": to.user, "body": body, "urgent": urgent}
        record = self.ctx.ledger.note_send(msg_id, self.user, to.user, urgent, not to.online)
        record.read_planned = read_planned
        self._pending[msg_id] = frame
        await self._write([frame])

    async def send_group_message(
        self, group: str, members: list[Phone], *, urgent: bool, read_share: float
    ) -> None:
        """Send one message to `group` (of which `members` are the other phones); each
        member marks it read with probability `read_share`."""
        self._sent_count += 1
        msg_id = f"{self.user}-{self.ctx.run_tag}-{self._sent_count}"
        body = self.rng.randbytes(self.ctx.scenario.body_bytes)
        frame = {"t": "send", "id": msg_id, "group": group, "body": body, "urgent": urgent}
        recipients = [(m.user, not m.online) for m in members]
        records = self.ctx.ledger.note_group_send(msg_id, self.user, group, recipients, urgent)
        for record in records:
            record.read_planned = self.rng.random() < read_share
        self._pending[msg_id] = frame
        await self._write([frame])

    async def drop(self) -> None:
        """Lose the network: the socket is reset, no close handshake."""
        client = self._client
        if client is not None and self.online:
            self.ctx.ledger.drops += 1
            await client.abort()

    # -- lifecycles -----------------------------------------------------------------------------

    async def _run_active(self) -> None:
        while not self.ctx.stop.is_set():
            if self.online:
                await _first(self._closed, self.ctx.stop)
            if self.ctx.stop.is_set():
                return
            if await self._sleep(self.ctx.scenario.reconnect_delay.draw(self.rng)):
                return
            await self._connect()

    async def _run_cycling(self) -> None:
        scenario = self.ctx.scenario
        while not self.ctx.stop.is_set():
            if self.online:
                await _first(self._drained, self._closed, self.ctx.stop)
                if self.online and not self.ctx.final.is_set():
                    await self._foreground()
                if self.online:  # the final drain: the app stays open until the end
                    await _first(self._closed, self.ctx.stop)
                if self.ctx.stop.is_set():
                    return
            # Idle: nothing open until a push arrives (or the final drain opens the app).
            await self._wait_for_wake()
            if self.ctx.stop.is_set():
                return
            if await self._sleep(scenario.reconnect_delay.draw(self.rng)):
                return
            if not await self._connect():
                self._wake_at = now()  # try again after another delay

    async def _foreground(self) -> None:
        """In the foreground for a while, maybe answer, then suspend (close the socket)."""
        scenario = self.ctx.scenario
        with trio.move_on_after(scenario.foreground.draw(self.rng)):
            await _first(self._closed, self.ctx.final)
        if not self.online or self.ctx.final.is_set():
            return
        if self._last_senders and self.rng.random() < scenario.reply_share:
            to = self.ctx.phones.get(self.rng.choice(self._last_senders))
            if to is not None:
                await self.send_message(
                    to,
                    urgent=self.rng.random() < scenario.urgent_share,
                    read_planned=self.rng.random() < scenario.read_share,
                )
        if self._pending:
            self._all_sent = trio.Event()
            with trio.move_on_after(SEND_SETTLE):
                await _first(self._all_sent, self._closed)
        if scenario.zombie_share > 0 and self.rng.random() < scenario.zombie_share:
            await self._suspend()
        else:
            await self._close()

    async def _suspend(self) -> None:
        """Suspended with the socket open until a push resumes the app (or the connection
        ends, or the run's final drain or end comes); then the socket is dropped, and the
        frames the app never read are delivered again on its next connection."""
        self._suspended = True
        self._resumed = trio.Event()
        self.ctx.ledger.zombies += 1
        await _first(self._resumed, self._closed, self.ctx.final, self.ctx.stop)
        self._suspended = False
        self._resumed.set()
        client = self._client
        if client is not None and not self._closed.is_set():
            await client.abort()
        await self._closed.wait()

    async def _wait_for_wake(self) -> None:
        while not (self.ctx.final.is_set() or self.ctx.stop.is_set()):
            if self._wake_at is not None:
                self._wake_at = None
                return
            await self.poke.wait()
            self.poke = trio.Event()
        self.waking = True

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, unless the run stops first; True if it stopped."""
        with trio.move_on_after(seconds):
            await self.ctx.stop.wait()
        return self.ctx.stop.is_set()

    # -- one connection -------------------------------------------------------------------------

    async def _connect(self, *, register: bool = False) -> bool:
        """Open a connection, send `hello`, and return once `welcome` has arrived."""
        assert self._nursery is not None
        self.ctx.ledger.note_reconnecting(self.user)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                client = await LeanClient.open(self.ctx.url)
        except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError):
            self.ctx.ledger.errors["connect failed"] += 1
            return False
        self._client = client
        self._closed = trio.Event()
        self._drained = trio.Event()
        self._graceful = False
        welcomed = trio.Event()
        registered = trio.Event()
        self._nursery.start_soon(self._receive, client, welcomed, registered)
        hello = {"t": "hello", "v": 1, "token": self.ctx.token(self.user, "phone"), "active": True}
        with contextlib.suppress(ConnectionClosed):
            await client.send_message(cbor2.dumps(hello))
        with trio.move_on_after(CONNECT_TIMEOUT):
            await _first(welcomed, self._closed)
        if not self.online:
            self.ctx.ledger.errors["no welcome"] += 1
            await client.abort()
            self._client = None
            return False
        if register:
            await self._write(
                [
                    self._push_registration(),
                    {"t": "send", "id": REGISTERED, "to": NOBODY, "body": b""},
                ]
            )
            with trio.move_on_after(CONNECT_TIMEOUT):
                await _first(registered, self._closed)
            if not registered.is_set():
                return False
            self.ready.set()
        return True

    def _push_registration(self) -> dict[str, Any]:
        if self.provider == "webpush":
            return {"t": "push", "provider": "webpush", "subscription": self.subscription}
        return {"t": "push", "provider": self.provider, "token": self.push_token}

    async def _close(self) -> None:
        """Close handshake; the receive task sees the server's close and ends."""
        client = self._client
        if client is None:
            return
        self._graceful = True
        try:
            await client.send_message(struct.pack("!H", 1000), 0x8)
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._closed.wait()
        except ConnectionClosed:
            pass
        if not self._closed.is_set():
            await client.abort()
            await self._closed.wait()

    async def _write(self, frames: list[dict[str, Any]]) -> None:
        client = self._client
        if client is None or not self.online:
            return  # sends are repeated after the next `welcome`
        with contextlib.suppress(ConnectionClosed):
            await client.send_message(cbor2.dumps(frames[0] if len(frames) == 1 else frames))

    async def _receive(
        self, client: LeanClient, welcomed: trio.Event, registered: trio.Event
    ) -> None:
        ledger = self.ctx.ledger
        try:
            while True:
                raw = await client.get_message()
                if self._suspended:  # read by the kernel, never by the suspended app
                    await self._resumed.wait()
                    break
                item = cbor2.loads(raw)
                out: list[dict[str, Any]] = []
                acks: list[int] = []
                reads: dict[str, list[str]] = {}
                for frame in item if isinstance(item, list) else [item]:
                    kind = frame.get("t")
                    if kind == "msg":
                        acks.append(frame["sid"])
                        self._on_message(frame, reads)
                    elif kind == "receipt":
                        acks.append(frame["sid"])
                        if frame["by"] == self.user:  # read on the user's other device
                            ledger.read_syncs += 1
                        else:
                            ledger.note_receipt(self.user, frame["kind"], frame["ids"], frame["by"])
                    elif kind == "group":  # a membership change: stored, so acked
                        acks.append(frame["sid"])
                    elif kind == "sent":
                        self._pending.pop(frame["id"], None)
                        ledger.note_stored(frame["id"])
                        if not self._pending:
                            self._all_sent.set()
                    elif kind == "drained":
                        ledger.note_drained(self.user)
                        self._drained.set()
                    elif kind == "welcome":
                        self.online = True
                        self.waking = False
                        ledger.note_connected(self.user)
                        welcomed.set()
                        out.extend(self._pending.values())  # unanswered: the server dedups
                        for sender, ids in self._unconfirmed_reads.items():
                            out.append({"t": "read", "to": sender, "ids": ids})
                            self._reads.setdefault(sender, []).extend(ids)
                        self._unconfirmed_reads.clear()
                    elif kind == "error":
                        if frame.get("ref") == REGISTERED:
                            registered.set()
                        else:
                            ledger.errors[f"error frame {frame.get('code')}"] += 1
                            self._pending.pop(frame.get("ref", ""), None)
                if acks:
                    out.append({"t": "ack", "sids": acks})
                for sender, ids in reads.items():
                    out.append({"t": "read", "to": sender, "ids": ids})
                    self._reads.setdefault(sender, []).extend(ids)
                if out:
                    await client.send_message(cbor2.dumps(out[0] if len(out) == 1 else out))
        except ConnectionClosed:
            pass
        except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError) as exc:
            ledger.errors[f"bad frame from the gateway: {type(exc).__name__}"] += 1
            await client.abort()
        finally:
            if not self._graceful:
                # Reads sent just before a reset may never have reached the server; a
                # real app marks them read again on its next connection, and so does this.
                for sender, ids in self._reads.items():
                    self._unconfirmed_reads.setdefault(sender, []).extend(ids)
            self._reads = {}
            if self._client is client:
                self._client = None
            self.online = False
            ledger.note_disconnected(self.user)
            self._closed.set()
            self._drained.set()

    def _on_message(self, frame: dict[str, Any], reads: dict[str, list[str]]) -> None:
        msg_id: str = frame["id"]
        key = msg_id if "group" not in frame else member_key(msg_id, self.user)
        self.ctx.ledger.note_message(self.user, key)
        if key in self._seen:
            return
        self._seen.add(key)
        sender: str = frame["from"]
        self._last_senders = [*self._last_senders[-3:], sender]
        record = self.ctx.ledger.messages.get(key)
        if record is not None and record.read_planned:
            self.ctx.ledger.note_read(key)
            reads.setdefault(sender, []).append(msg_id)


class Reader:
    """A second device (``tablet``) of a sleeping phone's user, always connected, that
    marks every message read as it arrives: the user reads on one device while the other
    sleeps, so the gateway syncs the read to the phone (and may send it a clear wake-up).
    Its deliveries are not the ledger's (the phone's are); its reads are counted."""

    def __init__(self, ctx: FleetContext, user: str, rng: random.Random) -> None:
        self.ctx = ctx
        self.user = user
        self.rng = rng

    async def run(self) -> None:
        """Stay connected, reconnecting after a drop, until the run stops."""
        ctx = self.ctx
        while not ctx.stop.is_set():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on, ctx.stop, nursery.cancel_scope)
                await self._connection()
                nursery.cancel_scope.cancel()
            with trio.move_on_after(ctx.scenario.reconnect_delay.draw(self.rng)):
                await ctx.stop.wait()

    async def _connection(self) -> None:
        ctx = self.ctx
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                client = await LeanClient.open(ctx.url)
        except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError):
            ctx.ledger.errors["connect failed"] += 1
            return
        try:
            hello = {"t": "hello", "v": 1, "token": ctx.token(self.user, "tablet"), "active": True}
            await client.send_message(cbor2.dumps(hello))
            while True:
                item = cbor2.loads(await client.get_message())
                out: list[dict[str, Any]] = []
                acks: list[int] = []
                reads: dict[str, list[str]] = {}
                for frame in item if isinstance(item, list) else [item]:
                    if "sid" in frame:
                        acks.append(frame["sid"])
                    if frame.get("t") == "msg" and "group" not in frame:
                        reads.setdefault(frame["from"], []).append(frame["id"])
                        ctx.ledger.reads_elsewhere += 1
                if acks:
                    out.append({"t": "ack", "sids": acks})
                out.extend({"t": "read", "to": s, "ids": ids} for s, ids in reads.items())
                if out:
                    await client.send_message(cbor2.dumps(out[0] if len(out) == 1 else out))
        except ConnectionClosed:
            pass
        except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError) as exc:
            ctx.ledger.errors[f"bad frame from the gateway: {type(exc).__name__}"] += 1
        finally:
            with trio.CancelScope(shield=True):
                await client.abort()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _first(*events: trio.Event) -> None:
    """Wait until any of `events` is set."""
    if any(e.is_set() for e in events):
        return
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)

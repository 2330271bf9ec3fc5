"""Carries out client commands: one small handler per frame type.

Handlers never wait for a commit: they submit to the store and leave a pending entry in
the connection's outbox, so one device can pipeline many sends while the writer answers
each `sent` in order as its commit lands.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gateway import frames
from gateway.counters import Counters
from gateway.errors import StoreError
from gateway.frames import (
    Ack,
    ClientFrame,
    ClientState,
    GroupSend,
    Privacy,
    PushRegistration,
    Read,
    Send,
    Subscribe,
    Typing,
    Unsubscribe,
)
from gateway.logthrottle import LogThrottle
from gateway.peer import Sender
from gateway.ratelimit import SendVerdict
from gateway.send_path import SendPath
from gateway.session import CloseCode
from gateway.store import MessageStore, PushToken, SendOutcome
from gateway.store.base import Ticket
from presence.fanout import SubscriptionLimit
from presence.service import PresenceService

log = logging.getLogger(__name__)

# Seconds between log lines about store failures: an outage fails every operation.
STORE_LOG_INTERVAL = 10.0

Handler = Callable[[Sender, Any], Awaitable[None]]


class Router:
    """Routes validated frames to the send path, the store and presence."""

    def __init__(
        self,
        store: MessageStore,
        sends: SendPath,
        presence: PresenceService,
        metrics: Counters,
        *,
        clock: Callable[[], int],
        max_ttl: int,
    ) -> None:
        self.store = store
        self.sends = sends
        self.presence = presence
        self.metrics = metrics
        self.clock = clock
        self.max_ttl = max_ttl
        self._store_log = LogThrottle(STORE_LOG_INTERVAL)
        self._handlers: dict[type[Any], Handler] = {
            Send: self._send,
            GroupSend: self._group_send,
            Ack: self._ack,
            Read: self._read,
            Typing: self._typing,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            ClientState: self._state,
            Privacy: self._privacy,
            PushRegistration: self._push,
        }

    async def handle(self, conn: Sender, frame: ClientFrame) -> None:
        """Carry out one frame from an authenticated connection."""
        self.metrics.frames_in += 1
        await self._handlers[type(frame)](conn, frame)

    async def _send(self, conn: Sender, f: Send) -> None:
        if not self._admit_send(conn, f.id):
            return
        try:
            ticket = await self.sends.submit(conn.user, conn.device, f)
        except StoreError as exc:
            conn.push(self._store_failed(f.id, exc))
            return

        def render(outcome: SendOutcome) -> dict[str, Any]:
            if outcome.unknown_recipient:
                return frames.error("unknown_recipient", "no known device", ref=f.id)
            return frames.sent(f.id, outcome.ts, outcome.skipped)

        conn.push_pending(ticket, render, lambda exc: self._store_failed(f.id, exc))

    async def _group_send(self, conn: Sender, f: GroupSend) -> None:
        if not self._admit_send(conn, f.id):
            return
        try:
            ticket = await self.sends.submit_group(conn.user, conn.device, f)
        except StoreError as exc:
            conn.push(self._store_failed(f.id, exc))
            return

        def render(outcome: SendOutcome) -> dict[str, Any]:
            if outcome.not_member:
                return frames.error("not_member", "not a member of that group", ref=f.id)
            return frames.sent(f.id, outcome.ts)

        conn.push_pending(ticket, render, lambda exc: self._store_failed(f.id, exc))

    def _admit_send(self, conn: Sender, ref: str) -> bool:
        """Whether the send rate limit lets this send through; answers it if not."""
        verdict = conn.send_limit.check(trio.current_time())
        if verdict is SendVerdict.ALLOW:
            return True
        self.metrics.rate_limited += 1
        if verdict is SendVerdict.ABUSE:
            log.info("connection %s: closed for ignoring rate_limited", conn)
            conn.request_close(CloseCode.POLICY, "rate limit exceeded")
        else:
            conn.push(frames.error("rate_limited", "too many sends", ref=ref))
        return False

    async def _ack(self, conn: Sender, f: Ack) -> None:
        sids = conn.expand_acks(f.sids)
        await self._fire(self.store.submit_ack(conn.user, conn.device, sids, self.clock()), "ack")

    async def _read(self, conn: Sender, f: Read) -> None:
        now = self.clock()
        expires = now + self.max_ttl * 1000
        await self._fire(
            self.store.submit_read(conn.user, conn.device, f.to, f.ids, now, expires), "read"
        )

    async def _fire(self, submission: Awaitable[Ticket[Any]], what: str) -> None:
        """Submit an operation whose outcome the client does not wait for."""
        try:
            await submission
        except StoreError as exc:
            # Not committed: the items stay queued and are delivered again, which is the
            # at-least-once contract; the client's retry of `read` is its own.
            self._store_warning(f"{what} not stored", exc)

    async def _typing(self, conn: Sender, f: Typing) -> None:
        self.presence.typing(conn.user, conn.device, f.to, f.on)

    async def _subscribe(self, conn: Sender, f: Subscribe) -> None:
        try:
            await self.presence.refresh(f.users)
        except StoreError as exc:  # answer from what is known; changes follow when back
            self._store_warning("presence not refreshed", exc)
        try:
            snapshot = self.presence.subscribe(conn.id, f.users)
        except SubscriptionLimit as exc:
            conn.push(frames.error("limit_exceeded", str(exc), ref="sub"))
            return
        conn.push(frames.presence(snapshot))

    async def _unsubscribe(self, conn: Sender, f: Unsubscribe) -> None:
        self.presence.unsubscribe(conn.id, f.users)

    async def _state(self, conn: Sender, f: ClientState) -> None:
        conn.active = f.active
        self.presence.set_active(conn.id, f.active)

    async def _privacy(self, conn: Sender, f: Privacy) -> None:
        self.presence.set_hidden(conn.user, f.hide_presence)

    async def _push(self, conn: Sender, f: PushRegistration) -> None:
        token = None
        if f.provider is not None and f.token is not None:
            token = PushToken(f.provider, f.token, f.topic, f.sandbox, self.clock())
        try:
            await self.store.set_push_token(conn.user, conn.device, token)
        except StoreError as exc:
            conn.push(self._store_failed("push", exc))

    def _store_failed(self, ref: str, exc: StoreError) -> dict[str, Any]:
        """The error frame for an operation the store refused, which is logged (throttled)."""
        self._store_warning("store refused an operation", exc)
        return frames.error("internal", "store unavailable; not stored", ref=ref)

    def _store_warning(self, what: str, exc: StoreError) -> None:
        # While the store is down every connection's every operation fails: one line per
        # STORE_LOG_INTERVAL says so, and how many failures it stands for.
        held = self._store_log.take(trio.current_time())
        if held is not None:
            more = f" ({held} more store failures since the last report)" if held else ""
            log.warning("%s: %s%s", what, exc, more)

"""Session start and end: authentication, revocation, the registry, the cluster claim,
presence and the backlog, outside the connection's I/O.

A `hello` costs one store round trip before `welcome` (`MessageStore.open_session`): the
revocation check, the durable registration of the device and the first page of its queue
come back together, ordered after every earlier submission, so acks from the device's
previous connection are committed before its backlog is read and nothing acknowledged is
delivered twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import trio

from gateway.auth import TokenVerifier
from gateway.clock import now_ms
from gateway.errors import AuthError, StoreError
from gateway.frames import Hello
from gateway.peer import Peer
from gateway.registry import Registry, Watch
from gateway.session import CloseCode
from gateway.store.base import MessageStore, SessionOpening
from presence.service import PresenceService

log = logging.getLogger("gateway.connection")

DETACH_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Opened:
    """A session opened in the store, not yet attached to its connection."""

    user: str
    device: str
    opening: SessionOpening
    watch: Watch


class Claims(Protocol):
    """The cluster's device -> node registry, on Redis (None on a single node)."""

    async def claim(self, conn: Peer) -> None:
        """Register `conn`'s device as connected here, closing it elsewhere (4009)."""
        ...

    def release(self, conn: Peer) -> None:
        """`conn` ended: let go of its device."""
        ...


class Sessions:
    """Starts and ends device sessions for the connections of one process."""

    def __init__(
        self,
        verifier: TokenVerifier,
        store: MessageStore,
        registry: Registry,
        presence: PresenceService,
        claims: Claims | None,
    ) -> None:
        self._verifier = verifier
        self._store = store
        self._registry = registry
        self._presence = presence
        self._claims = claims

    async def open(self, hello: Hello, limit: int) -> Opened | None:
        """Verify `hello`'s token and open the device's session in the store, reading the
        first `limit` items of its queue.

        Returns:
            The identity and what the store holds for the device (pass it to `attach`),
            or None if the token is refused (bad, expired, or issued before the device
            was revoked).

        Raises:
            StoreError: The store did not answer.
        """
        try:
            identity = self._verifier.verify(hello.token)
        except AuthError as exc:
            log.info("hello refused: %s", exc)
            return None
        issued_at = None if identity.issued_at is None else identity.issued_at * 1000
        watch = self._registry.watch(identity.user, identity.device)
        try:
            opening = await self._store.open_session(
                identity.user, identity.device, issued_at=issued_at, now=now_ms(), limit=limit
            )
        except BaseException:
            self._registry.unwatch(watch)
            raise
        if opening.refused:
            self._registry.unwatch(watch)
            log.info("hello refused: token issued before revocation")
            return None
        return Opened(identity.user, identity.device, opening, watch)

    async def attach(self, conn: Peer, opened: Opened) -> None:
        """Make `conn` its device's live connection: the previous one here closes with
        4009, and so does one on another node (through the cluster claim).

        Raises:
            StoreError: The cluster registry did not answer.
        """
        previous = self._registry.attach(conn)
        self._registry.unwatch(opened.watch)
        if opened.watch.rung:
            conn.ring()  # an item committed after the session's read rang no one
        if previous is not None:
            previous.request_close(CloseCode.REPLACED, "replaced by a newer connection")
        self._presence.add_subscriber(conn.id, active=conn.active)
        self._presence.device_connected(conn.user, conn.device)
        if self._claims is not None:
            await self._claims.claim(conn)
            # Until the claim, items stored by other nodes rang no one here: read the queue.
            conn.ring()

    async def detach(self, conn: Peer) -> None:
        """`conn` has ended: let go of its device if it is still the device's connection,
        and record when it was last seen."""
        self._presence.remove_subscriber(conn.id)
        if not self._registry.detach(conn):
            return
        if self._claims is not None:
            self._claims.release(conn)
        self._presence.device_disconnected(conn.user, conn.device)
        with trio.move_on_after(DETACH_TIMEOUT):
            try:
                await self._store.touch_device(conn.user, conn.device, now_ms())
            except StoreError as exc:
                log.warning("connection #%d: last-seen not recorded: %s", conn.id, exc)

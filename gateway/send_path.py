"""The one path a message takes into the store, whoever sends it.

A device's `send` frame (through the router) and the backend API's `POST /v1/messages`
both come here with the same validated `Send` command; a device's `send` with `group`
comes here as a `GroupSend`. The message is stamped with the
gateway's clock and submitted for a durable commit; once the commit is known, its outcome
is counted in `gateway_sends_total`, and a resend of a message already stored rings the
recipient's devices again. Each caller only turns the outcome into its own answer: a
`sent` or `error` frame, or an HTTP status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from gateway.counters import Counters
from gateway.errors import StoreError
from gateway.frames import GroupSend, Send
from gateway.registry import Registry
from gateway.store import Envelope, GroupEnvelope, MessageStore, SendOutcome, Ticket


class SendPath:
    """Submits messages, counts what became of each, and re-rings on a duplicate.

    Args:
        store: Where messages are stored.
        registry: This process's live connections; a duplicate rings its recipient's.
        counters: `sends` counts each message by outcome: ``stored``, ``duplicate``,
            ``unknown_recipient``, ``not_member`` or ``failed``.
        clock: Wall-clock milliseconds since the epoch, the messages' `ts`.
    """

    def __init__(
        self,
        store: MessageStore,
        registry: Registry,
        counters: Counters,
        *,
        clock: Callable[[], int],
    ) -> None:
        self._store = store
        self._registry = registry
        self._counters = counters
        self._clock = clock

    async def submit(self, sender: str, sender_device: str, send: Send) -> Ticket[SendOutcome]:
        """Submit a message from a sender's device, timestamped now.

        Its outcome is counted, and a duplicate's recipients rung, as soon as the commit is
        known, whether or not anyone waits for the ticket.

        Args:
            sender: The sending user (the system identity for the backend API).
            sender_device: The sending device.
            send: The validated message; `send.ttl` is in seconds.

        Returns:
            The ticket that resolves once the message is durable for every recipient
            device (or found already stored).

        Raises:
            StoreError: The store refused the submission; nothing was stored.
        """
        now = self._clock()
        envelope = Envelope(
            sender=sender,
            sender_device=sender_device,
            msg_id=send.id,
            to=send.to,
            body=send.body,
            bodies=send.bodies,
            urgent=send.urgent,
            ts=now,
            expires=now + send.ttl * 1000,
        )
        return await self._watched(self._store.submit_send(envelope), send.to)

    async def submit_group(
        self, sender: str, sender_device: str, send: GroupSend
    ) -> Ticket[SendOutcome]:
        """Submit a group message from a sender's device, timestamped now: stored for
        every device of every member but the sending one, the body once.

        Its outcome is counted as soon as the commit is known; a duplicate rings the
        devices of every member connected here, as a 1:1 duplicate rings its recipient's.

        Args:
            sender: The sending user, who must be a member of the group.
            sender_device: The sending device.
            send: The validated message; `send.ttl` is in seconds.

        Returns:
            The ticket that resolves once the message is durable for every member device
            (or found already stored), or with `not_member`.

        Raises:
            StoreError: The store refused the submission; nothing was stored.
        """
        now = self._clock()
        envelope = GroupEnvelope(
            sender=sender,
            sender_device=sender_device,
            msg_id=send.id,
            group=send.group,
            body=send.body,
            urgent=send.urgent,
            ts=now,
            expires=now + send.ttl * 1000,
        )
        return await self._watched(self._store.submit_group_send(envelope), sender)

    async def _watched(
        self, submission: Awaitable[Ticket[SendOutcome]], to: str
    ) -> Ticket[SendOutcome]:
        """Await a submission, counting a refusal; its outcome is counted (and `to`'s
        devices rung for a duplicate) once its commit is known."""
        try:
            ticket = await submission
        except StoreError:
            self._counters.sends["failed"] += 1
            raise
        ticket.on_done(partial(self._settled, to, ticket))
        return ticket

    def _settled(self, to: str, ticket: Ticket[SendOutcome]) -> None:
        """Count a completed send; ring the recipient's devices for a duplicate."""
        try:
            outcome = ticket.outcome()
        except StoreError:
            self._counters.sends["failed"] += 1
            return
        if outcome.not_member:
            self._counters.sends["not_member"] += 1
        elif outcome.unknown_recipient:
            self._counters.sends["unknown_recipient"] += 1
        elif outcome.duplicate:
            self._counters.sends["duplicate"] += 1
            # The first attempt may have been stored without its doorbell ringing (its
            # commit's answer was lost): have the recipients' devices here read again.
            for user in outcome.members or (to,):
                for recipient in self._registry.of_user(user):
                    recipient.ring()
        else:
            self._counters.sends["stored"] += 1

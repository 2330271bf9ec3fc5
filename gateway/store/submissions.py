"""The bounded queue between the tasks that submit store operations and a backend's writer.

Both backends commit in groups: submitters put operations here, and one writer task takes
everything waiting (up to a batch size) and commits it at once. Closing the queue stops new
submissions; the writer still takes what was queued before, and whatever it can no longer
commit is failed with `StoreClosed`, never left hanging.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

import trio

from gateway.errors import StoreClosed
from gateway.store.base import Ticket


class Submission(Protocol):
    """An operation waiting for a commit: whatever it carries, it owns a ticket."""

    @property
    def ticket(self) -> Ticket[Any]:
        """Resolved or failed once the operation's commit is known."""


OpT = TypeVar("OpT", bound=Submission)


class SubmissionQueue(Generic[OpT]):
    """A bounded channel of submissions, taken out in batches by a single writer."""

    def __init__(self, size: int) -> None:
        self._send, self._receive = trio.open_memory_channel[OpT](size)
        self.closed = False

    async def put(self, op: OpT) -> None:
        """Queue `op` for the writer, waiting only while the queue is full.

        Raises:
            StoreClosed: The store is shutting down; `op` was not queued.
        """
        if self.closed:
            raise StoreClosed("the store is shutting down")
        try:
            try:
                # Most submissions find room: skip the scheduler round trip that a
                # blocking send costs, and wait only when the queue is really full.
                self._send.send_nowait(op)
            except trio.WouldBlock:
                await self._send.send(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreClosed("the store is shutting down") from None

    async def next_batch(self, max_batch: int) -> list[OpT] | None:
        """Wait for a submission; return it with up to `max_batch` - 1 more already waiting.

        Returns None once the queue is closed and empty.
        """
        try:
            batch = [await self._receive.receive()]
        except trio.EndOfChannel:
            return None
        while len(batch) < max_batch:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    def depth(self) -> int:
        """Submissions waiting for the writer."""
        return self._send.statistics().current_buffer_used

    def close(self) -> None:
        """Refuse new submissions; those already queued can still be taken."""
        self.closed = True
        self._send.close()

    def fail_unsubmitted(self) -> None:
        """Fail what is still queued when the writer stops early: it was not committed."""
        while True:
            try:
                op = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            op.ticket.fail(StoreClosed("the store stopped before this was committed"))

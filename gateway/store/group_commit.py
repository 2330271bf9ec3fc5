"""The shell every backend commits through: one writer, submissions grouped into batches.

```
GroupCommitStore.run
├─ the backend's session (open the file, connect to Redis...) around everything below
├─ the writer: takes every waiting submission (up to `max_batch`), has the backend apply
│  them as one commit, then resolves their tickets and rings their doorbells
└─ the backend's background task, if it has one
```

Submitters put operations in a bounded queue and get a `Ticket`. A backend supplies only
how to apply a batch (`_apply`) and how to read; the shell keeps the queue, the run loop,
the commit statistics and the doorbells. Under load, a batch gathers while the previous
one commits, so many operations share one fsync (SQLite) or one pipeline (Redis).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

import trio

from gateway.store.base import CommitStats, Doorbell, MessageStore, QueueItem
from gateway.store.submissions import Submission, SubmissionQueue

log = logging.getLogger(__name__)

SUBMIT_QUEUE = 4096

#: A device to ring after a commit: (user, device, urgent, the item stored for it).
Ring = tuple[str, str, bool, QueueItem]
#: What applying one operation gave: its value and the devices to ring, or the error
#: that fails it alone.
Outcome = tuple[Any, list[Ring]] | BaseException

OpT = TypeVar("OpT", bound=Submission)


class GroupCommitStore(MessageStore, Generic[OpT]):
    """A `MessageStore` whose mutations go through one writer in batches.

    A backend implements `_session` (what is open while the store runs), `_apply` (one
    batch as one commit) and the reads; it may add a `_background` task.
    """

    def __init__(self, *, doorbell: Doorbell, max_batch: int, receipt_ttl_ms: int) -> None:
        self._doorbell = doorbell
        self._max_batch = max_batch
        self._receipt_ttl_ms = receipt_ttl_ms
        self._queue = SubmissionQueue[OpT](SUBMIT_QUEUE)
        self._unsettled = 0  # submissions not yet committed (or failed)
        self.commit_stats = CommitStats()
        self.commits = 0

    # -- what a backend supplies -----------------------------------------------------------

    @abc.abstractmethod
    def _session(self) -> AbstractAsyncContextManager[None]:
        """Open what the store needs (files, connections), closing it on the way out; the
        writer runs inside it."""

    @abc.abstractmethod
    async def _apply(self, batch: Sequence[OpT]) -> list[Outcome]:
        """Commit `batch` (possibly empty) and return each operation's outcome, in order.
        An operation that fails fails alone; if the whole commit fails, every operation
        gets the error."""

    async def _background(self) -> None:
        """A task that runs beside the writer until the store closes (none by default)."""

    # -- the service -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store and commit submissions until `close`, then flush what was
        submitted before it and return."""
        async with self._session():
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._background)
                    while (batch := await self._queue.next_batch(self._max_batch)) is not None:
                        with trio.CancelScope(shield=True):
                            await self._commit(batch)
                    nursery.cancel_scope.cancel()
            finally:
                self.close()
                self._queue.fail_unsubmitted()

    def close(self) -> None:
        """Stop accepting submissions; `run` commits those already queued, then returns."""
        self._queue.close()

    def queue_depth(self) -> int:
        """Submissions waiting for a commit."""
        return self._queue.depth()

    async def _enqueue(self, op: OpT) -> None:
        """Queue `op` for the writer (waiting while the queue is full).

        Raises:
            StoreClosed: The store is shutting down; `op` was not queued.
        """
        self._unsettled += 1
        try:
            await self._queue.put(op)
        except BaseException:
            self._unsettled -= 1
            raise

    async def _commit(self, batch: list[OpT]) -> None:
        """Commit one batch; resolve or fail its tickets and ring its devices."""
        started = time.perf_counter()
        try:
            outcomes = await self._apply(batch)
        finally:
            self._unsettled -= len(batch)
        self.commits += 1
        self.commit_stats.observe(len(batch), time.perf_counter() - started)
        for op, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                op.ticket.fail(outcome)
                continue
            value, rings = outcome
            op.ticket.resolve(value)
            for user, device, urgent, item in rings:
                try:
                    self._doorbell(user, device, urgent, item)
                except Exception:  # a doorbell is a hint; the item is stored regardless
                    log.exception("doorbell for %s/%s failed", user, device)

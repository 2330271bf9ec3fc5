"""The due queue behind the heartbeat and the ack watch: entries handled once due, in the
order they were added, at most a burst between two checkpoints."""

from __future__ import annotations

import trio
import trio.testing

from gateway.due_queue import BURST, DueQueue


async def test_entries_are_handled_once_due_in_the_order_they_were_added(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handled: list[tuple[float, str]] = []

    def handle(now: float, entry: str) -> bool:
        assert now == trio.current_time()
        handled.append((now - t0, entry))
        if entry == "again":  # a handler may queue an entry again
            queue.add(now + 10, "again, later")
        return True

    queue: DueQueue[str] = DueQueue(handle)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        queue.add(t0 + 10, "a")
        queue.add(t0 + 10, "b")
        queue.add(t0 + 25, "c")
        await trio.sleep(9.9)
        assert handled == []
        await trio.sleep(20)
        assert handled == [(10, "a"), (10, "b"), (25, "c")]

        # Idle now: an entry added wakes the task, and one due earlier than the entry
        # before it waits behind that entry (first in, first out).
        queue.add(t0 + 40, "late")
        queue.add(t0 + 35, "early")
        queue.add(t0 + 50, "again")
        await trio.sleep(70 - (trio.current_time() - t0))
        assert handled[3:] == [(40, "late"), (40, "early"), (50, "again"), (60, "again, later")]
        nursery.cancel_scope.cancel()


async def test_at_most_a_burst_is_handled_between_two_checkpoints(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handled: list[int] = []

    def handle(now: float, entry: int) -> bool:
        handled.append(entry)
        cancelled.cancel()  # takes effect at the task's next checkpoint
        return True

    queue: DueQueue[int] = DueQueue(handle)
    for n in range(BURST + 1):
        queue.add(trio.current_time() + 1, n)
    with trio.CancelScope() as cancelled:
        await queue.run()
    assert handled == list(range(BURST))

    async with trio.open_nursery() as nursery:  # the rest is handled by the next run
        await nursery.start(queue.run)
        await trio.testing.wait_all_tasks_blocked()
        assert handled == list(range(BURST + 1))
        nursery.cancel_scope.cancel()


async def test_skipped_entries_do_not_count_towards_the_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gone = set(range(100))  # what these entries stood for has ended
    handled: list[int] = []

    def handle(now: float, entry: int) -> bool:
        handled.append(entry)
        cancelled.cancel()
        return entry not in gone

    queue: DueQueue[int] = DueQueue(handle)
    for n in range(len(gone) + BURST + 1):
        queue.add(trio.current_time() + 1, n)
    with trio.CancelScope() as cancelled:
        await queue.run()
    assert handled == list(range(len(gone) + BURST))

"""The expiry sweep loop: it sweeps only while the store says this process should."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from gateway.server import SWEEP_LEASE_INTERVALS, _sweep_expired


class LeaseStore:
    """Answers `may_sweep` from a script of turns and records the sweeps asked of it."""

    def __init__(self, turns: list[bool]) -> None:
        self.turns = turns
        self.leases: list[int] = []
        self.sweeps = 0
        self.done = trio.Event()

    async def may_sweep(self, lease_ms: int) -> bool:
        self.leases.append(lease_ms)
        if len(self.leases) == len(self.turns):
            self.done.set()
        return self.turns[min(len(self.leases), len(self.turns)) - 1]

    async def sweep_expired(self, now: int) -> int:
        self.sweeps += 1
        return 0


async def test_it_sweeps_only_on_the_turns_it_holds_the_lease(autojump_clock: Any) -> None:
    store = LeaseStore([True, False, False, True, True])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sweep_expired, store, 30.0)
        await store.done.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert store.sweeps == 3
    assert set(store.leases) == {30_000 * SWEEP_LEASE_INTERVALS}

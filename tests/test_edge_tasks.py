"""What an idle connection costs in tasks, and the process-wide heartbeat."""

from __future__ import annotations

import trio
import trio.testing

from gateway.client import connect
from gateway.heartbeat import Heartbeat


def all_tasks() -> list[trio.lowlevel.Task]:
    """Every task of the run, walked from the root."""
    found: list[trio.lowlevel.Task] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        found.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found


def named(tasks: list[trio.lowlevel.Task], name: str) -> list[trio.lowlevel.Task]:
    return [task for task in tasks if task.name.endswith(name)]


async def test_an_idle_connection_holds_one_task_and_output_starts_none(server, token):
    async with connect(server.url, token("bob", "phone")) as bob:
        await bob.wait_drained()
        async with connect(server.url, token("alice", "phone")) as alice:
            await alice.wait_drained()
            await trio.testing.wait_all_tasks_blocked()
            tasks = all_tasks()
            assert len(named(tasks, "Edge._serve_stream")) == 2  # one per connection
            assert named(tasks, "Connection._flush") == []  # nothing is being written
            before = len(tasks)

            sent = await alice.send("bob", b"hello")  # delivered, answered, receipted
            assert (await bob.next_delivery()).frame["id"] == sent.id
            await trio.testing.wait_all_tasks_blocked()
            assert named(all_tasks(), "Connection._flush") == []
            assert len(all_tasks()) == before


class Beat:
    """A connection as the heartbeat sees it: it answers pings or it does not."""

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.pings = 0
        self.closed = False
        self._unanswered = False

    def heartbeat(self) -> bool:
        if self._unanswered:
            self.closed = True
            return False
        self.pings += 1
        self._unanswered = not self.answers
        return True


async def test_one_heartbeat_task_pings_every_connection_each_interval(autojump_clock):
    heartbeat = Heartbeat(10.0)
    alive, silent, gone = Beat(answers=True), Beat(answers=False), Beat(answers=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(heartbeat.run)
        heartbeat.add(1, alive)
        heartbeat.add(2, silent)
        heartbeat.add(3, gone)
        heartbeat.discard(3)  # its connection ended
        await trio.sleep(10.5)
        assert (alive.pings, silent.pings, silent.closed) == (1, 1, False)
        await trio.sleep(10)  # the silent one's ping is still unanswered: closed
        assert (alive.pings, silent.closed) == (2, True)
        await trio.sleep(30)
        assert (alive.pings, silent.pings, gone.pings) == (5, 1, 0)
        assert len(heartbeat) == 1
        nursery.cancel_scope.cancel()

"""Test doubles for the push dispatcher: a scripted provider and a small in-memory store."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from gateway.store import QueueItem
from push.notification import SENT, Notification, PushResult
from push.settings import PushSettings
from push.store import ItemKind, PushToken


@dataclass
class Attempt:
    at: float  # trio time
    notification: Notification


class ScriptedProvider:
    """A provider whose answers are queued by the test (default: sent).

    An answer may be a `PushResult`, or a `trio.Event` to wait for before the next queued
    answer is used (to hold a request open), or ``"hang"`` to never answer.
    """

    def __init__(self, name: str = "apns") -> None:
        self.name = name
        self.answers: deque[Any] = deque()
        self.attempts: list[Attempt] = []
        self._arrived = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def send(self, notification: Notification) -> PushResult:
        self.attempts.append(Attempt(trio.current_time(), notification))
        self._arrived.set()
        self._arrived = trio.Event()
        while self.answers:
            answer = self.answers.popleft()
            if answer == "hang":
                await trio.sleep_forever()
            if isinstance(answer, trio.Event):
                await answer.wait()
                continue
            assert isinstance(answer, PushResult)
            return answer
        return SENT

    async def wait_attempts(self, count: int) -> list[Attempt]:
        while len(self.attempts) < count:
            await self._arrived.wait()
        return self.attempts


@dataclass
class MemoryStore:
    """The four store reads and writes the dispatcher uses, with the SQLite semantics."""

    tokens: dict[tuple[str, str], PushToken] = field(default_factory=dict)
    queued: dict[tuple[str, str], list[QueueItem]] = field(default_factory=dict)
    cleared: list[tuple[str, str, str, int]] = field(default_factory=list)

    def register(
        self, user: str, device: str, token: str, *, provider: str = "apns", at: int = 0
    ) -> PushToken:
        self.tokens[(user, device)] = PushToken(provider, token, None, False, at)
        return self.tokens[(user, device)]

    def queue(
        self,
        user: str,
        device: str,
        *,
        urgent: bool,
        kind: ItemKind = ItemKind.MESSAGE,
        msg_id: str = "m",
        sender: str = "alice",
        ids: tuple[str, ...] = (),
    ) -> None:
        items = self.queued.setdefault((user, device), [])
        sid = len(items) + 1
        items.append(QueueItem(sid, kind, msg_id, sender, "phone", 0, urgent, b"", ids))

    def ack(self, user: str, device: str) -> None:
        """The device acked everything queued."""
        self.queued.pop((user, device), None)

    async def push_token(self, user: str, device: str) -> PushToken | None:
        await trio.lowlevel.checkpoint()
        return self.tokens.get((user, device))

    async def count(self, user: str, device: str, now: int) -> int:
        await trio.lowlevel.checkpoint()
        return len(self.queued.get((user, device), []))

    async def fetch(
        self, user: str, device: str, after: int, limit: int, now: int
    ) -> list[QueueItem]:
        await trio.lowlevel.checkpoint()
        return [i for i in self.queued.get((user, device), []) if i.sid > after][:limit]

    async def clear_push_token(self, user: str, device: str, token: str, sent_at: int) -> bool:
        await trio.lowlevel.checkpoint()
        self.cleared.append((user, device, token, sent_at))
        current = self.tokens.get((user, device))
        if current is None or current.token != token or current.registered_at > sent_at:
            return False
        del self.tokens[(user, device)]
        return True


def push_settings(**changes: Any) -> PushSettings:
    """The default `[push]` settings with a few keys changed."""
    import dataclasses

    return dataclasses.replace(PushSettings(), **changes)

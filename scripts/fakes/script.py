"""Scripted answers for the fake push services: per token, in order, then a default."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer. Each fake renders it in its own service's format.

    `reason` is the APNs reason (``"Unregistered"``) or the FCM error code
    (``"UNREGISTERED"``, ``"INVALID_ARGUMENT"``, ``"QUOTA_EXCEEDED"``, ``"UNAVAILABLE"``).
    """

    status: int = 200
    reason: str = ""
    retry_after: int | None = None
    timestamp: int | None = None  # APNs 410: when the token stopped being valid (ms)
    delay: float = 0.0  # math.inf: never answer
    gate: trio.Event | None = None  # answer only once this is set (tests)

    @classmethod
    def hang(cls) -> Reply:
        """Never answer (the connection stays open)."""
        return cls(delay=math.inf)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        """A reply from the control API's JSON (``{"status": 410, "reason": ...}``)."""
        delay = data.get("delay", 0.0)
        return cls(
            status=int(data.get("status", 200)),
            reason=str(data.get("reason", "")),
            retry_after=data.get("retry_after"),
            timestamp=data.get("timestamp"),
            delay=math.inf if data.get("hang") or delay == "inf" else float(delay),
        )


OK = Reply()


class Script:
    """Replies queued per device token (or for any token), consumed one per request."""

    def __init__(self) -> None:
        self.default = OK
        self._by_token: dict[str, deque[Reply]] = {}
        self._any: deque[Reply] = deque()

    def add(self, *replies: Reply, token: str | None = None) -> None:
        """Queue replies for `token`, or for the next requests to any token."""
        queue = self._any if token is None else self._by_token.setdefault(token, deque())
        queue.extend(replies)

    def next(self, token: str) -> Reply:
        """The reply for a request to `token`."""
        queue = self._by_token.get(token)
        if queue:
            return queue.popleft()
        if self._any:
            return self._any.popleft()
        return self.default

    def clear(self) -> None:
        """Forget every queued reply and restore the default 200."""
        self.default = OK
        self._by_token.clear()
        self._any.clear()

"""What the dispatcher hands a provider, what a provider answers, and the provider protocol."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Protocol

import trio

from push.policy import WakeKind
from push.store import PushToken


@dataclass(frozen=True, slots=True)
class Notification:
    """One wake-up push to one device token. It never carries content, sender or count."""

    token: PushToken
    kind: WakeKind
    ttl: int  # seconds the push service may hold it for an unreachable device
    collapse_id: str
    alert_loc_key: str

    @property
    def urgent(self) -> bool:
        """Whether this is an alert (high priority) wake-up."""
        return self.kind is WakeKind.ALERT


class Outcome(enum.Enum):
    """How a provider's attempt ended, as far as the dispatcher cares."""

    SENT = "sent"
    RETRY = "retry"  # 429, 5xx, timeouts, lost connections: try again later
    INVALID_TOKEN = "invalid_token"  # the token will never work again: clear it
    CREDENTIALS = "credentials"  # our key, certificate or account is refused
    REJECTED = "rejected"  # the service refused this request for another reason


@dataclass(frozen=True, slots=True)
class PushResult:
    """A provider's answer to one attempt."""

    outcome: Outcome
    status: int | None = None
    reason: str = ""
    retry_after: float | None = None  # seconds, from a Retry-After header


SENT = PushResult(Outcome.SENT, 200)


class Provider(Protocol):
    """A push service client. `run` is a service; `send` may be called once it started."""

    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Set up connections or threads, report started, and serve until cancelled."""

    async def send(self, notification: Notification) -> PushResult:
        """Attempt one delivery; never raises for the service's answers."""


def token_hash(token: str) -> str:
    """A short, stable, non-reversible name for a token, safe to log."""
    return hashlib.sha256(token.encode()).hexdigest()[:10]


def parse_retry_after(value: str | bytes | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (dates are not used by APNs/FCM)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        seconds = float(text.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None

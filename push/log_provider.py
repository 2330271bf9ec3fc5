"""The `log` provider: the embedded default, which logs the wake-ups it would send."""

from __future__ import annotations

import logging

import trio

from push.notification import SENT, Notification, PushResult, token_hash

log = logging.getLogger(__name__)


class LogProvider:
    """Logs one line per wake-up (kind, provider, a hash of the token) and reports it sent.

    Used when no credentials are configured at all, and for any token whose provider has
    no credentials. Tokens and bodies are never logged.
    """

    name = "log"

    def __init__(self) -> None:
        self.sent = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to set up."""
        task_status.started()
        await trio.sleep_forever()

    async def send(self, notification: Notification) -> PushResult:
        """Log the wake-up."""
        self.sent += 1
        log.info(
            "would send a %s wake-up via %s to token~%s",
            notification.kind.value,
            notification.token.provider,
            token_hash(notification.token.token),
        )
        return SENT

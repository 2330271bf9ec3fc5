"""Building the configured push providers from settings, and checking their credentials."""

from __future__ import annotations

import logging

import trio

from push.errors import CredentialsError
from push.notification import Notification, Outcome, Provider, PushResult
from push.settings import PushSettings

log = logging.getLogger(__name__)


class BrokenProvider:
    """Stands in for a provider whose credentials could not be loaded at start-up.

    Every wake-up through it is refused as a credentials failure, which the dispatcher
    logs loudly and counts; messaging itself is unaffected.
    """

    def __init__(self, name: str, error: CredentialsError) -> None:
        self.name = name
        self.error = error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to set up."""
        task_status.started()
        await trio.sleep_forever()

    async def send(self, notification: Notification) -> PushResult:
        """Refuse: the credentials are unusable."""
        return PushResult(Outcome.CREDENTIALS, None, str(self.error))


def configured(settings: PushSettings) -> list[str]:
    """The providers that have credentials in `settings` (besides the `log` fallback)."""
    names = []
    if settings.apns.key_file is not None or settings.apns.cert_file is not None:
        names.append("apns")
    if settings.fcm.service_account_file is not None:
        names.append("fcm")
    if settings.webpush.vapid_private_key_file is not None:
        names.append("webpush")
    return names


def build_providers(settings: PushSettings, *, strict: bool = False) -> dict[str, Provider]:
    """One provider per configured platform, keyed by the token provider name.

    Args:
        settings: The `[push]` settings.
        strict: Raise on unusable credentials (for `gateway check-config`). Otherwise the
            error is logged and the platform gets a `BrokenProvider`, so the gateway still
            serves messages.

    Raises:
        CredentialsError: Only when `strict`; the message names the key.
    """
    providers: dict[str, Provider] = {}
    for name in configured(settings):
        try:
            providers[name] = _build(name, settings)
        except CredentialsError as exc:
            if strict:
                raise
            log.error("push credentials unusable, %s wake-ups will fail: %s", name, exc)
            providers[name] = BrokenProvider(name, exc)
    return providers


def check_credentials(settings: PushSettings) -> list[str]:
    """Load every configured credential without connecting; return the provider names.

    Raises:
        CredentialsError: A key, certificate or service-account file is unusable.
    """
    build_providers(settings, strict=True)
    return configured(settings)


def _build(name: str, settings: PushSettings) -> Provider:
    if name == "apns":
        from push.apns import ApnsProvider

        return ApnsProvider(settings.apns)
    if name == "webpush":
        from push.webpush import WebPushProvider

        return WebPushProvider(settings.webpush, request_timeout=settings.request_timeout)
    from push.fcm import FcmProvider

    return FcmProvider(settings.fcm, request_timeout=settings.request_timeout)

"""Push's settings: the `[push]` table and its `[push.apns]`, `[push.fcm]` and
`[push.webpush]` sub-tables.

The gateway's configuration loader reads and validates these tables from TOML and the
environment and builds these types; push only reads them. Defaults are the embedded
profile: no credentials, so every wake-up goes to the `log` provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ApnsSettings:
    """`[push.apns]`: Apple Push Notification service credentials and endpoint."""

    key_file: Path | None = None
    key_id: str | None = None
    team_id: str | None = None
    cert_file: Path | None = None
    topic: str | None = None
    sandbox: bool = False
    endpoint: str | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class FcmSettings:
    """`[push.fcm]`: Firebase Cloud Messaging credentials and endpoint."""

    service_account_file: Path | None = None
    project_id: str | None = None
    endpoint: str | None = None


# The push services of the browsers in use, and nothing else (checked against each
# browser's subscription endpoints): Chrome, Edge's Chromium builds on Android, Opera,
# Samsung Internet and Brave (FCM); Firefox (Mozilla autopush); Edge on Windows (WNS, one
# host per region such as wns2-par02p.notify.windows.com); Safari 16+ (Apple).
DEFAULT_WEBPUSH_HOSTS: tuple[str, ...] = (
    "fcm.googleapis.com",
    "updates.push.services.mozilla.com",
    "*.notify.windows.com",
    "web.push.apple.com",
)


@dataclass(frozen=True)
class WebPushSettings:
    """`[push.webpush]`: the VAPID key and the push services the gateway may post to.

    `allowed_hosts` entries are host names, or ``*.example.com`` for any host below
    example.com. A loopback host (``127.0.0.1``, ``::1``, ``localhost``) is allowed only
    when listed, on any port and over ``http://`` too; every other host must be reached
    over ``https://`` on port 443.
    """

    vapid_private_key_file: Path | None = None
    subject: str | None = None
    allowed_hosts: tuple[str, ...] = DEFAULT_WEBPUSH_HOSTS


@dataclass(frozen=True)
class PushSettings:
    """`[push]`: the wake-up policy, plus one sub-table per provider."""

    urgent_cooldown: float = 10.0
    background_cooldown: float = 20 * 60.0
    linger: float = 60.0
    alert_retry: float = 20.0
    alert_retries: int = 2
    background_per_hour: int = 3
    clear_cooldown: float = 60.0
    ack_timeout: float = 15.0
    collapse_id: str = "incoming-message"
    alert_loc_key: str = "NEW_MESSAGE"
    ttl: int = 24 * 3600
    workers: int = 64
    queue_size: int = 10000
    max_attempts: int = 5
    retry_base: float = 1.0
    max_retry_delay: float = 60.0
    request_timeout: float = 10.0
    apns: ApnsSettings = field(default_factory=ApnsSettings)
    fcm: FcmSettings = field(default_factory=FcmSettings)
    webpush: WebPushSettings = field(default_factory=WebPushSettings)

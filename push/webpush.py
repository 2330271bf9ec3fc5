"""Web Push wake-ups for browser devices: RFC 8030 requests over httpx, on Trio.

Each wake-up is one ``POST`` to the subscription's endpoint:

- the body is ``{"wake":1}`` (``{"wake":1,"clear":1}`` for a wake-up of kind ``clear``),
  encrypted for the subscription with aes128gcm (RFC 8291, `push.ece`): no content,
  sender or count;
- ``TTL`` is `[push] ttl`, ``Urgency`` is ``high`` for an alert and ``normal`` otherwise,
  ``Topic`` is the collapse id (so a newer wake-up replaces one still waiting);
- ``Authorization: vapid t=JWT, k=KEY`` (RFC 8292, `push.vapid`) for the endpoint's origin.

httpx runs on Trio directly (through its Trio backend), so unlike APNs and FCM this provider
needs no asyncio island. One connection pool serves every push service, over HTTP/2 where
the service negotiates it and HTTP/1.1 otherwise. Redirects are never followed, proxies
from the environment are ignored, answers are read only up to `MAX_RESPONSE_BYTES`, and
the endpoint is checked against `[push.webpush] allowed_hosts` before every request, as it
was at registration (`push.subscription`).

Answers: 2xx is sent; 404 and 410 mean the subscription is gone (the dispatcher clears it,
unless the device registered again since); 429 and 5xx are retried, honouring
``Retry-After`` (seconds or an HTTP date); 401 and 403 mean the push service refused our
VAPID key or token; anything else, and a redirect, is a rejection. Endpoints and keys are
never logged.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import time
from collections.abc import Callable

import httpx
import trio

from push.ece import encrypt
from push.errors import CredentialsError
from push.notification import SENT, Notification, Outcome, PushResult, parse_retry_after
from push.policy import WakeKind
from push.settings import WebPushSettings
from push.subscription import HostPolicy, SubscriptionError, WebPushSubscription, b64url
from push.vapid import VapidSigner, load_private_key

log = logging.getLogger(__name__)

WAKE = b'{"wake":1}'
WAKE_CLEAR = b'{"wake":1,"clear":1}'
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")  # RFC 8030 section 5.4
# Push services answer with an empty or a short body; more than this is not read (and the
# connection is then closed rather than reused).
MAX_RESPONSE_BYTES = 64 * 1024


def topic_for(collapse_id: str) -> str:
    """The ``Topic`` header for a collapse id: itself when RFC 8030 allows it (at most 32
    base64url characters), otherwise a stable 32-character digest of it."""
    if _TOPIC.match(collapse_id):
        return collapse_id
    return b64url(hashlib.sha256(collapse_id.encode()).digest())[:32]


def wake_payload(notification: Notification) -> bytes:
    """The plaintext of a wake-up: ``{"wake":1}``, plus ``"clear":1`` for a clear."""
    return WAKE_CLEAR if notification.kind is WakeKind.CLEAR else WAKE


def origin(url: httpx.URL) -> str:
    """The ASCII serialization of `url`'s origin, the VAPID `aud` (no default port)."""
    host = url.raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    default = {"https": 443, "http": 80}[url.scheme]
    port = "" if url.port in (None, default) else f":{url.port}"
    return f"{url.scheme}://{host}{port}"


def classify(status: int, retry_after: str | None, now: float) -> PushResult:
    """Map a push service's status to what the dispatcher does with it.

    Args:
        status: The HTTP status.
        retry_after: The ``Retry-After`` header, if any.
        now: Wall-clock seconds, to read a ``Retry-After`` given as a date.
    """
    if 200 <= status < 300:
        return SENT if status == 200 else PushResult(Outcome.SENT, status)
    if status in (404, 410):
        return PushResult(Outcome.INVALID_TOKEN, status, "gone" if status == 410 else "not found")
    if status == 429 or status >= 500:
        reason = "too many requests" if status == 429 else "unavailable"
        return PushResult(Outcome.RETRY, status, reason, _retry_after(retry_after, now))
    if status in (401, 403):
        return PushResult(Outcome.CREDENTIALS, status, "VAPID key or token refused")
    if 300 <= status < 400:
        return PushResult(Outcome.REJECTED, status, "redirect (not followed)")
    if status == 413:
        return PushResult(Outcome.REJECTED, status, "payload too large")
    return PushResult(Outcome.REJECTED, status, "refused")


def _retry_after(value: str | None, now: float) -> float | None:
    seconds = parse_retry_after(value)
    if seconds is not None or value is None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class WebPushProvider:
    """Sends Web Push wake-ups with the gateway's VAPID key.

    The key is loaded when the provider is built, so that `gateway check-config` can name
    a bad file.

    Args:
        settings: `[push.webpush]`.
        request_timeout: Seconds per request (the dispatcher also bounds each attempt).
        transport: An httpx transport to use instead of the network (tests).
        wall_clock: Seconds since the epoch, for the VAPID `exp` claim.

    Raises:
        CredentialsError: The key file is unset or unusable, the subject is missing, or an
            `allowed_hosts` entry is malformed.
    """

    name = "webpush"

    def __init__(
        self,
        settings: WebPushSettings,
        *,
        request_timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.vapid_private_key_file is None:
            raise CredentialsError("[push.webpush] vapid_private_key_file is not set")
        if not settings.subject:
            raise CredentialsError(
                "[push.webpush] subject is required with a VAPID key (mailto: or https: URL)"
            )
        self.signer = VapidSigner(
            load_private_key(settings.vapid_private_key_file), settings.subject
        )
        try:
            self.hosts = HostPolicy(settings.allowed_hosts)
        except SubscriptionError as exc:
            raise CredentialsError(f"[push.webpush] allowed_hosts: {exc}") from None
        self.request_timeout = request_timeout
        self._transport = transport
        self._wall_clock = wall_clock
        self._client: httpx.AsyncClient | None = None
        logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO lines name the URL

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the HTTP client (a connection pool on Trio) and keep it until cancelled."""
        async with httpx.AsyncClient(
            transport=self._transport,
            http2=True,  # when the service offers it (ALPN); plain http:// stays HTTP/1.1
            follow_redirects=False,
            trust_env=False,
            timeout=self.request_timeout,
        ) as client:
            self._client = client
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._client = None

    async def send(self, notification: Notification) -> PushResult:
        """Encrypt, sign and post one wake-up; classify the answer."""
        client = self._client
        if client is None:
            return PushResult(Outcome.RETRY, None, "not started")
        try:
            subscription = WebPushSubscription.from_token(notification.token.token)
            url = self.hosts.check(subscription.endpoint)
        except SubscriptionError as exc:
            # Stored before allowed_hosts changed, or damaged: never sent anywhere.
            return PushResult(Outcome.REJECTED, None, f"subscription not usable: {exc}")
        body = encrypt(wake_payload(notification), subscription.p256dh, subscription.auth)
        now = self._wall_clock()
        headers = {
            "TTL": str(notification.ttl),
            "Urgency": "high" if notification.urgent else "normal",
            "Topic": topic_for(notification.collapse_id),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self.signer.authorization(origin(url), now),
        }
        try:
            async with client.stream("POST", url, content=body, headers=headers) as response:
                await _skim(response)
        except httpx.TimeoutException:
            return PushResult(Outcome.RETRY, None, "timeout")
        except httpx.HTTPError as exc:
            return PushResult(Outcome.RETRY, None, f"connection: {type(exc).__name__}")
        return classify(response.status_code, response.headers.get("retry-after"), now)


async def _skim(response: httpx.Response) -> None:
    """Read (and drop) the body, so the connection can be reused, up to a bound."""
    seen = 0
    async for chunk in response.aiter_bytes():
        seen += len(chunk)
        if seen > MAX_RESPONSE_BYTES:
            break

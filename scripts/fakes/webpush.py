"""A loopback Web Push service (RFC 8030) that checks what a real one checks, and more.

`subscribe` plays the browser: it makes a subscription (a P-256 key pair and an `auth`
secret, as `PushManager.subscribe` does) whose endpoint is on this server, and keeps the
private half. Every ``POST`` to an endpoint is then:

- authenticated: ``Authorization: vapid t=JWT, k=KEY`` must carry an ES256 JWT signed by
  KEY, with `aud` = this server's origin, an `exp` in the future and at most 24 hours
  away, and a `sub` (``mailto:`` or ``https:``); a subscription made with an
  ``application_server_key`` refuses any other KEY (403), as browsers' services do;
- checked: ``TTL`` present, ``Content-Encoding: aes128gcm``, ``Urgency`` and ``Topic``
  well-formed;
- decrypted with the subscription's private key and `auth` secret (RFC 8291);
- recorded (`WebPushRecord`, with the decrypted payload) and answered as scripted: 201 by
  default, or 404, 410, 429, 503 (with ``Retry-After``), a delay or a hang.

A request that fails a check is recorded with the reason and answered 400, 401 or 403.
Control API, as for the other fakes: ``GET /_fake/requests``, ``POST /_fake/script``
(``{"replies": [...], "token": SUBSCRIPTION_ID}``), ``POST /_fake/reset``; and
``POST /_fake/subscribe`` (optional ``{"application_server_key": KEY}``), which answers
``{"id": ID, "subscription": {"endpoint", "keys"}}`` for a device to register by hand.
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from push.ece import DecryptionError, decrypt
from push.subscription import b64url, b64url_decode
from scripts.fakes.http import HttpRequest, HttpResponse
from scripts.fakes.script import Script
from scripts.fakes.service import FakeService

MAX_VAPID_LIFETIME = 24 * 3600
_PATH = re.compile(r"^/push/([A-Za-z0-9_-]+)$")
_VAPID = re.compile(r"^vapid\s+t=([^,\s]+)\s*,\s*k=([A-Za-z0-9_-]+)\s*$")
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_URGENCY = ("very-low", "low", "normal", "high")


@dataclass(frozen=True)
class FakeSubscription:
    """A subscription as a browser holds it: the public part, and the private key."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: str | None = None

    @property
    def p256dh(self) -> str:
        """The public key, base64url, as `PushSubscription.toJSON()` gives it."""
        raw = self.private_key.public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint
        )
        return b64url(raw)

    def to_json(self) -> dict[str, Any]:
        """``{"endpoint", "keys": {"p256dh", "auth"}}``: what the device registers."""
        return {
            "endpoint": self.endpoint,
            "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)},
        }


@dataclass(frozen=True, slots=True)
class WebPushRecord:
    """One push request the fake received, and what it made of it."""

    subscription: str  # the subscription id ("" if the path named none)
    headers: dict[str, str]
    payload: Any  # the decrypted JSON, or None when a check failed
    claims: dict[str, Any]  # the verified VAPID claims ({} when they were not)
    error: str  # why the request was refused ("" when it passed every check)
    status: int
    arrived: float
    http2: bool = False


@dataclass
class FakeWebPush(FakeService[WebPushRecord]):
    """A scriptable Web Push service on loopback: ``port = await nursery.start(fake.serve)``,
    then `subscribe`. Plain HTTP/1.1, or HTTPS (HTTP/2 or HTTP/1.1 by ALPN) with
    `ssl_context`."""

    ssl_context: ssl.SSLContext | None = None
    script: Script = field(default_factory=Script)
    records: list[WebPushRecord] = field(default_factory=list)
    subscriptions: dict[str, FakeSubscription] = field(default_factory=dict)
    port: int = 0
    _waiters: list[tuple[int, trio.Event]] = field(default_factory=list)

    @property
    def origin(self) -> str:
        """The origin a VAPID token for this server must name as `aud`."""
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def subscribe(self, application_server_key: str | None = None) -> FakeSubscription:
        """Make a new subscription on this server (call once serving)."""
        assert self.port, "serve first"
        sid = secrets.token_urlsafe(12)
        subscription = FakeSubscription(
            sid,
            f"{self.origin}/push/{sid}",
            ec.generate_private_key(ec.SECP256R1()),
            secrets.token_bytes(16),
            application_server_key,
        )
        self.subscriptions[sid] = subscription
        return subscription

    def server_context(self) -> ssl.SSLContext | None:
        """TLS when made with an `ssl_context`."""
        return self.ssl_context

    # -- request handling -------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request (the `serve_http` handler)."""
        if request.path.startswith("/_fake/"):
            return self._control(request)
        match = _PATH.match(request.path)
        if match is None or request.method != "POST":
            return HttpResponse(404, [], b"no such endpoint")
        sid = match.group(1)
        subscription = self.subscriptions.get(sid)
        if subscription is None:
            return self._refuse(request, sid, 404, "unknown subscription")
        claims, error, status = self._verify_vapid(request, subscription)
        if error:
            return self._refuse(request, sid, status, error, claims)
        error = _check_headers(request.headers)
        if error:
            return self._refuse(request, sid, 400, error, claims)
        try:
            payload = json.loads(decrypt(request.body, subscription.private_key, subscription.auth))
        except DecryptionError as exc:
            return self._refuse(request, sid, 400, f"decryption: {exc}", claims)
        except ValueError:
            return self._refuse(request, sid, 400, "the plaintext is not JSON", claims)
        reply = self.script.next(sid)
        status = 201 if reply.status == 200 else reply.status
        self._record(
            WebPushRecord(
                sid,
                dict(request.headers),
                payload,
                claims,
                "",
                status,
                request.arrived,
                request.http2,
            )
        )
        headers = [("location", f"{self.origin}/message/{secrets.token_urlsafe(8)}")]
        if reply.retry_after is not None:
            headers.append(("retry-after", str(reply.retry_after)))
        return HttpResponse(status, headers, b"", delay=reply.delay, gate=reply.gate)

    def _verify_vapid(
        self, request: HttpRequest, subscription: FakeSubscription
    ) -> tuple[dict[str, Any], str, int]:
        """(claims, error, status): RFC 8292's checks."""
        match = _VAPID.match(request.headers.get("authorization", ""))
        if match is None:
            return {}, "no 'Authorization: vapid t=..., k=...' header", 401
        token, key = match.groups()
        if subscription.application_server_key not in (None, key):
            return {}, "the VAPID key is not the one the subscription was made with", 403
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b64url_decode(key)
            )
            claims: dict[str, Any] = jwt.decode(
                token,
                public,
                algorithms=["ES256"],
                audience=self.origin,
                options={"require": ["aud", "exp", "sub"]},
            )
        except (ValueError, jwt.PyJWTError) as exc:
            return {}, f"VAPID token refused: {exc}", 401
        if claims["exp"] > time.time() + MAX_VAPID_LIFETIME:
            return claims, "VAPID token expires more than 24 hours from now", 401
        if not str(claims["sub"]).startswith(("mailto:", "https:")):
            return claims, "VAPID sub is not a mailto: or https: URL", 401
        if jwt.get_unverified_header(token).get("typ", "JWT") != "JWT":
            return claims, "VAPID token header typ is not JWT", 401
        return claims, "", 0

    def _refuse(
        self,
        request: HttpRequest,
        sid: str,
        status: int,
        error: str,
        claims: dict[str, Any] | None = None,
    ) -> HttpResponse:
        self._record(
            WebPushRecord(
                sid,
                dict(request.headers),
                None,
                claims or {},
                error,
                status,
                request.arrived,
                request.http2,
            )
        )
        return HttpResponse(status, [("content-type", "text/plain")], error.encode())

    def _other_control(self, request: HttpRequest) -> HttpResponse:
        """``POST /_fake/subscribe``: a new subscription, for a device to register by hand."""
        if request.path == "/_fake/subscribe" and request.method == "POST":
            try:
                data = json.loads(request.body or b"{}")
                key = data.get("application_server_key")
            except (ValueError, AttributeError):
                return HttpResponse(400, [], b"the body must be a JSON object")
            subscription = self.subscribe(key if isinstance(key, str) else None)
            made = json.dumps({"id": subscription.id, "subscription": subscription.to_json()})
            return HttpResponse(200, [("content-type", "application/json")], made.encode())
        return super()._other_control(request)


def _check_headers(headers: dict[str, str]) -> str:
    """Why the request's RFC 8030 headers are wrong, or ""."""
    ttl = headers.get("ttl")
    if ttl is None or not ttl.isdigit():
        return "TTL header missing or not a number"
    if headers.get("content-encoding") != "aes128gcm":
        return "Content-Encoding is not aes128gcm"
    if headers.get("urgency", "normal") not in _URGENCY:
        return "Urgency is not very-low, low, normal or high"
    topic = headers.get("topic")
    if topic is not None and not _TOPIC.match(topic):
        return "Topic is not 1-32 base64url characters"
    return ""

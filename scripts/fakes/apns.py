"""A loopback APNs: HTTP/2 over TLS, provider-token or certificate auth, scripted answers.

It checks what Apple checks that matters to us (method and path, device token format,
`apns-topic`, `apns-push-type`, `apns-priority` against the push type, `apns-expiration`,
`apns-collapse-id` length, a JSON payload with `aps` of at most 4 KiB) and answers with
Apple's status codes and reasons. Provider tokens are verified with the public half of the
configured .p8 key, `kid` and `iss` included, and each distinct token is verified once (as
APNs caches them); a token older than an hour is answered `ExpiredProviderToken`.

iOS throttles background pushes: beyond a budget of a few per device per hour it drops
them without telling anyone. `background_per_hour` (0: off, the default) does the same:
a background push to a token that already got that many in the last hour is answered
200 and recorded with ``throttled`` set, and whoever routes pushes to devices must drop it.

Control API (HTTP/1.1 or HTTP/2 on the same port, for use from a shell):
``GET /_fake/requests`` (or the compact ``/_fake/arrivals``), ``POST /_fake/script`` with
``{"token": TOKEN or null, "replies": [{"status": 410, "reason": "Unregistered"}]}``, and
``POST /_fake/reset``.
"""

from __future__ import annotations

import json
import math
import ssl
import string
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jwt
import trio

from scripts.fakes.credentials import CertificateAuthority, make_p8
from scripts.fakes.http import HttpRequest, HttpResponse
from scripts.fakes.script import Reply, Script
from scripts.fakes.service import FakeService

MAX_PAYLOAD = 4096
TOKEN_MAX_AGE = 3600
CLOCK_SKEW = 60  # seconds an `iat` may lie in the future
_HEX = frozenset(string.hexdigits)


@dataclass(frozen=True, slots=True)
class ApnsRecord:
    """One request the fake received (whatever it answered)."""

    token: str
    headers: dict[str, str]
    payload: Any
    arrived: float  # time.monotonic()
    status: int
    reason: str
    provider_token: str | None
    throttled: bool = False  # answered 200, and dropped as iOS drops surplus background pushes


class FakeApns(FakeService[ApnsRecord]):
    """A scriptable APNs on loopback. Build it with `create`, then
    ``port = await nursery.start(fake.serve)``.

    Args:
        ca: The CA whose certificate clients trust (`ca_file`).
        public_key: The PEM public key that verifies provider tokens, or None to accept
            only client-certificate auth.
        key_id: The expected `kid` of provider tokens.
        team_id: The expected `iss` of provider tokens.
        topics: The topics this "app" may push to (None: any).
        tls: False to serve HTTP/2 in cleartext (prior knowledge) instead.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        public_key: bytes | None,
        key_id: str,
        team_id: str,
        topics: set[str] | None = None,
        tls: bool = True,
    ) -> None:
        self.ca = ca
        self.public_key = public_key
        self.key_id = key_id
        self.team_id = team_id
        self.topics = topics
        self.tls = tls
        self.script = Script()
        self.records: list[ApnsRecord] = []
        self.provider_tokens: list[str] = []  # distinct tokens, in order of first use
        self._verified: dict[str, tuple[bool, int]] = {}  # token -> (valid, iat)
        self._waiters: list[tuple[int, trio.Event]] = []
        self.port = 0
        self.files: dict[str, Path] = {}
        self.expire_before = 0.0  # provider tokens issued before this are "expired"
        self.background_per_hour = 0  # iOS's background budget per token (0: no throttle)
        self._background: dict[str, deque[float]] = {}  # accepted, per token, last hour

    @classmethod
    def create(
        cls, directory: Path, *, topics: set[str] | None = None, tls: bool = True
    ) -> FakeApns:
        """A fake with fresh credentials written to `directory`: ``ca.pem``,
        ``AuthKey_FAKEKEY123.p8`` (token auth) and ``apns-cert.pem`` (certificate auth)."""
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create("fake APNs CA")
        key_file = directory / "AuthKey_FAKEKEY123.p8"
        public = make_p8(key_file)
        fake = cls(
            ca, public_key=public, key_id="FAKEKEY123", team_id="FAKETEAM01", topics=topics, tls=tls
        )
        (directory / "ca.pem").write_bytes(ca.cert_pem)
        cert_pem, cert_key = ca.issue(
            "Apple Push Services: fake", uid="com.example.app", client=True
        )
        (directory / "apns-cert.pem").write_bytes(cert_pem + cert_key)
        fake.files = {
            "ca_file": directory / "ca.pem",
            "key_file": key_file,
            "cert_file": directory / "apns-cert.pem",
        }
        return fake

    @property
    def endpoint(self) -> str:
        """The base URL for `[push.apns] endpoint`."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def settings(self, *, auth: str = "token", topic: str = "com.example.app") -> dict[str, Any]:
        """`[push.apns]` keys pointing the gateway at this fake (``auth``: token or cert)."""
        keys: dict[str, Any] = {"endpoint": self.endpoint, "topic": topic}
        if self.tls:
            keys["ca_file"] = self.files["ca_file"]
        if auth == "token":
            keys.update(key_file=self.files["key_file"], key_id=self.key_id, team_id=self.team_id)
        else:
            keys["cert_file"] = self.files["cert_file"]
        return keys

    def server_context(self) -> ssl.SSLContext | None:
        """TLS with client-certificate checks, unless made with ``tls=False``."""
        return self.ca.server_context(client_certs=True) if self.tls else None

    # -- request handling -------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request (the `serve_http` handler)."""
        if request.path.startswith("/_fake/"):
            return self._control(request)
        token = request.path.removeprefix("/3/device/")
        status, reason, reply = self._check(request, token)
        if status == 200 and reply is not None:
            status, reason = reply.status, reply.reason
        payload: Any
        try:
            payload = json.loads(request.body)
        except ValueError:
            payload = None
        auth = request.headers.get("authorization", "")
        throttled = status == 200 and self._throttled(request, token)
        self._record(
            ApnsRecord(
                token,
                dict(request.headers),
                payload,
                request.arrived,
                status,
                reason,
                auth.removeprefix("bearer ") or None,
                throttled,
            )
        )
        apns_id = request.headers.get("apns-id") or str(uuid.uuid4()).upper()
        headers = [("apns-id", apns_id)]
        delay = reply.delay if reply is not None else 0.0
        gate = reply.gate if reply is not None else None
        if status == 200:
            return HttpResponse(200, headers, delay=delay, gate=gate)
        body: dict[str, Any] = {"reason": reason}
        if status == 410:
            body["timestamp"] = (
                reply.timestamp if reply and reply.timestamp else int(time.time() * 1000)
            )
        if reply is not None and reply.retry_after is not None:
            headers.append(("retry-after", str(reply.retry_after)))
        headers.append(("content-type", "application/json"))
        return HttpResponse(status, headers, json.dumps(body).encode(), delay=delay, gate=gate)

    def _throttled(self, request: HttpRequest, token: str) -> bool:
        """Whether iOS would drop this accepted push: a background push beyond the
        `background_per_hour` the token was handed in its last hour."""
        budget = self.background_per_hour
        if budget <= 0 or request.headers.get("apns-push-type") != "background":
            return False
        sent = self._background.setdefault(token, deque())
        while sent and sent[0] <= request.arrived - 3600:
            sent.popleft()
        if len(sent) >= budget:
            return True
        sent.append(request.arrived)
        return False

    def _check(self, request: HttpRequest, token: str) -> tuple[int, str, Reply | None]:
        """Apple's checks, in Apple's order of precedence; then the script."""
        h = request.headers
        if request.method != "POST":
            return 405, "MethodNotAllowed", None
        if not request.path.startswith("/3/device/"):
            return 404, "BadPath", None
        auth_error = self._check_auth(request)
        if auth_error is not None:
            return 403, auth_error, None
        if not token or len(token) > 200 or not set(token) <= _HEX:
            return 400, "BadDeviceToken", None
        topic = h.get("apns-topic")
        if not topic:
            return 400, "MissingTopic", None
        if self.topics is not None and topic not in self.topics:
            return 400, "TopicDisallowed", None
        push_type = h.get("apns-push-type")
        if push_type not in ("alert", "background"):
            return 400, "InvalidPushType", None
        priority = h.get("apns-priority", "10")
        if priority not in ("5", "10") or (push_type == "background" and priority != "5"):
            return 400, "BadPriority", None
        expiration = h.get("apns-expiration", "0")
        if not expiration.isdigit():
            return 400, "BadExpirationDate", None
        if len(h.get("apns-collapse-id", "").encode()) > 64:
            return 400, "BadCollapseId", None
        if len(request.body) > MAX_PAYLOAD:
            return 413, "PayloadTooLarge", None
        try:
            payload = json.loads(request.body)
        except ValueError:
            return 400, "PayloadEmpty", None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return 400, "PayloadEmpty", None
        return 200, "", self.script.next(token)

    def _check_auth(self, request: HttpRequest) -> str | None:
        auth = request.headers.get("authorization")
        if auth is None:
            if request.peer_cert is not None:
                return None  # certificate auth, verified by the TLS layer against our CA
            return "MissingProviderToken"
        if self.public_key is None or not auth.startswith("bearer "):
            return "InvalidProviderToken"
        token = auth.removeprefix("bearer ")
        known = self._verified.get(token)
        if known is None:
            known = self._verify(token)
            self._verified[token] = known
            self.provider_tokens.append(token)
        valid, issued_at = known
        if not valid:
            return "InvalidProviderToken"
        if time.time() - issued_at > TOKEN_MAX_AGE or issued_at < self.expire_before:
            return "ExpiredProviderToken"
        return None

    def _verify(self, token: str) -> tuple[bool, int]:
        assert self.public_key is not None
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["ES256"],
                leeway=CLOCK_SKEW,
                options={"verify_exp": False, "require": ["iat", "iss"]},
            )
        except jwt.PyJWTError:
            return False, 0
        valid = header.get("kid") == self.key_id and claims.get("iss") == self.team_id
        return valid, int(claims["iat"])

    def _control(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/_fake/arrivals":  # compact, for the benchmark
            return _json(200, [[r.token, r.arrived, r.status] for r in self.records])
        if request.path == "/_fake/requests":
            items = [asdict(r) | {"provider_token": None} for r in self.records]
            return _json(200, items)
        if request.path == "/_fake/reset" and request.method == "POST":
            self.records.clear()
            self.script.clear()
            return _json(200, {"ok": True})
        if request.path == "/_fake/script" and request.method == "POST":
            data = json.loads(request.body or b"{}")
            self.script.add(
                *(Reply.from_json(r) for r in data.get("replies", [])), token=data.get("token")
            )
            return _json(200, {"ok": True})
        return _json(404, {"error": "unknown control path"})


def _json(status: int, data: Any) -> HttpResponse:
    body = json.dumps(data, default=lambda o: None if o is math.inf else str(o)).encode()
    return HttpResponse(status, [("content-type", "application/json")], body)

"""A loopback FCM: the OAuth token endpoint and the HTTP v1 `messages:send` endpoint.

`create` writes a service-account file whose `token_uri` points at this server; google-auth
posts a JWT assertion there (signed with the file's private key), which the fake verifies
with the public key before issuing an access token. `messages:send` requires one of the
issued tokens and the right project, checks the message, records it and answers as
scripted, with Google's error format (`google.rpc.Status` plus an `FcmError` detail).

Served over plain HTTP (HTTP/1.1, as httpx speaks to an ``http://`` endpoint) unless a TLS
context is given. Control API as for the fake APNs: ``GET /_fake/requests``,
``POST /_fake/script``, ``POST /_fake/reset``.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import trio

from scripts.fakes.credentials import make_service_account
from scripts.fakes.http import HttpRequest, HttpResponse
from scripts.fakes.script import Reply, Script
from scripts.fakes.service import FakeService

# google-auth signs service-account assertions for Google's token endpoint whatever the
# file's token_uri says; the real endpoint checks exactly this audience.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
_SEND = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FCM_CODE_STATUS = {
    "UNREGISTERED": 404,
    "INVALID_ARGUMENT": 400,
    "QUOTA_EXCEEDED": 429,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
    "SENDER_ID_MISMATCH": 403,
    "THIRD_PARTY_AUTH_ERROR": 401,
}


@dataclass(frozen=True, slots=True)
class FcmRecord:
    """One `messages:send` request the fake received."""

    project: str
    message: Any
    headers: dict[str, str]
    arrived: float
    status: int
    reason: str


class FakeFcm(FakeService[FcmRecord]):
    """A scriptable FCM on loopback; build it with `create`, then
    ``port = await nursery.start(fake.serve)`` and `write_service_account`."""

    def __init__(
        self, *, project_id: str = "fake-project", ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.project_id = project_id
        self.ssl_context = ssl_context
        self.script = Script()
        self.records: list[FcmRecord] = []
        self.token_requests = 0
        self.public_key: bytes | None = None
        self.service_account: Path | None = None
        self._access_tokens: set[str] = set()
        self._waiters: list[tuple[int, trio.Event]] = []
        self._ids = itertools.count(1)
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL for `[push.fcm] endpoint`."""
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        """The OAuth token endpoint that the service-account file names."""
        return f"{self.url}/token"

    def write_service_account(self, path: Path) -> Path:
        """Write a service-account file for this fake (call once serving); return its path."""
        self.public_key = make_service_account(path, self.token_uri, self.project_id)
        self.service_account = path
        return path

    def settings(self) -> dict[str, Any]:
        """`[push.fcm]` keys pointing the gateway at this fake."""
        assert self.service_account is not None, "write_service_account first"
        return {"service_account_file": self.service_account, "endpoint": self.url}

    def server_context(self) -> ssl.SSLContext | None:
        """TLS when made with an `ssl_context`."""
        return self.ssl_context

    # -- request handling -------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request (the `serve_http` handler)."""
        if request.path.startswith("/_fake/"):
            return self._control(request)
        if request.path == "/token" and request.method == "POST":
            return self._token(request)
        match = _SEND.match(request.path)
        if match is None or request.method != "POST":
            return _error(404, "NOT_FOUND", "no such endpoint")
        auth = request.headers.get("authorization", "")
        if auth.removeprefix("Bearer ") not in self._access_tokens:
            return _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        project = match.group(1)
        if project != self.project_id:
            return _error(403, "PERMISSION_DENIED", "wrong project", fcm="SENDER_ID_MISMATCH")
        try:
            message = json.loads(request.body)["message"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        token = message.get("token") if isinstance(message, dict) else None
        reply = Reply(400, "INVALID_ARGUMENT") if not token else self.script.next(token)
        status = (
            reply.status
            if reply.status != 200 or not reply.reason
            else (_FCM_CODE_STATUS.get(reply.reason, 400))
        )
        record = FcmRecord(
            project, message, dict(request.headers), request.arrived, status, reply.reason
        )
        self._record(record)
        if status == 200:
            body = {"name": f"projects/{project}/messages/{next(self._ids)}"}
            return HttpResponse(
                200,
                [("content-type", "application/json")],
                json.dumps(body).encode(),
                delay=reply.delay,
                gate=reply.gate,
            )
        response = _fcm_error(status, reply.reason or _STATUS.get(status, "UNKNOWN"))
        response.delay = reply.delay
        response.gate = reply.gate
        if reply.retry_after is not None:
            response.headers.append(("retry-after", str(reply.retry_after)))
        return response

    def _token(self, request: HttpRequest) -> HttpResponse:
        """The OAuth 2.0 JWT-bearer grant, as Google's token endpoint serves it."""
        self.token_requests += 1
        form = parse_qs(request.body.decode())
        assertion = form.get("assertion", [""])[0]
        grant = form.get("grant_type", [""])[0]
        if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer" or self.public_key is None:
            return _oauth_error("unsupported_grant_type")
        try:
            jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=[self.token_uri, GOOGLE_TOKEN_AUDIENCE],
            )
        except jwt.PyJWTError as exc:
            return _oauth_error("invalid_grant", str(exc))
        access = secrets.token_urlsafe(24)
        self._access_tokens.add(access)
        body = {"access_token": access, "expires_in": 3600, "token_type": "Bearer"}
        return HttpResponse(200, [("content-type", "application/json")], json.dumps(body).encode())

    def _other_control(self, request: HttpRequest) -> HttpResponse:
        """No other control path: 404, in Google's error format."""
        return _error(404, "NOT_FOUND", "unknown control path")


def _error(status: int, code: str, message: str, *, fcm: str | None = None) -> HttpResponse:
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if fcm is not None:
        error["details"] = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm}
        ]
    body = json.dumps({"error": error}).encode()
    return HttpResponse(status, [("content-type", "application/json")], body)


def _fcm_error(status: int, fcm_code: str) -> HttpResponse:
    """An error as FCM sends it for a scripted FCM error code."""
    if fcm_code == "UNREGISTERED":
        return _error(404, "NOT_FOUND", "Requested entity was not found.", fcm="UNREGISTERED")
    if fcm_code == "INVALID_ARGUMENT":
        response = _error(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            fcm="INVALID_ARGUMENT",
        )
        data = json.loads(response.body)
        data["error"]["details"].append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": "message.token", "description": "Invalid registration token"}
                ],
            }
        )
        response.body = json.dumps(data).encode()
        return response
    return _error(status, _STATUS.get(status, "UNKNOWN"), fcm_code.lower(), fcm=fcm_code)


def _oauth_error(error: str, description: str = "") -> HttpResponse:
    body = json.dumps({"error": error, "error_description": description}).encode()
    return HttpResponse(400, [("content-type", "application/json")], body)

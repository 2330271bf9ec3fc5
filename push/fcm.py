"""FCM wake-ups through firebase-admin (HTTP v1), hosted on an asyncio island.

firebase-admin's `messaging.send_each_async` sends over httpx (HTTP/2 on https) with an
OAuth access token from the service account; google-auth takes the token URL from the
file's `token_uri`. Two things are adjusted on the app's messaging service: the send URL
follows `[push.fcm] endpoint`, and the library's own retries are turned off, because the
dispatcher retries with backoff and honours `Retry-After` itself.

google-auth refreshes the access token with blocking `requests` calls inside the asyncio
loop, about once an hour: that is why FCM has its own island thread rather than sharing
one with APNs, and never runs on the Trio thread.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import warnings
from datetime import timedelta
from typing import Any

import firebase_admin
import trio
from firebase_admin import credentials, exceptions, messaging
from firebase_admin._http_client import HttpxAsyncClient
from firebase_admin._retry import HttpxRetry

from push.errors import CredentialsError
from push.island import AsyncioIsland
from push.notification import SENT, Notification, Outcome, PushResult, parse_retry_after
from push.policy import WakeKind
from push.settings import FcmSettings

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://fcm.googleapis.com"
_apps = itertools.count()
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


WAKE = {"wake": "1"}
WAKE_CLEAR = {"wake": "1", "clear": "1"}  # the app removes the notifications of what was read


def fcm_message(notification: Notification) -> messaging.Message:
    """The data-only HTTP v1 message for a wake-up: no content, sender or count.

    It is addressed by registration `token`, as the device registered it; firebase-admin 7
    deprecates that field in favour of installation ids, which the protocol does not carry.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _message(notification)


def _message(notification: Notification) -> messaging.Message:
    return messaging.Message(
        data=dict(WAKE_CLEAR if notification.kind is WakeKind.CLEAR else WAKE),
        token=notification.token.token,
        android=messaging.AndroidConfig(
            priority="high" if notification.urgent else "normal",
            ttl=timedelta(seconds=notification.ttl),
            collapse_key=notification.collapse_id,
        ),
    )


class FcmProvider:
    """Sends FCM wake-ups with a service-account file.

    The file is parsed (and its private key loaded) when the provider is built, so that
    `gateway check-config` can name a bad file.

    Raises:
        CredentialsError: The service-account file is unreadable or not a service
            account, or no project id is known.
    """

    name = "fcm"

    def __init__(self, settings: FcmSettings, *, request_timeout: float = 10.0) -> None:
        if settings.service_account_file is None:
            raise CredentialsError("[push.fcm] service_account_file is not set")
        path = settings.service_account_file
        try:
            self.credential = credentials.Certificate(str(path))
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise CredentialsError(
                f"[push.fcm] service_account_file: {path} is not a usable service-account "
                f"file: {exc}"
            ) from None
        project_id = settings.project_id or self.credential.project_id
        if not project_id:
            raise CredentialsError("[push.fcm] project_id is not set and the file names none")
        self.project_id: str = project_id
        base = (settings.endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.url = f"{base}/v1/projects/{project_id}/messages:send"
        self.request_timeout = request_timeout
        self.island = AsyncioIsland("fcm", on_close=self._close)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request
        self._app: firebase_admin.App | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the asyncio loop and the firebase app until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.island.run)
            await self.island.call(self._open)
            task_status.started()

    async def _open(self) -> None:
        app = firebase_admin.initialize_app(
            self.credential,
            {"projectId": self.project_id, "httpTimeout": self.request_timeout},
            name=f"gateway-fcm-{next(_apps)}",
        )
        service = messaging._get_messaging_service(app)
        service._fcm_url = self.url
        service._async_client = HttpxAsyncClient(
            credential=service._credential,
            timeout=self.request_timeout,
            retry_config=HttpxRetry(max_retries=0),
        )
        self._app = app

    async def _close(self) -> None:
        app, self._app = self._app, None
        if app is not None:
            service = messaging._get_messaging_service(app)
            await service._async_client.aclose()
            # delete_app closes the (already closed) client with asyncio.run, which cannot
            # run inside this loop: do it from a plain thread.
            await asyncio.get_running_loop().run_in_executor(None, firebase_admin.delete_app, app)

    async def send(self, notification: Notification) -> PushResult:
        """Attempt one delivery on the island and classify FCM's answer."""
        message = fcm_message(notification)
        return await self.island.call(lambda: self._send(message))

    async def _send(self, message: messaging.Message) -> PushResult:
        try:
            batch = await messaging.send_each_async([message], app=self._app)
        except exceptions.FirebaseError as exc:
            return classify(exc)
        response = batch.responses[0]
        if response.success:
            return SENT
        assert response.exception is not None
        return classify(response.exception)


def classify(exc: exceptions.FirebaseError) -> PushResult:
    """Map a firebase-admin error to what the dispatcher does with it."""
    response: Any = exc.http_response
    status: int | None = getattr(response, "status_code", None)
    retry_after = parse_retry_after(response.headers.get("retry-after")) if response else None
    code = str(exc.code)
    if isinstance(exc, messaging.UnregisteredError):
        return PushResult(Outcome.INVALID_TOKEN, status, "UNREGISTERED")
    if isinstance(exc, exceptions.InvalidArgumentError) and _about_token(exc, response):
        return PushResult(Outcome.INVALID_TOKEN, status, "INVALID_ARGUMENT")
    if isinstance(exc, messaging.QuotaExceededError) or status == 429:
        return PushResult(Outcome.RETRY, status, "QUOTA_EXCEEDED", retry_after)
    if isinstance(exc, exceptions.UnknownError) and exc.cause is not None:
        return _classify_cause(exc)
    retryable = (
        exceptions.UnavailableError,
        exceptions.InternalError,
        exceptions.DeadlineExceededError,
    )
    if isinstance(exc, retryable) or (status is not None and status >= 500):
        return PushResult(Outcome.RETRY, status, code, retry_after)
    credential_errors = (
        messaging.ThirdPartyAuthError,
        exceptions.UnauthenticatedError,
        exceptions.PermissionDeniedError,
    )
    if isinstance(exc, credential_errors):
        return PushResult(Outcome.CREDENTIALS, status, code)
    return PushResult(Outcome.REJECTED, status, code)


def _classify_cause(exc: exceptions.FirebaseError) -> PushResult:
    """An error outside the HTTP exchange: usually the OAuth token refresh."""
    from google.auth import exceptions as auth_errors

    cause = exc.cause
    if isinstance(cause, auth_errors.TransportError) or getattr(cause, "retryable", False):
        return PushResult(Outcome.RETRY, None, f"oauth: {type(cause).__name__}")
    if isinstance(cause, auth_errors.RefreshError):
        return PushResult(Outcome.CREDENTIALS, None, f"oauth token refused: {cause}")
    return PushResult(Outcome.RETRY, None, f"{type(cause).__name__}")


def _about_token(exc: exceptions.FirebaseError, response: Any) -> bool:
    """Whether an INVALID_ARGUMENT names the registration token (not our message)."""
    try:
        error = response.json().get("error", {}) if response is not None else {}
    except ValueError:
        error = {}
    for detail in error.get("details", []) if isinstance(error, dict) else []:
        if detail.get("@type") == _BAD_REQUEST:
            for violation in detail.get("fieldViolations", []):
                if violation.get("field") == "message.token":
                    return True
    return "registration token" in str(exc).lower()

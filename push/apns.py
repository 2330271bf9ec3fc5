"""APNs wake-ups through aioapns, hosted on an asyncio island.

aioapns provides the HTTP/2 connection pool, request headers and the provider JWT. Three
things are adjusted here, in small subclasses:

- One provider token (JWT) is shared by every connection and refreshed every
  `JWT_REFRESH` seconds, never per request; an `ExpiredProviderToken` answer forces a
  refresh. (aioapns signs one token per connection, which Apple may answer with
  `TooManyProviderTokenUpdates` when many connections refresh.)
- The endpoint (host, port, TLS or not) comes from `[push.apns] endpoint`, and the TLS
  context trusts `[push.apns] ca_file` and offers ALPN `h2`.
- A request waits for HTTP/2 flow-control credit instead of failing with a half-open
  stream (aioapns raises `FlowControlError` after sending the headers).
- Responses are matched by stream, with flow-control credit returned, response headers
  (`Retry-After`) kept, streams forgotten when they end, and a cancelled request resetting
  its stream, so a slow or hung APNs cannot leak memory or wedge a connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import trio
from aioapns.common import NotificationRequest, NotificationResult, PushType
from aioapns.connection import (
    APNsBaseClientProtocol,
    APNsBaseConnectionPool,
    APNsTLSClientProtocol,
    AuthorizationHeaderProvider,
)
from aioapns.exceptions import ConnectionClosed, ConnectionError, MaxAttemptsExceeded
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from hpack import Encoder

from push.errors import CredentialsError
from push.island import AsyncioIsland
from push.notification import (
    SENT,
    Notification,
    Outcome,
    PushResult,
    parse_retry_after,
    token_hash,
)
from push.policy import WakeKind
from push.settings import ApnsSettings

log = logging.getLogger(__name__)

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
# Apple refuses tokens older than 60 minutes (ExpiredProviderToken) and refreshes more
# often than every 20 minutes (TooManyProviderTokenUpdates). 45 minutes keeps a margin of
# a quarter of an hour on either side for clock skew between us and Apple.
JWT_REFRESH = 45 * 60.0
# aioapns closes a connection after 10 s without a request; Apple asks providers to keep
# connections open rather than reconnect per burst.
INACTIVITY = 120
MAX_CONNECTIONS = 8
INVALID_TOKEN_REASONS = frozenset({"Unregistered", "BadDeviceToken", "DeviceTokenNotForTopic"})
CREDENTIAL_REASONS = frozenset(
    {
        "InvalidProviderToken",
        "MissingProviderToken",
        "BadCertificate",
        "BadCertificateEnvironment",
        "Forbidden",
        "TopicDisallowed",
    }
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an APNs connection goes."""

    host: str
    port: int
    tls: bool


def endpoint_for(settings: ApnsSettings, sandbox: bool) -> Endpoint:
    """The endpoint for a token: the override if set, else Apple's production or sandbox."""
    if settings.endpoint:
        url = urlsplit(settings.endpoint)
        tls = url.scheme == "https"
        return Endpoint(url.hostname or "127.0.0.1", url.port or (443 if tls else 80), tls)
    return Endpoint(SANDBOX_HOST if sandbox or settings.sandbox else PRODUCTION_HOST, 443, True)


def apns_request(notification: Notification, topic: str) -> NotificationRequest:
    """The aioapns request for a wake-up: the contract's headers and payload, nothing more."""
    if notification.kind is WakeKind.ALERT:
        message: dict[str, Any] = {
            "aps": {
                "alert": {"loc-key": notification.alert_loc_key},
                "mutable-content": 1,
                "sound": "default",
            }
        }
        return NotificationRequest(
            device_token=notification.token.token,
            message=message,
            time_to_live=notification.ttl,
            priority=10,
            collapse_key=notification.collapse_id,
            push_type=PushType.ALERT,
            apns_topic=topic,
        )
    message = {"aps": {"content-available": 1}}
    if notification.kind is WakeKind.CLEAR:
        message["clear"] = 1  # the app removes the notifications of what was read
    return NotificationRequest(
        device_token=notification.token.token,
        message=message,
        time_to_live=notification.ttl,
        priority=5,
        collapse_key=notification.collapse_id,
        push_type=PushType.BACKGROUND,
        apns_topic=topic,
    )


class ProviderToken(AuthorizationHeaderProvider):
    """The ES256 provider JWT shared by all connections of one APNs client.

    Thread-safe: minted under a lock, read by the island's connections.
    """

    def __init__(
        self, key_pem: bytes, key_id: str, team_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = serialization.load_pem_private_key(key_pem, password=None)
        self.key_id = key_id
        self.team_id = team_id
        self._clock = clock
        self._lock = threading.Lock()
        self._header: str | None = None
        self.issued_at = 0.0
        self.generation = 0  # bumped on every mint
        self.mints = 0

    def get_header(self) -> str:
        """``bearer <jwt>``, minted now if none exists or the current one is `JWT_REFRESH` old."""
        with self._lock:
            if self._header is None or self._clock() - self.issued_at >= JWT_REFRESH:
                self._mint()
            assert self._header is not None
            return self._header

    def expired(self, generation: int) -> bool:
        """APNs called the token of `generation` expired: mint a new one unless that already
        happened. Returns whether a new token was minted."""
        with self._lock:
            if generation != self.generation:
                return False
            self._mint()
            return True

    def _mint(self) -> None:
        now = self._clock()
        self.issued_at = now
        token = jwt.encode(
            {"iss": self.team_id, "iat": int(now)},
            self._key,  # type: ignore[arg-type]
            algorithm="ES256",
            headers={"kid": self.key_id},
        )
        self._header = f"bearer {token}"
        self.generation += 1
        self.mints += 1


class PlainEncoder(Encoder):
    """HPACK without Huffman coding. Huffman is optional in HPACK and, in pure Python, the
    costliest step of encoding a request; the headers that repeat are indexed anyway."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


# We build every header ourselves; h2's per-header validation is CPU we do not need.
_H2_CONFIG = H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)


class _Result(NotificationResult):
    """aioapns's result plus the Retry-After header."""

    __slots__ = ("retry_after",)

    def __init__(
        self,
        notification_id: str,
        status: str,
        description: str | None = None,
        timestamp: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(notification_id, status, description, timestamp)
        self.retry_after = retry_after


class _Protocol(APNsTLSClientProtocol):
    """aioapns's HTTP/2 client protocol with responses matched by stream (see module doc)."""

    INACTIVITY_TIME = INACTIVITY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = H2Connection(_H2_CONFIG)
        self.conn.encoder = PlainEncoder()
        self._status: dict[int, str] = {}
        self._headers: dict[int, dict[bytes, bytes]] = {}
        self._bodies: dict[int, bytearray] = {}
        self._window_open: asyncio.Event | None = None
        self._flush_pending = False

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except Exception as exc:  # a protocol error: drop the connection, requests retry
            log.warning("APNs connection protocol error: %s", exc)
            self.close()
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                assert event.stream_id is not None
                self._headers[event.stream_id] = dict(event.headers or [])
            elif isinstance(event, DataReceived):
                sid = event.stream_id
                assert sid is not None
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
                self._bodies.setdefault(sid, bytearray()).extend(event.data or b"")
            elif isinstance(event, StreamEnded):
                assert event.stream_id is not None
                self._finish(event.stream_id, reset=False)
                self.free_channels.release()
            elif isinstance(event, StreamReset):
                assert event.stream_id is not None
                if self._finish(event.stream_id, reset=True):
                    self.free_channels.release()
            elif isinstance(event, RemoteSettingsChanged):
                self.on_remote_settings_changed(event.changed_settings)  # type: ignore[arg-type]
                self._grant()
            elif isinstance(event, WindowUpdated):
                self._grant()
            elif isinstance(event, ConnectionTerminated):
                self.on_connection_terminated(event)
        self.flush()

    def _grant(self) -> None:
        if self._window_open is not None:
            self._window_open.set()
            self._window_open = None

    def _finish(self, stream_id: int, *, reset: bool) -> bool:
        """Resolve the request of a finished stream; False if it was not ours any more."""
        headers = self._headers.pop(stream_id, {})
        body = bytes(self._bodies.pop(stream_id, b""))
        notification_id = self.request_streams.pop(stream_id, None)
        if notification_id is None:
            return False
        future = self.requests.pop(notification_id, None)
        self.request_statuses.pop(notification_id, None)
        if future is None or future.done():
            return True
        if reset:
            future.set_exception(ConnectionClosed("stream reset by APNs"))
            return True
        reason, timestamp = "", None
        if body:
            try:
                data = json.loads(body)
                reason, timestamp = str(data.get("reason", "")), data.get("timestamp")
            except (ValueError, AttributeError):
                reason = ""
        future.set_result(
            _Result(
                notification_id,
                headers.get(b":status", b"").decode("latin-1"),
                description=reason,
                timestamp=timestamp,
                retry_after=parse_retry_after(headers.get(b"retry-after")),
            )
        )
        return True

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        """aioapns's request, except that it waits for HTTP/2 flow-control credit instead of
        failing with a half-open stream, and resets its stream when cancelled."""
        stream_id = await self.free_channels.acquire()
        notification_id = request.notification_id
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", f"/3/device/{request.device_token}"),
            ("host", self.APNS_SERVER),
            ("apns-id", notification_id),
            ("apns-topic", request.apns_topic or self.apns_topic),
        ]
        if request.time_to_live is not None:
            headers.append(("apns-expiration", str(int(time.time()) + request.time_to_live)))
        if request.priority is not None:
            headers.append(("apns-priority", str(request.priority)))
        if request.collapse_key is not None:
            headers.append(("apns-collapse-id", request.collapse_key))
        if request.push_type is not None:
            headers.append(("apns-push-type", request.push_type.value))
        if self.auth_provider is not None:
            headers.append(("authorization", self.auth_provider.get_header()))
        body = json.dumps(request.message, ensure_ascii=False, separators=(",", ":")).encode()
        future: asyncio.Future[NotificationResult] = self.loop.create_future()
        self.requests[notification_id] = future
        self.request_streams[stream_id] = notification_id
        try:
            self.conn.send_headers(stream_id, headers)
            while self.conn.local_flow_control_window(stream_id) < len(body):
                self.flush()
                await self._credit()
            self.conn.send_data(stream_id, body, end_stream=True)
            self._flush_soon()
            return await future
        except asyncio.CancelledError:
            self._abandon(notification_id)
            raise

    def _flush_soon(self) -> None:
        """Write once per loop iteration: requests started together share TLS records and
        system calls, and the inactivity timer is re-armed once, not per request."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        if self.transport is not None and not self.transport.is_closing():
            self.flush()

    async def _credit(self) -> None:
        """Wait for the peer to grant flow-control credit (a WINDOW_UPDATE or SETTINGS)."""
        if self._window_open is None:
            self._window_open = asyncio.Event()
        await self._window_open.wait()

    def _abandon(self, notification_id: str) -> None:
        """A request was cancelled (timed out): reset its stream and forget it."""
        self.requests.pop(notification_id, None)
        self.request_statuses.pop(notification_id, None)
        for stream_id, nid in list(self.request_streams.items()):
            if nid == notification_id:
                del self.request_streams[stream_id]
                self._headers.pop(stream_id, None)
                self._bodies.pop(stream_id, None)
                try:
                    self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                    self.flush()
                except Exception:
                    pass
                self.free_channels.release()

    def connection_lost(self, exc: Exception | None) -> None:
        closed = ConnectionClosed(str(exc))
        for future in self.requests.values():
            if not future.done():
                future.set_exception(closed)
        self.requests.clear()
        super().connection_lost(exc)


class _Pool(APNsBaseConnectionPool):
    """aioapns's pool, connecting to `endpoint` with the shared provider token."""

    def __init__(
        self,
        endpoint: Endpoint,
        ssl_context: ssl.SSLContext | None,
        auth: ProviderToken | None,
        topic: str | None,
    ) -> None:
        super().__init__(topic=topic, max_connections=MAX_CONNECTIONS, max_connection_attempts=2)
        self.protocol_class = type(
            "ApnsProtocol", (_Protocol,), {"APNS_SERVER": endpoint.host, "APNS_PORT": endpoint.port}
        )
        self.endpoint = endpoint
        self.ssl_context = ssl_context
        self.auth = auth

    async def create_connection(self) -> APNsBaseClientProtocol:
        factory: Any = partial(
            self.protocol_class,
            self.apns_topic or "",
            self.loop,
            self.discard_connection,  # type: ignore[arg-type]
            self.auth,
        )
        _, protocol = await self.loop.create_connection(
            factory,
            host=self.endpoint.host,
            port=self.endpoint.port,
            ssl=self.ssl_context if self.endpoint.tls else None,
        )
        return protocol  # type: ignore[no-any-return]

    def discard_connection(self, connection: APNsBaseClientProtocol) -> None:
        if connection in self.connections:
            self.connections.remove(connection)


class ApnsProvider:
    """Sends APNs wake-ups; token auth (.p8) or certificate auth, production or sandbox.

    Credentials are loaded and checked when the provider is built, so that
    `gateway check-config` can name a bad key file.

    Raises:
        CredentialsError: A key, certificate or CA file cannot be used (the message
            names the key).
    """

    name = "apns"

    def __init__(self, settings: ApnsSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.auth: ProviderToken | None = None
        if settings.key_file is not None:
            key_pem = _read(settings.key_file, "key_file")
            _check_p8(key_pem, settings.key_file)
            assert settings.key_id and settings.team_id  # checked by load_settings
            self.auth = ProviderToken(key_pem, settings.key_id, settings.team_id, clock)
        elif settings.cert_file is None:
            raise CredentialsError("[push.apns]: set key_file, key_id and team_id, or cert_file")
        self.ssl_context = _ssl_context(settings)
        self.island = AsyncioIsland("apns")
        self._pools: dict[Endpoint, _Pool] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the asyncio loop until cancelled; its connections go with it."""
        await self.island.run(task_status=task_status)

    async def send(self, notification: Notification) -> PushResult:
        """Attempt one delivery on the island and classify APNs's answer."""
        topic = notification.token.topic or self.settings.topic
        if not topic:
            return PushResult(Outcome.REJECTED, None, "no topic for this token")
        request = apns_request(notification, topic)
        endpoint = endpoint_for(self.settings, notification.token.sandbox)
        return await self.island.call(lambda: self._send(endpoint, request))

    async def _send(self, endpoint: Endpoint, request: NotificationRequest) -> PushResult:
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = _Pool(
                endpoint, self.ssl_context, self.auth, self.settings.topic
            )
        generation = self.auth.generation if self.auth else 0
        try:
            result = await pool.send_notification(request)
        except (ConnectionClosed, ConnectionError, MaxAttemptsExceeded, OSError) as exc:
            return PushResult(Outcome.RETRY, None, f"connection: {type(exc).__name__}")
        return self._classify(result, generation, request.device_token)

    def _classify(self, result: NotificationResult, generation: int, token: str) -> PushResult:
        status = int(result.status) if result.status.isdigit() else None
        reason = result.description or ""
        retry_after = getattr(result, "retry_after", None)
        if status == 200:
            return SENT
        if reason in INVALID_TOKEN_REASONS and status in (400, 410):
            return PushResult(Outcome.INVALID_TOKEN, status, reason)
        if reason == "ExpiredProviderToken" and self.auth is not None:
            self.auth.expired(generation)
            return PushResult(Outcome.RETRY, status, reason, retry_after=0.0)
        if status == 429 or (status is not None and status >= 500) or status is None:
            return PushResult(Outcome.RETRY, status, reason or "no status", retry_after)
        if status == 403 or reason in CREDENTIAL_REASONS:
            return PushResult(Outcome.CREDENTIALS, status, reason)
        log.warning("APNs refused a wake-up for token~%s: %s %s", token_hash(token), status, reason)
        return PushResult(Outcome.REJECTED, status, reason)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"[push.apns] {key}: cannot read {path}: {exc.strerror}") from None


def _check_p8(key_pem: bytes, path: Path) -> None:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(
            f"[push.apns] key_file: {path} is not a PEM private key (.p8): {exc}"
        ) from None
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"):
        raise CredentialsError(f"[push.apns] key_file: {path} is not an ES256 (P-256) key")


def _ssl_context(settings: ApnsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2"])
    if settings.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(settings.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise CredentialsError(
                f"[push.apns] ca_file: {settings.ca_file} is not a PEM CA certificate: {exc}"
            ) from None
    if settings.key_file is None and settings.cert_file is not None:
        try:
            context.load_cert_chain(str(settings.cert_file))
        except (ssl.SSLError, OSError) as exc:
            raise CredentialsError(
                f"[push.apns] cert_file: {settings.cert_file} must hold the certificate and "
                f"its private key in PEM: {exc}"
            ) from None
    return context

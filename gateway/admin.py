"""The admin and backend HTTP API on its own port: probes, metrics, publishing, devices.

```
GET    /healthz                            liveness (no key)
GET    /readyz                             readiness: 503 while draining or the store is down
GET    /metrics                            Prometheus text (no key)
GET    /v1/webpush/vapid-public-key        the Web Push application server key (no key)
POST   /v1/messages                        a server-originated message: 202 once durable
GET    /v1/users/{user}/devices            a user's devices, last-seen, has_push
PUT    /v1/users/{user}/devices/{device}   pre-register a device
DELETE /v1/users/{user}/devices/{device}   revoke: forget it, refuse its older tokens, close
                                           its connection
PUT    /v1/groups/{group}                  create a group or replace its members: 201 / 200
GET    /v1/groups/{group}                  a group's members, or 404
DELETE /v1/groups/{group}                  delete a group: 204, or 404
POST   /v1/groups/{group}/members          add members: 200, or 404 for no such group
DELETE /v1/groups/{group}/members/{user}   remove a member: 200, or 404
```

A group has at most ``[groups] max_members`` members; a request that would make more is
answered 422 ``too_many_members``, with the limit in the body. Every change is durable,
and its `group` events queued to the devices involved, before it is answered.

Everything but the probes, `/metrics` and the VAPID public key needs
``Authorization: Bearer <[admin] api_key>``; without a configured key those endpoints
answer 403. Errors are JSON,
``{"error": CODE, "detail": TEXT}``, with a fitting status.

The server is hypercorn's Trio worker running this module's small ASGI application.
Hypercorn is a maintained HTTP/1.1 and HTTP/2 server built on h11 and h2, the same
sans-IO libraries the rest of the stack uses; it brings read and keep-alive timeouts,
limits on incomplete requests, pipelining and graceful shutdown, all of which a
hand-written h11 loop would have to reimplement and get right. The application is plain
ASGI, so it needs no web framework.

Failure domain: an exception in a request answers 500 and is logged; it never reaches the
gateway. If the port cannot be bound, the API logs the error and retries every
`BIND_RETRY` seconds while devices are served as usual (readiness probes fail meanwhile,
so the orchestrator notices).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CollectorRegistry

from gateway import frames
from gateway.clock import now_ms
from gateway.errors import StoreError
from gateway.frames import MAX_DEVICE_BYTES, MAX_GROUP_BYTES, MAX_ID_BYTES, MAX_USER_BYTES
from gateway.logthrottle import LogThrottle
from gateway.metrics import CONTENT_TYPE, EdgeView, render
from gateway.registry import Registry
from gateway.send_path import SendPath
from gateway.session import CloseCode
from gateway.settings import Settings
from gateway.store import MessageStore
from push.errors import CredentialsError
from push.vapid import load_private_key, public_key_b64

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BIND_RETRY = 5.0
BIND_LOG_INTERVAL = 60.0
READY_PROBE_TIMEOUT = 1.0


class HttpError(Exception):
    """An error answer: `status`, a stable `code` and a human `detail`."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or []
        self.fields = fields or {}  # more of the JSON answer, such as the limit exceeded


@dataclass(slots=True)
class Response:
    """What a handler answers."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, payload: Any) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(payload, separators=(",", ":")).encode())


@dataclass(slots=True)
class Request:
    """One parsed HTTP request."""

    method: str
    segments: list[str]  # the path, split on "/" and percent-decoded piece by piece
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object."""
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, "bad_json", f"the body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise HttpError(400, "bad_json", "the body must be a JSON object")
        return value


class Revocations(Protocol):
    """Closes a revoked device's connection on another node of the cluster."""

    async def close_revoked(self, user: str, device: str) -> bool:
        """Tell the node holding the device, if another one does; True if one was told.

        Raises:
            StoreError: The cluster cannot be reached.
        """
        ...


class AdminApi:
    """The ASGI application, acting for the gateway whose parts it is given.

    Args:
        settings: The configuration.
        store: Where devices are kept (and readiness pings).
        sends: The send path that published messages take, as devices' sends do.
        registry: This process's live connections (revocation closes one).
        edge: Readiness reads whether the edge is draining.
        metrics: The registry `/metrics` renders.
        revocations: Closes revoked devices on other nodes (None on a single node).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: MessageStore,
        sends: SendPath,
        registry: Registry,
        edge: EdgeView,
        metrics: CollectorRegistry,
        revocations: Revocations | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sends = sends
        self.connections = registry
        self.edge = edge
        self.registry = metrics
        self.revocations = revocations
        self.api_key = settings.admin.api_key
        self.vapid_public_key = _vapid_public_key(settings)
        # A base64 body of max_message_size bytes, plus room for the other fields; or a
        # full member list (JSON-escaped user ids take up to about 4 bytes per byte).
        self.max_members = settings.groups.max_members
        self.max_body = max(
            settings.server.max_message_size * 4 // 3 + 16 * 1024,
            self.max_members * (4 * MAX_USER_BYTES + 3) + 4096,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        try:
            body = await self._read_body(receive, headers)
            request = Request(scope["method"], _segments(scope), headers, body)
            response = await self._route(request)
            extra: list[tuple[bytes, bytes]] = response.headers
        except HttpError as exc:
            payload = {"error": exc.code, "detail": exc.detail, **exc.fields}
            response = Response.json(exc.status, payload)
            extra = exc.headers
            if exc.status == 413:  # the rest of the body was not read: no keep-alive
                extra = [*extra, (b"connection", b"close")]
        except Exception:
            log.exception("admin API: %s %s failed", scope["method"], scope["path"])
            response = Response.json(500, {"error": "internal", "detail": "internal error"})
            extra = []
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", response.content_type),
                    (b"cache-control", b"no-store"),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise HttpError(413, "too_large", f"the body may be at most {self.max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise HttpError(400, "disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise HttpError(413, "too_large", f"the body may be at most {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _route(self, request: Request) -> Response:
        segments, method = request.segments, request.method
        match segments:
            case ["healthz"]:
                _allow(method, "GET", "HEAD")
                return Response.json(200, {"status": "ok"})
            case ["readyz"]:
                _allow(method, "GET", "HEAD")
                return await self._readyz()
            case ["metrics"]:
                _allow(method, "GET", "HEAD")
                return Response(200, render(self.registry), CONTENT_TYPE.encode())
            case ["v1", "webpush", "vapid-public-key"]:
                _allow(method, "GET", "HEAD")
                return self._vapid_public_key()
            case ["v1", "messages"]:
                _allow(method, "POST")
                self._authorize(request)
                return await self._publish(request)
            case ["v1", "users", user, "devices"]:
                _allow(method, "GET")
                self._authorize(request)
                return await self._list_devices(_user(user))
            case ["v1", "users", user, "devices", device]:
                _allow(method, "PUT", "DELETE")
                self._authorize(request)
                if method == "PUT":
                    return await self._register(_user(user), _device(device))
                return await self._revoke(_user(user), _device(device))
            case ["v1", "groups", group]:
                _allow(method, "GET", "PUT", "DELETE")
                self._authorize(request)
                if method == "GET":
                    return await self._read_group(_group(group))
                if method == "PUT":
                    return await self._set_group(_group(group), request)
                return await self._delete_group(_group(group))
            case ["v1", "groups", group, "members"]:
                _allow(method, "POST")
                self._authorize(request)
                return await self._add_members(_group(group), request)
            case ["v1", "groups", group, "members", user]:
                _allow(method, "DELETE")
                self._authorize(request)
                return await self._remove_member(_group(group), _user(user))
        raise HttpError(404, "not_found", "no such endpoint")

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            raise HttpError(403, "disabled", "the backend API is off: set [admin] api_key")
        scheme, _, given = request.headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            given.strip(), self.api_key.encode()
        ):
            raise HttpError(
                401,
                "unauthorized",
                "a valid Authorization: Bearer <api_key> header is required",
                [(b"www-authenticate", b'Bearer realm="gateway"')],
            )

    def _vapid_public_key(self) -> Response:
        """The key web apps pass to `pushManager.subscribe` as `applicationServerKey`."""
        if self.vapid_public_key is None:
            raise HttpError(
                404, "not_configured", "Web Push is off: set [push.webpush] vapid_private_key_file"
            )
        response = Response.json(200, {"public_key": self.vapid_public_key})
        # Public by design: any page may read it (it is in every subscribing web app anyway).
        response.headers.append((b"access-control-allow-origin", b"*"))
        return response

    # -- probes -------------------------------------------------------------------------

    async def _readyz(self) -> Response:
        reason = await self.not_ready_reason()
        if reason is not None:
            return Response.json(503, {"ready": False, "reason": reason})
        return Response.json(200, {"ready": True})

    async def not_ready_reason(self) -> str | None:
        """Why the gateway should get no new devices now, or None if it is ready."""
        if self.edge.draining:
            return "draining"
        with trio.move_on_after(READY_PROBE_TIMEOUT):
            try:
                await self.store.ping()
            except StoreError as exc:
                log.warning("readiness: the store is unreachable: %s", exc)
                return "store_unreachable"
            return None
        return "store_unreachable"

    # -- publishing -----------------------------------------------------------------------

    async def _publish(self, request: Request) -> Response:
        settings = self.settings
        data = request.json()
        to = _user(_field(data, "to", str))
        try:
            body = base64.b64decode(_field(data, "body", str), validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "bad_field", "body must be standard base64") from None
        if len(body) > settings.server.max_message_size:
            raise HttpError(
                413, "too_large", f"body may be at most {settings.server.max_message_size} bytes"
            )
        urgent = _field(data, "urgent", bool, default=True)
        ttl = _field(data, "ttl", int, default=settings.server.max_ttl)
        if not 1 <= ttl <= settings.server.max_ttl:
            raise HttpError(400, "bad_field", f"ttl must be 1..{settings.server.max_ttl} seconds")
        msg_id = _field(data, "id", str, default=uuid.uuid4().hex)
        if not 1 <= len(msg_id.encode()) <= MAX_ID_BYTES:
            raise HttpError(400, "bad_field", f"id must be 1..{MAX_ID_BYTES} bytes")
        send = frames.Send(id=msg_id, to=to, body=body, bodies=None, urgent=urgent, ttl=ttl)
        admin = settings.admin
        try:
            ticket = await self.sends.submit(admin.system_user, admin.system_device, send)
            outcome = await ticket.result()
        except StoreError as exc:
            log.warning("admin API: message for %s not stored: %s", to, exc)
            raise HttpError(
                503, "store_unavailable", "not stored; retry with the same id"
            ) from None
        if outcome.unknown_recipient:
            raise HttpError(404, "unknown_recipient", "the recipient has no known device")
        answer: dict[str, Any] = {"id": msg_id, "ts": outcome.ts}
        if outcome.duplicate:
            answer["duplicate"] = True
        return Response.json(202, answer)

    # -- devices --------------------------------------------------------------------------

    async def _list_devices(self, user: str) -> Response:
        records = await _store_call(self.store.devices(user))
        devices = [
            {
                "device": r.device,
                "created": r.created,
                "last_seen": r.last_seen,
                "has_push": r.push is not None,
                "push_provider": r.push.provider if r.push is not None else None,
                "connected_here": self.connections.get(user, r.device) is not None,
            }
            for r in sorted(records, key=lambda r: r.device)
        ]
        return Response.json(200, {"user": user, "devices": devices})

    async def _register(self, user: str, device: str) -> Response:
        created = await _store_call(self.store.register_device(user, device, now_ms()))
        log.info("admin API: device %s/%s %s", user, device, "registered" if created else "known")
        answer = {"user": user, "device": device, "created": created}
        return Response.json(201 if created else 200, answer)

    async def _revoke(self, user: str, device: str) -> Response:
        # Tokens issued before now are refused from now on (see `open_session` at hello).
        kicked_elsewhere = False
        existed = await _store_call(self.store.revoke_device(user, device, now_ms()))
        conn = self.connections.get(user, device)
        if conn is not None:
            conn.request_close(CloseCode.UNAUTHORIZED, "unauthorized")
        elif self.revocations is not None:  # connected to another node, perhaps
            kicked_elsewhere = await _store_call(self.revocations.close_revoked(user, device))
        kicked = conn is not None or kicked_elsewhere
        log.info(
            "admin API: device %s/%s revoked%s",
            user,
            device,
            ", its connection closed" if kicked else "",
        )
        if not existed and not kicked:
            raise HttpError(404, "unknown_device", "no such device")
        answer = {"user": user, "device": device, "revoked": True, "kicked": kicked}
        return Response.json(200, answer)

    # -- groups -------------------------------------------------------------------------------

    async def _read_group(self, group: str) -> Response:
        members = await _store_call(self.store.group_members(group))
        if members is None:
            raise HttpError(404, "unknown_group", "no such group")
        return Response.json(200, {"group": group, "members": list(members)})

    async def _set_group(self, group: str, request: Request) -> Response:
        members = self._user_list(request.json(), "members")
        change = await _store_call(self.store.set_group(group, members, now_ms(), self.max_members))
        if change.over_limit:
            raise self._too_many()
        log.info("admin API: group %s %s", group, "created" if change.created else "replaced")
        answer = {"group": group, "members": list(change.members)}
        return Response.json(201 if change.created else 200, answer)

    async def _add_members(self, group: str, request: Request) -> Response:
        users = self._user_list(request.json(), "users")
        change = await _store_call(
            self.store.add_group_members(group, users, now_ms(), self.max_members)
        )
        if not change.found:
            raise HttpError(404, "unknown_group", "no such group")
        if change.over_limit:
            raise self._too_many()
        return Response.json(200, {"group": group, "members": list(change.members)})

    async def _remove_member(self, group: str, user: str) -> Response:
        change = await _store_call(self.store.remove_group_member(group, user, now_ms()))
        if not change.found:
            raise HttpError(404, "not_member", "no such group, or the user is not a member")
        return Response.json(200, {"group": group, "members": list(change.members)})

    async def _delete_group(self, group: str) -> Response:
        if not await _store_call(self.store.delete_group(group, now_ms())):
            raise HttpError(404, "unknown_group", "no such group")
        log.info("admin API: group %s deleted", group)
        return Response(204, b"")

    def _user_list(self, data: dict[str, Any], name: str) -> tuple[str, ...]:
        """The distinct user ids of the array `name`; 422 past the member limit."""
        value = data.get(name)
        if not isinstance(value, list):
            raise HttpError(400, "bad_field", f"{name} must be an array of user ids")
        for user in value:
            if not isinstance(user, str) or not 1 <= len(user.encode()) <= MAX_USER_BYTES:
                raise HttpError(
                    400, "bad_field", f"{name} must hold user ids of 1..{MAX_USER_BYTES} bytes"
                )
        users = tuple(dict.fromkeys(value))
        if len(users) > self.max_members:
            raise self._too_many()
        return users

    def _too_many(self) -> HttpError:
        limit = self.max_members
        return HttpError(
            422,
            "too_many_members",
            f"a group may have at most {limit} members ([groups] max_members)",
            fields={"limit": limit},
        )


def _vapid_public_key(settings: Settings) -> str | None:
    """The configured VAPID public key (base64url), or None without a usable key."""
    path = settings.push.webpush.vapid_private_key_file
    if path is None:
        return None
    try:
        return public_key_b64(load_private_key(path))
    except CredentialsError:
        return None  # logged by the push provider built from the same settings


async def _store_call(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except StoreError as exc:
        log.warning("admin API: store call failed: %s", exc)
        raise HttpError(503, "store_unavailable", "the store is unavailable") from None


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise HttpError(
            405,
            "method_not_allowed",
            f"use {' or '.join(allowed)}",
            [(b"allow", ", ".join(allowed).encode())],
        )


_MISSING = object()


def _field(data: dict[str, Any], name: str, kind: type[Any], default: Any = _MISSING) -> Any:
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise HttpError(400, "bad_field", f"{name} is required")
        return default
    # bool is an int in Python; JSON true is not a ttl.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HttpError(400, "bad_field", f"{name} must be a {_JSON_NAMES[kind]}")
    return value


_JSON_NAMES = {str: "string", bool: "boolean", int: "integer"}


def _user(user: str) -> str:
    if not 1 <= len(user.encode()) <= MAX_USER_BYTES:
        raise HttpError(400, "bad_field", f"a user id is 1..{MAX_USER_BYTES} bytes")
    return user


def _group(group: str) -> str:
    if not 1 <= len(group.encode()) <= MAX_GROUP_BYTES:
        raise HttpError(400, "bad_field", f"a group id is 1..{MAX_GROUP_BYTES} bytes")
    return group


def _device(device: str) -> str:
    if not 1 <= len(device.encode()) <= MAX_DEVICE_BYTES:
        raise HttpError(400, "bad_field", f"a device id is 1..{MAX_DEVICE_BYTES} bytes")
    return device


def _segments(scope: Scope) -> list[str]:
    """Path segments, each percent-decoded on its own so that an id may contain "/"."""
    raw = scope.get("raw_path") or scope["path"].encode()
    path = raw.split(b"?", 1)[0].decode("latin-1")
    return [unquote(part) for part in path.strip("/").split("/")] if path.strip("/") else []


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _hypercorn_config() -> Config:
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger("gateway.admin.http")
    config.read_timeout = 10
    config.keep_alive_timeout = 5
    config.graceful_timeout = 1
    config.include_server_header = False
    return config


async def serve_admin(
    app: AdminApi, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `app` on `[admin] host`:`[admin] port` until cancelled.

    Reports the bound port through `task_status`, or None if the port could not be bound;
    binding is then retried every `BIND_RETRY` seconds (logged at error level once, then
    at most once per `BIND_LOG_INTERVAL`).
    """
    config = _hypercorn_config()
    admin = app.settings.admin
    reported = False
    bind_log = LogThrottle(BIND_LOG_INTERVAL)

    def report(port: int | None) -> None:
        nonlocal reported
        if not reported:
            reported = True
            task_status.started(port)

    async def serve_once() -> None:
        # The socket is bound here and handed over by descriptor: hypercorn would leak
        # the socket of a failed bind on every retry.
        config.bind = [f"fd://{_bound_socket(admin.host, admin.port)}"]
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serve, app, config)
            log.info("admin API listening on %s", binds[0])
            report(int(binds[0].rsplit(":", 1)[1]))

    while True:
        try:
            await serve_once()
        except* OSError as group:
            report(None)
            if bind_log.take(trio.current_time()) is not None:
                log.error(
                    "admin API cannot listen on %s:%d: %s; retrying every %.0fs",
                    admin.host,
                    admin.port,
                    _first_leaf(group),
                    BIND_RETRY,
                )
        await trio.sleep(BIND_RETRY)


def _bound_socket(host: str, port: int) -> int:
    """A TCP socket bound to (host, port), not yet listening; its descriptor is returned
    and owned by the caller from then on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock.detach()


def _first_leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first

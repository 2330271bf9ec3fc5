"""Protocol v1 frames: validated client commands in, plain maps out.

Client frames are parsed into small frozen dataclasses; anything malformed raises
`FrameError` with the precise error code the contract names. Every server frame is built
here, as a plain dict ready for `gateway.codec.encode_frames`, from the values the other
parts hand over (queue items, presence items, typing indicators).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store.base import ItemKind, QueueItem
from presence.state import PresenceItem
from push.settings import DEFAULT_WEBPUSH_HOSTS
from push.subscription import HostPolicy, SubscriptionError, parse_subscription

MAX_USER_BYTES = 128
MAX_DEVICE_BYTES = 64
MAX_ID_BYTES = 64
MAX_GROUP_BYTES = 128
MAX_LIST = 1000  # ids, sids or users in one frame; well above any real client's batch
MAX_BODIES = 256  # recipient devices per `send`; more devices than any multi-device account


class FrameError(ValueError):
    """A frame that cannot be handled; becomes an `error` frame with `code`."""

    def __init__(self, code: str, reason: str, ref: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Hello:
    token: str
    active: bool


@dataclass(frozen=True, slots=True)
class Send:
    id: str
    to: str
    body: bytes | None
    bodies: Mapping[str, bytes] | None
    urgent: bool
    ttl: int


@dataclass(frozen=True, slots=True)
class GroupSend:
    """A `send` with `group`: one body for every device of every member."""

    id: str
    group: str
    body: bytes
    urgent: bool
    ttl: int


@dataclass(frozen=True, slots=True)
class Ack:
    sids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Read:
    to: str
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Typing:
    to: str
    on: bool


@dataclass(frozen=True, slots=True)
class Subscribe:
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClientState:
    active: bool


@dataclass(frozen=True, slots=True)
class Privacy:
    hide_presence: bool


@dataclass(frozen=True, slots=True)
class PushRegistration:
    """A push registration; for ``webpush`` the token is the validated subscription's
    stored form (`push.subscription.WebPushSubscription.to_token`)."""

    provider: str | None
    token: str | None
    topic: str | None
    sandbox: bool


ClientFrame = (
    Hello
    | Send
    | GroupSend
    | Ack
    | Read
    | Typing
    | Subscribe
    | Unsubscribe
    | ClientState
    | Privacy
    | PushRegistration
)


class FrameParser:
    """Turns decoded CBOR maps into client frames, enforcing the v1 field rules.

    Args:
        max_ttl: The largest `ttl` a `send` may ask for.
        webpush_hosts: The push services a Web Push subscription may point at
            (`[push.webpush] allowed_hosts`; default: the public browser push services).
    """

    def __init__(self, *, max_ttl: int, webpush_hosts: HostPolicy | None = None) -> None:
        self.max_ttl = max_ttl
        self.webpush_hosts = webpush_hosts or HostPolicy(DEFAULT_WEBPUSH_HOSTS)
        self._parsers: dict[str, Callable[[dict[str, Any]], ClientFrame]] = {
            "hello": self._hello,
            "send": self._send,
            "ack": self._ack,
            "read": self._read,
            "typing": self._typing,
            "sub": self._sub,
            "unsub": self._unsub,
            "state": self._state,
            "privacy": self._privacy,
            "push": self._push,
        }

    def parse(self, item: Any) -> ClientFrame:
        """Validate one decoded frame.

        Raises:
            FrameError: ``bad_frame`` if it is not a map with a text ``t``,
                ``unknown_type`` for an unknown ``t``, ``bad_field`` for a missing or
                ill-typed field.
        """
        if not isinstance(item, dict):
            raise FrameError("bad_frame", f"a frame must be a map, not {_cbor_type(item)}")
        kind = item.get("t")
        if not isinstance(kind, str):
            raise FrameError("bad_frame", "a frame needs a text field 't'")
        parser = self._parsers.get(kind)
        if parser is None:
            raise FrameError("unknown_type", f"unknown frame type {kind[:32]!r}")
        return parser(item)

    def _hello(self, f: dict[str, Any]) -> Hello:
        if not (_is_int(f.get("v")) and f["v"] == 1):
            raise FrameError("bad_field", "'v' must be 1")
        return Hello(token=_text(f, "token", 8192), active=_bool(f, "active", True))

    def _send(self, f: dict[str, Any]) -> Send | GroupSend:
        msg_id = f.get("id")
        ref = msg_id if isinstance(msg_id, str) and _fits(msg_id, MAX_ID_BYTES) else None
        try:
            if (f.get("to") is None) == (f.get("group") is None):
                raise FrameError("bad_field", "exactly one of 'to' or 'group' is required")
            if f.get("group") is not None:
                return self._group_send_fields(f)
            return self._send_fields(f)
        except FrameError as exc:
            exc.ref = ref
            raise

    def _ttl(self, f: dict[str, Any]) -> int:
        ttl = f.get("ttl", self.max_ttl)
        if not _is_int(ttl) or not 0 < ttl <= self.max_ttl:
            raise FrameError("bad_field", f"'ttl' must be an integer in 1..{self.max_ttl}")
        return int(ttl)

    def _group_send_fields(self, f: dict[str, Any]) -> GroupSend:
        msg_id = _text(f, "id", MAX_ID_BYTES)
        group = _text(f, "group", MAX_GROUP_BYTES)
        if f.get("bodies") is not None:
            raise FrameError("bad_field", "'bodies' is not allowed with 'group'")
        body = f.get("body")
        if not isinstance(body, bytes):
            raise FrameError("bad_field", "'body' must be a byte string")
        return GroupSend(msg_id, group, body, _bool(f, "urgent", True), self._ttl(f))

    def _send_fields(self, f: dict[str, Any]) -> Send:
        msg_id = _text(f, "id", MAX_ID_BYTES)
        to = _user(f, "to")
        body, bodies = f.get("body"), f.get("bodies")
        if (body is None) == (bodies is None):
            raise FrameError("bad_field", "exactly one of 'body' or 'bodies' is required")
        if body is not None and not isinstance(body, bytes):
            raise FrameError("bad_field", "'body' must be a byte string")
        if bodies is not None:
            if not isinstance(bodies, dict) or not 0 < len(bodies) <= MAX_BODIES:
                raise FrameError("bad_field", f"'bodies' must map 1-{MAX_BODIES} devices to bytes")
            for device, ciphertext in bodies.items():
                if not (isinstance(device, str) and 0 < len(device.encode()) <= MAX_DEVICE_BYTES):
                    raise FrameError("bad_field", "'bodies' keys must be device ids")
                if not isinstance(ciphertext, bytes):
                    raise FrameError("bad_field", "'bodies' values must be byte strings")
        return Send(msg_id, to, body, bodies, _bool(f, "urgent", True), self._ttl(f))

    def _ack(self, f: dict[str, Any]) -> Ack:
        sids = _list(f, "sids")
        if not all(_is_int(s) and 0 <= s < 2**63 for s in sids):
            raise FrameError("bad_field", "'sids' must be non-negative 64-bit integers")
        return Ack(tuple(sids))

    def _read(self, f: dict[str, Any]) -> Read:
        ids = _list(f, "ids")
        if not all(isinstance(i, str) and _fits(i, MAX_ID_BYTES) for i in ids):
            raise FrameError("bad_field", "'ids' must be message ids")
        return Read(_user(f, "to"), tuple(ids))

    def _typing(self, f: dict[str, Any]) -> Typing:
        on = f.get("on")
        if not isinstance(on, bool):
            raise FrameError("bad_field", "'on' must be a boolean")
        return Typing(_user(f, "to"), on)

    def _users(self, f: dict[str, Any]) -> tuple[str, ...]:
        users = _list(f, "users")
        if not all(isinstance(u, str) and _fits(u, MAX_USER_BYTES) for u in users):
            raise FrameError("bad_field", "'users' must be user ids")
        return tuple(dict.fromkeys(users))

    def _sub(self, f: dict[str, Any]) -> Subscribe:
        return Subscribe(self._users(f))

    def _unsub(self, f: dict[str, Any]) -> Unsubscribe:
        return Unsubscribe(self._users(f))

    def _state(self, f: dict[str, Any]) -> ClientState:
        active = f.get("active")
        if not isinstance(active, bool):
            raise FrameError("bad_field", "'active' must be a boolean")
        return ClientState(active)

    def _privacy(self, f: dict[str, Any]) -> Privacy:
        hide = f.get("hide_presence")
        if not isinstance(hide, bool):
            raise FrameError("bad_field", "'hide_presence' must be a boolean")
        return Privacy(hide)

    def _push(self, f: dict[str, Any]) -> PushRegistration:
        if "provider" not in f:
            raise FrameError(
                "bad_field", "'provider' is required ('apns', 'fcm', 'webpush' or null)"
            )
        provider = f["provider"]
        if provider is None:
            return PushRegistration(None, None, None, False)
        if provider == "webpush":
            try:
                subscription = parse_subscription(f.get("subscription"), self.webpush_hosts)
            except SubscriptionError as exc:
                raise FrameError("bad_field", str(exc)) from None
            return PushRegistration("webpush", subscription.to_token(), None, False)
        if provider not in ("apns", "fcm"):
            raise FrameError("bad_field", "'provider' must be 'apns', 'fcm', 'webpush' or null")
        topic = f.get("topic")
        if topic is not None and not (isinstance(topic, str) and _fits(topic, 256)):
            raise FrameError("bad_field", "'topic' must be text")
        return PushRegistration(
            provider, _text(f, "token", 4096), topic, _bool(f, "sandbox", False)
        )


def _fits(text: str, limit: int) -> bool:
    return 0 < len(text) <= limit and len(text.encode()) <= limit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(f: dict[str, Any], key: str, limit: int) -> str:
    value = f.get(key)
    if not (isinstance(value, str) and _fits(value, limit)):
        raise FrameError("bad_field", f"'{key}' must be text of 1-{limit} bytes")
    return value


def _user(f: dict[str, Any], key: str) -> str:
    return _text(f, key, MAX_USER_BYTES)


def _bool(f: dict[str, Any], key: str, default: bool) -> bool:
    value = f.get(key, default)
    if not isinstance(value, bool):
        raise FrameError("bad_field", f"'{key}' must be a boolean")
    return value


def _list(f: dict[str, Any], key: str) -> list[Any]:
    value = f.get(key)
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise FrameError("bad_field", f"'{key}' must be an array of at most {MAX_LIST} items")
    return value


def _cbor_type(item: Any) -> str:
    names = {
        bytes: "a byte string",
        str: "a text string",
        int: "an integer",
        float: "a float",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(item), "an unsupported item")


# ---- server frames -------------------------------------------------------------------


def welcome(user: str, device: str, ts: int, heartbeat: int, queued: int) -> dict[str, Any]:
    """The reply to a successful `hello`."""
    return {
        "t": "welcome",
        "user": user,
        "device": device,
        "ts": ts,
        "heartbeat": heartbeat,
        "queued": queued,
    }


DRAINED: dict[str, Any] = {"t": "drained"}


def sent(msg_id: str, ts: int, skipped: Sequence[str] = ()) -> dict[str, Any]:
    """The durable-commit acknowledgement of a `send`; `skipped` (the `bodies` entries
    that were not stored) is present only when it is non-empty."""
    frame: dict[str, Any] = {"t": "sent", "id": msg_id, "ts": ts}
    if skipped:
        frame["skipped"] = list(skipped)
    return frame


def error(code: str, reason: str | None = None, ref: str | None = None) -> dict[str, Any]:
    """An `error` frame; `reason` is for humans and never echoes bodies or tokens."""
    frame: dict[str, Any] = {"t": "error", "code": code}
    if ref is not None:
        frame["ref"] = ref
    if reason is not None:
        frame["reason"] = reason
    return frame


def typing(sender: str, on: bool) -> dict[str, Any]:
    """A typing indicator relayed to the target's connected devices."""
    return {"t": "typing", "from": sender, "on": on}


def presence(items: Iterable[PresenceItem]) -> dict[str, Any]:
    """A `presence` frame: a subscription's snapshot, or the changes of a batch window."""
    return {
        "t": "presence",
        "items": [
            {"user": item.user, "online": item.online, "last_seen": item.last_seen}
            for item in items
        ],
    }


def delivery(item: QueueItem, *, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """The `msg`, `receipt` or `group` frame that delivers a queue item.

    Args:
        item: The item, as read from the store or handed over by its commit.
        ids: For a receipt that stands for several merged items, all of their message
            ids (default: the item's own).
    """
    if item.kind is ItemKind.MESSAGE:
        frame = {
            "t": "msg",
            "sid": item.sid,
            "id": item.msg_id,
            "from": item.sender,
            "dev": item.sender_device,
            "ts": item.ts,
            "body": item.body,
            "urgent": item.urgent,
        }
        if item.group:
            frame["group"] = item.group
        return frame
    if item.kind is ItemKind.GROUP:
        return {
            "t": "group",
            "sid": item.sid,
            "group": item.group,
            "event": item.msg_id,
            "users": list(item.ids),
            "ts": item.ts,
        }
    kind = "delivered" if item.kind is ItemKind.DELIVERED else "read"
    return {
        "t": "receipt",
        "sid": item.sid,
        "kind": kind,
        "ids": list(item.ids if ids is None else ids),
        "by": item.sender,
        "dev": item.sender_device,
        "ts": item.ts,
    }

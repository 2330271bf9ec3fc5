"""Web Push subscriptions: validation, the host allow-list, and how they are stored.

A browser's `PushSubscription` is an endpoint URL on its push service plus two keys: the
user agent's P-256 public key (`p256dh`, for RFC 8291 encryption) and a 16-byte
authentication secret (`auth`). The gateway stores it in the ordinary push token field, as
compact JSON in the shape of `PushSubscription.toJSON()`, so every store backend keeps it
unchanged and the "was it registered again since?" guard compares it like any token.

The endpoint is where the gateway will later send an HTTP request, so it is checked
against `[push.webpush] allowed_hosts` before anything is stored (no server-side request
forgery through a device's registration), and checked again before every request:

- the host must be listed, exactly or under a ``*.`` wildcard entry;
- a loopback host (``localhost``, ``127.0.0.0/8``, ``::1``) must be listed by itself (no
  wildcard reaches it), and is the only kind of host allowed over ``http://`` and on a
  port other than 443;
- every other IP literal, and any host whose last label is not a name (``127.1``,
  ``2130706433``, ``0x7f000001``, which resolvers read as addresses), is refused;
- URLs with user info, non-ASCII hosts, hosts ending in a dot and anything but
  ``https``/``http`` are refused.

The check is on the host name, as the operator listed it: names on the list are trusted
to be the push services they are.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

MAX_ENDPOINT_BYTES = 1024  # real endpoints are 150-400 bytes; stored and cached per device
P256DH_BYTES = 65  # an uncompressed P-256 point: 0x04 || X || Y
AUTH_BYTES = 16
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TLD = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")  # a name, never a number
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")


class SubscriptionError(ValueError):
    """A subscription (or an `allowed_hosts` entry) that cannot be used; says why."""


@dataclass(frozen=True, slots=True)
class WebPushSubscription:
    """A browser's push subscription: where to post, and the keys to encrypt for."""

    endpoint: str
    p256dh: bytes
    auth: bytes

    def to_token(self) -> str:
        """The canonical text stored as the device's push token."""
        keys = {"p256dh": b64url(self.p256dh), "auth": b64url(self.auth)}
        return json.dumps({"endpoint": self.endpoint, "keys": keys}, separators=(",", ":"))

    @classmethod
    def from_token(cls, token: str) -> WebPushSubscription:
        """Read back a stored token (its keys are validated again).

        Raises:
            SubscriptionError: The text is not a stored subscription.
        """
        try:
            data = json.loads(token)
        except ValueError:
            raise SubscriptionError("not a Web Push subscription") from None
        if not isinstance(data, dict) or not isinstance(data.get("endpoint"), str):
            raise SubscriptionError("not a Web Push subscription")
        p256dh, auth = _keys(data.get("keys"))
        return cls(data["endpoint"], p256dh, auth)


def b64url(data: bytes) -> str:
    """Base64url without padding, as browsers and RFC 8292 write keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url, with or without padding.

    Raises:
        ValueError: The text is not base64url.
    """
    if not _B64URL.match(text):
        raise ValueError("not base64url")
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None


def is_loopback(host: str) -> bool:
    """Whether `host` (lower-case, without brackets) names this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """The `[push.webpush] allowed_hosts` rule: which endpoints the gateway may post to.

    Args:
        entries: Host names, ``*.`` wildcards (at least two labels below the star), or
            loopback hosts.

    Raises:
        SubscriptionError: An entry is malformed, a bare or too wide wildcard, or a
            non-loopback IP address; the message names the entry.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.exact: frozenset[str] = frozenset()
        self.suffixes: tuple[str, ...] = ()
        exact: set[str] = set()
        suffixes: list[str] = []
        for entry in entries:
            host = entry.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
            if host.startswith("*."):
                base = host[2:]
                if not _is_name(base) or "." not in base:
                    raise SubscriptionError(
                        f"{entry!r}: a wildcard needs a domain of two or more labels "
                        f"(*.example.com)"
                    )
                suffixes.append("." + base)
            elif is_loopback(host) or _is_name(host):
                exact.add(host)
            else:
                raise SubscriptionError(
                    f"{entry!r}: not a host name (IP addresses other than loopback are "
                    f"not push services)"
                )
        self.exact = frozenset(exact)
        self.suffixes = tuple(suffixes)

    def check(self, endpoint: str) -> httpx.URL:
        """The parsed endpoint, if the gateway may post to it.

        Raises:
            SubscriptionError: It may not; the message says why without repeating the URL.
        """
        if not endpoint.isascii() or len(endpoint) > MAX_ENDPOINT_BYTES:
            raise SubscriptionError(f"must be an ASCII URL of at most {MAX_ENDPOINT_BYTES} bytes")
        try:
            url = httpx.URL(endpoint)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise SubscriptionError("not a URL") from None
        if url.scheme not in ("https", "http"):
            raise SubscriptionError("must be an https:// URL")
        if url.userinfo:
            raise SubscriptionError("must not carry user info")
        host = url.raw_host.decode("ascii", "replace").lower()
        if not host:
            raise SubscriptionError("has no host")
        if host.endswith("."):  # browsers never send one; it would change the VAPID audience
            raise SubscriptionError("the host must not end with a dot")
        if is_loopback(host):
            if host not in self.exact:
                raise SubscriptionError("loopback push services are not allowed here")
            return url
        if not _is_name(host):
            raise SubscriptionError("the host must be a push service's name, not an address")
        if not self.allows_name(host):
            raise SubscriptionError("the host is not an allowed push service")
        if url.scheme != "https":
            raise SubscriptionError("must be an https:// URL")
        if url.port not in (None, 443):
            raise SubscriptionError("must use the standard https port")
        return url

    def allows_name(self, host: str) -> bool:
        """Whether a (non-loopback) host name is listed, exactly or under a wildcard."""
        return host in self.exact or any(
            host.endswith(suffix) and len(host) > len(suffix) for suffix in self.suffixes
        )


def parse_subscription(value: Any, hosts: HostPolicy) -> WebPushSubscription:
    """Validate a device's ``subscription`` map.

    Args:
        value: ``{"endpoint": URL, "keys": {"p256dh": B64URL, "auth": B64URL}}``.
        hosts: The allowed push services.

    Returns:
        The subscription, with the endpoint as given and the keys decoded.

    Raises:
        SubscriptionError: Anything is missing, ill-typed, not allowed or not a key; the
            message names the field.
    """
    if not isinstance(value, dict):
        raise SubscriptionError("'subscription' must be a map with 'endpoint' and 'keys'")
    endpoint = value.get("endpoint")
    if not isinstance(endpoint, str):
        raise SubscriptionError("'subscription.endpoint' must be text")
    try:
        hosts.check(endpoint)
    except SubscriptionError as exc:
        raise SubscriptionError(f"'subscription.endpoint' {exc}") from None
    p256dh, auth = _keys(value.get("keys"))
    return WebPushSubscription(endpoint, p256dh, auth)


def _keys(keys: Any) -> tuple[bytes, bytes]:
    if not isinstance(keys, dict):
        raise SubscriptionError("'subscription.keys' must be a map with 'p256dh' and 'auth'")
    p256dh = _b64_field(keys, "p256dh")
    if len(p256dh) != P256DH_BYTES or p256dh[0] != 0x04:
        raise SubscriptionError(
            "'subscription.keys.p256dh' must be an uncompressed P-256 point (65 bytes)"
        )
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except ValueError:
        raise SubscriptionError("'subscription.keys.p256dh' is not a point on P-256") from None
    auth = _b64_field(keys, "auth")
    if len(auth) != AUTH_BYTES:
        raise SubscriptionError(f"'subscription.keys.auth' must be {AUTH_BYTES} bytes")
    return p256dh, auth


def _b64_field(keys: dict[str, Any], name: str) -> bytes:
    text = keys.get(name)
    if not isinstance(text, str) or len(text) > 256:
        raise SubscriptionError(f"'subscription.keys.{name}' must be base64url text")
    try:
        return b64url_decode(text)
    except ValueError:
        raise SubscriptionError(f"'subscription.keys.{name}' must be base64url text") from None


def _is_name(host: str) -> bool:
    labels = host.split(".")
    return (
        len(host) <= 253
        and all(_LABEL.match(label) for label in labels)
        and bool(_TLD.match(labels[-1]))
    )

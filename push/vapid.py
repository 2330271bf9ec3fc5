"""VAPID (RFC 8292): the gateway's P-256 key and the signed JWTs that identify it.

Every Web Push request carries ``Authorization: vapid t=JWT, k=PUBLIC_KEY``. The JWT is
ES256-signed, names the push service's origin as `aud` and the operator's contact
(`subject`, a ``mailto:`` or ``https:`` URL) as `sub`, and expires within 24 hours. A
subscription is bound to the public key the web app subscribed with, which the admin API
serves (``GET /v1/webpush/vapid-public-key``).

Tokens are cached per origin and re-signed once they have less than `RENEW_BEFORE` left
to live, so a busy gateway signs about once an hour per push service, and a token in use
always has hours to spare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from push.errors import CredentialsError
from push.subscription import b64url

# 12 hours: well inside RFC 8292's 24-hour ceiling, so a push service whose clock runs
# hours ahead still accepts it; re-signed after one hour of use.
TOKEN_LIFETIME = 12 * 3600
RENEW_BEFORE = 11 * 3600


def load_private_key(
    path: Path, *, key: str = "[push.webpush] vapid_private_key_file"
) -> ec.EllipticCurvePrivateKey:
    """Read a PEM file holding a P-256 private key (PKCS#8 or SEC1 "EC PRIVATE KEY").

    Raises:
        CredentialsError: The file is unreadable, not a PEM private key, or not P-256;
            the message names `key` and the file.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{key}: cannot read {path}: {exc.strerror}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CredentialsError(f"{key}: {path} is not an unencrypted PEM private key") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
        private.curve, ec.SECP256R1
    ):
        raise CredentialsError(f"{key}: {path} is not a P-256 (prime256v1) key")
    return private


def public_key_b64(private: ec.EllipticCurvePrivateKey) -> str:
    """The application server key as web apps pass it to `pushManager.subscribe`."""
    raw = private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return b64url(raw)


def generate_key_pem() -> tuple[bytes, bytes]:
    """A new P-256 key pair: (private key PEM in PKCS#8, public key PEM)."""
    private = ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


@dataclass
class VapidSigner:
    """Signs and caches the VAPID ``Authorization`` header value per push-service origin.

    Args:
        private_key: The gateway's P-256 key.
        subject: The `sub` claim: ``mailto:ops@example.com`` or an ``https:`` URL.
    """

    private_key: ec.EllipticCurvePrivateKey
    subject: str
    public_key: str = field(init=False)
    _cache: dict[str, tuple[float, str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.public_key = public_key_b64(self.private_key)

    def authorization(self, origin: str, now: float) -> str:
        """The ``Authorization`` header for requests to `origin` at wall-clock `now` (s)."""
        cached = self._cache.get(origin)
        if cached is not None and cached[0] - now > RENEW_BEFORE:
            return cached[1]
        expires = int(now) + TOKEN_LIFETIME
        claims = {"aud": origin, "exp": expires, "sub": self.subject}
        token = jwt.encode(claims, self.private_key, algorithm="ES256", headers={"typ": "JWT"})
        value = f"vapid t={token}, k={self.public_key}"
        if len(self._cache) > 1000:  # origins are a handful of push services
            self._cache.clear()
        self._cache[origin] = (expires, value)
        return value

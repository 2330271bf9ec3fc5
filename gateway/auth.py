"""`hello` tokens: JWT verification (HS256, ES256 or RS256) and development token minting."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from gateway.errors import AuthError, ConfigError
from gateway.frames import MAX_DEVICE_BYTES, MAX_USER_BYTES
from gateway.settings import AuthSettings

# Small clock skew between the token issuer and this host is normal on phones' backends.
LEEWAY_SECONDS = 30
# Tokens verified recently, kept so that a device reconnecting with the same token is
# not verified again (a signature check is the costliest step of a reconnect, and far
# costlier with ES256 or RS256). The oldest are forgotten first past this many.
VERIFIED_CACHE = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user: str
    device: str
    expires: int
    issued_at: int | None = None  # the `iat` claim (seconds), when the token has one


class TokenVerifier:
    """Verifies `hello` tokens with exactly one configured algorithm.

    Only that algorithm is accepted, so ``alg: none`` and HS/RS key confusion are refused
    by construction. A token that verified once is remembered (the exact string, so its
    signature with it) and only its expiry is checked again.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.algorithm = settings.jwt_algorithm
        if self.algorithm == "HS256":
            self._key: str | bytes = settings.jwt_secret
        else:
            assert settings.jwt_public_key_file is not None
            try:
                self._key = settings.jwt_public_key_file.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"[auth] jwt_public_key_file: cannot read {settings.jwt_public_key_file}: "
                    f"{exc.strerror}"
                ) from None
        self._verified: dict[str, Identity] = {}

    def verify(self, token: str) -> Identity:
        """Check a token's signature, expiry and claims.

        Raises:
            AuthError: For any problem; the message is for logs, never for the client.
        """
        identity = self._verified.get(token)
        if identity is None:
            identity = self._verify(token)
            if len(self._verified) >= VERIFIED_CACHE:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = identity
        elif identity.expires + LEEWAY_SECONDS <= time.time():
            del self._verified[token]
            raise AuthError("ExpiredSignatureError")
        return identity

    def _verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                options={"require": ["sub", "dev", "exp"]},
                leeway=LEEWAY_SECONDS,
            )
        except jwt.PyJWTError as exc:
            raise AuthError(type(exc).__name__) from None
        user, device, exp = claims["sub"], claims["dev"], claims["exp"]
        if not (isinstance(user, str) and 0 < len(user.encode()) <= MAX_USER_BYTES):
            raise AuthError("bad sub claim")
        if not (isinstance(device, str) and 0 < len(device.encode()) <= MAX_DEVICE_BYTES):
            raise AuthError("bad dev claim")
        iat = claims.get("iat")
        issued_at = (
            int(iat) if isinstance(iat, (int, float)) and not isinstance(iat, bool) else None
        )
        return Identity(user, device, int(exp), issued_at)


def mint_token(settings: AuthSettings, user: str, device: str, ttl: int | None = None) -> str:
    """Sign a token for (user, device), valid for `ttl` seconds (default `token_ttl`).

    With HS256 this uses `jwt_secret`; with ES256/RS256 it needs `jwt_private_key_file`.

    Raises:
        ConfigError: The private key needed for an asymmetric algorithm is not configured.
    """
    ttl = settings.token_ttl if ttl is None else ttl
    if ttl <= 0:
        raise ConfigError(f"token lifetime must be positive, not {ttl}")
    now = int(time.time())
    claims = {"sub": user, "dev": device, "iat": now, "exp": now + ttl}
    if settings.jwt_algorithm == "HS256":
        return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
    if settings.jwt_private_key_file is None:
        raise ConfigError(
            f"[auth] jwt_private_key_file is needed to mint {settings.jwt_algorithm} tokens"
        )
    key = settings.jwt_private_key_file.read_bytes()
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithm)

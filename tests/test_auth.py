"""`hello` tokens: only the configured algorithm and key, with sub, dev and exp claims."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth import LEEWAY_SECONDS, Identity, TokenVerifier, mint_token
from gateway.errors import AuthError, ConfigError
from gateway.settings import AuthSettings

SECRET = "test-secret-of-a-reasonable-length-0123456789"


@pytest.fixture
def hs256() -> AuthSettings:
    return AuthSettings(jwt_secret=SECRET)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "dev": "phone", "exp": int(time.time()) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def rejects(settings: AuthSettings, token: str) -> None:
    with pytest.raises(AuthError):
        TokenVerifier(settings).verify(token)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_keys(tmp_path: Path, algorithm: str, name: str = "jwt") -> AuthSettings:
    """Generate a key pair into tmp_path; return settings for that algorithm."""
    if algorithm == "ES256":
        private: Any = ec.generate_private_key(ec.SECP256R1())
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_file = tmp_path / f"{name}.key"
    public_file = tmp_path / f"{name}.pub"
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return AuthSettings(
        jwt_algorithm=algorithm,
        jwt_public_key_file=public_file,
        jwt_private_key_file=private_file,
    )


# -- HS256 ---------------------------------------------------------------------------------


def test_a_valid_hs256_token_gives_the_identity(hs256):
    payload = claims()

    identity = TokenVerifier(hs256).verify(hs_token(payload))

    assert identity == Identity("alice", "phone", payload["exp"])


def test_mint_token_round_trips_through_the_verifier(hs256):
    identity = TokenVerifier(hs256).verify(mint_token(hs256, "bob", "tablet", ttl=60))

    assert (identity.user, identity.device) == ("bob", "tablet")
    assert identity.expires == pytest.approx(time.time() + 60, abs=5)


def test_an_expired_token_is_rejected(hs256):
    rejects(hs256, hs_token(claims(exp=int(time.time()) - LEEWAY_SECONDS - 60)))


def test_a_token_expired_within_the_leeway_is_accepted(hs256):
    exp = int(time.time()) - LEEWAY_SECONDS // 2

    assert TokenVerifier(hs256).verify(hs_token(claims(exp=exp))).expires == exp


def test_a_token_signed_with_another_secret_is_rejected(hs256):
    rejects(hs256, hs_token(claims(), secret="some-other-secret-of-a-reasonable-length"))


def test_a_tampered_payload_is_rejected(hs256):
    header, _, signature = hs_token(claims()).split(".")
    forged = b64url(json.dumps(claims(sub="mallory")).encode())

    rejects(hs256, f"{header}.{forged}.{signature}")


def test_an_unsigned_alg_none_token_is_rejected(hs256):
    token = jwt.encode(claims(), None, algorithm="none")

    rejects(hs256, token)


def test_an_alg_none_token_with_the_signature_stripped_is_rejected(hs256):
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())

    rejects(hs256, f"{header}.{payload}.")


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "....", "é.é.é"])
def test_garbage_is_rejected(hs256, token):
    rejects(hs256, token)


@pytest.mark.parametrize("missing", ["sub", "dev", "exp"])
def test_each_required_claim_must_be_present(hs256, missing):
    payload = claims()
    del payload[missing]

    rejects(hs256, hs_token(payload))


@pytest.mark.parametrize(
    "override",
    [
        {"sub": ""},
        {"sub": "u" * 129},
        {"sub": "€" * 43},  # 129 bytes of UTF-8 in 43 characters
        {"sub": 42},
        {"dev": ""},
        {"dev": "d" * 65},
        {"dev": "é" * 33},  # 66 bytes of UTF-8 in 33 characters
        {"dev": ["phone"]},
        {"exp": "tomorrow"},
    ],
    ids=[
        "empty-sub",
        "129-byte-sub",
        "129-utf8-byte-sub",
        "int-sub",
        "empty-dev",
        "65-byte-dev",
        "66-utf8-byte-dev",
        "list-dev",
        "text-exp",
    ],
)
def test_ill_formed_claims_are_rejected(hs256, override):
    rejects(hs256, hs_token(claims(**override)))


def test_claims_at_their_size_limits_are_accepted(hs256):
    identity = TokenVerifier(hs256).verify(hs_token(claims(sub="u" * 128, dev="d" * 64)))

    assert (len(identity.user), len(identity.device)) == (128, 64)


# -- ES256 and RS256 -----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_an_asymmetric_token_is_accepted_with_the_public_key(tmp_path, algorithm):
    settings = write_keys(tmp_path, algorithm)

    identity = TokenVerifier(settings).verify(mint_token(settings, "alice", "phone", ttl=60))

    assert (identity.user, identity.device) == ("alice", "phone")


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_a_token_signed_by_another_key_pair_is_rejected(tmp_path, algorithm):
    trusted = write_keys(tmp_path, algorithm, "trusted")
    attacker = write_keys(tmp_path, algorithm, "attacker")

    rejects(trusted, mint_token(attacker, "alice", "phone"))


def test_a_token_of_another_algorithm_is_rejected(tmp_path, hs256):
    es256 = write_keys(tmp_path, "ES256", "ec")
    rs256 = write_keys(tmp_path, "RS256", "rsa")

    rejects(rs256, mint_token(es256, "alice", "phone"))
    rejects(es256, mint_token(rs256, "alice", "phone"))
    rejects(hs256, mint_token(rs256, "alice", "phone"))


def test_an_hs256_token_keyed_with_the_rsa_public_key_is_rejected(tmp_path):
    # The classic key-confusion attack: the public key is public, so an attacker can HMAC
    # with it; a verifier that let the token pick the algorithm would accept this.
    rs256 = write_keys(tmp_path, "RS256")
    assert rs256.jwt_public_key_file is not None
    public_pem = rs256.jwt_public_key_file.read_bytes()
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()

    rejects(rs256, f"{header}.{payload}.{b64url(mac)}")


def test_an_unreadable_public_key_is_a_config_error(tmp_path):
    settings = AuthSettings(jwt_algorithm="ES256", jwt_public_key_file=tmp_path / "absent.pub")

    with pytest.raises(ConfigError, match="jwt_public_key_file"):
        TokenVerifier(settings)


def test_minting_an_asymmetric_token_needs_the_private_key(tmp_path):
    settings = write_keys(tmp_path, "ES256")
    public_only = AuthSettings(
        jwt_algorithm="ES256", jwt_public_key_file=settings.jwt_public_key_file
    )

    with pytest.raises(ConfigError, match="jwt_private_key_file"):
        mint_token(public_only, "alice", "phone")


def test_a_token_seen_before_is_not_verified_again_but_still_expires(hs256, monkeypatch):
    verifier = TokenVerifier(hs256)
    exp = int(time.time()) + 60
    token = hs_token(claims(exp=exp))
    decoded: list[str] = []
    decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **kw: decoded.append("x") or decode(*a, **kw))
    assert verifier.verify(token) == verifier.verify(token)
    assert decoded == ["x"]
    later = exp + LEEWAY_SECONDS + 1
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(AuthError):
        verifier.verify(token)


def test_a_token_refused_once_is_refused_again(hs256):
    verifier = TokenVerifier(hs256)
    forged = hs_token(claims(), secret="some-other-secret-of-a-reasonable-length")
    for _ in range(2):
        with pytest.raises(AuthError):
            verifier.verify(forged)

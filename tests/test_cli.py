"""The `gateway` command, run in-process: `check-config` and `token`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth import TokenVerifier
from gateway.cli import main
from gateway.errors import AuthError
from gateway.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The CLI reads GATEWAY__ overrides from the real environment; start from none."""
    for name in list(os.environ):
        if name.startswith("GATEWAY__"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- check-config --------------------------------------------------------------------------


def test_check_config_accepts_a_valid_file(tmp_path, capsys):
    path = write(tmp_path / "gateway.toml", "[server]\nport = 9000\n")

    status = main(["check-config", str(path)])

    out, err = capsys.readouterr()
    assert status == 0
    assert "OK" in out and str(path) in out
    assert err == ""


def test_check_config_never_prints_the_redis_password(tmp_path, capsys):
    path = write(
        tmp_path / "gateway.toml",
        '[store]\nbackend = "redis"\nredis_url = "redis://gw:s3cret-pw@10.0.0.5:6379/0"\n',
    )

    status = main(["check-config", str(path)])

    out, _ = capsys.readouterr()
    assert status == 0
    assert "s3cret-pw" not in out
    assert "redis://***@10.0.0.5:6379/0" in out


def test_check_config_reports_a_bad_key_with_file_and_key(tmp_path, capsys):
    path = write(tmp_path / "gateway.toml", "[server]\nprot = 9000\n")

    status = main(["check-config", str(path)])

    out, err = capsys.readouterr()
    assert status == 2
    assert "OK" not in out
    assert str(path) in err and "[server] prot" in err


def test_check_config_reports_a_wrong_type_with_file_and_key(tmp_path, capsys):
    path = write(tmp_path / "gateway.toml", "[push]\nlinger = 'soon'\n")

    assert main(["check-config", str(path)]) == 2

    err = capsys.readouterr().err
    assert str(path) in err and "[push] linger" in err


def test_check_config_reports_a_missing_file(tmp_path, capsys):
    path = tmp_path / "absent.toml"

    assert main(["check-config", str(path)]) == 2

    err = capsys.readouterr().err
    assert str(path) in err and "not found" in err


def test_check_config_sees_environment_overrides(tmp_path, capsys, monkeypatch):
    path = write(tmp_path / "gateway.toml", "")
    monkeypatch.setenv("GATEWAY__SERVER__PORT", "not-a-port")

    assert main(["check-config", str(path)]) == 2

    assert "GATEWAY__SERVER__PORT" in capsys.readouterr().err


def test_check_config_needs_a_file(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check-config"])

    assert info.value.code == 2


# -- token ---------------------------------------------------------------------------------


def test_token_prints_a_jwt_the_verifier_accepts(capsys):
    status = main(["token", "--user", "u", "--device", "d"])

    out = capsys.readouterr().out
    assert status == 0
    token = out.strip()
    assert out == token + "\n"
    identity = TokenVerifier(Settings().auth).verify(token)
    assert (identity.user, identity.device) == ("u", "d")
    assert identity.expires == pytest.approx(time.time() + Settings().auth.token_ttl, abs=60)


def test_token_honours_ttl(capsys):
    assert main(["token", "--user", "u", "--device", "d", "--ttl", "120"]) == 0

    identity = TokenVerifier(Settings().auth).verify(capsys.readouterr().out.strip())
    assert identity.expires == pytest.approx(time.time() + 120, abs=30)


def test_token_uses_the_configured_secret(tmp_path, capsys):
    path = write(
        tmp_path / "gateway.toml",
        "[auth]\njwt_secret = 'a-production-secret-at-least-32-bytes-long'\n",
    )

    assert main(["token", "--user", "u", "--device", "d", "--config", str(path)]) == 0

    token = capsys.readouterr().out.strip()
    assert TokenVerifier(load_settings(path, env={}).auth).verify(token).user == "u"
    with pytest.raises(AuthError):
        TokenVerifier(Settings().auth).verify(token)


def test_token_signs_with_the_configured_private_key(tmp_path, capsys):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "jwt.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "jwt.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    path = write(
        tmp_path / "gateway.toml",
        "[auth]\njwt_algorithm = 'ES256'\n"
        "jwt_public_key_file = 'jwt.pub'\njwt_private_key_file = 'jwt.key'\n",
    )

    assert main(["token", "--user", "u", "--device", "d", "--config", str(path)]) == 0

    token = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert TokenVerifier(load_settings(path, env={}).auth).verify(token).device == "d"


def test_token_without_a_private_key_for_an_asymmetric_algorithm_fails(tmp_path, capsys):
    write(tmp_path / "jwt.pub", "placeholder")
    path = write(
        tmp_path / "gateway.toml",
        "[auth]\njwt_algorithm = 'RS256'\njwt_public_key_file = 'jwt.pub'\n",
    )

    status = main(["token", "--user", "u", "--device", "d", "--config", str(path)])

    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert "jwt_private_key_file" in err


def test_token_with_a_bad_config_fails_naming_the_key(tmp_path, capsys):
    path = write(tmp_path / "gateway.toml", "[auth]\njwt_algorithm = 'none'\n")

    assert main(["token", "--user", "u", "--device", "d", "--config", str(path)]) == 2

    err = capsys.readouterr().err
    assert str(path) in err and "[auth] jwt_algorithm" in err


@pytest.mark.parametrize("argv", [["token", "--user", "u"], ["token", "--device", "d"], []])
def test_missing_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)

    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


# -- webpush-keygen ------------------------------------------------------------------------


def test_webpush_keygen_writes_a_key_pair_that_check_config_accepts(tmp_path, capsys):
    private = tmp_path / "keys" / "vapid.pem"
    private.parent.mkdir()

    assert main(["webpush-keygen", "--out", str(private)]) == 0

    out = capsys.readouterr().out
    assert private.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    public = serialization.load_pem_public_key((tmp_path / "keys" / "vapid.pub.pem").read_bytes())
    assert public.public_numbers() == key.public_key().public_numbers()
    raw = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    import base64

    assert base64.urlsafe_b64encode(raw).rstrip(b"=").decode() in out
    path = write(
        tmp_path / "gateway.toml",
        '[push.webpush]\nvapid_private_key_file = "keys/vapid.pem"\n'
        'subject = "mailto:ops@example.com"\n',
    )
    assert main(["check-config", str(path)]) == 0
    assert "push: webpush" in capsys.readouterr().out


def test_webpush_keygen_never_overwrites_without_force(tmp_path, capsys):
    private = tmp_path / "vapid.pem"
    private.write_text("keep me")

    assert main(["webpush-keygen", "--out", str(private)]) == 1
    assert "exists" in capsys.readouterr().err and private.read_text() == "keep me"
    assert main(["webpush-keygen", "--out", str(private), "--force"]) == 0
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_check_config_names_an_unusable_vapid_key(tmp_path, capsys):
    write(tmp_path / "vapid.pem", "not a key")
    path = write(
        tmp_path / "gateway.toml",
        '[push.webpush]\nvapid_private_key_file = "vapid.pem"\nsubject = "mailto:a@b.example"\n',
    )

    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[push.webpush] vapid_private_key_file" in err and "vapid.pem" in err

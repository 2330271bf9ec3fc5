"""The three ways to point the simulator at a gateway, and the fakes each one needs.

- **Default:** fresh fake credentials, a configuration written for the run, a gateway
  process started on it.
- **``--config FILE``** (a staging configuration, possibly with real push credentials):
  the simulator starts the gateway on FILE, overriding only what a loopback simulation
  must change (``GATEWAY__*`` variables: listener, SQLite file, push endpoints and CA, push
  timing). The fake APNs verifies the gateway's provider tokens with the public half of
  FILE's ``.p8`` key, its key id and team id; the fake FCM verifies OAuth assertions with
  the public half of FILE's service-account key. Nothing is sent to Apple or Google.
- **``--url URL --config FILE``**: a gateway already running on FILE. FILE must point its
  push endpoints at this simulator's fakes, so it must come from ``--write-config DIR``,
  which writes fake credentials (with the CA's key, so that the fake APNs can serve TLS
  again on the next run) and a gateway configuration that uses them.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.errors import ConfigError
from gateway.settings import Settings
from push.errors import CredentialsError
from push.vapid import load_private_key
from scripts.fakes import FakeApns, FakeFcm
from scripts.fakes.credentials import CertificateAuthority
from scripts.simulator.gateway_config import rules_env, scenario_config
from scripts.simulator.knobs import PushRules, Scenario
from scripts.simulator.ledger import Ledger
from scripts.simulator.push_relay import PROJECT, PushRelay

CA_KEY = "ca-key.pem"
_PEM = serialization.Encoding.PEM
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class SetupError(ConfigError):
    """The requested set-up cannot work; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Ports:
    """Where the fakes listen (0: any free port)."""

    apns: int = 0
    fcm: int = 0


def staging_relay(
    settings: Settings, source: str, ledger: Ledger, scenario: Scenario, directory: Path
) -> PushRelay:
    """Fakes that accept the credentials of a staging configuration (`staging_env` then
    points the gateway at them, once they serve).

    Raises:
        SetupError: FILE uses certificate auth for APNs, has no push credentials at all,
            or a key file that is not what it should be.
    """
    apns_settings, fcm_settings = settings.push.apns, settings.push.fcm
    if apns_settings.cert_file is not None and apns_settings.key_file is None:
        raise SetupError(
            f"{source}: [push.apns] cert_file: certificate auth cannot be simulated (the fake "
            "APNs can only verify certificates issued by its own CA); use token auth "
            "(key_file, key_id, team_id) for the staging run"
        )
    if apns_settings.key_file is None and fcm_settings.service_account_file is None:
        raise SetupError(
            f"{source}: no [push.apns] key_file and no [push.fcm] service_account_file: "
            "nothing would wake the simulated phones"
        )
    vapid_key = _vapid_key(settings, source, scenario)
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create("simulator APNs CA")
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    apns = FakeApns(
        ca,
        public_key=None
        if apns_settings.key_file is None
        else _public_key(apns_settings.key_file, f"{source}: [push.apns] key_file", ec),
        key_id=apns_settings.key_id or "",
        team_id=apns_settings.team_id or "",
    )
    apns.files = {"ca_file": directory / "ca.pem"}
    fcm = FakeFcm(project_id=fcm_settings.project_id or PROJECT)
    if fcm_settings.service_account_file is not None:
        info = _service_account(fcm_settings.service_account_file, source)
        fcm = FakeFcm(project_id=fcm_settings.project_id or str(info["project_id"]))
        fcm.public_key = _public_key_pem(
            str(info["private_key"]).encode(), f"{source}: [push.fcm] service_account_file", rsa
        )
        fcm.service_account = directory / "service-account.json"
    return PushRelay(ledger, scenario, apns, fcm, vapid_key_file=vapid_key)


def staging_env(
    relay: PushRelay, settings: Settings, source: str, port: int, directory: Path,
    rules: PushRules,
) -> dict[str, str]:  # fmt: skip
    """The ``GATEWAY__*`` overrides for a gateway started on a staging file (the relay
    must be serving, so that its ports are known)."""
    env = {
        "GATEWAY__SERVER__HOST": "127.0.0.1",
        "GATEWAY__SERVER__PORT": str(port),
        "GATEWAY__SERVER__TLS_CERT": "",  # the simulated phones speak ws:// on loopback
        "GATEWAY__SERVER__TLS_KEY": "",
        "GATEWAY__SERVER__DRAIN_SECONDS": "0.5",  # the run is over: stop quickly
        "GATEWAY__ADMIN__PORT": "0",  # any free port
        **rules_env(rules),
    }
    if settings.store.backend == "sqlite":
        env["GATEWAY__STORE__PATH"] = str(directory / "gateway.db")
    if settings.push.apns.key_file is not None:
        env["GATEWAY__PUSH__APNS__ENDPOINT"] = relay.apns.endpoint
        env["GATEWAY__PUSH__APNS__CA_FILE"] = str(relay.apns.files["ca_file"])
    fcm_settings = settings.push.fcm
    if fcm_settings.service_account_file is not None and relay.fcm.service_account is not None:
        # A copy whose token_uri is the fake's: google-auth posts its assertion there.
        info = _service_account(fcm_settings.service_account_file, source)
        info["token_uri"] = relay.fcm.token_uri
        copy = relay.fcm.service_account
        copy.touch(mode=0o600)
        copy.write_text(json.dumps(info))
        env["GATEWAY__PUSH__FCM__SERVICE_ACCOUNT_FILE"] = str(copy)
        env["GATEWAY__PUSH__FCM__ENDPOINT"] = relay.fcm.url
    if relay.scenario.web_share > 0:  # the fake Web Push only: nothing reaches a browser's
        env["GATEWAY__PUSH__WEBPUSH__ALLOWED_HOSTS"] = "127.0.0.1"
    return env


def running_relay(
    settings: Settings, source: str, ledger: Ledger, scenario: Scenario
) -> tuple[PushRelay, Ports]:
    """Fakes that stand in for the ones a running gateway (on `source`) pushes to.

    Raises:
        SetupError: `source` was not written by ``--write-config``: its push endpoints are
            not this simulator's fakes on loopback.
    """
    apns_settings, fcm_settings = settings.push.apns, settings.push.fcm
    hint = (
        "start the gateway on a configuration written by "
        "`simulate_idle_devices.py --write-config DIR` (DIR/gateway.toml)"
    )
    if (
        apns_settings.key_file is None
        or apns_settings.ca_file is None
        or fcm_settings.service_account_file is None
    ):
        raise SetupError(f"{source}: the gateway must push to the simulator's fakes; {hint}")
    vapid_key = _vapid_key(settings, source, scenario, hint)
    if vapid_key is not None and "127.0.0.1" not in settings.push.webpush.allowed_hosts:
        raise SetupError(
            f"{source}: [push.webpush] allowed_hosts must list 127.0.0.1 for --web-share; {hint}"
        )
    ca_key = apns_settings.ca_file.parent / CA_KEY
    if not ca_key.is_file():
        raise SetupError(f"{source}: no {CA_KEY} beside [push.apns] ca_file; {hint}")
    apns_port = _loopback_port(apns_settings.endpoint, f"{source}: [push.apns] endpoint", hint)
    fcm_port = _loopback_port(fcm_settings.endpoint, f"{source}: [push.fcm] endpoint", hint)
    key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SetupError(f"{ca_key}: not the simulator's CA key; {hint}")
    ca = CertificateAuthority(key, _load_cert(apns_settings.ca_file))
    apns = FakeApns(
        ca,
        public_key=_public_key(apns_settings.key_file, f"{source}: [push.apns] key_file", ec),
        key_id=apns_settings.key_id or "",
        team_id=apns_settings.team_id or "",
    )
    apns.files = {"ca_file": apns_settings.ca_file, "key_file": apns_settings.key_file}
    info = _service_account(fcm_settings.service_account_file, source)
    fcm = FakeFcm(project_id=fcm_settings.project_id or str(info["project_id"]))
    fcm.public_key = _public_key_pem(
        str(info["private_key"]).encode(), f"{source}: [push.fcm] service_account_file", rsa
    )
    fcm.service_account = fcm_settings.service_account_file
    relay = PushRelay(ledger, scenario, apns, fcm, vapid_key_file=vapid_key)
    return relay, Ports(apns_port, fcm_port)


def write_config_dir(
    directory: Path, *, gateway_port: int, ports: Ports, rules: PushRules, scenario: Scenario
) -> Path:
    """Write fake credentials and a gateway configuration that pushes to the simulator's
    fakes on fixed ports; return the configuration's path."""
    directory.mkdir(parents=True, exist_ok=True)
    relay = PushRelay.create(Ledger(), scenario, directory)
    (directory / CA_KEY).touch(mode=0o600)
    (directory / CA_KEY).write_bytes(
        relay.apns.ca.key.private_bytes(
            _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    relay.apns.port = ports.apns
    relay.fcm.port = ports.fcm
    relay.fcm.write_service_account(directory / "service-account.json")
    relay.write_vapid_key(directory / "vapid-private.pem")
    return scenario_config(
        directory / "gateway.toml",
        port=gateway_port,
        database=directory / "gateway.db",
        jwt_secret=secrets.token_hex(32),
        rules=rules,
        push_toml=relay.gateway_push_toml(),
    )


def _vapid_key(settings: Settings, source: str, scenario: Scenario, hint: str = "") -> Path | None:
    """The configuration's VAPID key when the fleet has browsers (None without them).

    Raises:
        SetupError: Browsers are asked for and the file has no usable key.
    """
    if scenario.web_share <= 0:
        return None
    path = settings.push.webpush.vapid_private_key_file
    if path is None:
        more = f"; {hint}" if hint else " (make one with `gateway webpush-keygen`)"
        raise SetupError(f"{source}: --web-share needs [push.webpush] vapid_private_key_file{more}")
    try:
        load_private_key(path)
    except CredentialsError as exc:
        raise SetupError(f"{source}: {exc}") from None
    return path


def _loopback_port(url: str | None, where: str, hint: str) -> int:
    parts = urllib.parse.urlsplit(url or "")
    if parts.hostname not in ("127.0.0.1", "localhost") or not parts.port:
        raise SetupError(f"{where}: {url!r} is not a loopback endpoint with a port; {hint}")
    return parts.port


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path}: not a PEM certificate ({exc})") from None


def _service_account(path: Path, source: str) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SetupError(f"{source}: [push.fcm] service_account_file: {exc}") from None
    if not isinstance(info, dict) or "private_key" not in info or "project_id" not in info:
        raise SetupError(f"{source}: [push.fcm] service_account_file: not a service account")
    return info


def _public_key(path: Path, where: str, kind: object) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SetupError(f"{where}: {exc.strerror}") from None
    return _public_key_pem(data, where, kind)


def _public_key_pem(data: bytes, where: str, kind: object) -> bytes:
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as exc:
        raise SetupError(f"{where}: not a PEM private key ({exc})") from None
    expected = ec.EllipticCurvePrivateKey if kind is ec else rsa.RSAPrivateKey
    if not isinstance(key, expected):
        raise SetupError(f"{where}: not an {'EC' if kind is ec else 'RSA'} private key")
    return key.public_key().public_bytes(_PEM, _SPKI)

"""Throw-away keys and certificates for the fake push services, made with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

_PEM = serialization.Encoding.PEM
_PKCS8 = serialization.PrivateFormat.PKCS8
_NO_PASSWORD = serialization.NoEncryption()


def _name(common_name: str, uid: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if uid is not None:
        attributes.append(x509.NameAttribute(NameOID.USER_ID, uid))
    return x509.Name(attributes)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(_PEM, _PKCS8, _NO_PASSWORD)


@dataclass
class CertificateAuthority:
    """A self-signed CA that issues the fake server's certificate and client certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "fake push CA") -> CertificateAuthority:
        """A new CA, valid for a day."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, for a client's trust store (`ca_file`)."""
        return self.cert.public_bytes(_PEM)

    def issue(
        self,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        uid: str | None = None,
        client: bool = False,
    ) -> tuple[bytes, bytes]:
        """A certificate and its key (both PEM) for a server's `hosts` or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, uid))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = (
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
            if client
            else (x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(_PEM), _key_pem(key)

    def server_context(
        self,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1"),
        *,
        client_certs: bool = False,
    ) -> ssl.SSLContext:
        """A TLS server context with a fresh certificate for `hosts`, offering h2 and
        HTTP/1.1, optionally asking for (and verifying) a client certificate."""
        import tempfile

        cert_pem, key_pem = self.issue("fake push server", hosts=hosts)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_file.write_bytes(cert_pem)
            key_file.write_bytes(key_pem)
            context.load_cert_chain(cert_file, key_file)
        context.set_alpn_protocols(["h2", "http/1.1"])
        if client_certs:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cadata=self.cert_pem.decode())
        return context


def make_p8(path: Path) -> bytes:
    """Write a new APNs-style ES256 signing key (.p8, PKCS#8 PEM); return its public key PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(_key_pem(key))
    return key.public_key().public_bytes(_PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_service_account(path: Path, token_uri: str, project_id: str) -> bytes:
    """Write a Google service-account file whose `token_uri` is `token_uri`; return the
    public key PEM that verifies its assertions."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info: dict[str, Any] = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "fake-key-1",
        "private_key": _key_pem(key).decode(),
        "client_email": f"gateway@{project_id}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info, indent=2))
    return key.public_key().public_bytes(_PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

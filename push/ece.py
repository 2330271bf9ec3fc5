"""Message encryption for Web Push: RFC 8291 keys over RFC 8188 ``aes128gcm``.

The application server (the gateway) makes a fresh P-256 key pair and salt for every
message, agrees a secret with the subscription's `p256dh` key (ECDH), mixes in the
subscription's `auth` secret, and encrypts the payload as one aes128gcm record. The body
starts with the header the browser needs to decrypt it:
``salt (16) || record size (4) || key id length (1) || the server's public key (65)``.

Built on `cryptography` (already a dependency for JWTs and TLS); the functions are pure
and tested against RFC 8291's Appendix A.
"""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

RECORD_SIZE = 4096  # RFC 8291 allows up to 4096 octets of payload per push
SALT_BYTES = 16
TAG_BYTES = 16
LAST_RECORD = b"\x02"  # RFC 8188: the delimiter of the final record
HEADER_BYTES = SALT_BYTES + 4 + 1 + 65


class DecryptionError(ValueError):
    """A body that does not decrypt with the given keys."""


def encrypt(
    plaintext: bytes,
    ua_public: bytes,
    auth_secret: bytes,
    *,
    salt: bytes | None = None,
    server_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """Encrypt `plaintext` for one subscription, as one aes128gcm record.

    Args:
        plaintext: At most ``RECORD_SIZE - 17`` bytes.
        ua_public: The subscription's `p256dh` key (65 bytes, uncompressed).
        auth_secret: The subscription's `auth` secret (16 bytes).
        salt: 16 random bytes; fixed only by tests.
        server_key: The ephemeral key pair; fixed only by tests.

    Returns:
        The request body: header, then the encrypted record.

    Raises:
        ValueError: The key is not a P-256 point or the plaintext is too long.
    """
    if len(plaintext) > RECORD_SIZE - TAG_BYTES - 1:
        raise ValueError("plaintext too long for one record")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    server_key = server_key or ec.generate_private_key(ec.SECP256R1())
    as_public = server_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
    shared = server_key.exchange(ec.ECDH(), peer)
    key, nonce = _derive(shared, auth_secret, ua_public, as_public, salt)
    record = AESGCM(key).encrypt(nonce, plaintext + LAST_RECORD, None)
    header = salt + struct.pack("!IB", RECORD_SIZE, len(as_public)) + as_public
    return header + record


def decrypt(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth_secret: bytes) -> bytes:
    """Decrypt a single-record aes128gcm body, as the browser does.

    Args:
        body: The request body.
        ua_private: The subscription's private key (held by the browser, or a test).
        auth_secret: The subscription's `auth` secret.

    Returns:
        The plaintext, padding and delimiter removed.

    Raises:
        DecryptionError: The header is malformed, the body has more than one record, or
            the record does not authenticate.
    """
    if len(body) < SALT_BYTES + 5:
        raise DecryptionError("body shorter than the aes128gcm header")
    salt = body[:SALT_BYTES]
    record_size, id_length = struct.unpack("!IB", body[SALT_BYTES : SALT_BYTES + 5])
    start = SALT_BYTES + 5 + id_length
    as_public = body[SALT_BYTES + 5 : start]
    record = body[start:]
    if len(record) > record_size or len(record) < TAG_BYTES + 1:
        raise DecryptionError("not exactly one record")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public)
    except ValueError:
        raise DecryptionError("the key id is not a P-256 public key") from None
    ua_public = ua_private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    shared = ua_private.exchange(ec.ECDH(), peer)
    key, nonce = _derive(shared, auth_secret, ua_public, as_public, salt)
    try:
        padded = AESGCM(key).decrypt(nonce, record, None)
    except Exception:  # cryptography's InvalidTag
        raise DecryptionError("the record does not authenticate") from None
    unpadded = padded.rstrip(b"\x00")
    if not unpadded.endswith(LAST_RECORD):
        raise DecryptionError("the record is not marked as the last one")
    return unpadded[:-1]


def _derive(
    shared: bytes, auth_secret: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """RFC 8291 section 3.4 then RFC 8188 section 2.2: the content key and nonce."""
    key_info = b"WebPush: info\x00" + ua_public + as_public
    ikm = _hkdf(auth_secret, shared, key_info, 32)
    key = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    return key, nonce


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)

"""Web Push pieces without a network: RFC 8291 encryption, subscriptions and the host
allow-list, VAPID, and the provider's requests and answers over httpx's MockTransport."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from push.ece import DecryptionError, decrypt, encrypt
from push.errors import CredentialsError
from push.notification import Notification, Outcome
from push.policy import WakeKind
from push.settings import DEFAULT_WEBPUSH_HOSTS, WebPushSettings
from push.store import PushToken
from push.subscription import (
    HostPolicy,
    SubscriptionError,
    WebPushSubscription,
    b64url,
    b64url_decode,
    parse_subscription,
)
from push.vapid import TOKEN_LIFETIME, VapidSigner, generate_key_pem, load_private_key
from push.webpush import WebPushProvider, classify, origin, topic_for

# RFC 8291, Appendix A.
PLAINTEXT = b"When I grow up, I want to be a watermelon"
AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
UA_PUBLIC = (
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
)
SALT = "DGv6ra1nlYgDCS1FRnbzlw"
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
BODY = (
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmY"
    "WAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSg"
    "Sxsj_Qulcy4a-fN"
)
FCM_ENDPOINT = "https://fcm.googleapis.com/fcm/send/dXJ0aGVyZQ:APA91bExample"
SUBJECT = "mailto:ops@example.com"


def _key(text: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b64url_decode(text), "big"), ec.SECP256R1())


def _public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


# -- encryption ------------------------------------------------------------------------------


def test_encryption_reproduces_rfc_8291_appendix_a() -> None:
    body = encrypt(
        PLAINTEXT,
        b64url_decode(UA_PUBLIC),
        b64url_decode(AUTH),
        salt=b64url_decode(SALT),
        server_key=_key(AS_PRIVATE),
    )
    assert b64url(body) == BODY


def test_the_browser_side_decrypts_rfc_8291_appendix_a() -> None:
    assert decrypt(b64url_decode(BODY), _key(UA_PRIVATE), b64url_decode(AUTH)) == PLAINTEXT


def test_each_encryption_uses_a_fresh_key_and_salt_and_round_trips() -> None:
    ua = ec.generate_private_key(ec.SECP256R1())
    auth = bytes(range(16))
    first, second = (encrypt(b'{"wake":1}', _public(ua), auth) for _ in range(2))
    assert first[:16] != second[:16] and first[21:86] != second[21:86]
    assert decrypt(first, ua, auth) == decrypt(second, ua, auth) == b'{"wake":1}'


def test_a_tampered_body_or_wrong_secret_does_not_decrypt() -> None:
    ua = ec.generate_private_key(ec.SECP256R1())
    body = bytearray(encrypt(b'{"wake":1}', _public(ua), bytes(16)))
    with pytest.raises(DecryptionError):
        decrypt(bytes(body), ua, bytes([1] * 16))
    body[-1] ^= 1
    with pytest.raises(DecryptionError):
        decrypt(bytes(body), ua, bytes(16))


# -- subscriptions and the host allow-list -----------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    [
        FCM_ENDPOINT,
        "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABexample",
        "https://wns2-par02p.notify.windows.com/w/?token=BQYAAAexample",
        "https://web.push.apple.com/QGuQyavXutnMH-example",
        "https://FCM.googleapis.com/fcm/send/x",
    ],
)
def test_the_public_browser_push_services_are_allowed_by_default(endpoint: str) -> None:
    assert HostPolicy(DEFAULT_WEBPUSH_HOSTS).check(endpoint).scheme == "https"


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://10.0.0.1/push",  # private addresses
        "https://192.168.1.20/push",
        "https://169.254.169.254/latest/meta-data/",  # cloud metadata
        "https://[fd00::1]/push",
        "https://[::ffff:10.0.0.1]/push",
        "https://2130706433/push",  # 127.0.0.1 as resolvers read it
        "https://0x7f000001/push",
        "https://127.1/push",
        "https://127.0.0.1/push",  # loopback, not configured
        "https://[::1]/push",
        "https://localhost/push",
        "https://metadata.google.internal/computeMetadata/v1/",  # unlisted names
        "https://push.example.com/x",
        "https://fcm.googleapis.com.evil.example/x",
        "https://evilnotify.windows.com/w/",  # not under the wildcard
        "https://notify.windows.com/w/",  # the wildcard's base itself
        "http://fcm.googleapis.com/fcm/send/x",  # not https
        "https://fcm.googleapis.com:8443/fcm/send/x",  # not the https port
        "https://user:pw@fcm.googleapis.com/fcm/send/x",  # user info
        "ftp://fcm.googleapis.com/x",
        "https://fcm.googleapis.com\u2024evil.example/x",  # not ASCII
        "not a url",
        "https:///nohost",
        "https://fcm.googleapis.com./fcm/send/x",  # a trailing dot
        "https://fcm.googleapis.com/fcm/send/" + "a" * 1000,  # longer than 1024 bytes
    ],
)
def test_other_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(SubscriptionError):
        HostPolicy(DEFAULT_WEBPUSH_HOSTS).check(endpoint)


def test_a_configured_loopback_host_is_allowed_over_http_on_any_port() -> None:
    policy = HostPolicy(["127.0.0.1", "::1"])
    assert policy.check("http://127.0.0.1:9999/push/a").port == 9999
    assert policy.check("http://[::1]:8080/push/a").port == 8080
    with pytest.raises(SubscriptionError):
        policy.check("http://localhost:9999/push/a")  # only the listed spelling
    with pytest.raises(SubscriptionError):
        policy.check("http://127.0.0.2:9999/push/a")


def test_wildcards_never_reach_loopback_and_entries_are_checked() -> None:
    with pytest.raises(SubscriptionError):
        HostPolicy(["*.example.com"]).check("https://localhost/x")
    for bad in ["10.0.0.1", "*.com", "*", "exa mple.com", "169.254.169.254"]:
        with pytest.raises(SubscriptionError, match=r"wildcard|host name"):
            HostPolicy([bad])


def _subscription(**changes: object) -> dict[str, object]:
    keys = {"p256dh": UA_PUBLIC, "auth": AUTH}
    keys.update({k: v for k, v in changes.items() if k in keys})  # type: ignore[misc]
    return {"endpoint": changes.get("endpoint", FCM_ENDPOINT), "keys": keys}


def test_a_subscription_is_stored_as_canonical_json_and_read_back() -> None:
    padded = _subscription(auth=AUTH + "==")
    parsed = parse_subscription(padded, HostPolicy(DEFAULT_WEBPUSH_HOSTS))
    token = parsed.to_token()
    assert json.loads(token) == _subscription()  # unpadded, the browser's own form
    assert WebPushSubscription.from_token(token) == parsed


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"p256dh": UA_PUBLIC[:-1] + "A"}, "not a point on P-256"),  # off the curve
        ({"p256dh": b64url(b"\x02" + bytes(32))}, "uncompressed P-256 point"),  # compressed
        ({"p256dh": b64url(b"\x04" + bytes(64))}, "not a point"),
        ({"p256dh": "not base64!"}, "base64url"),
        ({"auth": b64url(bytes(15))}, "16 bytes"),
        ({"auth": 16}, "base64url"),
        ({"endpoint": "https://10.0.0.1/x"}, "endpoint"),
        ({"endpoint": 5}, "endpoint"),
    ],
)
def test_bad_subscriptions_are_refused_naming_the_field(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(SubscriptionError, match=message):
        parse_subscription(_subscription(**changes), HostPolicy(DEFAULT_WEBPUSH_HOSTS))
    with pytest.raises(SubscriptionError, match="'subscription'"):
        parse_subscription(None, HostPolicy(DEFAULT_WEBPUSH_HOSTS))


# -- VAPID --------------------------------------------------------------------------------------


def test_vapid_tokens_are_es256_for_the_origin_and_renewed_before_they_expire() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    signer = VapidSigner(private, SUBJECT)
    now = 1_700_000_000.0
    header = signer.authorization("https://fcm.googleapis.com", now)
    token, key = header.removeprefix("vapid t=").split(", k=")
    assert b64url_decode(key) == _public(private)
    claims = jwt.decode(
        token,
        private.public_key(),
        algorithms=["ES256"],
        audience="https://fcm.googleapis.com",
        options={"verify_exp": False},
    )
    assert claims == {
        "aud": "https://fcm.googleapis.com",
        "exp": now + TOKEN_LIFETIME,
        "sub": SUBJECT,
    }
    assert TOKEN_LIFETIME <= 24 * 3600
    assert signer.authorization("https://fcm.googleapis.com", now + 1800) == header
    assert signer.authorization("https://fcm.googleapis.com", now + 3 * 3600) != header
    assert signer.authorization("https://web.push.apple.com", now) != header


def test_the_vapid_key_file_must_be_a_p256_pem(tmp_path: Path) -> None:
    good = tmp_path / "vapid.pem"
    good.write_bytes(generate_key_pem()[0])
    assert isinstance(load_private_key(good), ec.EllipticCurvePrivateKey)
    other = tmp_path / "p384.pem"
    from cryptography.hazmat.primitives import serialization

    other.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CredentialsError, match=r"\[push.webpush\] vapid_private_key_file.*P-256"):
        load_private_key(other)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(CredentialsError, match="not an unencrypted PEM private key"):
        load_private_key(junk)


# -- the provider -------------------------------------------------------------------------------


class Recorder:
    """A MockTransport handler that records requests and answers from a list."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.requests: list[httpx.Request] = []
        self.responses = list(responses)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0) if self.responses else httpx.Response(201)


def _provider(
    tmp_path: Path, recorder: Recorder
) -> tuple[WebPushProvider, ec.EllipticCurvePrivateKey]:
    key_file = tmp_path / "vapid.pem"
    key_file.write_bytes(generate_key_pem()[0])
    settings = WebPushSettings(vapid_private_key_file=key_file, subject=SUBJECT)
    provider = WebPushProvider(settings, transport=httpx.MockTransport(recorder))
    return provider, load_private_key(key_file)


def _notification(
    kind: WakeKind = WakeKind.ALERT, endpoint: str = FCM_ENDPOINT
) -> tuple[Notification, ec.EllipticCurvePrivateKey]:
    ua = ec.generate_private_key(ec.SECP256R1())
    subscription = WebPushSubscription(endpoint, _public(ua), b64url_decode(AUTH))
    token = PushToken("webpush", subscription.to_token(), None, False, 1)
    return Notification(token, kind, 600, "incoming-message", "NEW_MESSAGE"), ua


async def _send(provider: WebPushProvider, notification: Notification) -> object:
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.run)
        result = await provider.send(notification)
        nursery.cancel_scope.cancel()
    return result


@pytest.mark.parametrize(
    ("kind", "urgency", "payload"),
    [
        (WakeKind.ALERT, "high", b'{"wake":1}'),
        (WakeKind.BACKGROUND, "normal", b'{"wake":1}'),
        (WakeKind.CLEAR, "normal", b'{"wake":1,"clear":1}'),
    ],
)
async def test_a_wake_up_is_an_encrypted_signed_rfc_8030_post(
    tmp_path: Path, kind: WakeKind, urgency: str, payload: bytes
) -> None:
    recorder = Recorder()
    provider, vapid = _provider(tmp_path, recorder)
    notification, ua = _notification(kind)
    before = time.time()
    result = await _send(provider, notification)
    assert result.outcome is Outcome.SENT  # type: ignore[attr-defined]
    (request,) = recorder.requests
    assert request.method == "POST" and str(request.url) == FCM_ENDPOINT
    h = request.headers
    assert (h["ttl"], h["urgency"], h["topic"]) == ("600", urgency, "incoming-message")
    assert (h["content-encoding"], h["content-type"]) == ("aes128gcm", "application/octet-stream")
    token, key = h["authorization"].removeprefix("vapid t=").split(", k=")
    assert b64url_decode(key) == _public(vapid)
    claims = jwt.decode(
        token, vapid.public_key(), algorithms=["ES256"], audience="https://fcm.googleapis.com"
    )
    assert claims["sub"] == SUBJECT and before < claims["exp"] <= time.time() + 24 * 3600
    assert decrypt(request.content, ua, b64url_decode(AUTH)) == payload


@pytest.mark.parametrize(
    ("response", "outcome", "retry_after"),
    [
        (httpx.Response(201), Outcome.SENT, None),
        (httpx.Response(404), Outcome.INVALID_TOKEN, None),
        (httpx.Response(410), Outcome.INVALID_TOKEN, None),
        (httpx.Response(429, headers={"retry-after": "7"}), Outcome.RETRY, 7.0),
        (httpx.Response(503, headers={"retry-after": "2"}), Outcome.RETRY, 2.0),
        (httpx.Response(500), Outcome.RETRY, None),
        (httpx.Response(403), Outcome.CREDENTIALS, None),
        (httpx.Response(401), Outcome.CREDENTIALS, None),
        (httpx.Response(413), Outcome.REJECTED, None),
        (httpx.Response(400), Outcome.REJECTED, None),
    ],
)
async def test_answers_are_classified(
    tmp_path: Path, response: httpx.Response, outcome: Outcome, retry_after: float | None
) -> None:
    provider, _ = _provider(tmp_path, Recorder(response))
    result = await _send(provider, _notification()[0])
    assert (result.outcome, result.retry_after) == (outcome, retry_after)  # type: ignore[attr-defined]


def test_retry_after_may_be_an_http_date() -> None:
    now = 1_700_000_000.0
    date = "Tue, 14 Nov 2023 22:13:50 GMT"  # now + 30 s
    assert classify(429, date, now).retry_after == pytest.approx(30.0)
    assert classify(503, "soon", now).retry_after is None


async def test_redirects_are_never_followed(tmp_path: Path) -> None:
    recorder = Recorder(httpx.Response(307, headers={"location": "http://10.0.0.1/steal"}))
    provider, _ = _provider(tmp_path, recorder)
    result = await _send(provider, _notification()[0])
    assert result.outcome is Outcome.REJECTED  # type: ignore[attr-defined]
    assert [str(r.url) for r in recorder.requests] == [FCM_ENDPOINT]


async def test_a_stored_subscription_to_a_host_no_longer_allowed_is_never_contacted(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    provider, _ = _provider(tmp_path, recorder)
    for endpoint in ("https://push.example.com/x", "http://127.0.0.1:9/x", "https://10.1.2.3/x"):
        result = await _send(provider, _notification(endpoint=endpoint)[0])
        assert result.outcome is Outcome.REJECTED  # type: ignore[attr-defined]
    assert recorder.requests == []


async def test_a_lost_connection_is_retried(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    key_file = tmp_path / "vapid.pem"
    key_file.write_bytes(generate_key_pem()[0])
    settings = WebPushSettings(vapid_private_key_file=key_file, subject=SUBJECT)
    provider = WebPushProvider(settings, transport=httpx.MockTransport(refuse))
    result = await _send(provider, _notification()[0])
    assert result.outcome is Outcome.RETRY  # type: ignore[attr-defined]


def test_topics_are_the_collapse_id_when_rfc_8030_allows_it() -> None:
    assert topic_for("incoming-message") == "incoming-message"
    long = topic_for("a collapse id with spaces that is far too long for a Topic")
    assert len(long) == 32 and long.replace("-", "").replace("_", "").isalnum()
    assert long == topic_for("a collapse id with spaces that is far too long for a Topic")


def test_the_vapid_audience_is_the_origin() -> None:
    assert (
        origin(httpx.URL("https://fcm.googleapis.com/fcm/send/x")) == "https://fcm.googleapis.com"
    )
    assert origin(httpx.URL("https://fcm.googleapis.com:443/x")) == "https://fcm.googleapis.com"
    assert origin(httpx.URL("http://127.0.0.1:8080/push/a")) == "http://127.0.0.1:8080"
    assert origin(httpx.URL("http://[::1]:8080/push/a")) == "http://[::1]:8080"


def test_the_provider_needs_a_subject_and_a_key(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="vapid_private_key_file is not set"):
        WebPushProvider(WebPushSettings())
    key_file = tmp_path / "vapid.pem"
    key_file.write_bytes(generate_key_pem()[0])
    with pytest.raises(CredentialsError, match="subject"):
        WebPushProvider(WebPushSettings(vapid_private_key_file=key_file))


async def test_a_huge_answer_is_not_read_into_memory(tmp_path: Path) -> None:
    chunks_read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks_read
        while True:
            chunks_read += 1
            yield b"x" * 16384

    recorder = Recorder(httpx.Response(201, content=endless()))
    provider, _ = _provider(tmp_path, recorder)
    with trio.fail_after(10):
        result = await _send(provider, _notification()[0])
    assert result.outcome is Outcome.SENT  # type: ignore[attr-defined]
    assert chunks_read <= 6  # 64 KiB, then the connection is dropped

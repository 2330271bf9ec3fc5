"""The APNs provider (real aioapns code) against the fake APNs: HTTP/2 over TLS on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from push.apns import JWT_REFRESH, PRODUCTION_HOST, SANDBOX_HOST, ApnsProvider, endpoint_for
from push.errors import CredentialsError
from push.notification import Notification, Outcome
from push.policy import WakeKind
from push.settings import ApnsSettings
from push.store import PushToken
from scripts.fakes import FakeApns, Reply
from scripts.fakes.credentials import make_p8

TOKEN = "0a1b2c3d" * 8
TTL = 3600


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeApns]:
    fake = FakeApns.create(tmp_path / "apns", topics={"com.example.app", "com.example.other"})
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def provider(
    fake: FakeApns, *, auth: str = "token", clock: Clock | None = None, **keys: Any
) -> AsyncIterator[ApnsProvider]:
    settings = ApnsSettings(**(fake.settings(auth=auth) | keys))
    apns = ApnsProvider(settings, clock=clock or Clock())
    async with trio.open_nursery() as nursery:
        await nursery.start(apns.run)
        yield apns
        nursery.cancel_scope.cancel()


def note(
    kind: WakeKind = WakeKind.ALERT,
    *,
    token: str = TOKEN,
    topic: str | None = None,
    sandbox: bool = False,
) -> Notification:
    return Notification(
        PushToken("apns", token, topic, sandbox, 0), kind, TTL, "incoming-message", "NEW_MESSAGE"
    )


async def test_an_alert_wake_up_is_exactly_the_contracted_request(fake: FakeApns) -> None:
    async with provider(fake) as apns:
        before = int(time.time())
        result = await apns.send(note(WakeKind.ALERT))
    assert result.outcome is Outcome.SENT
    (record,) = fake.records
    h = record.headers
    assert record.token == TOKEN and h[":method"] == "POST" and h[":scheme"] == "https"
    assert h["apns-push-type"] == "alert"
    assert h["apns-priority"] == "10"
    assert h["apns-topic"] == "com.example.app"
    assert h["apns-collapse-id"] == "incoming-message"
    assert before + TTL <= int(h["apns-expiration"]) <= int(time.time()) + TTL
    assert record.payload == {
        "aps": {"alert": {"loc-key": "NEW_MESSAGE"}, "mutable-content": 1, "sound": "default"}
    }


async def test_a_background_wake_up_is_exactly_the_contracted_request(fake: FakeApns) -> None:
    async with provider(fake) as apns:
        result = await apns.send(note(WakeKind.BACKGROUND))
    assert result.outcome is Outcome.SENT
    (record,) = fake.records
    assert record.headers["apns-push-type"] == "background"
    assert record.headers["apns-priority"] == "5"
    assert record.payload == {"aps": {"content-available": 1}}


async def test_a_clear_wake_up_is_a_background_request_marked_clear(fake: FakeApns) -> None:
    async with provider(fake) as apns:
        result = await apns.send(note(WakeKind.CLEAR))
    assert result.outcome is Outcome.SENT
    (record,) = fake.records
    assert record.headers["apns-push-type"] == "background"
    assert record.headers["apns-priority"] == "5"
    assert record.payload == {"aps": {"content-available": 1}, "clear": 1}


async def test_the_token_topic_wins_over_the_configured_topic(fake: FakeApns) -> None:
    async with provider(fake) as apns:
        await apns.send(note(topic="com.example.other"))
    assert fake.records[0].headers["apns-topic"] == "com.example.other"


async def test_one_provider_token_serves_many_requests_and_connections(fake: FakeApns) -> None:
    async with provider(fake) as apns, trio.open_nursery() as nursery:
        for i in range(300):
            nursery.start_soon(apns.send, note(token=f"{i:064x}"))
    assert len(fake.records) == 300 and all(r.status == 200 for r in fake.records)
    assert len(fake.provider_tokens) == 1
    assert apns.auth is not None and apns.auth.mints == 1


async def test_the_provider_token_is_refreshed_after_45_minutes_not_before(
    fake: FakeApns,
) -> None:
    clock = Clock()
    async with provider(fake, clock=clock) as apns:
        await apns.send(note())
        clock.offset = 20 * 60
        await apns.send(note())
        assert len(fake.provider_tokens) == 1
        clock.offset = JWT_REFRESH + 1
        fake.expire_before = 0
        await apns.send(note())
    assert len(fake.provider_tokens) == 2
    assert 20 * 60 <= JWT_REFRESH <= 60 * 60


async def test_expired_provider_token_forces_a_refresh(fake: FakeApns) -> None:
    clock = Clock()
    async with provider(fake, clock=clock) as apns:
        assert (await apns.send(note())).outcome is Outcome.SENT
        fake.expire_before = time.time() + 2  # APNs now calls our current token expired
        clock.offset = 5
        result = await apns.send(note())
        assert (result.outcome, result.reason) == (Outcome.RETRY, "ExpiredProviderToken")
        assert result.retry_after == 0
        assert (await apns.send(note())).outcome is Outcome.SENT
    assert len(fake.provider_tokens) == 2


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (Reply(410, "Unregistered", timestamp=1_700_000_000_000), Outcome.INVALID_TOKEN),
        (Reply(400, "BadDeviceToken"), Outcome.INVALID_TOKEN),
        (Reply(400, "DeviceTokenNotForTopic"), Outcome.INVALID_TOKEN),
        (Reply(503, "ServiceUnavailable"), Outcome.RETRY),
        (Reply(500, "InternalServerError"), Outcome.RETRY),
        (Reply(403, "InvalidProviderToken"), Outcome.CREDENTIALS),
        (Reply(400, "BadCollapseId"), Outcome.REJECTED),
    ],
)
async def test_answers_are_classified(fake: FakeApns, reply: Reply, outcome: Outcome) -> None:
    fake.script.add(reply, token=TOKEN)
    async with provider(fake) as apns:
        result = await apns.send(note())
    assert (result.outcome, result.status, result.reason) == (outcome, reply.status, reply.reason)


async def test_a_429_carries_retry_after(fake: FakeApns) -> None:
    fake.script.add(Reply(429, "TooManyRequests", retry_after=7))
    async with provider(fake) as apns:
        result = await apns.send(note())
    assert (result.outcome, result.retry_after) == (Outcome.RETRY, 7.0)


async def test_a_wrong_signing_key_is_a_credentials_failure(fake: FakeApns, tmp_path: Path) -> None:
    other = tmp_path / "other.p8"
    make_p8(other)
    async with provider(fake, key_file=other) as apns:
        result = await apns.send(note())
    assert (result.outcome, result.reason) == (Outcome.CREDENTIALS, "InvalidProviderToken")


async def test_certificate_auth(fake: FakeApns) -> None:
    async with provider(fake, auth="cert") as apns:
        result = await apns.send(note())
    assert result.outcome is Outcome.SENT
    assert fake.records[0].provider_token is None


async def test_a_request_cancelled_while_apns_hangs_frees_its_stream(fake: FakeApns) -> None:
    fake.script.add(Reply.hang(), token=TOKEN)
    async with provider(fake) as apns:
        with trio.move_on_after(0.5) as scope:
            await apns.send(note())
        assert scope.cancelled_caught
        assert (await apns.send(note())).outcome is Outcome.SENT  # same connection, still fine
        pool = next(iter(apns._pools.values()))
        protocol = pool.connections[0]
        assert protocol.requests == {} and protocol.request_streams == {}


async def test_many_error_answers_do_not_exhaust_flow_control(
    fake: FakeApns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One connection carries every answer: a pool of several could spread the bodies
    # thinly enough that an unacknowledged window would never fill.
    monkeypatch.setattr("push.apns.MAX_CONNECTIONS", 1)
    fake.script.default = Reply(400, "DeviceTokenNotForTopic")  # ~40 bytes of body each
    async with provider(fake) as apns:
        first = None
        with trio.fail_after(60):  # an exhausted window stalls every later request
            for _ in range(4):  # > 64 KiB of response bodies on one connection
                async with trio.open_nursery() as nursery:
                    for i in range(500):
                        nursery.start_soon(apns.send, note(token=f"{i:064x}"))
                (connection,) = next(iter(apns._pools.values())).connections
                first = first or connection
                assert connection is first
    assert len(fake.records) == 2000
    assert all(r.reason == "DeviceTokenNotForTopic" for r in fake.records)


async def test_a_burst_waits_for_flow_control_credit(tmp_path: Path) -> None:
    fake = FakeApns.create(tmp_path / "apns")
    fake.h2_window = None  # 64 KiB: 2000 request bodies do not fit in one window
    outcomes: list[Outcome] = []

    async def send(apns: ApnsProvider, i: int) -> None:
        outcomes.append((await apns.send(note(token=f"{i:064x}"))).outcome)

    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        async with provider(fake) as apns, trio.open_nursery() as burst:
            for i in range(2000):
                burst.start_soon(send, apns, i)
        nursery.cancel_scope.cancel()
    assert outcomes == [Outcome.SENT] * 2000


def test_sandbox_and_production_endpoints() -> None:
    settings = ApnsSettings()
    assert endpoint_for(settings, sandbox=False).host == PRODUCTION_HOST
    assert endpoint_for(settings, sandbox=True).host == SANDBOX_HOST
    forced = ApnsSettings(sandbox=True)
    assert endpoint_for(forced, sandbox=False).host == SANDBOX_HOST
    local = endpoint_for(ApnsSettings(endpoint="http://127.0.0.1:9999"), sandbox=True)
    assert (local.host, local.port, local.tls) == ("127.0.0.1", 9999, False)


async def test_cleartext_http2_endpoint(tmp_path: Path) -> None:
    fake = FakeApns.create(tmp_path / "apns", tls=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        async with provider(fake) as apns:
            assert (await apns.send(note())).outcome is Outcome.SENT
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("key", "content", "message"),
    [
        ("key_file", b"not a key", "[push.apns] key_file"),
        ("cert_file", b"-----BEGIN CERTIFICATE-----\nnope\n", "[push.apns] cert_file"),
        ("ca_file", b"garbage", "[push.apns] ca_file"),
    ],
)
def test_unusable_credentials_name_the_key(
    tmp_path: Path, key: str, content: bytes, message: str
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    keys: dict[str, Any] = {"topic": "com.example.app", key: bad}
    if key != "cert_file":
        good = tmp_path / "AuthKey.p8"
        make_p8(good)
        keys.setdefault("key_file", good)
        keys.update(key_id="K", team_id="T")
    with pytest.raises(CredentialsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ApnsProvider(ApnsSettings(**keys))


def test_an_rsa_key_is_not_an_apns_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.p8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CredentialsError, match="ES256"):
        ApnsProvider(ApnsSettings(key_file=path, key_id="K", team_id="T", topic="x"))

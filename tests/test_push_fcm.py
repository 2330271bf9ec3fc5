"""The FCM provider (real firebase-admin and google-auth code) against the fake FCM."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from push.errors import CredentialsError
from push.fcm import FcmProvider
from push.notification import Notification, Outcome
from push.policy import WakeKind
from push.settings import FcmSettings
from push.store import PushToken
from scripts.fakes import FakeFcm, Reply

TOKEN = "fcm-registration-token-1"


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeFcm]:
    fake = FakeFcm(project_id="wake-test")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        fake.write_service_account(tmp_path / "service-account.json")
        yield fake
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def provider(fake: FakeFcm) -> AsyncIterator[FcmProvider]:
    fcm = FcmProvider(FcmSettings(**fake.settings()), request_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(fcm.run)
        yield fcm
        nursery.cancel_scope.cancel()


def note(kind: WakeKind = WakeKind.ALERT, token: str = TOKEN) -> Notification:
    return Notification(
        PushToken("fcm", token, None, False, 0), kind, 600, "incoming-message", "NEW_MESSAGE"
    )


async def test_an_urgent_wake_up_is_a_high_priority_data_only_message(fake: FakeFcm) -> None:
    async with provider(fake) as fcm:
        result = await fcm.send(note(WakeKind.ALERT))
    assert result.outcome is Outcome.SENT
    (record,) = fake.records
    assert record.project == "wake-test"
    assert record.message == {
        "token": TOKEN,
        "data": {"wake": "1"},
        "android": {"priority": "high", "ttl": "600s", "collapse_key": "incoming-message"},
    }


async def test_a_background_wake_up_is_normal_priority(fake: FakeFcm) -> None:
    async with provider(fake) as fcm:
        await fcm.send(note(WakeKind.BACKGROUND))
    assert fake.records[0].message["android"]["priority"] == "normal"
    assert "notification" not in fake.records[0].message


async def test_a_clear_wake_up_is_normal_priority_data_marked_clear(fake: FakeFcm) -> None:
    async with provider(fake) as fcm:
        await fcm.send(note(WakeKind.CLEAR))
    message = fake.records[0].message
    assert message["data"] == {"wake": "1", "clear": "1"}
    assert message["android"]["priority"] == "normal"
    assert "notification" not in message


async def test_one_oauth_token_serves_many_sends(fake: FakeFcm) -> None:
    async with provider(fake) as fcm, trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(fcm.send, note(token=f"token-{i}"))
    assert len(fake.records) == 50
    assert fake.token_requests == 1


@pytest.mark.parametrize(
    ("reply", "outcome", "reason"),
    [
        (Reply(reason="UNREGISTERED"), Outcome.INVALID_TOKEN, "UNREGISTERED"),
        (Reply(reason="INVALID_ARGUMENT"), Outcome.INVALID_TOKEN, "INVALID_ARGUMENT"),
        (Reply(reason="UNAVAILABLE"), Outcome.RETRY, "UNAVAILABLE"),
        (Reply(reason="INTERNAL"), Outcome.RETRY, "INTERNAL"),
        (Reply(reason="SENDER_ID_MISMATCH"), Outcome.CREDENTIALS, "PERMISSION_DENIED"),
    ],
)
async def test_answers_are_classified(
    fake: FakeFcm, reply: Reply, outcome: Outcome, reason: str
) -> None:
    fake.script.add(reply, token=TOKEN)
    async with provider(fake) as fcm:
        result = await fcm.send(note())
    assert (result.outcome, result.reason) == (outcome, reason)


async def test_quota_exceeded_carries_retry_after(fake: FakeFcm) -> None:
    fake.script.add(Reply(reason="QUOTA_EXCEEDED", retry_after=12))
    async with provider(fake) as fcm:
        result = await fcm.send(note())
    assert (result.outcome, result.status, result.retry_after) == (Outcome.RETRY, 429, 12.0)


async def test_a_refused_oauth_assertion_is_a_credentials_failure(
    fake: FakeFcm, tmp_path: Path
) -> None:
    async with provider(fake) as fcm:
        fake.write_service_account(tmp_path / "rotated.json")  # the fake now trusts another key
        result = await fcm.send(note())
    assert result.outcome is Outcome.CREDENTIALS
    assert "invalid_grant" in result.reason


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        json.dumps({"type": "authorized_user"}).encode(),
        json.dumps({"type": "service_account", "private_key": "x"}).encode(),
    ],
)
def test_an_unusable_service_account_file_names_the_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sa.json"
    path.write_bytes(content)
    with pytest.raises(CredentialsError, match=r"\[push.fcm\] service_account_file"):
        FcmProvider(FcmSettings(service_account_file=path))

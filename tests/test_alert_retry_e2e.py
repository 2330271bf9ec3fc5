"""End to end: an alert wake-up that never woke the phone (the provider accepted it and
lost it) is sent again through the real provider clients to the fake APNs and FCM, with
the same collapse id, and stops once the phone connects; a retry for a message read on
another device is not sent. The retry delay is 2 s of real time: the second retry would
come 4 s after the first, far beyond the moment the phone connects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.client import connect
from gateway.server import GatewayServer
from scripts.fakes import FakeApns, FakeFcm
from tests.conftest import make_settings, running_server
from tests.test_push_e2e import (
    APNS_TOKEN,
    FCM_TOKEN,
    TOPIC,
    Token,
    dispatcher,
    fake_apns,
    fake_fcm,
    go_idle,
    push_to_fakes,
)

__all__ = ["fake_apns", "fake_fcm"]  # fixtures

ALERT_RETRY = 2.0
DEADLINE = 20


@pytest.fixture
async def server(
    tmp_path: Path, fake_apns: FakeApns, fake_fcm: FakeFcm
) -> AsyncIterator[GatewayServer]:
    push = push_to_fakes(fake_apns, fake_fcm, alert_retry=ALERT_RETRY, alert_retries=2)
    settings = make_settings(tmp_path, push=push)
    async with running_server(settings) as running:
        yield running


def collapse_id(record: Any) -> str:
    """The collapse id of an APNs or FCM request."""
    if hasattr(record, "headers") and "apns-collapse-id" in record.headers:
        return str(record.headers["apns-collapse-id"])
    return str(record.message["android"]["collapse_key"])


def is_alert(record: Any) -> bool:
    if hasattr(record, "message"):
        return bool(record.message["android"]["priority"] == "high")
    return bool(record.headers["apns-push-type"] == "alert")


async def metrics(server: GatewayServer) -> str:
    async with httpx.AsyncClient(base_url=server.admin_url) as http:
        return (await http.get("/metrics")).text


@pytest.mark.parametrize("provider", ["apns", "fcm"])
async def test_a_lost_alert_is_sent_again_and_stops_once_the_phone_connects(
    server: GatewayServer, token: Token, fake_apns: FakeApns, fake_fcm: FakeFcm, provider: str
) -> None:
    fake: FakeApns | FakeFcm = fake_apns if provider == "apns" else fake_fcm
    push_token = APNS_TOKEN if provider == "apns" else FCM_TOKEN
    await go_idle(
        server, token, provider, push_token, **({"topic": TOPIC} if provider == "apns" else {})
    )
    push = dispatcher(server)
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(DEADLINE):
            await alice.send("bob", b"ciphertext", urgent=True)
            # The provider accepts the alert, and the phone never gets it: nothing connects.
            await fake.wait_requests(1)
            first, again = await fake.wait_requests(2)
            await push.wait_idle()
        assert is_alert(first) and is_alert(again)
        assert collapse_id(again) == collapse_id(first)  # one notification on the phone
        assert again.arrived - first.arrived >= ALERT_RETRY * 0.9
        assert push.metrics()["alert_retries"] == 1
        assert push.policy.next_deadline() is not None  # a second retry is pending

        async with connect(server.url, token("bob", "phone")) as bob:
            with trio.fail_after(DEADLINE):
                await bob.wait_drained()
            assert [d.frame["body"] for d in bob.take_buffered()] == [b"ciphertext"]
            assert push.policy.next_deadline() is None  # the second retry is cancelled
            assert len(push.policy) == 0

    exposition = await metrics(server)
    assert "gateway_push_retries_total 1.0" in exposition
    assert f'gateway_push_outcomes_total{{outcome="sent_alert",provider="{provider}"}} 2.0' in (
        exposition
    )
    assert len(fake.records) == 2


async def test_no_retry_for_a_message_read_on_another_device(
    server: GatewayServer, token: Token, fake_apns: FakeApns
) -> None:
    push = dispatcher(server)
    async with connect(server.url, token("bob", "tablet")) as tablet:
        await go_idle(server, token, "apns", APNS_TOKEN, topic=TOPIC)
        async with connect(server.url, token("alice", "phone")) as alice:
            with trio.fail_after(DEADLINE):
                sent = await alice.send("bob", b"ciphertext", urgent=True)
                await fake_apns.wait_requests(1)  # the phone's alert, lost
                assert (await tablet.next_delivery()).frame["id"] == sent.id
                await tablet.read("alice", [sent.id])
                await fake_apns.wait_requests(2)  # the clear
                # The retry comes due ALERT_RETRY after the alert and finds m read.
                while not push.counters[("none", "retry_skipped")]:  # noqa: ASYNC110 (bounded)
                    await trio.sleep(0.05)
                await push.wait_idle()

    assert [r.headers["apns-push-type"] for r in fake_apns.records] == ["alert", "background"]
    assert push.metrics()["alert_retries"] == 0
    exposition = await metrics(server)
    assert 'gateway_push_outcomes_total{outcome="retry_skipped",provider="none"} 1.0' in exposition

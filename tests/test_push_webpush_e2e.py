"""End to end: a browser-like device on a real gateway, woken through the fake Web Push
service, which verifies the VAPID signature and decrypts every wake-up."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.cli import main
from gateway.client import connect
from gateway.server import GatewayServer
from push.ece import encrypt
from push.notification import Notification, Outcome
from push.policy import WakeKind
from push.settings import WebPushSettings
from push.store import PushToken
from push.subscription import HostPolicy, b64url_decode, parse_subscription
from push.vapid import VapidSigner, generate_key_pem, load_private_key, public_key_b64
from push.webpush import WebPushProvider
from scripts.fakes import FakeSubscription, FakeWebPush, Reply
from scripts.fakes.credentials import CertificateAuthority
from tests.conftest import make_settings, running_server
from tests.test_push_e2e import Token, dispatcher, go_idle, register

SUBJECT = "mailto:ops@example.com"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def fake() -> AsyncIterator[FakeWebPush]:
    fake = FakeWebPush()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        nursery.cancel_scope.cancel()


def webpush_settings(tmp_path: Path, **changes: Any) -> WebPushSettings:
    key_file = tmp_path / "vapid.pem"
    if not key_file.exists():
        key_file.write_bytes(generate_key_pem()[0])
    values: dict[str, Any] = {
        "vapid_private_key_file": key_file,
        "subject": SUBJECT,
        "allowed_hosts": ("127.0.0.1",),
    }
    values.update(changes)
    return WebPushSettings(**values)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[GatewayServer]:
    settings = make_settings(
        tmp_path,
        push={"webpush": webpush_settings(tmp_path), "linger": 3600.0, "ttl": 600},
    )
    async with running_server(settings) as running:
        yield running


async def vapid_public_key(server: GatewayServer) -> str:
    """What a web app fetches before `pushManager.subscribe` (no API key needed)."""
    async with httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http:
        response = await http.get(
            "/v1/webpush/vapid-public-key", headers={"origin": "https://app.example.com"}
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    key: str = response.json()["public_key"]
    return key


async def browser_goes_idle(
    server: GatewayServer, token: Token, subscription: FakeSubscription
) -> None:
    """Bob's browser tab connects, registers its subscription and is closed."""
    await go_idle(server, token, "webpush", device="browser", subscription=subscription.to_json())


async def test_an_idle_browser_gets_a_signed_encrypted_wake_up(
    server: GatewayServer, token: Token, fake: FakeWebPush
) -> None:
    subscription = fake.subscribe(application_server_key=await vapid_public_key(server))
    await browser_goes_idle(server, token, subscription)
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(10):
            await alice.send("bob", b"ciphertext", urgent=True)
            (record,) = await fake.wait_requests(1)
        assert record.error == "" and record.status == 201
        assert record.subscription == subscription.id
        assert record.payload == {"wake": 1}
        assert record.claims["aud"] == fake.origin and record.claims["sub"] == SUBJECT
        h = record.headers
        assert (h["urgency"], h["ttl"], h["topic"]) == ("high", "600", "incoming-message")

        async with connect(server.url, token("bob", "browser")) as bob:
            with trio.fail_after(10):
                await bob.wait_drained()
                assert [d.frame["body"] for d in bob.take_buffered()] == [b"ciphertext"]
        with trio.fail_after(10):
            await alice.send("bob", b"receipt-free", urgent=False)
            _, background = await fake.wait_requests(2)
            await dispatcher(server).wait_idle()
        assert background.payload == {"wake": 1} and background.headers["urgency"] == "normal"
    assert dispatcher(server).counters[("webpush", "sent_alert")] == 1
    assert dispatcher(server).counters[("webpush", "sent_background")] == 1


async def test_a_410_clears_the_subscription(
    server: GatewayServer, token: Token, fake: FakeWebPush
) -> None:
    subscription = fake.subscribe()
    fake.script.add(Reply(410), token=subscription.id)
    await browser_goes_idle(server, token, subscription)
    stored = await server.store.push_token("bob", "browser")
    assert stored is not None and stored.provider == "webpush"
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(10):
            await alice.send("bob", b"x")
            (record,) = await fake.wait_requests(1)
            await dispatcher(server).wait_idle()
    assert record.status == 410 and record.payload == {"wake": 1}
    assert await server.store.push_token("bob", "browser") is None
    assert dispatcher(server).counters[("webpush", "token_cleared")] == 1


async def test_a_subscription_registered_again_survives_a_late_404(
    server: GatewayServer, token: Token, fake: FakeWebPush
) -> None:
    subscription = fake.subscribe()
    answer = trio.Event()
    fake.script.add(Reply(404, gate=answer), token=subscription.id)
    await browser_goes_idle(server, token, subscription)
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(10):
            await alice.send("bob", b"x")
            await fake.wait_requests(1)  # the service holds its 404 back
            async with connect(server.url, token("bob", "browser")) as bob:
                # the tab subscribes again
                await register(bob, "webpush", subscription=subscription.to_json())
            answer.set()
            await dispatcher(server).wait_idle()
    assert await server.store.push_token("bob", "browser") is not None
    assert dispatcher(server).counters[("webpush", "token_kept")] == 1


async def test_429_and_503_are_retried_after_retry_after(
    server: GatewayServer, token: Token, fake: FakeWebPush
) -> None:
    subscription = fake.subscribe()
    fake.script.add(Reply(429, retry_after=1), Reply(503, retry_after=1), token=subscription.id)
    await browser_goes_idle(server, token, subscription)
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(20):
            await alice.send("bob", b"x")
            records = await fake.wait_requests(3)
            await dispatcher(server).wait_idle()
    assert [r.status for r in records] == [429, 503, 201]
    assert records[1].arrived - records[0].arrived >= 1.0  # Retry-After honoured
    assert records[2].arrived - records[1].arrived >= 1.0
    assert dispatcher(server).counters[("webpush", "retried")] == 2
    assert dispatcher(server).counters[("webpush", "sent_alert")] == 1


async def test_a_subscription_to_an_unlisted_host_is_refused_and_never_contacted(
    tmp_path: Path, token: Token, fake: FakeWebPush
) -> None:
    # The fake serves on 127.0.0.1, which this gateway does not allow.
    settings = make_settings(
        tmp_path, push={"webpush": webpush_settings(tmp_path, allowed_hosts=("push.example.com",))}
    )
    async with running_server(settings) as server:
        async with connect(server.url, token("bob", "browser"), reconnect=False) as bob:
            # Each is checked before the next, and the last is the fake's own loopback
            # endpoint: whatever fails, a wake-up could only ever reach the fake.
            subscriptions = [
                {**fake.subscribe().to_json(), "endpoint": "https://10.0.0.1/push/x"},
                {**fake.subscribe().to_json(), "endpoint": "https://169.254.169.254/latest"},
                {**fake.subscribe().to_json(), "endpoint": "https://[fd00::1]/push/x"},
                {**fake.subscribe().to_json(), "endpoint": "http://push.example.com/x"},
                fake.subscribe().to_json(),
            ]
            for subscription in subscriptions:
                await bob.register_push("webpush", subscription=subscription)
                with trio.fail_after(10):
                    error = await bob.next_event()
                assert error["code"] == "bad_field" and "endpoint" in error["reason"]
                assert await server.store.push_token("bob", "browser") is None
        async with connect(server.url, token("alice", "phone")) as alice:
            await alice.send("bob", b"x", urgent=True)
        push = dispatcher(server)
        with trio.fail_after(10):
            await push.wait_idle()
        assert push.counters[("none", "no_token")] == 1
    assert fake.records == []


async def test_bad_keys_get_bad_field(
    server: GatewayServer, token: Token, fake: FakeWebPush
) -> None:
    async with connect(server.url, token("bob", "browser"), reconnect=False) as bob:
        good = fake.subscribe().to_json()
        for keys in (
            {"p256dh": good["keys"]["p256dh"][:-2] + "AA", "auth": good["keys"]["auth"]},
            {"p256dh": good["keys"]["p256dh"], "auth": "AAAA"},
        ):
            await bob.register_push("webpush", subscription={**good, "keys": keys})
            with trio.fail_after(10):
                error = await bob.next_event()
            assert error["code"] == "bad_field" and "subscription.keys" in error["reason"]
    assert await server.store.push_token("bob", "browser") is None


async def test_the_vapid_public_key_is_served_without_an_api_key(
    server: GatewayServer, tmp_path: Path
) -> None:
    expected = public_key_b64(load_private_key(tmp_path / "vapid.pem"))
    assert await vapid_public_key(server) == expected


async def test_without_web_push_the_key_endpoint_says_so(tmp_path: Path) -> None:
    async with (
        running_server(make_settings(tmp_path)) as server,
        httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
    ):
        response = await http.get("/v1/webpush/vapid-public-key")
    assert response.status_code == 404 and response.json()["error"] == "not_configured"


async def test_the_standalone_fakes_serve_web_push_and_write_a_usable_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = [sys.executable, "-m", "scripts.fake_push", "--dir", str(tmp_path / "fakes")]
    ports = ["--apns-port", "0", "--fcm-port", "0", "--webpush-port", "0"]
    process = await trio.lowlevel.open_process(
        [*command, *ports, "--ready-json", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "fake_push exited"
                line += chunk
        ready = json.loads(line)
        assert main(["check-config", str(tmp_path / "fakes" / "gateway-push.toml")]) == 0
        assert "push: apns, fcm, webpush" in capsys.readouterr().out
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"http://127.0.0.1:{ready['webpush']}/_fake/subscribe"
            answer = (await http.post(url)).json()
        subscription = parse_subscription(answer["subscription"], HostPolicy(["127.0.0.1"]))
        assert subscription.endpoint.endswith(f"/push/{answer['id']}")
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_wake_ups_go_over_http2_and_tls_when_the_service_offers_them(
    tmp_path: Path,
) -> None:
    """The provider's own client (HTTP/2 by ALPN), trusting the fake's CA for the test."""
    ca = CertificateAuthority.create("fake Web Push CA")
    fake = FakeWebPush(ssl_context=ca.server_context())
    trust = ssl.create_default_context(cadata=ca.cert_pem.decode())
    transport = httpx.AsyncHTTPTransport(verify=trust, http2=True)
    provider = WebPushProvider(webpush_settings(tmp_path), transport=transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        await nursery.start(provider.run)
        subscription = fake.subscribe(application_server_key=provider.signer.public_key)
        token = PushToken("webpush", json.dumps(subscription.to_json()), None, False, 1)
        notification = Notification(token, WakeKind.BACKGROUND, 60, "c", "K")
        with trio.fail_after(10):
            result = await provider.send(notification)
        nursery.cancel_scope.cancel()
    assert result.outcome is Outcome.SENT and result.status == 201
    (record,) = fake.records
    assert record.payload == {"wake": 1} and record.claims["aud"] == fake.origin
    assert fake.origin.startswith("https://") and record.http2


async def test_the_fake_refuses_what_a_push_service_would(fake: FakeWebPush) -> None:
    """Wrong key, wrong audience, expired or far-future token, bad headers, bad body."""
    gateway_key = ec.generate_private_key(ec.SECP256R1())
    signer = VapidSigner(gateway_key, SUBJECT)
    subscription = fake.subscribe(application_server_key=signer.public_key)
    keys = subscription.to_json()["keys"]
    body = encrypt(b'{"wake":1}', b64url_decode(keys["p256dh"]), b64url_decode(keys["auth"]))
    now = time.time()
    good = {
        "TTL": "60",
        "Content-Encoding": "aes128gcm",
        "Authorization": signer.authorization(fake.origin, now),
    }
    other = VapidSigner(ec.generate_private_key(ec.SECP256R1()), SUBJECT)

    def signed_at(when: float) -> str:  # a fresh signer: no cached token
        return VapidSigner(gateway_key, SUBJECT).authorization(fake.origin, when)

    cases = [
        ({}, body, 201),
        ({"Authorization": other.authorization(fake.origin, now)}, body, 403),
        ({"Authorization": signer.authorization("http://127.0.0.1:1", now)}, body, 401),
        ({"Authorization": signed_at(now - 13 * 3600)}, body, 401),  # expired an hour ago
        ({"Authorization": signed_at(now + 13 * 3600)}, body, 401),  # expires in 25 hours
        ({"Authorization": ""}, body, 401),
        ({"TTL": ""}, body, 400),
        ({"Content-Encoding": "aesgcm"}, body, 400),
        ({"Topic": "not a topic!"}, body, 400),
        ({}, body[:-1] + bytes([body[-1] ^ 1]), 400),
    ]
    async with httpx.AsyncClient(timeout=10) as http:
        for changes, content, status in cases:
            headers = {k: v for k, v in {**good, **changes}.items() if v}
            response = await http.post(subscription.endpoint, content=content, headers=headers)
            assert response.status_code == status, (changes, response.text)
    assert [r.payload for r in fake.records if not r.error] == [{"wake": 1}]

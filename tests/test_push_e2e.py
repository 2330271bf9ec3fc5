"""End to end: devices on a real gateway, push through the real provider libraries to the fake
APNs (HTTP/2 over TLS) and the fake FCM on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.client import GatewayClient, SendRefused, connect
from gateway.server import GatewayServer
from push.dispatcher import PushDispatcher
from push.settings import ApnsSettings, FcmSettings
from scripts.fakes import FakeApns, FakeFcm, Reply
from tests.conftest import make_settings, running_server

APNS_TOKEN = "5eed" * 16
FCM_TOKEN = "fcm-token-of-bobs-pixel"
TOPIC = "com.example.app"
Token = Callable[..., str]


@pytest.fixture
async def fake_apns(tmp_path: Path) -> AsyncIterator[FakeApns]:
    fake = FakeApns.create(tmp_path / "apns", topics={TOPIC})
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        nursery.cancel_scope.cancel()


@pytest.fixture
async def fake_fcm(tmp_path: Path) -> AsyncIterator[FakeFcm]:
    fake = FakeFcm(project_id="wake-e2e")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        fake.write_service_account(tmp_path / "service-account.json")
        yield fake
        nursery.cancel_scope.cancel()


def push_to_fakes(fake_apns: FakeApns, fake_fcm: FakeFcm, **push: Any) -> dict[str, Any]:
    """`[push]` sending to both fakes, with no linger wake-up within a test (an hour) and
    `push`'s keys on top."""
    return {
        "apns": ApnsSettings(**fake_apns.settings(topic="com.example.default")),
        "fcm": FcmSettings(**fake_fcm.settings()),
        "linger": 3600.0,
        "request_timeout": 30.0,
        **push,
    }


@pytest.fixture
async def server(
    tmp_path: Path,
    fake_apns: FakeApns,
    fake_fcm: FakeFcm,
) -> AsyncIterator[GatewayServer]:
    settings = make_settings(tmp_path, push=push_to_fakes(fake_apns, fake_fcm, ttl=600))
    async with running_server(settings) as running:
        yield running


def dispatcher(server: GatewayServer) -> PushDispatcher:
    push = server.push
    assert push is not None
    return push


async def register(
    client: GatewayClient, provider: str, token: str | None = None, **kw: Any
) -> None:
    """Register a push token (for ``webpush``, a ``subscription``), and wait until the
    server has stored it (frames are handled in order, so the answer to a later frame
    means the token is committed)."""
    await client.register_push(provider, token, **kw)
    with pytest.raises(SendRefused):
        await client.send("nobody-at-all", b"barrier")


async def go_idle(
    server: GatewayServer, token: Token, provider: str, push_token: str | None = None,
    *, device: str = "phone", **kw: Any,
) -> None:  # fmt: skip
    """Bob's `device` connects, registers its push token (or subscription) and goes away."""
    closed = trio.Event()

    async def watch() -> None:
        await server.edge.wait_for_close("bob", device)
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        async with connect(server.url, token("bob", device), reconnect=False) as bob:
            await register(bob, provider, push_token, **kw)
        await closed.wait()


async def test_apns_end_to_end(server: GatewayServer, token: Token, fake_apns: FakeApns) -> None:
    await go_idle(server, token, "apns", APNS_TOKEN, topic=TOPIC)
    async with connect(server.url, token("alice", "phone")) as alice:
        before = int(time.time())
        with trio.fail_after(10):
            await alice.send("bob", b"ciphertext", urgent=True)
            (record,) = await fake_apns.wait_requests(1)
        assert record.token == APNS_TOKEN
        h = record.headers
        assert (h["apns-push-type"], h["apns-priority"]) == ("alert", "10")
        assert h["apns-topic"] == TOPIC
        assert h["apns-collapse-id"] == "incoming-message"
        assert before + 600 <= int(h["apns-expiration"]) <= int(time.time()) + 600
        assert record.payload == {
            "aps": {"alert": {"loc-key": "NEW_MESSAGE"}, "mutable-content": 1, "sound": "default"}
        }
        assert b"ciphertext" not in str(record).encode() and "alice" not in str(record.payload)

        async with connect(server.url, token("bob", "phone")) as bob:
            with trio.fail_after(10):
                await bob.wait_drained()
                (delivery,) = bob.take_buffered()
                assert delivery.frame["body"] == b"ciphertext"
                await alice.send("bob", b"while connected", urgent=True)
                assert (await bob.next_delivery()).frame["body"] == b"while connected"
                await dispatcher(server).wait_idle()
        assert len(fake_apns.records) == 1
        assert dispatcher(server).counters[("apns", "sent_alert")] == 1


async def test_fcm_end_to_end(server: GatewayServer, token: Token, fake_fcm: FakeFcm) -> None:
    await go_idle(server, token, "fcm", FCM_TOKEN)
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(10):
            await alice.send("bob", b"ciphertext", urgent=False)
            (record,) = await fake_fcm.wait_requests(1)
        assert record.project == "wake-e2e"
        assert record.message == {
            "token": FCM_TOKEN,
            "data": {"wake": "1"},
            "android": {"priority": "normal", "ttl": "600s", "collapse_key": "incoming-message"},
        }
        async with connect(server.url, token("bob", "phone")) as bob:
            with trio.fail_after(10):
                await bob.wait_drained()
                assert [d.frame["body"] for d in bob.take_buffered()] == [b"ciphertext"]
                await dispatcher(server).wait_idle()
        assert len(fake_fcm.records) == 1


async def test_a_410_clears_the_token(
    server: GatewayServer, token: Token, fake_apns: FakeApns
) -> None:
    fake_apns.script.add(Reply(410, "Unregistered"), token=APNS_TOKEN)
    await go_idle(server, token, "apns", APNS_TOKEN, topic=TOPIC)
    store = server.store
    assert await store.push_token("bob", "phone") is not None
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(10):
            await alice.send("bob", b"x")
            await fake_apns.wait_requests(1)
            await dispatcher(server).wait_idle()
    assert await store.push_token("bob", "phone") is None
    assert dispatcher(server).counters[("apns", "token_cleared")] == 1


async def test_a_token_registered_again_survives_a_late_410(
    server: GatewayServer, token: Token, fake_apns: FakeApns
) -> None:
    answer = trio.Event()
    fake_apns.script.add(Reply(410, "Unregistered", gate=answer), token=APNS_TOKEN)
    await go_idle(server, token, "apns", APNS_TOKEN, topic=TOPIC)
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(10):
            await alice.send("bob", b"x")
            await fake_apns.wait_requests(1)  # pushed; APNs holds its 410 back
            async with connect(server.url, token("bob", "phone")) as bob:
                await register(bob, "apns", APNS_TOKEN, topic=TOPIC)  # the app registers again
            answer.set()
            await dispatcher(server).wait_idle()
    stored = await server.store.push_token("bob", "phone")
    assert stored is not None and stored.token == APNS_TOKEN
    assert dispatcher(server).counters[("apns", "token_kept")] == 1


async def test_a_hanging_apns_does_not_delay_delivery_to_online_devices(
    tmp_path: Path, fake_apns: FakeApns, token: Token
) -> None:
    fake_apns.script.default = Reply.hang()
    settings = make_settings(
        tmp_path,
        push={
            "apns": ApnsSettings(**fake_apns.settings()),
            "workers": 2,
            "queue_size": 4,
            "request_timeout": 60.0,
        },
    )
    async with running_server(settings) as server:
        for i in range(8):  # more idle devices than workers and queue together
            async with connect(server.url, token(f"idle{i}", "phone")) as idle:
                await register(idle, "apns", f"{i:064x}", topic=TOPIC)
        async with (
            connect(server.url, token("carol", "phone")) as carol,
            connect(server.url, token("alice", "phone")) as alice,
        ):
            for i in range(8):
                await alice.send(f"idle{i}", b"x")
            with trio.fail_after(10):
                await fake_apns.wait_requests(2)  # both workers are stuck on APNs
            started = trio.current_time()
            with trio.fail_after(5):
                for n in range(20):
                    await alice.send("carol", f"{n}".encode())
                    assert (await carol.next_delivery()).frame["body"] == f"{n}".encode()
            assert trio.current_time() - started < 5
            push = dispatcher(server)
            assert push.metrics()["in_flight"] == 2 and push.dropped >= 2


async def test_the_time_from_wake_up_to_connection_is_measured(
    server: GatewayServer, token: Token, fake_apns: FakeApns
) -> None:
    await go_idle(server, token, "apns", APNS_TOKEN, topic=TOPIC)
    async with connect(server.url, token("alice", "phone")) as alice:
        with trio.fail_after(10):
            await alice.send("bob", b"ciphertext", urgent=True)
            await fake_apns.wait_requests(1)
            await dispatcher(server).wait_idle()
        async with connect(server.url, token("bob", "phone")) as bob:
            await bob.wait_drained()

    counts = {
        (s.labels["provider"], s.labels["kind"]): s.value
        for metric in dispatcher(server).answers.latency.collect()
        for s in metric.samples
        if s.name.endswith("_count")
    }
    assert counts == {("apns", "alert"): 1.0}
    assert dispatcher(server).metrics()["unanswered"] == {}


async def test_a_read_on_the_tablet_clears_the_alerted_phone(
    server: GatewayServer, token: Token, fake_apns: FakeApns
) -> None:
    async with connect(server.url, token("bob", "tablet")) as tablet:
        await go_idle(server, token, "apns", APNS_TOKEN, topic=TOPIC)
        async with connect(server.url, token("alice", "phone")) as alice:
            with trio.fail_after(10):
                sent = await alice.send("bob", b"ciphertext", urgent=True)
                (alert,) = await fake_apns.wait_requests(1)
                assert alert.headers["apns-push-type"] == "alert"
                assert (await tablet.next_delivery()).frame["id"] == sent.id

                await tablet.read("alice", [sent.id])
                (_, clear) = await fake_apns.wait_requests(2)
                await dispatcher(server).wait_idle()
        h = clear.headers
        assert (clear.token, h["apns-push-type"], h["apns-priority"]) == (
            APNS_TOKEN, "background", "5"
        )  # fmt: skip
        assert clear.payload == {"aps": {"content-available": 1}, "clear": 1}
        assert tablet.take_buffered() == []  # the reading device gets no copy of its read

    assert dispatcher(server).metrics()["clears"] == 1
    async with httpx.AsyncClient(base_url=server.admin_url) as http:
        exposition = (await http.get("/metrics")).text
    assert "gateway_push_clears_total 1.0" in exposition

    async with connect(server.url, token("bob", "phone")) as phone:
        with trio.fail_after(10):
            await phone.wait_drained()
        frames = [d.frame for d in phone.take_buffered()]
    assert [(f["t"], f.get("id")) for f in frames] == [("msg", sent.id), ("receipt", None)]
    receipt = frames[1]
    assert (receipt["kind"], receipt["ids"], receipt["by"], receipt["dev"]) == (
        "read", [sent.id], "bob", "tablet"
    )  # fmt: skip
    assert len(fake_apns.records) == 2  # one alert, one clear: nothing more

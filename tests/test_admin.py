"""The admin and backend HTTP API over real sockets: probes, metrics, publishing, devices."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected

from gateway.auth import mint_token
from gateway.client import ClientClosed, SendRefused, connect
from gateway.errors import StoreError
from gateway.server import GatewayServer
from gateway.settings import Settings
from gateway.store import Envelope, SendOutcome, Ticket
from push.settings import ApnsSettings
from scripts.fakes import FakeApns
from tests.conftest import make_settings, running_server
from tests.rawws import close_code, hello, raw_ws
from tests.test_push_e2e import APNS_TOKEN, TOPIC, fake_apns, go_idle  # noqa: F401 (a fixture)

API_KEY = "test-admin-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}


def admin_settings(tmp_path: Path, **sections: Any) -> Settings:
    admin = {"port": 0, "api_key": API_KEY}
    admin.update(sections.pop("admin", {}))
    return make_settings(tmp_path, admin=admin, **sections)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[GatewayServer]:
    async with running_server(admin_settings(tmp_path)) as running:
        yield running


@pytest.fixture
async def http(server: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.admin_url, timeout=10) as client:
        yield client


def token(server: GatewayServer, user: str, device: str) -> str:
    return mint_token(server.settings.auth, user, device)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, sorted labels), parsed with prometheus-client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- probes ------------------------------------------------------------------------------


async def test_probes_need_no_key(http: httpx.AsyncClient) -> None:
    health = await http.get("/healthz")
    ready = await http.get("/readyz")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert (await http.get("/metrics")).status_code == 200


async def test_readiness_turns_false_during_the_drain_while_liveness_stays_true(
    tmp_path: Path,
) -> None:
    settings = admin_settings(tmp_path, server={"port": 0, "drain_seconds": 4.0})
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
        raw_ws(server.url) as a,
        raw_ws(server.url) as b,
    ):
        # Two connections: the drain is still spreading its closes while we look.
        await hello(a, token(server, "a", "phone"))
        await hello(b, token(server, "b", "phone"))
        assert (await http.get("/readyz")).status_code == 200

        server.shutdown()
        with trio.fail_after(5):
            while (ready := await http.get("/readyz")).status_code == 200:
                await trio.sleep(0.01)
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "reason": "draining"}
        assert (await http.get("/healthz")).status_code == 200
        assert scrape((await http.get("/metrics")).text)[("gateway_draining", ())] == 1


async def test_readiness_is_false_while_the_store_does_not_answer(
    server: GatewayServer, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreachable() -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(server.store, "ping", unreachable)
    ready = await http.get("/readyz")
    assert (ready.status_code, ready.json()) == (503, {"ready": False, "reason": "store_unreachable"})  # fmt: skip
    monkeypatch.undo()
    assert (await http.get("/readyz")).status_code == 200


# -- metrics -------------------------------------------------------------------------------


async def test_metrics_parse_and_the_counters_move(
    tmp_path: Path,
) -> None:
    settings = admin_settings(tmp_path, limits={"max_connections": 2})
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
    ):
        before = scrape((await http.get("/metrics")).text)
        async with (
            connect(server.url, token(server, "bob", "phone")) as bob,
            connect(server.url, token(server, "alice", "phone")) as alice,
        ):
            for i in range(5):
                await alice.send("bob", b"x", id=f"m{i}")
            await alice.send("bob", b"x", id="m0")  # a duplicate
            for _ in range(5):
                await bob.next_delivery()
            with pytest.raises(ConnectionRejected):
                async with raw_ws(server.url):
                    pass
            response = await http.get("/metrics")
        after = scrape(response.text)

    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert after[("gateway_connections", (("state", "authenticated"),))] == 2
    assert moved("gateway_connections_opened_total") == 2
    assert moved("gateway_sends_total", outcome="stored") == 5
    assert moved("gateway_sends_total", outcome="duplicate") == 1
    assert moved("gateway_frames_total", direction="in") >= 6
    assert moved("gateway_frames_total", direction="out") >= 11  # welcome, drained, sent, msg
    assert moved("gateway_messages_total", direction="in") >= 6
    assert moved("gateway_messages_total", direction="out") >= 2
    assert moved("gateway_connections_refused_total", reason="max_connections") == 1
    assert moved("gateway_store_commit_seconds_count") >= 1
    assert moved("gateway_store_batch_size_sum") >= 6
    assert (
        after[("gateway_store_commit_seconds_bucket", (("le", "+Inf"),))]
        == after[("gateway_store_commit_seconds_count", ())]
    )
    for gauge in (
        "gateway_event_loop_lag_seconds",
        "gateway_event_loop_lag_average_seconds",
        "gateway_store_queue_depth",
        "gateway_push_queue_depth",
        "gateway_outbox_frames",
    ):
        assert (gauge, ()) in after
    assert ("gateway_shed_total", (("kind", "typing"),)) not in before  # nothing shed yet


@pytest.mark.parametrize("refused_at", ["submission", "commit"])
async def test_a_send_the_store_refuses_counts_as_failed_from_a_device_and_from_the_api(
    server: GatewayServer,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    refused_at: str,
) -> None:
    async def refuse(envelope: Envelope) -> Ticket[SendOutcome]:
        if refused_at == "submission":
            raise StoreError("redis is unavailable")
        ticket: Ticket[SendOutcome] = Ticket()
        ticket.fail(StoreError("redis is unavailable"))
        return ticket

    monkeypatch.setattr(server.store, "submit_send", refuse)
    async with connect(server.url, token(server, "alice", "phone")) as alice:
        with pytest.raises(SendRefused) as refused:
            await alice.send("bob", b"x", id="m1")
    published = await http.post("/v1/messages", json={"to": "bob", "body": b64(b"x")}, headers=AUTH)

    assert refused.value.frame == {
        "t": "error",
        "code": "internal",
        "ref": "m1",
        "reason": "store unavailable; not stored",
    }
    assert (published.status_code, published.json()) == (
        503,
        {"error": "store_unavailable", "detail": "not stored; retry with the same id"},
    )
    assert server.counters.sends == {"failed": 2}


# -- authentication and bad requests --------------------------------------------------------


async def test_the_backend_api_requires_the_bearer_key(http: httpx.AsyncClient) -> None:
    body = {"to": "bob", "body": b64(b"x")}

    missing = await http.post("/v1/messages", json=body)
    wrong = await http.post("/v1/messages", json=body, headers={"authorization": "Bearer nope"})
    listing = await http.get("/v1/users/bob/devices")

    for response in (missing, wrong, listing):
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_without_a_configured_key_the_backend_api_is_off(tmp_path: Path) -> None:
    async with (
        running_server(make_settings(tmp_path)) as server,
        httpx.AsyncClient(base_url=server.admin_url) as http,
    ):
        response = await http.get("/v1/users/bob/devices", headers=AUTH)
        assert (response.status_code, response.json()["error"]) == (403, "disabled")
        assert (await http.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "bad_json"),
        (b"[1, 2]", 400, "bad_json"),
        (b'{"body": "eA=="}', 400, "bad_field"),
        (b'{"to": "bob"}', 400, "bad_field"),
        (b'{"to": 7, "body": "eA=="}', 400, "bad_field"),
        (b'{"to": "bob", "body": "not base64!"}', 400, "bad_field"),
        (b'{"to": "bob", "body": "eA==", "ttl": true}', 400, "bad_field"),
        (b'{"to": "bob", "body": "eA==", "ttl": 0}', 400, "bad_field"),
        (b'{"to": "bob", "body": "eA==", "ttl": 999999999}', 400, "bad_field"),
        (b'{"to": "bob", "body": "eA==", "urgent": "yes"}', 400, "bad_field"),
        (b'{"to": "bob", "body": "eA==", "id": ""}', 400, "bad_field"),
        (b'{"to": "", "body": "eA=="}', 400, "bad_field"),
        (b'{"to": "nobody", "body": "eA=="}', 404, "unknown_recipient"),
    ],
)
async def test_bad_publish_requests_get_json_errors(
    http: httpx.AsyncClient, body: bytes, status: int, code: str
) -> None:
    response = await http.post("/v1/messages", content=body, headers=AUTH)

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == code
    assert response.json()["detail"]


async def test_publish_takes_the_id_and_user_limits_of_the_device_protocol(
    http: httpx.AsyncClient,
) -> None:
    async def publish(**fields: str) -> httpx.Response:
        payload = {"to": "nobody", "body": b64(b"x"), **fields}
        return await http.post("/v1/messages", json=payload, headers=AUTH)

    # At the limit the request is valid (and the recipient unknown); past it, refused.
    assert (await publish(id="i" * 64)).status_code == 404
    assert (await publish(to="u" * 128)).status_code == 404
    long_id, long_user = await publish(id="i" * 65), await publish(to="u" * 129)
    assert (long_id.status_code, long_id.json()) == (
        400,
        {"error": "bad_field", "detail": "id must be 1..64 bytes"},
    )
    assert (long_user.status_code, long_user.json()) == (
        400,
        {"error": "bad_field", "detail": "a user id is 1..128 bytes"},
    )


async def test_unknown_paths_wrong_methods_and_huge_bodies(http: httpx.AsyncClient) -> None:
    assert (await http.get("/nope")).status_code == 404
    wrong = await http.get("/v1/messages", headers=AUTH)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    huge = await http.post("/v1/messages", content=b"x" * 1_000_000, headers=AUTH)
    assert (huge.status_code, huge.json()["error"]) == (413, "too_large")
    # The server is still fine afterwards.
    assert (await http.get("/healthz")).status_code == 200


# -- publishing ----------------------------------------------------------------------------


async def test_publish_to_an_online_device_arrives_as_an_ordinary_msg_once(
    server: GatewayServer, http: httpx.AsyncClient
) -> None:
    async with connect(server.url, token(server, "bob", "phone")) as bob:
        payload = {"to": "bob", "body": b64(b"\x00server\xff"), "urgent": False, "id": "n-1"}
        response = await http.post("/v1/messages", json=payload, headers=AUTH)

        assert response.status_code == 202
        answer = response.json()
        assert answer["id"] == "n-1" and isinstance(answer["ts"], int)
        with trio.fail_after(10):
            delivery = await bob.next_delivery()
        frame = delivery.frame
        assert (frame["t"], frame["id"], frame["from"], frame["dev"]) == ("msg", "n-1", "system", "server")  # fmt: skip
        assert (frame["body"], frame["urgent"], frame["ts"]) == (b"\x00server\xff", False, answer["ts"])  # fmt: skip

        again = await http.post("/v1/messages", json=payload, headers=AUTH)
        assert again.status_code == 202
        assert again.json() == {"id": "n-1", "ts": answer["ts"], "duplicate": True}
    # Acked once, stored once: nothing is left for bob.
    assert await server.store.count("bob", "phone", 0) == 0


async def test_publish_is_durable_before_202_and_wakes_an_idle_device(
    tmp_path: Path, fake_apns: FakeApns
) -> None:
    settings = admin_settings(
        tmp_path,
        push={"apns": ApnsSettings(**fake_apns.settings(topic=TOPIC)), "linger": 3600.0},
    )
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
    ):
        await go_idle(server, lambda u, d: token(server, u, d), "apns", APNS_TOKEN, topic=TOPIC)
        response = await http.post(
            "/v1/messages", json={"to": "bob", "body": b64(b"wake")}, headers=AUTH
        )
        assert response.status_code == 202
        # Durable before the answer: it is in the store the moment we hear back.
        assert await server.store.count("bob", "phone", 0) == 1
        with trio.fail_after(10):
            (record,) = await fake_apns.wait_requests(1)
        assert record.token == APNS_TOKEN
        assert record.headers["apns-push-type"] == "alert"  # urgent by default
        assert b"wake" not in str(record).encode()
        async with connect(server.url, token(server, "bob", "phone")) as bob:
            with trio.fail_after(10):
                delivery = await bob.next_delivery()
            assert delivery.frame["body"] == b"wake"


# -- devices -------------------------------------------------------------------------------


async def test_pre_register_then_list_devices_without_their_tokens(
    server: GatewayServer, http: httpx.AsyncClient
) -> None:
    created = await http.put("/v1/users/carol/devices/tablet", headers=AUTH)
    again = await http.put("/v1/users/carol/devices/tablet", headers=AUTH)
    assert (created.status_code, created.json()["created"]) == (201, True)
    assert (again.status_code, again.json()["created"]) == (200, False)

    # A pre-registered device can be sent to before it ever connects.
    async with connect(server.url, token(server, "alice", "phone")) as alice:
        await alice.send("carol", b"early")
    async with connect(server.url, token(server, "carol", "phone")) as carol:
        await carol.register_push("fcm", "secret-push-token-123")
        await carol.send("carol", b"barrier")  # answered after the token is committed
        listing = await http.get("/v1/users/carol/devices", headers=AUTH)

    assert listing.status_code == 200
    devices = {d["device"]: d for d in listing.json()["devices"]}
    assert set(devices) == {"phone", "tablet"}
    assert devices["phone"]["has_push"] is True
    assert devices["phone"]["connected_here"] is True
    assert devices["tablet"] == {
        "device": "tablet",
        "created": devices["tablet"]["created"],
        "last_seen": devices["tablet"]["last_seen"],
        "has_push": False,
        "push_provider": None,
        "connected_here": False,
    }
    assert devices["phone"]["last_seen"] >= devices["phone"]["created"]
    assert "secret-push-token-123" not in listing.text
    assert await server.store.count("carol", "tablet", 0) == 2  # early + barrier


async def test_revocation_kicks_the_live_connection_and_forgets_the_device(
    server: GatewayServer, http: httpx.AsyncClient
) -> None:
    async with connect(server.url, token(server, "dave", "phone")) as keep:
        async with connect(server.url, token(server, "dave", "laptop")) as laptop:
            closed = trio.Event()

            async def watch() -> None:
                await server.edge.wait_for_close("dave", "laptop")
                closed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await trio.testing.wait_all_tasks_blocked()
                response = await http.delete("/v1/users/dave/devices/laptop", headers=AUTH)
                with trio.fail_after(10):
                    await closed.wait()
            assert response.json() == {
                "user": "dave",
                "device": "laptop",
                "revoked": True,
                "kicked": True,
            }
            with trio.fail_after(10):
                with pytest.raises(ClientClosed):
                    await laptop.wait_drained()  # the client stops for good on 4001
            assert laptop.close_code == 4001
        listing = await http.get("/v1/users/dave/devices", headers=AUTH)
        assert [d["device"] for d in listing.json()["devices"]] == ["phone"]
        assert keep.final is None  # the user's other device is untouched

    gone = await http.delete("/v1/users/dave/devices/laptop", headers=AUTH)
    assert (gone.status_code, gone.json()["error"]) == (404, "unknown_device")


async def test_ids_with_slashes_and_unicode_are_path_segments(
    server: GatewayServer, http: httpx.AsyncClient
) -> None:
    response = await http.put("/v1/users/a%2Fb%20%C3%A9/devices/d%2F1", headers=AUTH)
    assert response.json() == {"user": "a/b é", "device": "d/1", "created": True}
    too_long = await http.put(f"/v1/users/{'u' * 129}/devices/d", headers=AUTH)
    assert too_long.status_code == 400


async def test_every_metric_in_the_dashboard_and_the_docs_is_exported(tmp_path: Path) -> None:
    import re

    from scripts.fakes.credentials import CertificateAuthority

    root = Path(__file__).resolve().parent.parent
    named = set(re.findall(r"gateway_[a-z_]+", (root / "config" / "grafana-dashboard.json").read_text()))  # fmt: skip
    named |= set(re.findall(r"`(gateway_[a-z_]+)`", (root / "docs" / "operations.md").read_text()))  # fmt: skip
    ca = CertificateAuthority.create()
    cert_pem, key_pem = ca.issue("gateway", hosts=("127.0.0.1",))
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    server_keys = {"port": 0, "tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "k.pem"}
    async with (
        running_server(admin_settings(tmp_path, server=server_keys)) as server,
        httpx.AsyncClient(base_url=server.admin_url) as http,
    ):
        families = {f.name for f in text_string_to_metric_families((await http.get("/metrics")).text)}  # fmt: skip
    exported = families | {f"{name}_total" for name in families}
    for suffix in ("_bucket", "_sum", "_count"):
        exported |= {f"{name}{suffix}" for name in families}
    missing = {name for name in named if name not in exported}
    missing.discard("gateway_redis_events_total")  # exported on the Redis backend only
    assert not missing


async def test_a_busy_admin_port_is_logged_and_devices_are_served_anyway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = trio.socket.socket()
    await holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        with caplog.at_level(logging.ERROR, logger="gateway.admin"):
            settings = admin_settings(tmp_path, admin={"port": busy})
            async with running_server(settings) as server:
                assert server.admin_port is None
                async with connect(server.url, token(server, "bob", "phone")) as bob:
                    assert bob.welcome is not None
        assert any("cannot listen" in r.getMessage() for r in caplog.records)
    finally:
        holder.close()


async def test_a_revoked_device_cannot_come_back_with_its_old_token(
    server: GatewayServer, http: httpx.AsyncClient
) -> None:
    old_token = token(server, "erin", "phone")
    async with connect(server.url, old_token, reconnect=False):
        pass
    assert (await http.delete("/v1/users/erin/devices/phone", headers=AUTH)).status_code == 200

    with pytest.raises(ClientClosed) as refused:
        async with connect(server.url, old_token, reconnect=False):
            pass
    assert refused.value.code == 4001


async def test_revocation_on_one_node_closes_the_device_on_another(
    tmp_path: Path, redis_url: str
) -> None:
    from tests.test_cluster import DEADLINE, cluster_settings
    from tests.wakers import LogWaker

    settings = cluster_settings(tmp_path, redis_url, admin={"port": 0, "api_key": API_KEY})
    async with (
        running_server(settings, waker=LogWaker()) as a,
        running_server(settings, waker=LogWaker()) as b,
        httpx.AsyncClient(base_url=b.admin_url, timeout=10) as http_b,
        raw_ws(a.url) as phone,
    ):
        await hello(phone, token(a, "frank", "phone"))

        response = await http_b.delete("/v1/users/frank/devices/phone", headers=AUTH)

        assert response.json()["kicked"] is True
        with trio.fail_after(DEADLINE):
            assert await close_code(phone) == 4001
        assert b.counters.redis["revocations_sent"] == 1
        assert a.counters.redis["revocations_received"] == 1


async def test_readiness_follows_the_redis_store_down_and_back(tmp_path: Path) -> None:
    from tests.redisproc import RedisProcess
    from tests.wakers import LogWaker

    redis = RedisProcess(tmp_path / "redis")
    await redis.astart()
    settings = admin_settings(tmp_path, store={"backend": "redis", "redis_url": redis.url})
    try:
        async with (
            running_server(settings, waker=LogWaker()) as server,
            httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
        ):
            assert (await http.get("/readyz")).status_code == 200
            redis.kill()
            with trio.fail_after(20):
                while (ready := await http.get("/readyz")).status_code == 200:
                    await trio.sleep(0.05)
            assert ready.json() == {"ready": False, "reason": "store_unreachable"}
            assert (await http.get("/healthz")).status_code == 200  # alive: do not restart

            await redis.astart()
            with trio.fail_after(30):
                while (await http.get("/readyz")).status_code != 200:
                    await trio.sleep(0.1)
    finally:
        redis.kill()

"""Authorization over real sockets: no one reads, deletes or marks what isn't theirs.

Every test runs on each store backend: SQLite, and Redis on a real redis-server.

Each attack runs against a gateway where a victim has data at stake (a queued message, a
pending receipt, a hidden presence). The attack must be refused with the contract's answer,
and afterwards the victim's data must be exactly what it was.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed

from gateway.auth import mint_token
from gateway.client import connect
from gateway.server import GatewayServer
from gateway.settings import AuthSettings, Settings
from tests.conftest import make_settings, running_server
from tests.rawws import close_code, hello, raw_ws, recv_until, send


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every attack runs against each store backend."""
    return str(request.param)


def backend_settings(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, **sections: Any
) -> Settings:
    settings = make_settings(tmp_path, **sections)
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        settings = settings.replace(store={"backend": "redis", "redis_url": url})
    return settings


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> Settings:
    return backend_settings(request, tmp_path, backend)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, HMAC-SHA256-signed with `key` (or unsigned)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def bob_claims(**override: Any) -> dict[str, Any]:
    return {"sub": "bob", "dev": "phone", "exp": int(time.time()) + 3600, **override}


async def queue_for_bob(server: GatewayServer, token: Any) -> None:
    """bob's phone is known and has one message waiting: what an attacker would want."""
    async with connect(server.url, token("bob", "phone")):
        pass
    async with connect(server.url, token("alice", "phone")) as alice:
        await alice.send("bob", b"for bob only", id="secret")


async def bobs_queue(server: GatewayServer) -> list[tuple[str, bytes]]:
    """What bob's phone has queued, read straight from the store."""
    items = await server.store.fetch("bob", "phone", 0, 100, 0)
    return [(i.msg_id, i.body) for i in items]


async def refused_with_4001(url: str, token: str) -> None:
    async with raw_ws(url) as ws:
        await send(ws, {"t": "hello", "v": 1, "token": token})
        assert await close_code(ws) == 4001


@pytest.mark.parametrize(
    "attack",
    ["alg-none", "alg-none-signed", "expired", "bad-signature", "wrong-secret", "no-exp",
     "tampered-sub"],
)  # fmt: skip
async def test_forged_hs256_tokens_are_refused_and_change_nothing(server, token, attack):
    await queue_for_bob(server, token)
    secret = server.settings.auth.jwt_secret.encode()
    good = mint_token(server.settings.auth, "mallory", "phone")
    forged = {
        "alg-none": forge({"alg": "none", "typ": "JWT"}, bob_claims(), None),
        "alg-none-signed": forge({"alg": "none"}, bob_claims(), secret),
        "expired": forge({"alg": "HS256"}, bob_claims(exp=int(time.time()) - 3600), secret),
        "bad-signature": forge({"alg": "HS256"}, bob_claims(), secret)[:-4] + "AAAA",
        "wrong-secret": forge({"alg": "HS256"}, bob_claims(), b"guessed-secret"),
        "no-exp": forge({"alg": "HS256"}, {"sub": "bob", "dev": "phone"}, secret),
        # mallory's genuine token with the payload swapped for bob's claims
        "tampered-sub": ".".join(
            [good.split(".")[0], b64url(json.dumps(bob_claims()).encode()), good.split(".")[2]]
        ),
    }[attack]

    await refused_with_4001(server.url, forged)

    assert await bobs_queue(server) == [("secret", b"for bob only")]
    assert server.registry.get("bob", "phone") is None


async def test_rs256_gateway_refuses_hs256_keyed_with_its_public_key_and_alg_none(
    request, tmp_path, backend
):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "jwt.pub").write_bytes(public_pem)
    (tmp_path / "jwt.key").write_bytes(private_pem)
    auth = AuthSettings(
        jwt_algorithm="RS256",
        jwt_public_key_file=tmp_path / "jwt.pub",
        jwt_private_key_file=tmp_path / "jwt.key",
    )
    settings = backend_settings(request, tmp_path, backend, auth=auth)
    async with running_server(settings) as server:
        async with connect(server.url, mint_token(auth, "bob", "phone")) as bob:
            assert bob.welcome is not None and bob.welcome["user"] == "bob"  # genuine works
        for forged in (
            forge({"alg": "HS256", "typ": "JWT"}, bob_claims(), public_pem),
            forge({"alg": "none"}, bob_claims(), None),
            jwt.encode(bob_claims(), "any-shared-secret-of-at-least-32-bytes", algorithm="HS256"),
        ):
            await refused_with_4001(server.url, forged)
        assert server.counters.closes[4001] == 3


async def test_a_token_replayed_after_revocation_is_refused_and_a_newer_one_admitted(
    request, tmp_path, backend
):
    key = "admin-key-for-the-revocation-test"
    settings = backend_settings(request, tmp_path, backend, admin={"port": 0, "api_key": key})
    auth = settings.auth
    async with running_server(settings) as server:
        stolen = mint_token(auth, "bob", "phone")  # issued now, before the revocation
        async with connect(server.url, mint_token(auth, "bob", "tablet")):
            pass
        await queue_for_bob(server, lambda user, device: mint_token(auth, user, device))
        async with (
            httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
            raw_ws(server.url) as ws,
        ):
            await hello(ws, stolen)
            revoked = int(time.time())
            answer = await http.delete(
                "/v1/users/bob/devices/phone", headers={"authorization": f"Bearer {key}"}
            )
            assert answer.json()["kicked"] is True
            assert await close_code(ws) == 4001

        await refused_with_4001(server.url, stolen)

        assert [d.device for d in await server.store.devices("bob")] == ["tablet"]
        assert await bobs_queue(server) == []
        assert len(await server.store.fetch("bob", "tablet", 0, 10, 0)) == 1
        # A token issued after the revocation (the phone enrolled again) is admitted.
        fresh = jwt.encode(bob_claims(iat=revoked + 1), auth.jwt_secret, algorithm="HS256")
        async with raw_ws(server.url) as ws:
            frames = await hello(ws, fresh)
        assert frames[0]["user"] == "bob" and frames[0]["queued"] == 0


async def test_hello_fields_beside_the_token_cannot_choose_the_identity(server, token):
    await queue_for_bob(server, token)
    async with raw_ws(server.url) as ws:
        await send(
            ws,
            {"t": "hello", "v": 1, "token": token("mallory", "phone"), "user": "bob",
             "sub": "bob", "dev": "phone", "device": "phone"},
        )  # fmt: skip
        frames = await recv_until(ws, "drained")
    assert (frames[0]["user"], frames[0]["device"]) == ("mallory", "phone")
    assert [f["t"] for f in frames] == ["welcome", "drained"]
    assert await bobs_queue(server) == [("secret", b"for bob only")]


async def test_a_device_cannot_ack_the_items_of_another_device_of_the_same_user(server, token):
    async with connect(server.url, token("bob", "tablet")):
        pass
    await queue_for_bob(server, token)  # "secret" is queued for the phone and the tablet
    async with connect(server.url, token("alice", "phone")) as alice:
        for n in range(3):  # and three more for the phone alone
            await alice.send("bob", b"phone only", bodies={"phone": b"phone only"}, id=f"p{n}")
    store = server.store
    phone_before = await store.fetch("bob", "phone", 0, 10, 0)
    [tablet_item] = await store.fetch("bob", "tablet", 0, 10, 0)
    # sids are per receiving device: the phone's that are not also the tablet's own
    foreign = [i.sid for i in phone_before if i.sid != tablet_item.sid]

    async with raw_ws(server.url) as ws:
        await hello(ws, token("bob", "tablet"))
        await send(ws, {"t": "ack", "sids": foreign})
        await send(ws, {"t": "send", "id": "barrier", "to": "nobody", "body": b""})
        await recv_until(ws, "error")  # frames are handled in order: the ack is committed

    assert len(foreign) >= 3
    assert await store.fetch("bob", "phone", 0, 10, 0) == phone_before
    assert await store.fetch("bob", "tablet", 0, 10, 0) == [tablet_item]


async def test_read_frames_naming_ids_sent_to_someone_else_queue_nothing(server, token):
    async with (
        connect(server.url, token("bob", "phone")),
        connect(server.url, token("mallory", "phone")),
    ):
        pass
    async with (
        connect(server.url, token("alice", "phone"), auto_ack=False) as alice,
        connect(server.url, token("bob", "phone")) as bob,
        connect(server.url, token("mallory", "phone")) as mallory,
    ):
        await alice.send("bob", b"for bob", id="to-bob")
        await alice.send("mallory", b"for mallory", id="to-mallory")
        await bob.next_delivery()
        await mallory.next_delivery()
        # alice's device now holds two delivered receipts; nothing else may arrive.
        delivered = [(await alice.next_delivery()).frame for _ in range(2)]
        assert sorted(f["kind"] for f in delivered) == ["delivered", "delivered"]

        await mallory.read("alice", ["to-bob", "guessed-id"])  # not mallory's to read
        await mallory.read("alice", ["to-mallory"])  # hers: this one counts
        receipt = (await alice.next_delivery()).frame

    assert (receipt["kind"], receipt["by"], receipt["ids"]) == ("read", "mallory", ["to-mallory"])
    queued = await server.store.fetch("alice", "phone", 0, 100, 0)
    read_ids = [i.ids for i in queued if i.kind.name == "READ"]
    assert read_ids == [("to-mallory",)]


async def test_subscribing_to_a_user_who_hides_presence_reveals_nothing(
    request, tmp_path, backend, token
):
    presence = {"batch_ms": 20, "offline_grace": 0.1}
    settings = backend_settings(request, tmp_path, backend, presence=presence)
    hidden = {"user": "alice", "online": False, "last_seen": None}
    async with running_server(settings) as server:
        url = server.url
        async with connect(url, token("alice", "phone")) as alice:
            await alice._send_frames([{"t": "privacy", "hide_presence": True}])
            async with connect(url, token("mallory", "phone")) as mallory:
                await mallory.subscribe(["alice", "carol"])
                snapshot = await next_presence(mallory)
                assert hidden in snapshot
                # alice's devices come and go; then carol connects, which mallory may see.
                async with connect(url, token("alice", "laptop")):
                    pass
                await alice.aclose()
                async with connect(url, token("carol", "phone")):
                    seen: list[dict[str, Any]] = []
                    while not any(i["user"] == "carol" for i in seen):
                        seen += await next_presence(mallory)
        assert all(item == hidden for item in seen if item["user"] == "alice"), seen


async def next_presence(client: Any) -> list[dict[str, Any]]:
    while True:
        frame = await client.next_event()
        if frame["t"] == "presence":
            items: list[dict[str, Any]] = frame["items"]
            return items


async def test_a_frame_before_hello_cannot_touch_anyone(server, token):
    await queue_for_bob(server, token)
    sids = [i.sid for i in await server.store.fetch("bob", "phone", 0, 10, 0)]
    for frame in (
        {"t": "ack", "sids": sids},
        {"t": "send", "id": "x", "to": "bob", "body": b"spoof"},
        {"t": "read", "to": "alice", "ids": ["secret"]},
    ):
        async with raw_ws(server.url) as ws:
            await send(ws, frame)
            assert await close_code(ws) == 1008
    assert await bobs_queue(server) == [("secret", b"for bob only")]


async def test_a_refused_token_answers_no_more_than_unauthorized(server):
    async with raw_ws(server.url) as ws:
        await send(ws, {"t": "hello", "v": 1, "token": forge({"alg": "none"}, bob_claims(), None)})
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (4001, "unauthorized")

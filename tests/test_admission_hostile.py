"""Floods past the admission limits: the flood is refused, everyone else carries on.

A connection flood past `[limits] max_connections`, a burst of handshakes past
`handshake_rate`, and a device sending past `send_rate`, each while two well-behaved
devices exchange messages over connections opened before the flood.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from gateway.client import connect
from scripts.kit.lean_client import LeanClient
from tests.conftest import make_settings, running_server
from tests.rawws import hello, raw_ws, recv, send


async def _flood(port: int, count: int) -> tuple[Counter[str], list[trio.SocketStream]]:
    """Open `count` upgrades at once; the answers' status lines and the streams admitted."""
    answers: Counter[str] = Counter()
    admitted: list[trio.SocketStream] = []

    async def one() -> None:
        try:
            client = await LeanClient.open(f"ws://127.0.0.1:{port}/ws", subprotocol=None)
            admitted.append(client.stream)
            answers["101"] += 1
        except (HandshakeError, ConnectionClosed, ConnectionError) as refused:
            answers[str(refused).split(" ")[1] if " " in str(refused) else str(refused)] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return answers, admitted


async def _exchange(alice, bob, n: int) -> list[dict]:
    """alice sends `n` messages to bob, which arrive in order; returns what else bob got."""
    others = []
    for i in range(n):
        await alice.send("bob", f"{i}".encode())
        while (frame := (await bob.next_delivery()).frame)["from"] != "alice":
            others.append(frame)
        assert frame["body"] == f"{i}".encode()
    return others


async def test_a_connection_flood_past_the_cap_is_refused_and_others_carry_on(tmp_path, token):
    settings = make_settings(tmp_path, limits={"max_connections": 20, "retry_after": 1})
    async with running_server(settings) as server:
        async with (
            connect(server.url, token("bob", "phone")) as bob,
            connect(server.url, token("alice", "phone")) as alice,
        ):
            answers, admitted = await _flood(server.port, 100)
            with trio.fail_after(10):
                await _exchange(alice, bob, 20)  # the flood is still holding its places
            for stream in admitted:
                await trio.aclose_forcefully(stream)
        assert answers == {"101": 18, "503": 82}, answers
        # The places come back once the flood lets go (the client retries after 503).
        with trio.fail_after(30):
            async with connect(server.url, token("carol", "phone")) as carol:
                assert carol.welcome is not None


async def test_a_handshake_burst_past_the_rate_is_refused(tmp_path, token):
    settings = make_settings(
        tmp_path, limits={"handshake_rate": 1.0, "handshake_burst": 10, "retry_after": 1}
    )
    async with running_server(settings) as server:
        answers, admitted = await _flood(server.port, 60)
        for stream in admitted:
            await trio.aclose_forcefully(stream)
    assert answers["101"] <= 12 and answers["503"] >= 48, answers


async def test_a_device_sending_past_its_rate_is_limited_then_closed_and_others_carry_on(
    tmp_path, token
):
    limits = {"send_rate": 5.0, "send_burst": 5, "rate_limit_strikes": 20}
    settings = make_settings(tmp_path, limits=limits)
    answers: Counter[str] = Counter()
    async with (
        running_server(settings) as server,
        connect(server.url, token("bob", "phone")) as bob,
        connect(server.url, token("alice", "phone")) as alice,
    ):
        async with raw_ws(server.url) as ws:
            await hello(ws, token("mallory", "phone"))
            with contextlib.suppress(ConnectionClosed):  # it may close before all are sent
                for n in range(100):
                    await send(ws, {"t": "send", "id": f"m{n}", "to": "bob", "body": b"spam"})
            try:
                while True:  # the answers already received are read before the close
                    for frame in await recv(ws):
                        answers[frame.get("code", frame["t"])] += 1
            except ConnectionClosed as closed:
                code = closed.reason.code if closed.reason else None
        with trio.fail_after(10):
            spam = await _exchange(alice, bob, 5)  # within her own burst
    # refused with `rate_limited` until the strikes run out (the last one may be the close)
    assert answers["rate_limited"] >= 19 and 1 <= answers["sent"] <= 10, answers
    assert code == 1008
    assert len(spam) <= answers["sent"]  # nothing refused was stored

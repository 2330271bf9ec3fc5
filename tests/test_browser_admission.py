"""What browsers get from admission control: a refused upgrade they can see (1013 or 1012
with a retry hint instead of an HTTP 503 that page scripts cannot read), and a refused
`Origin` that operators can see in the log."""

from __future__ import annotations

import logging
import re

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from gateway.auth import mint_token
from gateway.edge import ORIGIN_LOG_CHARS
from tests.conftest import make_settings, running_server
from tests.rawws import hello, raw_ws, recv_until, send

BROWSER = [(b"origin", b"https://web.example.com")]
HINT = re.compile(r"reconnect_after_ms=(\d+)(?:;|$)")


async def closed_at_once(url: str) -> tuple[int, str]:
    """Open a browser-style upgrade; return the code and reason the server closes it with."""
    with trio.fail_after(10):
        async with raw_ws(url, extra_headers=BROWSER) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
    return info.value.reason.code, info.value.reason.reason or ""


def hint_ms(reason: str) -> int:
    found = HINT.search(reason)
    assert found is not None, reason
    return int(found.group(1))


async def test_over_the_connection_cap_a_browser_upgrade_is_closed_1013_with_the_retry_hint(
    tmp_path,
):
    settings = make_settings(tmp_path, limits={"max_connections": 1, "retry_after": 3})
    async with running_server(settings) as server, raw_ws(server.url) as held:
        await hello(held, mint_token(settings.auth, "a", "phone"))

        code, reason = await closed_at_once(server.url)

        assert code == 1013
        assert reason.startswith("max_connections; ")
        assert 3000 <= hint_ms(reason) <= 6000
        assert server.admission.refused["max_connections"] == 1
        assert server.admission.open == 1  # the refused upgrade took no place
        # A native client (no Origin) still gets the plain HTTP answer.
        with pytest.raises(ConnectionRejected) as rejected:
            async with raw_ws(server.url):
                pass
        assert rejected.value.status_code == 503
        # The held connection is untouched.
        await send(held, {"t": "send", "id": "m1", "to": "a", "body": b"x"})
        assert (await recv_until(held, "sent"))[-1]["id"] == "m1"


async def test_over_the_handshake_rate_a_browser_upgrade_is_closed_1013_with_the_bucket_wait(
    tmp_path,
):
    settings = make_settings(
        tmp_path, limits={"handshake_rate": 0.01, "handshake_burst": 1, "retry_after": 1}
    )
    async with running_server(settings) as server:
        async with raw_ws(server.url, extra_headers=BROWSER) as first:
            assert (await hello(first, mint_token(settings.auth, "a", "tab")))[0]["t"] == "welcome"

        code, reason = await closed_at_once(server.url)

        assert code == 1013
        assert reason.startswith("handshake_rate; ")
        # The bucket refills one token per 100 s: the hint is at least that, jittered.
        assert 100_000 <= hint_ms(reason) <= 200_000
        assert server.admission.refused["handshake_rate"] == 1


async def test_a_browser_upgrade_during_the_drain_is_closed_1012_with_the_retry_hint(tmp_path):
    settings = make_settings(tmp_path, server={"port": 0, "drain_seconds": 4.0})
    async with running_server(settings) as server, raw_ws(server.url) as a, raw_ws(server.url) as b:
        # Two connections: the second is closed 2 s into the drain, so it is still going.
        await hello(a, mint_token(settings.auth, "a", "phone"))
        await hello(b, mint_token(settings.auth, "b", "phone"))
        server.shutdown()
        with trio.fail_after(5):
            while not server.edge.draining:  # noqa: ASYNC110 (a flag, polled with a bound)
                await trio.sleep(0.01)

        code, reason = await closed_at_once(server.url)

        assert code == 1012
        assert reason.startswith("draining; ")
        assert hint_ms(reason) >= 5000
        assert server.admission.refused["draining"] == 1


async def test_a_refused_origin_is_logged_once_per_interval_with_the_count_held_back(
    tmp_path, caplog
):
    settings = make_settings(tmp_path, limits={"allowed_origins": "https://app.example.com"})
    long_origin = "https://evil.example/" + "x" * 500
    caplog.set_level(logging.WARNING, logger="gateway.edge")
    async with running_server(settings) as server:
        for origin in (long_origin, "https://other.example", "https://third.example"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with raw_ws(server.url, extra_headers=[(b"origin", origin.encode())]):
                    pass
            assert rejected.value.status_code == 403

        assert server.admission.refused["origin"] == 3
    lines = [r.getMessage() for r in caplog.records if "allowed_origins" in r.getMessage()]
    assert len(lines) == 1, lines
    assert repr(long_origin[:ORIGIN_LOG_CHARS]) in lines[0]
    assert "x" * 490 not in lines[0]


async def test_the_refused_browser_socket_is_closed_by_the_server_once_the_client_answers(
    tmp_path,
):
    settings = make_settings(tmp_path, limits={"max_connections": 1})
    async with running_server(settings) as server, raw_ws(server.url):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Origin: https://web.example.com\r\n\r\n"
        )
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 4:
            received += await stream.receive_some(4096)
        head, frame = received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101")
        assert frame[0] == 0x88  # FIN + close
        assert int.from_bytes(frame[2:4], "big") == 1013
        # The client's close frame (masked with a zero key), then the server closes TCP
        # at once: well before its 2 s wait for a client that never answers.
        await stream.send_all(bytes([0x88, 0x82, 0, 0, 0, 0]) + (1013).to_bytes(2, "big"))
        with trio.fail_after(1.0):
            while await stream.receive_some(4096):
                pass
        await stream.aclose()

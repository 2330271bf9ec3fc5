"""Admission control and hostile clients against a real gateway on loopback sockets."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, WebSocketConnection

from gateway.auth import mint_token
from gateway.listener import AcceptStats, EdgeListener
from gateway.server import GatewayServer
from tests.conftest import make_settings, running_server
from tests.rawws import close_code, hello, raw_ws, recv, recv_until, send


@asynccontextmanager
async def devices(server: GatewayServer, n: int) -> AsyncIterator[list[WebSocketConnection]]:
    """`n` authenticated raw connections, devices u0/d .. u{n-1}/d."""
    auth = server.settings.auth
    async with AsyncExitStack() as stack:
        conns = []
        for i in range(n):
            ws = await stack.enter_async_context(raw_ws(server.url))
            await hello(ws, mint_token(auth, f"u{i}", "d"))
            conns.append(ws)
        yield conns


async def assert_still_serving(server: GatewayServer, a: WebSocketConnection, b_user: str) -> None:
    """An established connection can still send and be answered."""
    await send(a, {"t": "send", "id": "still-ok", "to": b_user, "body": b"x"})
    frames = await recv_until(a, "sent")
    assert frames[-1]["id"] == "still-ok"


async def refused(server: GatewayServer, **kw: object) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with raw_ws(server.url, **kw):  # type: ignore[arg-type]
            pass
    return info.value


async def test_the_global_cap_refuses_with_503_and_retry_after(tmp_path):
    settings = make_settings(tmp_path, limits={"max_connections": 2, "retry_after": 3})
    async with running_server(settings) as server, devices(server, 2) as (a, _b):
        rejection = await refused(server)

        assert rejection.status_code == 503
        assert 3 <= int(dict(rejection.headers)[b"retry-after"]) <= 6
        assert server.admission.refused["max_connections"] == 1
        await assert_still_serving(server, a, "u1")

    async with running_server(settings) as server:
        async with devices(server, 2):
            pass
        # Places are given back when connections end.
        async with devices(server, 2):
            assert server.admission.open == 2


async def test_the_per_ip_cap_refuses_a_second_connection_from_the_same_address(tmp_path):
    settings = make_settings(tmp_path, limits={"max_connections_per_ip": 1})
    async with running_server(settings) as server, devices(server, 1) as (a,):
        rejection = await refused(server)

        assert rejection.status_code == 503
        assert b"retry-after" in dict(rejection.headers)
        assert server.admission.refused["max_connections_per_ip"] == 1
        await send(a, {"t": "sub", "users": ["u0"]})
        assert (await recv(a))[0]["t"] == "presence"


async def test_the_handshake_rate_limit_refuses_a_burst(tmp_path):
    settings = make_settings(tmp_path, limits={"handshake_rate": 0.001, "handshake_burst": 2})
    async with running_server(settings) as server, devices(server, 2) as (a, _b):
        rejection = await refused(server)

        assert rejection.status_code == 503
        assert server.admission.refused["handshake_rate"] == 1
        await assert_still_serving(server, a, "u1")


async def test_a_browser_origin_outside_the_allowlist_gets_403(tmp_path):
    settings = make_settings(tmp_path, limits={"allowed_origins": "https://app.example.com"})
    async with running_server(settings) as server:
        rejection = await refused(server, extra_headers=[(b"origin", b"https://evil.example")])
        assert rejection.status_code == 403

        token = mint_token(settings.auth, "web", "tab")
        async with raw_ws(
            server.url, extra_headers=[(b"origin", b"https://app.example.com")]
        ) as ws:
            assert (await hello(ws, token))[0]["t"] == "welcome"
        async with raw_ws(server.url) as ws:  # native apps send no Origin
            assert (await hello(ws, token))[0]["t"] == "welcome"
        assert server.admission.refused == {"origin": 1}


async def test_a_slowloris_handshake_is_cut_off_after_handshake_timeout(tmp_path):
    settings = make_settings(tmp_path, server={"port": 0, "handshake_timeout": 0.3})
    async with running_server(settings) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finished
        with trio.fail_after(10):
            while await stream.receive_some(1024):
                pass  # the server closes the socket: receive_some returns b""
        await stream.aclose()
        async with devices(server, 1):
            pass


async def test_sends_over_the_rate_get_rate_limited_and_persistent_abuse_closes_1008(tmp_path):
    settings = make_settings(
        tmp_path, limits={"send_rate": 0.001, "send_burst": 2, "rate_limit_strikes": 3}
    )
    async with running_server(settings) as server, devices(server, 2) as (abuser, other):
        burst = [{"t": "send", "id": f"m{i}", "to": "u1", "body": b"x"} for i in range(10)]
        await send(abuser, burst)

        frames = []
        code = None
        with trio.fail_after(10):
            try:
                while True:
                    frames += await recv(abuser)
            except Exception:
                code = await close_code(abuser)
        sent = [f["id"] for f in frames if f["t"] == "sent"]
        limited = [f["ref"] for f in frames if f.get("code") == "rate_limited"]
        assert sent == ["m0", "m1"]
        assert limited == ["m2", "m3", "m4"]
        assert code == 1008
        assert server.counters.rate_limited == 4
        # The other device got exactly the two allowed messages and is unaffected.
        delivered: list[str] = []
        with trio.fail_after(10):
            while len(delivered) < 2:
                delivered += [f["id"] for f in await recv(other) if f["t"] == "msg"]
        assert delivered == ["m0", "m1"]


class _FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """Fails `accept` with EMFILE `failures` times, then hands out a stream."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    async def accept(self) -> trio.SocketStream:
        self.calls.append(trio.current_time())
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        a, _b = trio.socket.socketpair()
        return trio.SocketStream(a)

    async def aclose(self) -> None:
        pass


async def test_accept_backs_off_on_fd_exhaustion_and_logs_once(autojump_clock, caplog):
    inner = _FlakyListener(failures=4)
    stats = AcceptStats()
    listener = EdgeListener(inner, tls=None, stats=stats)

    with caplog.at_level(logging.ERROR, logger="gateway.listener"):
        stream = await listener.accept()

    await stream.aclose()
    gaps = [b - a for a, b in zip(inner.calls, inner.calls[1:], strict=False)]
    assert gaps == pytest.approx([0.05, 0.1, 0.2, 0.4])  # exponential, not a spin
    assert (stats.capacity_errors, stats.accepted) == (4, 1)
    assert len([r for r in caplog.records if "EMFILE" in r.getMessage()]) == 1


async def test_other_accept_errors_are_not_swallowed():
    class Broken(_FlakyListener):
        async def accept(self) -> trio.SocketStream:
            raise OSError(errno.EBADF, "Bad file descriptor")

    listener = EdgeListener(Broken(0), tls=None, stats=AcceptStats())
    with pytest.raises(OSError):
        await listener.accept()

"""wss://: a TLS round trip, a bounded handshake, and certificate reloads (in process, by
watching the files, and on SIGHUP to a real `gateway serve`)."""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import pytest
import trio

from gateway.auth import mint_token
from gateway.client import connect
from gateway.settings import Settings
from scripts.fakes.credentials import CertificateAuthority
from tests.conftest import make_settings, running_server
from tests.rawws import hello, raw_ws, recv_until, send
from tests.test_crash import free_port, start_gateway

HOSTS = ("127.0.0.1", "localhost")


def write_certificate(ca: CertificateAuthority, directory: Path) -> tuple[Path, Path]:
    """A server certificate for loopback issued by `ca`, as cert.pem and key.pem."""
    cert_pem, key_pem = ca.issue("gateway", hosts=HOSTS)
    cert, key = directory / "cert.pem", directory / "key.pem"
    # Write then rename, as certificate managers do, so a reader never sees half a file.
    for path, data in ((cert, cert_pem), (key, key_pem)):
        path.with_suffix(".tmp").write_bytes(data)
        path.with_suffix(".tmp").replace(path)
    return cert, key


def trusting(ca: CertificateAuthority) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=ca.cert_pem.decode())
    return context


async def handshake_ok(url: str, context: ssl.SSLContext) -> bool:
    """Whether a TLS handshake with the server succeeds when trusting only `context`'s CA."""
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    try:
        with trio.fail_after(10):
            await stream.do_handshake()
        return True
    except trio.BrokenResourceError:  # the certificate was not trusted
        return False
    finally:
        await trio.aclose_forcefully(stream)


@pytest.fixture
def cas() -> tuple[CertificateAuthority, CertificateAuthority]:
    return CertificateAuthority.create("old CA"), CertificateAuthority.create("new CA")


async def test_a_message_round_trips_over_wss(tmp_path, cas):
    cert, key = write_certificate(cas[0], tmp_path)
    settings = make_settings(tmp_path, server={"port": 0, "tls_cert": cert, "tls_key": key})
    async with running_server(settings) as server:
        assert server.url.startswith("wss://")
        context = trusting(cas[0])
        async with (
            raw_ws(server.url, ssl_context=context) as bob,
            raw_ws(server.url, ssl_context=context) as alice,
        ):
            await hello(bob, mint_token(settings.auth, "bob", "phone"))
            await hello(alice, mint_token(settings.auth, "alice", "phone"))
            await send(alice, {"t": "send", "id": "m1", "to": "bob", "body": b"over tls"})
            assert (await recv_until(alice, "sent"))[-1]["id"] == "m1"
            delivered = await recv_until(bob, "msg")
            assert delivered[-1]["body"] == b"over tls"
        # A client that does not trust the certificate cannot connect.
        assert not await handshake_ok(server.url, trusting(cas[1]))


async def test_a_silent_tls_peer_is_cut_off_after_handshake_timeout(tmp_path, cas):
    cert, key = write_certificate(cas[0], tmp_path)
    settings = make_settings(
        tmp_path,
        server={"port": 0, "tls_cert": cert, "tls_key": key, "handshake_timeout": 0.3},
    )
    async with running_server(settings) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)  # no ClientHello
        with trio.fail_after(10):
            while await stream.receive_some(1024):
                pass
        await stream.aclose()


async def test_reload_swaps_the_certificate_for_new_handshakes_only(tmp_path, cas):
    old, new = cas
    cert, key = write_certificate(old, tmp_path)
    settings = make_settings(
        tmp_path, server={"port": 0, "tls_cert": cert, "tls_key": key, "tls_watch": 0}
    )
    async with running_server(settings) as server:
        token = mint_token(settings.auth, "bob", "phone")
        async with raw_ws(server.url, ssl_context=trusting(old)) as established:
            await hello(established, token)
            write_certificate(new, tmp_path)
            assert not await handshake_ok(server.url, trusting(new))  # not before the reload

            assert server.reload_tls()

            assert await handshake_ok(server.url, trusting(new))
            assert not await handshake_ok(server.url, trusting(old))
            # The connection made with the old certificate carries on.
            await send(established, {"t": "sub", "users": ["bob"]})
            assert (await recv_until(established, "presence"))[-1]["t"] == "presence"

        # A broken file is refused and the current certificate stays in use.
        cert.write_text("not a certificate")
        assert not server.reload_tls()
        assert await handshake_ok(server.url, trusting(new))
        assert (server.tls.reloads, server.tls.failed_reloads) == (1, 1)


async def test_changed_files_are_picked_up_by_the_watcher(tmp_path, cas):
    old, new = cas
    cert, key = write_certificate(old, tmp_path)
    settings = make_settings(
        tmp_path, server={"port": 0, "tls_cert": cert, "tls_key": key, "tls_watch": 0.05}
    )
    async with running_server(settings) as server:
        write_certificate(new, tmp_path)
        with trio.fail_after(10):
            while not await handshake_ok(server.url, trusting(new)):
                await trio.sleep(0.05)
        assert server.tls.reloads >= 1


async def test_sighup_reloads_the_certificate_of_a_running_gateway(tmp_path, cas):
    old, new = cas
    cert, key = write_certificate(old, tmp_path)
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nport = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_watch = 0\n'
        f'[store]\npath = "{tmp_path / "g.db"}"\n[admin]\nport = 0\n',
        encoding="utf-8",
    )
    url = f"wss://127.0.0.1:{port}/ws"
    process = await start_gateway(config)
    try:
        token = mint_token(Settings().auth, "bob", "phone")
        async with connect(url, token, reconnect=False, ssl_context=trusting(old)):
            pass
        write_certificate(new, tmp_path)
        process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while not await handshake_ok(url, trusting(new)):
                await trio.sleep(0.05)
        assert process.returncode is None  # SIGHUP reloads; it does not stop the gateway
    finally:
        process.terminate()
        with trio.fail_after(20):
            assert await process.wait() == 0

"""Running out of file descriptors: a real `gateway serve` with a tiny RLIMIT_NOFILE."""

from __future__ import annotations

import resource
import subprocess
import sys
from contextlib import AsyncExitStack

import trio

from gateway.auth import mint_token
from gateway.client import connect
from gateway.settings import Settings
from scripts.kit.loopback import free_port
from scripts.kit.procfs import cpu_seconds
from tests.test_crash import READY_LINE

NOFILE = 128


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


async def test_fd_exhaustion_is_logged_accept_backs_off_and_recovers(tmp_path):
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[server]\nport = {port}\nhandshake_timeout = 2.0\n[limits]\nmax_connections = 10000\n"
        f'[store]\npath = "{tmp_path / "g.db"}"\n[admin]\nport = 0\n',
        encoding="utf-8",
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        preexec_fn=_low_nofile,
    )
    assert process.stderr is not None
    log = b""

    async def read_until(marker: bytes) -> None:
        nonlocal log
        with trio.fail_after(20):
            while marker not in log:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, f"gateway exited: {log.decode(errors='replace')}"
                log += chunk

    try:
        await read_until(READY_LINE)
        async with AsyncExitStack() as stack:
            # Silent sockets stuck in their handshake hold the server's descriptors.
            for _ in range(NOFILE + 20):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stack.enter_async_context(stream)
            await read_until(b"accept failed with EMFILE")
            before = cpu_seconds(process.pid)
            await trio.sleep(1.0)
            assert cpu_seconds(process.pid) - before < 0.5  # backing off, not spinning
        # The silent sockets are gone: the server accepts again.
        async with connect(
            f"ws://127.0.0.1:{port}/ws", mint_token(Settings().auth, "bob", "phone")
        ) as bob:
            assert bob.welcome is not None
        assert log.count(b"accept failed with EMFILE") == 1  # logged once, not per attempt
    finally:
        process.terminate()
        with trio.fail_after(20):
            await process.wait()

"""Durability across SIGKILL: every message that got `sent` is delivered after a restart.

The gateway runs as a real `gateway serve` process on a real SQLite file. A sender streams
messages with many in flight; the process is killed without warning in the middle of the
stream and started again on the same file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from gateway.auth import mint_token
from gateway.client import Backoff, ClientClosed, SendRefused, connect
from gateway.settings import Settings
from scripts.kit.loopback import free_port
from tests.rawws import close_code, hello, raw_ws

READY_LINE = b"gateway listening on"


def write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nport = {port}\n[store]\npath = "{tmp_path / "crash.db"}"\n'
        '[log]\nlevel = "info"\n',
        encoding="utf-8",
    )
    return config


async def start_gateway(config: Path) -> trio.Process:
    """Start `gateway serve` and return once it is listening."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = b""
    with trio.fail_after(20):
        while READY_LINE not in seen:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, f"gateway exited early: {seen.decode(errors='replace')}"
            seen += chunk
    return process


async def test_every_sent_message_survives_sigkill(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)
    url = f"ws://127.0.0.1:{port}/ws"
    auth = Settings().auth
    acknowledged: list[str] = []  # ids in the order their `sent` arrived
    process = await start_gateway(config)
    try:
        async with connect(url, mint_token(auth, "bob", "phone")):
            pass  # bob's device is known before anything is sent to it
        window = trio.Semaphore(32)
        killed = trio.Event()

        async def send_one(alice, i: int) -> None:
            try:
                sent = await alice.send("bob", i.to_bytes(4, "big"), id=f"m{i:05d}")
                acknowledged.append(sent.id)
            except (ClientClosed, SendRefused):
                pass  # never acknowledged, so never promised
            finally:
                window.release()

        async with (
            connect(
                url, mint_token(auth, "alice", "phone"), reconnect=False, backoff=Backoff(base=0.05)
            ) as alice,
            trio.open_nursery() as nursery,
        ):
            for i in range(3000):
                await window.acquire()
                if len(acknowledged) >= 300 and not killed.is_set():
                    os.kill(process.pid, signal.SIGKILL)
                    killed.set()
                if alice.final is not None:
                    window.release()
                    break
                nursery.start_soon(send_one, alice, i)
        await process.wait()
        assert process.returncode == -signal.SIGKILL
        assert len(acknowledged) >= 300

        process = await start_gateway(config)
        async with connect(url, mint_token(auth, "bob", "phone")) as bob:
            await bob.wait_drained()
            received = [d.frame["id"] for d in bob.take_buffered() if d.is_message]
        # Every acknowledged message is there; nothing arrives twice; order is kept.
        assert set(acknowledged) <= set(received)
        assert len(received) == len(set(received))
        assert received == sorted(received)

        # SIGTERM drains: the client is told to come back later, the process exits 0.
        async with raw_ws(url) as ws:
            await hello(ws, mint_token(auth, "bob", "phone"))
            process.send_signal(signal.SIGTERM)
            assert await close_code(ws) == 1012
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()

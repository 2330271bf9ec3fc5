"""`gateway serve --workers N`: several processes on one port (SO_REUSEPORT) on Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import coredis
import trio

from gateway.auth import mint_token
from gateway.cli import main
from gateway.client import connect
from gateway.settings import Settings
from scripts.kit.loopback import free_port

READY_LINE = b"gateway listening on"


def write_config(tmp_path: Path, port: int, redis_url: str) -> Path:
    config = tmp_path / "workers.toml"
    config.write_text(
        f'[server]\nport = {port}\n[store]\nbackend = "redis"\nredis_url = "{redis_url}"\n',
        encoding="utf-8",
    )
    return config


def test_several_workers_on_sqlite_are_refused_with_a_clear_message(tmp_path, capsys):
    config = tmp_path / "sqlite.toml"
    config.write_text("[server]\nport = 9999\n", encoding="utf-8")

    assert main(["serve", "--config", str(config), "--workers", "2"]) == 2

    err = capsys.readouterr().err
    assert str(config) in err and '--workers 2 needs [store] backend = "redis"' in err


def test_several_workers_need_a_fixed_port(tmp_path, capsys):
    config = tmp_path / "redis.toml"
    config.write_text('[server]\nport = 0\n[store]\nbackend = "redis"\n', encoding="utf-8")

    assert main(["serve", "--config", str(config), "--workers", "2"]) == 2
    assert "fixed [server] port" in capsys.readouterr().err


async def test_two_workers_share_one_port_and_deliver_across_each_other(tmp_path, redis_url):
    port = free_port()
    config = write_config(tmp_path, port, redis_url)
    url = f"ws://127.0.0.1:{port}/ws"
    auth = Settings().auth
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"],
        stderr=subprocess.PIPE,
    )
    try:
        assert parent.stderr is not None
        seen = b""
        with trio.fail_after(30):
            while seen.count(READY_LINE) < 2:
                chunk = await parent.stderr.receive_some(4096)
                assert chunk, f"gateway exited early: {seen.decode(errors='replace')}"
                seen += chunk
        assert b"[worker 1]" in seen and b"[worker 2]" in seen

        users = [f"u{n}" for n in range(16)]
        async with trio.open_nursery() as nursery:
            clients = []
            for user in users:
                client = await nursery.start(_connected, url, mint_token(auth, user, "phone"))
                clients.append(client)
            # The kernel spread the connections over both workers (all 16 on one of two
            # listeners would happen once in 30,000 runs).
            async with coredis.Redis.from_url(redis_url) as redis:
                claims = [await redis.get(f"gw:{{{user}}}:node:phone") for user in users]
            nodes = {claim.split(b"|")[0] for claim in claims if claim}
            assert len(nodes) == 2
            # Every device gets what a sender on whichever worker sent it.
            async with connect(url, mint_token(auth, "alice", "phone")) as alice:
                for user in users:
                    await alice.send(user, user.encode())
            with trio.fail_after(10):
                for user, client in zip(users, clients, strict=True):
                    delivery = await client.next_delivery()
                    assert delivery.frame["body"] == user.encode()
            nursery.cancel_scope.cancel()

        parent.send_signal(signal.SIGTERM)  # drains every worker, then the parent ends
        with trio.fail_after(30):
            assert await parent.wait() == 0
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


async def _connected(url: str, token: str, task_status: trio.TaskStatus[object]) -> None:
    async with connect(url, token) as client:
        await client.wait_drained()
        task_status.started(client)
        await trio.sleep_forever()


async def test_a_worker_that_dies_is_started_again(tmp_path, redis_url):
    port = free_port()
    config = write_config(tmp_path, port, redis_url)
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"],
        stderr=subprocess.PIPE,
    )
    try:
        assert parent.stderr is not None
        seen = b""

        async def read_until(count: int, what: bytes) -> None:
            nonlocal seen
            with trio.fail_after(30):
                while seen.count(what) < count:
                    chunk = await parent.stderr.receive_some(4096)  # type: ignore[union-attr]
                    assert chunk, f"gateway exited early: {seen.decode(errors='replace')}"
                    seen += chunk

        await read_until(2, READY_LINE)
        workers = _children(parent.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)

        await read_until(3, READY_LINE)  # the supervisor started a new one
        assert b"exited with -9; restarting" in seen
        assert len(_children(parent.pid)) == 2
        async with connect(
            f"ws://127.0.0.1:{port}/ws", mint_token(Settings().auth, "bob", "phone")
        ):
            pass  # and the port is served

        parent.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await parent.wait() == 0
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return sorted(found)

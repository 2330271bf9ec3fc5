"""Failover on Redis: a node dies, or Redis restarts, in the middle of a stream of sends;
every message that got `sent` is delivered all the same.

Redis runs with AOF and ``appendfsync always`` (see docs/scaling.md), so a write that
Redis acknowledged survives its SIGKILL. Counts are small and every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from gateway.auth import mint_token
from gateway.client import Backoff, ClientClosed, GatewayClient, SendRefused, connect
from gateway.settings import Settings
from scripts.kit.loopback import free_port
from tests.conftest import running_server
from tests.redisproc import RedisProcess
from tests.test_cluster import cluster_settings, wait_presence

READY_LINE = b"gateway listening on"
DEADLINE = 30


async def stream(
    client: GatewayClient,
    acknowledged: list[str],
    refused: list[str],
    prefix: str,
    count: int,
    stop: trio.Event,
) -> None:
    """Send up to `count` messages to bob, 16 in flight, until `stop` or the client ends."""
    window = trio.Semaphore(16)

    async def one(i: int) -> None:
        try:
            sent = await client.send("bob", i.to_bytes(4, "big"), id=f"{prefix}{i:05d}")
            acknowledged.append(sent.id)
        except SendRefused as exc:
            refused.append(str(exc))
        except ClientClosed:
            pass  # never acknowledged, so never promised
        finally:
            window.release()

    async with trio.open_nursery() as nursery:
        for i in range(count):
            await window.acquire()
            if stop.is_set() or client.final is not None:
                window.release()
                break
            nursery.start_soon(one, i)
            await trio.sleep(0.002)  # a steady stream, not one burst


async def until(predicate: Callable[[], bool]) -> None:
    """Poll `predicate` until it holds, for at most DEADLINE seconds."""
    with trio.fail_after(DEADLINE):
        while not predicate():  # noqa: ASYNC110 - state changed by many tasks, polled
            await trio.sleep(0.01)


async def collect(client: GatewayClient, into: list[str]) -> None:
    """Record the id of every message delivered to `client` until it closes."""
    async for delivery in client.deliveries():
        if delivery.is_message:
            into.append(delivery.frame["id"])


def write_config(tmp_path: Path, name: str, port: int, redis_url: str) -> Path:
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[server]\nport = {port}\n[store]\nbackend = "redis"\nredis_url = "{redis_url}"\n'
        "[cluster]\nnode_ttl = 2.0\ncatchup_interval = 1.0\n[presence]\noffline_grace = 0.5\n"
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


async def test_a_node_killed_mid_stream_loses_nothing_that_was_sent(tmp_path, redis_url):
    auth = Settings().auth
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"ws://127.0.0.1:{port_a}/ws", f"ws://127.0.0.1:{port_b}/ws"
    node_a = await start_gateway(write_config(tmp_path, "a", port_a, redis_url))
    node_b = await start_gateway(write_config(tmp_path, "b", port_b, redis_url))
    acknowledged: list[str] = []
    refused: list[str] = []
    received: list[str] = []
    try:
        async with connect(url_a, mint_token(auth, "bob", "phone")):
            pass  # bob is known before anything is sent to him
        stop = trio.Event()
        no_retry = {"reconnect": False, "backoff": Backoff(base=0.05)}
        async with (
            connect(url_a, mint_token(auth, "bob", "phone"), **no_retry) as bob,
            connect(url_a, mint_token(auth, "alice", "phone"), **no_retry) as alice,
            connect(url_b, mint_token(auth, "carol", "phone"), **no_retry) as carol,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(collect, bob, received)
            nursery.start_soon(stream, carol, acknowledged, refused, "c", 600, stop)
            nursery.start_soon(stream, alice, acknowledged, refused, "a", 600, stop)
            await until(lambda: len(acknowledged) >= 200)
            os.kill(node_a.pid, signal.SIGKILL)  # bob's node, mid-stream
            with trio.fail_after(DEADLINE):
                await node_a.wait()
            await until(lambda: len(acknowledged) >= 300)
            stop.set()
            await until(lambda: alice.final is not None and bob.final is not None)
            # Nobody told anyone bob left (his node died): his claim expires, and node B's
            # presence shows him offline by itself.
            with trio.fail_after(DEADLINE):
                await wait_presence(carol, online=False)
            nursery.cancel_scope.cancel()  # sends still unanswered were never promised
        assert node_a.returncode == -signal.SIGKILL
        assert bob.final is not None  # bob's connection went down with node A

        # Bob's device comes back on the surviving node and drains there.
        async with connect(url_b, mint_token(auth, "bob", "phone")) as bob:
            with trio.fail_after(DEADLINE):
                await bob.wait_drained()
            received += [d.frame["id"] for d in bob.take_buffered() if d.is_message]
        assert refused == []
        assert set(acknowledged) <= set(received)
        assert {i for i in acknowledged if i.startswith("a")}  # sent through the dead node too
    finally:
        for process in (node_a, node_b):
            if process.returncode is None:
                process.terminate()
                await process.wait()


async def test_a_redis_restart_mid_stream_loses_nothing_that_was_sent(tmp_path):
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    acknowledged: list[str] = []
    refused: list[str] = []
    received: list[str] = []
    try:
        settings = cluster_settings(tmp_path, redis.url)
        token = lambda user: mint_token(settings.auth, user, "phone")  # noqa: E731
        async with (
            running_server(settings) as a,
            running_server(settings) as b,
        ):
            async with connect(a.url, token("bob")):
                pass
            stop = trio.Event()
            async with (
                connect(a.url, token("bob")) as bob,
                connect(b.url, token("alice")) as alice,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(collect, bob, received)
                nursery.start_soon(stream, alice, acknowledged, refused, "m", 3000, stop)
                await until(lambda: len(acknowledged) >= 100)
                redis.kill()
                await until(lambda: bool(refused))  # errors while Redis is away, no `sent`
                at_outage = len(acknowledged)
                redis.start()
                await until(lambda: len(acknowledged) >= at_outage + 100)  # resumed by itself
                stop.set()
                await until(lambda: set(acknowledged) <= set(received))
                nursery.cancel_scope.cancel()
                # The devices' connections stayed up through the outage.
                assert (bob.connections, alice.connections) == (1, 1)
            # Metrics say what happened: sends failed on B, and both channels came back.
            assert b.counters.redis["errors"] >= 1
            assert b.counters.redis["recoveries"] >= 2  # the start, then back
            for node in (a, b):
                assert node.counters.redis["listen_errors"] >= 1
                assert node.counters.redis["listen_recoveries"] >= 1
    finally:
        redis.stop()

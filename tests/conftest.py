"""Shared fixtures: a real gateway on a loopback port with a real SQLite file, and a real
redis-server on a random loopback port for the cluster backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.auth import mint_token
from gateway.server import GatewayServer, serve_gateway
from gateway.settings import Settings
from scripts.kit.gateway_process import STORES
from tests.redisproc import RedisClusterProcess, RedisProcess, redis_binary


def make_settings(tmp_path: Path, **sections: Any) -> Settings:
    """Embedded defaults on a free port and a fresh database file, with overrides."""
    base = Settings().replace(
        server={"port": 0}, store={"path": tmp_path / "gateway.db"}, admin={"port": 0}
    )
    return base.replace(**sections) if sections else base


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@asynccontextmanager
async def running_server(settings: Settings, **kw: Any) -> AsyncIterator[GatewayServer]:
    """An in-process gateway for the duration of the block."""
    async with trio.open_nursery() as nursery:
        running: GatewayServer = await nursery.start(partial(serve_gateway, settings, **kw))
        yield running
        nursery.cancel_scope.cancel()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[GatewayServer]:
    async with running_server(settings) as running:
        yield running


@pytest.fixture
def token(settings: Settings) -> Callable[..., str]:
    def make(user: str, device: str, ttl: int | None = None) -> str:
        return mint_token(settings.auth, user, device, ttl)

    return make


@pytest.fixture(params=STORES)
def process_store(request: pytest.FixtureRequest) -> str:
    """Each store backend a `gateway serve` process runs on, for
    scripts.kit.gateway_process.open_store (the Redis variant is skipped where redis-server
    is not installed)."""
    if request.param == "redis":
        redis_binary()
    return str(request.param)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the whole run (AOF on, appendfsync always)."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The shared redis-server, emptied for this test."""
    if not redis_server.running:
        redis_server.start()  # a previous test stopped it
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """One three-primary Redis Cluster for the whole run."""
    cluster = RedisClusterProcess(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcess) -> str:
    """The shared Redis Cluster, emptied for this test."""
    redis_cluster.flush()
    return redis_cluster.url

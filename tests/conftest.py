"""Shared fixtures: a real gateway on a loopback port with a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.auth import mint_token
from gateway.server import GatewayServer, serve_gateway
from gateway.settings import Settings


def make_settings(tmp_path: Path, **sections: Any) -> Settings:
    """Embedded defaults on a free port and a fresh database file, with overrides."""
    base = Settings().replace(server={"port": 0}, store={"path": tmp_path / "gateway.db"})
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

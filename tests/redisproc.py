"""redis-server for tests: the scripts' kit server and cluster, skipping the test where
Redis is not installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from coredis._utils import hash_slot

from scripts.kit.redis_cluster import RedisCluster
from scripts.kit.redis_server import RedisServer


def redis_binary() -> str:
    """The redis-server executable, or skip (scripts/test.sh installs it)."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    return path


class RedisProcess(RedisServer):
    """One redis-server with its data directory (see `scripts.kit.redis_server`); the test
    is skipped where redis-server is not installed."""

    def __init__(self, directory: Path) -> None:
        redis_binary()
        super().__init__(directory)


class RedisClusterProcess(RedisCluster):
    """A Redis Cluster of three primaries (no replicas) on random loopback ports (see
    `scripts.kit.redis_cluster`); the test is skipped where redis-server is not installed."""

    def __init__(self, directory: Path, primaries: int = 3) -> None:
        redis_binary()
        super().__init__(directory, primaries=primaries)

    def owner_port(self, key: str) -> int:
        """The port of the primary that holds `key`'s hash slot."""
        return self.owner(hash_slot(key.encode())).port

    def flush(self) -> None:
        """Empty every primary."""
        for server in self.primaries:
            server.command("FLUSHALL")

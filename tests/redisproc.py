"""redis-server for tests: the scripts' kit server, skipping the test where Redis is not
installed; and a real three-primary Redis Cluster made of such servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from scripts.kit.loopback import free_port
from scripts.kit.redis_server import RedisServer

START_TIMEOUT = 10.0
CLUSTER_BUS_OFFSET = 10000


def redis_binary() -> str:
    """The redis-server executable, or skip (scripts/test.sh installs it)."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    return path


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


class RedisProcess(RedisServer):
    """One redis-server with its data directory (see `scripts.kit.redis_server`); the test
    is skipped where redis-server is not installed."""

    def __init__(self, directory: Path, *, cluster: bool = False) -> None:
        redis_binary()
        if cluster:
            super().__init__(
                directory,
                port=free_cluster_port(),
                args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
            )
        else:
            super().__init__(directory)


class RedisClusterProcess:
    """A Redis Cluster of three primaries (no replicas) on random loopback ports, made
    with ``redis-cli --cluster create``; `url` names one of them (clients discover the
    rest)."""

    def __init__(self, directory: Path, primaries: int = 3) -> None:
        self.servers = [
            RedisProcess(directory / f"node{n}", cluster=True) for n in range(primaries)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}"

    def start(self) -> None:
        """Start every server, join them into a cluster and wait for ``cluster_state:ok``
        on each; on failure nothing is left running."""
        try:
            for server in self.servers:
                server.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                pytest.skip("redis-cli is not installed (scripts/test.sh installs it)")
            addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            deadline = time.monotonic() + START_TIMEOUT
            while not all(self._ready(s) for s in self.servers):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _ready(server: RedisServer) -> bool:
        # CLUSTER INFO is a bulk string: read it whole to find the state line.
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            sock.sendall(b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n")
            answer = b""
            while b"cluster_state:" not in answer or not answer.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        return b"cluster_state:ok" in answer

    def owner(self, key: str) -> int:
        """The port of the primary that holds `key`'s hash slot (the others redirect)."""
        [port] = [
            s.port for s in self.servers if not s.command("EXISTS", key).startswith(b"-MOVED")
        ]
        return port

    def flush(self) -> None:
        """Empty every primary."""
        for server in self.servers:
            server.command("FLUSHALL")

    def stop(self) -> None:
        """Stop every server (SIGKILL: nothing of a test cluster needs to survive)."""
        for server in self.servers:
            server.kill()

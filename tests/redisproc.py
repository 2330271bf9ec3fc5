"""A real redis-server on a random loopback port, for tests: start, stop, kill, restart;
and a real three-primary Redis Cluster made of such servers.

Persistence is on as docs/scaling.md recommends (AOF with ``appendfsync always``), so a
restart keeps every write Redis acknowledged. Every server gets SIGKILL from the kernel
when the test process dies (``PR_SET_PDEATHSIG``), so none outlives a killed test run.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1
CLUSTER_BUS_OFFSET = 10000


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started us dies."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: `stop` still applies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def redis_binary() -> str:
    """The redis-server executable, or skip (scripts/test.sh installs it)."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    return path


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


class RedisProcess:
    """One redis-server process with its data directory; `url` stays valid across restarts."""

    def __init__(self, directory: Path, *, cluster: bool = False) -> None:
        self.directory = directory
        self.cluster = cluster
        self.port = free_cluster_port() if cluster else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--protected-mode", "no",
                "--loglevel", "warning",
                *(
                    ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                    if self.cluster
                    else []
                ),
            ],
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """Send one command and return the first line of the answer (blocking, short)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"".join(parts))
            answer = b""
            while not answer.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        return answer.split(b"\r\n", 1)[0]

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server: only what AOF already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same port and data directory."""
        self.kill()
        self.start()


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
    def _ready(server: RedisProcess) -> bool:
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

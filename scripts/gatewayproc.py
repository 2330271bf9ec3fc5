"""Real `gateway serve` and `redis-server` child processes for the reliability scripts.

It is started on a loopback port with a configuration file written into a work directory,
logs to a file there (a pipe nobody reads would block the gateway once full), and can be
killed, restarted on the same store, and sampled for resident memory and open files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

HOST = "127.0.0.1"
READY_LINE = b"gateway listening on"
START_TIMEOUT = 30.0
STORES = ("sqlite", "redis")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (released again for the gateway to bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def proc_rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for process {pid}")


def proc_fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_connections_on(port: int) -> int:
    """Open TCP connections (established, or closed by the peer but not yet by us) whose
    local port is `port`, on this host: the server side of every device connection."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08"):
                    count += 1
    return count


def tcp_connections_to(port: int) -> int:
    """Established TCP connections whose remote port is `port`, on this host (say, a
    gateway's pooled connections to its Redis)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                remote, state = line.split()[2], line.split()[3]
                if int(remote.rsplit(":", 1)[1], 16) == port and state == "01":
                    count += 1
    return count


@dataclass(frozen=True, slots=True)
class Usage:
    """One sample of a process's resources."""

    at: float  # seconds since the process started (trio clock)
    rss_kib: int
    fds: int


class GatewayProcess:
    """`gateway serve` on a fixed loopback port and a store in `workdir`.

    Args:
        workdir: Holds the configuration, the SQLite file and the log.
        config: Extra TOML appended to the generated configuration (whole sections).
        server: Extra keys of `[server]`, as TOML lines.
        store: Extra keys of `[store]`, as TOML lines (default: SQLite in `workdir`).
    """

    def __init__(
        self, workdir: Path, *, config: str = "", server: str = "", store: str = ""
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "gateway.toml"
        self.log_path = workdir / "gateway.log"
        self.db_path = workdir / "gateway.db"
        workdir.mkdir(parents=True, exist_ok=True)
        store = store or f'path = "{self.db_path}"'
        self.config_path.write_text(
            f'[server]\nhost = "{HOST}"\nport = {self.port}\n{server}\n'
            f'[store]\n{store}\n[log]\nlevel = "info"\n{config}\n',
            encoding="utf-8",
        )
        self.process: trio.Process | None = None
        self.starts = 0
        self._started_at = 0.0

    @property
    def url(self) -> str:
        """The device endpoint."""
        return f"ws://{HOST}:{self.port}/ws"

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.process is not None, "the gateway is not running"
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the process and return once it listens.

        Raises:
            RuntimeError: It exited, or did not listen within START_TIMEOUT seconds; the
                message carries the end of its log.
        """
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        self._started_at = trio.current_time()
        with trio.move_on_after(START_TIMEOUT):
            while True:
                if READY_LINE in self._log_since(offset):
                    return
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited early:\n{self.log_tail()}")
                await trio.sleep(0.02)
        await self.kill()
        raise RuntimeError(f"gateway did not start in {START_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def _log_since(self, offset: int) -> bytes:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the gateway's log."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        """The whole log, every run so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def kill(self) -> int:
        """SIGKILL the process and reap it; returns its exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        return await self.process.wait()

    async def terminate(self, grace: float = 30.0) -> int:
        """SIGTERM (a graceful drain), SIGKILL after `grace` seconds; returns the exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            return await self.process.wait()
        return await self.kill()

    def usage(self) -> Usage:
        """Resident memory and open files of the running process, now."""
        return Usage(
            trio.current_time() - self._started_at, proc_rss_kib(self.pid), proc_fd_count(self.pid)
        )


class RedisServer:
    """redis-server on a loopback port with AOF and ``appendfsync always``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        """The URL the gateway connects to."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it and wait until it accepts connections."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = await trio.lowlevel.open_process(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.send_all(b"PING\r\n")
                answer = await stream.receive_some(64)
                await stream.aclose()
                if answer.startswith(b"+PONG"):
                    return
                await trio.sleep(0.02)  # still loading the AOF

    async def kill(self) -> None:
        """SIGKILL it: only what the AOF holds survives."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def pause(self) -> None:
        """Stop it answering (SIGSTOP)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let it answer again (SIGCONT)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


@dataclass(frozen=True, slots=True)
class StoreBackend:
    """The store a gateway process runs on."""

    name: str  # "sqlite" or "redis"
    toml: str  # keys of `[store]` for GatewayProcess ("" for SQLite in its work directory)
    redis: RedisServer | None  # the redis-server behind it, for faults and connection counts


@contextlib.asynccontextmanager
async def open_store(name: str, workdir: Path) -> AsyncIterator[StoreBackend]:
    """The store backend `name` for a gateway process, ready to use.

    SQLite needs nothing started: the file lives in the gateway's own work directory.
    Redis gets its own redis-server (a RedisServer in ``workdir / "redis"``), killed on exit.

    Raises:
        ValueError: `name` is not one of STORES.
    """
    if name == "sqlite":
        yield StoreBackend(name, "", None)
        return
    if name != "redis":
        raise ValueError(f"unknown store backend {name!r}, expected one of {STORES}")
    redis = RedisServer(workdir / "redis")
    redis.directory.mkdir(parents=True, exist_ok=True)
    try:
        await redis.start()
        yield StoreBackend(name, f'backend = "redis"\nredis_url = "{redis.url}"', redis)
    finally:
        await redis.kill()

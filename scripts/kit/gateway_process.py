"""`gateway serve` in a child process on a loopback port, and the store it runs on.

The gateway runs on a configuration file: one written into its work directory from a few
TOML fragments, or one given. It inherits this process's environment without any
``GATEWAY__*`` override, so that only the configuration (and the overrides passed in
`env`) decide how it runs. It can be killed and started again on the same port and store,
and sampled for resident memory and open files.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.kit import procfs
from scripts.kit.child_process import ChildProcess
from scripts.kit.loopback import HOST, free_port
from scripts.kit.redis_cluster import RedisCluster
from scripts.kit.redis_server import RedisServer

READY_LINE = "gateway listening on"  # logged at info level by every process that listens
START_TIMEOUT = 30.0
STORES = ("sqlite", "redis", "redis-cluster")
# The Redis Cluster of ``redis-cluster``: primaries, and replicas of each.
CLUSTER_PRIMARIES = 3
CLUSTER_REPLICAS = 1


@dataclass(frozen=True, slots=True)
class Usage:
    """One sample of a process's resources."""

    at: float  # seconds since the process started
    rss_kib: int
    fds: int


class GatewayProcess(ChildProcess):
    """`gateway serve` on a loopback port, logging to ``workdir / "gateway.log"``.

    Without `config_file`, the configuration is written to ``workdir / "gateway.toml"``:
    `[server]` on 127.0.0.1 and `port`, `[admin]` on any free port, `[store]` (SQLite in
    ``workdir / "gateway.db"`` unless `store` says otherwise) and `[log]`, each section
    followed by the given keys.

    Args:
        workdir: Holds the configuration, the SQLite file and the log.
        server: Extra keys of `[server]`, as TOML lines.
        store: The keys of `[store]`, as TOML lines.
        config: Extra TOML appended to the configuration (whole sections).
        log_level: `[log] level`; ready is seen from the port, so any level works.
        config_file: Run on this file instead; `port` must then be the one it listens on.
        port: The device port (default: a free one).
        env: ``GATEWAY__*`` overrides or other variables for the process.
        launcher: What runs after the interpreter, before ``serve`` (a module or a file).
        workers: ``--workers N``: N processes share the port; ready once each logged
            READY_LINE, which needs `log_level` "info" or lower.
        cwd: Its working directory (default: this process's); `-m gateway.cli` finds
            `gateway` there first.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        server: str = "",
        store: str = "",
        config: str = "",
        log_level: str = "info",
        config_file: Path | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        launcher: Sequence[str] = ("-m", "gateway.cli"),
        workers: int = 1,
        cwd: Path | None = None,
    ) -> None:
        if config_file is not None and port is None:
            raise ValueError("a given config_file needs the port it listens on")
        port = free_port() if port is None else port
        self.workdir = workdir
        self.db_path = workdir / "gateway.db"
        self.config_path = config_file or workdir / "gateway.toml"
        self.workers = workers
        workdir.mkdir(parents=True, exist_ok=True)
        if config_file is None:
            store = store or f'path = "{self.db_path}"'
            self.config_path.write_text(
                f'[server]\nhost = "{HOST}"\nport = {port}\n{server}\n'
                "[admin]\nport = 0\n"  # any free port: never in the way of another gateway
                f'[store]\n{store}\n[log]\nlevel = "{log_level}"\n{config}\n',
                encoding="utf-8",
            )
        command = [sys.executable, *launcher, "serve", "--config", str(self.config_path)]
        if workers > 1:
            command += ["--workers", str(workers)]
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
        super().__init__(
            "gateway",
            command,
            workdir / "gateway.log",
            port=port,
            env={**inherited, **(env or {})},
            cwd=cwd,
            start_timeout=START_TIMEOUT,
        )

    @property
    def url(self) -> str:
        """The device endpoint."""
        return f"ws://{HOST}:{self.port}/ws"

    def ready(self) -> bool:
        """The port accepts connections (and, with workers, every worker listens)."""
        if not super().ready():
            return False
        return self.workers == 1 or self.log_text().count(READY_LINE) >= self.workers * self.starts

    def worker_pids(self) -> list[int]:
        """The processes that serve: the one, or the supervisor's `workers` children.

        Raises:
            RuntimeError: Not every worker is running.
        """
        if self.workers == 1:
            return [self.pid]
        children = procfs.child_pids(self.pid)
        if len(children) != self.workers:
            raise RuntimeError(f"expected {self.workers} workers, found {children}")
        return children

    def usage(self) -> Usage:
        """Resident memory and open files of the running process, now."""
        return Usage(self.uptime, procfs.rss_kib(self.pid), procfs.fd_count(self.pid))

    def warnings(self) -> list[str]:
        """The log lines at WARNING or above, every run so far."""
        return [ln for ln in self.log_text().splitlines() if " WARNING " in ln or " ERROR " in ln]


@dataclass(frozen=True, slots=True)
class StoreBackend:
    """The store a gateway process runs on."""

    name: str  # one of STORES
    toml: str  # keys of `[store]` for GatewayProcess ("" for SQLite in its work directory)
    # The redis-server behind it, for faults and connection counts (on a cluster, the
    # first primary, the one `redis_url` names).
    redis: RedisServer | None
    cluster: RedisCluster | None = None  # the whole Redis Cluster, for ``redis-cluster``


@contextlib.asynccontextmanager
async def open_store(name: str, workdir: Path) -> AsyncIterator[StoreBackend]:
    """The store backend `name` for a gateway process, ready to use.

    SQLite needs nothing started: the file lives in the gateway's own work directory.
    Redis gets its own redis-server (in ``workdir / "redis"``), killed on exit.
    ``redis-cluster`` gets a Redis Cluster of CLUSTER_PRIMARIES primaries with
    CLUSTER_REPLICAS replicas each (in ``workdir / "cluster"``), configured as
    docs/scaling.md says (``redis_cluster = true``), killed on exit.

    Raises:
        ValueError: `name` is not one of STORES.
    """
    if name == "sqlite":
        yield StoreBackend(name, "", None)
        return
    if name == "redis-cluster":
        cluster = RedisCluster(
            workdir / "cluster", primaries=CLUSTER_PRIMARIES, replicas=CLUSTER_REPLICAS
        )
        try:
            # Started here, not in a worker thread: each server dies with the thread that
            # started it (see scripts/kit/redis_server.py).
            cluster.start()
            toml = f'backend = "redis"\nredis_url = "{cluster.url}"\nredis_cluster = true'
            yield StoreBackend(name, toml, cluster.primaries[0], cluster)
        finally:
            cluster.stop()
        return
    if name != "redis":
        raise ValueError(f"unknown store backend {name!r}, expected one of {STORES}")
    redis = RedisServer(workdir / "redis")
    try:
        await redis.astart()
        yield StoreBackend(name, f'backend = "redis"\nredis_url = "{redis.url}"', redis)
    finally:
        redis.kill()

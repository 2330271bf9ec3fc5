"""`gateway serve --workers N`: N gateway processes sharing one port through SO_REUSEPORT.

One Python process uses one core. With the Redis backend every process is a stateless
node of the cluster (see gateway/cluster.py), so N of them on one host can share the
device port: each binds it with SO_REUSEPORT and the kernel spreads new connections
across them. The parent only supervises:

- it starts the workers (``gateway serve --worker K``, same configuration);
- SIGTERM or SIGINT is passed on to every worker, which drains as a single gateway does;
  the parent exits once they all have. SIGHUP is passed on too (it reloads TLS files);
- a worker that dies is logged and started again after a pause that grows with repeated
  failures; a worker that keeps failing at start-up ends the whole group, non-zero.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import trio

from gateway.errors import ConfigError
from gateway.settings import Settings

log = logging.getLogger("gateway.workers")

RESTART_BASE = 0.5
RESTART_MAX = 30.0
# A worker that lived this long before dying counts as healthy: its next restart is quick.
HEALTHY_SECONDS = 30.0
# This many failures in a row, each before HEALTHY_SECONDS, end the group.
MAX_QUICK_FAILURES = 5


def check_workers(settings: Settings, workers: int, source: str) -> None:
    """Refuse worker counts the configuration cannot serve.

    Raises:
        ConfigError: More than one worker on a backend other than Redis, or fewer than one.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers})")
    if workers > 1 and settings.store.backend != "redis":
        what = {
            "sqlite": "the SQLite backend is one process's file",
            "memory": "the memory backend is one process's memory",
        }.get(settings.store.backend, f"the {settings.store.backend} backend is not shared")
        raise ConfigError(
            f'{source}: --workers {workers} needs [store] backend = "redis"; {what} '
            "(run one process, or move to Redis)"
        )
    if workers > 1 and settings.server.port == 0:
        raise ConfigError(f"{source}: --workers {workers} needs a fixed [server] port, not 0")
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(f"--workers {workers} needs SO_REUSEPORT, which this OS lacks")


def worker_command(config: str | None, index: int) -> list[str]:
    """The command line of worker `index`."""
    command = [sys.executable, "-m", "gateway.cli", "serve", "--worker", str(index)]
    return command + (["--config", config] if config else [])


async def supervise(config: str | None, workers: int) -> int:
    """Run `workers` worker processes until a signal stops them; returns the exit status."""
    stopping = trio.Event()
    status = [0]
    processes: dict[int, trio.Process] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_forward_signals, processes, stopping, workers)
        async with trio.open_nursery() as keepers:
            for index in range(1, workers + 1):
                keepers.start_soon(_keep_running, config, index, processes, stopping, status)
        nursery.cancel_scope.cancel()  # every worker is done
    return status[0]


async def _forward_signals(
    processes: dict[int, trio.Process], stopping: trio.Event, workers: int
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:  # reload TLS certificates: every worker does
                for process in processes.values():
                    if process.returncode is None:
                        process.send_signal(signal.SIGHUP)
                continue
            first = not stopping.is_set()
            log.info("%s: stopping %d workers", signal.Signals(signum).name, workers)
            stopping.set()
            for process in processes.values():
                if process.returncode is None:
                    # A second signal stops without draining, as for one gateway.
                    process.send_signal(signum if first else signal.SIGKILL)


async def _keep_running(
    config: str | None,
    index: int,
    processes: dict[int, trio.Process],
    stopping: trio.Event,
    status: list[int],
) -> None:
    quick_failures = 0
    delay = RESTART_BASE
    while not stopping.is_set():
        started = trio.current_time()
        process = await trio.lowlevel.open_process(worker_command(config, index))
        processes[index] = process
        try:
            code = await process.wait()
        finally:
            if process.returncode is None:  # cancelled: a second signal, or the end
                with trio.CancelScope(shield=True):
                    process.kill()
                    await process.wait()
        if stopping.is_set():
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                status[0] = 1
            return
        lived = trio.current_time() - started
        if lived >= HEALTHY_SECONDS:
            quick_failures, delay = 0, RESTART_BASE
        else:
            quick_failures += 1
        if quick_failures >= MAX_QUICK_FAILURES:
            log.error("worker %d keeps failing (exit %s); stopping", index, code)
            status[0] = 1
            stopping.set()
            _stop_all(processes)
            return
        log.error("worker %d exited with %s; restarting in %.1fs", index, code, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX)


def _stop_all(processes: dict[int, trio.Process]) -> None:
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)


async def open_reuseport_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listening sockets on host:port with SO_REUSEPORT, one per address family, as
    `trio.open_tcp_listeners` would open them.

    Raises:
        OSError: The port cannot be bound.
    """
    addresses = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def run_workers(config: str | None, workers: int) -> int:
    """Supervise `workers` processes (blocking); returns the exit status."""
    return trio.run(supervise, config, workers)

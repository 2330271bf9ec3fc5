"""A server in a child process on a loopback port: start it, wait until it is ready, stop
it, signal it.

Plain code calls `start`, `stop` and `kill`; Trio code calls `astart` and `astop`, which
wait without blocking the event loop, or runs the process as a task with `run`. `kill`
serves both: a process that got SIGKILL is reaped at once.

The child writes its output to a log file (a pipe nobody reads would block it once full):
truncated at the first start, appended to at every later one.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import trio

from scripts.kit.loopback import HOST

# The directory that holds the `scripts` package: the working directory of children run
# as ``python -m scripts.NAME``.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
POLL = 0.02  # seconds between two looks at a starting or stopping process
LOG_TAIL = 20  # lines of the log quoted when a process fails


class ProcessFailed(RuntimeError):
    """A child process did not become ready, or exited while it should have been running;
    the message ends with the last lines of its log."""


class ChildProcess:
    """A command that serves on a loopback port, run in a child process.

    Args:
        name: What the process is, for messages ("gateway", "redis-server").
        command: The program and its arguments.
        log_path: Where its standard output and error go.
        port: The loopback port it listens on once ready.
        env: Its whole environment (default: this process's).
        cwd: Its working directory (default: this process's).
        start_timeout: Seconds it may take to become ready.
        preexec_fn: Called in the child before the command runs.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        *,
        port: int,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 20.0,
        preexec_fn: Callable[[], object] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(command)
        self.log_path = log_path
        self.port = port
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.preexec_fn = preexec_fn
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._started_at = 0.0

    @property
    def pid(self) -> int:
        """The process id of the current (or last) run."""
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def uptime(self) -> float:
        """Seconds since the current run started."""
        return time.monotonic() - self._started_at

    def ready(self) -> bool:
        """Whether the running process is ready: here, its port accepts a connection."""
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def spawn(self) -> None:
        """Start the process and return at once (`start` also waits until it is ready)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab" if self.starts else "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=self.preexec_fn,
            )
        self.starts += 1
        self._started_at = time.monotonic()

    def start(self) -> None:
        """Start the process and return once it is ready (blocks).

        Raises:
            ProcessFailed: It exited, or was not ready within `start_timeout` seconds (it
                is then killed).
        """
        self.spawn()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready_yet():
            if time.monotonic() > deadline:
                self._give_up()
            time.sleep(POLL)

    async def astart(self) -> None:
        """`start` for Trio code: the waiting does not block the event loop.

        Raises:
            ProcessFailed: As `start`.
        """
        self.spawn()
        with trio.move_on_after(self.start_timeout):
            while not self._ready_yet():  # noqa: ASYNC110 - another process, polled
                await trio.sleep(POLL)
            return
        self._give_up()

    def _ready_yet(self) -> bool:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise ProcessFailed(f"{self.name} exited at start ({code}):\n{self.log_tail()}")
        return self.ready()

    def _give_up(self) -> NoReturn:
        self.kill()
        raise ProcessFailed(
            f"{self.name} was not ready within {self.start_timeout:g} s:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it is still running after `grace` seconds (blocks).

        Returns:
            Its exit status; None if it was never started.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    async def astop(self, grace: float = 10.0) -> int | None:
        """`stop` for Trio code: the waiting does not block the event loop."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                while self.process.poll() is None:  # noqa: ASYNC110 - another process
                    await trio.sleep(POLL)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the process and reap it: nothing it did not write out survives.

        Returns:
            Its exit status; None if it was never started.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a frozen process run again (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def run(
        self, grace: float = 10.0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Start the process, report it started once it is ready, and keep it running until
        cancelled; then stop it (SIGTERM, SIGKILL after `grace` seconds).

        Raises:
            ProcessFailed: It did not become ready, or it exited while it should have run.
        """
        try:
            await self.astart()
            task_status.started()
            while self.running:  # noqa: ASYNC110 - another process, polled
                await trio.sleep(POLL)
            code = self.process.poll() if self.process is not None else None
            raise ProcessFailed(f"{self.name} exited ({code}):\n{self.log_tail()}")
        finally:
            with trio.CancelScope(shield=True):
                await self.astop(grace)

    def log_text(self) -> str:
        """The whole log, every run so far ("" if there is none yet)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        """The last `lines` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

"""redis-server in a child process on a loopback port.

Persistence is on as docs/scaling.md recommends (AOF, ``appendfsync always`` unless told
otherwise, no RDB snapshots), so a restart on the same directory keeps every write Redis
acknowledged. The server gets SIGKILL from the kernel when the process that started it
dies (``PR_SET_PDEATHSIG``), so none outlives a killed script or test run.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from scripts.kit.child_process import ChildProcess
from scripts.kit.loopback import HOST, free_port

START_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1
MISSING = "redis-server is not installed (scripts/test.sh installs it)"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: `stop` still applies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class RedisServer(ChildProcess):
    """redis-server with its data directory; `url` stays valid across restarts.

    Args:
        directory: Its data directory (the AOF), created at start.
        port: Its port (default: a free one).
        appendfsync: ``always`` or ``everysec``.
        args: More command-line options (say, cluster mode).

    Raises:
        RuntimeError: redis-server is not on the PATH.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        args: Sequence[str] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(MISSING)
        port = free_port() if port is None else port
        self.directory = directory
        super().__init__(
            "redis-server",
            [
                binary, "--port", str(port), "--bind", HOST, "--dir", str(directory),
                "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "",
                "--protected-mode", "no", "--loglevel", "warning", *args,
            ],
            directory / "redis.log",
            port=port,
            start_timeout=START_TIMEOUT,
            preexec_fn=_die_with_parent,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """The URL a client connects to (database 0)."""
        return f"redis://{HOST}:{self.port}/0"

    def ready(self) -> bool:
        """It answers PING (not only accepts: it refuses commands while loading the AOF)."""
        try:
            return self.command("PING") == b"+PONG"
        except OSError:
            return False

    def restart(self) -> None:
        """Kill it and start it again on the same port and data directory."""
        self.kill()
        self.start()

    def command(self, *args: str) -> bytes:
        """Send one command; return a bulk string's contents whole, or else the first line
        of the answer (blocks, briefly)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection((HOST, self.port), timeout=2) as sock:
            sock.sendall(b"".join(parts))
            answer = b""
            while b"\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            if not answer.startswith(b"$"):
                return answer.split(b"\r\n", 1)[0]
            header = answer.index(b"\r\n") + 2
            size = int(answer[1 : header - 2])
            while len(answer) < header + size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer[header : header + size]

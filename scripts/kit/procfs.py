"""Readers of Linux's /proc: the CPU time, resident memory and open files of a process,
how busy the whole machine is, and TCP connections by port.

Every function reads the files once, now; a sample over a window is two readings.
"""

from __future__ import annotations

import contextlib
import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc `stat` file after the command name (which may hold spaces)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_split(pid: int, tid: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads), or of its thread `tid`.

    Raises:
        OSError: The process (or thread) does not exist.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = _stat_fields(path)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User plus system CPU seconds of a process (all its threads), or of its thread `tid`.

    Raises:
        OSError: The process (or thread) does not exist.
    """
    user, system = cpu_split(pid, tid)
    return user + system


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS).

    Raises:
        OSError: The process does not exist.
        LookupError: It has no VmRSS line (a zombie).
    """
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError(f"no VmRSS for process {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit(pid: int) -> int:
    """The soft limit on open files of a process, -1 if /proc does not say."""
    with open(f"/proc/{pid}/limits", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return -1


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, in ascending order."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat_fields(f"/proc/{entry}/stat")[1]) == pid:
                    children.append(int(entry))
    return sorted(children)


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot; idle and iowait are not busy."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores together."""
    return _machine_ticks()[0] / CLK_TCK


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores were busy on average over the next `seconds` (blocks that long)."""
    busy0, total0 = _machine_ticks()
    time.sleep(seconds)
    busy1, total1 = _machine_ticks()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def _tcp_rows() -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket on this host."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                local, remote, state = line.split()[1:4]
                rows.append(
                    (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
                )
    return rows


def tcp_connections_on(port: int) -> int:
    """Open TCP connections (established, or closed by the peer but not yet by us) whose
    local port is `port`, on this host: the server side of every client connection."""
    return sum(1 for local, _, state in _tcp_rows() if local == port and state in ("01", "08"))


def tcp_connections_to(port: int) -> int:
    """Established TCP connections whose remote port is `port`, on this host (say, a
    gateway's pooled connections to its Redis)."""
    return sum(1 for _, remote, state in _tcp_rows() if remote == port and state == "01")

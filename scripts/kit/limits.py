"""This process's limit on open files, raised for scripts that hold many connections."""

from __future__ import annotations

import resource

FD_CAP = 20_000  # open files per process, the workplace's limit


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to min(hard limit, FD_CAP); child processes started
    afterwards inherit it.

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_CAP)
    if soft != want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

"""The device listener: accepts TCP connections, wraps them in TLS, survives fd exhaustion.

When the process runs out of file descriptors (EMFILE, ENFILE) or the kernel out of
socket buffers, `accept` fails. Spinning on it would burn a core while nothing can be
served, so `EdgeListener` logs (at most once per `LOG_INTERVAL`), counts, and backs off
exponentially from `MIN_BACKOFF` to `MAX_BACKOFF` until an accept succeeds again. The
connection waiting in the backlog is accepted as soon as a descriptor is free.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import trio

from gateway.logthrottle import LogThrottle
from gateway.tls import TlsCertificate

log = logging.getLogger(__name__)

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
MIN_BACKOFF = 0.05
MAX_BACKOFF = 1.0
LOG_INTERVAL = 10.0


@dataclass
class AcceptStats:
    """What the listeners have seen, for `/metrics`."""

    accepted: int = 0
    capacity_errors: int = 0


class EdgeListener(trio.abc.Listener[trio.abc.Stream]):
    """A `trio.SocketListener` with fd-exhaustion back-off and optional, reloadable TLS."""

    def __init__(
        self,
        inner: trio.abc.Listener[trio.SocketStream],
        *,
        tls: TlsCertificate | None,
        stats: AcceptStats,
    ) -> None:
        self.inner = inner
        self.tls = tls
        self.stats = stats
        self._log_throttle = LogThrottle(LOG_INTERVAL)

    async def accept(self) -> trio.abc.Stream:
        """The next connection; TLS (with the current certificate) when configured."""
        backoff = MIN_BACKOFF
        while True:
            try:
                stream = await self.inner.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                self._capacity_error(exc, backoff)
                await trio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            self.stats.accepted += 1
            if self.tls is None:
                return stream
            return trio.SSLStream(stream, self.tls.context, server_side=True, https_compatible=True)

    def _capacity_error(self, exc: OSError, backoff: float) -> None:
        self.stats.capacity_errors += 1
        if self._log_throttle.take(trio.current_time()) is not None:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            log.error(
                "accept failed with %s (%s): out of file descriptors or socket memory; "
                "backing off %.2fs (raise the nofile limit or lower [limits] max_connections)",
                name,
                exc.strerror,
                backoff,
            )

    async def aclose(self) -> None:
        """Close the listening socket."""
        await self.inner.aclose()

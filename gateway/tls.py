"""TLS for `wss://`: the server's certificate, reloadable without a restart.

`TlsCertificate` holds the current `ssl.SSLContext`. `reload` builds a new context from
the files and swaps it in: handshakes already done keep theirs, new ones get the new one.
A reload that fails (a missing file, a key that does not match) keeps the old context and
logs why. The gateway reloads on SIGHUP, and also when the files' modification times
change, checked every `[server] tls_watch` seconds (certificate managers that rewrite the
files in place then need no signal).
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import trio

log = logging.getLogger(__name__)


def _stamp(*paths: Path) -> tuple[float, ...]:
    stamps = []
    for path in paths:
        try:
            stamps.append(os.stat(path).st_mtime)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


class TlsCertificate:
    """The server certificate and key, loaded from `cert` and `key` (PEM files).

    Raises:
        OSError, ssl.SSLError: From the constructor, when the files cannot be loaded.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self._loaded_stamp = _stamp(cert, key)
        self.context = self._build()
        self.reloads = 0
        self.failed_reloads = 0

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def reload(self) -> bool:
        """Load the files again and use them for new handshakes; False (and the old
        certificate kept) if they cannot be loaded."""
        stamp = _stamp(self.cert, self.key)
        try:
            context = self._build()
        except (OSError, ssl.SSLError) as exc:
            self.failed_reloads += 1
            log.error("TLS certificate not reloaded, keeping the current one: %s", exc)
            return False
        self.context, self._loaded_stamp = context, stamp
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    def changed_on_disk(self) -> bool:
        """Whether the files' modification times differ from those last loaded."""
        return _stamp(self.cert, self.key) != self._loaded_stamp

    async def watch(
        self, interval: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Reload whenever the files change on disk, checking every `interval` seconds."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self.changed_on_disk():
                self.reload()

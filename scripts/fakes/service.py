"""What every fake push service shares: serving its handler on loopback, and recording
the requests it answered so that tests can wait for them."""

from __future__ import annotations

import ssl
from typing import Generic, TypeVar

import trio

from scripts.fakes.http import HttpRequest, HttpResponse, serve_http

R = TypeVar("R")


class FakeService(Generic[R]):
    """Base of `FakeApns`, `FakeFcm` and `FakeWebPush`: ``port = await nursery.start(
    fake.serve)``, then `wait_requests`. A subclass answers requests in `handle`, calls
    `_record` for each push it answered, and may serve TLS (`server_context`)."""

    records: list[R]
    port: int
    _waiters: list[tuple[int, trio.Event]]
    #: The HTTP/2 receive window offered to clients (None: HTTP/2's default 64 KiB).
    h2_window: int | None = 1 << 20

    def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request (the `serve_http` handler)."""
        raise NotImplementedError

    def server_context(self) -> ssl.SSLContext | None:
        """The TLS context to serve with (None: plain TCP)."""
        return None

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the port."""

        async def started(task_status: trio.TaskStatus[int]) -> None:
            await serve_http(
                self.handle,
                host=host,
                port=port,
                ssl_context=self.server_context(),
                h2_window=self.h2_window,
                task_status=task_status,
            )

        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(started)
            task_status.started(self.port)

    async def wait_requests(self, count: int) -> list[R]:
        """Wait until at least `count` requests have been recorded; return them all."""
        if len(self.records) < count:
            event = trio.Event()
            self._waiters.append((count, event))
            await event.wait()
        return list(self.records)

    def _record(self, record: R) -> None:
        self.records.append(record)
        still = []
        for count, event in self._waiters:
            if len(self.records) >= count:
                event.set()
            else:
                still.append((count, event))
        self._waiters = still

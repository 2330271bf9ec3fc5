"""What every fake push service shares: serving its handler on loopback, recording the
requests it answered so that tests can wait for them, and the control API that reads
those records and scripts the answers."""

from __future__ import annotations

import json
import ssl
from dataclasses import asdict
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from scripts.fakes.http import HttpRequest, HttpResponse, serve_http
from scripts.fakes.script import Reply, Script

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")


class FakeService(Generic[R]):
    """Base of `FakeApns`, `FakeFcm` and `FakeWebPush`: ``port = await nursery.start(
    fake.serve)``, then `wait_requests`. A subclass answers requests in `handle`, calls
    `_record` for each push it answered, hands paths under ``/_fake/`` to `_control`, and
    may serve TLS (`server_context`)."""

    records: list[R]
    script: Script
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

    def _control(self, request: HttpRequest) -> HttpResponse:
        """Answer the control API: ``GET /_fake/requests`` (every record, in JSON), ``POST
        /_fake/reset`` (forget the records and the script) and ``POST /_fake/script``
        (``{"replies": [...], "token": TOKEN}``: queue replies for TOKEN, or for any);
        `_other_control` answers any other request. The fake APNs answers in its own
        format."""
        if request.path == "/_fake/requests":
            body = json.dumps([asdict(r) for r in self.records]).encode()
            return HttpResponse(200, [("content-type", "application/json")], body)
        if request.path == "/_fake/reset" and request.method == "POST":
            self.records.clear()
            self.script.clear()
            return HttpResponse(200, [], b"{}")
        if request.path == "/_fake/script" and request.method == "POST":
            data = json.loads(request.body or b"{}")
            self.script.add(
                *(Reply.from_json(r) for r in data.get("replies", [])), token=data.get("token")
            )
            return HttpResponse(200, [], b"{}")
        return self._other_control(request)

    def _other_control(self, request: HttpRequest) -> HttpResponse:
        """Answer a control request that `_control` does not serve: 404."""
        return HttpResponse(404, [], b"unknown control path")

    def _record(self, record: R) -> None:
        self.records.append(record)
        still = []
        for count, event in self._waiters:
            if len(self.records) >= count:
                event.set()
            else:
                still.append((count, event))
        self._waiters = still

"""A device whose answer waits behind a commit in flight keeps its connection while a large
backlog is queued for it: the writer reads the queue page by page only as the outbox
drains, so the outbox never outgrows its limit."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from gateway.auth import mint_token
from gateway.store import Envelope, SendOutcome, Ticket
from tests.conftest import make_settings, running_server
from tests.rawws import hello, raw_ws, recv, send

BACKLOG = 700  # more than the default outbox limit (512) beyond one page (256)


async def test_a_backlog_behind_a_commit_in_flight_does_not_overflow_the_outbox(tmp_path):
    settings = make_settings(tmp_path, store={"backend": "memory"})
    async with running_server(settings) as server:
        store = server.store
        submit_send = store.submit_send
        held: list[Ticket[SendOutcome]] = []

        async def hold_alices_sends(envelope: Envelope) -> Ticket[SendOutcome]:
            if envelope.sender != "alice":
                return await submit_send(envelope)
            ticket: Ticket[SendOutcome] = Ticket()  # a commit that takes its time
            held.append(ticket)
            return ticket

        store.submit_send = hold_alices_sends  # type: ignore[method-assign]
        await store.register_device("bob", "phone", 0)
        async with raw_ws(server.url) as alice:
            await hello(alice, mint_token(settings.auth, "alice", "phone"))
            await send(alice, {"t": "send", "id": "first", "to": "bob", "body": b"x"})
            await trio.testing.wait_all_tasks_blocked()
            for n in range(BACKLOG):  # bob's messages pile up behind alice's `sent`
                env = Envelope("bob", "phone", f"b{n}", "alice", b"y", None, True, 1, 2**50)
                await (await submit_send(env)).result()
            await trio.testing.wait_all_tasks_blocked()

            await send(alice, {"t": "send", "id": "second", "to": "bob", "body": b"x"})
            await trio.testing.wait_all_tasks_blocked()
            for ticket in held:
                ticket.resolve(SendOutcome(ts=5, devices=1))

            frames: list[dict[str, Any]] = []
            with trio.fail_after(10):
                while (
                    sum(f.get("t") == "msg" for f in frames) < BACKLOG
                    or len([f for f in frames if f.get("t") == "sent"]) < 2
                ):
                    frames += await recv(alice)
        assert [f["id"] for f in frames if f.get("t") == "sent"] == ["first", "second"]
        assert not [f for f in frames if f.get("t") == "error"]

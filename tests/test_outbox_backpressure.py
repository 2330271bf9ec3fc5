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


def hold_alices_sends(store: Any) -> list[Ticket[SendOutcome]]:
    """Make alice's sends commits that take their time: each waits on a ticket the test
    resolves (returned, in order); everyone else's are stored as usual."""
    submit_send = store.submit_send
    held: list[Ticket[SendOutcome]] = []

    async def holding(envelope: Envelope) -> Ticket[SendOutcome]:
        if envelope.sender != "alice":
            return await submit_send(envelope)
        ticket: Ticket[SendOutcome] = Ticket()
        held.append(ticket)
        return ticket

    store.submit_send = holding
    return held


async def test_a_backlog_behind_a_commit_in_flight_does_not_overflow_the_outbox(tmp_path):
    settings = make_settings(tmp_path, store={"backend": "memory"})
    async with running_server(settings) as server:
        store = server.store
        submit_send = store.submit_send
        held = hold_alices_sends(store)
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


async def test_a_pipelining_client_that_reads_keeps_its_connection_while_answers_keep_leaving(
    tmp_path,
):
    # The outbox stays at a quarter of its limit or above for four times `write_timeout`:
    # alice's answers leave one by one while deliveries keep coming in behind them.
    settings = make_settings(tmp_path, store={"backend": "memory"}, server={"write_timeout": 0.5})
    async with running_server(settings) as server:
        store = server.store
        submit_send = store.submit_send
        held = hold_alices_sends(store)
        await store.register_device("bob", "phone", 0)
        quarter = settings.server.outbox_limit // 4
        async with raw_ws(server.url) as alice:
            await hello(alice, mint_token(settings.auth, "alice", "phone"))
            for n in range(quarter + 20):
                await send(alice, {"t": "send", "id": f"s{n}", "to": "bob", "body": b"x"})
            await trio.testing.wait_all_tasks_blocked()
            assert len(held) == quarter  # the connection stopped reading: its outbox is full
            for n in range(10):
                await trio.sleep(0.2)  # one answer every 0.2 s, for 2 s in all
                held[n].resolve(SendOutcome(ts=5, devices=1))
                for m in range(2):  # and two deliveries for alice behind it
                    env = Envelope("bob", "phone", f"b{n}.{m}", "alice", b"y", None, True, 1, 2**50)
                    await (await submit_send(env)).result()
            sent: list[str] = []
            with trio.fail_after(10):
                while len(sent) < quarter + 20:
                    for ticket in held:
                        if not ticket.done:
                            ticket.resolve(SendOutcome(ts=5, devices=1))
                    sent += [f["id"] for f in await recv(alice) if f.get("t") == "sent"]
        assert sent == [f"s{n}" for n in range(quarter + 20)]


async def test_a_doorbell_behind_a_full_outbox_waits_for_the_commit_instead_of_spinning(tmp_path):
    settings = make_settings(tmp_path, store={"backend": "memory"})
    async with running_server(settings) as server:
        store = server.store
        submit_send = store.submit_send
        held = hold_alices_sends(store)
        await store.register_device("bob", "phone", 0)
        limit = settings.server.outbox_limit
        async with raw_ws(server.url) as alice:
            await hello(alice, mint_token(settings.auth, "alice", "phone"))
            for n in range(limit // 4 + 20):
                await send(alice, {"t": "send", "id": f"s{n}", "to": "bob", "body": b"x"})
            await trio.testing.wait_all_tasks_blocked()
            for n in range(limit + 100):  # past half the outbox: the later ones ring
                env = Envelope("bob", "phone", f"b{n}", "alice", b"y", None, True, 1, 2**50)
                await (await submit_send(env)).result()
            assert server.registry.get("alice", "phone").outbox.rung
            held[0].resolve(SendOutcome(ts=5, devices=1))
            with trio.fail_after(5):  # never, while the connection's task spins
                await trio.testing.wait_all_tasks_blocked()
            sent: list[str] = []
            with trio.fail_after(10):
                while len(sent) < limit // 4 + 20:
                    for ticket in held:
                        if not ticket.done:
                            ticket.resolve(SendOutcome(ts=5, devices=1))
                    sent += [f["id"] for f in await recv(alice) if f.get("t") == "sent"]
        assert sent == [f"s{n}" for n in range(limit // 4 + 20)]

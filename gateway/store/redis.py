"""The cluster backend: per-device queues in Redis (or Redis Cluster) through coredis.

Submissions queue up in a bounded channel, as in the SQLite backend. The writer task takes
everything waiting and runs it as one pipeline of Lua script calls, in submission order;
`Ticket`s resolve once Redis has answered, which with ``appendfsync always`` means the
change is in the append-only file on disk (see docs/scaling.md for what that does and
does not promise). Every multi-key change is one script on one user's keys (one hash
slot): see `gateway.store.redis_scripts`.

An operation is a generator of steps: each step is a list of script calls, and the
writer runs step 1 of every operation of a batch in one pipeline, then step 2 of those
that have one, and so on. An ack needs three steps, because its delivered receipts live
under the senders' keys: read the acked items, store the receipts, then delete the items.
A failure between the steps leaves the items in place, to be delivered (and acked) again:
at-least-once, never lost.

Operations start in submission order. Most start together in the first round, but one
that must see everything submitted before it (`open_session`, which reads a queue that
an ack submitted just before may still be deleting from) starts only once every earlier
operation of its batch is done or known to be on its only step, whose calls then come
before its own in the same pipeline; the operations after it wait with it.

When Redis is unreachable, every operation of the batch fails with `StoreError` (callers
answer an error, never a false `sent`); the next batch tries again, so service resumes by
itself once Redis is back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import anyio
import cbor2
import coredis
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.errors import StoreClosed, StoreError
from gateway.settings import masked_url
from gateway.store.base import (
    MAX_SID,
    DeviceRecord,
    Doorbell,
    Envelope,
    ItemKind,
    PushToken,
    QueueItem,
    SendOutcome,
    SessionOpening,
    Ticket,
    decode_item,
    delivered_by_sender,
)
from gateway.store.group_commit import GroupCommitStore, Outcome, Ring
from gateway.store.groups import (
    GroupChange,
    GroupEnvelope,
    GroupEvent,
    deletion_events,
    membership_events,
)
from gateway.store.redis_primaries import PrimaryClients
from gateway.store.redis_replicas import NotReplicated, ReplicaWait
from gateway.store.redis_scripts import SCRIPTS, group_prefix, naming, prefix

log = logging.getLogger(__name__)

SCAN_COUNT = 1000
# This node's channel (doorbells, kicks, revocations); see gateway/store/redis_bus.py.
NODE_CHANNEL = "gw:node:"
# Held by the node that runs the expiry sweep (see `may_sweep`).
SWEEP_LEASE = "gw:sweep-lease"
# Seconds to wait for a Redis answer before the operation counts as failed, and for a
# connection to be set up.
STREAM_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
STARTUP_RETRY_MAX = 5.0

Call = tuple[str, Sequence[str], Sequence[str | int | bytes]]
#: Where a group message's body is stored: (group, body id).
BodyRef = tuple[str, int]


class RemoteDoorbell(NamedTuple):
    """A device connected to another node: `message` is its doorbell, published to that
    node once the commit is answered."""

    user: str
    device: str
    node: str
    message: bytes


Placed = Ring | RemoteDoorbell
OpResult = tuple[Any, list[Placed]]
Steps = Generator[list[Call], list[Any], OpResult]
# What a lost, refused or closed Redis connection raises through coredis.
REDIS_ERRORS = (
    RedisError,
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


def redis_failure(exc: BaseException) -> bool:
    """Whether `exc` is one of REDIS_ERRORS, or a group of nothing else (what coredis
    raises from its own task groups, as a cluster scan does when a primary is gone)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(redis_failure(e) for e in exc.exceptions)
    return isinstance(exc, REDIS_ERRORS)


class RedisUnavailable(StoreError):
    """Redis did not answer; nothing of the operation is known to be committed."""


@dataclass(slots=True)
class _Op:
    steps: Callable[[], Steps]
    ticket: Ticket[Any]
    # Whether the operation has at most one step (known before it runs).
    one_step: bool = False
    # Whether it must run after every step of the operations submitted before it.
    ordered: bool = False


Client = coredis.Redis[bytes] | coredis.RedisCluster[bytes]


def connect(url: str, *, cluster: bool = False) -> Client:
    """A coredis client for `url`, not yet entered (use it as an async context manager).

    With `cluster`, `url` names one node of a Redis Cluster and the client discovers the
    others; each command and script call goes to the primary owning its hash slot.
    """
    if cluster:
        where = urlsplit(url)
        return coredis.RedisCluster.from_url(
            url,
            startup_nodes=[TCPLocation(where.hostname or "127.0.0.1", where.port or 6379)],
            stream_timeout=STREAM_TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
        )
    return coredis.Redis.from_url(
        url,
        stream_timeout=STREAM_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT,
    )


class RedisStore(GroupCommitStore[_Op]):
    """Redis-backed `MessageStore`; see the module docstring for the commit model.

    Other services of the process (the cluster link, presence) use `client` and
    `run_scripts` once `run` has started; the client stays open until `run` returns.

    With a `node_id`, the scripts that queue items also ring the doorbell of a device
    connected to another node (on that node's channel); the local doorbell then rings
    only for devices connected here or nowhere, so a push is only ever considered for a
    device connected nowhere in the cluster.

    With `cluster`, `url` names one node of a Redis Cluster (see `connect`).

    With `replicas` > 0, an operation succeeds only once that many replicas of each primary
    it wrote to acknowledged its writes within `replica_timeout` seconds; otherwise it
    fails with `NotReplicated` (see `gateway.store.redis_replicas`).

    `on_recovered` is called when Redis answers again after failing: operations that
    failed for lack of an answer may have been carried out, and nobody was rung for their
    items.
    """

    consecutive_sids = True  # one INCR counter per device

    def __init__(
        self,
        url: str,
        *,
        doorbell: Doorbell,
        max_batch: int = 512,
        receipt_ttl_ms: int = 30 * 24 * 3600 * 1000,
        counters: Counter[str] | None = None,
        node_id: str = "",
        cluster: bool = False,
        on_recovered: Callable[[], None] = lambda: None,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        super().__init__(doorbell=doorbell, max_batch=max_batch, receipt_ttl_ms=receipt_ttl_ms)
        self.url = url
        self.cluster = cluster
        self.node_id = node_id
        self._shas = {
            name: hashlib.sha1(text.encode()).hexdigest() for name, text in SCRIPTS.items()
        }
        self.client: Client = connect(url, cluster=cluster)
        self._replica_wait = (
            ReplicaWait(self.client, replicas, replica_timeout) if replicas > 0 else None
        )
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.available = False  # whether the last exchange with Redis succeeded
        self._primaries: PrimaryClients | None = None  # on Redis Cluster, once open
        self.on_recovered = on_recovered

    # -- lifecycle ------------------------------------------------------------------------

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[None]:
        """The client, open once Redis answers (waiting for it if needed)."""
        async with self.client, trio.open_nursery() as nursery:
            if isinstance(self.client, coredis.RedisCluster):
                self._primaries = PrimaryClients(self.client, nursery)
            try:
                await self._wait_for_redis()
                yield
            finally:
                nursery.cancel_scope.cancel()  # closes the clients of single primaries

    async def _wait_for_redis(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._load_scripts()
            except REDIS_ERRORS as exc:
                self._unavailable(exc)
                await trio.sleep(delay)
                delay = min(delay * 2, STARTUP_RETRY_MAX)
            else:
                self._available()
                return

    async def _load_scripts(self) -> None:
        for name, text in SCRIPTS.items():
            self._shas[name] = (await self.client.script_load(text)).decode()

    def _available(self) -> None:
        if not self.available:
            log.info("redis at %s is available", masked_url(self.url))
            self.counters["recoveries"] += 1
            self.available = True
            self.on_recovered()

    def _unavailable(self, exc: BaseException) -> None:
        self.counters["errors"] += 1
        if self.available or self.counters["errors"] == 1:
            log.error("redis at %s is unavailable: %s", masked_url(self.url), exc)
        self.available = False

    # -- group commit ---------------------------------------------------------------------

    async def _submit(
        self, steps: Callable[[], Steps], *, one_step: bool = False, ordered: bool = False
    ) -> Ticket[Any]:
        """Queue an operation. `one_step` promises that `steps` yields at most one step;
        an `ordered` operation runs after every step of those submitted before it."""
        op = _Op(steps, Ticket(), one_step, ordered)
        await self._enqueue(op)
        return op.ticket

    async def _apply(self, batch: Sequence[_Op]) -> list[Outcome]:
        """Run the batch's operations in rounds of one pipeline each (see the module
        docstring); a device connected to another node was rung there."""
        outcomes: dict[int, Outcome] = {}
        waiting = deque(batch)  # not started yet, in submission order
        running: list[tuple[_Op, Steps, list[Call]]] = []
        self._start(waiting, running, outcomes)
        try:
            while running:
                calls = [call for _, _, step in running for call in step]
                results = await self._pipeline(calls, self._replica_wait)
                current, running = running, []
                offset = 0
                for op, gen, step in current:
                    answers = results[offset : offset + len(step)]
                    offset += len(step)
                    failed = next((a for a in answers if isinstance(a, Exception)), None)
                    if failed is not None:
                        gen.close()
                        if not isinstance(failed, NotReplicated):  # logged per batch
                            log.warning("store operation failed: %s", failed)
                        outcomes[id(op)] = StoreError(str(failed))
                    else:
                        self._advance(op, gen, answers, running, outcomes)
                self._start(waiting, running, outcomes)
        except REDIS_ERRORS as exc:
            self._unavailable(exc)
            error = RedisUnavailable(f"redis unavailable: {exc}")
            for op, gen, _ in running:
                gen.close()
                outcomes[id(op)] = error
            for op in waiting:  # never sent
                outcomes[id(op)] = error
        else:
            self._available()
        remote: list[RemoteDoorbell] = []
        local = [self._local(outcomes[id(op)], remote) for op in batch]
        if remote:
            await self._publish(remote)
        return local

    def _local(
        self, outcome: Outcome | tuple[Any, list[Placed]], remote: list[RemoteDoorbell]
    ) -> Outcome:
        """`outcome` less the doorbells of devices on other nodes, added to `remote`."""
        if isinstance(outcome, BaseException):
            return outcome
        value, placed = outcome
        rings: list[Ring] = []
        for ring in placed:
            if isinstance(ring, RemoteDoorbell):
                remote.append(ring)
            else:
                rings.append(ring)
        return value, rings

    async def _publish(self, doorbells: list[RemoteDoorbell]) -> None:
        """Ring devices connected to other nodes: on Redis Cluster through each node's
        sharded channel (one shard carries it), else on the node's channel. A doorbell
        is a hint: one that is lost costs its device a catch-up read at most."""
        try:
            with uncancelled():
                async with self.client.pipeline(transaction=False) as pipe:
                    for bell in doorbells:
                        if self.cluster:
                            pipe.spublish(doorbell_channel(bell.node), bell.message)
                        else:
                            pipe.publish(NODE_CHANNEL + bell.node, bell.message)
        except REDIS_ERRORS as exc:
            self.counters["doorbells_lost"] += len(doorbells)
            log.warning("%d doorbells for other nodes not published: %s", len(doorbells), exc)
            return
        self.counters["doorbells_published"] += len(doorbells)

    @classmethod
    def _start(
        cls,
        waiting: deque[_Op],
        running: list[tuple[_Op, Steps, list[Call]]],
        outcomes: dict[int, Any],
    ) -> None:
        """Start waiting operations in order, up to an ordered one that an earlier
        operation may still have steps to run before (it then waits for a later round)."""
        while waiting:
            op = waiting[0]
            if op.ordered and any(not r.one_step for r, _, _ in running):
                return
            waiting.popleft()
            cls._advance(op, op.steps(), None, running, outcomes)

    @staticmethod
    def _advance(
        op: _Op,
        gen: Steps,
        answers: list[Any] | None,
        running: list[tuple[_Op, Steps, list[Call]]],
        outcomes: dict[int, Any],
    ) -> None:
        """Feed an operation the answers to its last step; file it as running, or its
        outcome once it is done."""
        try:
            step = gen.send(answers)  # type: ignore[arg-type]  # None primes the generator
            while not step:  # a step with no calls needs no round trip
                step = gen.send([])
        except StopIteration as stop:
            outcomes[id(op)] = stop.value
        except StoreError as exc:
            outcomes[id(op)] = exc
        else:
            running.append((op, gen, step))

    async def run_scripts(self, calls: list[Call]) -> list[Any]:
        """Run script calls (see `gateway.store.redis_scripts`) in one pipeline, in order.
        A call that Redis refused is returned as its exception.

        Raises:
            RedisUnavailable: Redis did not answer.
        """
        try:
            results = await self._pipeline(calls)
        except REDIS_ERRORS as exc:
            self._unavailable(exc)
            raise RedisUnavailable(f"redis unavailable: {exc}") from None
        self._available()
        return results

    async def _pipeline(self, calls: list[Call], replicas: ReplicaWait | None = None) -> list[Any]:
        """Run script calls in one pipeline, in order; a script Redis lost (after a restart
        without its script cache) is loaded again and its call redone. With `replicas`, a
        call whose writes the replicas did not acknowledge is answered `NotReplicated`.

        It is never cancelled half-way (see `uncancelled`): the client's own timeouts
        bound it, and a caller's cancellation takes effect once it is done."""
        with uncancelled():
            results = await self._run_calls(calls, replicas)
            missing = [n for n, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                await self._load_scripts()
                redone = await self._run_calls([calls[n] for n in missing], replicas)
                for n, result in zip(missing, redone, strict=True):
                    results[n] = result
        await trio.lowlevel.checkpoint_if_cancelled()
        return results

    async def _run_calls(self, calls: list[Call], replicas: ReplicaWait | None) -> list[Any]:
        async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
            requests = [
                pipe.evalsha(self._shas[name], keys=list(keys), args=list(args))
                for name, keys, args in calls
            ]
            waits = replicas.add(pipe, [keys for _, keys, _ in calls]) if replicas else []
        results: list[Any] = []
        for request in requests:
            try:
                results.append(await request)
            except ResponseError as exc:
                results.append(exc)
        if replicas is not None:
            shortfall = await replicas.shortfall(waits)
            if shortfall:
                self.counters["not_replicated"] += len(shortfall)
                log.warning(
                    "%d store operations not acknowledged by replicas: %s",
                    len(shortfall),
                    next(iter(shortfall.values())),
                )
            for n, error in shortfall.items():
                if not isinstance(results[n], Exception):
                    results[n] = error
        return results

    # -- mutations ------------------------------------------------------------------------

    async def submit_send(self, envelope: Envelope) -> Ticket[SendOutcome]:
        return await self._submit(lambda: _send_steps(envelope, self.node_id), one_step=True)

    async def submit_ack(
        self, user: str, device: str, sids: tuple[int, ...], now: int
    ) -> Ticket[int]:
        expires = now + self._receipt_ttl_ms
        node = self.node_id
        return await self._submit(lambda: _ack_steps(user, device, sids, now, expires, node))

    async def submit_read(
        self,
        reader: str,
        reader_device: str,
        to: str,
        ids: tuple[str, ...],
        now: int,
        expires: int,
    ) -> Ticket[int]:
        def steps() -> Steps:
            if not ids:
                return 0, []
            p = prefix(reader)
            args: list[str | int | bytes] = [now, to, *dict.fromkeys(ids)]
            [found] = yield [("received", [f"{p}:m", f"{p}:rx:{to}\0"], args)]
            known = {i.decode() for i in found}
            received = tuple(dict.fromkeys(i for i in ids if i in known))
            if not received:
                return 0, []
            # The sender's devices, and the reader's other devices (a call in its own slot).
            targets = [(to, "")] if to == reader else [(to, ""), (reader, reader_device)]
            answers = yield [
                _receipt_call(ItemKind.READ, user, reader, reader_device, received, now,
                              expires, self.node_id, skip)
                for user, skip in targets
            ]  # fmt: skip
            rings: list[Placed] = []
            for (user, _), placed in zip(targets, answers, strict=True):
                make = _receipt_ring(ItemKind.READ, user, reader, reader_device, now, received)
                rings += _placed(placed, make)
            return len(rings), rings

        return await self._submit(steps)

    async def submit_group_send(self, envelope: GroupEnvelope) -> Ticket[SendOutcome]:
        return await self._submit(lambda: _group_send_steps(envelope, self.node_id))

    async def _group_change(
        self, group: str, mode: str, users: Sequence[str], now: int, limit: int
    ) -> Any:
        ttl, node = self._receipt_ttl_ms, self.node_id
        ticket = await self._submit(
            lambda: _group_change_steps(group, mode, users, now, limit, ttl, node)
        )
        return await ticket.result()

    async def set_group(
        self, group: str, members: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        if len(set(members)) > limit:
            return GroupChange(over_limit=True)
        result: GroupChange = await self._group_change(group, "set", members, now, limit)
        return result

    async def add_group_members(
        self, group: str, users: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        result: GroupChange = await self._group_change(group, "add", users, now, limit)
        return result

    async def remove_group_member(self, group: str, user: str, now: int) -> GroupChange:
        result: GroupChange = await self._group_change(group, "remove", (user,), now, 0)
        return result

    async def delete_group(self, group: str, now: int) -> bool:
        result: bool = await self._group_change(group, "delete", (), now, 0)
        return result

    async def group_members(self, group: str) -> tuple[str, ...] | None:
        g = group_prefix(group)
        answer = await self._call("group_members", [f"{g}:meta", f"{g}:members"], [])
        if answer[0] == 0:
            return None
        return tuple(sorted(user.decode() for user in answer[1:]))

    async def sync(self) -> None:
        await (await self._submit(_no_steps, one_step=True)).result()

    async def open_session(
        self, user: str, device: str, *, issued_at: int | None, now: int, limit: int
    ) -> SessionOpening:
        """Check the revocation, register the device and read the first page of its queue
        and its count in one script call (one slot), run in the commit pipeline after
        every step of the operations submitted before it.

        Raises:
            ValueError: `limit` is negative.
            StoreError: Redis did not answer, or refused the call.
        """
        if limit < 0:
            raise ValueError("limit must not be negative")
        p = prefix(user)
        keys = [f"{p}:rev:{device}", f"{p}:devs", f"{p}:d:{device}", f"{p}:q:{device}"]
        args: list[str | int | bytes] = [device, now, "" if issued_at is None else issued_at, limit]

        def steps() -> Steps:
            [answer] = yield [("open", keys, args)]
            if answer[0] == 1:
                return SessionOpening(refused=True), []
            stored[:] = [decode_stored(m) for m in answer[2:]]
            items = tuple(item for item, _ in stored)
            return SessionOpening(refused=False, items=items, queued=int(answer[1])), []

        stored: list[tuple[QueueItem, BodyRef | None]] = []
        opening: SessionOpening = await (
            await self._submit(steps, one_step=True, ordered=True)
        ).result()
        if any(ref is not None for _, ref in stored):  # group messages: bodies apart
            opening = dataclasses.replace(opening, items=tuple(await self._with_bodies(stored)))
        return opening

    async def register_device(self, user: str, device: str, now: int) -> bool:
        p = prefix(user)

        def steps() -> Steps:
            [created] = yield [("register", [f"{p}:devs", f"{p}:d:{device}"], [device, now])]
            return created == 1, []

        result: bool = await (await self._submit(steps, one_step=True)).result()
        return result

    async def remove_device(self, user: str, device: str) -> bool:
        p = prefix(user)

        keys = [f"{p}:devs", f"{p}:d:{device}", f"{p}:q:{device}"]
        steps = partial(_forget_device_steps, "remove", keys, [device])
        result: bool = await (await self._submit(steps)).result()
        return result

    async def revoke_device(self, user: str, device: str, now: int) -> bool:
        p = prefix(user)

        keys = [f"{p}:devs", f"{p}:d:{device}", f"{p}:q:{device}", f"{p}:rev:{device}"]
        steps = partial(_forget_device_steps, "revoke", keys, [device, now])
        result: bool = await (await self._submit(steps)).result()
        return result

    async def revoked_at(self, user: str, device: str) -> int | None:
        try:
            with uncancelled():
                value = await self.client.get(f"{prefix(user)}:rev:{device}")
        except REDIS_ERRORS as exc:
            self._unavailable(exc)
            raise RedisUnavailable(f"redis unavailable: {exc}") from None
        return None if value is None else int(value)

    async def touch_device(self, user: str, device: str, last_seen: int) -> None:
        await self._submit(
            lambda: _update_steps(user, device, ("set", ["seen", last_seen])), one_step=True
        )

    async def set_push_token(self, user: str, device: str, token: PushToken | None) -> None:
        changes: list[tuple[str, list[str | int]]] = [("del", ["pp", "pt", "ptopic", "psb", "pra"])]
        if token is not None:
            fields: list[str | int] = ["pp", token.provider, "pt", token.token]
            fields += ["psb", int(token.sandbox), "pra", token.registered_at]
            if token.topic is not None:
                fields += ["ptopic", token.topic]
            changes.append(("set", fields))
        ticket = await self._submit(lambda: _update_steps(user, device, *changes), one_step=True)
        await ticket.result()

    async def clear_push_token(self, user: str, device: str, token: str, sent_at: int) -> bool:
        p = prefix(user)

        def steps() -> Steps:
            [cleared] = yield [("clear_token", [f"{p}:d:{device}"], [token, sent_at])]
            return cleared == 1, []

        result: bool = await (await self._submit(steps, one_step=True)).result()
        return result

    async def may_sweep(self, lease_ms: int) -> bool:
        """Take or renew the sweep lease (``gw:sweep-lease``, this node's id with a TTL):
        one node sweeps, and when it dies another takes over once the lease runs out."""
        answer = await self._call("refresh", [SWEEP_LEASE], [self.node_id, lease_ms])
        return int(answer) != 0

    async def sweep_expired(self, now: int) -> int:
        """Delete expired items of every queue (returning how many) and expired
        remembered-message records of every user and group. The queues of devices that
        never come back, and the records of users and groups sent nothing more, also
        expire by themselves (Redis TTLs)."""
        if self._queue.closed:
            raise StoreClosed("the store is shutting down")
        try:
            swept = await self._sweep_keys("gw:{*}:q:*", "prune", now)
            await self._sweep_keys("gw*:{*}:m", "compact", now)
        except Exception as exc:
            if not redis_failure(exc):
                raise
            self._unavailable(exc)
            raise RedisUnavailable(f"redis unavailable: {exc}") from None
        return swept

    async def _sweep_keys(self, pattern: str, script: str, now: int) -> int:
        """Run `script` on every key matching `pattern`, SCAN_COUNT keys per pipeline;
        the sum of its answers."""
        total = 0
        keys: list[bytes] = []
        for node in await self._scanned_nodes():
            async for key in node.scan_iter(match=pattern, count=SCAN_COUNT):
                keys.append(key)
                if len(keys) >= SCAN_COUNT:
                    total += await self._prune(script, keys, now)
                    keys = []
        return total + await self._prune(script, keys, now)

    async def _scanned_nodes(self) -> list[coredis.Redis[bytes]]:
        """What a sweep scans: the server, or each primary of the cluster."""
        if self._primaries is None:
            assert isinstance(self.client, coredis.Redis)
            return [self.client]
        return await self._primaries.clients()

    async def _prune(self, script: str, keys: list[bytes], now: int) -> int:
        if not keys:
            return 0
        calls: list[Call] = [(script, [key.decode()], [now]) for key in keys]
        return sum(r for r in await self._pipeline(calls) if isinstance(r, int))

    # -- reads ----------------------------------------------------------------------------

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            [result] = await self._pipeline([(name, keys, args)])
        except REDIS_ERRORS as exc:
            self._unavailable(exc)
            raise RedisUnavailable(f"redis unavailable: {exc}") from None
        if isinstance(result, Exception):
            raise StoreError(f"read failed: {result}")
        return result

    async def fetch(
        self, user: str, device: str, after_sid: int, limit: int, now: int
    ) -> list[QueueItem]:
        key = f"{prefix(user)}:q:{device}"
        members = await self._call("fetch", [key], [after_sid, now, limit])
        return await self._with_bodies([decode_stored(m) for m in members])

    async def _with_bodies(self, stored: list[tuple[QueueItem, BodyRef | None]]) -> list[QueueItem]:
        """`items` with the bodies of group messages read from their groups' slots (one
        call per distinct body, in one pipeline). An item whose body is gone has expired
        (its body lives as long as it, plus slack) and is left out.

        Raises:
            StoreError: Redis did not answer, or refused a call.
        """
        refs = list(dict.fromkeys(ref for _, ref in stored if ref is not None))
        if not refs:
            return [item for item, _ in stored]
        answers = await self.run_scripts([("body", [_body_key(ref)], []) for ref in refs])
        bodies: dict[BodyRef, bytes] = {}
        for key, answer in zip(refs, answers, strict=True):
            if isinstance(answer, Exception):
                raise StoreError(f"read failed: {answer}")
            if isinstance(answer, bytes):
                bodies[key] = answer
        out: list[QueueItem] = []
        for item, where in stored:
            if where is None:
                out.append(item)
            elif where in bodies:
                out.append(dataclasses.replace(item, body=bodies[where]))
        return out

    async def count(self, user: str, device: str, now: int) -> int:
        return int(await self._call("count", [f"{prefix(user)}:q:{device}"], [now]))

    async def devices(self, user: str) -> list[DeviceRecord]:
        p = prefix(user)
        flat = await self._call("devices", [f"{p}:devs"], [p])
        records = []
        for n in range(0, len(flat), 3):
            device, created, fields = flat[n].decode(), int(flat[n + 1]), _fields(flat[n + 2])
            seen = None if fields.get("seen") is None else int(fields["seen"])
            records.append(DeviceRecord(user, device, created, seen, _push(fields)))
        return sorted(records, key=lambda r: r.device)

    async def push_token(self, user: str, device: str) -> PushToken | None:
        try:
            with uncancelled():
                values = await self.client.hgetall(f"{prefix(user)}:d:{device}")
        except REDIS_ERRORS as exc:
            self._unavailable(exc)
            raise RedisUnavailable(f"redis unavailable: {exc}") from None
        return _push({k.decode(): v for k, v in values.items()})


def uncancelled() -> trio.CancelScope:
    """A scope for one exchange with Redis that the caller's cancellation cannot cut.

    coredis marks a connection whose command was cancelled in flight as unusable, and
    its pool then neither takes it back nor frees its place: after as many cancellations
    as the pool has connections (say, connections closing while their queue reads wait),
    every operation would wait for a free connection forever. The client's own
    `STREAM_TIMEOUT` and `CONNECT_TIMEOUT` still bound the exchange."""
    return trio.CancelScope(shield=True)


# -- operations: generators of script-call steps ----------------------------------------


def _no_steps() -> Steps:
    yield []  # a barrier: no calls, resolved with the rest of its batch
    return None, []


def _update_steps(user: str, device: str, *changes: tuple[str, list[str | int]]) -> Steps:
    """Set ("set", [field, value, ...]) or delete ("del", [field, ...]) fields of a known
    device's record, in one step."""
    p = prefix(user)
    keys = [f"{p}:devs", f"{p}:d:{device}"]
    yield [("update_device", keys, [device, mode, *fields]) for mode, fields in changes]
    return None, []


def _placed(placed: list[Any], make: Callable[[str, int], Ring]) -> list[Placed]:
    """Rings for the (device, sid, where) triples a queueing script returns; `where` is
    [node, doorbell] for a device connected to another node (see `RING`)."""
    rings: list[Placed] = []
    for n in range(0, len(placed), 3):
        device, sid, where = placed[n].decode(), int(placed[n + 1]), placed[n + 2]
        if isinstance(where, list):
            node, message = where
            rings.append(RemoteDoorbell(make(device, sid)[0], device, node.decode(), message))
        else:
            rings.append(make(device, sid))
    return rings


def doorbell_channel(node: str) -> str:
    """The sharded channel that carries doorbells to `node` on Redis Cluster."""
    return "gw:{node:" + node + "}:bells"


def _send_steps(env: Envelope, node: str) -> Steps:
    p = prefix(env.to)
    own = env.sender_device if env.to == env.sender else ""
    head: list[str | int | bytes] = [p, env.ts, env.expires, int(env.urgent), own]
    rec = naming(env.sender, env.sender_device, env.msg_id, env.ts, env.expires)
    if env.bodies is None:
        body = env.body or b""
        args = [*head, "a", env.to, node, *rec, _payload(ItemKind.MESSAGE, env, body)]
    else:
        args = [*head, "p", env.to, node, *rec]
        for device, body in env.bodies.items():
            args += [device, _payload(ItemKind.MESSAGE, env, body)]
    [answer] = yield [("send", [f"{p}:devs", f"{p}:m", _old_id_key(p, env)], args)]
    status = answer[0]
    if status == 0:
        return SendOutcome(ts=int(answer[1]), duplicate=True), []
    if status == -1:
        return SendOutcome(ts=env.ts, unknown_recipient=True), []
    nskipped = answer[1]
    skipped = tuple(sorted(d.decode() for d in answer[2 : 2 + nskipped]))

    def make(device: str, sid: int) -> Ring:
        body = (env.body or b"") if env.bodies is None else env.bodies[device]
        item = QueueItem(
            sid, ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device, env.ts,
            env.urgent, body,
        )  # fmt: skip
        return env.to, device, env.urgent, item

    rings = _placed(answer[2 + nskipped :], make)
    return SendOutcome(ts=env.ts, devices=len(rings), skipped=skipped), rings


def _old_id_key(p: str, env: Envelope | GroupEnvelope) -> str:
    """The message's idempotency key in the layout before remembered-message records
    (``P:id:`` or ``G:id:``): read only, so that a record written before an upgrade is
    honoured until it expires."""
    return f"{p}:id:{env.sender}\0{env.sender_device}\0{env.msg_id}"


def _receipt_ring(
    kind: ItemKind, to: str, by: str, by_device: str, now: int, ids: tuple[str, ...]
) -> Callable[[str, int], Ring]:
    def make(device: str, sid: int) -> Ring:
        item = QueueItem(sid, kind, "", by, by_device, now, False, b"", ids)
        return to, device, False, item

    return make


def _receipt_call(
    kind: ItemKind,
    to: str,
    by: str,
    by_device: str,
    ids: tuple[str, ...],
    now: int,
    expires: int,
    node: str,
    skip: str = "",
) -> Call:
    p = prefix(to)
    payload = cbor2.dumps([int(kind), "", by, by_device, now, False, list(ids)])
    return ("receipts", [f"{p}:devs"], [p, now, expires, payload, to, node, skip])


def _forget_device_steps(script: str, keys: list[str], args: list[str | int]) -> Steps:
    """Delete a device and its queue ("remove" or "revoke"), then release the group
    bodies its items held. If the release fails, those bodies stay until they expire."""
    [answer] = yield [(script, keys, args)]
    held = Counter(ref for member in answer[1:] if (ref := decode_stored(member)[1]))
    if held:
        yield [("body_release", [_body_key(ref)], [n]) for ref, n in held.items()]
    return answer[0] == 1, []


def _ack_steps(
    user: str, device: str, sids: tuple[int, ...], now: int, expires: int, node: str
) -> Steps:
    if not sids:
        return 0, []
    if any(not 0 <= sid <= MAX_SID for sid in sids):
        raise StoreError("sid out of range")
    sids = tuple(dict.fromkeys(sids))  # a sid named twice is one item, and one receipt
    queue = f"{prefix(user)}:q:{device}"
    [members] = yield [("peek", [queue], list(sids))]
    if not members:
        return 0, []
    acked = [decode_stored(member) for member in members]
    by_sender = delivered_by_sender((item.kind, item.msg_id, item.sender) for item, _ in acked)
    rings: list[Placed] = []
    if by_sender:
        # Receipts first: if deleting fails after this, the items are delivered again and
        # acked again, which is at-least-once; the other order could lose the receipts.
        step = [
            _receipt_call(ItemKind.DELIVERED, sender, user, device, ids, now, expires, node)
            for sender, ids in by_sender.items()
        ]
        answers = yield step
        for (sender, ids), placed in zip(by_sender.items(), answers, strict=True):
            make = _receipt_ring(ItemKind.DELIVERED, sender, user, device, now, ids)
            rings += _placed(placed, make)
    refs = [ref for _, ref in acked]
    if not any(refs):
        [deleted] = yield [("remove_members", [queue], members)]
        return int(deleted), rings
    # Group messages: only the items this call deletes release their bodies, after the
    # delete (a failure in between keeps a body until it expires, never loses one).
    [flags] = yield [("remove_each", [queue], members)]
    released = Counter(ref for ref, flag in zip(refs, flags, strict=True) if ref and flag == 1)
    if released:
        yield [("body_release", [_body_key(ref)], [n]) for ref, n in released.items()]
    return sum(int(flag) for flag in flags), rings


def _group_send_steps(env: GroupEnvelope, node: str) -> Steps:
    """Three steps, each call on one slot: in the group's, check the id and the sender's
    membership and store the body with the send's hold on it; in each member's, queue an
    item naming the body for each device (idempotently, as a 1:1 send, so a retry after a
    failure half-way fills in only what is missing); in the group's, exchange the hold for
    the number of items queued and record the id."""
    g = group_prefix(env.group)
    rec = naming(env.sender, env.sender_device, env.msg_id, env.ts, env.expires)
    begin_args: list[str | int | bytes] = [g, env.sender, env.ts, env.expires, env.body, *rec]
    begin_keys = [f"{g}:members", f"{g}:m", f"{g}:bseq", _old_id_key(g, env)]
    [begin] = yield [("group_begin", begin_keys, begin_args)]
    if begin[0] == 0:
        [listed] = yield [("group_members", [f"{g}:meta", f"{g}:members"], [])]
        names = tuple(sorted(user.decode() for user in listed[1:]))
        return SendOutcome(ts=int(begin[1]), duplicate=True, members=names), []
    if begin[0] == -1:
        return SendOutcome(ts=env.ts, not_member=True), []
    bid = int(begin[1])
    members = sorted(user.decode() for user in begin[2:])
    head = [int(ItemKind.MESSAGE), env.msg_id, env.sender, env.sender_device, env.ts, env.urgent]
    stored_payload = cbor2.dumps([*head, None, env.group, bid])
    rung_payload = cbor2.dumps([*head, env.body, env.group])
    calls: list[Call] = []
    for member in members:
        p = prefix(member)
        own = env.sender_device if member == env.sender else ""
        keys = [f"{p}:devs", f"{p}:m", _old_id_key(p, env)]
        args: list[str | int | bytes] = [
            p, env.ts, env.expires, int(env.urgent), own, "g", member, node, *rec,
            stored_payload, rung_payload,
        ]  # fmt: skip
        calls.append(("send", keys, args))
    answers = yield calls
    rings: list[Placed] = []
    for member, answer in zip(members, answers, strict=True):
        if answer[0] != 1:  # stored by an earlier attempt, or no device
            continue

        def make(device: str, sid: int, member: str = member) -> Ring:
            item = QueueItem(
                sid, ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device, env.ts,
                env.urgent, env.body, (), env.group,
            )  # fmt: skip
            return member, device, env.urgent, item

        rings += _placed(answer[2 + answer[1] :], make)
    settle_args = [len(rings), env.ts, env.expires, *rec]
    yield [("group_settle", [f"{g}:b:{bid}", f"{g}:m"], settle_args)]
    return SendOutcome(ts=env.ts, devices=len(rings)), rings


def _group_change_steps(
    group: str,
    mode: str,
    users: Sequence[str],
    now: int,
    limit: int,
    receipt_ttl_ms: int,
    node: str,
) -> Steps:
    """Change the member list in the group's slot (recording the change as pending), then
    queue the events of every pending change in each recipient's slot, then clear what
    was queued. A change whose events were never queued (Redis failed in between) is
    queued with the next change of the group, so events are at least once. A delete
    answers True or False; the others a `GroupChange`."""
    g = group_prefix(group)
    keys = [f"{g}:meta", f"{g}:members", f"{g}:pending"]
    [answer] = yield [("group_change", keys, [mode, now, limit, *users])]
    status, created, count = int(answer[0]), answer[1] == 1, int(answer[2])
    members = tuple(sorted(user.decode() for user in answer[3 : 3 + count]))
    pending = list(answer[3 + count :])
    rings: list[Placed] = []
    for entry in pending:
        kind, at, old, new = json.loads(entry)
        old, new = (value or [] for value in (old, new))  # Lua's cjson writes [] as {}
        events = deletion_events(old) if kind == "delete" else membership_events(old, new)
        rings += yield from _group_event_steps(
            group, events, int(at), int(at) + receipt_ttl_ms, node
        )
    if pending:
        yield [("group_settled", [f"{g}:pending"], pending)]
    if mode == "delete":
        return status == 1, rings
    if status == -1:
        return GroupChange(over_limit=True), rings
    if status == 0:
        return GroupChange(found=False), rings
    return GroupChange(members, created=created), rings


def _group_event_steps(
    group: str, events: list[GroupEvent], now: int, expires: int, node: str
) -> Generator[list[Call], list[Any], list[Placed]]:
    """Queue each event to every device of its recipients: one call per recipient."""
    calls: list[Call] = []
    makes: list[Callable[[str, int], Ring]] = []
    for event in events:
        payload = cbor2.dumps(
            [int(ItemKind.GROUP), event.event, "", "", now, False, list(event.users), group]
        )
        for user in event.recipients:
            p = prefix(user)
            calls.append(("receipts", [f"{p}:devs"], [p, now, expires, payload, user, node]))

            def make(device: str, sid: int, user: str = user, e: GroupEvent = event) -> Ring:
                item = QueueItem(sid, ItemKind.GROUP, e.event, "", "", now, False, b"", e.users,
                                 group)  # fmt: skip
                return user, device, False, item

            makes.append(make)
    if not calls:
        return []
    answers = yield calls
    rings: list[Placed] = []
    for queue_event, placed in zip(makes, answers, strict=True):
        rings += _placed(placed, queue_event)
    return rings


# -- encoding -----------------------------------------------------------------------------


def _payload(kind: ItemKind, env: Envelope, body: bytes) -> bytes:
    return cbor2.dumps(
        [int(kind), env.msg_id, env.sender, env.sender_device, env.ts, env.urgent, body]
    )


def decode_member(member: bytes) -> QueueItem:
    """A queue member ``EXPIRES|SID|PAYLOAD`` (or a doorbell's) back into the item it
    stores. A stored group message names its body instead of carrying it: it comes back
    with an empty body (`decode_stored` says where the body is)."""
    return decode_stored(member)[0]


def decode_stored(member: bytes) -> tuple[QueueItem, BodyRef | None]:
    """A queue member back into its item, and where its body is stored if apart."""
    _, sid, payload = member.split(b"|", 2)
    fields = cbor2.loads(payload)
    if len(fields) == 9:  # a group message naming its body: [..., None, group, bid]
        kind, msg_id, sender, device, ts, urgent, _, group, bid = fields
        item = decode_item(int(sid), kind, msg_id, sender, device, ts, urgent, b"", group)
        return item, (group, int(bid))
    return decode_item(int(sid), *fields), None


def _body_key(ref: BodyRef) -> str:
    return f"{group_prefix(ref[0])}:b:{ref[1]}"


def _fields(flat: Any) -> dict[str, bytes]:
    """A hash as Redis returns it from a script (flat list) or a command (dict)."""
    if isinstance(flat, dict):
        return {k.decode(): v for k, v in flat.items()}
    return {flat[n].decode(): flat[n + 1] for n in range(0, len(flat), 2)}


def _push(fields: dict[str, bytes]) -> PushToken | None:
    provider, token = fields.get("pp"), fields.get("pt")
    if provider is None or token is None:
        return None
    topic = fields.get("ptopic")
    return PushToken(
        provider.decode(),
        token.decode(),
        None if topic is None else topic.decode(),
        fields.get("psb") == b"1",
        int(fields.get("pra", b"0")),
    )

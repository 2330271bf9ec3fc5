"""One simulated run: gateway, fake providers, fleet, traffic, network drops, final drain,
and the end-of-run check of every device's queue.

```
simulate
└─ nursery
   ├─ fake APNs, FCM, Web Push (PushRelay)  ├─ the gateway process (unless --url)
   ├─ sampler (live display, timeline)      └─ phones: one task each
   └─ traffic, network drops (and an injected fault) while the traffic phase lasts
```
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import httpx
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from gateway.errors import GatewayError
from scripts.kit.lean_client import LeanClient
from scripts.simulator.knobs import Scenario
from scripts.simulator.ledger import Ledger, Sample, now
from scripts.simulator.phone import FleetContext, Phone, Reader
from scripts.simulator.push_relay import PushRelay

SAMPLE_INTERVAL = 0.25
SETUP_TIMEOUT = 30.0
CHECK_CONCURRENCY = 8
# The gateway's wake-up counters the summary shows, by the name it shows them under.
GATEWAY_METRICS = {
    "gateway_push_retries_total": "alert_retries",
    "gateway_push_zombie_rescues_total": "zombie_rescues",
    "gateway_push_clears_total": "clears",
    'gateway_push_outcomes_total{outcome="retry_skipped",provider="none"}': "retries_skipped",
}


@dataclass
class Run:
    """A run in progress: what the live display reads."""

    scenario: Scenario
    ledger: Ledger
    phones: list[Phone] = field(default_factory=list)
    phase: str = "starting"
    phase_started: float = field(default_factory=now)
    faults: list[str] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)  # phone indexes of each group

    def enter(self, phase: str) -> None:
        """Move to the next phase."""
        self.phase, self.phase_started = phase, now()


def build_fleet(ctx: FleetContext) -> list[Phone]:
    """The scenario's devices: platforms and idle-cycling devices drawn from the seed.

    `web_share` of them are browsers; `ios_share` of the others are iPhones, the rest
    Android phones."""
    scenario = ctx.scenario
    rng = scenario.rng("fleet")
    count = scenario.devices
    web = round(count * scenario.web_share)
    ios = round((count - web) * scenario.ios_share)
    cycling = min(round(count * scenario.idle_fraction), count - 1)
    platforms = ["web"] * web + ["ios"] * ios + ["android"] * (count - web - ios)
    rng.shuffle(platforms)
    cycles = [True] * cycling + [False] * (count - cycling)
    rng.shuffle(cycles)
    phones = [
        Phone(ctx, i, platforms[i], cycles[i], scenario.rng(f"phone/{i}")) for i in range(count)
    ]
    ctx.phones.update((p.user, p) for p in phones)
    return phones


def build_readers(ctx: FleetContext, phones: Sequence[Phone]) -> list[Reader]:
    """A second, always connected device for `reader_share` of the sleeping phones' users."""
    scenario = ctx.scenario
    rng = scenario.rng("readers")
    sleeping = [p for p in phones if p.cycles]
    chosen = rng.sample(sleeping, round(len(sleeping) * scenario.reader_share))
    return [Reader(ctx, p.user, scenario.rng(f"reader/{p.user}")) for p in chosen]


@dataclass(frozen=True, slots=True)
class Send:
    """One scheduled message: to a phone, or (with `group`) to a group the sender is in."""

    at: float  # seconds after the traffic phase starts
    sender: int
    recipient: int
    urgent: bool
    read: bool
    group: int | None = None


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """The gateway's backend API, where the simulator sets up its groups."""

    url: str
    api_key: str


def group_name(index: int) -> str:
    """The id of the scenario's group `index`."""
    return f"sim-group-{index:03d}"


def build_groups(scenario: Scenario, phones: Sequence[Phone]) -> list[list[int]]:
    """The scenario's groups, as phone indexes drawn from the seed; each holds at least one
    active phone, so that some member sends to it."""
    rng = scenario.rng("groups")
    size = min(scenario.group_size, len(phones))
    active = [p.index for p in phones if not p.cycles]
    groups = []
    for _ in range(scenario.groups if size >= 2 else 0):
        members = rng.sample(range(len(phones)), size)
        if not any(not phones[i].cycles for i in members):
            members[0] = rng.choice([i for i in active if i not in members])
        groups.append(sorted(members))
    return groups


def traffic_schedule(
    scenario: Scenario, phones: Sequence[Phone], groups: Sequence[Sequence[int]] = ()
) -> list[Send]:
    """The messages the active phones send: Poisson arrivals at `rate` for `duration`; a
    share `group_share` of them go to one of the sender's groups, if it has any."""
    rng = scenario.rng("traffic")
    senders = [p.index for p in phones if not p.cycles]
    sends: list[Send] = []
    at = 0.0
    while scenario.rate > 0:
        at += rng.expovariate(scenario.rate)
        if at >= scenario.duration:
            break
        sender = rng.choice(senders)
        recipient = rng.randrange(len(phones) - 1)
        recipient += recipient >= sender  # anyone but the sender
        urgent, read = rng.random() < scenario.urgent_share, rng.random() < scenario.read_share
        mine = [g for g, members in enumerate(groups) if sender in members]
        group = rng.choice(mine) if mine and rng.random() < scenario.group_share else None
        sends.append(Send(at, sender, recipient, urgent, read, group))
    return sends


async def set_up_groups(
    admin: AdminAccess, phones: Sequence[Phone], groups: Sequence[Sequence[int]]
) -> None:
    """Create (or replace) the scenario's groups through the backend API.

    Raises:
        GatewayError: The API refused a group.
    """
    headers = {"authorization": f"Bearer {admin.api_key}"}
    async with httpx.AsyncClient(base_url=admin.url, timeout=10) as http:
        for index, members in enumerate(groups):
            body = {"members": [phones[i].user for i in members]}
            response = await http.put(f"/v1/groups/{group_name(index)}", json=body, headers=headers)
            if response.status_code not in (200, 201):
                raise GatewayError(
                    f"the backend API refused group {group_name(index)}: "
                    f"{response.status_code} {response.text[:200]}"
                )


async def simulate(
    run: Run,
    relay: PushRelay,
    url: str,
    token: Callable[[str], str],
    *,
    database: Path | None = None,
    fault: str | None = None,
    admin: AdminAccess | None = None,
) -> None:
    """Run the scenario against the gateway at `url`, whose pushes reach `relay`.

    The fake providers and the gateway must already be serving. Fills `run.ledger`. With
    groups in the scenario, `admin` is where they are set up, once every phone has
    registered (so the `group` events reach the phones, asleep or not).
    """
    scenario, ledger = run.scenario, run.ledger
    ctx = FleetContext(url, token, scenario, ledger)
    run.phones = phones = build_fleet(ctx)
    run.groups = build_groups(scenario, phones)
    if run.groups and admin is None:
        raise GatewayError("groups need the gateway's backend API ([admin] api_key)")
    for phone in phones:
        relay.add(phone)
    ledger.ios_idle_phones = sum(p.platform == "ios" and p.cycles for p in phones)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample, run)
        async with trio.open_nursery() as fleet:
            run.enter("registering")
            for phone in phones:
                fleet.start_soon(phone.run)
            for reader in build_readers(ctx, phones):
                fleet.start_soon(reader.run)
            with trio.move_on_after(SETUP_TIMEOUT):
                for phone in phones:
                    await phone.ready.wait()
            if not all(p.ready.is_set() for p in phones):
                ledger.errors["phones that could not register"] += sum(
                    not p.ready.is_set() for p in phones
                )
            if run.groups and admin is not None:
                run.enter("setting up groups")
                await set_up_groups(admin, phones, run.groups)
            run.enter("traffic")
            ledger.traffic_started = now()
            async with trio.open_nursery() as traffic:
                traffic.start_soon(_drops, run)
                if fault == "delete-queued" and database is not None:
                    traffic.start_soon(_delete_one_queued, run, database)
                await _send_traffic(run)
                traffic.cancel_scope.cancel()
            if scenario.final_drain:
                run.enter("final drain")
                ledger.final_drain_started = now()
                ctx.final.set()
                for phone in phones:
                    phone.poke.set()
            else:
                run.enter("settling")
            # Many tasks move the ledger; polling it (bounded by the timeout) is simplest.
            with trio.move_on_after(scenario.final_drain_timeout):
                while not (ledger.settled() and _quiet(phones, scenario)):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            _take_sample(run)  # the state the run ended in, on the timeline
            if admin is not None:
                ledger.gateway = await read_gateway_metrics(admin)
            run.enter("disconnecting")
            ctx.stop.set()
            for phone in phones:
                phone.poke.set()
        run.enter("checking queues")
        await check_queues(ctx, phones)
        run.enter("done")
        nursery.cancel_scope.cancel()


async def read_gateway_metrics(admin: AdminAccess) -> dict[str, float]:
    """The gateway's wake-up counters (`GATEWAY_METRICS`) from its /metrics; empty when
    it does not answer."""
    try:
        async with httpx.AsyncClient(base_url=admin.url, timeout=10) as http:
            text = (await http.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    found = {name: 0.0 for name in GATEWAY_METRICS.values()}
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        name = GATEWAY_METRICS.get(metric)
        if name is not None:
            found[name] = float(value)
    return found


def _quiet(phones: Sequence[Phone], scenario: Scenario) -> bool:
    """With the final drain, every phone is connected; without it, none is mid-wake."""
    if scenario.final_drain:
        return all(p.online for p in phones)
    return not any(p.waking for p in phones)


async def _send_traffic(run: Run) -> None:
    start = trio.current_time()
    phones = run.phones
    for send in traffic_schedule(run.scenario, phones, run.groups):
        await trio.sleep_until(start + send.at)
        sender = phones[send.sender]
        if send.group is not None:
            members = [phones[i] for i in run.groups[send.group] if i != send.sender]
            await sender.send_group_message(
                group_name(send.group), members, urgent=send.urgent,
                read_share=run.scenario.read_share,
            )  # fmt: skip
        else:
            await sender.send_message(
                phones[send.recipient], urgent=send.urgent, read_planned=send.read
            )


async def _drops(run: Run) -> None:
    """Abrupt network drops: each connected phone loses its network at the scenario's rate.

    Thinning: events arrive at the rate for the whole fleet, and hit a random phone; one
    that is not connected at that moment is spared.
    """
    per_phone = run.scenario.drops_per_minute / 60.0
    if per_phone <= 0:
        return
    rng = run.scenario.rng("drops")
    while True:
        await trio.sleep(rng.expovariate(per_phone * len(run.phones)))
        phone = rng.choice(run.phones)
        if phone.online:
            await phone.drop()


async def _delete_one_queued(run: Run, database: Path) -> None:
    """A fault for testing the checker: delete one stored message behind the gateway's
    back, for a phone that is idle, halfway through the traffic."""
    await trio.sleep(run.scenario.duration / 2)
    while True:
        idle = [p.user for p in run.phones if not p.online and not p.waking]
        deleted = await trio.to_thread.run_sync(_delete_row, database, idle)
        if deleted is not None:
            run.faults.append(f"deleted one queued message (sid {deleted}) from the store")
            return
        await trio.sleep(0.1)


def _delete_row(database: Path, users: list[str]) -> int | None:
    if not users:
        return None
    with sqlite3.connect(database, timeout=5) as db:
        marks = ",".join("?" * len(users))
        row = db.execute(
            "SELECT q.sid FROM queue q JOIN devices d ON q.did = d.did "
            f"WHERE q.kind = 0 AND d.user IN ({marks}) LIMIT 1",
            users,
        ).fetchone()
        if row is None:
            return None
        db.execute("DELETE FROM queue WHERE sid = ?", (row[0],))
        return int(row[0])


def _take_sample(run: Run) -> None:
    ledger, phones = run.ledger, run.phones
    ledger.samples.append(
        Sample(
            now(),
            connected=sum(p.online for p in phones),
            idle=sum(p.cycles and not p.online for p in phones),
            in_flight=ledger.in_flight,
            pushes=len(ledger.pushes),
            lost_pushes=sum(p.lost for p in ledger.pushes),
        )
    )


async def _sample(run: Run) -> None:
    while True:
        _take_sample(run)
        await trio.sleep(SAMPLE_INTERVAL)


async def check_queues(ctx: FleetContext, phones: Sequence[Phone]) -> None:
    """Connect every device once more and read what is still queued for it, without
    acking. Items found are recorded in `ledger.undrained` (and, for messages, as still
    queued rather than lost)."""
    limiter = trio.CapacityLimiter(CHECK_CONCURRENCY)

    async def check(phone: Phone) -> None:
        async with limiter:
            found = await _read_queue(ctx, phone.user)
        if found is None:
            ctx.ledger.errors["end-of-run check could not connect"] += 1
            return
        for msg_id in found:
            ctx.ledger.note_found_at_end(phone.user, msg_id)
        if found:
            ctx.ledger.undrained[phone.user] = len(found)

    async with trio.open_nursery() as nursery:
        for phone in phones:
            nursery.start_soon(check, phone)


async def _read_queue(ctx: FleetContext, user: str) -> list[str] | None:
    """Hello, then every queued item's id until `drained`; None if that failed."""
    found: list[str] = []
    try:
        with trio.fail_after(10):
            client = await LeanClient.open(ctx.url)
            try:
                hello = {"t": "hello", "v": 1, "token": ctx.token(user, "phone"), "active": False}
                await client.send_message(cbor2.dumps(hello))
                for _ in range(1_000_000):
                    item = cbor2.loads(await client.get_message())
                    frames = item if isinstance(item, list) else [item]
                    for frame in frames:
                        if frame.get("t") in ("msg", "receipt", "group"):
                            found.append(frame["id"] if frame["t"] == "msg" else frame["t"])
                    if any(f.get("t") == "drained" for f in frames):
                        return found
            finally:
                await client.aclose()
    except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError):
        return None
    return None

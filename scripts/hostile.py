"""Hostile clients against a real `gateway serve`, and what well-behaved devices feel.

Hostile behaviours, run together:

- slowloris: HTTP upgrade requests trickled one byte at a time, never finished;
- idle upgrades: WebSocket connections that never send `hello` (a connection flood);
- a reader that never reads, while another device sends it large messages;
- ping floods (the flooder reads its pongs);
- oversized messages, again and again.

Meanwhile well-behaved sender/receiver pairs measure online delivery latency (from
`send` to the `msg` arriving at the other device). The same pairs first run on a quiet
gateway for the same duration: the baseline of the same invocation.

    python -m scripts.hostile --seconds 20 --pairs 8 --flood 2000 [--store redis]

Only 127.0.0.1 is contacted. Prints medians, p99 and ratios, and the hostile outcomes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from gateway.auth import mint_token
from gateway.client import connect
from gateway.settings import Settings
from scripts.kit.gateway_process import STORES, GatewayProcess, open_store
from scripts.kit.lean_client import PING, PONG, LeanClient
from scripts.kit.limits import raise_fd_limit
from scripts.kit.loopback import HOST

AUTH = Settings().auth
BIG_BODY = 60_000


@dataclass
class HostileReport:
    """What the hostile clients got, and what the well-behaved ones measured."""

    latencies: list[float] = field(default_factory=list)  # seconds, well-behaved deliveries
    well_behaved_errors: list[str] = field(default_factory=list)
    closes: dict[str, collections.Counter[int | str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    slowloris_closed_after: list[float] = field(default_factory=list)
    never_reader_kept: int | None = None  # items still queued for it afterwards
    never_reader_sent: int = 0
    pings_answered: int = 0
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def latency_line(self, name: str) -> str:
        """Median and p99 of the delivery latencies, in milliseconds."""
        if not self.latencies:
            return f"{name}: no deliveries"
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"{name}: {len(ordered)} deliveries, median {statistics.median(ordered) * 1000:.2f}"
            f" ms, p99 {p99 * 1000:.2f} ms"
        )


# -- well-behaved devices ------------------------------------------------------------------


async def well_behaved(
    url: str, pairs: int, seconds: float, interval: float, report: HostileReport, tag: str
) -> None:
    """`pairs` senders each send a message every `interval` seconds to their receiver."""

    async def pair(i: int) -> None:
        sent_at: dict[str, float] = {}
        sender_token = mint_token(AUTH, f"{tag}-s{i}", "phone")
        receiver_token = mint_token(AUTH, f"{tag}-r{i}", "phone")
        async with (
            connect(url, receiver_token, reconnect=False) as receiver,
            connect(url, sender_token, reconnect=False) as sender,
            trio.open_nursery() as nursery,
        ):

            async def receive() -> None:
                async for delivery in receiver.deliveries():
                    arrived = trio.current_time()
                    report.latencies.append(arrived - sent_at.pop(delivery.frame["id"]))

            nursery.start_soon(receive)
            deadline = trio.current_time() + seconds
            n = 0
            while trio.current_time() < deadline:
                msg_id = f"{i}-{n}"
                sent_at[msg_id] = trio.current_time()
                await sender.send(f"{tag}-r{i}", b"hello", id=msg_id)
                n += 1
                await trio.sleep(interval)
            with trio.move_on_after(10):
                while sent_at:  # noqa: ASYNC110 - polling, bounded above
                    await trio.sleep(0.01)
            if sent_at:
                report.well_behaved_errors.append(f"pair {i}: {len(sent_at)} not delivered")
            for client in (sender, receiver):
                if client.errors or client.connections != 1:
                    report.well_behaved_errors.append(
                        f"pair {i}: errors {client.errors}, connections {client.connections}"
                    )
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i in range(pairs):
            nursery.start_soon(pair, i)


# -- hostile clients -----------------------------------------------------------------------


async def _close_code(client: LeanClient, limit: float) -> int | str:
    """Read until the gateway closes; its close code, or why none came."""
    try:
        with trio.fail_after(limit):
            while True:
                await client.get_message()
    except ConnectionClosed as exc:
        return exc.reason.code if exc.reason else "eof"
    except trio.TooSlowError:
        return "still open"


async def slowloris(port: int, count: int, trickle: float, report: HostileReport) -> None:
    """Upgrade requests sent one byte every `trickle` seconds, never finished."""
    request = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nX-Padding: " + (
        b"a" * 10_000
    )

    async def one() -> None:
        started = trio.current_time()
        stream = await trio.open_tcp_stream(HOST, port)
        try:
            for i in range(len(request)):
                await stream.send_all(request[i : i + 1])
                with trio.move_on_after(trickle):
                    if not await stream.receive_some(4096):
                        break  # the gateway hung up
            else:
                report.closes["slowloris"]["never closed"] += 1
                return
            report.closes["slowloris"]["closed"] += 1
        except (trio.BrokenResourceError, OSError):
            report.closes["slowloris"]["reset"] += 1
        finally:
            report.slowloris_closed_after.append(trio.current_time() - started)
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def idle_upgrades(url: str, count: int, limit: float, report: HostileReport) -> None:
    """WebSocket connections that never say `hello` (also a connection flood)."""

    async def one() -> None:
        try:
            client = await LeanClient.open(url, subprotocol=None)
        except (HandshakeError, ConnectionClosed, OSError) as exc:
            report.closes["no hello"][f"refused: {exc}"[:60]] += 1
            return
        report.closes["no hello"][await _close_code(client, limit)] += 1
        await trio.aclose_forcefully(client.stream)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def never_reader(
    gateway: GatewayProcess,
    messages: int,
    limit: float,
    report: HostileReport,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A device that stops reading while someone sends it large messages; afterwards,
    how many items are still queued for it. Started once its `hello` is on its way: the
    floods share this process, and reading the upgrade's answer behind a thousand others
    could take longer than `hello_timeout`."""
    client = await LeanClient.open(gateway.url, rcvbuf=4096, subprotocol=None)
    hello = {"t": "hello", "v": 1, "token": mint_token(AUTH, "stuck", "phone")}
    await client.send_message(cbor2.dumps(hello))
    task_status.started()
    async with connect(gateway.url, mint_token(AUTH, "feeder", "phone")) as feeder:
        for n in range(messages):
            await feeder.send("stuck", b"x" * BIG_BODY, id=f"big-{n}")
            report.never_reader_sent += 1
    # Reading now would unblock the gateway: first wait until it gives up on this device
    # (its log says why), then read what it sent and its close frame.
    reason = "not closed"
    with trio.move_on_after(limit):
        while reason == "not closed":
            await trio.sleep(0.1)
            for line in gateway.log_text().splitlines():
                if "stuck/phone>:" in line and ("send blocked" in line or "buffer full" in line):
                    reason = "1013: send blocked" if "blocked" in line else "1013: buffer full"
    report.closes["never reads"][f"gateway: {reason}"] += 1
    # The close frame sits behind everything the peer never read; it usually finds the
    # socket closed first (1006 at the peer).
    code = await _close_code(client, limit)
    report.closes["never reads"][f"peer saw: {code}"] += 1
    await trio.aclose_forcefully(client.stream)
    async with connect(gateway.url, mint_token(AUTH, "stuck", "phone"), auto_ack=False) as stuck:
        assert stuck.welcome is not None
        report.never_reader_kept = stuck.welcome["queued"]


async def ping_flood(url: str, seconds: float, report: HostileReport) -> None:
    """Pings as fast as the socket takes them, for `seconds`; pongs read and counted."""
    client = await LeanClient.open(url)
    hello = {"t": "hello", "v": 1, "token": mint_token(AUTH, "pinger", "phone")}
    await client.send_message(cbor2.dumps(hello))
    deadline = trio.current_time() + seconds
    try:
        async with trio.open_nursery() as nursery:

            async def pongs() -> None:
                while True:
                    _, opcode, _ = await client.next_frame()
                    if opcode == PONG:
                        report.pings_answered += 1

            nursery.start_soon(pongs)
            while trio.current_time() < deadline:
                for _ in range(100):
                    await client.send_message(b"p" * 125, PING)
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        report.closes["ping flood"]["open after the flood"] += 1
    except ConnectionClosed as exc:
        report.closes["ping flood"][exc.reason.code if exc.reason else "eof"] += 1
    finally:
        await client.aclose()


async def oversized(url: str, count: int, report: HostileReport) -> None:
    """Messages past `max_message_size`, each on a fresh authenticated connection."""
    for n in range(count):
        client = await LeanClient.open(url)
        hello = {"t": "hello", "v": 1, "token": mint_token(AUTH, "bloater", "phone")}
        await client.send_message(cbor2.dumps(hello))
        big = {"t": "send", "id": f"o{n}", "to": "nobody", "body": b"\0" * 200_000}
        with contextlib.suppress(ConnectionClosed):
            await client.send_message(cbor2.dumps(big))
        report.closes["oversized"][await _close_code(client, 10)] += 1
        await trio.aclose_forcefully(client.stream)


async def sample(gateway: GatewayProcess, report: HostileReport, every: float) -> None:
    """Resident memory and open files of the gateway, every `every` seconds."""
    while True:
        usage = gateway.usage()
        report.rss_kib.append(usage.rss_kib)
        report.fds.append(usage.fds)
        await trio.sleep(every)


@dataclass
class HostileSizes:
    """How much of each behaviour a run uses."""

    seconds: float = 20.0
    pairs: int = 8
    interval: float = 0.02
    slowloris: int = 200
    trickle: float = 0.5
    flood: int = 1000
    stuck_messages: int = 300
    oversized: int = 50


async def run_hostile(gateway: GatewayProcess, sizes: HostileSizes) -> HostileReport:
    """Everything hostile at once while the well-behaved pairs measure; returns the report."""
    report = HostileReport()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample, gateway, report, 0.25)
        async with trio.open_nursery() as hostile:
            await hostile.start(never_reader, gateway, sizes.stuck_messages, 30.0, report)
            hostile.start_soon(slowloris, gateway.port, sizes.slowloris, sizes.trickle, report)
            hostile.start_soon(idle_upgrades, gateway.url, sizes.flood, 60.0, report)
            hostile.start_soon(ping_flood, gateway.url, sizes.seconds, report)
            hostile.start_soon(oversized, gateway.url, sizes.oversized, report)
            await well_behaved(
                gateway.url, sizes.pairs, sizes.seconds, sizes.interval, report, "calm"
            )
        nursery.cancel_scope.cancel()
    return report


async def run_quiet(gateway: GatewayProcess, sizes: HostileSizes) -> HostileReport:
    """The well-behaved pairs alone: the baseline."""
    report = HostileReport()
    await well_behaved(gateway.url, sizes.pairs, sizes.seconds, sizes.interval, report, "quiet")
    return report


GATEWAY_SERVER = "handshake_timeout = 2.0\nhello_timeout = 2.0\nwrite_timeout = 2.0"


async def _main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    sizes = HostileSizes(
        seconds=args.seconds, pairs=args.pairs, interval=args.interval,
        slowloris=args.slowloris, flood=args.flood, stuck_messages=args.stuck_messages,
        oversized=args.oversized,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gateway-hostile-") as tmp:
        async with open_store(args.store, Path(tmp)) as store:
            gateway = GatewayProcess(Path(tmp) / "gateway", server=GATEWAY_SERVER, store=store.toml)
            await gateway.astart()
            try:
                quiet = await run_quiet(gateway, sizes)
                hostile = await run_hostile(gateway, sizes)
                alive = gateway.running
            finally:
                gateway.kill()
    print(f"gateway on {args.store}: {GATEWAY_SERVER.replace(chr(10), ', ')}")
    print(quiet.latency_line("quiet run   "))
    print(hostile.latency_line("hostile run "))
    if quiet.latencies and hostile.latencies:
        ratio = statistics.median(hostile.latencies) / statistics.median(quiet.latencies)
        print(f"median ratio hostile/quiet: {ratio:.2f}")
    for name, counts in hostile.closes.items():
        print(f"{name}: {dict(counts)}")
    if hostile.slowloris_closed_after:
        print(f"slowloris closed after: max {max(hostile.slowloris_closed_after):.1f} s")
    print(f"never-reader: {hostile.never_reader_sent} sent to it, "
          f"{hostile.never_reader_kept} still queued after its close")  # fmt: skip
    print(f"pings answered during the flood: {hostile.pings_answered}")
    if hostile.rss_kib:
        print(f"gateway RSS: start {hostile.rss_kib[0] / 1024:.1f} MiB, peak "
              f"{max(hostile.rss_kib) / 1024:.1f} MiB, end {hostile.rss_kib[-1] / 1024:.1f} MiB;"
              f" open files peak {max(hostile.fds)}")  # fmt: skip
    problems = hostile.well_behaved_errors + quiet.well_behaved_errors
    if not alive:
        problems.append("the gateway died")
    for problem in problems:
        print("FAILED:", problem)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--slowloris", type=int, default=200)
    parser.add_argument("--flood", type=int, default=1000)
    parser.add_argument("--stuck-messages", type=int, default=300)
    parser.add_argument("--oversized", type=int, default=50)
    parser.add_argument("--store", choices=STORES, default="sqlite")
    return trio.run(_main, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())

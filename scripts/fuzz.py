"""Protocol fuzzing over real sockets against a real `gateway serve` process.

Hostile messages (scripts/fuzzcases.py) go to the gateway from authenticated connections,
before `hello`, as text messages, as broken WebSocket framing and as broken HTTP, while two
well-behaved devices keep exchanging messages through the same process. Checked: the
process stays up, it never closes a connection with 1011 (an unexpected exception) nor
logs a traceback, the well-behaved devices see no error and no close, every message they
send arrives, and resident memory stays bounded.

    python -m scripts.fuzz --cases 20000 --seed 1 [--store redis]

Prints a summary and exits non-zero if a check failed. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import collections
import random
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
from scripts.fuzzcases import draw
from scripts.kit.gateway_process import STORES, GatewayProcess, open_store
from scripts.kit.lean_client import LeanClient
from scripts.kit.loopback import HOST

# Close codes a hostile message may legitimately earn (never 1011).
EXPECTED_CLOSES = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 4001})
RAW_SHARE = 0.02  # cases that break the WebSocket framing or the HTTP upgrade itself
PRE_HELLO_EVERY = 10  # every tenth connection sends its hostile message before `hello`
TEXT_SHARE = 0.01
MAX_MESSAGE = 65536
RAW_WAIT = 0.5
OBSERVER_PAUSE = 0.01  # seconds between the well-behaved devices' messages


@dataclass
class FuzzReport:
    """What a fuzzing run did and saw."""

    cases: int = 0
    by_generator: collections.Counter[str] = field(default_factory=collections.Counter)
    closes: collections.Counter[int] = field(default_factory=collections.Counter)
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    connections: int = 0
    observer_messages: int = 0
    observer_problems: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    tracebacks: int = 0
    alive: bool = False

    @property
    def unexpected_closes(self) -> dict[int, int]:
        """Closes outside EXPECTED_CLOSES (1011 would mean an unhandled exception)."""
        return {c: n for c, n in self.closes.items() if c not in EXPECTED_CLOSES}

    @property
    def rss_growth_kib(self) -> int:
        """Resident memory at the end minus after warm-up."""
        return self.rss_kib[-1] - self.rss_kib[0] if self.rss_kib else 0

    def failures(self, rss_limit_kib: int) -> list[str]:
        """Every check that failed, as sentences."""
        problems = list(self.observer_problems)
        if not self.alive:
            problems.append("the gateway process died")
        if self.unexpected_closes:
            problems.append(f"unexpected close codes: {self.unexpected_closes}")
        if self.tracebacks:
            problems.append(f"{self.tracebacks} tracebacks in the gateway log")
        if self.rss_growth_kib > rss_limit_kib:
            problems.append(f"RSS grew by {self.rss_growth_kib} KiB (limit {rss_limit_kib})")
        return problems

    def summary(self) -> str:
        """A human-readable report."""
        lines = [
            f"cases: {self.cases} over {self.connections} connections",
            "by generator: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_generator.items())),
            "closes: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.closes.items())),
            "error frames: " + ", ".join(f"{k} {v}" for k, v in sorted(self.error_codes.items())),
            f"observer messages delivered: {self.observer_messages}",
        ]
        if self.rss_kib:
            n = len(self.rss_kib) - 1
            quarters = ", ".join(f"{self.rss_kib[n * q // 4] / 1024:.1f}" for q in range(5))
            lines.append(
                f"gateway RSS (MiB) at 0, 1/4, 1/2, 3/4 and the end of the run: {quarters};"
                f" peak {max(self.rss_kib) / 1024:.1f}"
            )
        return "\n".join(lines)


class _FuzzConnection:
    """One authenticated (or not) connection that reads in the background."""

    def __init__(self, client: LeanClient, report: FuzzReport) -> None:
        self.client = client
        self.report = report
        self.closed = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                message = await self.client.get_message()
                item = cbor2.loads(message)
                for frame in item if isinstance(item, list) else [item]:
                    if isinstance(frame, dict) and frame.get("t") == "error":
                        self.report.error_codes[str(frame.get("code"))] += 1
        except ConnectionClosed as exc:
            self.report.closes[exc.reason.code if exc.reason else 1006] += 1
        finally:
            self.closed.set()


async def _open(url: str, token: str | None, report: FuzzReport) -> tuple[LeanClient, bool]:
    """A raw connection; authenticated (hello answered with drained) when `token` is set."""
    client = await LeanClient.open(url)
    report.connections += 1
    if token is None:
        return client, False
    await client.send_message(cbor2.dumps({"t": "hello", "v": 1, "token": token}))
    while True:
        item = cbor2.loads(await client.get_message())
        frames = item if isinstance(item, list) else [item]
        if any(f.get("t") == "drained" for f in frames):
            return client, True


async def _fuzz_connections(
    url: str, token: str, rng: random.Random, cases: int, report: FuzzReport
) -> None:
    """Send `cases` hostile messages, reconnecting whenever the gateway closes."""
    done = 0
    while done < cases:
        pre_hello = report.connections % PRE_HELLO_EVERY == PRE_HELLO_EVERY - 1
        client, _ = await _open(url, None if pre_hello else token, report)
        conn = _FuzzConnection(client, report)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.read)
            closing = False  # the last message earns a close; wait to see its code
            try:
                while done < cases and not closing and not conn.closed.is_set():
                    name, message = draw(rng)
                    opcode = 0x2
                    if rng.random() < TEXT_SHARE:
                        opcode, name = 0x1, "text_message"
                        message = message.decode("utf-8", "replace").encode()
                    await client.send_message(message, opcode)
                    report.by_generator[name] += 1
                    done += 1
                    closing = pre_hello or len(message) > MAX_MESSAGE or opcode == 0x1
            except ConnectionClosed:
                closing = True
            if closing:
                with trio.move_on_after(10):
                    await conn.closed.wait()
            nursery.cancel_scope.cancel()
        await client.aclose()
    report.cases += done


async def _raw_garbage(port: int, rng: random.Random, count: int, report: FuzzReport) -> None:
    """Broken HTTP upgrades and broken WebSocket framing on bare TCP, all at once."""
    async with trio.open_nursery() as nursery:
        for i in range(count):
            junk = rng.randbytes(rng.choice((1, 40, 2000)))
            if i % 2 == 0:
                nursery.start_soon(_raw_http, port, junk + b"\r\n\r\n", report)
            else:
                # Unmasked, reserved opcodes, RSV bits, lengths past the data: all invalid.
                head = bytes([rng.choice((0x83, 0x8B, 0xC2, 0x02, 0x89)), rng.randrange(256)])
                nursery.start_soon(_raw_websocket, port, head + junk[:64], report)


async def _raw_http(port: int, junk: bytes, report: FuzzReport) -> None:
    try:
        stream = await trio.open_tcp_stream(HOST, port)
        await stream.send_all(junk)
    except OSError:
        return
    report.by_generator["raw_http"] += 1
    await _linger(stream, report)


async def _raw_websocket(port: int, junk: bytes, report: FuzzReport) -> None:
    try:
        stream = (await LeanClient.open(f"ws://{HOST}:{port}/ws")).stream
        await stream.send_all(junk)
    except (trio.BrokenResourceError, HandshakeError, ConnectionClosed, OSError):
        return
    report.by_generator["raw_websocket"] += 1
    await _linger(stream, report)


async def _linger(stream: trio.SocketStream, report: FuzzReport) -> None:
    """Read what the gateway answers for a moment, then hang up."""
    report.cases += 1
    report.connections += 1
    try:
        # A frame that declares more bytes than it sends keeps the gateway waiting
        # until `hello_timeout`; the fuzzer does not wait that long.
        with trio.move_on_after(RAW_WAIT):
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _observe(url: str, auth: Settings, stop: trio.Event, report: FuzzReport) -> None:
    """Two devices exchanging messages while the fuzzing runs; any error is a failure."""
    async with (
        connect(url, mint_token(auth.auth, "obs-bob", "phone")) as bob,
        connect(url, mint_token(auth.auth, "obs-alice", "phone")) as alice,
    ):
        i = 0
        while not stop.is_set():
            body = f"observer {i}".encode()
            await alice.send("obs-bob", body)
            with trio.fail_after(30):
                delivery = await bob.next_delivery()
            if delivery.frame.get("body") != body:
                report.observer_problems.append(f"observer got {delivery.frame!r}")
                return
            i += 1
            await trio.sleep(OBSERVER_PAUSE)
        report.observer_messages = i
        for client in (alice, bob):
            if client.errors:
                report.observer_problems.append(f"observer error frames: {client.errors}")
            if client.connections != 1:
                report.observer_problems.append("an observer was disconnected")


async def run_fuzz(gateway: GatewayProcess, *, cases: int, seed: int) -> FuzzReport:
    """Fuzz a running gateway with `cases` hostile messages; return what happened."""
    report = FuzzReport()
    rng = random.Random(seed)
    settings = Settings()
    token = mint_token(settings.auth, "fuzzer", "dev")
    stop = trio.Event()
    report.rss_kib.append(gateway.usage().rss_kib)

    async def sample() -> None:
        while True:
            await trio.sleep(0.5)
            report.rss_kib.append(gateway.usage().rss_kib)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_observe, gateway.url, settings, stop, report)
        async with trio.open_nursery() as sampler:
            sampler.start_soon(sample)
            raw = max(2, int(cases * RAW_SHARE))
            await _raw_garbage(gateway.port, rng, raw, report)
            await _fuzz_connections(gateway.url, token, rng, cases - raw, report)
            stop.set()  # the observer finishes its round, checks itself and returns
            sampler.cancel_scope.cancel()
    report.rss_kib.append(gateway.usage().rss_kib)
    report.alive = gateway.running
    report.tracebacks = gateway.log_text().count("Traceback")
    return report


GATEWAY_SERVER = "max_bad_frames = 1000000\nhandshake_timeout = 2.0"


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-fuzz-") as tmp:
        async with open_store(args.store, Path(tmp)) as store:
            gateway = GatewayProcess(Path(tmp) / "gateway", server=GATEWAY_SERVER, store=store.toml)
            await gateway.astart()
            try:
                report = await run_fuzz(gateway, cases=args.cases, seed=args.seed)
            finally:
                await gateway.astop(grace=30)
    print(f"{args.store}: {report.summary()}")
    failures = report.failures(args.rss_limit_mib * 1024)
    for problem in failures:
        print("FAILED:", problem)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-limit-mib", type=int, default=64)
    parser.add_argument("--store", choices=STORES, default="sqlite")
    return trio.run(_main, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())

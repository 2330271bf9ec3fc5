"""The peer benchmark's load generator, run in its own process by scripts/bench_peers.py.

    python -m scripts.peers.loadgen --system v1|mqtt --port P --server-pid PID [workload]

It prints one JSON object: the three phases' figures, and the CPU that this process and
the server process used in each phase (so the report can show that the generator was
not the limit). Two drivers, one workload:

- ``v1``: protocol v1 over the lean WebSocket client (`scripts.kit.lean_client`),
  for the gateway and for the `websockets` relay, which speaks the same subset;
- ``mqtt``: paho-mqtt clients with persistent sessions (``clean_session=False``) and
  QoS 1, driven from one selector loop (no thread per client).

The workload:

1. **online**: `pairs` senders each keep up to `window` messages without a durable ack
   (`sent` / PUBACK) outstanding, to their own receiver, for `seconds`; receivers ack each
   delivery and return a delivered receipt to the sender, which acks it. Measured:
   messages delivered per second.
2. **latency**: the same devices, messages paced at `rate` per second in all; measured:
   p50/p99 from send to delivery (a message not delivered within 2 s after the window
   counts as infinitely late).
3. **backlog**: `offline` devices with a persistent session or a known device get
   `per_device` messages each while disconnected; then all reconnect at once; measured:
   from the first connect to the last device holding all its messages (acked as they
   arrive).

Only 127.0.0.1 is used; every loop is bounded in count or time.
"""

from __future__ import annotations

import argparse
import json
import math
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from scripts.kit import procfs
from scripts.kit.lean_client import LeanClient

STAMP = struct.Struct("!d")
WARMUP = 1.0
STRAGGLE = 2.0
SETUP_TIMEOUT = 60.0
PHASE_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Workload:
    """The three phases' sizes (the same for every system)."""

    pairs: int = 50
    window: int = 16
    seconds: float = 5.0
    rate: float = 300.0
    offline: int = 20
    per_device: int = 500
    body: int = 200


class Cpu:
    """CPU seconds of this process and of the server process, per phase."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.phases: dict[str, dict[str, float]] = {}
        self._start: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def _server(self) -> float:
        try:
            return procfs.cpu_seconds(self.server_pid)
        except OSError:
            return math.nan

    def begin(self) -> None:
        self._start = (
            time.perf_counter(),
            time.process_time(),
            self._server(),
            procfs.machine_busy_seconds(),
        )

    def end(self, phase: str) -> None:
        wall = time.perf_counter() - self._start[0]
        self.phases[phase] = {
            "seconds": round(wall, 3),
            "generator_cores": round((time.process_time() - self._start[1]) / wall, 3),
            "server_cores": round((self._server() - self._start[2]) / wall, 3),
            "machine_cores": round((procfs.machine_busy_seconds() - self._start[3]) / wall, 3),
        }


class Barrier:
    """Phases start together in every generator process: each one drops a file named
    after the phase and waits until all have (polled: processes share no event)."""

    def __init__(self, directory: Path | None, index: int, procs: int) -> None:
        self.directory = directory
        self.index = index
        self.procs = procs

    def arrive(self, phase: str) -> None:
        if self.directory is not None:
            (self.directory / f"{phase}.{self.index}").touch()

    def passed(self, phase: str) -> bool:
        if self.directory is None:
            return True
        return len(list(self.directory.glob(f"{phase}.*"))) >= self.procs

    async def wait(self, phase: str) -> None:
        """Arrive, then wait for the others (Trio)."""
        self.arrive(phase)
        with trio.fail_after(SETUP_TIMEOUT):
            while not self.passed(phase):  # noqa: ASYNC110 - other processes
                await trio.sleep(0.001)


def stamp(body: int) -> bytes:
    """A message body: the send time (this process's clock), padded."""
    return STAMP.pack(time.perf_counter()) + b"\0" * max(0, body - STAMP.size)


def percentiles(latencies: list[float], expected: int) -> dict[str, float | int]:
    """p50/p99 in ms; messages that never arrived count as infinitely late."""
    values = sorted(latencies) + [math.inf] * max(0, expected - len(latencies))
    if not values:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "late": 0}

    def rank(q: float) -> float:
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] * 1000

    return {
        "n": len(latencies),
        "p50_ms": rank(0.5),
        "p99_ms": rank(0.99),
        "late": expected - len(latencies),
    }


# -- protocol v1: the gateway and the websockets relay ----------------------------------------


class V1Device:
    """One device speaking protocol v1 over the lean client."""

    def __init__(self, gen: V1Generator, name: str) -> None:
        self.gen = gen
        self.name = name
        self.client: LeanClient | None = None
        self.welcomed = trio.Event()
        self.drained = trio.Event()
        self.ended = trio.Event()
        self.received = 0
        self.window = trio.Semaphore(gen.workload.window)
        self.unanswered = 0
        self.answered = trio.Event()
        self.count = 0

    async def connect(self, nursery: trio.Nursery) -> None:
        self.welcomed, self.drained, self.ended = trio.Event(), trio.Event(), trio.Event()
        self.client = await LeanClient.open(self.gen.url)
        nursery.start_soon(self._read, self.client)
        token = self.gen.token(self.name)
        await self.client.send_message(cbor2.dumps({"t": "hello", "v": 1, "token": token}))
        await self.welcomed.wait()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.send_message(struct.pack("!H", 1000), 0x8)
            await self.ended.wait()

    async def send(self, to: str) -> None:
        assert self.client is not None
        self.count += 1
        self.unanswered += 1
        frame = {
            "t": "send",
            "id": f"{self.name}.{self.count}",
            "to": to,
            "body": stamp(self.gen.workload.body),
        }
        await self.client.send_message(cbor2.dumps(frame))

    async def _read(self, client: LeanClient) -> None:
        gen = self.gen
        try:
            while True:
                item = cbor2.loads(await client.get_message())
                acks = []
                for frame in item if isinstance(item, list) else [item]:
                    t = frame["t"]
                    if t == "msg":
                        acks.append(frame["sid"])
                        self.received += 1
                        gen.delivered(STAMP.unpack_from(frame["body"])[0], self)
                    elif t == "receipt":
                        acks.append(frame["sid"])
                        gen.receipts += len(frame["ids"])  # coalesced: one frame, many ids
                    elif t == "sent":
                        self.unanswered -= 1
                        self.window.release()
                        if self.unanswered == 0:
                            self.answered.set()
                    elif t == "welcome":
                        self.welcomed.set()
                    elif t == "drained":
                        self.drained.set()
                    elif t == "error":
                        gen.errors.append(str(frame.get("code")))
                if acks:
                    await client.send_message(cbor2.dumps({"t": "ack", "sids": acks}))
        except ConnectionClosed:
            pass
        finally:
            self.welcomed.set()
            self.drained.set()
            self.ended.set()


class V1Generator:
    """The workload over protocol v1."""

    def __init__(
        self, url: str, token: Callable[[str], str], workload: Workload, cpu: Cpu,
        barrier: Barrier, prefix: str,
    ) -> None:  # fmt: skip
        self.barrier = barrier
        self.prefix = prefix
        self.url = url
        self.token = token
        self.workload = workload
        self.cpu = cpu
        self.latencies: list[float] | None = None
        self.counting = False
        self.count = 0
        self.receipts = 0
        self.errors: list[str] = []
        self.on_delivery: Callable[[V1Device], None] | None = None

    def delivered(self, sent_at: float, device: V1Device) -> None:
        if self.counting:
            self.count += 1
        if self.latencies is not None:
            self.latencies.append(time.perf_counter() - sent_at)
        if self.on_delivery is not None:
            self.on_delivery(device)

    async def run(self) -> dict[str, Any]:
        w = self.workload
        p = self.prefix
        senders = [V1Device(self, f"{p}s{i}") for i in range(w.pairs)]
        receivers = [V1Device(self, f"{p}r{i}") for i in range(w.pairs)]
        offline = [V1Device(self, f"{p}o{i}") for i in range(w.offline)]
        out: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(50)

            async def connect(device: V1Device) -> None:
                async with limiter:
                    await device.connect(nursery)

            with trio.fail_after(SETUP_TIMEOUT):
                async with trio.open_nursery() as setup:
                    for device in senders + receivers + offline:
                        setup.start_soon(connect, device)
                for device in offline:  # known to the server, then gone
                    await device.close()

            # 1. online throughput
            async def pump(sender: V1Device, receiver: V1Device) -> None:
                while True:
                    await sender.window.acquire()
                    # Cancelled halfway, a frame would be cut short on the wire.
                    with trio.CancelScope(shield=True):
                        await sender.send(receiver.name)

            await self.barrier.wait("online")
            async with trio.open_nursery() as pumps:
                for s, r in zip(senders, receivers, strict=True):
                    pumps.start_soon(pump, s, r)
                await trio.sleep(WARMUP)
                self.count, self.counting = 0, True
                self.cpu.begin()
                await trio.sleep(w.seconds)
                self.counting = False
                self.cpu.end("online")
                out["online"] = {"delivered": self.count, "seconds": w.seconds}
                pumps.cancel_scope.cancel()
            await self._settle(senders)

            # 2. latency at a fixed rate
            await self.barrier.wait("latency")
            self.latencies = []
            expected = 0
            self.cpu.begin()
            start = trio.current_time()
            i = 0
            while (at := i / w.rate) < w.seconds:
                await trio.sleep_until(start + at)
                await senders[i % w.pairs].send(receivers[i % w.pairs].name)
                i += 1
            expected = i
            self.cpu.end("latency")
            with trio.move_on_after(STRAGGLE):
                await self._settle(senders)
            out["latency"] = {
                "rate": w.rate,
                "expected": expected,
                "latencies": [round(v, 6) for v in self.latencies],
            }
            self.latencies = None

            # 3. backlog drain
            await self.barrier.wait("fill")
            self.cpu.begin()
            with trio.fail_after(PHASE_TIMEOUT):
                async with trio.open_nursery() as fill:

                    async def fill_from(k: int) -> None:
                        sender = senders[k % w.pairs]
                        for _ in range(w.per_device):
                            await sender.window.acquire()
                            await sender.send(offline[k].name)

                    for k in range(w.offline):
                        fill.start_soon(fill_from, k)
                await self._settle(senders)
            self.cpu.end("backlog fill")
            done = trio.Event()
            remaining = {d.name for d in offline}

            def on_delivery(device: V1Device) -> None:
                if device.name in remaining and device.received >= w.per_device:
                    remaining.discard(device.name)
                    if not remaining:
                        done.set()

            self.on_delivery = on_delivery
            await self.barrier.wait("drain")
            self.cpu.begin()
            started = time.monotonic()
            with trio.fail_after(PHASE_TIMEOUT):
                async with trio.open_nursery() as drain:
                    for device in offline:
                        drain.start_soon(device.connect, nursery)
                await done.wait()
            self.cpu.end("backlog drain")
            out["backlog"] = {
                "messages": w.offline * w.per_device,
                "start": started,
                "end": time.monotonic(),
            }
            await self._settle(senders)
            received = sum(r.received for r in receivers + offline)
            with trio.move_on_after(STRAGGLE):
                while self.receipts < received:  # noqa: ASYNC110 - many readers move it
                    await trio.sleep(0.01)
            out["totals"] = {
                "sent": sum(s.count for s in senders),
                "received": sum(r.received for r in receivers + offline),
                "receipts": self.receipts,
            }
            out["errors"] = self.errors[:20]
            nursery.cancel_scope.cancel()
        return out

    async def _settle(self, senders: Sequence[V1Device]) -> None:
        """Wait until every send so far is answered."""
        with trio.fail_after(PHASE_TIMEOUT):
            for sender in senders:
                while sender.unanswered > 0:
                    sender.answered = trio.Event()
                    if sender.unanswered > 0:
                        await sender.answered.wait()


async def run_v1(args: argparse.Namespace, workload: Workload, cpu: Cpu) -> dict[str, Any]:
    """The v1 driver against the gateway (tokens from --secret) or the relay."""
    import jwt as pyjwt

    def token(name: str) -> str:
        claims = {"sub": name, "dev": "d", "exp": int(time.time()) + 3600}
        return pyjwt.encode(claims, args.secret, algorithm="HS256")

    url = f"ws://127.0.0.1:{args.port}/ws"
    try:
        barrier = Barrier(args.barrier, args.index, args.procs)
        return await V1Generator(url, token, workload, cpu, barrier, f"g{args.index}").run()
    except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- MQTT: Mosquitto ---------------------------------------------------------------------------


@dataclass
class MqttState:
    """What the MQTT callbacks update."""

    counting: bool = False
    count: int = 0
    latencies: list[float] | None = None
    receipts: int = 0
    published: int = 0
    unacked: dict[str, int] = field(default_factory=dict)  # publishes without PUBACK
    received: dict[str, int] = field(default_factory=dict)


def run_mqtt(args: argparse.Namespace, w: Workload, cpu: Cpu) -> dict[str, Any]:
    """The MQTT driver: paho clients on one selector loop."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state = MqttState()
    clients: dict[str, mqtt.Client] = {}
    sel = selectors.DefaultSelector()
    backlogged: set[mqtt.Client] = set()

    def make(name: str) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=name,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(max(w.window, 1000))
        client.max_queued_messages_set(0)
        client.user_data_set(name)
        client.on_message = on_message
        client.on_publish = on_publish
        return client

    def on_message(client: mqtt.Client, name: str, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic.startswith("m/"):
            sent_at = STAMP.unpack_from(message.payload)[0]
            state.received[name] = state.received.get(name, 0) + 1
            if state.counting:
                state.count += 1
            if state.latencies is not None:
                state.latencies.append(time.perf_counter() - sent_at)
            sender = message.payload[STAMP.size : STAMP.size + 16].rstrip(b"\0").decode()
            client.publish(f"r/{sender}", message.payload[: STAMP.size], qos=1)
        else:
            state.receipts += 1

    def on_publish(client: mqtt.Client, name: str, mid: int, rc: Any, props: Any) -> None:
        state.unacked[name] = state.unacked.get(name, 0) - 1

    def open_client(name: str) -> mqtt.Client:
        client = make(name)
        client.connect("127.0.0.1", args.port, keepalive=60)
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        # As Trio does for the WebSocket clients: without it, Nagle's algorithm and
        # delayed ACKs add tens of milliseconds to every small publish and PUBACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(sock, selectors.EVENT_READ, client)
        clients[name] = client
        return client

    def connect(name: str, topic: str) -> mqtt.Client:
        client = open_client(name)
        client.subscribe(topic, qos=1)
        return client

    def disconnect(name: str) -> None:
        client = clients.pop(name)
        sock = client.socket()
        if sock is not None:
            sel.unregister(sock)
        client.disconnect()  # written at once; paho closes the socket after it

    def pump(timeout: float) -> None:
        """One round of the event loop: read what is ready, then write what a callback
        queued (only clients touched this round: no scan of the whole fleet)."""
        touched = [key.data for key, _ in sel.select(timeout)]
        for client in touched:
            client.loop_read()
        for client in [*touched, *backlogged]:
            if client.want_write():
                client.loop_write()
        backlogged.clear()

    def run_until(done: Callable[[], bool], limit: float) -> None:
        deadline = time.perf_counter() + limit
        while not done():
            if time.perf_counter() > deadline:
                raise TimeoutError("phase did not finish")
            pump(0.01)

    def body(sender: str) -> bytes:
        b = stamp(w.body)
        return b[: STAMP.size] + sender.encode().ljust(16, b"\0") + b[STAMP.size + 16 :]

    def publish(sender: str, to: str) -> None:
        state.published += 1
        state.unacked[sender] = state.unacked.get(sender, 0) + 1
        client = clients[sender]
        client.publish(f"m/{to}", body(sender), qos=1)
        if client.want_write():  # the socket took only part of it
            backlogged.add(client)

    p = f"g{args.index}"
    senders = [f"{p}s{i}" for i in range(w.pairs)]
    receivers = [f"{p}r{i}" for i in range(w.pairs)]
    offline = [f"{p}o{i}" for i in range(w.offline)]
    barrier = Barrier(args.barrier, args.index, args.procs)

    def wait_for(phase: str) -> None:
        barrier.arrive(phase)
        run_until(lambda: barrier.passed(phase), SETUP_TIMEOUT)

    out: dict[str, Any] = {}
    for name in senders:
        connect(name, f"r/{name}")
    for name in receivers + offline:
        connect(name, f"m/{name}")
    run_until(lambda: all(c.is_connected() for c in clients.values()), SETUP_TIMEOUT)
    pump(0.2)  # SUBACKs
    for name in offline:
        disconnect(name)

    # 1. online throughput: windows on PUBACK
    wait_for("online")

    def top_up() -> None:
        for s, r in zip(senders, receivers, strict=True):
            while state.unacked.get(s, 0) < w.window:
                publish(s, r)

    end = time.perf_counter() + WARMUP
    while time.perf_counter() < end:
        top_up()
        pump(0.001)
    state.count, state.counting = 0, True
    cpu.begin()
    end = time.perf_counter() + w.seconds
    while time.perf_counter() < end:
        top_up()
        pump(0.001)
    state.counting = False
    cpu.end("online")
    out["online"] = {"delivered": state.count, "seconds": w.seconds}
    run_until(lambda: all(state.unacked.get(s, 0) <= 0 for s in senders), PHASE_TIMEOUT)

    # 2. latency at a fixed rate
    wait_for("latency")
    state.latencies = []
    cpu.begin()
    start = time.perf_counter()
    i = 0
    while (at := i / w.rate) < w.seconds:
        now = time.perf_counter() - start
        if now >= at:
            publish(senders[i % w.pairs], receivers[i % w.pairs])
            i += 1
            continue
        pump(min(at - now, 0.01))
    cpu.end("latency")
    with_deadline = time.perf_counter() + STRAGGLE
    while len(state.latencies) < i and time.perf_counter() < with_deadline:
        pump(0.01)
    out["latency"] = {
        "rate": w.rate,
        "expected": i,
        "latencies": [round(v, 6) for v in state.latencies],
    }
    state.latencies = None

    # 3. backlog: persistent sessions collect QoS 1 messages while their clients are away
    wait_for("fill")
    cpu.begin()
    queue = [(senders[(k * w.per_device + n) % w.pairs], offline[k])
             for n in range(w.per_device) for k in range(w.offline)]  # fmt: skip
    while queue:
        for s in senders:
            while queue and state.unacked.get(s, 0) < w.window:
                _, to = queue.pop()
                publish(s, to)
        pump(0.001)
    run_until(lambda: all(state.unacked.get(s, 0) <= 0 for s in senders), PHASE_TIMEOUT)
    cpu.end("backlog fill")
    for name in offline:
        state.received[name] = 0
    wait_for("drain")
    cpu.begin()
    started = time.monotonic()
    for name in offline:
        open_client(name)
    run_until(lambda: all(state.received.get(n, 0) >= w.per_device for n in offline), PHASE_TIMEOUT)
    cpu.end("backlog drain")
    out["backlog"] = {
        "messages": w.offline * w.per_device,
        "start": started,
        "end": time.monotonic(),
    }
    deadline = time.perf_counter() + STRAGGLE
    while state.receipts < sum(state.received.values()) and time.perf_counter() < deadline:
        pump(0.01)
    out["totals"] = {
        "sent": state.published,
        "received": sum(state.received.values()),
        "receipts": state.receipts,
    }
    for client in clients.values():
        client.disconnect()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run one system's workload and print the JSON result."""
    d = Workload()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=["v1", "mqtt"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--secret", default="")
    parser.add_argument("--index", type=int, default=0, help="this generator process")
    parser.add_argument("--procs", type=int, default=1, help="generator processes in all")
    parser.add_argument("--barrier", type=Path, help="directory shared by the processes")
    for key in ("pairs", "window", "seconds", "rate", "offline", "per_device", "body"):
        value = getattr(d, key)
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    workload = Workload(
        args.pairs, args.window, args.seconds, args.rate, args.offline, args.per_device, args.body
    )
    cpu = Cpu(args.server_pid)
    if args.system == "v1":
        result = trio.run(run_v1, args, workload, cpu)
    else:
        try:
            result = run_mqtt(args, workload, cpu)
        except (OSError, TimeoutError) as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
    result["cpu"] = cpu.phases
    print(json.dumps(result, default=lambda o: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

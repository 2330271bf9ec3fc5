"""The same store-and-forward workload against this gateway and two systems we did not write.

    python -m scripts.bench_peers                 # 3 runs of each system, medians and ratios
    python -m scripts.bench_peers --runs 1 --systems gateway,relay

Systems, each started by this script on a free loopback port with fresh storage, in its
own process, for every run:

1. **gateway**: ``python -m gateway.cli serve`` (SQLite, ``synchronous = full``).
2. **mosquitto**: Debian's Mosquitto, MQTT 3.1.1 with persistent sessions
   (``clean_session = false``) and QoS 1, the classic broker answer to store-and-forward
   for mobile. Configuration: persistence on, no limit on queued or in-flight QoS 1
   messages (the gateway has none either), TCP_NODELAY.
3. **relay**: `scripts/peers/ws_relay.py`, a store-and-forward relay on `websockets`
   (asyncio) and SQLite (WAL, ``synchronous = FULL``, group commit, acks, delivered
   receipts): what a Python team would write instead.

The load generator (`scripts/peers/loadgen.py`) runs in a process of its own and reports
the CPU it and the server used in every phase; a phase where the generator used 90 % of a
core or more is flagged, because the number then says more about the generator than
about the system. Workload and phases: see the generator's docstring. If the Mosquitto
binary is missing, the script says how to install it and skips only that system.

Only 127.0.0.1 is used; every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.kit.child_process import SOURCE_ROOT, ChildProcess
from scripts.kit.gateway_process import GatewayProcess
from scripts.kit.limits import raise_fd_limit
from scripts.kit.loopback import free_port
from scripts.kit.procfs import busy_cores
from scripts.peers.loadgen import Workload, percentiles

SYSTEMS = ("gateway", "mosquitto", "relay")
RUN_TIMEOUT = 600.0
GENERATOR_LIMIT = 0.9  # cores: a generator process this busy may be what limits
MACHINE_LIMIT = 0.9  # share of all cores busy (generator, server and anything else)
MOSQUITTO_HINT = (
    "mosquitto not found: install Debian's package with `apt-get install mosquitto` "
    "(the script starts it itself; no service needs to run); skipping mosquitto"
)


@dataclass
class Server:
    """A started system: its process and what the generator needs to reach it."""

    process: ChildProcess
    driver: str  # "v1" | "mqtt"
    secret: str


def find_mosquitto(given: str | None = None) -> str | None:
    """The mosquitto binary: `given`, or from PATH (Debian installs it in /usr/sbin)."""
    if given is not None:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


def start(system: str, directory: Path, mosquitto: str | None = None) -> Server:
    """Start one system with fresh storage in `directory`, and wait for its port.

    Raises:
        ProcessFailed: It did not start; the message ends with its log.
    """
    directory.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(16)
    process: ChildProcess
    if system == "gateway":
        process = GatewayProcess(
            directory,
            server="drain_seconds = 0.5",
            config=f'[auth]\njwt_secret = "{secret}"',
            log_level="warning",
            cwd=SOURCE_ROOT,
        )
        driver = "v1"
    elif system == "relay":
        port = free_port()
        command = [sys.executable, "-m", "scripts.peers.ws_relay", "--port", str(port),
                   "--db", str(directory / "relay.db"), "--secret", secret]  # fmt: skip
        process = ChildProcess(
            "relay", command, directory / "relay.log", port=port, cwd=SOURCE_ROOT
        )
        driver = "v1"
    else:
        binary = find_mosquitto(mosquitto)
        assert binary is not None
        port = free_port()
        config = directory / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {directory}/\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        process = ChildProcess(
            "mosquitto", [binary, "-c", str(config)], directory / "mosquitto.log", port=port,
            cwd=SOURCE_ROOT,
        )  # fmt: skip
        driver = "mqtt"
    process.start()
    return Server(process, driver, secret)


def share(total: int, procs: int, index: int) -> int:
    """Process `index`'s part of `total`, spread as evenly as possible."""
    return total // procs + (1 if index < total % procs else 0)


def generate(server: Server, workload: Workload, procs: int) -> dict[str, Any]:
    """Run the load generator in `procs` processes of its own against `server`, their
    phases started together; return the merged figures."""
    with tempfile.TemporaryDirectory(prefix="barrier-") as barrier:
        children = []
        for index in range(procs):
            command = [
                sys.executable, "-m", "scripts.peers.loadgen", "--system", server.driver,
                "--port", str(server.process.port), "--server-pid", str(server.process.pid),
                "--secret", server.secret, "--index", str(index), "--procs", str(procs),
                "--barrier", barrier,
                "--pairs", str(share(workload.pairs, procs, index)),
                "--window", str(workload.window), "--seconds", str(workload.seconds),
                "--rate", str(workload.rate / procs),
                "--offline", str(share(workload.offline, procs, index)),
                "--per-device", str(workload.per_device), "--body", str(workload.body),
            ]  # fmt: skip
            children.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=SOURCE_ROOT,
                )
            )
        parts = []
        for child in children:
            try:
                stdout, stderr = child.communicate(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                stdout, stderr = child.communicate()
            try:
                parts.append(json.loads(stdout.decode().strip().splitlines()[-1]))
            except (ValueError, IndexError):
                parts.append({"error": stderr.decode(errors="replace")[-2000:] or "no output"})
    return merge(parts)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the generator processes' results."""
    failed = [p for p in parts if "error" in p]
    if failed:
        return {"error": failed[0]["error"]}
    seconds = parts[0]["online"]["seconds"]
    latencies = [v for p in parts for v in p["latency"]["latencies"]]
    expected = sum(p["latency"]["expected"] for p in parts)
    drain = max(p["backlog"]["end"] for p in parts) - min(p["backlog"]["start"] for p in parts)
    messages = sum(p["backlog"]["messages"] for p in parts)
    cpu: dict[str, dict[str, float]] = {}
    for phase in parts[0]["cpu"]:
        cpu[phase] = {
            "generator_cores": sum(p["cpu"][phase]["generator_cores"] for p in parts),
            "generator_busiest": max(p["cpu"][phase]["generator_cores"] for p in parts),
            "server_cores": parts[0]["cpu"][phase]["server_cores"],
            "machine_cores": parts[0]["cpu"][phase]["machine_cores"],
        }
    return {
        "online": {"msgs_per_s": sum(p["online"]["delivered"] for p in parts) / seconds},
        "latency": {
            "rate": sum(p["latency"]["rate"] for p in parts),
            **percentiles(latencies, expected),
        },
        "backlog": {"messages": messages, "drain_s": drain, "msgs_per_s": messages / drain},
        "totals": {k: sum(p["totals"][k] for p in parts) for k in parts[0]["totals"]},
        "errors": [e for p in parts for e in p.get("errors", [])][:20],
        "cpu": cpu,
    }


@contextlib.contextmanager
def running(system: str, directory: Path, mosquitto: str | None) -> Iterator[Server]:
    """A started system, stopped on the way out."""
    server = start(system, directory, mosquitto)
    try:
        yield server
    finally:
        server.process.stop(grace=10)


def median(values: Sequence[float]) -> float:
    """The median, NaN for none."""
    return statistics.median(values) if values else float("nan")


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over runs, per system."""
    out: dict[str, dict[str, Any]] = {}
    for system, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            out[system] = {"error": runs[0].get("error", "no runs") if runs else "skipped"}
            continue
        row: dict[str, Any] = {
            "runs": len(good),
            "msgs_per_s": median([r["online"]["msgs_per_s"] for r in good]),
            "p50_ms": median([r["latency"]["p50_ms"] for r in good]),
            "p99_ms": median([r["latency"]["p99_ms"] for r in good]),
            "drain_s": median([r["backlog"]["drain_s"] for r in good]),
            "per_run": {
                "msgs_per_s": [round(r["online"]["msgs_per_s"]) for r in good],
                "p99_ms": [round(r["latency"]["p99_ms"], 1) for r in good],
                "drain_s": [round(r["backlog"]["drain_s"], 3) for r in good],
            },
            "cpu": {},
            "totals": good[-1].get("totals"),
        }
        for phase in ("online", "latency", "backlog fill", "backlog drain"):
            row["cpu"][phase] = {
                who: median([r["cpu"][phase][who] for r in good if phase in r.get("cpu", {})])
                for who in ("generator_cores", "generator_busiest", "server_cores", "machine_cores")
            }
        out[system] = row
    return out


def report(summary: dict[str, dict[str, Any]], workload: Workload) -> str:
    """The table printed at the end: medians, ratios against the gateway, CPU."""
    base = summary.get("gateway", {})
    cores = os.cpu_count() or 1
    lines = [
        f"workload: {workload.pairs} pairs, window {workload.window}, {workload.seconds:g} s "
        f"online; latency at {workload.rate:g} msg/s; backlog {workload.offline} devices x "
        f"{workload.per_device} messages; {workload.body}-byte bodies",
        "",
        f"{'system':<10} {'msgs/s':>9} {'x gw':>6} {'p50 ms':>8} {'p99 ms':>8} {'x gw':>6} "
        f"{'drain s':>8} {'x gw':>6}   runs",
    ]

    def ratio(system: dict[str, Any], key: str) -> str:
        if "error" in base or key not in system or not base.get(key):
            return "-"
        return f"{system[key] / base[key]:.2f}"

    for name, row in summary.items():
        if "error" in row:
            lines.append(f"{name:<10} skipped or failed: {row['error'].splitlines()[0][:80]}")
            continue
        lines.append(
            f"{name:<10} {row['msgs_per_s']:>9,.0f} {ratio(row, 'msgs_per_s'):>6} "
            f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {ratio(row, 'p99_ms'):>6} "
            f"{row['drain_s']:>8.3f} {ratio(row, 'drain_s'):>6}   {row['runs']}"
        )
    lines += [
        "",
        "CPU in cores (medians): generator / server / other work on the machine, per phase",
    ]
    for name, row in summary.items():
        if "error" in row:
            continue
        parts = []
        flagged = []
        for phase, cpu in row["cpu"].items():
            others = max(0.0, cpu["machine_cores"] - cpu["generator_cores"] - cpu["server_cores"])
            parts.append(
                f"{phase} {cpu['generator_cores']:.2f}/{cpu['server_cores']:.2f}/{others:.2f}"
            )
            if (
                cpu["generator_busiest"] >= GENERATOR_LIMIT
                or cpu["machine_cores"] >= MACHINE_LIMIT * cores
            ):
                flagged.append(phase)
        lines.append(f"{name:<10} " + " · ".join(parts))
        if flagged:
            lines.append(
                f"{'':<10} CPU-bound outside the server in {', '.join(flagged)} (a generator "
                f"process at >= {GENERATOR_LIMIT} core, or the machine >= {MACHINE_LIMIT:.0%} "
                "busy): those figures are lower bounds for this system"
            )
        totals = row.get("totals")
        if totals:
            verdict = "nothing lost" if totals["received"] >= totals["sent"] else "LOSS"
            lines.append(
                f"{'':<10} last run: {totals['sent']} sent, {totals['received']} delivered, "
                f"{totals['receipts']} receipts: {verdict}"
            )
    lines.append("")
    lines.append("per run: " + json.dumps({n: r.get("per_run") for n, r in summary.items()}))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    d = Workload()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--pairs", type=int, default=d.pairs)
    parser.add_argument("--window", type=int, default=d.window)
    parser.add_argument("--seconds", type=float, default=d.seconds)
    parser.add_argument("--rate", type=float, default=d.rate)
    parser.add_argument("--offline", type=int, default=d.offline)
    parser.add_argument("--per-device", type=int, default=d.per_device)
    parser.add_argument("--body", type=int, default=d.body)
    parser.add_argument(
        "--generators",
        type=int,
        default=2,
        help="load generator processes (default %(default)s: one per core)",
    )
    parser.add_argument("--mosquitto", metavar="PATH", help="the mosquitto binary (default: PATH)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    workload = Workload(
        args.pairs, args.window, args.seconds, args.rate, args.offline, args.per_device, args.body
    )
    skipped: dict[str, list[dict[str, Any]]] = {}
    if "mosquitto" in systems and find_mosquitto(args.mosquitto) is None:
        print(MOSQUITTO_HINT, file=sys.stderr)
        systems.remove("mosquitto")
        skipped["mosquitto"] = [{"error": "not installed (apt-get install mosquitto)"}]
    if not systems:
        print("bench_peers.py: no system left to run", file=sys.stderr)
        return 1
    raise_fd_limit()
    print(
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"other work before starting: {busy_cores():.2f} cores",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for run in range(args.runs):
            order = systems[run % len(systems) :] + systems[: run % len(systems)]
            for system in order:
                directory = Path(tmp) / f"{system}-{run}"
                try:
                    with running(system, directory, args.mosquitto) as server:
                        result = generate(server, workload, args.generators)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    result = {"error": str(exc)}
                results[system].append(result)
                brief = (
                    result["error"].splitlines()[-1][:120]
                    if "error" in result
                    else f"{result['online']['msgs_per_s']:,.0f} msg/s, "
                    f"p99 {result['latency']['p99_ms']:.1f} ms, "
                    f"drain {result['backlog']['drain_s']:.3f} s"
                )
                print(f"run {run + 1}/{args.runs} {system}: {brief}", flush=True)
    summary = summarize({**results, **skipped})
    print()
    print(report(summary, workload))
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

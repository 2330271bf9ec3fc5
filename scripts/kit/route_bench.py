"""What the benchmarks of the routing workload (scenario 1 of scripts/bench_core.py, and the
scripts that run it on other set-ups) share around their runs: the smaller scales of
``--quick``, the lines printed before the first run (the code and machine measured, the
CPU other work takes, the scales), and the head of one run's line.

The scales are the attributes that bench_core's ``parse_args`` makes: ``runs``, ``pairs``,
``window``, ``duration``, ``warmup``, and for each that ``--quick`` may shrink, a
``*_set`` twin holding the value given on the command line (None if not given).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import trio

from scripts.kit.procfs import busy_cores


class RouteSample(Protocol):
    """What a run's line reads of one measurement (bench_core's `Sample`)."""

    @property
    def value(self) -> float:
        """Msgs/s at saturation, or the p99 in ms when paced."""
        ...

    @property
    def extra(self) -> Mapping[str, float]:
        """``p99_ms_at_saturation`` at saturation, ``p50_ms`` when paced; ``errors`` and
        ``closed`` if any."""
        ...


def apply_quick(args: argparse.Namespace) -> None:
    """With ``--quick``: one run of 100 pairs, 1 s of warm-up and 3 s measured, for each of
    these scales not given on the command line."""
    if args.quick:
        args.runs = args.runs_set or 1
        args.pairs = args.pairs_set or 100
        args.duration = args.duration_set or 3.0
        args.warmup = args.warmup_set or 1.0


def print_machine() -> float:
    """Print the code and machine measured, then the CPU that other processes use.

    Returns:
        That CPU, in cores (1.0: one core busy).
    """
    print(machine_line(), flush=True)
    busy = busy_cores()
    print(f"CPU in use by other processes before start: {busy:.0%} of one core", flush=True)
    return busy


def scales_line(args: argparse.Namespace) -> str:
    """The runs, devices, window and durations of the routing workload, in one line."""
    return (
        f"runs {args.runs}; {2 * args.pairs} devices ({args.pairs} pairs), window {args.window},"
        f" warmup {args.warmup:g} s + {args.duration:g} s measured"
    )


def print_preamble(args: argparse.Namespace, setup: str) -> None:
    """Print the code and machine measured, the CPU that other processes use, and the
    scales of the routing workload followed by `setup` (what the runs run on)."""
    print_machine()
    print(f"{scales_line(args)}; {setup}", flush=True)


def result_line(sample: RouteSample, *, saturation_note: str = "") -> str:
    """One run's result: msgs/s and the p99 at saturation (followed by `saturation_note`),
    or the paced p99 and p50; then the errors and closes, if any."""
    extra = sample.extra
    if "p99_ms_at_saturation" in extra:
        text = (
            f"{sample.value:,.0f} msg/s, p99 {extra['p99_ms_at_saturation']:.0f} ms"
            f"{saturation_note}"
        )
    else:
        text = f"p99 {sample.value:.1f} ms (p50 {extra['p50_ms']:.1f})"
    if extra.get("errors") or extra.get("closed"):
        text += f", errors {extra['errors']:.0f}, closed {extra['closed']:.0f}"
    return text


def machine_line() -> str:
    """Where the measured `gateway` comes from, and the machine and libraries it runs on."""
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"gateway code: {_gateway_source()}\n"
        f"machine: {os.cpu_count()} cpus ({model}), Python {platform.python_version()},"
        f" trio {trio.__version__}, cbor2 {_version('cbor2')},"
        f" trio-websocket {_version('trio-websocket')}"
    )


def _gateway_source() -> str:
    """Where the benchmarked gateway package comes from, with its git commit if known."""
    import gateway

    where = Path(gateway.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(where)
    return f"{where} (commit {commit}{', uncommitted changes' if dirty else ''})"


def _version(dist: str) -> str:
    """The installed version of distribution `dist`, or "?"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"

"""The wake-up policy lab: the real policy code on a virtual clock, over simulated days.

    python -m scripts.wake_lab                          # 10,000 devices, 24 hours, 3 policies
    python -m scripts.wake_lab --hours 2 --devices 2000 --seed 7 --json lab.json --plot lab.png

Each policy of `scripts.wakelab.policies` (v1, new, signal) runs against the same
population and the same seed: iOS and Android devices (iOS drops background pushes past
its hourly budget, Android defers normal-priority pushes to Doze windows), users who
open their apps at random, apps that close their socket after going to the background or
leave it open and silent (zombies), multi-device users, and push loss for every kind.
It prints one table, checks the goals (docs/push.md, "The policy lab") and can write
the figures as JSON and plot the delivery times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from scripts.wakelab.policies import POLICIES
from scripts.wakelab.world import NORMAL, RECEIPT, URGENT, Knobs, Tally, World

URGENT_WITHIN = 60.0
NORMAL_WITHIN = 25 * 60.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: one option per knob, plus the run's own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for knob in fields(Knobs):
        p.add_argument(
            "--" + knob.name.replace("_", "-"),
            type=type(knob.default),
            default=knob.default,
            help=f"(default {knob.default})",
        )
    p.add_argument("--loss", type=float, help="one loss rate for every push kind")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma list (default all)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--plot", help="write a plot of delivery times to this PNG (matplotlib)")
    args = p.parse_args(argv)
    if args.loss is not None:
        args.alert_loss = args.background_loss = args.loss
    args.policies = [n for n in args.policies.split(",") if n]
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        p.error(f"unknown policies: {', '.join(sorted(unknown))}")
    return args


def summarize(knobs: Knobs, tally: Tally, seconds: float) -> dict[str, Any]:
    """The figures of one run."""
    lat = tally.latencies
    delivered = sum(len(x) for x in lat)
    pushes = sum(tally.pushes.values())
    background = sum(n for k, n in tally.pushes.items() if k.startswith("background:"))
    device_hours = knobs.devices * knobs.hours

    def within(cls: int, limit: float) -> float:
        total = len(lat[cls]) + tally.undelivered[cls]
        return sum(1 for x in lat[cls] if x <= limit) / total if total else 1.0

    def pct(cls: int, q: float) -> float:
        values = sorted(lat[cls])
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    return {
        "urgent_within_60s": within(URGENT, URGENT_WITHIN),
        "urgent_p50_s": pct(URGENT, 0.5),
        "urgent_p99_s": pct(URGENT, 0.99),
        "normal_within_25min": within(NORMAL, NORMAL_WITHIN),
        "receipts_within_25min": within(RECEIPT, NORMAL_WITHIN),
        "normal_p99_s": pct(NORMAL, 0.99),
        "undelivered_at_end": sum(tally.undelivered),
        "delivered": delivered,
        "pushes": pushes,
        "pushes_per_delivered": pushes / delivered if delivered else 0.0,
        "background_per_device_hour": background / device_hours if device_hours else 0.0,
        "max_background_in_an_hour": tally.max_background_per_hour,
        "pushes_by_kind": dict(sorted(tally.pushes.items())),
        "lost": tally.lost,
        "ios_throttled": tally.throttled,
        "android_deferred": tally.deferred,
        "repeated_alerts": tally.repeated_alerts,
        "wall_seconds": seconds,
    }


GOALS = (
    ("urgent ≥ 99.9% within 60 s", lambda s: s["urgent_within_60s"] >= 0.999),
    ("non-urgent ≥ 99% within 25 min", lambda s: s["normal_within_25min"] >= 0.99),
    ("≤ 0.3 pushes per delivered message", lambda s: s["pushes_per_delivered"] <= 0.3),
    ("≤ 3 background pushes per device-hour", lambda s: s["max_background_in_an_hour"] <= 3),
)


def report(results: dict[str, dict[str, Any]]) -> None:
    """One table, one column per policy, then the goals."""
    rows = (
        ("urgent delivered within 60 s", "urgent_within_60s", "{:.3%}"),
        ("urgent p50 / p99 (s)", None, None),
        ("non-urgent within 25 min", "normal_within_25min", "{:.2%}"),
        ("receipts within 25 min", "receipts_within_25min", "{:.2%}"),
        ("undelivered at the end", "undelivered_at_end", "{:,}"),
        ("pushes per delivered item", "pushes_per_delivered", "{:.3f}"),
        ("background pushes per device-hour", "background_per_device_hour", "{:.2f}"),
        ("most background pushes, one device, one hour", "max_background_in_an_hour", "{:,}"),
        ("pushes lost / iOS-throttled / Doze-deferred", None, None),
        ("alerts within 60 s of another (collapsed)", "repeated_alerts", "{:,}"),
        ("run time (s)", "wall_seconds", "{:.1f}"),
    )
    names = list(results)
    print(f"{'':46}" + "".join(f"{n:>18}" for n in names))
    for label, key, fmt in rows:
        cells = []
        for n in names:
            s = results[n]
            if key is not None and fmt is not None:
                cells.append(fmt.format(s[key]))
            elif label.startswith("urgent p50"):
                cells.append(f"{s['urgent_p50_s']:.1f} / {s['urgent_p99_s']:.1f}")
            else:
                cells.append(f"{s['lost']:,}/{s['ios_throttled']:,}/{s['android_deferred']:,}")
        print(f"{label:46}" + "".join(f"{c:>18}" for c in cells))
    print()
    for n in names:
        kinds = ", ".join(f"{k} {v:,}" for k, v in results[n]["pushes_by_kind"].items())
        print(f"{n}: {kinds}")
    print()
    for label, met in GOALS:
        print(
            f"{label:42}" + "".join(f"{'PASS' if met(results[n]) else 'MISS':>18}" for n in names)
        )


def plot(results: dict[str, dict[str, Any]], latencies: dict[str, list[float]], path: str) -> None:
    """Cumulative share of urgent items delivered against the delay, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in latencies.items():
        values = sorted(max(v, 0.01) for v in values)
        if values:
            ax.plot(values, [(n + 1) / len(values) for n in range(len(values))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("urgent item: seconds from arrival to delivery")
    ax.set_ylabel("share delivered")
    ax.axvline(URGENT_WITHIN, color="grey", linestyle=":")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _run(knobs: Knobs, name: str) -> tuple[dict[str, Any], list[float]]:
    """One policy's run: its figures and its urgent delivery times."""
    started = time.perf_counter()
    tally = World(knobs, name).run()
    return summarize(knobs, tally, time.perf_counter() - started), tally.latencies[URGENT]


def main(argv: Sequence[str] | None = None) -> int:
    """Run every policy on the same population; 0 when all ran."""
    args = parse_args(argv)
    knobs = Knobs(**{f.name: getattr(args, f.name) for f in fields(Knobs)})
    results: dict[str, dict[str, Any]] = {}
    urgent: dict[str, list[float]] = {}
    # One process per policy, all at once: the runs are independent and single-threaded,
    # and with fewer cores than policies, sharing them ends sooner than queueing a run.
    with ProcessPoolExecutor(max_workers=len(args.policies)) as pool:
        runs = {name: pool.submit(_run, knobs, name) for name in args.policies}
        for name, future in runs.items():
            results[name], urgent[name] = future.result()
            print(f"{name}: {len(urgent[name]):,} urgent items, "
                  f"median {statistics.median(urgent[name] or [0]):.1f} s", flush=True)  # fmt: skip
    print(f"\n{knobs.devices:,} devices, {knobs.hours:g} hours, seed {knobs.seed}\n")
    report(results)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"knobs": asdict(knobs), "results": results}, indent=2), encoding="utf-8"
        )
    if args.plot:
        plot(results, urgent, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

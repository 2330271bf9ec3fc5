"""The figure of a run: latency CDFs, and a timeline of devices, queued items and pushes."""

from __future__ import annotations

from pathlib import Path

from scripts.simulator.knobs import Scenario
from scripts.simulator.ledger import Ledger


def write_plot(ledger: Ledger, scenario: Scenario, path: Path) -> None:
    """Write the figure as a PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    messages = list(ledger.messages.values())
    series = {
        "end to end, recipient active": [
            m.delivered_at - m.sent_at
            for m in messages
            if m.delivered_at is not None and not m.recipient_idle
        ],
        "end to end, recipient asleep": [
            m.delivered_at - m.sent_at
            for m in messages
            if m.delivered_at is not None and m.recipient_idle
        ],
        "message → push request": [
            m.push_at - m.sent_at for m in messages if m.push_at is not None
        ],
        "push → reconnect attempt": [
            w.reconnect_at - w.push_at for w in ledger.wakes if w.reconnect_at is not None
        ],
        "reconnect attempt → drained": [
            w.drained_at - w.reconnect_at
            for w in ledger.wakes
            if w.drained_at is not None and w.reconnect_at is not None
        ],
    }
    fig, (cdf, timeline) = plt.subplots(2, 1, figsize=(10, 9), constrained_layout=True)
    for label, values in series.items():
        if not values:
            continue
        ordered = sorted(max(v, 1e-4) for v in values)
        n = len(ordered)
        cdf.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")
    cdf.set_xscale("log")
    cdf.set_xlabel("seconds (log scale)")
    cdf.set_ylabel("share of events")
    cdf.set_ylim(0, 1.02)
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right", fontsize="small")
    cdf.set_title(
        f"Latency CDFs — {scenario.devices} phones, {scenario.idle_fraction:.0%} asleep, "
        f"{scenario.rate:g} msg/s, push loss {scenario.push_loss:.0%}, seed {scenario.seed}"
    )

    start = ledger.started
    samples = ledger.samples
    t = [s.at - start for s in samples]
    timeline.plot(t, [s.connected for s in samples], label="devices connected", color="C0")
    timeline.plot(t, [s.in_flight for s in samples], label="items queued / in flight", color="C1")
    timeline.set_xlabel("seconds since start")
    timeline.set_ylabel("devices / items")
    for at, label in (
        (ledger.traffic_started, " traffic"),
        (ledger.final_drain_started, " final drain"),
    ):
        if at is not None:
            timeline.axvline(at - start, color="grey", linestyle="--")
            timeline.annotate(
                label,
                (at - start, 0),
                color="grey",
                xycoords=("data", "axes fraction"),
                va="bottom",
            )
    pushes = timeline.twinx()
    sent = sorted(p.at - start for p in ledger.pushes)
    lost = sorted(p.at - start for p in ledger.pushes if p.lost)
    pushes.step(
        sent, range(1, len(sent) + 1), where="post", color="C2", label="pushes (cumulative)"
    )
    pushes.step(
        lost,
        range(1, len(lost) + 1),
        where="post",
        color="C3",
        linestyle=":",
        label="pushes dropped by the provider",
    )
    pushes.set_ylabel("pushes")
    lines = timeline.get_legend_handles_labels()
    more = pushes.get_legend_handles_labels()
    timeline.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize="small")
    timeline.grid(True, alpha=0.3)
    timeline.set_title("Timeline")
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""What the simulator shows: a live panel while it runs, the summary tables at the end."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from scripts.simulator.ledger import now
from scripts.simulator.run import Run

LATENCY_ROWS = (
    ("message_to_push", "message → push", "`send` to the next wake-up request at the provider"),
    ("push_to_reconnect", "push → reconnect", "push at the phone to its TCP connect"),
    ("reconnect_to_drained", "reconnect → drained", "TCP connect to `drained` (whole backlog)"),
    ("end_to_end_active", "end to end, active", "`send` to `msg`, recipient connected"),
    ("end_to_end_idle", "end to end, idle", "`send` to `msg`, recipient asleep"),
)
PUSH_NAMES = {
    "apns alert": "APNs alert",
    "apns background": "APNs background",
    "fcm alert": "FCM high priority",
    "fcm background": "FCM normal priority",
    "webpush alert": "Web Push high urgency",
    "webpush background": "Web Push normal urgency",
}

GATEWAY_ROWS = {
    "alert_retries": "gateway: alerts sent again (retries)",
    "retries_skipped": "gateway: retries not needed (acked or read)",
    "zombie_rescues": "gateway: zombie rescues",
    "clears": "gateway: clear wake-ups",
}


def live_view(run: Run) -> RenderableType:
    """The live panel: phase, devices, messages in flight, pushes."""
    ledger, scenario = run.ledger, run.scenario
    phones = run.phones
    connected = sum(p.online for p in phones)
    waking = sum(p.waking and not p.online for p in phones)
    idle = sum(not p.online and not p.waking for p in phones)
    stored = sum(m.stored_at is not None for m in ledger.messages.values())
    delivered = sum(m.delivered_at is not None for m in ledger.messages.values())
    lost_pushes = sum(p.lost for p in ledger.pushes)
    elapsed = now() - ledger.started
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    phase = f"{run.phase} ({now() - run.phase_started:.1f} s)"
    if run.phase == "traffic":
        phase = f"traffic {now() - run.phase_started:.1f} / {scenario.duration:g} s"
    table.add_row("phase", phase)
    table.add_row(
        "devices",
        f"{connected} connected · {waking} waking · {idle} idle  (of {len(phones)})",
    )
    table.add_row(
        "messages",
        f"{len(ledger.messages)} sent · {stored} stored · {delivered} delivered · "
        f"{ledger.in_flight} items in flight · {ledger.duplicates} duplicates",
    )
    table.add_row(
        "pushes",
        f"{len(ledger.pushes)} sent · {lost_pushes} dropped by the provider · "
        f"{len(ledger.wakes)} phones woken",
    )
    table.add_row("network", f"{ledger.drops} abrupt drops")
    return Panel(table, title=f"idle-device simulation · {elapsed:.1f} s", expand=False)


def print_summary(console: Console, summary: dict[str, Any], failures: list[str]) -> None:
    """The end-of-run tables, then the verdict."""
    m, r, p = summary["messages"], summary["receipts"], summary["pushes"]
    counts = Table(title="Messages and receipts", title_justify="left")
    counts.add_column("")
    counts.add_column("count", justify="right")
    counts.add_row("messages sent (answered `sent`)", str(m["sent"]))
    counts.add_row("  to recipients that were asleep", str(m["to_idle_phones"]))
    if m["group_sends"]:
        counts.add_row(
            "  of which group copies", f"{m['group_copies']} (from {m['group_sends']} sends)"
        )
    counts.add_row("messages delivered", str(m["delivered"]))
    counts.add_row("  first delivered by the final drain", str(m["by_final_drain"]))
    counts.add_row("messages lost", _flag(m["lost"]))
    counts.add_row("messages duplicated (delivered again)", str(m["duplicated"]))
    counts.add_row("still queued at the end", _flag(m["still_queued_at_end"]))
    counts.add_row("sends never answered", _flag(m["unanswered"]))
    counts.add_row(
        "delivered receipts arrived / expected",
        f"{r['delivered_arrived']} / {r['delivered_expected']}",
    )
    counts.add_row(
        "read receipts arrived / expected", f"{r['read_arrived']} / {r['read_expected']}"
    )
    counts.add_row("abrupt network drops", str(summary["network_drops"]))

    pushes = Table(title="Wake-up pushes", title_justify="left")
    pushes.add_column("")
    pushes.add_column("count", justify="right")
    for key, name in PUSH_NAMES.items():
        pushes.add_row(name, str(p["by_provider_and_kind"].get(key, 0)))
    pushes.add_row("total", str(p["total"]))
    pushes.add_row("  dropped by the provider (push loss)", str(p["lost_by_provider"]))
    pushes.add_row("  answered with an error", str(p["rejected"]))
    pushes.add_row("  reached a phone already awake", str(p["not_needed"]))
    pushes.add_row("  dropped by iOS's background throttle", str(p["throttled_by_ios"]))
    pushes.add_row("phones woken by a push", str(p["wakes"]))
    pushes.add_row("pushes per delivered message", f"{p['per_delivered_message']:.2f}")
    pushes.add_row(
        "APNs background per sleeping iPhone-hour", f"{p['ios_background_per_device_hour']:.1f}"
    )
    pushes.add_row(
        "most background pushes to one phone in an hour",
        str(p["most_background_to_one_phone_in_an_hour"]),
    )
    z = summary["zombies"]
    pushes.add_row("apps suspended with the socket open", str(z["suspended_with_socket_open"]))
    pushes.add_row("  of which woken by a push", str(z["woken"]))
    e = summary["read_elsewhere"]
    pushes.add_row("messages read on the user's other device", str(e["reads"]))
    pushes.add_row("  read receipts synced to the phone", str(e["synced_to_phone"]))
    for key, name in GATEWAY_ROWS.items():
        if key in summary["gateway"]:
            pushes.add_row(name, f"{summary['gateway'][key]:g}")

    latency = Table(title="Latency (ms)", title_justify="left")
    latency.add_column("")
    for column in ("n", "p50", "p90", "p99"):
        latency.add_column(column, justify="right")
    legend = Text(style="dim")
    for key, name, meaning in LATENCY_ROWS:
        row = summary["latency_s"][key]
        latency.add_row(
            name, str(row["n"]), _ms(row["p50_ms"]), _ms(row["p90_ms"]), _ms(row["p99_ms"])
        )
        legend.append(f"{name}: {meaning}\n")

    console.print(Group(counts, pushes, latency, legend))
    if summary["errors"]:
        console.print("errors: " + ", ".join(f"{k}: {v}" for k, v in summary["errors"].items()))
    if summary["undrained_devices"]:
        shown = list(summary["undrained_devices"].items())[:10]
        console.print("undrained: " + ", ".join(f"{u} ({n} items)" for u, n in shown))
    if failures:
        console.print(Text("FAIL: " + "; ".join(failures), style="bold red"))
    else:
        console.print(Text("OK: nothing lost, every queue drained", style="bold green"))


def _flag(value: int) -> str:
    return f"[bold red]{value}[/]" if value else "0"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"

"""Simulate a fleet of iOS and Android phones (and browsers) that sleep, get woken by pushes,
and drain.

    python -m scripts.simulate_idle_devices                      # the default scenario, < 30 s
    python -m scripts.simulate_idle_devices --devices 200 --rate 50 --push-loss 0.5 --plot sim.png

It starts the gateway in its own process (or uses a running one with --url), serves a fake
APNs (HTTP/2 over TLS, provider JWT verified) and a fake FCM (OAuth + HTTP v1) in this
process (and, with --web-share, a fake Web Push service that verifies VAPID and decrypts
each wake-up), and routes every wake-up the gateway sends to the simulated phone that
registered the token. Phones sleep by closing their socket, reconnect after a realistic delay when
their push arrives, drain their queue, ack, answer now and then, and sleep again. Active
phones send messages (urgent and not) and read receipts; the network drops connections at
random. At the end every phone opens the app (the final drain), then the simulator checks
every device's queue on the gateway.

Exit status: 0 when every message was delivered and every queue is empty; 1 when a
message was lost, a receipt is missing, or a device still has items queued; 2 when the
run could not be set up. docs/simulator.md explains every knob and number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from gateway.auth import mint_token
from gateway.errors import ConfigError, GatewayError
from gateway.settings import AuthSettings, Settings, load_settings
from scripts.kit.child_process import ProcessFailed
from scripts.kit.gateway_process import GatewayProcess
from scripts.kit.limits import raise_fd_limit
from scripts.kit.loopback import free_port
from scripts.simulator.gateway_config import scenario_config
from scripts.simulator.knobs import Distribution, PushRules, Scenario
from scripts.simulator.ledger import Ledger, failures
from scripts.simulator.push_relay import PushRelay
from scripts.simulator.run import AdminAccess, Run, simulate
from scripts.simulator.setups import (
    Ports,
    running_relay,
    staging_env,
    staging_relay,
    write_config_dir,
)

TOKEN_TTL = 3600
LIVE_INTERVAL = 0.25


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _distribution(text: str) -> Distribution:
    try:
        return Distribution.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line (every knob has a default that finishes in under 30 s)."""
    d = Scenario()
    parser = argparse.ArgumentParser(
        prog="python -m scripts.simulate_idle_devices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument(
        "--devices", type=int, default=d.devices, help="phones (default %(default)s)"
    )
    fleet.add_argument(
        "--ios-share",
        type=_share,
        default=d.ios_share,
        help="share of iOS phones among the phones; the rest are Android (default %(default)s)",
    )
    fleet.add_argument(
        "--web-share",
        type=_share,
        default=d.web_share,
        help="share of browser devices, woken through a fake Web Push service; the rest are "
        "phones (default %(default)s)",
    )
    fleet.add_argument(
        "--idle-fraction",
        type=_share,
        default=d.idle_fraction,
        help="share of phones that sleep and are woken by pushes; the rest "
        "stay connected and send the traffic (default %(default)s)",
    )
    traffic = parser.add_argument_group("traffic")
    traffic.add_argument(
        "--rate",
        type=_not_negative,
        default=d.rate,
        help="messages per second from the active phones (default %(default)s)",
    )
    traffic.add_argument(
        "--duration",
        type=_positive,
        default=d.duration,
        help="seconds of traffic (default %(default)s)",
    )
    traffic.add_argument(
        "--urgent-share",
        type=_share,
        default=d.urgent_share,
        help="share of urgent messages (default %(default)s)",
    )
    traffic.add_argument(
        "--read-share",
        type=_share,
        default=d.read_share,
        help="share of messages the recipient marks read (default %(default)s)",
    )
    traffic.add_argument(
        "--reply-share",
        type=_share,
        default=d.reply_share,
        help="share of wake-ups after which the phone answers (default %(default)s)",
    )
    phones = parser.add_argument_group("phone behaviour")
    phones.add_argument(
        "--reconnect-delay",
        type=_distribution,
        default=d.reconnect_delay,
        metavar="DIST",
        help="push (or network drop) to reconnect attempt: "
        "fixed:S, uniform:LO,HI, exp:MEAN or lognormal:MEDIAN,SIGMA, capped "
        "at 10 s (default %(default)s)",
    )
    phones.add_argument(
        "--foreground",
        type=_distribution,
        default=d.foreground,
        metavar="DIST",
        help="how long a woken app stays open before it "
        "closes its socket; fixed:S is a schedule, the others random "
        "(default %(default)s)",
    )
    phones.add_argument(
        "--push-loss",
        type=_share,
        default=d.push_loss,
        help="share of background wake-ups (APNs background, FCM normal) the "
        "provider accepts and never delivers (default %(default)s)",
    )
    phones.add_argument(
        "--alert-loss",
        type=_share,
        default=d.alert_loss,
        help="the same for alerts and FCM high priority (default %(default)s)",
    )
    phones.add_argument(
        "--ios-background-per-hour",
        type=int,
        default=d.ios_background_per_hour,
        help="background pushes iOS hands each iPhone per hour; the fake APNs accepts the "
        "rest and drops them silently, as iOS does (0: no throttle; default %(default)s)",
    )
    phones.add_argument(
        "--zombie-share",
        type=_share,
        default=d.zombie_share,
        help="share of the times a sleeping app goes to the background with its socket "
        "left open and silent (suspended by iOS) instead of closing it (default %(default)s)",
    )
    phones.add_argument(
        "--reader-share",
        type=_share,
        default=d.reader_share,
        help="share of the sleeping phones' users with a second device (a tablet) that stays "
        "connected and reads every message as it arrives, so the read syncs to the sleeping "
        "phone and may clear its notification (default %(default)s)",
    )
    phones.add_argument(
        "--drops-per-minute",
        type=_not_negative,
        default=d.drops_per_minute,
        help="abrupt network drops (TCP reset, no close frame) per connected "
        "phone per minute (default %(default)s)",
    )
    groups = parser.add_argument_group("groups (set up through the gateway's backend API)")
    groups.add_argument(
        "--groups",
        type=int,
        default=d.groups,
        help="groups of phones, each with at least one active phone (default %(default)s)",
    )
    groups.add_argument(
        "--group-size",
        type=int,
        default=10,
        help="phones in each group, at most --devices (default %(default)s)",
    )
    groups.add_argument(
        "--group-share",
        type=_share,
        default=d.group_share,
        help="share of the sends that go to one of the sender's groups (default %(default)s)",
    )
    gateway = parser.add_argument_group("gateway push timing (written into its configuration)")
    gateway.add_argument("--urgent-cooldown", type=_positive, default=d.rules.urgent_cooldown)
    gateway.add_argument(
        "--background-cooldown", type=_positive, default=d.rules.background_cooldown
    )
    gateway.add_argument("--linger", type=_positive, default=d.rules.linger)
    run = parser.add_argument_group("run")
    run.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="same seed, same fleet, schedule and draws (default %(default)s)",
    )
    run.add_argument(
        "--final-drain-timeout",
        type=_positive,
        default=d.final_drain_timeout,
        help="seconds the final drain may take (default %(default)s)",
    )
    run.add_argument(
        "--no-final-drain",
        action="store_true",
        help="leave sleeping phones asleep at the end: what their lost pushes "
        "stranded stays queued, and the run fails",
    )
    run.add_argument(
        "--plot", type=Path, metavar="PNG", help="write latency CDFs and a timeline to this PNG"
    )
    run.add_argument("--json", type=Path, metavar="FILE", help="write the summary as JSON")
    run.add_argument("--no-live", action="store_true", help="no live display")
    run.add_argument(
        "--workdir", type=Path, help="keep the gateway's configuration, database and log here"
    )
    target = parser.add_argument_group("the gateway (default: one started for the run)")
    target.add_argument(
        "--config",
        metavar="FILE",
        help="the gateway's configuration. Without --url: start the gateway on FILE (a staging "
        "set-up, real push credentials welcome) with only the listener, SQLite file, push "
        "endpoints and push timing overridden; the fakes verify FILE's APNs key and FCM "
        "service account, nothing is sent to Apple or Google. With --url: the configuration "
        "the running gateway uses (from --write-config)",
    )
    target.add_argument(
        "--url",
        help="a running gateway (ws://127.0.0.1:PORT/ws) started on --config FILE; the "
        "simulator serves the fakes on the ports FILE names",
    )
    target.add_argument(
        "--write-config",
        type=Path,
        metavar="DIR",
        help="write fake push credentials and DIR/gateway.toml for a gateway that pushes to "
        "this simulator's fakes, then exit",
    )
    target.add_argument("--gateway-port", type=int, default=8765, help="for --write-config")
    target.add_argument("--apns-port", type=int, default=8443, help="for --write-config")
    target.add_argument("--fcm-port", type=int, default=8444, help="for --write-config")
    run.add_argument(
        "--fault",
        choices=["delete-queued"],
        help="inject a fault to check the checker: delete one queued message "
        "from the gateway's SQLite file halfway through (the run must fail)",
    )
    return parser


def scenario_from(args: argparse.Namespace) -> Scenario:
    """The scenario the arguments describe."""
    if args.devices < 2:
        raise SystemExit("simulate_idle_devices.py: --devices must be at least 2")
    if args.groups < 0 or (args.groups and not 2 <= args.group_size <= args.devices):
        raise SystemExit(
            "simulate_idle_devices.py: --groups must not be negative, and --group-size must "
            "be 2..--devices"
        )
    return replace(
        Scenario(),
        devices=args.devices,
        ios_share=args.ios_share,
        web_share=args.web_share,
        idle_fraction=args.idle_fraction,
        rate=args.rate,
        duration=args.duration,
        urgent_share=args.urgent_share,
        read_share=args.read_share,
        reply_share=args.reply_share,
        reconnect_delay=args.reconnect_delay,
        foreground=args.foreground,
        push_loss=args.push_loss,
        alert_loss=args.alert_loss,
        ios_background_per_hour=max(args.ios_background_per_hour, 0),
        zombie_share=args.zombie_share,
        reader_share=args.reader_share,
        drops_per_minute=args.drops_per_minute,
        rules=PushRules(args.urgent_cooldown, args.background_cooldown, args.linger),
        final_drain_timeout=args.final_drain_timeout,
        final_drain=not args.no_final_drain,
        seed=args.seed,
        groups=args.groups,
        group_size=args.group_size if args.groups else 0,
        group_share=args.group_share,
    )


async def run_scenario(
    args: argparse.Namespace, run: Run, workdir: Path, settings: Settings | None
) -> None:
    """Start the fakes (and the gateway, unless --url), then simulate with the live display."""
    scenario, ledger = run.scenario, run.ledger
    push_dir = workdir / "push"
    database: Path | None = workdir / "gateway.db"
    api_key = secrets.token_hex(16)
    admin: AdminAccess | None = None
    async with trio.open_nursery() as nursery:
        if settings is None:  # the default: everything made for this run
            relay = PushRelay.create(ledger, scenario, push_dir)
            auth = AuthSettings(jwt_secret=secrets.token_hex(32))
            await nursery.start(relay.serve, push_dir)
            port, admin_port = free_port(), free_port()
            config = scenario_config(
                workdir / "gateway.toml",
                port=port,
                database=workdir / "gateway.db",
                jwt_secret=auth.jwt_secret,
                rules=scenario.rules,
                push_toml=relay.gateway_push_toml(),
                admin_port=admin_port,
                api_key=api_key,
            )
            admin = AdminAccess(f"http://127.0.0.1:{admin_port}", api_key)
            gateway = GatewayProcess(workdir, config_file=config, port=port)
            await nursery.start(gateway.run)
            url = gateway.url
        elif args.url is None:  # --config: a staging file, started by the simulator
            relay = staging_relay(settings, args.config, ledger, scenario, push_dir)
            auth = settings.auth
            await nursery.start(relay.serve, push_dir)
            port = free_port()
            env = staging_env(relay, settings, args.config, port, workdir, scenario.rules)
            admin_port = free_port()
            env |= {"GATEWAY__ADMIN__PORT": str(admin_port), "GATEWAY__ADMIN__API_KEY": api_key}
            env["GATEWAY__ADMIN__HOST"] = "127.0.0.1"
            admin = AdminAccess(f"http://127.0.0.1:{admin_port}", api_key)
            if settings.store.backend != "sqlite":
                database = None
            gateway = GatewayProcess(workdir, config_file=Path(args.config), port=port, env=env)
            await nursery.start(gateway.run)
            url = gateway.url
        else:  # --url with --config: a running gateway that pushes to our fakes
            relay, ports = running_relay(settings, args.config, ledger, scenario)
            auth = settings.auth
            await nursery.start(
                partial(relay.serve, push_dir, apns_port=ports.apns, fcm_port=ports.fcm)
            )
            url = args.url
            if settings.admin.api_key is not None:
                where = f"http://{settings.admin.host}:{settings.admin.port}"
                admin = AdminAccess(where, settings.admin.api_key)
            sqlite = settings.store.backend == "sqlite" and settings.store.path.is_file()
            database = settings.store.path if sqlite else None

        def token(user: str, device: str) -> str:
            return mint_token(auth, user, device, TOKEN_TTL)

        with _live(run, enabled=not args.no_live) as refresh:
            nursery.start_soon(refresh)
            await simulate(run, relay, url, token, database=database, fault=args.fault, admin=admin)
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _live(run: Run, *, enabled: bool) -> Iterator[Any]:
    """A rich Live panel refreshed from a Trio task (never from another thread)."""
    from rich.console import Console
    from rich.live import Live

    from scripts.simulator.display import live_view

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:

        async def nothing() -> None:
            pass

        yield nothing
        return
    with Live(live_view(run), console=console, auto_refresh=False, transient=False) as live:

        async def refresh() -> None:
            while True:
                live.update(live_view(run), refresh=True)
                await trio.sleep(LIVE_INTERVAL)

        yield refresh
        live.update(live_view(run), refresh=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 lost or undrained, 2 set-up failed)."""
    args = build_parser().parse_args(argv)
    scenario = scenario_from(args)
    from rich.console import Console

    from scripts.simulator.display import print_summary

    if args.write_config is not None:
        return _write_config(args, scenario)
    settings: Settings | None = None
    if args.url is not None and args.config is None:
        print(
            "simulate_idle_devices.py: --url needs --config FILE, the running gateway's "
            "configuration (its [auth] signs the phones' tokens; its push tables must name "
            "this simulator's fakes: write one with --write-config DIR)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.config is not None:
            settings = load_settings(args.config)
            mint_token(settings.auth, "check", "phone", TOKEN_TTL)  # fails early, clearly
    except ConfigError as exc:
        print(f"simulate_idle_devices.py: configuration error: {exc}", file=sys.stderr)
        return 2
    if settings is not None and args.url is not None:
        # The running gateway's own timing decides; the report should say so.
        push = settings.push
        scenario = replace(
            scenario,
            rules=PushRules(push.urgent_cooldown, push.background_cooldown, push.linger),
        )
    raise_fd_limit()
    console = Console()
    run = Run(scenario, Ledger())
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idle-sim-")))
        problems: list[str] = []
        try:
            trio.run(run_scenario, args, run, workdir, settings)
        except* (GatewayError, ProcessFailed) as group:  # a bad set-up, or the gateway failed
            problems = [str(exc) for exc in group.exceptions]
        if problems:
            for problem in problems:
                print(f"simulate_idle_devices.py: {problem}", file=sys.stderr)
            return 2
    summary = run.ledger.summary()
    summary["scenario"] = _scenario_json(scenario)
    summary["faults_injected"] = run.faults
    why = failures(summary)
    summary["ok"] = not why
    summary["failures"] = why
    print_summary(console, summary, why)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot is not None:
        from scripts.simulator.plot import write_plot

        write_plot(run.ledger, scenario, args.plot)
        console.print(f"plot written to {args.plot}")
    return 1 if why else 0


def _write_config(args: argparse.Namespace, scenario: Scenario) -> int:
    directory = args.write_config.resolve()
    config = write_config_dir(
        directory,
        gateway_port=args.gateway_port,
        ports=Ports(args.apns_port, args.fcm_port),
        rules=scenario.rules,
        scenario=scenario,
    )
    print(
        f"wrote fake push credentials and {config}\n"
        f"1. start the gateway:  gateway serve --config {config}\n"
        f"2. then simulate:      python -m scripts.simulate_idle_devices "
        f"--url ws://127.0.0.1:{args.gateway_port}/ws --config {config}"
    )
    return 0


def _scenario_json(scenario: Scenario) -> dict[str, Any]:
    data = asdict(scenario)
    data["reconnect_delay"] = str(scenario.reconnect_delay)
    data["foreground"] = str(scenario.foreground)
    return data


if __name__ == "__main__":
    sys.exit(main())

"""The gateway under simulation: its configuration, and its own OS process.

Without ``--url`` the simulator writes a configuration into its working directory (a fresh
SQLite file, a free loopback port, a random JWT secret, the scenario's short push timing,
and push tables pointing at the simulator's fake APNs and FCM) and runs
``python -m gateway.cli serve --config`` on it. With ``--config FILE`` the same process
runs on the given file instead, with only what must change for the simulation overridden
through ``GATEWAY__*`` environment variables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import trio

from gateway.errors import GatewayError
from scripts.simulator.knobs import PushRules

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class GatewayFailed(GatewayError):
    """The gateway process would not start, or died during the run."""


def scenario_config(
    path: Path, *, port: int, database: Path, jwt_secret: str, rules: PushRules, push_toml: str
) -> Path:
    """Write the configuration of a gateway started by the simulator; return its path."""
    path.write_text(
        "# Written by scripts/simulate_idle_devices.py for one run.\n"
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        "drain_seconds = 0.5\n"
        "shutdown_timeout = 5.0\n"
        "\n[admin]\n"
        "port = 0\n"  # any free port: never in the way of a gateway already running
        "\n[auth]\n"
        f'jwt_secret = "{jwt_secret}"\n'
        "\n[store]\n"
        f'path = "{database}"\n'
        "\n[push]\n"
        f"urgent_cooldown = {rules.urgent_cooldown}\n"
        f"background_cooldown = {rules.background_cooldown}\n"
        f"linger = {rules.linger}\n"
        "request_timeout = 5.0\n"
        "retry_base = 0.2\n"
        "max_retry_delay = 2.0\n"
        "\n[log]\n"
        'level = "warning"\n\n' + push_toml
    )
    return path


def rules_env(rules: PushRules) -> dict[str, str]:
    """`GATEWAY__PUSH__*` overrides that give a gateway the scenario's push timing."""
    return {
        "GATEWAY__PUSH__URGENT_COOLDOWN": str(rules.urgent_cooldown),
        "GATEWAY__PUSH__BACKGROUND_COOLDOWN": str(rules.background_cooldown),
        "GATEWAY__PUSH__LINGER": str(rules.linger),
    }


async def run_gateway(
    config: Path,
    port: int,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``gateway serve --config CONFIG`` until cancelled, then stop it with SIGTERM.

    Reports the process once the port accepts connections.

    Raises:
        GatewayFailed: The process exited before it was ready, or while the run still
            needed it; the message ends with the last lines of its log.
    """
    command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    with log_file.open("wb") as log:
        process = await trio.lowlevel.open_process(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        try:
            with trio.move_on_after(READY_TIMEOUT):
                # Another process: nothing to wait on but its port, polled with a bound.
                while process.poll() is None and not await _accepts(port):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            if process.poll() is not None or not await _accepts(port):
                raise GatewayFailed(f"the gateway did not start:\n{tail(log_file)}")
            task_status.started(process)
            await process.wait()
            raise GatewayFailed(f"the gateway exited ({process.returncode}):\n{tail(log_file)}")
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)


async def _accepts(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def _stop(process: trio.Process) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
    if process.poll() is None:
        process.kill()
        await process.wait()


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file (for error messages)."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""

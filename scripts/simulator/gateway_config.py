"""The configuration of the gateway under simulation.

Without ``--url`` the simulator writes a configuration into its working directory (a fresh
SQLite file, a free loopback port, a random JWT secret, the scenario's short push timing,
and push tables pointing at the simulator's fakes) and runs the gateway on it in its own
process (`scripts.kit.gateway_process`). With ``--config FILE`` that process runs on the
given file instead, with only what must change for the simulation overridden through
``GATEWAY__*`` environment variables.
"""

from __future__ import annotations

from pathlib import Path

from scripts.simulator.knobs import PushRules


def scenario_config(
    path: Path,
    *,
    port: int,
    database: Path,
    jwt_secret: str,
    rules: PushRules,
    push_toml: str,
    admin_port: int = 0,
    api_key: str | None = None,
) -> Path:
    """Write the configuration of a gateway started by the simulator; return its path.
    With `api_key`, the backend API (on `admin_port`) is on, for setting up groups."""
    admin = f"port = {admin_port}\n" + (f'api_key = "{api_key}"\n' if api_key else "")
    path.write_text(
        "# Written by scripts/simulate_idle_devices.py for one run.\n"
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        "drain_seconds = 0.5\n"
        "shutdown_timeout = 5.0\n"
        "\n[admin]\n"
        f"{admin}"  # port 0 by default: any free port, never in the way of another gateway
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

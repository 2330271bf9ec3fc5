"""Configuration: TOML files, environment overrides, and validation that names file and key.

A plain `gateway serve` runs on the defaults below (the embedded profile: a SQLite file,
loopback ports, a development JWT secret and the `log` push provider). A file only needs
the keys it changes. Any key may also be set from the environment as
``GATEWAY__<SECTION>__<KEY>`` (``GATEWAY__PUSH__APNS__TOPIC``); the value is read as a TOML
value when it parses as one (``9000``, ``true``, ``"x"``) and as a plain string otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ConfigError

# The [push] section's types belong to push; they are named here with the other sections.
from push.settings import PushSettings
from push.subscription import HostPolicy, SubscriptionError

ENV_PREFIX = "GATEWAY__"
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-before-production"


@dataclass(frozen=True)
class ServerSettings:
    """`[server]`: the device-facing WebSocket listener."""

    host: str = "127.0.0.1"
    port: int = 8765
    max_message_size: int = 64 * 1024
    heartbeat: float = 30.0
    hello_timeout: float = 10.0
    handshake_timeout: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_watch: float = 60.0
    max_ttl: int = 30 * 24 * 3600
    outbox_limit: int = 512
    write_timeout: float = 15.0
    max_bad_frames: int = 10
    drain_seconds: float = 5.0
    shutdown_timeout: float = 15.0
    overload_lag: float = 0.25


@dataclass(frozen=True)
class AuthSettings:
    """`[auth]`: how `hello` tokens are verified."""

    jwt_secret: str = DEV_JWT_SECRET
    jwt_public_key_file: Path | None = None
    jwt_private_key_file: Path | None = None
    jwt_algorithm: str = "HS256"
    token_ttl: int = 24 * 3600


@dataclass(frozen=True)
class StoreSettings:
    """`[store]`: where queued items live."""

    backend: str = "sqlite"
    path: Path = Path("gateway.db")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False  # redis_url names one node of a Redis Cluster
    redis_replicas: int = 0  # replicas that must have a write before it is acknowledged
    redis_replica_timeout: float = 1.0  # seconds to wait for them (WAIT)
    synchronous: str = "full"
    max_batch: int = 512
    sweep_interval: float = 30.0


@dataclass(frozen=True)
class ClusterSettings:
    """`[cluster]`: how nodes sharing Redis (``[store] backend = "redis"``) track devices."""

    node_ttl: float = 30.0  # a dead node's devices count as connected for at most this long
    catchup_interval: float = 30.0  # seconds between re-reads that catch lost doorbells


@dataclass(frozen=True)
class AdminSettings:
    """`[admin]`: the admin and backend HTTP API."""

    host: str = "127.0.0.1"
    port: int = 8766
    api_key: str | None = None
    system_user: str = "system"
    system_device: str = "server"


@dataclass(frozen=True)
class LimitsSettings:
    """`[limits]`: admission control and per-device rate limits. 0 switches a limit off."""

    max_connections: int = 0
    max_connections_per_ip: int = 0
    handshake_rate: float = 0.0
    handshake_burst: int = 1000
    retry_after: int = 5
    allowed_origins: str = ""
    send_rate: float = 0.0
    send_burst: int = 200
    rate_limit_strikes: int = 100

    @property
    def origins(self) -> frozenset[str]:
        """The `allowed_origins` list (comma-separated); empty allows any `Origin`."""
        entries = (o.strip().rstrip("/") for o in self.allowed_origins.split(","))
        return frozenset(o for o in entries if o)


@dataclass(frozen=True)
class GroupsSettings:
    """`[groups]`: server-side group fan-out (membership through the backend API)."""

    max_members: int = 1024


@dataclass(frozen=True)
class PresenceSettings:
    """`[presence]`: batching and the offline grace period."""

    batch_ms: int = 250
    offline_grace: float = 5.0
    max_watch: int = 1000


@dataclass(frozen=True)
class LogSettings:
    """`[log]`: level and format."""

    level: str = "info"
    format: str = "text"
    modules: str = ""

    @property
    def module_levels(self) -> dict[str, str]:
        """`modules` as {logger name: level}, from ``"gateway.connection=debug,push=warning"``."""
        return parse_module_levels(self.modules)


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_module_levels(text: str) -> dict[str, str]:
    """Parse ``"name=level,name=level"``.

    Raises:
        ValueError: An entry is not ``name=level`` or names an unknown level.
    """
    levels: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, level = entry.partition("=")
        level = level.strip().lower()
        if not sep or not name.strip() or level not in LOG_LEVELS:
            raise ValueError(f"{entry!r} is not <logger>=<{'|'.join(LOG_LEVELS)}>")
        levels[name.strip()] = level
    return levels


@dataclass(frozen=True)
class Settings:
    """The whole configuration. `Settings()` is the embedded default profile."""

    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    groups: GroupsSettings = field(default_factory=GroupsSettings)
    push: PushSettings = field(default_factory=PushSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def replace(self, **sections: Any) -> Settings:
        """Return a copy with whole sections or single keys replaced.

        ``settings.replace(server={"port": 0})`` changes one key of one section.
        """
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = (
                dataclasses.replace(current, **value) if isinstance(value, Mapping) else value
            )
        return dataclasses.replace(self, **changes)


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("auth", "jwt_algorithm"): ("HS256", "ES256", "RS256"),
    ("store", "backend"): ("sqlite", "redis", "memory"),
    ("store", "synchronous"): ("normal", "full"),
    ("log", "level"): LOG_LEVELS,
    ("log", "format"): ("text", "json"),
}
# Paths that must name a readable file when set. `store.path` is created on demand.
_MUST_EXIST = {
    "tls_cert",
    "tls_key",
    "jwt_public_key_file",
    "jwt_private_key_file",
    "key_file",
    "cert_file",
    "ca_file",
    "service_account_file",
    "vapid_private_key_file",
}
_POSITIVE = {
    "max_message_size",
    "heartbeat",
    "hello_timeout",
    "handshake_timeout",
    "max_ttl",
    "outbox_limit",
    "write_timeout",
    "max_bad_frames",
    "max_batch",
    "sweep_interval",
    "token_ttl",
    "shutdown_timeout",
    "ttl",
    "workers",
    "queue_size",
    "max_attempts",
    "retry_base",
    "max_retry_delay",
    "request_timeout",
    "alert_retry",
    "ack_timeout",
    "clear_cooldown",
    "overload_lag",
    "max_watch",
    "node_ttl",
    "catchup_interval",
    "handshake_burst",
    "retry_after",
    "send_burst",
    "rate_limit_strikes",
    "max_members",
    "redis_replica_timeout",
}
# Limits where 0 means "off" (or, for max_connections, "derived from the open-file limit").
_NOT_NEGATIVE = {
    "tls_watch",
    "drain_seconds",
    "max_connections",
    "max_connections_per_ip",
    "handshake_rate",
    "send_rate",
    "alert_retries",
    "background_per_hour",
    "redis_replicas",
}


def load_settings(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from an optional TOML file plus environment overrides.

    Args:
        path: A TOML file, or None for the embedded defaults.
        env: The environment to read ``GATEWAY__`` overrides from (default: ``os.environ``).

    Returns:
        The validated settings. Relative paths are resolved against the file's directory.

    Raises:
        ConfigError: The file is missing or malformed, or a key is unknown, ill-typed, out
            of range, or names a credentials file that cannot be read. The message names
            the file (or environment variable) and the key.
    """
    env = os.environ if env is None else env
    source = "<defaults>"
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        source = str(file)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        base = file.resolve().parent
    origins: dict[tuple[str, ...], str] = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            _set_override(raw, keys, _parse_env_value(value), name)
            origins[keys] = name
    settings: Settings = _build(Settings, raw, (), source, origins, base)
    _check_consistency(settings, source)
    return settings


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_override(raw: dict[str, Any], keys: tuple[str, ...], value: Any, origin: str) -> None:
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"{origin}: expected GATEWAY__<SECTION>__<KEY>")
    table = raw
    for key in keys[:-1]:
        nested = table.setdefault(key, {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{origin}: [{key}] is not a table")
        table = nested
    table[keys[-1]] = value


def _build(
    cls: type[Any],
    raw: Mapping[str, Any],
    where: tuple[str, ...],
    source: str,
    origins: Mapping[tuple[str, ...], str],
    base: Path,
) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = (*where, key)
        origin = origins.get(path) or next(
            (name for keys, name in origins.items() if keys[: len(path)] == path), source
        )
        if key not in fields:
            raise ConfigError(f"{origin}: unknown key {_name(path)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {_name(path)} must be a table")
            values[key] = _build(hint, value, path, source, origins, base)  # type: ignore[arg-type]
        else:
            values[key] = _coerce(hint, value, path, origin, base)
    return cls(**values)


def _coerce(hint: Any, value: Any, path: tuple[str, ...], origin: str, base: Path) -> Any:
    name = _name(path)
    key = path[-1]
    if typing.get_origin(hint) is tuple:
        return _string_list(value, name, origin)
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    inner = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if optional and value == "":
        return None
    expected = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        Path: "a file path",
    }[inner]
    ok = (
        isinstance(value, str)
        if inner in (str, Path)
        else isinstance(value, bool)
        if inner is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if inner is int
        else isinstance(value, int | float) and not isinstance(value, bool)
    )
    if not ok:
        raise ConfigError(f"{origin}: {name} must be {expected}, not {type(value).__name__}")
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"{origin}: {name} must be positive, not {value}")
    if key in _NOT_NEGATIVE and value < 0:
        raise ConfigError(f"{origin}: {name} must be 0 (off) or more, not {value}")
    if key == "batch_ms" and value < 0:
        raise ConfigError(f"{origin}: {name} must be 0 (no batching) or more, not {value}")
    if key == "port" and not 0 <= value <= 65535:
        raise ConfigError(f"{origin}: {name} must be a port number (0-65535), not {value}")
    choices = _CHOICES.get((path[0], key)) if len(path) == 2 else None
    if choices is not None:
        value = value.upper() if choices[0].isupper() else value.lower()
        if value not in choices:
            raise ConfigError(f"{origin}: {name} must be one of {', '.join(choices)}")
    if inner is float:
        return float(value)
    if inner is Path:
        resolved = Path(value).expanduser()
        resolved = resolved if resolved.is_absolute() else base / resolved
        if key in _MUST_EXIST:
            if not resolved.is_file():
                raise ConfigError(f"{origin}: {name}: file not found: {resolved}")
            if not os.access(resolved, os.R_OK):
                raise ConfigError(f"{origin}: {name}: file not readable: {resolved}")
        return resolved
    return value


def _string_list(value: Any, name: str, origin: str) -> tuple[str, ...]:
    """A list of strings: a TOML array, or one comma-separated string (from the environment)."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{origin}: {name} must be an array of strings")
    return tuple(v.strip() for v in value if v.strip())


def _check_consistency(settings: Settings, source: str) -> None:
    server, auth, apns = settings.server, settings.auth, settings.push.apns
    try:
        settings.log.module_levels  # noqa: B018
    except ValueError as exc:
        raise ConfigError(f"{source}: [log] modules: {exc}") from None
    if server.drain_seconds >= server.shutdown_timeout:
        raise ConfigError(
            f"{source}: [server] drain_seconds ({server.drain_seconds}) must be less than "
            f"shutdown_timeout ({server.shutdown_timeout})"
        )
    store = settings.store
    if store.redis_cluster and store.backend != "redis":
        raise ConfigError(f'{source}: [store] redis_cluster needs backend = "redis"')
    if store.redis_replicas and store.backend != "redis":
        raise ConfigError(f'{source}: [store] redis_replicas needs backend = "redis"')
    if store.redis_cluster and urlsplit(store.redis_url).path.strip("/") not in ("", "0"):
        raise ConfigError(
            f"{source}: [store] redis_url: Redis Cluster has only database 0, "
            f"not {urlsplit(store.redis_url).path.strip('/')!r}"
        )
    if (server.tls_cert is None) != (server.tls_key is None):
        raise ConfigError(f"{source}: [server] tls_cert and tls_key must be set together")
    if auth.jwt_algorithm != "HS256" and auth.jwt_public_key_file is None:
        raise ConfigError(
            f"{source}: [auth] jwt_public_key_file is required with jwt_algorithm = "
            f"{auth.jwt_algorithm!r}"
        )
    if apns.key_file is not None and not (apns.key_id and apns.team_id):
        raise ConfigError(f"{source}: [push.apns] key_file needs key_id and team_id")
    if (apns.key_file or apns.cert_file) and not apns.topic:
        raise ConfigError(f"{source}: [push.apns] topic is required with APNs credentials")
    for label, url in (
        ("[push.apns] endpoint", apns.endpoint),
        ("[push.fcm] endpoint", settings.push.fcm.endpoint),
    ):
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: {label} must start with http:// or https://")
    _check_webpush(settings, source)


def _check_webpush(settings: Settings, source: str) -> None:
    webpush = settings.push.webpush
    try:
        HostPolicy(webpush.allowed_hosts)
    except SubscriptionError as exc:
        raise ConfigError(f"{source}: [push.webpush] allowed_hosts: {exc}") from None
    if webpush.subject is not None and not webpush.subject.startswith(("mailto:", "https://")):
        raise ConfigError(
            f"{source}: [push.webpush] subject must be a mailto: or https:// URL "
            f"(the push services' contact for this server)"
        )
    if webpush.vapid_private_key_file is not None and not webpush.subject:
        raise ConfigError(
            f"{source}: [push.webpush] subject is required with vapid_private_key_file"
        )


def _name(path: tuple[str, ...]) -> str:
    return f"[{'.'.join(path[:-1])}] {path[-1]}" if len(path) > 1 else f"[{path[0]}]"


def masked_url(url: str) -> str:
    """`url` with its credentials (user and password) masked, for logs and summaries."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"

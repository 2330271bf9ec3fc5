"""Logging set-up: text or JSON lines on stderr, per-logger levels, connection context.

Every record logged from inside a connection's tasks carries that connection's id and,
once `hello` is accepted, its user and device: `bind_connection` puts them in a context
variable that Trio copies into the tasks the connection starts, and `ContextFilter` adds
them to each record. JSON lines hold them as fields (``"conn"``, ``"user"``,
``"device"``); text lines keep their usual shape. Message bodies and tokens are never
logged anywhere in the gateway; nothing here adds them.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

from gateway.settings import Settings

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "gateway_log_context", default=None
)
_FIELDS = ("conn", "user", "device")


def bind_connection(conn_id: int) -> dict[str, Any]:
    """Tag the current task's records (and those of tasks it starts) with a connection id.

    Returns:
        The context, to which the caller adds ``user`` and ``device`` once known.
    """
    context: dict[str, Any] = {"conn": conn_id}
    _context.set(context)
    return context


def rebind(context: dict[str, Any]) -> None:
    """Tag the current task's records with a connection's context, as `bind_connection`
    returned it (for a task that works for a connection but was started by another)."""
    _context.set(context)


class ContextFilter(logging.Filter):
    """Adds the current connection's fields, and the worker number, to every record."""

    def __init__(self, worker: int = 0) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate `record`; never drops it."""
        context = _context.get()
        for name in _FIELDS:
            setattr(record, name, context.get(name) if context else None)
        record.worker = self.worker
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the context fields set."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in (*_FIELDS, "worker"):
            value = getattr(record, name, None)
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings, *, worker: int = 0) -> None:
    """Set up root logging from `[log]`: a level, per-logger levels from `modules`, and
    text or JSON lines on stderr. Lines of worker K of ``--workers N`` say which."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter(worker))
    if settings.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = f"[worker {worker}] " if worker else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        )
    logging.basicConfig(level=settings.log.level.upper(), handlers=[handler], force=True)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    logging.getLogger("coredis").setLevel(logging.WARNING)  # the gateway logs Redis outages
    for name, level in settings.log.module_levels.items():
        logging.getLogger(name).setLevel(level.upper())

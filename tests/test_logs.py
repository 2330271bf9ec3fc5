"""Structured logs: connection context on every record, JSON lines, per-logger levels,
and never a body or a token."""

from __future__ import annotations

import io
import json
import logging

import pytest
import trio

from gateway.auth import mint_token
from gateway.errors import ConfigError
from gateway.logs import ContextFilter, JsonFormatter, configure_logging
from gateway.settings import Settings, load_settings
from tests.conftest import make_settings, running_server
from tests.rawws import hello, raw_ws, recv_until, send

SECRET_BODY = b"\x00very-secret-ciphertext\x00"


@pytest.fixture
def json_lines():
    """JSON log lines of the `gateway` loggers, at debug level, as parsed dicts."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter(worker=3))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gateway")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_connection_records_carry_conn_user_and_device_and_no_secrets(tmp_path, json_lines):
    settings = make_settings(tmp_path, limits={"send_rate": 0.001, "send_burst": 1})
    bob_token = mint_token(settings.auth, "bob", "phone")
    alice_token = mint_token(settings.auth, "alice", "tablet")
    async with running_server(settings) as server:
        async with raw_ws(server.url) as bob, raw_ws(server.url) as alice:
            await hello(bob, bob_token)
            await hello(alice, alice_token)
            for i in range(2):  # the second is rate limited, and says so in the log
                await send(alice, {"t": "send", "id": f"m{i}", "to": "bob", "body": SECRET_BODY})
            await recv_until(alice, "error")
            await send(alice, {"t": "hello", "v": 1, "token": "x.y.z"})  # a bad frame
            await recv_until(alice, "error")
        with trio.fail_after(10):
            while len(server.edge.connections):
                await trio.sleep(0.01)

    lines = json_lines()
    authenticated = [e for e in lines if "authenticated" in e["msg"]]
    assert {(e["user"], e["device"]) for e in authenticated} == {
        ("bob", "phone"),
        ("alice", "tablet"),
    }
    assert all(isinstance(e["conn"], int) and e["worker"] == 3 for e in authenticated)
    assert all(e["level"] == "info" and e["logger"] == "gateway.connection" for e in authenticated)
    text = "\n".join(json.dumps(e) for e in lines)
    assert "very-secret-ciphertext" not in text
    assert bob_token not in text and alice_token not in text
    assert bob_token.split(".")[2] not in text  # not even the signature


def test_per_logger_levels_come_from_config(tmp_path):
    config = tmp_path / "g.toml"
    config.write_text(
        '[log]\nlevel = "warning"\nformat = "json"\n'
        'modules = "gateway.connection=debug, push = error"\n',
        encoding="utf-8",
    )
    settings = load_settings(config, env={})
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging(settings)
        assert root.level == logging.WARNING
        assert logging.getLogger("gateway.connection").level == logging.DEBUG
        assert logging.getLogger("push").level == logging.ERROR
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("gateway.connection").setLevel(logging.NOTSET)
        logging.getLogger("push").setLevel(logging.NOTSET)


@pytest.mark.parametrize("modules", ["gateway", "gateway=loud", "=debug"])
def test_a_bad_module_level_names_the_key(tmp_path, modules):
    config = tmp_path / "g.toml"
    config.write_text(f'[log]\nmodules = "{modules}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[log\] modules"):
        load_settings(config, env={})


def test_records_outside_a_connection_have_no_connection_fields():
    record = logging.LogRecord("gateway.server", logging.INFO, __file__, 1, "hi", (), None)
    ContextFilter().filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry == {"ts": entry["ts"], "level": "info", "logger": "gateway.server", "msg": "hi"}
    assert Settings().log.module_levels == {}

"""`[store] backend = "memory"`: the real gateway on a store that is not durable, for tests
and benchmarks; one process only."""

from __future__ import annotations

import os

import pytest

from gateway.cli import main
from gateway.client import connect
from gateway.store.memory import MemoryStore
from tests.conftest import make_settings, running_server


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("GATEWAY__"):
            monkeypatch.delenv(name)


def test_check_config_accepts_it_and_says_it_is_not_durable(tmp_path, capsys):
    path = tmp_path / "memory.toml"
    path.write_text('[store]\nbackend = "memory"\n', encoding="utf-8")

    assert main(["check-config", str(path)]) == 0
    assert "NOT durable" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_it_is_refused_with_several_workers(tmp_path, capsys, command):
    path = tmp_path / "memory.toml"
    path.write_text('[server]\nport = 9999\n[store]\nbackend = "memory"\n', encoding="utf-8")
    argv = [command, str(path)] if command == "check-config" else [command, "--config", str(path)]

    assert main([*argv, "--workers", "2"]) == 2

    err = capsys.readouterr().err
    assert str(path) in err
    assert '--workers 2 needs [store] backend = "redis"' in err and "memory" in err


def test_check_config_accepts_several_workers_on_redis(tmp_path, capsys):
    path = tmp_path / "redis.toml"
    path.write_text('[server]\nport = 9999\n[store]\nbackend = "redis"\n', encoding="utf-8")

    assert main(["check-config", str(path), "--workers", "4"]) == 0


async def test_the_gateway_routes_messages_and_receipts_on_it(tmp_path, token):
    settings = make_settings(tmp_path, store={"backend": "memory"})
    async with running_server(settings) as server:
        assert isinstance(server.store, MemoryStore)
        async with connect(server.url, token("bob", "phone")) as bob:
            await bob.wait_drained()
            async with connect(server.url, token("alice", "phone")) as alice:
                sent = await alice.send("bob", b"hi")
                delivery = await bob.next_delivery()
                assert delivery.frame["id"] == sent.id and delivery.frame["body"] == b"hi"
                receipt = await alice.next_delivery()
                assert receipt.frame["t"] == "receipt" and receipt.frame["ids"] == [sent.id]
    assert not (tmp_path / "gateway.db").exists()  # nothing written to disk

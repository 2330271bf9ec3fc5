"""The SQLite disk fills up, or is read-only: a clear error, never a false `sent`.

A small tmpfs is mounted for the store (root only, as in CI; skipped elsewhere). Filling it
makes SQLite's commits fail for real, with ENOSPC from the kernel; remounting it read-only
makes the file unopenable for writing.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.client import SendRefused, connect
from tests.conftest import make_settings, running_server

DISK = "2m"
BODY = b"x" * 16_000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; return it."""
    filler = directory / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


async def test_a_full_disk_refuses_sends_clearly_and_recovers_when_space_returns(
    small_disk, token, caplog
):
    caplog.set_level(logging.ERROR, logger="gateway.store.sqlite")
    settings = make_settings(small_disk, store={"path": small_disk / "gateway.db"})
    outcomes: dict[str, str] = {}
    async with running_server(settings) as server:
        async with connect(server.url, token("bob", "phone")):
            pass
        async with connect(server.url, token("alice", "phone")) as alice:
            await alice.send("bob", BODY, id="before")
            outcomes["before"] = "sent"
            filler = fill(small_disk)
            for n in range(40):
                msg_id = f"full-{n}"
                try:
                    await alice.send("bob", BODY, id=msg_id)
                    outcomes[msg_id] = "sent"
                except SendRefused as refused:
                    assert refused.code == "internal"
                    assert refused.frame["reason"] == "store unavailable; not stored"
                    outcomes[msg_id] = "refused"
            filler.unlink()
            await alice.send("bob", BODY, id="after")  # space is back: service resumes
            outcomes["after"] = "sent"
        async with connect(server.url, token("bob", "phone")) as bob:
            await bob.wait_drained()
            received = [d.frame["id"] for d in bob.take_buffered() if d.is_message]

    refused = [i for i, o in outcomes.items() if o == "refused"]
    assert refused, "the disk never filled up"
    # No false `sent`: everything acknowledged arrives; nothing refused does.
    assert received == [i for i, o in outcomes.items() if o == "sent"]
    assert any("disk is full" in r.getMessage() for r in caplog.records)


async def test_a_read_only_store_stops_the_gateway_at_start_with_a_clear_error(small_disk):
    config = small_disk.parent / "gateway.toml"
    config.write_text(
        f'[server]\nport = 0\n[store]\npath = "{small_disk / "gateway.db"}"\n', encoding="utf-8"
    )
    existing = sqlite3.connect(small_disk / "gateway.db")  # a store from an earlier run
    existing.execute("PRAGMA journal_mode = WAL")
    existing.close()
    await trio.run_process(["mount", "-o", "remount,ro", str(small_disk)])

    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
            capture_stderr=True,
            check=False,
        )

    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"gateway: {small_disk / 'gateway.db'}: cannot open the store")
    assert "read-only file system" in last

"""The wake-up policy lab runs the real policy and tells the policies apart."""

from __future__ import annotations

import json
from pathlib import Path

from scripts import wake_lab
from scripts.wakelab.world import Knobs, World


def test_the_new_policy_keeps_the_background_budget_and_rescues_urgent_items() -> None:
    knobs = Knobs(devices=400, hours=3, seed=3)
    v1 = wake_lab.summarize(knobs, World(knobs, "v1").run(), 0.0)
    new = wake_lab.summarize(knobs, World(knobs, "new").run(), 0.0)

    assert v1["max_background_in_an_hour"] > 3  # reconnects reset v1's cooldowns
    assert new["max_background_in_an_hour"] <= 3
    assert new["urgent_within_60s"] > v1["urgent_within_60s"]  # retries and rescues
    assert new["pushes_by_kind"].get("alert:retry", 0) > 0
    assert "alert:retry" not in v1["pushes_by_kind"]


def test_a_run_is_reproducible_by_its_seed() -> None:
    knobs = Knobs(devices=200, hours=1, seed=11)
    first = wake_lab.summarize(knobs, World(knobs, "new").run(), 0.0)
    again = wake_lab.summarize(knobs, World(knobs, "new").run(), 0.0)
    assert first == again


def test_the_command_prints_the_table_and_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "lab.json"
    argv = ["--devices", "150", "--hours", "1", "--policies", "v1,signal", "--json", str(out)]
    assert wake_lab.main(argv) == 0

    text = capsys.readouterr().out
    assert "urgent delivered within 60 s" in text and "signal" in text
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"v1", "signal"}
    assert data["knobs"]["devices"] == 150

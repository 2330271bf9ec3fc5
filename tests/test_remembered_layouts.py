"""`python -m scripts.remembered_layouts` runs end to end on a small scale."""

from __future__ import annotations

import re

from scripts import remembered_layouts
from tests.redisproc import redis_binary


def test_it_reports_every_layout_and_the_packed_one_is_smallest_but_for_sets(capsys):
    redis_binary()  # skips where redis-server is missing
    args = ["--messages", "300", "--users", "2", "--lookups", "20"]
    assert remembered_layouts.main(args) == 0

    out = capsys.readouterr().out
    sizes = {m[1]: float(m[2]) for m in re.finditer(r"^(\S+)\s+([\d.]+)\s", out, re.M)}
    assert set(sizes) == set(remembered_layouts.LOOKUPS)
    assert sizes["packed"] < 64 < sizes["keys"]

"""`python -m scripts.redis_footprint` runs end to end on a small scale."""

from __future__ import annotations

import re

from scripts import redis_footprint
from tests.redisproc import redis_binary


def test_it_reports_memory_per_queued_and_per_remembered_message(capsys):
    redis_binary()  # skips where redis-server is missing
    assert redis_footprint.main(["--messages", "300", "--senders", "3", "--body", "1000"]) == 0

    out = capsys.readouterr().out
    queued = float(re.search(r"queued \(body 1000 B\)\s+([\d,.]+)", out)[1].replace(",", ""))
    kept = float(re.search(r"remembered after ack\s+([\d,.]+)", out)[1].replace(",", ""))
    assert queued > 1000  # the body is in the queue
    assert 0 < kept < queued - 1000 + 1  # what stays after the ack holds no body


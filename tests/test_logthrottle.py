"""The log throttle: one line per interval, with a count of what was held back."""

from __future__ import annotations

import logging

import trio

from gateway.errors import StoreError
from gateway.logthrottle import LogThrottle
from gateway.router import STORE_LOG_INTERVAL, Router


def test_first_occurrence_goes_through():
    assert LogThrottle(10.0).take(0.0) == 0


def test_repeats_within_the_interval_are_held_back_and_counted():
    throttle = LogThrottle(10.0)
    throttle.take(100.0)

    quiet = [throttle.take(100.0 + t) for t in (1.0, 2.0, 9.9)]

    assert quiet == [None, None, None]
    assert throttle.take(110.0) == 3


def test_the_count_starts_again_after_each_line():
    throttle = LogThrottle(1.0)
    throttle.take(0.0)
    throttle.take(0.5)
    assert throttle.take(1.0) == 1
    assert throttle.take(2.0) == 0


async def test_a_store_outage_is_logged_once_per_interval_with_a_count(autojump_clock, caplog):
    # Every operation of every connection fails while the store is down; the log says so
    # once per interval instead of once per operation, and each answer is still an error.
    router = Router(None, None, None, None, clock=lambda: 0, max_ttl=60)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="gateway.router")

    answers = [router._store_failed(str(i), StoreError("redis is unavailable")) for i in range(50)]
    await trio.sleep(STORE_LOG_INTERVAL)
    router._store_failed("last", StoreError("redis is unavailable"))

    assert all(a["t"] == "error" and a["code"] == "internal" for a in answers)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.router"]
    assert len(lines) == 2
    assert "redis is unavailable" in lines[0] and "more" not in lines[0]
    assert "(49 more store failures since the last report)" in lines[1]

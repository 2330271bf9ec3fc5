"""Token bucket, send limiter, admission control and the drain plan, on a fake clock."""

from __future__ import annotations

import random

import pytest

from gateway.admission import Admission
from gateway.drain import drain_plan, parse_reconnect_hint
from gateway.ratelimit import SendLimiter, SendVerdict, TokenBucket
from gateway.settings import LimitsSettings

# -- token bucket ---------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)

    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert not bucket.take(0.5)


def test_a_bucket_never_holds_more_than_its_burst():
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)

    assert bucket.tokens(1000.0) == 2
    assert [bucket.take(1000.0) for _ in range(3)] == [True, True, False]


def test_a_bucket_of_rate_zero_is_unlimited():
    bucket = TokenBucket(rate=0.0, burst=1, now=0.0)

    assert all(bucket.take(0.0) for _ in range(10_000))
    assert bucket.wait_time(0.0) == 0


def test_a_clock_going_backwards_adds_no_tokens():
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)

    assert not bucket.take(5.0)
    assert bucket.take(11.0)


# -- send limiter ---------------------------------------------------------------------------


def test_sends_over_the_rate_are_limited_then_persistent_abuse_is_detected():
    limiter = SendLimiter(rate=1.0, burst=2, strikes=3, now=0.0)

    verdicts = [limiter.check(0.0) for _ in range(6)]

    assert verdicts == [SendVerdict.ALLOW] * 2 + [SendVerdict.LIMITED] * 3 + [SendVerdict.ABUSE]


def test_a_client_that_slows_down_after_rate_limited_is_forgiven():
    limiter = SendLimiter(rate=1.0, burst=1, strikes=2, now=0.0)
    assert limiter.check(0.0) is SendVerdict.ALLOW
    assert limiter.check(0.0) is SendVerdict.LIMITED
    assert limiter.check(0.0) is SendVerdict.LIMITED

    # Ten seconds at the allowed pace: every send passes and the strikes come back.
    for t in range(1, 11):
        assert limiter.check(float(t)) is SendVerdict.ALLOW
    assert limiter.check(10.0) is SendVerdict.LIMITED
    assert limiter.check(10.0) is SendVerdict.LIMITED
    assert limiter.check(10.0) is SendVerdict.ABUSE


# -- admission --------------------------------------------------------------------------------


def limits(**kw: object) -> LimitsSettings:
    base = {"max_connections": 1000}
    base.update(kw)
    return LimitsSettings(**base)  # type: ignore[arg-type]


def test_the_global_cap_refuses_with_503_and_counts_until_a_place_is_released():
    admission = Admission(limits(max_connections=2), now=0.0, rng=random.Random(1))

    assert admission.admit("10.0.0.1", None, 0.0) is None
    assert admission.admit("10.0.0.2", None, 0.0) is None
    refusal = admission.admit("10.0.0.3", None, 0.0)

    assert refusal is not None
    assert (refusal.status, refusal.reason) == (503, "max_connections")
    assert 5 <= int(dict(refusal.headers())[b"retry-after"]) <= 10
    assert admission.refused == {"max_connections": 1}
    admission.release("10.0.0.1")
    assert admission.admit("10.0.0.3", None, 0.0) is None
    assert admission.open == 2


def test_the_per_ip_cap_counts_each_address_separately():
    admission = Admission(limits(max_connections_per_ip=2), now=0.0)

    assert admission.admit("10.0.0.1", None, 0.0) is None
    assert admission.admit("10.0.0.1", None, 0.0) is None
    refused = admission.admit("10.0.0.1", None, 0.0)
    assert refused is not None and refused.reason == "max_connections_per_ip"
    assert admission.admit("10.0.0.2", None, 0.0) is None

    admission.release("10.0.0.1")
    assert admission.connections_from("10.0.0.1") == 1
    assert admission.admit("10.0.0.1", None, 0.0) is None


def test_the_handshake_rate_refuses_a_burst_and_recovers_with_time():
    admission = Admission(limits(handshake_rate=10.0, handshake_burst=3), now=0.0)

    results = [admission.admit(f"10.0.0.{i}", None, 0.0) for i in range(5)]

    assert results[:3] == [None, None, None]
    assert [r.reason for r in results[3:] if r] == ["handshake_rate"] * 2
    assert admission.admit("10.0.0.9", None, 0.1) is None


def test_the_origin_allowlist_refuses_other_browsers_with_403_but_not_native_clients():
    admission = Admission(limits(allowed_origins="https://app.example.com, https://x.io/"), now=0)

    assert admission.admit("10.0.0.1", "https://app.example.com", 0.0) is None
    assert admission.admit("10.0.0.1", "https://x.io", 0.0) is None
    assert admission.admit("10.0.0.1", None, 0.0) is None  # apps send no Origin
    refusal = admission.admit("10.0.0.1", "https://evil.example", 0.0)
    assert refusal is not None and (refusal.status, refusal.headers()) == (403, [])
    assert admission.refused == {"origin": 1}


def test_retry_after_is_jittered_so_refused_clients_spread_out():
    admission = Admission(limits(max_connections=1, retry_after=5), now=0.0, rng=random.Random(7))
    admission.admit("a", None, 0.0)

    seen = set()
    for _ in range(50):
        refusal = admission.admit("b", None, 0.0)
        assert refusal is not None and refusal.retry_after is not None
        seen.add(refusal.retry_after)
    assert min(seen) >= 5 and max(seen) <= 10 and len(seen) > 3


# -- drain plan -------------------------------------------------------------------------------


def test_the_drain_plan_spreads_closes_over_drain_seconds_in_random_order():
    targets = list(range(100))
    plan = drain_plan(targets, 10.0, random.Random(3))

    assert sorted(step.target for step in plan) == targets
    assert [step.target for step in plan] != targets
    offsets = [step.offset for step in plan]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0 and offsets[-1] < 10.0
    assert offsets[50] == pytest.approx(5.0)
    hints = [step.reconnect_after_ms for step in plan]
    assert all(0 <= h < 10_000 for h in hints) and len(set(hints)) > 90


def test_the_reconnect_hint_round_trips_through_the_close_reason():
    (step,) = drain_plan(["c"], 0.0, random.Random(1))

    assert step.offset == 0
    assert len(step.reason.encode()) <= 123  # a close reason's limit
    assert parse_reconnect_hint(step.reason) == step.reconnect_after_ms / 1000
    assert parse_reconnect_hint("server restarting") is None
    assert parse_reconnect_hint(None) is None
    assert parse_reconnect_hint("restarting; reconnect_after_ms=abc") is None

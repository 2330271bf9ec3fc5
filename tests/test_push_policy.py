"""The wake-up policy as plain code: a fake clock, no Trio, no sockets."""

from __future__ import annotations

import itertools

import pytest

from push.policy import (
    ALERT_MEMORY,
    STALE_TIMER_SLACK,
    LingerCheck,
    WakeKind,
    WakePolicy,
    WakeRules,
    WakeUp,
)

ALERT, BACKGROUND = WakeKind.ALERT, WakeKind.BACKGROUND
# The rules of protocol v1 before alert retries and the background budget: the tests
# up to the retry section check them alone.
RULES = WakeRules(
    urgent_cooldown=10.0,
    background_cooldown=1200.0,
    linger=60.0,
    alert_retries=0,
    background_per_hour=0,
)
DEFAULTS = WakeRules()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy(clock: Clock) -> WakePolicy:
    return WakePolicy(RULES, clock)


def advance(policy: WakePolicy, clock: Clock, seconds: float) -> list[WakeUp | LingerCheck]:
    """Move the clock forward, firing timers in order as the driver would."""
    end = clock.now + seconds
    fired: list[WakeUp | LingerCheck] = []
    while (deadline := policy.next_deadline()) is not None and deadline <= end:
        clock.now = max(clock.now, deadline)
        fired.extend(policy.due())
    clock.now = end
    return fired


def test_an_urgent_message_gets_an_alert_at_once(policy: WakePolicy) -> None:
    assert policy.stored("bob", "phone", urgent=True) == WakeUp("bob", "phone", ALERT, "urgent")


def test_urgent_messages_within_the_cooldown_coalesce_into_one_trailing_alert(
    policy: WakePolicy, clock: Clock
) -> None:
    assert policy.stored("bob", "phone", True) is not None
    clock.now += 2
    assert policy.stored("bob", "phone", True) is None
    clock.now += 3
    assert policy.stored("bob", "phone", True) is None
    assert policy.next_deadline() == 1010.0
    fired = advance(policy, clock, 20)
    assert fired == [WakeUp("bob", "phone", ALERT, "coalesced")]


def test_at_most_one_alert_per_cooldown_while_messages_keep_coming(
    policy: WakePolicy, clock: Clock
) -> None:
    sent = []
    for _ in range(100):  # one urgent message a second for 100 seconds
        if policy.stored("bob", "phone", True) is not None:
            sent.append(clock.now)
        for decision in advance(policy, clock, 1):
            assert isinstance(decision, WakeUp)
            sent.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert sent[0] == 1000.0 and sent[-1] == 1100.0  # the first at once, the last trailing
    assert len(sent) == 11 and all(gap >= RULES.urgent_cooldown for gap in gaps)


def test_a_receipt_gets_a_background_wake_up_then_nothing_within_the_cooldown(
    policy: WakePolicy, clock: Clock
) -> None:
    assert policy.stored("bob", "phone", False) == WakeUp("bob", "phone", BACKGROUND, "background")
    clock.now += 60
    assert policy.stored("bob", "phone", False) is None
    assert advance(policy, clock, 1000) == []
    fired = advance(policy, clock, 200)
    assert fired == [WakeUp("bob", "phone", BACKGROUND, "coalesced")]
    assert clock.now - 1000.0 >= RULES.background_cooldown


def test_an_alert_covers_background_items_stored_in_its_cooldown(
    policy: WakePolicy, clock: Clock
) -> None:
    assert policy.stored("bob", "phone", True) is not None
    clock.now += 1
    assert policy.stored("bob", "phone", False) is None
    assert advance(policy, clock, 3600) == []


def test_urgent_is_not_held_back_by_the_background_cooldown(
    policy: WakePolicy, clock: Clock
) -> None:
    assert policy.stored("bob", "phone", False) is not None
    clock.now += 1
    assert policy.stored("bob", "phone", True) == WakeUp("bob", "phone", ALERT, "urgent")


def test_connect_cancels_pending_wake_ups_and_resets_cooldowns(
    policy: WakePolicy, clock: Clock
) -> None:
    policy.stored("bob", "phone", True)
    clock.now += 1
    policy.stored("bob", "phone", True)  # a trailing alert is now owed
    policy.connected("bob", "phone")
    assert advance(policy, clock, 100) == []
    assert len(policy) == 0
    policy.disconnected("bob", "phone")
    assert policy.stored("bob", "phone", True) == WakeUp("bob", "phone", ALERT, "urgent")


def test_nothing_is_stored_for_a_connected_device(policy: WakePolicy) -> None:
    policy.connected("bob", "phone")
    assert policy.stored("bob", "phone", True) is None
    assert policy.is_online("bob", "phone")


def test_disconnect_lingers_then_asks_for_a_check(policy: WakePolicy, clock: Clock) -> None:
    policy.disconnected("bob", "phone")
    assert advance(policy, clock, 59) == []
    assert advance(policy, clock, 1) == [LingerCheck("bob", "phone")]
    wake = policy.linger_checked("bob", "phone", unacked=3, urgent=False)
    assert wake == WakeUp("bob", "phone", BACKGROUND, "linger")


def test_linger_with_an_urgent_message_unacked_is_an_alert(
    policy: WakePolicy, clock: Clock
) -> None:
    policy.disconnected("bob", "phone")
    advance(policy, clock, 60)
    assert policy.linger_checked("bob", "phone", 1, urgent=True) == WakeUp(
        "bob", "phone", ALERT, "linger"
    )


def test_linger_with_nothing_unacked_sends_nothing_and_forgets_the_device(
    policy: WakePolicy, clock: Clock
) -> None:
    policy.disconnected("bob", "phone")
    advance(policy, clock, 60)
    assert policy.linger_checked("bob", "phone", 0, False) is None
    assert len(policy) == 0


def test_a_reconnect_during_linger_cancels_it(policy: WakePolicy, clock: Clock) -> None:
    policy.disconnected("bob", "phone")
    clock.now += 30
    policy.connected("bob", "phone")
    assert advance(policy, clock, 100) == []


def test_a_reconnect_while_the_check_runs_voids_its_answer(
    policy: WakePolicy, clock: Clock
) -> None:
    policy.disconnected("bob", "phone")
    advance(policy, clock, 60)
    policy.connected("bob", "phone")
    assert policy.linger_checked("bob", "phone", 5, True) is None


def test_a_wake_up_during_linger_replaces_the_linger_wake_up(
    policy: WakePolicy, clock: Clock
) -> None:
    policy.disconnected("bob", "phone")
    clock.now += 10
    assert policy.stored("bob", "phone", True) is not None
    assert [d for d in advance(policy, clock, 120) if isinstance(d, LingerCheck)] == []


def test_nothing_happens_at_start_up(policy: WakePolicy, clock: Clock) -> None:
    assert policy.next_deadline() is None
    assert advance(policy, clock, 10_000) == []


def test_devices_are_independent(policy: WakePolicy) -> None:
    assert policy.stored("bob", "phone", True) is not None
    assert policy.stored("bob", "tablet", True) is not None
    assert policy.stored("carol", "phone", True) is not None


def test_state_is_dropped_once_cooldowns_run_out(policy: WakePolicy, clock: Clock) -> None:
    for i in range(1000):
        policy.stored(f"user{i}", "phone", i % 2 == 0)
    assert len(policy) == 1000
    advance(policy, clock, RULES.background_cooldown + 1)
    assert len(policy) == 0
    assert policy.next_deadline() is None


# -- alert retries and the background budget (the defaults) ---------------------------------


@pytest.fixture
def full(clock: Clock) -> WakePolicy:
    """The policy with its default rules: retries and a background budget."""
    return WakePolicy(DEFAULTS, clock)


def test_an_unanswered_alert_is_sent_again_with_doubling_delays(
    full: WakePolicy, clock: Clock
) -> None:
    assert DEFAULTS.alert_retry == 20.0 and DEFAULTS.alert_retries == 2
    start = clock.now
    assert full.stored("bob", "phone", True) == WakeUp("bob", "phone", ALERT, "urgent")

    fired = []
    while (deadline := full.next_deadline()) is not None and deadline <= start + 3600:
        clock.now = deadline
        fired += [(clock.now - start, d) for d in full.due()]

    retry = WakeUp("bob", "phone", ALERT, "retry")
    assert fired == [(20.0, retry), (60.0, retry)]  # 20 s, then 40 s more; then no more


def test_a_connect_cancels_the_retries(full: WakePolicy, clock: Clock) -> None:
    full.stored("bob", "phone", True)
    clock.now += 5
    full.connected("bob", "phone")
    full.disconnected("bob", "phone")  # and gone again: only its linger check is left

    assert advance(full, clock, 600) == [LingerCheck("bob", "phone")]


def test_a_skipped_retry_ends_the_retries_but_not_the_alert_mark(
    full: WakePolicy, clock: Clock
) -> None:
    full.stored("bob", "phone", True)
    assert advance(full, clock, 25) == [WakeUp("bob", "phone", ALERT, "retry")]
    full.retry_skipped("bob", "phone")  # the driver found the message acked or read

    assert advance(full, clock, 3600) == []
    assert len(full) == 0
    # The device was still alerted: a read elsewhere clears its notification.
    assert full.cleared("bob", "phone") == WakeUp("bob", "phone", WakeKind.CLEAR, "clear")


def test_a_new_alert_starts_its_retries_afresh(full: WakePolicy, clock: Clock) -> None:
    full.stored("bob", "phone", True)
    assert advance(full, clock, 25) == [WakeUp("bob", "phone", ALERT, "retry")]
    clock.now += DEFAULTS.urgent_cooldown  # past the retry's cooldown
    assert full.stored("bob", "phone", True) == WakeUp("bob", "phone", ALERT, "urgent")

    fired = advance(full, clock, 3600)
    assert fired == [WakeUp("bob", "phone", ALERT, "retry")] * 2


def test_the_background_budget_holds_across_reconnects(full: WakePolicy, clock: Clock) -> None:
    assert DEFAULTS.background_per_hour == 3
    start = clock.now
    for _ in range(3):  # a phone that wakes often: every connect resets the cooldowns
        assert full.stored("bob", "phone", False) is not None
        full.connected("bob", "phone")
        full.disconnected("bob", "phone")
        clock.now += 60
    assert full.stored("bob", "phone", False) is None  # the fourth in the hour waits

    # It goes out once the first of the hour's three is an hour old.
    fired = []
    while (deadline := full.next_deadline()) is not None and deadline <= start + 7200:
        clock.now = deadline
        fired += [(clock.now - start, d) for d in full.due() if isinstance(d, WakeUp)]
    assert fired == [(3600.0, WakeUp("bob", "phone", BACKGROUND, "coalesced"))]


def test_a_wake_up_held_by_the_budget_is_cancelled_by_a_connect(
    full: WakePolicy, clock: Clock
) -> None:
    for _ in range(3):
        full.stored("bob", "phone", False)
        full.connected("bob", "phone")
        full.disconnected("bob", "phone")
    assert full.stored("bob", "phone", False) is None
    full.connected("bob", "phone")

    assert advance(full, clock, 7200) == []


def test_a_linger_wake_up_waits_for_the_budget_too(full: WakePolicy, clock: Clock) -> None:
    for _ in range(3):
        assert full.stored("bob", "phone", False) is not None
        full.connected("bob", "phone")
        full.disconnected("bob", "phone")
        clock.now += 1
    [check] = advance(full, clock, DEFAULTS.linger)
    assert check == LingerCheck("bob", "phone")

    assert full.linger_checked("bob", "phone", unacked=2, urgent=False) is None
    fired = advance(full, clock, 3600)
    assert fired == [WakeUp("bob", "phone", BACKGROUND, "coalesced")]


def test_alerts_are_not_held_back_by_the_background_budget(full: WakePolicy, clock: Clock) -> None:
    for _ in range(3):
        full.stored("bob", "phone", False)
        full.connected("bob", "phone")
        full.disconnected("bob", "phone")
    assert full.stored("bob", "phone", True) == WakeUp("bob", "phone", ALERT, "urgent")


def test_a_budget_alone_is_forgotten_an_hour_later(full: WakePolicy, clock: Clock) -> None:
    full.stored("bob", "phone", False)
    full.connected("bob", "phone")
    assert len(full) == 1  # connected, but its background wake-up still counts

    advance(full, clock, 3600 + 1)
    assert len(full) == 0
    assert full.next_deadline() is None


def test_a_zombie_gets_an_alert_though_connected_once_per_cooldown(
    full: WakePolicy, clock: Clock
) -> None:
    full.connected("bob", "phone")
    assert full.stored("bob", "phone", True) is None  # connected: no wake-up decided

    assert full.zombie("bob", "phone") == WakeUp("bob", "phone", ALERT, "zombie")
    clock.now += 1
    assert full.zombie("bob", "phone") is None  # within the urgent cooldown
    assert advance(full, clock, 3600) == []  # no retries: it may answer on that socket
    assert full.zombie("bob", "phone") == WakeUp("bob", "phone", ALERT, "zombie")


# -- clear wake-ups: the user read on another device -----------------------------------------

CLEARED = WakeUp("bob", "phone", WakeKind.CLEAR, "clear")


def test_a_read_elsewhere_clears_a_device_alerted_since_its_last_connection(
    full: WakePolicy, clock: Clock
) -> None:
    assert DEFAULTS.clear_cooldown == 60.0
    full.stored("bob", "phone", True)  # an alert
    clock.now += 5

    assert full.cleared("bob", "phone") == CLEARED


def test_no_clear_without_an_alert_since_the_last_connection(
    full: WakePolicy, clock: Clock
) -> None:
    assert full.cleared("bob", "phone") is None  # never alerted
    full.stored("bob", "phone", False)  # a background wake-up is no alert
    assert full.cleared("bob", "phone") is None

    full.stored("bob", "phone", True)
    full.connected("bob", "phone")  # the app opened: its notifications were seen
    full.disconnected("bob", "phone")
    clock.now += 5
    assert full.cleared("bob", "phone") is None


def test_no_clear_for_a_connected_device(full: WakePolicy) -> None:
    full.connected("bob", "phone")
    assert full.zombie("bob", "phone") is not None  # alerted, though connected
    assert full.cleared("bob", "phone") is None


def test_at_most_one_clear_per_cooldown_even_across_connects(
    full: WakePolicy, clock: Clock
) -> None:
    full.stored("bob", "phone", True)
    assert full.cleared("bob", "phone") == CLEARED
    clock.now += 1
    assert full.cleared("bob", "phone") is None

    full.connected("bob", "phone")
    full.disconnected("bob", "phone")
    clock.now += DEFAULTS.urgent_cooldown
    full.stored("bob", "phone", True)  # alerted again, 11 s after the clear
    assert full.cleared("bob", "phone") is None

    clock.now += DEFAULTS.clear_cooldown - 11
    assert full.cleared("bob", "phone") == CLEARED


def test_a_clear_is_not_held_by_the_background_cooldown_nor_starts_it(
    full: WakePolicy, clock: Clock
) -> None:
    assert full.stored("bob", "phone", False) == WakeUp("bob", "phone", BACKGROUND, "background")
    clock.now += 1
    full.stored("bob", "phone", True)
    clock.now += DEFAULTS.urgent_cooldown  # past the alert's cover

    assert full.cleared("bob", "phone") == CLEARED
    full.connected("bob", "phone")
    full.disconnected("bob", "phone")
    # The clear started no background cooldown: a receipt now wakes the device at once.
    assert full.stored("bob", "phone", False) == WakeUp("bob", "phone", BACKGROUND, "background")


def test_clears_count_against_the_background_budget(full: WakePolicy, clock: Clock) -> None:
    start = clock.now
    for _ in range(3):  # three clears in an hour spend the budget
        full.stored("bob", "phone", True)
        assert full.cleared("bob", "phone") == CLEARED
        clock.now += DEFAULTS.clear_cooldown
    full.connected("bob", "phone")
    full.disconnected("bob", "phone")

    assert full.stored("bob", "phone", False) is None  # a receipt's wake-up waits

    early = advance(full, clock, start + 3599 - clock.now)
    assert [d for d in early if isinstance(d, WakeUp)] == []  # past its linger check
    assert advance(full, clock, 1) == [WakeUp("bob", "phone", BACKGROUND, "coalesced")]


def test_a_spent_budget_makes_no_clear(full: WakePolicy, clock: Clock) -> None:
    for _ in range(3):
        full.stored("bob", "phone", False)
        full.connected("bob", "phone")
        full.disconnected("bob", "phone")
    full.stored("bob", "phone", True)

    assert full.cleared("bob", "phone") is None
    assert WakeUp("bob", "phone", WakeKind.CLEAR, "clear") not in advance(full, clock, 7200)


def test_a_clear_alone_is_forgotten_after_its_cooldown(full: WakePolicy, clock: Clock) -> None:
    rules = WakeRules(background_per_hour=0, alert_retries=0)
    policy = WakePolicy(rules, clock)
    policy.stored("bob", "phone", True)
    policy.cleared("bob", "phone")
    policy.connected("bob", "phone")
    assert len(policy) == 1  # the clear's cooldown is still running

    advance(policy, clock, rules.clear_cooldown)
    assert len(policy) == 0


def test_an_alert_a_day_old_is_no_longer_cleared(full: WakePolicy, clock: Clock) -> None:
    full.stored("bob", "phone", True)
    full.stored("carol", "phone", True)
    clock.now += ALERT_MEMORY - 1
    full.stored("carol", "phone", True)  # carol's phone was alerted again since
    clock.now += 1

    assert full.cleared("bob", "phone") is None
    assert full.cleared("carol", "phone") == WakeUp("carol", "phone", WakeKind.CLEAR, "clear")


def test_a_connect_on_another_node_cancels_everything_but_is_not_a_connection_here(
    full: WakePolicy, clock: Clock
) -> None:
    full.stored("bob", "phone", True)
    full.connected_elsewhere("bob", "phone")

    assert advance(full, clock, 3600) == []  # no retry
    assert not full.is_online("bob", "phone")
    assert full.cleared("bob", "phone") is None  # the alert was answered
    # Back to this node's care once it is gone from the other one: the cooldown is reset.
    assert full.stored("bob", "phone", True) == WakeUp("bob", "phone", ALERT, "urgent")


def test_an_alert_sent_by_another_node_is_cleared_here(full: WakePolicy, clock: Clock) -> None:
    full.alerted_elsewhere("bob", "phone")
    full.alerted_elsewhere("bob", "laptop")
    full.connected("bob", "laptop")
    full.alerted_elsewhere("bob", "laptop")  # connected here: it sees its messages itself

    assert advance(full, clock, 600) == []  # nothing to send by itself: no retry either
    assert full.cleared("bob", "phone") == WakeUp("bob", "phone", WakeKind.CLEAR, "clear")
    assert full.cleared("bob", "laptop") is None
    clock.now += ALERT_MEMORY
    full.alerted_elsewhere("bob", "tablet")
    clock.now += 61
    assert full.cleared("bob", "phone") is None  # a day old: forgotten


def test_timers_left_stale_by_reconnects_do_not_pile_up(clock: Clock) -> None:
    # Every cycle leaves stale entries behind (a linger cancelled by the connect, a timer
    # for the end of the background budget's hour); they must not accumulate for an hour.
    policy = WakePolicy(DEFAULTS, clock)
    devices = [f"u{n}" for n in range(20)]
    for _ in range(2000):
        for user in devices:
            policy.disconnected(user, "phone")
            policy.stored(user, "phone", urgent=False)
            policy.stored(user, "phone", urgent=True)
        advance(policy, clock, 1.0)
        for user in devices:
            policy.connected(user, "phone")
        advance(policy, clock, 1.0)
    assert len(policy._timers) <= 2 * len(devices) + STALE_TIMER_SLACK
    # Nothing live was dropped with them: every device still gets its linger check.
    for user in devices:
        policy.disconnected(user, "phone")
    fired = advance(policy, clock, DEFAULTS.linger)
    assert {c.user for c in fired if isinstance(c, LingerCheck)} == set(devices)

"""`MirrorPresence`: the cluster's presence state, a mirror of what Redis says (plain code)."""

from __future__ import annotations

from presence.state import MirrorPresence, PresenceItem

T = 1_700_000_000_000


def test_a_user_seen_for_the_first_time_announces_nothing():
    mirror = MirrorPresence()

    assert mirror.update("bob", True, None, False) == []
    assert mirror.snapshot("bob") == PresenceItem("bob", True, None)
    assert mirror.snapshot("nobody") == PresenceItem("nobody", False, None)


def test_a_change_read_back_is_announced_once():
    mirror = MirrorPresence()
    mirror.update("bob", True, None, False)

    assert mirror.update("bob", False, T, False) == [PresenceItem("bob", False, T)]
    assert mirror.update("bob", False, T, False) == []
    assert mirror.update("bob", True, T, False) == [PresenceItem("bob", True, None)]


def test_a_local_connect_is_online_at_once_and_a_disconnect_waits_for_redis():
    mirror = MirrorPresence()
    mirror.update("bob", False, T, False)

    assert mirror.connected("bob", "phone", 0.0, T) == [PresenceItem("bob", True, None)]
    assert mirror.connected("bob", "tablet", 0.0, T) == []
    assert mirror.disconnected("bob", "phone", 1.0, T + 1) == []
    assert mirror.snapshot("bob").online  # the grace period runs in Redis
    assert (mirror.expire(100.0), mirror.next_deadline()) == ([], None)


def test_hiding_is_recorded_through_the_hook_and_shows_offline():
    hidden: list[tuple[str, bool]] = []
    mirror = MirrorPresence(lambda user, flag: hidden.append((user, flag)))
    mirror.update("bob", True, None, False)

    assert mirror.set_hidden("bob", True) == [PresenceItem("bob", False, None)]
    assert mirror.snapshot("bob") == PresenceItem("bob", False, None)
    assert mirror.update("bob", False, T, True) == []  # hidden: nothing to show changed
    assert mirror.set_hidden("bob", False) == [PresenceItem("bob", False, T)]
    assert hidden == [("bob", True), ("bob", False)]

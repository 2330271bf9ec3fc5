"""How soon woken devices connect, and which wake-ups go unanswered (a fake clock)."""

from __future__ import annotations

from push.answers import ANSWER_WINDOW, WakeAnswers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def observed(answers: WakeAnswers, provider: str, kind: str) -> tuple[float, float]:
    """(count, sum) of the histogram's series for provider and kind."""
    samples = {
        (s.name, s.labels.get("provider"), s.labels.get("kind")): s.value
        for metric in answers.latency.collect()
        for s in metric.samples
    }
    name = "gateway_push_wake_to_connect_seconds"
    return samples.get((f"{name}_count", provider, kind), 0.0), samples.get(
        (f"{name}_sum", provider, kind), 0.0
    )


def test_a_connect_after_a_wake_up_is_observed_by_provider_and_kind() -> None:
    clock = Clock()
    answers = WakeAnswers(clock)
    answers.sent("bob", "phone", "apns", "alert")
    clock.now += 2.5
    answers.connected("bob", "phone")
    answers.connected("bob", "phone")  # a second connect answers nothing more

    assert observed(answers, "apns", "alert") == (1.0, 2.5)
    assert answers.unanswered() == {}


def test_a_wake_up_without_a_connect_in_the_window_counts_as_unanswered() -> None:
    clock = Clock()
    answers = WakeAnswers(clock)
    answers.sent("bob", "phone", "fcm", "background")
    answers.sent("carol", "pad", "apns", "alert")
    clock.now += ANSWER_WINDOW + 1
    assert answers.unanswered() == {("fcm", "background"): 1, ("apns", "alert"): 1}

    answers.connected("bob", "phone")  # too late: not observed, not counted twice
    assert observed(answers, "fcm", "background") == (0.0, 0.0)
    assert answers.unanswered() == {("fcm", "background"): 1, ("apns", "alert"): 1}


def test_only_the_latest_wake_up_of_a_device_waits() -> None:
    clock = Clock()
    answers = WakeAnswers(clock)
    answers.sent("bob", "phone", "apns", "background")
    clock.now += 30
    answers.sent("bob", "phone", "apns", "alert")
    clock.now += 40  # the first one's window is over, but it was replaced
    assert answers.unanswered() == {}
    answers.connected("bob", "phone")

    assert observed(answers, "apns", "alert") == (1.0, 40.0)
    assert observed(answers, "apns", "background") == (0.0, 0.0)

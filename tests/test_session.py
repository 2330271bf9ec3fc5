"""The sans-IO session: WebSocket messages in; commands, error replies and closes out."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from gateway.frames import Ack, FrameParser, Hello, Send, Typing
from gateway.session import Close, CloseCode, Command, Reply, Session

MAX_BAD = 3
HELLO = {"t": "hello", "v": 1, "token": "jwt"}
ACK = {"t": "ack", "sids": [1]}
BAD = {"t": "ack", "sids": "not-a-list"}
UNKNOWN = {"t": "reaction"}


def msg(item: Any) -> bytes:
    return cbor2.dumps(item)


@pytest.fixture
def session() -> Session:
    return Session(FrameParser(max_ttl=3600), max_bad_frames=MAX_BAD)


@pytest.fixture
def ready(session: Session) -> Session:
    """A session whose hello has been seen."""
    assert session.receive(msg(HELLO)) == [Command(Hello("jwt", True))]
    return session


def error_codes(events: list[Any]) -> list[str]:
    return [e.frame["code"] for e in events if isinstance(e, Reply)]


# -- session start -------------------------------------------------------------------------


def test_hello_is_the_first_command(session):
    events = session.receive(msg(HELLO))

    assert events == [Command(Hello("jwt", True))]
    assert session.hello_seen


def test_hello_then_more_frames_in_one_batch_become_commands_in_order(session):
    batch = [
        HELLO,
        {"t": "send", "id": "m1", "to": "bob", "body": b"x"},
        ACK,
        {"t": "typing", "to": "bob", "on": True},
    ]

    events = session.receive(msg(batch))

    assert [type(e.frame) for e in events if isinstance(e, Command)] == [Hello, Send, Ack, Typing]
    assert len(events) == 4


@pytest.mark.parametrize(
    "first",
    [ACK, UNKNOWN, {"no": "type"}, "text item", [ACK, HELLO]],
    ids=["valid-frame", "unknown-type", "no-type", "not-a-map", "batch-without-hello-first"],
)
def test_a_frame_before_hello_closes_with_policy_violation(session, first):
    events = session.receive(msg(first))

    assert events == [Close(CloseCode.POLICY, "hello must come first")]
    assert session.closed


def test_undecodable_bytes_before_hello_close_with_policy_violation(session):
    assert session.receive(b"\xff\x00") == [Close(CloseCode.POLICY, "hello must come first")]


@pytest.mark.parametrize(
    "hello",
    [
        {"t": "hello", "v": 1},
        {"t": "hello", "v": 1, "token": 42},
        {"t": "hello", "v": 2, "token": "jwt"},
    ],
    ids=["no-token", "int-token", "wrong-version"],
)
def test_a_malformed_hello_closes_as_unauthorized(session, hello):
    events = session.receive(msg(hello))

    assert events == [Close(CloseCode.UNAUTHORIZED, "unauthorized")]
    assert not session.hello_seen


def test_a_malformed_hello_in_a_batch_stops_the_batch(session):
    events = session.receive(msg([{"t": "hello", "v": 1}, ACK]))

    assert events == [Close(CloseCode.UNAUTHORIZED, "unauthorized")]


def test_a_second_hello_is_a_bad_frame(ready):
    events = ready.receive(msg(HELLO))

    assert len(events) == 1 and isinstance(events[0], Reply)
    assert events[0].frame["t"] == "error"
    assert events[0].frame["code"] == "bad_frame"
    assert ready.bad_frames == 1


# -- after hello ---------------------------------------------------------------------------


def test_a_text_message_closes_with_1003(ready):
    assert ready.receive('{"t":"ack"}') == [Close(CloseCode.TEXT_MESSAGE, "binary messages only")]
    assert CloseCode.TEXT_MESSAGE == 1003


def test_a_text_message_before_hello_also_closes_with_1003(session):
    assert session.receive("hello") == [Close(CloseCode.TEXT_MESSAGE, "binary messages only")]


def test_undecodable_bytes_get_a_bad_frame_error(ready):
    events = ready.receive(b"\xa1\x01\x02")  # a map with an integer key

    assert error_codes(events) == ["bad_frame"]
    assert not ready.closed


def test_a_bad_field_gets_an_error_naming_the_message(ready):
    events = ready.receive(msg({"t": "send", "id": "m7", "to": "bob", "body": "text"}))

    assert len(events) == 1 and isinstance(events[0], Reply)
    frame = events[0].frame
    assert (frame["t"], frame["code"], frame["ref"]) == ("error", "bad_field", "m7")
    assert isinstance(frame["reason"], str)


def test_a_bad_frame_in_a_batch_does_not_stop_the_rest(ready):
    events = ready.receive(msg([ACK, BAD, ACK]))

    assert [type(e) for e in events] == [Command, Reply, Command]


def test_unknown_types_get_unknown_type_and_do_not_count_as_abuse(ready):
    events = ready.receive(msg([UNKNOWN] * (MAX_BAD + 5)))

    assert error_codes(events) == ["unknown_type"] * (MAX_BAD + 5)
    assert ready.bad_frames == 0
    assert not ready.closed


def test_max_bad_frames_are_tolerated(ready):
    for _ in range(MAX_BAD):
        assert error_codes(ready.receive(msg(BAD))) == ["bad_field"]

    assert not ready.closed


def test_one_bad_frame_too_many_closes_with_policy_violation_after_its_reply(ready):
    for _ in range(MAX_BAD):
        ready.receive(msg(BAD))

    events = ready.receive(msg(BAD))

    assert [type(e) for e in events] == [Reply, Close]
    assert events[1] == Close(CloseCode.POLICY, "too many bad frames")
    assert ready.closed


def test_too_many_bad_frames_in_one_batch_close_and_drop_the_rest(ready):
    events = ready.receive(msg([BAD] * (MAX_BAD + 1) + [ACK, BAD]))

    assert [type(e) for e in events] == [Reply] * (MAX_BAD + 1) + [Close]
    assert events[-1].code == CloseCode.POLICY


def test_undecodable_messages_count_toward_max_bad_frames(ready):
    for _ in range(MAX_BAD):
        ready.receive(b"\xff")

    events = ready.receive(b"\xff")

    assert error_codes(events) == ["bad_frame"]
    assert events[-1] == Close(CloseCode.POLICY, "too many bad frames")


# -- after a close -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "closing", ["text", msg(ACK), b"\x81"], ids=["text-message", "frame-first", "undecodable-first"]
)
def test_nothing_is_handled_after_a_close(session, closing):
    assert isinstance(session.receive(closing)[-1], Close)

    assert session.receive(msg(HELLO)) == []
    assert session.receive(msg([HELLO, ACK])) == []
    assert session.receive("text") == []
    assert session.receive(b"\xff") == []
    assert not session.hello_seen


def test_nothing_is_handled_after_a_close_for_bad_frames(ready):
    ready.receive(msg([BAD] * (MAX_BAD + 1)))

    assert ready.receive(msg(ACK)) == []
    assert ready.bad_frames == MAX_BAD + 1

"""Client frames of protocol v1: valid shapes, defaults, and the error code for each mistake."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest

from gateway import frames
from gateway.frames import (
    MAX_BODIES,
    MAX_LIST,
    Ack,
    ClientState,
    FrameError,
    FrameParser,
    GroupSend,
    Hello,
    PushRegistration,
    Read,
    Send,
    Subscribe,
    Typing,
    Unsubscribe,
)
from gateway.store import ItemKind, QueueItem
from presence.state import PresenceItem
from push.subscription import HostPolicy

MAX_TTL = 3600


@pytest.fixture
def parser() -> FrameParser:
    return FrameParser(max_ttl=MAX_TTL)


def bad_field(parser: FrameParser, frame: Any) -> FrameError:
    with pytest.raises(FrameError) as info:
        parser.parse(frame)
    assert info.value.code == "bad_field", info.value.reason
    return info.value


def send(**fields: Any) -> dict[str, Any]:
    return {"t": "send", "id": "m1", "to": "bob", "body": b"ciphertext", **fields}


# -- the envelope: a map with a text `t` ---------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [["t", "ack"], [{"t": "ack", "sids": []}], "ack", b"ack", 7, 1.5, True, None],
    ids=["array", "nested-batch", "text", "bytes", "int", "float", "bool", "null"],
)
def test_anything_but_a_map_is_a_bad_frame(parser, item):
    with pytest.raises(FrameError) as info:
        parser.parse(item)

    assert info.value.code == "bad_frame"


@pytest.mark.parametrize("frame", [{}, {"type": "ack"}, {"t": 1}, {"t": b"ack"}, {"t": None}])
def test_a_map_without_a_text_t_is_a_bad_frame(parser, frame):
    with pytest.raises(FrameError) as info:
        parser.parse(frame)

    assert info.value.code == "bad_frame"


def test_an_unknown_type_is_reported_as_unknown_type(parser):
    with pytest.raises(FrameError) as info:
        parser.parse({"t": "reaction", "emoji": "+1"})

    assert info.value.code == "unknown_type"
    assert "reaction" in info.value.reason


def test_the_unknown_type_reason_does_not_echo_a_huge_type(parser):
    with pytest.raises(FrameError) as info:
        parser.parse({"t": "x" * 10_000})

    assert info.value.code == "unknown_type"
    assert len(info.value.reason) < 100


def test_unknown_keys_are_ignored(parser):
    frame = parser.parse({"t": "state", "active": False, "future_field": [1, 2, 3]})

    assert frame == ClientState(active=False)


# -- hello ---------------------------------------------------------------------------------


def test_hello_defaults_to_active(parser):
    assert parser.parse({"t": "hello", "v": 1, "token": "jwt"}) == Hello("jwt", active=True)


def test_hello_carries_the_initial_client_state(parser):
    assert parser.parse({"t": "hello", "v": 1, "token": "jwt", "active": False}) == Hello(
        "jwt", active=False
    )


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "hello", "token": "jwt"},
        {"t": "hello", "v": 2, "token": "jwt"},
        {"t": "hello", "v": "1", "token": "jwt"},
        {"t": "hello", "v": 1},
        {"t": "hello", "v": 1, "token": ""},
        {"t": "hello", "v": 1, "token": b"jwt"},
        {"t": "hello", "v": 1, "token": "x" * 8193},
        {"t": "hello", "v": 1, "token": "jwt", "active": 1},
        {"t": "hello", "v": 1, "token": "jwt", "active": None},
    ],
    ids=[
        "no-v",
        "v2",
        "v-text",
        "no-token",
        "empty-token",
        "bytes-token",
        "huge-token",
        "active-int",
        "active-null",
    ],
)
def test_a_malformed_hello_is_a_bad_field(parser, frame):
    bad_field(parser, frame)


def test_hello_version_true_is_not_version_one(parser):
    bad_field(parser, {"t": "hello", "v": True, "token": "jwt"})


# -- send ----------------------------------------------------------------------------------


def test_send_with_one_body_defaults_to_urgent_and_max_ttl(parser):
    assert parser.parse(send()) == Send(
        id="m1", to="bob", body=b"ciphertext", bodies=None, urgent=True, ttl=MAX_TTL
    )


def test_send_with_per_device_bodies(parser):
    frame = parser.parse(
        {"t": "send", "id": "m1", "to": "bob", "bodies": {"phone": b"p", "tablet": b"t"}}
    )

    assert isinstance(frame, Send)
    assert frame.body is None
    assert frame.bodies == {"phone": b"p", "tablet": b"t"}


def test_send_honours_urgent_and_ttl(parser):
    frame = parser.parse(send(urgent=False, ttl=60))

    assert isinstance(frame, Send)
    assert (frame.urgent, frame.ttl) == (False, 60)


def test_send_accepts_the_limits_exactly(parser):
    frame = parser.parse(send(id="i" * 64, to="u" * 128, ttl=MAX_TTL, body=b""))

    assert isinstance(frame, Send)
    assert (len(frame.id), len(frame.to), frame.ttl) == (64, 128, MAX_TTL)


@pytest.mark.parametrize("ttl", [MAX_TTL + 1, 0, -1, 1.5, "60", True, None])
def test_send_ttl_must_be_a_positive_integer_up_to_max_ttl(parser, ttl):
    bad_field(parser, send(ttl=ttl))


@pytest.mark.parametrize(
    "msg_id",
    [None, "", 7, b"m1", "i" * 65, "€" * 22],  # "€" is 3 bytes: 22 of them are 66 bytes
    ids=["missing", "empty", "int", "bytes", "65-bytes", "66-utf8-bytes"],
)
def test_send_id_must_be_text_of_at_most_64_bytes(parser, msg_id):
    frame = send()
    if msg_id is None:
        del frame["id"]
    else:
        frame["id"] = msg_id

    error = bad_field(parser, frame)

    assert error.ref is None  # an unusable id is never echoed back


@pytest.mark.parametrize(
    "to",
    [None, "", 7, b"bob", "u" * 129, "é" * 65],  # "é" is 2 bytes: 65 of them are 130 bytes
    ids=["missing", "empty", "int", "bytes", "129-bytes", "130-utf8-bytes"],
)
def test_send_recipient_must_be_a_user_id_of_at_most_128_bytes(parser, to):
    frame = send()
    if to is None:
        del frame["to"]
    else:
        frame["to"] = to

    bad_field(parser, frame)


@pytest.mark.parametrize(
    "fields",
    [
        {"body": None},
        {"body": "text, not bytes"},
        {"body": [1]},
        {"bodies": {"phone": b"p"}},
        {"body": None, "bodies": {}},
        {"body": None, "bodies": [b"p"]},
        {"body": None, "bodies": {"phone": "text"}},
        {"body": None, "bodies": {"": b"p"}},
        {"body": None, "bodies": {"d" * 65: b"p"}},
        {"body": None, "bodies": {f"d{i}": b"p" for i in range(MAX_BODIES + 1)}},
        {"urgent": 1},
        {"urgent": "yes"},
    ],
    ids=[
        "no-body",
        "text-body",
        "array-body",
        "body-and-bodies",
        "empty-bodies",
        "bodies-array",
        "bodies-text-value",
        "bodies-empty-device",
        "bodies-long-device",
        "too-many-bodies",
        "urgent-int",
        "urgent-text",
    ],
)
def test_send_payload_mistakes_are_bad_fields_that_name_the_message(parser, fields):
    error = bad_field(parser, send(**fields))

    assert error.ref == "m1"


def test_send_accepts_bodies_for_the_maximum_number_of_devices(parser):
    bodies = {f"d{i}": b"p" for i in range(MAX_BODIES)}

    frame = parser.parse({"t": "send", "id": "m1", "to": "bob", "bodies": bodies})

    assert isinstance(frame, Send)
    assert frame.bodies is not None and len(frame.bodies) == MAX_BODIES


# -- ack -----------------------------------------------------------------------------------


def test_ack_carries_sids_in_order(parser):
    assert parser.parse({"t": "ack", "sids": [5, 3, 0]}) == Ack((5, 3, 0))


def test_an_empty_ack_is_valid(parser):
    assert parser.parse({"t": "ack", "sids": []}) == Ack(())


@pytest.mark.parametrize(
    "sids",
    [None, 5, [True], [1, False], [-1], [1.0], ["1"], list(range(MAX_LIST + 1))],
    ids=["missing", "not-array", "true", "false", "negative", "float", "text", "too-many"],
)
def test_ack_sids_must_be_non_negative_integers_not_booleans(parser, sids):
    frame: dict[str, Any] = {"t": "ack"}
    if sids is not None:
        frame["sids"] = sids

    bad_field(parser, frame)


# -- read ----------------------------------------------------------------------------------


def test_read_names_the_sender_and_the_message_ids(parser):
    assert parser.parse({"t": "read", "to": "alice", "ids": ["m1", "m2"]}) == Read(
        "alice", ("m1", "m2")
    )


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "read", "ids": ["m1"]},
        {"t": "read", "to": "u" * 129, "ids": ["m1"]},
        {"t": "read", "to": "alice"},
        {"t": "read", "to": "alice", "ids": "m1"},
        {"t": "read", "to": "alice", "ids": [1]},
        {"t": "read", "to": "alice", "ids": [""]},
        {"t": "read", "to": "alice", "ids": ["i" * 65]},
        {"t": "read", "to": "alice", "ids": ["m"] * (MAX_LIST + 1)},
    ],
    ids=["no-to", "long-to", "no-ids", "ids-text", "int-id", "empty-id", "long-id", "too-many"],
)
def test_read_mistakes_are_bad_fields(parser, frame):
    bad_field(parser, frame)


# -- typing --------------------------------------------------------------------------------


def test_typing_on_and_off(parser):
    assert parser.parse({"t": "typing", "to": "bob", "on": True}) == Typing("bob", True)
    assert parser.parse({"t": "typing", "to": "bob", "on": False}) == Typing("bob", False)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "typing", "to": "bob"},
        {"t": "typing", "to": "bob", "on": 1},
        {"t": "typing", "on": True},
        {"t": "typing", "to": "", "on": True},
    ],
    ids=["no-on", "on-int", "no-to", "empty-to"],
)
def test_typing_mistakes_are_bad_fields(parser, frame):
    bad_field(parser, frame)


# -- sub / unsub ---------------------------------------------------------------------------


def test_subscribe_lists_each_user_once_in_order(parser):
    assert parser.parse({"t": "sub", "users": ["b", "a", "b"]}) == Subscribe(("b", "a"))


def test_unsubscribe_lists_users(parser):
    assert parser.parse({"t": "unsub", "users": ["a"]}) == Unsubscribe(("a",))


@pytest.mark.parametrize("kind", ["sub", "unsub"])
@pytest.mark.parametrize(
    "users",
    [None, "a", [1], [""], ["u" * 129], ["u"] * (MAX_LIST + 1)],
    ids=["missing", "text", "int", "empty", "long", "too-many"],
)
def test_presence_subscription_mistakes_are_bad_fields(parser, kind, users):
    frame: dict[str, Any] = {"t": kind}
    if users is not None:
        frame["users"] = users

    bad_field(parser, frame)


# -- state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("active", [True, False])
def test_state_sets_activity(parser, active):
    assert parser.parse({"t": "state", "active": active}) == ClientState(active)


@pytest.mark.parametrize("frame", [{"t": "state"}, {"t": "state", "active": 0}])
def test_state_needs_a_boolean(parser, frame):
    bad_field(parser, frame)


# -- push ----------------------------------------------------------------------------------


def test_push_registration_defaults_to_production_without_topic(parser):
    assert parser.parse({"t": "push", "provider": "fcm", "token": "tok"}) == PushRegistration(
        "fcm", "tok", None, False
    )


def test_push_registration_with_topic_and_sandbox(parser):
    frame = {"t": "push", "provider": "apns", "token": "tok", "topic": "com.x", "sandbox": True}

    assert parser.parse(frame) == PushRegistration("apns", "tok", "com.x", True)


def test_push_with_null_provider_removes_the_token(parser):
    assert parser.parse({"t": "push", "provider": None}) == PushRegistration(
        None, None, None, False
    )


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "push", "provider": "webpush", "token": "tok"},
        {"t": "push", "provider": 1, "token": "tok"},
        {"t": "push", "provider": "apns"},
        {"t": "push", "provider": "apns", "token": ""},
        {"t": "push", "provider": "apns", "token": "x" * 4097},
        {"t": "push", "provider": "apns", "token": "tok", "topic": 5},
        {"t": "push", "provider": "apns", "token": "tok", "topic": ""},
        {"t": "push", "provider": "apns", "token": "tok", "sandbox": "yes"},
    ],
    ids=[
        "unknown-provider",
        "int-provider",
        "no-token",
        "empty-token",
        "huge-token",
        "int-topic",
        "empty-topic",
        "text-sandbox",
    ],
)
def test_push_mistakes_are_bad_fields(parser, frame):
    bad_field(parser, frame)


def test_push_without_a_provider_is_a_bad_field_not_a_removal(parser):
    bad_field(parser, {"t": "push", "token": "tok"})


P256DH = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
MOZILLA = "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABexample"


def webpush(endpoint: str = MOZILLA, **keys: Any) -> dict[str, Any]:
    subscription = {"endpoint": endpoint, "keys": {"p256dh": P256DH, "auth": AUTH, **keys}}
    return {"t": "push", "provider": "webpush", "subscription": subscription}


def test_a_web_push_subscription_becomes_a_stored_token(parser):
    sent = webpush()
    sent["subscription"]["expirationTime"] = None  # PushSubscription.toJSON() has it too
    frame = parser.parse(sent)
    assert isinstance(frame, PushRegistration)
    assert (frame.provider, frame.topic, frame.sandbox) == ("webpush", None, False)
    assert frame.token is not None
    assert json.loads(frame.token) == webpush()["subscription"]


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        (webpush("https://10.0.0.1/wpush"), "subscription.endpoint"),
        (webpush("http://updates.push.services.mozilla.com/wpush"), "subscription.endpoint"),
        (webpush("https://127.0.0.1/wpush"), "subscription.endpoint"),
        (webpush(p256dh=AUTH), "subscription.keys.p256dh"),
        (webpush(auth=P256DH), "subscription.keys.auth"),
        ({"t": "push", "provider": "webpush"}, "subscription"),
        ({"t": "push", "provider": "webpush", "subscription": {"endpoint": MOZILLA}}, "keys"),
    ],
)
def test_web_push_mistakes_are_bad_fields_naming_the_field(parser, frame, field):
    error = bad_field(parser, frame)
    assert field in error.reason
    assert "10.0.0.1" not in error.reason and "mozilla" not in error.reason


def test_the_web_push_hosts_come_from_configuration():
    parser = FrameParser(max_ttl=MAX_TTL, webpush_hosts=HostPolicy(["127.0.0.1"]))
    assert parser.parse(webpush("http://127.0.0.1:8080/push/a")).provider == "webpush"
    bad_field(parser, webpush())  # the defaults no longer apply


# -- server frames -------------------------------------------------------------------------


def test_error_frame_carries_only_what_is_given():
    assert frames.error("bad_frame") == {"t": "error", "code": "bad_frame"}
    assert frames.error("bad_field", "why", ref="m1") == {
        "t": "error",
        "code": "bad_field",
        "ref": "m1",
        "reason": "why",
    }


def test_welcome_and_sent_frames_have_the_contract_fields():
    assert frames.welcome("u", "d", 5, 30, 2) == {
        "t": "welcome",
        "user": "u",
        "device": "d",
        "ts": 5,
        "heartbeat": 30,
        "queued": 2,
    }
    assert frames.sent("m1", 9) == {"t": "sent", "id": "m1", "ts": 9}
    assert frames.typing("alice", True) == {"t": "typing", "from": "alice", "on": True}
    assert frames.DRAINED == {"t": "drained"}


def test_presence_frames_carry_each_item_with_a_nullable_last_seen():
    items = [PresenceItem("alice", True, None), PresenceItem("bob", False, 1_700_000_000_000)]
    assert frames.presence(items) == {
        "t": "presence",
        "items": [
            {"user": "alice", "online": True, "last_seen": None},
            {"user": "bob", "online": False, "last_seen": 1_700_000_000_000},
        ],
    }
    assert frames.presence([]) == {"t": "presence", "items": []}


def test_queue_items_are_delivered_as_contract_frames():
    t0 = 1_700_000_000_000
    msg = QueueItem(7, ItemKind.MESSAGE, "m1", "alice", "phone", t0, True, b"x")
    read = QueueItem(8, ItemKind.READ, "", "bob", "tablet", t0, False, b"", ("m1", "m2"))
    delivered = QueueItem(9, ItemKind.DELIVERED, "", "bob", "tablet", t0, False, b"", ("m1",))

    assert frames.delivery(msg) == {
        "t": "msg",
        "sid": 7,
        "id": "m1",
        "from": "alice",
        "dev": "phone",
        "ts": t0,
        "body": b"x",
        "urgent": True,
    }
    assert frames.delivery(read) == {
        "t": "receipt",
        "sid": 8,
        "kind": "read",
        "ids": ["m1", "m2"],
        "by": "bob",
        "dev": "tablet",
        "ts": t0,
    }
    assert frames.delivery(delivered)["kind"] == "delivered"
    assert frames.delivery(read, ids=("m0", "m1", "m2"))["ids"] == ["m0", "m1", "m2"]
    cbor2.dumps(frames.delivery(read))  # every value is encodable as it stands


# -- groups --------------------------------------------------------------------------------


def test_send_with_group_is_a_group_send(parser):
    frame = {"t": "send", "id": "g1", "group": "g" * 128, "body": b"x", "urgent": False}
    assert parser.parse(frame) == GroupSend("g1", "g" * 128, b"x", False, MAX_TTL)


@pytest.mark.parametrize(
    "fields",
    [
        {"group": "team", "to": "bob", "body": b"x"},
        {"body": b"x"},
        {"group": "g" * 129, "body": b"x"},
        {"group": "team", "bodies": {"phone": b"x"}},
        {"group": "team", "body": b"x", "ttl": MAX_TTL + 1},
        {"group": "team"},
    ],
)
def test_group_send_mistakes_are_bad_fields_that_name_the_message(parser, fields):
    assert bad_field(parser, {"t": "send", "id": "g1", **fields}).ref == "g1"


def test_a_group_message_is_delivered_as_msg_with_group():
    item = QueueItem(7, ItemKind.MESSAGE, "g1", "alice", "phone", 5, True, b"x", (), "team")
    assert frames.delivery(item) == {
        "t": "msg", "sid": 7, "id": "g1", "from": "alice", "dev": "phone", "ts": 5,
        "body": b"x", "urgent": True, "group": "team",
    }  # fmt: skip
    one_to_one = QueueItem(8, ItemKind.MESSAGE, "m1", "alice", "phone", 5, True, b"x")
    assert "group" not in frames.delivery(one_to_one)


def test_a_group_event_is_delivered_as_a_group_frame():
    item = QueueItem(9, ItemKind.GROUP, "removed", "", "", 5, False, b"", ("bob",), "team")
    assert frames.delivery(item) == {
        "t": "group", "sid": 9, "group": "team", "event": "removed", "users": ["bob"], "ts": 5,
    }  # fmt: skip

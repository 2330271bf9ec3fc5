"""The CBOR codec: one data item per message, nothing but plain values from untrusted bytes."""

from __future__ import annotations

import tracemalloc

import cbor2
import pytest

from gateway.codec import MAX_DEPTH, DecodeError, decode_message, encode_frames

# -- what decodes --------------------------------------------------------------------------


def test_one_map_decodes_to_a_dict():
    frame = {"t": "send", "id": "m1", "to": "bob", "body": b"\x00\xff", "ttl": 60}

    assert decode_message(cbor2.dumps(frame)) == frame


def test_a_batch_decodes_to_a_list_of_dicts_in_order():
    batch = [{"t": "ack", "sids": [1, 2]}, {"t": "typing", "to": "bob", "on": True}]

    assert decode_message(cbor2.dumps(batch)) == batch


def test_plain_cbor_values_are_accepted():
    item = {"s": "é", "b": b"x", "i": -(2**63), "f": 1.5, "t": True, "n": None, "l": [0]}

    assert decode_message(cbor2.dumps(item)) == item


def test_nesting_up_to_max_depth_is_accepted():
    value: object = 1
    for _ in range(MAX_DEPTH):
        value = [value]

    assert decode_message(cbor2.dumps(value)) == value


# -- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(cbor2.dumps(cbor2.CBORTag(0, "2024-01-01T00:00:00Z")), id="datetime-text-0"),
        pytest.param(bytes([0xC1, 0x1A, 0x65, 0x92, 0x00, 0x00]), id="epoch-datetime-1"),
        pytest.param(bytes([0xC2, 0x41, 0x01]), id="bignum-2"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(4, [-1, 15])), id="decimal-4"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(35, "a+")), id="regex-35"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(258, [1, 2])), id="set-258"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(55799, {"t": "ack"})), id="self-describe-55799"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(9999, 1)), id="unknown-9999"),
        pytest.param(bytes([0xD8, 0x1C, 0x80]), id="shared-ref-28"),
        pytest.param(
            cbor2.dumps([{"t": "send", "body": cbor2.CBORTag(2, b"\x01")}]), id="tag-deep-inside"
        ),
    ],
)
def test_every_cbor_tag_is_refused(data):
    with pytest.raises(DecodeError, match="tags are not accepted"):
        decode_message(data)


def test_nesting_beyond_max_depth_is_refused():
    value: object = 1
    for _ in range(MAX_DEPTH + 1):
        value = {"k": value}

    with pytest.raises(DecodeError, match="depth"):
        decode_message(cbor2.dumps(value))


def test_hostile_nesting_is_refused_without_recursing():
    # 100 000 one-element arrays: a recursive decoder without a cap would blow the stack.
    with pytest.raises(DecodeError):
        decode_message(b"\x81" * 100_000 + b"\x01")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xa1\x01\x02", id="int"),
        pytest.param(b"\xa1\xf9\x3c\x00\x01", id="float"),
        pytest.param(b"\xa1\xf5\x01", id="bool"),
        pytest.param(b"\xa1\xf6\x01", id="null"),
        pytest.param(b"\xa1\x81\x01\x01", id="array"),
        pytest.param(b"\xa1\xa0\x01", id="map"),
        pytest.param(cbor2.dumps([{"t": {1: 2}}]), id="int-in-nested-map"),
    ],
)
def test_map_keys_that_are_not_strings_are_refused(data):
    with pytest.raises(DecodeError):
        decode_message(data)


def test_byte_string_map_keys_are_refused():
    with pytest.raises(DecodeError):
        decode_message(cbor2.dumps({b"t": "ack"}))


@pytest.mark.parametrize("data", [b"\xf7", b"\xf0", b"\xf8\xff"], ids=["undefined", "s16", "s255"])
def test_cbor_simple_values_other_than_bools_and_null_are_refused(data):
    with pytest.raises(DecodeError):
        decode_message(data)


def test_trailing_bytes_after_the_item_are_refused():
    with pytest.raises(DecodeError, match="trailing"):
        decode_message(cbor2.dumps({"t": "ack", "sids": []}) + b"\x00")


def test_two_concatenated_items_are_refused():
    with pytest.raises(DecodeError):
        decode_message(cbor2.dumps({"t": "ack"}) * 2)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(cbor2.dumps({"t": "hello", "token": "abc"})[:-2], id="cut-in-text"),
        pytest.param(b"\xa2\x61t", id="cut-in-map"),
        pytest.param(b"\x5f\x41a", id="unterminated-indefinite"),
        pytest.param(b"\xff", id="lone-break"),
        pytest.param(b"\x1c", id="reserved-additional-info"),
    ],
)
def test_truncated_or_malformed_cbor_is_refused(data):
    with pytest.raises(DecodeError):
        decode_message(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x62\xc3\x28", id="bad-continuation"),
        pytest.param(b"\x63\xed\xa0\x80", id="encoded-surrogate"),
        pytest.param(b"\x61\xff", id="invalid-byte"),
        pytest.param(b"\x7f\x41a\xff", id="bytes-chunk-in-text"),
    ],
)
def test_invalid_utf8_text_is_refused(data):
    with pytest.raises(DecodeError):
        decode_message(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x5b" + b"\xff" * 8, id="bytes-2^64"),
        pytest.param(b"\x7b" + b"\x00\x00\x00\xff\xff\xff\xff\xff", id="text-2^40"),
        pytest.param(b"\x9b" + b"\x00\x00\x00\xff\xff\xff\xff\xff", id="array-2^40"),
        pytest.param(b"\xbb" + b"\x00\x00\x00\xff\xff\xff\xff\xff", id="map-2^40"),
        pytest.param(b"\x5a\x7f\xff\xff\xff" + b"x" * 100, id="bytes-2GiB"),
        pytest.param(b"\x9a\x7f\xff\xff\xff\x01", id="array-2G-items"),
    ],
)
def test_giant_declared_lengths_fail_fast_in_bounded_memory(data):
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            decode_message(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 1024 * 1024


def test_decode_errors_are_value_errors():
    # Callers that only know ValueError still catch hostile input.
    assert issubclass(DecodeError, ValueError)


# -- encoding ------------------------------------------------------------------------------


def test_a_single_frame_is_encoded_as_a_map():
    frame = {"t": "sent", "id": "m1", "ts": 1}

    encoded = encode_frames([frame])

    assert cbor2.loads(encoded) == frame
    assert encoded[0] >> 5 == 5  # CBOR major type 5: map


def test_several_frames_are_encoded_as_one_batch_in_order():
    out = [
        {"t": "msg", "sid": 1, "body": b"a"},
        {"t": "msg", "sid": 2, "body": b"b"},
        {"t": "drained"},
    ]

    encoded = encode_frames(out)

    assert encoded[0] >> 5 == 4  # CBOR major type 4: array
    assert cbor2.loads(encoded) == out


def test_encoded_frames_round_trip_through_the_decoder():
    out = [{"t": "welcome", "user": "u", "device": "d", "ts": 1, "heartbeat": 30, "queued": 0}]

    assert decode_message(encode_frames(out)) == out[0]
    assert decode_message(encode_frames(out * 2)) == out * 2

"""Protocol fuzzing: the sans-IO layer under hypothesis, then hostile bytes over real sockets.

The properties: decoding untrusted bytes either yields plain data or raises `DecodeError`;
CBOR tags never come through as objects; the session turns any message into error frames
or a close with a contract code and never raises; a parsed frame has exactly the field
types the contract gives. Over sockets: a real `gateway serve` process survives a
seeded stream of hostile messages while two other devices talk through it untouched, on
each store backend (SQLite, and Redis on its own redis-server).
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.codec import MAX_DEPTH, DecodeError, decode_message
from gateway.frames import (
    MAX_ID_BYTES,
    MAX_LIST,
    MAX_USER_BYTES,
    Ack,
    FrameError,
    FrameParser,
    Read,
    Send,
    Subscribe,
    Typing,
)
from gateway.session import Close, Command, Reply, Session
from scripts.fuzz import EXPECTED_CLOSES, GATEWAY_SERVER, run_fuzz
from scripts.fuzzcases import GENERATORS
from scripts.kit.gateway_process import GatewayProcess, open_store

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONTRACT_ERRORS = {"bad_frame", "bad_field", "unknown_type"}
PARSER = FrameParser(max_ttl=2_592_000)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=80),
    st.text(max_size=80),
)
plain = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)
tag_numbers = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 256, 258, 55799]),
    st.integers(min_value=0, max_value=2**64 - 1),
)
with_tags = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.builds(cbor2.CBORTag, tag_numbers, inner),
    ),
    max_leaves=20,
)
frame_types = st.sampled_from(
    ["send", "ack", "read", "typing", "sub", "unsub", "state", "privacy", "push", "hello", "x"]
)
field_names = st.sampled_from(
    ["id", "to", "body", "bodies", "urgent", "ttl", "sids", "ids", "on", "users", "active",
     "hide_presence", "provider", "token", "topic", "sandbox", "v"]
)  # fmt: skip
frames_any_types = st.builds(
    lambda t, fields: {"t": t, **fields},
    frame_types,
    st.dictionaries(field_names, plain, max_size=6),
)


def _contains_tag(item: Any) -> bool:
    if isinstance(item, cbor2.CBORTag):
        return True
    if isinstance(item, list):
        return any(_contains_tag(i) for i in item)
    if isinstance(item, dict):
        return any(_contains_tag(v) for v in item.values())
    return False


def _is_plain(item: Any) -> bool:
    if isinstance(item, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in item.items())
    if isinstance(item, list):
        return all(_is_plain(i) for i in item)
    return item is None or isinstance(item, (bool, int, float, str, bytes))


def _authenticated_session() -> Session:
    session = Session(PARSER, max_bad_frames=10**9)
    session.hello_seen = True
    return session


def _check_events(events: list[Any]) -> None:
    for event in events[:-1]:
        assert not isinstance(event, Close), "nothing follows a close"
    for event in events:
        assert isinstance(event, (Command, Reply, Close))
        if isinstance(event, Reply):
            assert event.frame["t"] == "error"
            assert event.frame["code"] in CONTRACT_ERRORS
        if isinstance(event, Close):
            assert int(event.code) in EXPECTED_CLOSES | {4001}


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_decode_to_plain_data_or_a_decode_error(data):
    try:
        item = decode_message(data)
    except DecodeError:
        return
    assert _is_plain(item)


@FUZZ
@given(with_tags)
def test_tagged_items_are_refused_wherever_they_sit(item):
    encoded = cbor2.dumps(item)
    if _contains_tag(item):
        with pytest.raises(DecodeError):
            decode_message(encoded)
    else:
        # deeper than MAX_DEPTH: refused, not crashed
        with contextlib.suppress(DecodeError):
            assert _is_plain(decode_message(encoded))


@FUZZ
@given(plain, st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))
def test_truncated_or_corrupted_items_never_escape_as_other_errors(item, where, byte):
    encoded = bytearray(cbor2.dumps(item))
    if encoded:
        encoded[where % len(encoded)] = byte
    for data in (bytes(encoded), bytes(encoded[: where % (len(encoded) + 1)])):
        with contextlib.suppress(DecodeError):
            assert _is_plain(decode_message(data))


@FUZZ
@given(st.integers(min_value=MAX_DEPTH + 1, max_value=50_000), st.sampled_from([b"\x81", b"\x9f"]))
def test_nesting_past_the_cap_is_refused(depth, opener):
    closer = b"\xff" * depth if opener == b"\x9f" else b""
    with pytest.raises(DecodeError):
        decode_message(opener * depth + b"\x00" + closer)


@FUZZ
@given(
    st.sampled_from([2, 3, 4, 5]),
    st.integers(min_value=2**16, max_value=2**64 - 1),
    st.binary(max_size=32),
)
def test_giant_declared_lengths_are_refused_without_allocating_them(major, length, tail):
    from scripts.fuzzcases import head

    with pytest.raises(DecodeError):
        decode_message(head(major, length) + tail)


@FUZZ
@given(frames_any_types)
def test_frames_with_fields_of_any_type_parse_to_contract_types_or_a_contract_error(frame):
    try:
        parsed = PARSER.parse(frame)
    except FrameError as exc:
        assert exc.code in CONTRACT_ERRORS
        return
    if isinstance(parsed, Send):
        assert isinstance(parsed.id, str) and 0 < len(parsed.id.encode()) <= MAX_ID_BYTES
        assert isinstance(parsed.to, str) and 0 < len(parsed.to.encode()) <= MAX_USER_BYTES
        assert (parsed.body is None) != (parsed.bodies is None)
        assert parsed.body is None or isinstance(parsed.body, bytes)
        assert isinstance(parsed.ttl, int) and not isinstance(parsed.ttl, bool)
        assert 0 < parsed.ttl <= PARSER.max_ttl
    elif isinstance(parsed, Ack):
        assert len(parsed.sids) <= MAX_LIST
        assert all(type(s) is int and 0 <= s < 2**63 for s in parsed.sids)
    elif isinstance(parsed, Read):
        assert all(isinstance(i, str) and len(i.encode()) <= MAX_ID_BYTES for i in parsed.ids)
    elif isinstance(parsed, (Subscribe, Typing)):
        users = parsed.users if isinstance(parsed, Subscribe) else (parsed.to,)
        assert all(isinstance(u, str) and len(u.encode()) <= MAX_USER_BYTES for u in users)


@settings(FUZZ, max_examples=200)
@given(st.one_of(st.binary(max_size=1024), frames_any_types.map(cbor2.dumps),
                 st.lists(frames_any_types, max_size=20).map(cbor2.dumps)))  # fmt: skip
def test_the_session_answers_any_message_with_contract_errors_or_a_close(message):
    _check_events(_authenticated_session().receive(message))
    _check_events(Session(PARSER, max_bad_frames=10).receive(message))


def test_every_hostile_generator_yields_only_contract_answers():
    rng = random.Random(7)
    for name, generate in GENERATORS.items():
        for _ in range(200):
            message = generate(rng)
            events = _authenticated_session().receive(message)
            _check_events(events)
            assert events or message == b"\x80", name  # only an empty batch asks nothing


def test_floats_that_json_has_no_place_for_are_still_plain_cbor():
    # NaN and infinities are valid CBOR floats: decoded, then refused by the field rules.
    item = decode_message(cbor2.dumps({"t": "send", "ttl": math.inf}))
    with pytest.raises(FrameError) as refused:
        PARSER.parse({**item, "id": "a", "to": "b", "body": b""})
    assert refused.value.code == "bad_field"


async def test_a_gateway_process_survives_socket_fuzzing_and_others_are_unaffected(
    tmp_path, process_store
):
    async with open_store(process_store, tmp_path) as store:
        gateway = GatewayProcess(tmp_path / "gateway", server=GATEWAY_SERVER, store=store.toml)
        await gateway.astart()
        try:
            report = await run_fuzz(gateway, cases=1200, seed=11)
        finally:
            await gateway.astop(grace=30)
    assert report.failures(rss_limit_kib=64 * 1024) == [], report.summary()
    assert report.cases == 1200
    assert report.observer_messages > 0
    # The run reached every defence: too large, text, policy (frames before hello).
    assert {1003, 1008, 1009} <= set(report.closes), report.summary()
    assert report.error_codes["bad_frame"] > 0 and report.error_codes["bad_field"] > 0

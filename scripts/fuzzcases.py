"""Hostile WebSocket messages for protocol fuzzing, drawn from a seeded random generator.

Each generator returns the bytes of one WebSocket message. Together they cover what a
decoder of untrusted CBOR must survive: random bytes, truncated items, deep nesting, giant
declared lengths, huge strings, invalid UTF-8, every kind of CBOR tag (cbor2 turns some
into dates, big numbers, regular expressions, sets or shared references), odd simple
values, out-of-place break codes, and valid-looking frames with fields of the wrong type.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from typing import Any

import cbor2

# Tags cbor2 decodes into objects natively, plus ones it leaves as CBORTag.
TAGS = (0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37, 38,
        100, 256, 258, 260, 261, 262, 263, 1001, 1004, 55799, 2**32, 2**64 - 1)  # fmt: skip
GIANT = (2**16, 2**31, 2**32 - 1, 2**63, 2**64 - 1)
INVALID_UTF8 = (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80",
                b"\xe2\x82", b"abc\x80")  # fmt: skip
ODD_SIMPLE = (b"\xf7", b"\xf0", b"\xf3", b"\xf8\x20", b"\xf8\xff", b"\xf9\x7e\x00",
              b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00", b"\xff", b"\x1c", b"\x1f", b"\x5f\x01\xff",
              b"\x7f\x41\xff", b"\x9f", b"\xbf\x61", b"\xdf")  # fmt: skip
WRONG_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 2**63, 2**64 - 1, -(2**64), 1.5, math.nan, math.inf, -0.0, b"",
    b"\x00" * 70, "", "x" * 200, "\u0000", "\U0001f600" * 40, [], [None], {}, {"t": "send"},
    [[[[]]]], {"": b""},
)  # fmt: skip


def head(major: int, n: int) -> bytes:
    """A CBOR initial byte (and argument) of major type `major` with argument `n`."""
    if n < 24:
        return bytes([major << 5 | n])
    for ai, fmt, limit in ((24, "!B", 2**8), (25, "!H", 2**16), (26, "!I", 2**32)):
        if n < limit:
            return bytes([major << 5 | ai]) + struct.pack(fmt, n)
    return bytes([major << 5 | 27]) + struct.pack("!Q", n)


def text(s: str) -> bytes:
    """A CBOR text string."""
    raw = s.encode()
    return head(3, len(raw)) + raw


def frame_templates(rng: random.Random) -> list[dict[str, Any]]:
    """One plausible instance of every client frame type (addressed to nobody real)."""
    nobody = f"nobody-{rng.randrange(1000)}"
    return [
        {"t": "send", "id": f"f{rng.randrange(10**9)}", "to": nobody, "body": rng.randbytes(8)},
        {"t": "send", "id": "f", "to": nobody, "bodies": {"a": b"1", "b": b"2"}, "ttl": 60},
        {"t": "ack", "sids": [rng.randrange(1, 10**6) for _ in range(rng.randrange(4))]},
        {"t": "read", "to": nobody, "ids": ["a", "b"]},
        {"t": "typing", "to": nobody, "on": True},
        {"t": "sub", "users": [nobody]},
        {"t": "unsub", "users": [nobody]},
        {"t": "state", "active": False},
        {"t": "privacy", "hide_presence": False},
        {"t": "push", "provider": "fcm", "token": "tok"},
        {"t": "push", "provider": None},
        {"t": "hello", "v": 1, "token": "x.y.z"},
        {"t": f"future-{rng.randrange(100)}", "x": 1},
    ]


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 2, 3, 5, 9, 17, 64, 512, 4096)))


def truncated(rng: random.Random) -> bytes:
    encoded = cbor2.dumps(rng.choice(frame_templates(rng)))
    return encoded[: rng.randrange(len(encoded))]


def deep_nesting(rng: random.Random) -> bytes:
    depth = rng.choice((9, 10, 64, 1000, 15000))
    style = rng.randrange(4)
    if style == 0:
        return b"\x81" * depth + b"\x00"
    if style == 1:
        return b"\xa1\x61k" * depth + b"\x00"
    if style == 2:
        return b"\x9f" * depth + b"\xff" * depth
    # nesting inside a frame's field
    return b"\xa2" + text("t") + text("ack") + text("sids") + b"\x81" * depth + b"\x01"


def giant_lengths(rng: random.Random) -> bytes:
    major = rng.choice((2, 3, 4, 5))
    item = head(major, rng.choice(GIANT)) + rng.randbytes(rng.randrange(16))
    if rng.random() < 0.5:
        return item
    return b"\xa3" + text("t") + text("send") + text("id") + text("g") + text("body") + item


def huge_strings(rng: random.Random) -> bytes:
    size = rng.choice((1000, 30_000, 60_000))
    field = rng.choice(("id", "to", "body", "token", "users", "bodies"))
    frame: dict[str, Any] = {"t": "send", "id": "h", "to": "nobody-huge", "body": b""}
    if field == "body":
        frame["body"] = b"\x00" * size
    elif field == "users":
        frame = {"t": "sub", "users": ["u" * 100] * (size // 100)}
    elif field == "bodies":
        frame["bodies"] = {f"d{i}": b"x" * 50 for i in range(size // 60)}
        del frame["body"]
    elif field == "token":
        frame = {"t": "hello", "v": 1, "token": "t" * size}
    else:
        frame[field] = "s" * size
    return cbor2.dumps(frame)


def invalid_utf8(rng: random.Random) -> bytes:
    bad = rng.choice(INVALID_UTF8)
    where = rng.randrange(3)
    if where == 0:
        return head(3, len(bad)) + bad
    if where == 1:  # as a map key
        return b"\xa1" + head(3, len(bad)) + bad + b"\x01"
    return b"\xa2" + text("t") + text("typing") + text("to") + head(3, len(bad)) + bad


def tagged(rng: random.Random) -> bytes:
    tag = rng.choice(TAGS) if rng.random() < 0.9 else rng.randrange(2**64)
    content = rng.choice((
        cbor2.dumps(1_700_000_000), cbor2.dumps("2024-01-01T00:00:00Z"), cbor2.dumps(b"\x01" * 9),
        cbor2.dumps("a+"), cbor2.dumps([1, 2, 3]), cbor2.dumps([-2, 27315]), cbor2.dumps(0),
        cbor2.dumps({"t": "ack", "sids": [1]}), cbor2.dumps("http://x"), b"\x81\xd8\x1d\x00",
    ))  # fmt: skip
    item = head(6, tag) + content
    if rng.random() < 0.5:
        return item
    key = rng.choice(("t", "sids", "to", "body", "id"))
    rest = {"t": "send", "id": "tg", "to": "nobody-tag", "body": b""}
    rest.pop(key, None)
    return head(5, len(rest) + 1) + text(key) + item + cbor2.dumps(rest)[1:]


def odd_simple_values(rng: random.Random) -> bytes:
    value = rng.choice(ODD_SIMPLE)
    if rng.random() < 0.5:
        return value
    return b"\xa2" + text("t") + text("state") + text("active") + value


def wrong_types(rng: random.Random) -> bytes:
    frame = rng.choice(frame_templates(rng))
    for _ in range(rng.randrange(1, 3)):
        key = rng.choice([*frame, "t", "extra"])
        frame[key] = rng.choice(WRONG_VALUES)
    return cbor2.dumps(frame)


def batches(rng: random.Random) -> bytes:
    size = rng.choice((0, 1, 2, 50, 2000))
    pool = [*frame_templates(rng), *WRONG_VALUES]
    return cbor2.dumps([rng.choice(pool) for _ in range(size)])


def oversized(rng: random.Random) -> bytes:
    """Past the default 64 KiB `max_message_size`: the gateway closes with 1009."""
    return cbor2.dumps({"t": "send", "id": "o", "to": "nobody", "body": rng.randbytes(70_000)})


GENERATORS: dict[str, Callable[[random.Random], bytes]] = {
    "random_bytes": random_bytes,
    "truncated": truncated,
    "deep_nesting": deep_nesting,
    "giant_lengths": giant_lengths,
    "huge_strings": huge_strings,
    "invalid_utf8": invalid_utf8,
    "tagged": tagged,
    "odd_simple_values": odd_simple_values,
    "wrong_types": wrong_types,
    "batches": batches,
    "oversized": oversized,
}


def draw(rng: random.Random) -> tuple[str, bytes]:
    """One case: the generator's name and the message."""
    name = rng.choice(list(GENERATORS))
    return name, GENERATORS[name](rng)

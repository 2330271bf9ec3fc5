"""CBOR on the wire: decode untrusted messages safely, encode outbound frames in batches.

Untrusted input is decoded with every CBOR tag refused (cbor2 would otherwise build dates,
big numbers, regular expressions, sets and more from them), nesting capped, map keys
restricted to strings, and exactly one data item per message.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import cbor2

# Frames nest at most: batch -> frame -> `bodies` map -> bytes. Eight leaves room for
# extensions while keeping hostile nesting cheap to reject.
MAX_DEPTH = 8


class DecodeError(ValueError):
    """The message is not exactly one acceptable CBOR data item."""


def _refuse_tag(decoder: Any, tag: Any = None) -> Any:
    raise DecodeError("CBOR tags are not accepted")


# cbor2 decodes these tags natively, before any tag_hook sees them; map each to a refusal.
_REFUSED_SEMANTIC_TAGS = {n: _refuse_tag for n in (*range(0, 300), *range(1000, 1010), 55799)}


def decode_message(data: bytes) -> Any:
    """Decode one WebSocket message into a Python value.

    Args:
        data: The message bytes.

    Returns:
        The decoded item: dicts with string keys, lists, str, bytes, ints, floats, bools
        or None.

    Raises:
        DecodeError: The bytes are not exactly one well-formed, tag-free CBOR item within
            the nesting limit.
    """
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_refuse_tag,
            semantic_decoders=_REFUSED_SEMANTIC_TAGS,
            max_depth=MAX_DEPTH,
            strict_hashable_types=True,
        )
        item = decoder.decode()
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises a wide family of errors on hostile input
        if isinstance(exc.__cause__, DecodeError):
            raise DecodeError(str(exc.__cause__)) from None
        raise DecodeError(_short(exc)) from None
    if stream.tell() != len(data):
        raise DecodeError("trailing bytes after the CBOR item")
    _check_plain(item)
    return item


_SCALARS = (str, bytes, int, float, bool, type(None))


def _check_plain(item: Any) -> None:
    """Refuse what JSON-like data has no place for: byte-string map keys, `undefined`
    and other simple values. Depth is already capped, so the recursion is bounded."""
    if isinstance(item, dict):
        for key, value in item.items():
            if not isinstance(key, str):
                raise DecodeError("map keys must be text strings")
            _check_plain(value)
    elif isinstance(item, list):
        for value in item:
            _check_plain(value)
    elif not isinstance(item, _SCALARS):
        raise DecodeError(f"unsupported CBOR value: {type(item).__name__}")


def encode_frames(frames: Sequence[dict[str, Any]]) -> bytes:
    """Encode outbound frames as one message: a single frame as a map, several as a batch."""
    if len(frames) == 1:
        return cbor2.dumps(frames[0])
    return cbor2.dumps(list(frames))


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."

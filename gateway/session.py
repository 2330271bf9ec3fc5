"""The sans-IO protocol session: WebSocket messages in, commands, replies and closes out.

`Session.receive` takes one WebSocket message exactly as it arrived and returns what the
connection must do about it, in order. It holds the only protocol state that does not
need I/O: whether `hello` has been seen, and how many bad frames the peer has sent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from gateway import frames
from gateway.codec import DecodeError, decode_message
from gateway.frames import ClientFrame, FrameError, FrameParser, Hello


class CloseCode(enum.IntEnum):
    """WebSocket close codes of protocol v1."""

    NORMAL = 1000
    GOING_AWAY = 1001
    TEXT_MESSAGE = 1003
    POLICY = 1008
    TOO_LARGE = 1009
    INTERNAL = 1011
    RESTARTING = 1012
    OVERLOADED = 1013
    UNAUTHORIZED = 4001
    HELLO_TIMEOUT = 4008
    REPLACED = 4009


@dataclass(frozen=True, slots=True)
class Command:
    """A valid client frame for the connection to carry out."""

    frame: ClientFrame


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame to send back at once (an `error`)."""

    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with this code; nothing after it is handled."""

    code: CloseCode
    reason: str


Event = Command | Reply | Close


class Session:
    """Protocol state of one connection, free of I/O."""

    def __init__(self, parser: FrameParser, *, max_bad_frames: int) -> None:
        self._parser = parser
        self._max_bad_frames = max_bad_frames
        self.bad_frames = 0
        self.hello_seen = False
        self.closed = False

    def receive(self, message: bytes | str) -> list[Event]:
        """Handle one WebSocket message: one frame, or a batch handled in order."""
        if self.closed:
            return []
        if isinstance(message, str):
            return self._close(CloseCode.TEXT_MESSAGE, "binary messages only")
        try:
            item = decode_message(message)
        except DecodeError as exc:
            return self._bad(FrameError("bad_frame", f"not a CBOR item: {exc}"))
        batch = item if isinstance(item, list) else [item]
        events: list[Event] = []
        for raw in batch:
            events += self._frame(raw)
            if isinstance(events[-1], Close):
                break
        return events

    def _frame(self, raw: Any) -> list[Event]:
        try:
            frame = self._parser.parse(raw)
        except FrameError as exc:
            if not self.hello_seen:
                if isinstance(raw, dict) and raw.get("t") == "hello":
                    return self._close(CloseCode.UNAUTHORIZED, "unauthorized")
                return self._close(CloseCode.POLICY, "hello must come first")
            return self._bad(exc)
        if not self.hello_seen:
            if not isinstance(frame, Hello):
                return self._close(CloseCode.POLICY, "hello must come first")
            self.hello_seen = True
            return [Command(frame)]
        if isinstance(frame, Hello):
            return self._bad(FrameError("bad_frame", "already authenticated"))
        return [Command(frame)]

    def _bad(self, exc: FrameError) -> list[Event]:
        if not self.hello_seen:
            return self._close(CloseCode.POLICY, "hello must come first")
        if exc.code != "unknown_type":  # newer clients' frames are not abuse
            self.bad_frames += 1
        reply: list[Event] = [Reply(frames.error(exc.code, exc.reason, exc.ref))]
        if self.bad_frames > self._max_bad_frames:
            return reply + self._close(CloseCode.POLICY, "too many bad frames")
        return reply

    def _close(self, code: CloseCode, reason: str) -> list[Event]:
        self.closed = True
        return [Close(code, reason)]

"""RFC 6455 conformance of the device edge, spoken byte by byte over a plain TCP socket.

No WebSocket library is involved on the client side, so every malformed frame can be
produced on purpose and every byte the server sends is seen as it is.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import struct
from contextlib import suppress
from typing import Any

import cbor2
import pytest
import trio
import trio.testing

from tests.conftest import make_settings, running_server

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BOUND = 5.0  # seconds: generous for a loopback server, short enough to catch a hang


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """One client frame; `rsv` is the 3-bit RSV1..RSV3 field (4 = RSV1, 1 = RSV3)."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawClient:
    """A WebSocket client that is only a socket, a buffer and a frame parser."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.fragments: list[bytes] | None = None
        self.fragment_opcode = 0

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buf += data
        return bool(data)

    async def _take(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._fill():
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def upgrade(
        self, path: str = "/ws", headers: dict[str, str] | None = None, then: bytes = b""
    ) -> tuple[int, dict[str, str]]:
        """Send the opening handshake (followed at once, in the same write, by `then`);
        return the status and the (lower-cased) headers. A 101 is checked for a correct
        Sec-WebSocket-Accept."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        await self.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + then)
        while b"\r\n\r\n" not in self.buf:
            assert await self._fill(), "EOF before the HTTP response"
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        found = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            found[name.strip().lower()] = value.strip()
        if status == 101:
            accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            assert found["sec-websocket-accept"] == accept
        return status, found

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next control frame or whole data message (fragments joined); None at EOF."""
        while True:
            head = await self._take(2)
            if head is None:
                return None
            fin, opcode, masked, n = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
            assert not masked, "a server frame must not be masked"
            assert head[0] & 0x70 == 0, "no extension was negotiated"
            if n >= 126:
                ext = await self._take(2 if n == 126 else 8)
                assert ext is not None, "EOF inside a frame header"
                n = int.from_bytes(ext, "big")
            payload = await self._take(n)
            assert payload is not None, "EOF inside a frame"
            if opcode >= 0x8:
                return opcode, payload
            if opcode != CONT:
                self.fragments, self.fragment_opcode = [], opcode
            assert self.fragments is not None, "server sent a stray continuation frame"
            self.fragments.append(payload)
            if fin:
                data, self.fragments = b"".join(self.fragments), None
                return self.fragment_opcode, data

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))

    async def send_cbor(self, item: Any) -> None:
        await self.send(frame(BINARY, cbor2.dumps(item)))

    async def frames_until(self, kind: str) -> list[dict[str, Any]]:
        """Protocol frames up to and including the first of type `kind`."""
        seen: list[dict[str, Any]] = []
        while True:
            got = await self.read_frame()
            assert got is not None, f"EOF before {kind!r}"
            opcode, payload = got
            assert opcode in (BINARY, PING), f"unexpected opcode {opcode:#x} before {kind!r}"
            if opcode == PING:
                continue
            item = cbor2.loads(payload)
            for f in item if isinstance(item, list) else [item]:
                seen.append(f)
                if f.get("t") == kind:
                    return seen

    async def close_code(self, *, answer: bool = True) -> int:
        """Read up to the server's close frame and return its code; answer it (echoing the
        code) unless told not to, as RFC 6455 §5.5.1 asks of the peer."""
        while True:
            got = await self.read_frame()
            assert got is not None, "EOF without a close frame"
            opcode, payload = got
            if opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                if answer:
                    # The server may already have dropped TCP: it closed first.
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.send(frame(CLOSE, payload[:2]))
                return code

    async def eof(self) -> None:
        """Read until the server ends the TCP stream, discarding data (bounded by caller)."""
        try:
            while await self._fill():
                self.buf.clear()
        except trio.BrokenResourceError:
            pass  # a reset also ends the connection

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_session(port: int, token: str) -> RawClient:
    """A client past the upgrade and `hello`, with `welcome` … `drained` read."""
    client = await RawClient.open(port)
    status, _ = await client.upgrade()
    assert status == 101
    await client.send_cbor({"t": "hello", "v": 1, "token": token})
    frames = await client.frames_until("drained")
    assert frames[0]["t"] == "welcome"
    return client


async def assert_closed_with(client: RawClient, code: int) -> None:
    """The server sends a close frame with `code`, then ends the TCP connection."""
    with trio.fail_after(BOUND):
        assert await client.close_code() == code
        await client.eof()


# ---- pings and protocol errors -------------------------------------------------------------


async def test_a_ping_after_hello_is_answered_with_a_pong_carrying_the_same_payload(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(PING, b"are you there?"))
    with trio.fail_after(BOUND):
        assert await client.read_frame() == (PONG, b"are you there?")
    await client.aclose()


async def test_an_unmasked_client_frame_closes_with_1002(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(BINARY, cbor2.dumps({"t": "typing", "to": "bob"}), mask=False))
    await assert_closed_with(client, 1002)


@pytest.mark.parametrize("rsv", [4, 2, 1], ids=["rsv1", "rsv2", "rsv3"])
async def test_a_reserved_bit_without_a_negotiated_extension_closes_with_1002(server, token, rsv):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(BINARY, cbor2.dumps({"t": "typing", "to": "bob"}), rsv=rsv))
    await assert_closed_with(client, 1002)


@pytest.mark.parametrize("opcode", [0x3, 0xB])
async def test_an_unknown_opcode_closes_with_1002(server, token, opcode):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(opcode, b"?"))
    await assert_closed_with(client, 1002)


async def test_a_fragmented_control_frame_closes_with_1002(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(PING, b"part", fin=False))
    await assert_closed_with(client, 1002)


async def test_a_control_frame_over_125_bytes_closes_with_1002(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(PING, b"x" * 126))
    await assert_closed_with(client, 1002)


async def test_a_continuation_frame_without_a_started_message_closes_with_1002(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(CONT, cbor2.dumps({"t": "typing", "to": "bob"})))
    await assert_closed_with(client, 1002)


# ---- messages --------------------------------------------------------------------------------


async def test_a_fragmented_hello_with_a_ping_between_fragments_is_reassembled(server, token):
    client = await RawClient.open(server.port)
    assert (await client.upgrade())[0] == 101
    hello = cbor2.dumps({"t": "hello", "v": 1, "token": token("alice", "phone")})
    a, b = len(hello) // 3, 2 * len(hello) // 3
    await client.send(
        frame(BINARY, hello[:a], fin=False),
        frame(PING, b"between"),
        frame(CONT, hello[a:b], fin=False),
        frame(CONT, hello[b:]),
    )
    pong = welcome = False
    with trio.fail_after(BOUND):
        while not (pong and welcome):
            got = await client.read_frame()
            assert got is not None, "EOF before the pong and the welcome"
            opcode, payload = got
            if opcode == PONG:
                assert payload == b"between"
                pong = True
            elif opcode == BINARY:
                item = cbor2.loads(payload)
                kinds = [f["t"] for f in (item if isinstance(item, list) else [item])]
                welcome = welcome or "welcome" in kinds
            else:
                pytest.fail(f"unexpected opcode {opcode:#x}")
    await client.aclose()


@pytest.mark.parametrize("sent_with_it", [1, 2, 7], ids=["byte", "header", "partial"])
async def test_hello_sent_with_the_upgrade_request_is_answered(server, token, sent_with_it):
    # Clients that do not wait for the 101 put their first frame, or part of it, in the
    # same write as the request: nothing of it may be lost.
    hello = frame(BINARY, cbor2.dumps({"t": "hello", "v": 1, "token": token("bob", "phone")}))
    client = await RawClient.open(server.port)
    with trio.fail_after(BOUND):
        status, _ = await client.upgrade(then=hello[:sent_with_it])
        assert status == 101
        await client.send(hello[sent_with_it:])
        frames = await client.frames_until("drained")
    assert frames[0]["t"] == "welcome"
    await client.aclose()


async def test_a_peer_that_resets_tcp_is_let_go_quietly(server, token, caplog):
    client = await open_session(server.port, token("bob", "phone"))
    closed = server.edge.wait_for_close
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            codes: list[int] = []

            async def watch() -> None:
                codes.append(await closed("bob", "phone"))

            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            sock = client.stream.socket  # a reset, as a network drop looks to the server
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()
    assert codes == [1000]  # not 1011: nothing went wrong inside the gateway
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_text_message_closes_with_1003(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(TEXT, b'{"t":"typing","to":"bob"}'))
    await assert_closed_with(client, 1003)


async def test_a_binary_message_over_max_message_size_closes_with_1009(tmp_path, token):
    settings = make_settings(tmp_path, server={"max_message_size": 1024})
    async with running_server(settings) as server:
        client = await open_session(server.port, token("alice", "phone"))
        await client.send(frame(BINARY, b"\x00" * 1500))
        await assert_closed_with(client, 1009)


async def test_fragments_each_under_the_limit_but_over_it_in_sum_close_with_1009(tmp_path, token):
    settings = make_settings(tmp_path, server={"max_message_size": 1024})
    async with running_server(settings) as server:
        client = await open_session(server.port, token("alice", "phone"))
        await client.send(
            frame(BINARY, b"\x00" * 600, fin=False),
            frame(CONT, b"\x00" * 600, fin=False),
            frame(CONT, b"\x00" * 600),
        )
        await assert_closed_with(client, 1009)


# ---- closing -------------------------------------------------------------------------------


async def test_the_server_close_frame_carries_its_code_and_the_server_then_ends_tcp(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(TEXT, b"not binary"))
    with trio.fail_after(BOUND):
        assert await client.close_code() == 1003
        assert await client.read_frame() is None  # nothing after the close frame but EOF


async def test_a_client_close_is_answered_with_a_close_and_the_server_ends_tcp(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.send(frame(CLOSE, close_payload(1000, b"bye")))
    with trio.fail_after(BOUND):
        assert await client.close_code(answer=False) == 1000
        assert await client.read_frame() is None


async def test_the_close_handshake_is_bounded_when_the_client_never_answers(tmp_path):
    settings = make_settings(tmp_path, server={"hello_timeout": 0.5})
    async with running_server(settings) as server:
        client = await RawClient.open(server.port)
        assert (await client.upgrade())[0] == 101
        with trio.fail_after(0.5 + BOUND):
            assert await client.close_code(answer=False) == 4008
            await client.eof()  # the server gives up waiting for our close and drops TCP


async def test_a_peer_that_half_closes_tcp_is_dropped_and_the_gateway_keeps_serving(server, token):
    client = await open_session(server.port, token("alice", "phone"))
    await client.stream.send_eof()  # shutdown(SHUT_WR): no close frame, only a TCP FIN
    with trio.fail_after(BOUND):
        await client.eof()
    await client.aclose()
    with trio.fail_after(BOUND):
        again = await open_session(server.port, token("alice", "phone"))
        await again.send(frame(PING, b"still here"))
        assert await again.read_frame() == (PONG, b"still here")
    await again.aclose()


# ---- the opening handshake -----------------------------------------------------------------


async def test_a_client_stuck_in_the_upgrade_request_is_dropped_after_handshake_timeout(
    tmp_path,
):
    settings = make_settings(tmp_path, server={"handshake_timeout": 0.5})
    async with running_server(settings) as server:
        client = await RawClient.open(server.port)
        await client.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        with trio.fail_after(0.5 + BOUND):
            await client.eof()
        assert b"101" not in client.buf


async def test_an_offered_gateway_v1_subprotocol_is_selected(server):
    client = await RawClient.open(server.port)
    status, headers = await client.upgrade(headers={"Sec-WebSocket-Protocol": "chat, gateway.v1"})
    assert status == 101
    assert headers["sec-websocket-protocol"] == "gateway.v1"
    await client.aclose()


async def test_an_upgrade_without_a_subprotocol_succeeds_with_none_selected(server):
    client = await RawClient.open(server.port)
    status, headers = await client.upgrade()
    assert status == 101
    assert "sec-websocket-protocol" not in headers
    await client.aclose()


async def test_a_path_other_than_ws_is_refused_with_404(server):
    client = await RawClient.open(server.port)
    status, _ = await client.upgrade(path="/chat")
    assert status == 404
    await client.aclose()


async def test_permessage_deflate_is_never_negotiated(server, token):
    client = await RawClient.open(server.port)
    status, headers = await client.upgrade(
        headers={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    )
    assert status == 101
    assert "sec-websocket-extensions" not in headers
    await client.send_cbor({"t": "hello", "v": 1, "token": token("alice", "phone")})
    with trio.fail_after(BOUND):
        assert (await client.frames_until("drained"))[0]["t"] == "welcome"
    await client.aclose()

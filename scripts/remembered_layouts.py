"""Redis memory and lookup time per remembered message, for several key layouts.

    python -m scripts.remembered_layouts                     # 20,000 messages, 1 recipient
    python -m scripts.remembered_layouts --messages 10 --users 2000

A remembered message is what Redis keeps after delivery until the message's TTL runs out:
enough to answer a resend of the same id (from the same sender device) with the original
ts, and to let the recipient's `read` name the id. This writes the records of `--messages`
messages to each of `--users` recipients straight into a redis-server of its own (on
127.0.0.1, stopped on the way out), one layout at a time, and reads `used_memory` before
and after. Then it times `--lookups` resends of known ids as Lua calls, from Redis's own
command statistics (microseconds per call inside Redis, so the network is left out).

The layouts:

- ``keys``: two string keys per message, ``P:id:SENDER\\0DEVICE\\0ID`` (``TS|EXPIRES``) and
  ``P:rx:SENDER\\0ID`` (``EXPIRES``), each with a Redis TTL (the layout before ``packed``);
- ``day-hash``: one hash per recipient and day of expiry, field = 12 bytes (message hash
  and device tag), value = ts and expiry (12 bytes); a lookup probes every day a live
  record may expire on (`--ttl-days` + 1 hashes);
- ``day-hash-64``: the same, each day split in 64 hashes by the message hash, so that each
  stays small enough for Redis's compact listpack encoding;
- ``day-set``: one set per recipient and day of expiry whose members are 8-byte message
  hashes (intset encoding): no ts to answer and expiry only to the day, so it is *not*
  exact; the floor that membership alone costs;
- ``packed``: what the gateway uses, one hash per recipient whose fields hold 24-byte
  records, as many fields as keep each short (written by the gateway's own Lua; see
  `gateway.store.redis_scripts`).

Every run measures every layout in the same invocation, so the figures compare.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import coredis
import trio

from gateway.store.redis_scripts import RECORDS, naming
from scripts.kit.redis_server import RedisServer

T0 = 1_700_000_000_000
DAY_MS = 24 * 3600 * 1000
PIPELINE = 1000  # commands per round trip while filling

REMEMBER = (
    RECORDS
    + """
local rec, salt, k, new = record(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
local _, recs = lookup(KEYS[1], rec, k, tonumber(ARGV[5]))
remember(KEYS[1], rec, salt, k, new, recs, tonumber(ARGV[5]), tonumber(ARGV[6]))
"""
)
LOOKUPS = {
    "keys": """
local v = redis.call('GET', KEYS[1])
return v and 1 or 0
""",
    "day-hash": """
for d = 0, tonumber(ARGV[2]) do
  local v = redis.call('HGET', KEYS[1] .. (tonumber(ARGV[3]) + d), ARGV[1])
  if v then return 1 end
end
return 0
""",
    "day-hash-64": """
for d = 0, tonumber(ARGV[2]) do
  local v = redis.call('HGET', KEYS[1] .. (tonumber(ARGV[3]) + d) .. ':' .. ARGV[4], ARGV[1])
  if v then return 1 end
end
return 0
""",
    "day-set": """
for d = 0, tonumber(ARGV[2]) do
  if redis.call('SISMEMBER', KEYS[1] .. (tonumber(ARGV[3]) + d), ARGV[1]) == 1 then return 1 end
end
return 0
""",
    "packed": RECORDS
    + """
local rec, _, k = record(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return lookup(KEYS[1], rec, k, 0) and 1 or 0
""",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000, help="per recipient (default 20,000)")
    p.add_argument("--users", type=int, default=1, help="recipients (default 1)")
    p.add_argument("--senders", type=int, default=20, help="sending devices (default 20)")
    p.add_argument("--ttl-days", type=int, default=30, help="message TTL in days (default 30)")
    p.add_argument("--lookups", type=int, default=2000, help="timed resends (default 2,000)")
    args = p.parse_args(argv)
    if min(args.messages, args.users, args.senders, args.ttl_days, args.lookups) < 1:
        p.error("every count must be at least 1")
    return args


class Message:
    """One remembered message and the ways each layout names it."""

    def __init__(self, user: str, n: int, senders: int, ttl_days: int) -> None:
        self.user, self.sender, self.device = user, f"sender-{n % senders}", "phone"
        self.msg_id = f"{n:08d}-0a1b2c3d-4e5f-6789-abcd-ef0123456789"  # uuid-like
        self.ts = T0 + n * 1000
        self.expires = self.ts + ttl_days * DAY_MS
        self.naming = naming(self.sender, self.device, self.msg_id, self.ts, self.expires)
        # The other layouts' message hash and device tag, unsalted.
        text, _, stamps, _ = self.naming
        assert isinstance(stamps, bytes)
        self.hash = hashlib.blake2b(str(text).encode(), digest_size=8).digest()
        tag = hashlib.blake2b(self.device.encode(), digest_size=4).digest()
        self.record = self.hash + tag + stamps
        self.day = self.expires // DAY_MS
        self.prefix = "gw:{" + user + "}"


def fill(layout: str, msg: Message, pipe: Any, packed: str) -> None:
    """Queue on `pipe` the commands that remember `msg` in `layout` (``packed`` through the
    gateway's own Lua, whose sha is `packed`)."""
    p, ttl = msg.prefix, msg.expires - msg.ts
    if layout == "keys":
        pipe.set(f"{p}:id:{msg.sender}\0{msg.device}\0{msg.msg_id}", f"{msg.ts}|{msg.expires}",
                 px=ttl)  # fmt: skip
        pipe.set(f"{p}:rx:{msg.sender}\0{msg.msg_id}", str(msg.expires), px=ttl)
        return
    # A day's key expires at the end of the day, relative to the message's ts.
    day_ttl = (msg.day + 1) * DAY_MS - msg.ts
    if layout in ("day-hash", "day-hash-64"):
        key = f"{p}:m:{msg.day}"
        if layout == "day-hash-64":
            key += f":{msg.hash[0] % 64}"
        pipe.hset(key, {msg.record[:12]: msg.record[12:]})
        pipe.pexpire(key, day_ttl)
    elif layout == "day-set":
        key = f"{p}:s:{msg.day}"
        pipe.sadd(key, [int.from_bytes(msg.hash, "big", signed=True)])
        pipe.pexpire(key, day_ttl)
    else:
        pipe.evalsha(packed, keys=[f"{p}:m"], args=[*msg.naming, msg.ts, ttl])


def lookup(layout: str, msg: Message, ttl_days: int) -> tuple[list[str], list[str | bytes | int]]:
    """KEYS and ARGV of the Lua lookup of `msg` in `layout`, as a resend would run it."""
    p, first_day = msg.prefix, msg.ts // DAY_MS
    if layout == "keys":
        return [f"{p}:id:{msg.sender}\0{msg.device}\0{msg.msg_id}"], []
    if layout == "day-hash":
        return [f"{p}:m:"], [msg.record[:12], ttl_days, first_day]
    if layout == "day-hash-64":
        return [f"{p}:m:"], [msg.record[:12], ttl_days, first_day, msg.hash[0] % 64]
    if layout == "day-set":
        return [f"{p}:s:"], [int.from_bytes(msg.hash, "big", signed=True), ttl_days, first_day]
    argv: list[str | bytes | int] = [*msg.naming]
    return [f"{p}:m"], argv


async def measure(args: argparse.Namespace, url: str) -> None:
    users = [f"user-{n}" for n in range(args.users)]
    messages = [
        Message(user, n, args.senders, args.ttl_days)
        for user in users
        for n in range(args.messages)
    ]
    total = len(messages)
    print(f"{total:,} messages: {args.messages:,} to each of {args.users:,} recipients")
    print(
        f"{'layout':12} {'B/message':>10} {'(used_memory)':>13} {'keys/message':>13} "
        f"{'lookup µs':>10}  encodings"
    )
    async with coredis.Redis.from_url(url, decode_responses=False) as client:
        for layout, script in LOOKUPS.items():
            await client.flushall()
            base = int((await client.info("memory"))["used_memory"])
            # Filled through connections of their own, closed before the measurement so
            # that their buffers are not counted.
            async with coredis.Redis.from_url(url) as filler:
                packed = (await filler.script_load(REMEMBER)).decode()
                for start in range(0, total, PIPELINE):
                    async with filler.pipeline(transaction=False) as pipe:
                        for m in messages[start : start + PIPELINE]:
                            fill(layout, m, pipe, packed)
            await trio.sleep(0.2)  # Redis has let go of the closed connections
            used = int((await client.info("memory"))["used_memory"]) - base
            keys = int(await client.dbsize())
            names = [k async for k in client.scan_iter(count=1000)]
            usage = 0
            for start in range(0, len(names), PIPELINE):
                async with client.pipeline(transaction=False) as pipe:
                    asked = [
                        pipe.memory_usage(k, samples=0) for k in names[start : start + PIPELINE]
                    ]
                for answer in asked:
                    usage += int(await answer or 0)
            encodings = sorted({(await client.object_encoding(k) or b"").decode() for k in names})
            sha = await client.script_load(script)
            await client.config_resetstat()
            step = max(1, total // args.lookups)
            for m in messages[::step][: args.lookups]:
                keys_, argv = lookup(layout, m, args.ttl_days)
                found = await client.evalsha(sha, keys=keys_, args=argv)
                assert found == 1, f"{layout}: a remembered message was not found"
            stats = await client.info("commandstats")
            usec = float(_stat(stats, "evalsha").get("usec_per_call", "nan"))
            print(f"{layout:12} {usage / total:>10,.1f} {used / total:>13,.1f} "
                  f"{keys / total:>13.3f} {usec:>10.1f}  {', '.join(encodings)}",
                  flush=True)  # fmt: skip


def _stat(stats: Mapping[str, object], name: str) -> dict[str, str]:
    """One command's statistics from INFO commandstats, however the client parsed them."""
    entry = stats.get(f"cmdstat_{name}", {})
    if isinstance(entry, dict):
        return {str(k): str(v) for k, v in entry.items()}
    return dict(part.split("=", 1) for part in str(entry).split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement; the exit status is 0 when it completed."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="remembered-layouts-") as tmp:
        redis = RedisServer(Path(tmp), appendfsync="everysec")
        redis.start()
        try:
            trio.run(measure, args, redis.url)
        finally:
            redis.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

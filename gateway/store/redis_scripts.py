"""The Lua scripts of the Redis backend, and the key layout they share.

Every key of one user carries the hash tag ``{user}``: the device list, each device's
record, queue and sid counter, and the records of messages sent *to* that user. A
script therefore only ever touches one slot, which Redis Cluster requires, and a send to
every device of a user (plus its idempotency record) is one atomic step, like
Signal-Server's insert script.

Layout, with ``P = "gw:{" + user + "}"``:

- ``P:devs``: hash, device -> created (ms);
- ``P:d:DEVICE``: hash with ``seen`` (last seen) and the push token fields
  ``pp`` (provider), ``pt`` (token), ``ptopic``, ``psb`` (sandbox), ``pra`` (registered at);
- ``P:q:DEVICE``: sorted set, score = sid, member = ``EXPIRES|SID|PAYLOAD`` (the
  payload is CBOR, see `gateway.store.redis`); the sid inside the member keeps members
  unique and lets a script read the expiry without decoding the payload;
- ``P:seq:DEVICE``: the device's sid counter; never deleted, so sids are never reused;
- ``P:m``: the messages sent to this user, remembered until they expire: a hash of
  24-byte records (an 8-byte hash of ``SENDER\\0ID``, a 4-byte tag of the sending device,
  the ts and the expiry), concatenated in fields named by the first bits of the message
  hash, and the ``salt`` the hashes are made with (see `RECORDS`). A record answers a
  resend from the same device with the original ts (idempotency), and lets this user's
  `read` name the id, whatever the sending device.
  Expired records are dropped when their field is next written and by the expiry sweep
  (`COMPACT`); the hash has a Redis TTL as long as its longest record, plus slack;
- ``P:rev:DEVICE``: when the device was last revoked (ms); never expires;
- ``P:node:DEVICE``: ``NODE|CONNECTION`` where the device is connected, with a TTL that
  the node's heartbeat renews (the device -> node registry);
- ``P:seen``, ``P:grace``, ``P:hidden``: the user's last-seen time, a key that lives for
  the offline grace period after the last disconnect, and the hidden flag (presence).

A group's keys carry the hash tag ``{group}`` after a prefix of their own, so that no
group key can be mistaken for a user's; with ``G = "gwg:{" + group + "}"``:

- ``G:meta``: when the group was created (ms); its existence is the group's;
- ``G:members``: set of the member user ids;
- ``G:bseq``: the group's body counter; never deleted;
- ``G:b:BID``: hash with ``b`` (a group message's body, stored once) and ``r`` (how many
  queue items still point to it, plus one while its send is in progress); deleted when
  ``r`` reaches 0, and with a Redis TTL as long as the message's, plus slack;
- ``G:m``: the group messages stored for every member, remembered as in ``P:m``: the
  group-wide idempotency records;
- ``G:pending``: list of membership changes whose `group` events are not known to be
  queued yet (see `GROUP_CHANGE`); it outlives the group's deletion.

A group message's queue items live in each member's own slot (``P:q:DEVICE``), written
by the `SEND` script one member at a time with a payload that names ``(group, BID)``
instead of carrying the body; the body is read from the group's slot at delivery. So
every script call touches one slot: a group send is three steps (the group's slot:
check and store the body; each member's slot: queue; the group's slot: settle the
count and record the id), and an ack of group items releases their bodies in a step of
its own after the items are deleted.

Channels: ``gw:node:NODE`` carries kicks (``k``) and revocations (``r``, published by the
admin API) to one node, and its doorbells (``b``) on a single Redis; on Redis Cluster the
doorbells go on the node's sharded channel ``gw:{node:NODE}:bells``. Scripts return the
doorbells, which the caller publishes (see `RING`). ``gw:events`` tells every node of
connects (``c``), disconnects (``d``) and hidden changes (``h``). A device is written
``LEN:USERLEN:DEVICE`` in messages.

The layout before ``P:m`` and ``G:m`` kept two string keys per message in the
recipient's slot, ``P:id:SENDER\\0SENDER_DEVICE\\0ID`` (``TS|EXPIRES``) and
``P:rx:SENDER\\0ID`` (``EXPIRES``), and ``G:id:SENDER\\0SENDER_DEVICE\\0ID`` per group
message, each with the message's TTL. The scripts still read them (never write them), so
that records written before an upgrade are honoured until they expire.

A 64-bit message hash may collide: for a user holding n live records, a new message is
taken for a duplicate of another (or a `read` names an id never received) with a chance
of about n / 2**64 per message, 5 in 10**14 for a million records. Two devices of one
sender that send the same id are told apart by their 32-bit tags, which coincide with a
chance of 2**-32.

Queue keys also get a Redis TTL as long as their longest-lived item (plus slack), so the
data of a device that never comes back disappears by itself; the logical expiry that
reads and sweeps apply uses the times the gateway passes in.
"""

from __future__ import annotations

import secrets

# Keys of a queue outlive their longest item by this much (ms), so that Redis's own
# expiry never removes an item before the gateway's clock says it expired.
KEY_TTL_SLACK_MS = 3_600_000

# Bytes of one remembered-message record, and the records a field holds at most before
# its hash grows one bit deeper (see `RECORDS`).
RECORD_SIZE = 24
SPLIT_RECORDS = 64

# Shared by the scripts that queue items: tell the caller where the device is (0:
# nowhere, 1: on the calling node), or, for a device connected to another node, that
# node's name and the doorbell to publish to it. The caller publishes it after the call:
# a script may touch one slot only, and on Redis Cluster the doorbell goes to the shard of
# the node's sharded channel, not through every node of the cluster.
RING = """
local function ring(prefix, user, d, node, urgent, member)
  local loc = redis.call('GET', prefix .. ':node:' .. d)
  if not loc then return 0 end
  local n = string.match(loc, '^([^|]*)|')
  if n == node then return 1 end
  return {n, 'b' .. #user .. ':' .. user .. #d .. ':' .. d .. urgent .. member}
end
"""

# Remembered messages (see the module docstring). A record is RECORD bytes: the message
# hash (8 bytes, of SENDER\0ID), a device tag (4, of SENDER_DEVICE), the ts and the expiry
# (6 each, big-endian ms). Hash and tag are SHA-1 of the `salt` of the hash holding the
# record followed by the text (the salt is random, written with its first record and kept
# while it lives), so that nobody can choose ids whose records crowd one field. A hash
# P:m holds a user's records, concatenated in fields named by the first `depth` bits of
# the message hash (a decimal number; `depth`, a field of its own, is 0 while absent). A
# field longer than SPLIT records makes the hash one bit deeper, every record moving to
# its field at the new depth: fields stay short (a lookup reads one) and few (each costs
# Redis about 50 B), whether a user has ten records or a million. `record` makes a
# message's record from its text, device, ts and expiry (12 bytes) and a fresh salt (used
# if the hash has none yet), and returns it with the salt, the depth and whether the salt
# is new; `lookup` finds a live record (expires > now) of the message, from that device,
# and returns its ts (or nil) and the field it read; `remember` adds the record to that
# field, dropping its expired records, and keeps the hash alive as long as its longest
# record plus slack.
RECORDS = """
local function stamp(s, i)
  local a, b, c, d, e, f = string.byte(s, i, i + 5)
  return ((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f
end
local function bytes4(x)
  return math.floor(x / 16777216), math.floor(x / 65536) % 256, math.floor(x / 256) % 256, x % 256
end
local function digest(salt, text, n)
  local hex = redis.sha1hex(salt .. text)
  if n == 4 then return string.char(bytes4(tonumber(string.sub(hex, 1, 8), 16))) end
  local a, b, c, d = bytes4(tonumber(string.sub(hex, 1, 8), 16))
  return string.char(a, b, c, d, bytes4(tonumber(string.sub(hex, 9, 16), 16)))
end
local function record(key, text, dev, stamps, fresh)
  local meta = redis.call('HMGET', key, 'salt', 'depth')
  local salt = meta[1] or fresh
  local rec = digest(salt, text, 8) .. digest(salt, dev, 4) .. stamps
  return rec, salt, tonumber(meta[2] or '0'), not meta[1]
end
local function field(h, k)
  local a, b = string.byte(h, 1, 2)
  return tostring(math.floor((a * 256 + b) / 2 ^ (16 - k)))
end
local function find(recs, h, dev, now)
  local pos = 1
  while true do
    local i = string.find(recs, h, pos, true)
    if not i then return nil end
    if (i - 1) % RECORD == 0 and (not dev or string.sub(recs, i + 8, i + 11) == dev)
        and stamp(recs, i + 18) > now then
      return stamp(recs, i + 12)
    end
    pos = i + 1
  end
end
local function lookup(key, rec, k, now)
  local recs = redis.call('HGET', key, field(rec, k)) or ''
  return find(recs, string.sub(rec, 1, 8), string.sub(rec, 9, 12), now), recs
end
local function live(recs, now)
  local kept = {}
  for i = 1, #recs, RECORD do
    if stamp(recs, i + 18) > now then kept[#kept + 1] = string.sub(recs, i, i + RECORD - 1) end
  end
  return table.concat(kept)
end
local function deepen(key, k, f, recs, now)
  local parts = {}
  local function add(v)
    for j = 1, #v, RECORD do
      local r = string.sub(v, j, j + RECORD - 1)
      local g = field(r, k)
      if not parts[g] then parts[g] = {} end
      table.insert(parts[g], r)
    end
  end
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i] ~= 'depth' and all[i] ~= 'salt' and all[i] ~= f then add(live(all[i + 1], now)) end
  end
  add(recs)
  local salt = redis.call('HGET', key, 'salt')
  redis.call('DEL', key)
  local args = {'depth', k, 'salt', salt}
  for g, rs in pairs(parts) do
    args[#args + 1] = g
    args[#args + 1] = table.concat(rs)
    if #args >= 1000 then
      redis.call('HSET', key, unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
end
local function remember(key, rec, salt, k, new, recs, now, keyttl)
  if new then redis.call('HSET', key, 'salt', salt) end
  local f = field(rec, k)
  recs = live(recs, now) .. rec
  local pttl = redis.call('PTTL', key)
  if #recs <= SPLIT * RECORD or k >= 16 then
    redis.call('HSET', key, f, recs)
    if pttl < keyttl then redis.call('PEXPIRE', key, keyttl) end
  else
    deepen(key, k + 1, f, recs, now)
    redis.call('PEXPIRE', key, math.max(pttl, keyttl))
  end
end
""".replace("RECORD", str(RECORD_SIZE)).replace("SPLIT", str(SPLIT_RECORDS))

# KEYS: P:devs, P:m, and the message's P:id: key of the layout before P:m (read only: a
# record it still holds is honoured until it expires). ARGV: P, ts, expires, urgent-flag,
# own device ("" for none), mode ("a" all / "p" per device / "g" all, for a group), user,
# node, the message's text ``SENDER\0ID``, SENDER_DEVICE, ts and expiry (12 bytes) and a
# fresh salt (see `RECORDS`), then the payload (modes a and g) or pairs device, payload
# (mode p); mode g adds the payload that doorbells carry (a group item is
# stored naming its body, and rung with the body in it, so that no node reads it back).
# Returns {0, ts} for a duplicate, {-1} for an unknown recipient, else
# {1, nskipped, skipped..., device, sid, where, device, sid, where, ...}.
SEND = (
    RING
    + RECORDS
    + """
local prefix, ts, expires, urgent, own, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local user, node = ARGV[7], ARGV[8]
local rec, salt, k, new = record(KEYS[2], ARGV[9], ARGV[10], ARGV[11], ARGV[12])
local pts, recs = lookup(KEYS[2], rec, k, tonumber(ts))
if pts then return {0, pts} end
local prev = redis.call('GET', KEYS[3])
if prev then
  local pts, pexp = string.match(prev, '^(%d+)|(%d+)$')
  if tonumber(pexp) > tonumber(ts) then
    return {0, pts}
  end
end
local devs = redis.call('HKEYS', KEYS[1])
if #devs == 0 then
  return {-1}
end
local ttl = tonumber(expires) - tonumber(ts)
if ttl < 1 then ttl = 1 end
local known = {}
for _, d in ipairs(devs) do known[d] = true end
local targets = {}
local skipped = {}
if mode ~= 'p' then
  for _, d in ipairs(devs) do
    if d ~= own then targets[#targets + 1] = {d, ARGV[13]} end
  end
else
  for i = 13, #ARGV, 2 do
    local d = ARGV[i]
    if known[d] and d ~= own then
      targets[#targets + 1] = {d, ARGV[i + 1]}
    else
      skipped[#skipped + 1] = d
    end
  end
end
local keyttl = ttl + KEY_TTL_SLACK
remember(KEYS[2], rec, salt, k, new, recs, tonumber(ts), keyttl)
local out = {1, #skipped}
for _, d in ipairs(skipped) do out[#out + 1] = d end
for _, t in ipairs(targets) do
  local sid = redis.call('INCR', prefix .. ':seq:' .. t[1])
  local q = prefix .. ':q:' .. t[1]
  local member = expires .. '|' .. sid .. '|' .. t[2]
  redis.call('ZADD', q, sid, member)
  if redis.call('PTTL', q) < keyttl then redis.call('PEXPIRE', q, keyttl) end
  local rung = member
  if mode == 'g' then rung = expires .. '|' .. sid .. '|' .. ARGV[14] end
  out[#out + 1] = t[1]
  out[#out + 1] = sid
  out[#out + 1] = ring(prefix, user, t[1], node, urgent, rung)
end
return out
""".replace("KEY_TTL_SLACK", str(KEY_TTL_SLACK_MS))
)

# Those of the ids that SENDER sent to this user and that are unexpired at ARGV[1]: a live
# record in P:m (KEYS[1]), whatever the sending device, or, from the layout before P:m, a
# live P:rx: key (KEYS[2] is its prefix "P:rx:SENDER\0"; the keys are built here, all in
# the reader's slot). ARGV: now, SENDER, then the ids.
RECEIVED = (
    RECORDS
    + """
local now, sender, out, fields = tonumber(ARGV[1]), ARGV[2], {}, {}
local meta = redis.call('HMGET', KEYS[1], 'salt', 'depth')
local salt, k = meta[1], tonumber(meta[2] or '0')
for i = 3, #ARGV do
  local h, f = '', ''
  if salt then
    h = digest(salt, sender .. '\\0' .. ARGV[i], 8)
    f = field(h, k)
    if fields[f] == nil then fields[f] = redis.call('HGET', KEYS[1], f) or '' end
  end
  if salt and find(fields[f], h, false, now) then
    out[#out + 1] = ARGV[i]
  else
    local e = redis.call('GET', KEYS[2] .. ARGV[i])
    if e and tonumber(e) > now then out[#out + 1] = ARGV[i] end
  end
end
return out
"""
)

# Drop the expired records of a P:m hash (KEYS[1]) at ARGV[1]; returns how many. Deletes
# fields left empty, and the hash once it holds no record.
COMPACT = (
    RECORDS
    + """
local now, gone, left = tonumber(ARGV[1]), 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= 'depth' and all[i] ~= 'salt' then
    local kept = live(all[i + 1], now)
    if #kept < #all[i + 1] then
      gone = gone + (#all[i + 1] - #kept) / RECORD_SIZE
      if kept == '' then
        redis.call('HDEL', KEYS[1], all[i])
      else
        redis.call('HSET', KEYS[1], all[i], kept)
      end
    end
    left = left + #kept
  end
end
if left == 0 then redis.call('DEL', KEYS[1]) end
return gone
""".replace("RECORD_SIZE", str(RECORD_SIZE))
)

# One receipt item for every device of the user but ARGV[7] (if given). KEYS[1] = P:devs.
# ARGV: P, ts, expires, payload, user, node[, skip]. Returns {device, sid, where, ...}.
RECEIPTS = (
    RING
    + """
local prefix, ts, expires, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local user, node, skip = ARGV[5], ARGV[6], ARGV[7] or ''
local ttl = tonumber(expires) - tonumber(ts)
if ttl < 1 then ttl = 1 end
local keyttl = ttl + KEY_TTL_SLACK
local out = {}
for _, d in ipairs(redis.call('HKEYS', KEYS[1])) do
  if d ~= skip then
    local sid = redis.call('INCR', prefix .. ':seq:' .. d)
    local q = prefix .. ':q:' .. d
    local member = expires .. '|' .. sid .. '|' .. payload
    redis.call('ZADD', q, sid, member)
    if redis.call('PTTL', q) < keyttl then redis.call('PEXPIRE', q, keyttl) end
    out[#out + 1] = d
    out[#out + 1] = sid
    out[#out + 1] = ring(prefix, user, d, node, '0', member)
  end
end
return out
""".replace("KEY_TTL_SLACK", str(KEY_TTL_SLACK_MS))
)

# The members of a queue with these sids (ARGV), for an ack to read before it deletes.
PEEK = """
local out = {}
for _, sid in ipairs(ARGV) do
  local m = redis.call('ZRANGEBYSCORE', KEYS[1], sid, sid)
  if m[1] then out[#out + 1] = m[1] end
end
return out
"""

# Up to ARGV[3] unexpired members (expires > ARGV[2]) with sid > ARGV[1], in sid order.
FETCH = """
local after, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
while #out < limit do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. after, '+inf', 'LIMIT', 0, limit)
  if #page == 0 then break end
  for _, m in ipairs(page) do
    local e, sid = string.match(m, '^(%d+)|(%d+)|')
    after = sid
    if tonumber(e) > now then
      out[#out + 1] = m
      if #out >= limit then break end
    end
  end
  if #page < limit then break end
end
return out
"""

# How many members of a queue are unexpired at ARGV[1].
COUNT = """
local now, n = tonumber(ARGV[1]), 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if tonumber(string.match(m, '^(%d+)|')) > now then n = n + 1 end
end
return n
"""

# Delete the members of a queue that expired by ARGV[1]; returns how many.
PRUNE = """
local now, gone = tonumber(ARGV[1]), {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if tonumber(string.match(m, '^(%d+)|')) <= now then gone[#gone + 1] = m end
end
for i = 1, #gone, 500 do
  redis.call('ZREM', KEYS[1], unpack(gone, i, math.min(i + 499, #gone)))
end
return #gone
"""

# Delete exactly these members (as read by PEEK) from a queue; returns how many.
REMOVE_MEMBERS = """
local n = 0
for i = 1, #ARGV, 500 do
  n = n + redis.call('ZREM', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
return n
"""

# Register a device. KEYS: P:devs, P:d:DEVICE. ARGV: device, now. Returns 1 if new.
REGISTER = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[2], 'seen', ARGV[2])
  return 1
end
return 0
"""

# Everything a hello needs, in one call. KEYS: P:rev:D, P:devs, P:d:D, P:q:D. ARGV:
# device, now, issued at ("" when unknown), limit. Refuses (returns {1}) a token issued at
# or before the device's revocation, touching nothing; otherwise registers the device as
# REGISTER does and returns {0, count, members...}: the unexpired members (expires > now)
# in all, and the first `limit` of them with sid > 0 in sid order, as FETCH after 0 and
# COUNT would, in one pass over the queue.
OPEN = """
local device, now, issued, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local rev = redis.call('GET', KEYS[1])
if rev and (issued == '' or tonumber(issued) <= tonumber(rev)) then
  return {1}
end
if redis.call('HSETNX', KEYS[2], device, now) == 1 then
  redis.call('HSET', KEYS[3], 'seen', now)
end
now = tonumber(now)
local out, n = {0, 0}, 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  local e, sid = string.match(m, '^(%d+)|(%d+)|')
  if tonumber(e) > now then
    n = n + 1
    if #out - 2 < limit and tonumber(sid) > 0 then out[#out + 1] = m end
  end
end
out[2] = n
return out
"""

# Append to `out` the members of a queue that name a group message's body (their payload
# is a CBOR array of 9, first byte 0x89): whoever deletes the queue releases their holds.
HELD_BODIES = """
local function held_bodies(queue, out)
  for _, m in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
    if string.match(m, '^%d+|%d+|\\137') then out[#out + 1] = m end
  end
  return out
end
"""

# Forget a device and its queue (its sid counter stays). KEYS: P:devs, P:d:D, P:q:D.
# Returns {1 if it existed (else 0), then the members of its queue that named a body}.
REMOVE = (
    HELD_BODIES
    + """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  local out = held_bodies(KEYS[3], {1})
  redis.call('DEL', KEYS[2], KEYS[3])
  return out
end
return {0}
"""
)

# Forget a device and its queue, and record when it was revoked (the later of two).
# KEYS: P:devs, P:d:D, P:q:D, P:rev:D. ARGV: device, now. Returns what REMOVE does.
REVOKE = (
    HELD_BODIES
    + """
local out = held_bodies(KEYS[3], {redis.call('HDEL', KEYS[1], ARGV[1])})
redis.call('DEL', KEYS[2], KEYS[3])
local prev = redis.call('GET', KEYS[4])
if not prev or tonumber(prev) < tonumber(ARGV[2]) then redis.call('SET', KEYS[4], ARGV[2]) end
return out
"""
)

# Set fields of a known device's record. KEYS: P:devs, P:d:D. ARGV: device, then
# "set"|"del", then field names (del) or field, value pairs (set).
UPDATE_DEVICE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'set' then
  redis.call('HSET', KEYS[2], unpack(ARGV, 3))
else
  redis.call('HDEL', KEYS[2], unpack(ARGV, 3))
end
return 1
"""

# Remove a push token unless it changed or was registered after ARGV[2].
# KEYS: P:d:D. ARGV: token, sent_at.
CLEAR_TOKEN = """
local pt, pra = unpack(redis.call('HMGET', KEYS[1], 'pt', 'pra'))
if pt == ARGV[1] and pra and tonumber(pra) <= tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[1], 'pp', 'pt', 'ptopic', 'psb', 'pra')
  return 1
end
return 0
"""

# Every device of a user with its record. KEYS: P:devs. ARGV: P.
# Returns {device, created, {field, value, ...}, ...}.
DEVICES = """
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = all[i + 1]
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. ':d:' .. all[i])
end
return out
"""

# -- the cluster: device -> node registry and presence ------------------------------------

# Claim a device for a connection. KEYS: P:node:D. ARGV: value (NODE|CONN), ttl ms, the
# device as written in messages, this node. Kicks the device's connection on another
# node, tells every node the device connected; returns the previous value or false.
CLAIM = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if old and old ~= ARGV[1] then
  local n, c = string.match(old, '^([^|]*)|(.*)$')
  if n and n ~= ARGV[4] then
    redis.call('PUBLISH', 'gw:node:' .. n, 'k' .. ARGV[3] .. c)
  end
end
redis.call('PUBLISH', 'gw:events', 'c' .. ARGV[3])
return old
"""

# Keep a claim alive. KEYS: P:node:D. ARGV: value, ttl ms. Returns 1 if renewed, 2 if it
# had expired (an outage longer than the TTL) and is taken back, 0 if another connection
# holds the device now (its kick was lost).
REFRESH = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

# Let go of a device when its connection ends, if the claim is still this connection's.
# KEYS: P:node:D, P:seen, P:grace. ARGV: value, now ms, grace ms, the device as written in
# messages. Starts the user's grace period and records last-seen.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2])
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
end
redis.call('PUBLISH', 'gw:events', 'd' .. ARGV[4])
return 1
"""

# A user's presence. KEYS: P:devs, P:grace, P:seen, P:hidden. ARGV: P.
# Returns {connected devices, grace ms left (<= 0: none), last seen or "", hidden}.
PRESENCE = """
local n = 0
for _, d in ipairs(redis.call('HKEYS', KEYS[1])) do
  n = n + redis.call('EXISTS', ARGV[1] .. ':node:' .. d)
end
local seen = redis.call('GET', KEYS[3]) or ''
return {n, redis.call('PTTL', KEYS[2]), seen, redis.call('EXISTS', KEYS[4])}
"""

# Hide or show a user. KEYS: P:hidden. ARGV: "1" or "0", the user as written in messages.
HIDE = """
if ARGV[1] == '1' then
  redis.call('SET', KEYS[1], '1')
else
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', 'gw:events', 'h' .. ARGV[2])
return 1
"""

# -- groups -------------------------------------------------------------------------------

# Change a group's member list. KEYS: G:meta, G:members, G:pending. ARGV: mode ("set",
# "add", "remove", "delete"), now, limit, users... Returns {status, created, n, the n
# members after..., pending changes...}: status 1 done, 0 no such group (or, for remove,
# not a member), -1 over the limit (nothing changed). A change done is also appended to
# G:pending as JSON [mode, now, old members, new members], so that its `group` events,
# queued in the members' slots by later calls, are queued again by the next change of
# the group (a retry included) if those calls never ran; every pending change is
# returned, the one just made last.
GROUP_CHANGE = """
local mode, now, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local exists = redis.call('EXISTS', KEYS[1]) == 1
local function answer(status, created, old)
  local new = {}
  if status == 1 then
    new = redis.call('SMEMBERS', KEYS[2])
    redis.call('RPUSH', KEYS[3], cjson.encode({mode, now, old, new}))
  end
  local out = {status, created, #new}
  for _, u in ipairs(new) do out[#out + 1] = u end
  for _, e in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do out[#out + 1] = e end
  return out
end
if mode ~= 'set' and not exists then return answer(0, 0) end
local old = redis.call('SMEMBERS', KEYS[2])
if mode == 'set' then
  local seen, n = {}, 0
  for i = 4, #ARGV do
    if not seen[ARGV[i]] then seen[ARGV[i]] = true; n = n + 1 end
  end
  if n > limit then return answer(-1, 0) end
  redis.call('DEL', KEYS[2])
  for i = 4, #ARGV, 500 do
    redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
  end
  if exists then return answer(1, 0, old) end
  redis.call('SET', KEYS[1], now)
  return answer(1, 1, old)
elseif mode == 'add' then
  local n = #old
  for i = 4, #ARGV do
    if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then n = n + 1 end
  end
  if n > limit then return answer(-1, 0) end
  for i = 4, #ARGV, 500 do
    redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
  end
  return answer(1, 0, old)
elseif mode == 'remove' then
  if redis.call('SREM', KEYS[2], ARGV[4]) == 0 then return answer(0, 0) end
  return answer(1, 0, old)
end
redis.call('DEL', KEYS[1], KEYS[2])
return answer(1, 0, old)
"""

# The changes whose events are queued: removed from G:pending. KEYS: G:pending. ARGV:
# the changes, as GROUP_CHANGE returned them.
GROUP_SETTLED = """
for _, e in ipairs(ARGV) do redis.call('LREM', KEYS[1], 1, e) end
return 1
"""

# The members of a group. KEYS: G:meta, G:members. Returns {exists, members...}.
GROUP_MEMBERS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local out = {1}
for _, u in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = u end
return out
"""

# Begin a group send. KEYS: G:members, G:m, G:bseq, and the message's G:id: key of the
# layout before G:m (read only). ARGV: G, sender, ts, expires, body, then the message's
# text, device, stamps and a fresh salt, as for `SEND`.
# Returns {0, ts} for a duplicate, {-1} when the sender is no member (or there is no
# group), else {1, bid, members...}: the body is stored under G:b:BID with a count of 1,
# the send's own hold, which `GROUP_SETTLE` exchanges for the number of items queued.
GROUP_BEGIN = (
    RECORDS
    + """
local g, sender, ts, expires = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rec, _, k = record(KEYS[2], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
local pts = lookup(KEYS[2], rec, k, tonumber(ts))
if pts then return {0, pts} end
local prev = redis.call('GET', KEYS[4])
if prev then
  local pts, pexp = string.match(prev, '^(%d+)|(%d+)$')
  if tonumber(pexp) > tonumber(ts) then return {0, pts} end
end
if redis.call('SISMEMBER', KEYS[1], sender) == 0 then return {-1} end
local ttl = tonumber(expires) - tonumber(ts)
if ttl < 1 then ttl = 1 end
local bid = redis.call('INCR', KEYS[3])
local b = g .. ':b:' .. bid
redis.call('HSET', b, 'b', ARGV[5], 'r', 1)
redis.call('PEXPIRE', b, ttl + KEY_TTL_SLACK)
local out = {1, bid}
for _, u in ipairs(redis.call('SMEMBERS', KEYS[1])) do out[#out + 1] = u end
return out
""".replace("KEY_TTL_SLACK", str(KEY_TTL_SLACK_MS))
)

# Finish a group send. KEYS: G:b:BID, G:m. ARGV: items queued, ts, expires, then the
# message's text, device, stamps and a fresh salt, as for `SEND`. Replaces the send's hold
# on the body by the items queued (deleting it if none point to it) and remembers the
# message.
GROUP_SETTLE = (
    RECORDS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HINCRBY', KEYS[1], 'r', tonumber(ARGV[1]) - 1) <= 0 then
    redis.call('DEL', KEYS[1])
  end
end
local ttl = tonumber(ARGV[3]) - tonumber(ARGV[2])
if ttl < 1 then ttl = 1 end
local rec, salt, k, new = record(KEYS[2], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
local _, recs = lookup(KEYS[2], rec, k, tonumber(ARGV[2]))
remember(KEYS[2], rec, salt, k, new, recs, tonumber(ARGV[2]), ttl + KEY_TTL_SLACK)
return 1
""".replace("KEY_TTL_SLACK", str(KEY_TTL_SLACK_MS))
)

# Release acked items' hold on a body. KEYS: G:b:BID. ARGV: how many. Returns 1 if the
# body was deleted.
BODY_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], 'r', -tonumber(ARGV[1])) <= 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# A group message's body. KEYS: G:b:BID. Returns it, or false once deleted.
BODY = """
return redis.call('HGET', KEYS[1], 'b')
"""

# Delete each of these members (as read by PEEK) from a queue; returns a 1 or 0 per member,
# so that only the items this call deleted release their bodies.
REMOVE_EACH = """
local out = {}
for i = 1, #ARGV do out[i] = redis.call('ZREM', KEYS[1], ARGV[i]) end
return out
"""

SCRIPTS: dict[str, str] = {
    "send": SEND,
    "receipts": RECEIPTS,
    "received": RECEIVED,
    "compact": COMPACT,
    "peek": PEEK,
    "remove_members": REMOVE_MEMBERS,
    "fetch": FETCH,
    "count": COUNT,
    "prune": PRUNE,
    "register": REGISTER,
    "open": OPEN,
    "remove": REMOVE,
    "revoke": REVOKE,
    "update_device": UPDATE_DEVICE,
    "clear_token": CLEAR_TOKEN,
    "devices": DEVICES,
    "claim": CLAIM,
    "refresh": REFRESH,
    "release": RELEASE,
    "presence": PRESENCE,
    "hide": HIDE,
    "group_change": GROUP_CHANGE,
    "group_settled": GROUP_SETTLED,
    "group_members": GROUP_MEMBERS,
    "group_begin": GROUP_BEGIN,
    "group_settle": GROUP_SETTLE,
    "body_release": BODY_RELEASE,
    "body": BODY,
    "remove_each": REMOVE_EACH,
}


def prefix(user: str) -> str:
    """The key prefix (with the hash tag) of every key of `user`."""
    return "gw:{" + user + "}"


def group_prefix(group: str) -> str:
    """The key prefix (with the hash tag) of every key of `group`; its own ``gwg:``
    beginning keeps it apart from every user's keys."""
    return "gwg:{" + group + "}"


def wire_device(user: str, device: str) -> bytes:
    """A device as written in pub/sub messages: ``LEN:USERLEN:DEVICE`` (byte lengths)."""
    u, d = user.encode(), device.encode()
    return b"%d:%s%d:%s" % (len(u), u, len(d), d)


def read_device(data: bytes, pos: int = 0) -> tuple[str, str, int]:
    """The (user, device) written at `pos` of a message, and where the rest begins.

    Raises:
        ValueError: The message is malformed.
    """
    user, pos = _read_field(data, pos)
    device, pos = _read_field(data, pos)
    return user, device, pos


def _read_field(data: bytes, pos: int) -> tuple[str, int]:
    colon = data.index(b":", pos)
    size = int(data[pos:colon])
    end = colon + 1 + size
    if size < 0 or end > len(data):
        raise ValueError("truncated field")
    return data[colon + 1 : end].decode(), end


# Times in records are 6-byte big-endian ms (until the year 10889); out-of-range values
# are clamped.
_MAX_STAMP = 2**48 - 1
SALT_BYTES = 8


def naming(sender: str, device: str, msg_id: str, ts: int, expires: int) -> list[str | bytes]:
    """What the scripts that remember a message take to make its record (see `RECORDS`):
    its text ``SENDER\\0ID``, the sending device, its ts and expiry, and a fresh salt."""
    stamps = b"".join(min(max(t, 0), _MAX_STAMP).to_bytes(6, "big") for t in (ts, expires))
    return [f"{sender}\0{msg_id}", device, stamps, secrets.token_bytes(SALT_BYTES)]

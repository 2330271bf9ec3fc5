// The codec without a gateway: no tag is ever written, integers of any size up to 64
// bits go out as integers and come back exact, and what cannot be sent is refused.

import assert from 'node:assert/strict'
import { test } from 'node:test'

import { Encoder, encode as cborxEncode } from 'cbor-x'

import { decodeMessage, encodeFrame, joinBatch } from '../src/index.js'
import { readUint, scan } from './support/cbor-scan.js'

const BIG = [2 ** 32, 2 ** 40, Number.MAX_SAFE_INTEGER, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n]

test('cbor-x left to its defaults tags a Uint8Array where Buffer exists (what the SDK avoids)', () => {
  assert.ok(typeof Buffer === 'function')
  assert.deepEqual(scan(cborxEncode(new Uint8Array([1]))).tags, [64n])
  assert.deepEqual(scan(new Encoder().encode(new Uint8Array([1]))).tags, [64n])
})

test('a frame with bytes of every kind, Buffers included, is written with no tag', () => {
  const frame = {
    t: 'send',
    id: 'm',
    to: 'bob',
    body: Buffer.from([1, 2, 3]),
    bodies: { a: new Uint8Array([4]), b: new Uint8Array([9, 5, 6]).subarray(1), c: new Uint8Array([7]).buffer },
    urgent: false,
    ttl: 60
  }
  const bytes = encodeFrame(frame)
  assert.deepEqual(scan(bytes), { tags: [], floats: [] })
  const [back] = decodeMessage(bytes)
  assert.deepEqual([...back.body], [1, 2, 3])
  assert.deepEqual([...back.bodies.b], [5, 6])
  assert.deepEqual([...back.bodies.c], [7])
  assert.equal(back.body.constructor, Uint8Array)
})

test('integers of 2^32 and above, to 2^64 - 1, are written as CBOR integers and read back exactly', () => {
  for (const value of BIG) {
    const bytes = encodeFrame({ t: 'ack', sids: [value] })
    assert.deepEqual(scan(bytes), { tags: [], floats: [] }, `${value}`)
    // The sid itself: the last 9 bytes are its 8-byte unsigned integer.
    assert.equal(readUint(bytes.subarray(bytes.length - 9)), BigInt(value))
    const [{ sids: [back] }] = decodeMessage(bytes)
    assert.equal(BigInt(back), BigInt(value))
    // Safe integers come back as Numbers (JSON-friendly), larger ones as BigInts.
    assert.equal(typeof back, BigInt(value) <= BigInt(Number.MAX_SAFE_INTEGER) ? 'number' : 'bigint')
  }
})

test('a server frame with a millisecond ts decodes to Numbers that JSON can write', () => {
  const ts = 1718000000000
  const bytes = encodeFrame({ t: 'sent', id: 'x', ts })
  const [frame] = decodeMessage(bytes)
  assert.equal(frame.ts, ts)
  assert.equal(JSON.stringify(frame), `{"t":"sent","id":"x","ts":${ts}}`)
})

test('what would need a tag or a float is refused before anything is written', () => {
  for (const [value, pattern] of [
    [1.5, /not an integer/],
    [2 ** 53, /beyond 2\^53/],
    [2n ** 64n, /64 bits/],
    [new Date(), /Date cannot be sent/],
    [new Map(), /Map cannot be sent/],
    [new Set(), /Set cannot be sent/],
    [new Uint16Array(2), /only Uint8Array/],
    [() => 1, /function cannot be sent/],
    [Symbol('s'), /symbol cannot be sent/]
  ]) {
    assert.throws(() => encodeFrame({ t: 'x', v: value }), pattern, String(value?.constructor?.name ?? value))
  }
})

test('absent optional fields (undefined) are left out, not written as CBOR undefined', () => {
  const bytes = encodeFrame({ t: 'send', id: 'm', to: 'b', body: new Uint8Array(), urgent: undefined })
  assert.deepEqual(Object.keys(decodeMessage(bytes)[0]), ['t', 'id', 'to', 'body'])
  assert.ok(!bytes.includes(0xf7))
})

test('a batch is one CBOR array of the frames, in order; a message of one frame is a list of one', () => {
  for (const n of [2, 23, 24, 300]) {
    const frames = Array.from({ length: n }, (_, i) => ({ t: 'typing', to: `u${i}`, on: true }))
    const bytes = joinBatch(frames.map(encodeFrame))
    assert.deepEqual(scan(bytes), { tags: [], floats: [] })
    assert.deepEqual(decodeMessage(bytes), frames)
  }
  assert.deepEqual(decodeMessage(encodeFrame({ t: 'drained' })), [{ t: 'drained' }])
})

// CBOR for the gateway's device protocol: frames to bytes and back, with no tags ever
// written and 64-bit integers kept exact.
//
// The gateway refuses every CBOR tag (bad_frame) and every float where an integer is
// required (bad_field). cbor-x, left to its defaults, breaks both rules: where a global
// `Buffer` exists it wraps a Uint8Array in tag 64, it writes Dates, Maps, Sets and other
// typed arrays as tagged items, it writes any integer beyond 32 bits held in a Number as
// a float64, and it writes a BigInt beyond 64 bits as a tagged bignum. So frames are
// first checked and normalised here (`toWire`), and only plain values reach cbor-x:
// objects, arrays, text, Uint8Array, booleans, null, 32-bit Numbers and BigInts within
// 64 bits. Anything else is a TypeError before a byte is sent.
//
// On the way in, cbor-x decodes every 8-byte integer (the gateway's times, and large
// sids) as a BigInt. `fromWire` turns those that fit exactly in a Number back into
// Numbers, so `ts` is an ordinary number and `JSON.stringify` works on it, and leaves the
// rest (sids of 2^53 and above) as BigInts, which go back out as the same integers.

import { Decoder, Encoder } from 'cbor-x'

const encoder = new Encoder({
  useRecords: false, // no record extension (tag 105 and friends)
  tagUint8Array: false, // no tag 64 around byte strings, even where Buffer exists
  structuredClone: false, // no tags for shared references or cycles
  pack: false, // no packed-CBOR shared values (tags 6 and 51)
  bundleStrings: false, // no string bundles (a tag)
  useTag259ForMaps: false, // no tag 259 around maps
  variableMapSize: true, // definite lengths that fit the content
  largeBigIntToFloat: false // belt and braces: toWire refuses them first
})

const decoder = new Decoder({
  useRecords: false,
  mapsAsObjects: true,
  structuredClone: false,
  bundleStrings: false
})

const UINT64_END = 1n << 64n
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER)
const MIN_SAFE = BigInt(Number.MIN_SAFE_INTEGER)

/**
 * Check and normalise one outgoing value for the wire (see the file's header).
 * @param {unknown} value
 * @param {string} path where the value sits, for the error message
 * @returns {unknown}
 */
export function toWire (value, path = 'frame') {
  if (value === null || typeof value === 'string' || typeof value === 'boolean') return value
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) {
      throw new TypeError(`${path}: ${value} is not an integer; the protocol has no floats`)
    }
    if (!Number.isSafeInteger(value)) {
      throw new TypeError(`${path}: ${value} is beyond 2^53 as a Number; pass a BigInt`)
    }
    // cbor-x writes Numbers beyond 32 bits as float64: hand it the BigInt instead.
    return value >= -0x80000000 && value <= 0xffffffff ? value : BigInt(value)
  }
  if (typeof value === 'bigint') {
    if (value >= UINT64_END || value < -UINT64_END) {
      throw new TypeError(`${path}: ${value} does not fit in 64 bits`)
    }
    return value >= -0x80000000n && value <= 0xffffffffn ? Number(value) : value
  }
  if (value instanceof Uint8Array) {
    // A plain Uint8Array view: a Buffer or other subclass is bytes too.
    return value.constructor === Uint8Array
      ? value
      : new Uint8Array(value.buffer, value.byteOffset, value.byteLength)
  }
  if (value instanceof ArrayBuffer) return new Uint8Array(value)
  if (ArrayBuffer.isView(value) && !(value instanceof DataView)) {
    throw new TypeError(`${path}: only Uint8Array is sent as bytes, not ${value.constructor.name}`)
  }
  if (Array.isArray(value)) return value.map((item, i) => toWire(item, `${path}[${i}]`))
  if (typeof value === 'object') {
    const proto = Object.getPrototypeOf(value)
    if (proto !== Object.prototype && proto !== null) {
      throw new TypeError(`${path}: a ${value.constructor?.name ?? 'non-plain object'} cannot be sent`)
    }
    const out = {}
    for (const [key, item] of Object.entries(value)) {
      if (item === undefined) continue // an absent optional field
      out[key] = toWire(item, `${path}.${key}`)
    }
    return out
  }
  throw new TypeError(`${path}: a ${typeof value} cannot be sent`)
}

/**
 * Turn 64-bit integers that a Number holds exactly into Numbers; leave larger ones BigInt.
 * Byte strings come out as plain Uint8Array (Node's Buffer is one too).
 * @param {unknown} value
 * @returns {unknown}
 */
export function fromWire (value) {
  if (typeof value === 'bigint') {
    return value <= MAX_SAFE && value >= MIN_SAFE ? Number(value) : value
  }
  if (value === null || typeof value !== 'object') return value
  if (value instanceof Uint8Array) {
    return value.constructor === Uint8Array
      ? value
      : new Uint8Array(value.buffer, value.byteOffset, value.byteLength)
  }
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = fromWire(value[i])
    return value
  }
  if (Object.getPrototypeOf(value) === Object.prototype) {
    for (const key of Object.keys(value)) value[key] = fromWire(value[key])
  }
  return value
}

/**
 * Encode one frame (or any plain value) as one CBOR item, with no tags.
 * @param {unknown} frame
 * @returns {Uint8Array}
 */
export function encodeFrame (frame) {
  const bytes = encoder.encode(toWire(frame))
  // A fresh copy: cbor-x may hand out a view of its reusable buffer.
  return Uint8Array.prototype.slice.call(bytes)
}

/**
 * Join frames encoded with `encodeFrame` into one CBOR array (a batch), without encoding
 * them again.
 * @param {Uint8Array[]} encoded
 * @returns {Uint8Array}
 */
export function joinBatch (encoded) {
  const n = encoded.length
  let head
  if (n < 24) head = [0x80 + n]
  else if (n < 0x100) head = [0x98, n]
  else if (n < 0x10000) head = [0x99, n >> 8, n & 0xff]
  else head = [0x9a, (n >>> 24) & 0xff, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]
  const size = head.length + encoded.reduce((sum, item) => sum + item.length, 0)
  const out = new Uint8Array(size)
  out.set(head, 0)
  let at = head.length
  for (const item of encoded) {
    out.set(item, at)
    at += item.length
  }
  return out
}

/** The bytes of a batch header for `n` frames. */
export function batchHeaderSize (n) {
  return n < 24 ? 1 : n < 0x100 ? 2 : n < 0x10000 ? 3 : 5
}

/**
 * Decode one WebSocket message into its frames: a lone frame or a batch, as a list.
 * @param {ArrayBuffer | Uint8Array} data
 * @returns {Array<Record<string, unknown>>}
 */
export function decodeMessage (data) {
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data)
  const item = fromWire(decoder.decode(bytes))
  return Array.isArray(item) ? item : [item]
}

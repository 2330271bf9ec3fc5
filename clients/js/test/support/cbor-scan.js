// An independent, minimal CBOR reader for the tests: walks one item and reports every
// tag and float in it, so the SDK's encoder is checked by code that does not share it.

/** The tags and floats found in `bytes`, which must hold exactly one CBOR item. */
export function scan (bytes) {
  const found = { tags: [], floats: [] }
  let at = 0
  const length = (info) => {
    if (info < 24) return BigInt(info)
    const size = { 24: 1, 25: 2, 26: 4, 27: 8 }[info]
    if (size === undefined) throw new Error(`unexpected additional info ${info}`)
    let value = 0n
    for (let i = 0; i < size; i++) value = (value << 8n) | BigInt(bytes[at++])
    return value
  }
  const item = () => {
    const head = bytes[at++]
    const major = head >> 5
    const info = head & 0x1f
    if (major === 7) {
      if (info >= 25 && info <= 27) {
        found.floats.push(head)
        at += { 25: 2, 26: 4, 27: 8 }[info]
      }
      return
    }
    const n = length(info)
    if (major === 2 || major === 3) at += Number(n)
    else if (major === 4) for (let i = 0n; i < n; i++) item()
    else if (major === 5) for (let i = 0n; i < 2n * n; i++) item()
    else if (major === 6) {
      found.tags.push(n)
      item()
    }
  }
  item()
  if (at !== bytes.length) throw new Error(`${bytes.length - at} bytes after the item`)
  return found
}

/** The unsigned integer a CBOR item starting at `bytes[0]` holds, as a BigInt. */
export function readUint (bytes) {
  const info = bytes[0] & 0x1f
  if (bytes[0] >> 5 !== 0) throw new Error(`not an unsigned integer: ${bytes[0]}`)
  if (info < 24) return BigInt(info)
  let value = 0n
  const size = { 24: 1, 25: 2, 26: 4, 27: 8 }[info]
  for (let i = 1; i <= size; i++) value = (value << 8n) | BigInt(bytes[i])
  return value
}

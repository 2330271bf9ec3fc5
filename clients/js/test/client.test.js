// The client's own decisions, against a scripted in-memory WebSocket: when it reconnects
// and when it stops, what it writes for each call, how it acks, batches and splits.

import assert from 'node:assert/strict'
import { test } from 'node:test'

import { CloseError, decodeMessage, encodeFrame, ErrorFrameError, GatewayClient, joinBatch, parseRetryHint, reconnectDelay } from '../src/index.js'

/** A WebSocket whose server side the test plays: it opens, receives and closes on cue. */
class FakeSocket {
  static created = []
  static waiting = []

  constructor (url, protocols) {
    this.url = url
    this.protocols = protocols
    this.readyState = 0
    this.messages = [] // each written message, decoded into its frames
    FakeSocket.created.push(this)
    FakeSocket.waiting.shift()?.(this)
  }

  /** The next socket the client creates. */
  static next () {
    return new Promise((resolve) => FakeSocket.waiting.push(resolve))
  }

  static reset () {
    FakeSocket.created = []
    FakeSocket.waiting = []
  }

  send (data) {
    this.messages.push(decodeMessage(data))
  }

  close (code = 1005, reason = '') {
    if (this.readyState === 3) return
    this.readyState = 3
    queueMicrotask(() => this.onclose?.({ code, reason }))
  }

  // The server's side:
  open () {
    this.readyState = 1
    this.onopen?.()
  }

  deliver (...frames) {
    const data = frames.length === 1 ? encodeFrame(frames[0]) : joinBatch(frames.map(encodeFrame))
    this.onmessage?.({ data: data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) })
  }

  welcome (user = 'u', device = 'd') {
    this.deliver({ t: 'welcome', user, device, ts: 1, heartbeat: 30, queued: 0 })
  }

  serverClose (code, reason = '') {
    this.readyState = 3
    this.onclose?.({ code, reason })
  }

  /** Every frame written so far, in order. */
  get frames () {
    return this.messages.flat()
  }
}

const turn = () => new Promise((resolve) => setImmediate(resolve))

async function connected (options = {}) {
  FakeSocket.reset()
  const client = new GatewayClient({ url: 'ws://gw/ws', token: 'T', WebSocket: FakeSocket, random: () => 0, ...options })
  const socket = FakeSocket.next()
  const welcome = client.connect()
  const ws = await socket
  ws.open()
  ws.welcome()
  await welcome
  return { client, ws }
}

test('full jitter: a random delay under min(maxMs, initialMs * 2^attempt)', () => {
  const backoff = { initialMs: 100, maxMs: 1000 }
  assert.equal(reconnectDelay(1006, '', 0, backoff, () => 0.999999) < 100, true)
  assert.equal(Math.round(reconnectDelay(1006, '', 3, backoff, () => 0.5)), 400)
  assert.equal(Math.round(reconnectDelay(1006, '', 20, backoff, () => 0.5)), 500) // capped
  assert.equal(reconnectDelay(1011, '', 2, backoff, () => 0), 0)
})

test('the server hint of a 1012 or 1013 is waited, plus jitter; other codes ignore it', () => {
  const backoff = { initialMs: 100, maxMs: 1000 }
  assert.equal(parseRetryHint('restarting; reconnect_after_ms=2500'), 2500)
  assert.equal(parseRetryHint('max_connections; reconnect_after_ms=7000'), 7000)
  assert.equal(parseRetryHint('too slow a reader'), null)
  assert.equal(reconnectDelay(1013, 'handshake_rate; reconnect_after_ms=7000', 0, backoff, () => 0.5), 7050)
  assert.equal(reconnectDelay(1012, 'restarting; reconnect_after_ms=300', 9, backoff, () => 0), 300)
  assert.equal(reconnectDelay(1008, 'x; reconnect_after_ms=7000', 0, backoff, () => 0), 0)
})

test('hello carries the token, v 1 and the client state; the subprotocol is offered', async () => {
  FakeSocket.reset()
  const client = new GatewayClient({ url: 'ws://gw/ws', token: async () => 'fresh', active: false, WebSocket: FakeSocket })
  const socket = FakeSocket.next()
  client.connect().catch(() => {})
  const ws = await socket
  ws.open()
  assert.deepEqual(ws.protocols, ['gateway.v1'])
  assert.deepEqual(ws.frames, [{ t: 'hello', v: 1, token: 'fresh', active: false }])
  ws.serverClose(4001, 'unauthorized')
  await turn()
})

for (const [code, reason] of [[4001, 'unauthorized'], [4009, 'replaced by a newer connection']]) {
  test(`${code} stops the client: no new socket, pending sends reject with the close code`, async () => {
    const { client, ws } = await connected()
    const sending = client.send('bob', new Uint8Array([1]), { id: 's1' })
    const stopped = client.next('stopped')
    ws.serverClose(code, reason)
    const error = await stopped
    assert.ok(error instanceof CloseError)
    assert.deepEqual([error.code, error.reason], [code, reason])
    await assert.rejects(sending, (e) => e === error)
    await turn()
    assert.equal(FakeSocket.created.length, 1)
    assert.equal(client.state, 'stopped')
    await assert.rejects(client.connect(), (e) => e.code === code)
  })
}

test('other closes reconnect; unanswered sends are written again, same id, after welcome', async () => {
  const { client, ws } = await connected()
  const sending = client.send('bob', new Uint8Array([1]), { id: 's1', ttl: 60 })
  await turn()
  assert.deepEqual(ws.frames.slice(1), [{ t: 'send', id: 's1', to: 'bob', body: new Uint8Array([1]), ttl: 60 }])
  const next = FakeSocket.next()
  const disconnected = client.next('disconnect')
  ws.serverClose(1013, 'too slow a reader')
  assert.equal((await disconnected).code, 1013)
  const again = await next
  again.open()
  assert.equal(again.frames.length, 1) // hello only, until welcome
  again.welcome()
  await turn()
  assert.deepEqual(again.frames.slice(1), [{ t: 'send', id: 's1', to: 'bob', body: new Uint8Array([1]), ttl: 60 }])
  again.deliver({ t: 'sent', id: 's1', ts: 5 })
  assert.deepEqual(await sending, { t: 'sent', id: 's1', ts: 5 })
  await client.close()
})

test('a connection that fails with an error event and no close event is retried', async () => {
  const { client, ws } = await connected()
  const next = FakeSocket.next()
  ws.serverClose(1012, 'restarting; reconnect_after_ms=0')
  const refused = await next
  const retried = FakeSocket.next()
  const disconnected = client.next('disconnect')
  refused.onerror?.({}) // what Node 20's WebSocket does for a refused connection
  assert.equal((await disconnected).code, 1006)
  const again = await retried
  again.open()
  again.welcome()
  await client.close()
})

test('a connection with no welcome within openTimeoutMs is given up and retried', async () => {
  FakeSocket.reset()
  const client = new GatewayClient({ url: 'ws://gw/ws', token: 'T', WebSocket: FakeSocket, random: () => 0, openTimeoutMs: 20 })
  const first = FakeSocket.next()
  const welcomed = client.connect()
  const stalled = await first
  stalled.open() // upgraded, but the welcome never comes
  const retried = FakeSocket.next()
  const disconnected = client.next('disconnect')
  assert.deepEqual(await disconnected, { code: 1006, reason: 'no welcome in time', delayMs: 0 })
  assert.equal(stalled.readyState, 3) // closed by the client
  const again = await retried
  again.open()
  again.welcome()
  await welcomed
  await client.close()
})

test('an error frame rejects its send with the frame; others become error events', async () => {
  const { client, ws } = await connected()
  const sending = client.send('x', new Uint8Array(), { id: 's1' })
  const event = client.next('error')
  ws.deliver({ t: 'error', code: 'unknown_recipient', ref: 's1', reason: 'no such user' },
    { t: 'error', code: 'bad_field', ref: 'push', reason: 'subscription' })
  await assert.rejects(sending, (e) => e instanceof ErrorFrameError && e.code === 'unknown_recipient' &&
    e.ref === 's1' && /unknown_recipient \(ref s1\): no such user/.test(e.message))
  const other = await event
  assert.deepEqual(other.frame, { t: 'error', code: 'bad_field', ref: 'push', reason: 'subscription' })
  await client.close()
})

test('auto-ack: items are acked in one frame after the listeners ran, not when one throws', async () => {
  const { client, ws } = await connected()
  const seen = []
  client.on('message', (m) => { seen.push(m.id); if (m.id === 'bad') throw new Error('listener failed') })
  client.on('receipt', (r) => seen.push(r.kind))
  client.on('group', (g) => seen.push(g.event))
  const original = console.error
  console.error = () => {}
  try {
    ws.deliver(
      { t: 'msg', sid: 7, id: 'a', from: 'b', dev: 'p', ts: 1, body: new Uint8Array(), urgent: true },
      { t: 'msg', sid: 8, id: 'bad', from: 'b', dev: 'p', ts: 1, body: new Uint8Array(), urgent: true },
      { t: 'receipt', sid: 2n ** 60n, kind: 'read', ids: ['x'], by: 'b', dev: 'p', ts: 1 },
      { t: 'group', sid: 10, group: 'g', event: 'added', users: ['u'], ts: 1 })
    await turn()
  } finally {
    console.error = original
  }
  assert.deepEqual(seen, ['a', 'bad', 'read', 'added'])
  assert.deepEqual(ws.frames.slice(1), [{ t: 'ack', sids: [7, 2n ** 60n, 10] }])
  await client.close()
})

test('auto-ack acks nothing that no listener saw: it comes again on the next connection', async () => {
  const { client, ws } = await connected()
  ws.deliver({ t: 'msg', sid: 1, id: 'a', from: 'b', dev: 'p', ts: 1, body: new Uint8Array(), urgent: true })
  const receipts = []
  client.on('receipt', (r) => receipts.push(r.sid))
  ws.deliver({ t: 'receipt', sid: 2, kind: 'read', ids: ['x'], by: 'b', dev: 'p', ts: 1 })
  await turn()
  assert.deepEqual(receipts, [2])
  assert.deepEqual(ws.frames.slice(1), [{ t: 'ack', sids: [2] }])
  await client.close()
})

test('manual acks: nothing is acked until the application says so', async () => {
  const { client, ws } = await connected({ autoAck: false })
  const message = client.next('message')
  ws.deliver({ t: 'msg', sid: 2n ** 53n + 1n, id: 'a', from: 'b', dev: 'p', ts: 1, body: new Uint8Array(), urgent: true, group: 'g' })
  const m = await message
  assert.equal(m.group, 'g')
  await turn()
  assert.equal(ws.frames.length, 1)
  m.ack()
  client.ack([3])
  await turn()
  assert.deepEqual(ws.frames.slice(1), [{ t: 'ack', sids: [2n ** 53n + 1n, 3] }])
  await client.close()
})

test('each call writes its frame; all of one turn go out as one batch', async () => {
  const { client, ws } = await connected()
  client.read('bob', ['m1'])
  client.typing('bob', true)
  client.subscribe(['bob', 'carol'])
  client.unsubscribe(['carol'])
  client.setActive(false)
  client.setPresenceHidden(true)
  client.registerPush({ provider: 'apns', token: 'abc', topic: 'com.example', sandbox: true })
  client.sendToGroup('team', new Uint8Array([1]), { id: 'g1', urgent: false })
  client.sendFrame({ t: 'future', n: 1 })
  await turn()
  assert.equal(ws.messages.length, 2) // hello, then one batch
  assert.deepEqual(ws.messages[1], [
    { t: 'read', to: 'bob', ids: ['m1'] },
    { t: 'typing', to: 'bob', on: true },
    { t: 'sub', users: ['bob', 'carol'] },
    { t: 'unsub', users: ['carol'] },
    { t: 'state', active: false },
    { t: 'privacy', hide_presence: true },
    { t: 'push', provider: 'apns', token: 'abc', topic: 'com.example', sandbox: true },
    { t: 'send', id: 'g1', group: 'team', body: new Uint8Array([1]), urgent: false },
    { t: 'future', n: 1 }
  ])
  await client.close()
})

test('Web Push: a PushSubscription registers as provider webpush, and again on every connection', async () => {
  const { client, ws } = await connected()
  const subscription = {
    endpoint: 'https://push.example/abc',
    expirationTime: null,
    toJSON () { return { endpoint: this.endpoint, expirationTime: null, keys: { p256dh: 'BPk', auth: 'au' } } }
  }
  client.registerWebPush(subscription)
  client.subscribe(['bob'])
  await turn()
  const push = { t: 'push', provider: 'webpush', subscription: { endpoint: 'https://push.example/abc', keys: { p256dh: 'BPk', auth: 'au' } } }
  assert.deepEqual(ws.frames.slice(1), [push, { t: 'sub', users: ['bob'] }])
  assert.throws(() => client.registerWebPush({ endpoint: 'x' }), TypeError)

  const next = FakeSocket.next()
  ws.serverClose(1012, 'restarting; reconnect_after_ms=0')
  const again = await next
  again.open()
  again.welcome()
  await turn()
  assert.deepEqual(again.frames.slice(1), [{ t: 'sub', users: ['bob'] }, push])
  client.unregisterPush()
  await turn()
  assert.deepEqual(again.frames.at(-1), { t: 'push', provider: null })
  await client.close()
})

test('typing is dropped while disconnected; read is held and written after welcome', async () => {
  const { client, ws } = await connected()
  const next = FakeSocket.next()
  ws.serverClose(1006)
  await turn()
  assert.equal(client.typing('bob', true), false)
  client.read('bob', ['m1'])
  const again = await next
  again.open()
  again.welcome()
  await turn()
  assert.deepEqual(again.frames.slice(1), [{ t: 'read', to: 'bob', ids: ['m1'] }])
  await client.close()
})

test('a turn bigger than maxMessageSize is split; a send that alone is too big is refused', async () => {
  const { client, ws } = await connected({ maxMessageSize: 1000 })
  const body = new Uint8Array(300)
  const sends = Array.from({ length: 7 }, (_, i) => client.send('bob', body, { id: `s${i}` }))
  await assert.rejects(client.send('bob', new Uint8Array(1200), { id: 'huge' }), /over maxMessageSize/)
  await turn()
  const sizes = ws.messages.slice(1).map((frames) => frames.length)
  assert.deepEqual(sizes, [3, 3, 1])
  assert.deepEqual(ws.frames.slice(1).map((f) => f.id), ['s0', 's1', 's2', 's3', 's4', 's5', 's6'])
  await client.close({ timeoutMs: 0 })
  for (const sending of sends) await assert.rejects(sending, CloseError)
})

test('close() does not wait for ever for a server that never answers its close frame', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] })
  const { client, ws } = await connected()
  ws.close = (code) => { ws.closedWith = code } // the close event never comes
  const closing = client.close({ timeoutMs: 0 })
  await turn()
  assert.equal(ws.closedWith, 1000)
  t.mock.timers.tick(5000)
  await closing
  assert.equal(client.state, 'stopped')
})

test('close() closes with 1000, stops, and rejects what is left with a CloseError', async () => {
  const { client, ws } = await connected()
  const sending = client.send('bob', new Uint8Array(), { id: 's' })
  let code = null
  const close = ws.close.bind(ws)
  ws.close = (c, r) => { code = c; close(c, r) }
  await client.close({ timeoutMs: 0 })
  assert.equal(code, 1000)
  assert.equal(client.state, 'stopped')
  await assert.rejects(sending, (e) => e instanceof CloseError && e.code === 1000)
  assert.equal(FakeSocket.created.length, 1)
})

// The SDK under Node against a real gateway process: every scenario of scenarios.js,
// plus what only Node can arrange (restarting the gateway, a forged Origin header).

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import * as sdk from '../src/index.js'
import { scenarios } from './scenarios.js'
import { Gateway, startGateway } from './support/gateway.js'

function tokensFor (gateway, devices) {
  return Object.fromEntries(devices.map((name) => {
    const [user, device] = name.split('#')[0].split('/')
    return [name, gateway.token(user, device)]
  }))
}

async function play (gateway, name, extra = {}) {
  const scenario = scenarios[name]
  if (scenario.nextSid !== undefined) gateway.setNextSid(scenario.nextSid)
  const env = { url: gateway.url, tokens: tokensFor(gateway, scenario.devices), nextSid: scenario.nextSid, ...extra }
  await scenario.run(sdk, env)
}

describe('against one gateway', () => {
  const gateway = new Gateway({})
  before(() => gateway.start())
  after(() => gateway.dispose())

  for (const name of ['conversation', 'presence', 'offline', 'batches', 'bigSids', 'closeCodes']) {
    test(name, () => play(gateway, name))
  }
})

test('rateLimit: sends past rate_limited close with 1008', async (t) => {
  const gateway = await startGateway(t, { limits: { send_rate: 0.001, send_burst: 2, rate_limit_strikes: 3 } })
  await play(gateway, 'rateLimit')
})

test('overCapacity: an upgrade with an Origin is closed 1013 with the hint, which the client waits', async (t) => {
  const gateway = await startGateway(t, { limits: { max_connections: 1, retry_after: 3 } })
  const holder = new sdk.GatewayClient({ url: gateway.url, token: gateway.token('holder', 'x') })
  await holder.connect()
  t.after(() => holder.close())
  // Node's WebSocket (undici) takes extra headers: forge the Origin a browser sends.
  await play(gateway, 'overCapacity', { clientOptions: { socketOptions: { headers: { Origin: 'https://web.example' } } } })
})

test('a send made while the gateway restarts resolves after the reconnect (1012 hint honoured)', async (t) => {
  const gateway = await startGateway(t, {})
  const token = (user, device) => gateway.token(user, device)
  const bob = new sdk.GatewayClient({ url: gateway.url, token: token('bob', 'phone') })
  await bob.connect()
  await bob.close()
  let calls = 0
  const alice = new sdk.GatewayClient({
    url: gateway.url,
    token: () => { calls += 1; return token('alice', 'phone') }, // a fresh token per connection
    backoff: { initialMs: 100, maxMs: 400 }
  })
  await alice.connect()
  const disconnects = []
  alice.on('disconnect', (d) => disconnects.push(d))
  const restarted = alice.next('disconnect', { timeoutMs: 10000 })
  await gateway.stop() // drains: 1012 with reconnect_after_ms
  const first = await restarted
  assert.equal(first.code, 1012)
  const hint = sdk.parseRetryHint(first.reason)
  assert.ok(hint !== null && first.delayMs >= hint, `${first.delayMs} >= ${hint}`)

  const sent = alice.send('bob', new Uint8Array([7]), { id: 'during-restart' })
  assert.equal(alice.state === 'open', false)
  const welcomed = alice.next('welcome', { timeoutMs: 30000 })
  await gateway.start()
  await welcomed
  const answer = await sent
  assert.equal(answer.id, 'during-restart')
  assert.ok(calls >= 2, 'the token function is called for each connection')
  // While the gateway was down, refused connections backed off with full jitter.
  for (const d of disconnects.slice(1)) {
    assert.equal(d.code, 1006)
    assert.ok(d.delayMs >= 0 && d.delayMs <= 400, `delay ${d.delayMs}`)
  }
  await alice.close()

  const got = new sdk.GatewayClient({ url: gateway.url, token: token('bob', 'phone') })
  const message = got.next('message', { timeoutMs: 10000 })
  await got.connect()
  assert.deepEqual([...(await message).body], [7])
  await got.close()
})

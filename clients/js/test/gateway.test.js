// The SDK under Node against a real gateway process: every scenario of scenarios.js,
// plus what only Node can arrange (a forged Origin header).

import { after, before, describe, test } from 'node:test'

import * as sdk from '../src/index.js'
import { play as run, scenarios } from './scenarios.js'
import { FakePush } from './support/fakepush.js'
import { Gateway, startGateway } from './support/gateway.js'

const LIMIT = 60000 // bounds a hang; every scenario takes a few seconds at most

function tokensFor (gateway, devices) {
  return Object.fromEntries(devices.map((name) => {
    const [user, device] = name.split('#')[0].split('/')
    return [name, gateway.token(user, device)]
  }))
}

async function play (gateway, name, extra = {}) {
  const scenario = scenarios[name]
  if (scenario.nextSid !== undefined) gateway.setNextSid(scenario.nextSid)
  const env = {
    url: gateway.url,
    tokens: tokensFor(gateway, scenario.devices),
    nextSid: scenario.nextSid,
    admin: (method, path, body) => gateway.admin(method, path, body),
    ...extra
  }
  await run(sdk, name, env)
}

describe('against one gateway', () => {
  const gateway = new Gateway({})
  before(() => gateway.start())
  after(() => gateway.dispose())

  for (const name of ['conversation', 'presence', 'offline', 'push', 'resend', 'batches', 'bigSids', 'closeCodes', 'groups', 'webPush']) {
    test(name, { timeout: LIMIT }, () => play(gateway, name))
  }
})

test('rateLimit: sends past rate_limited close with 1008', { timeout: LIMIT }, async (t) => {
  const gateway = await startGateway(t, { limits: { send_rate: 0.001, send_burst: 2, rate_limit_strikes: 3 } })
  await play(gateway, 'rateLimit')
})

test('overCapacity: an upgrade with an Origin is closed 1013 with the hint, which the client waits', { timeout: LIMIT }, async (t) => {
  const gateway = await startGateway(t, { limits: { max_connections: 1, retry_after: 3 } })
  const holder = new sdk.GatewayClient({ url: gateway.url, token: gateway.token('holder', 'x') })
  await holder.connect()
  t.after(() => holder.close())
  // Node's WebSocket (undici) takes extra headers: forge the Origin a browser sends.
  await play(gateway, 'overCapacity', { clientOptions: { socketOptions: { headers: { Origin: 'https://web.example' } } } })
})

test('restart: 1012 and its hint, backoff while down, a send re-sent after the reconnect', { timeout: LIMIT }, async (t) => {
  const gateway = await startGateway(t, {})
  await play(gateway, 'restart', { control: (action) => action === 'stop' ? gateway.stop() : gateway.start() })
})

test('webPushWakeUp: a registered subscription gets a VAPID-signed, encrypted wake-up from the gateway', { timeout: LIMIT }, async (t) => {
  const fake = new FakePush()
  t.after(() => fake.dispose())
  await fake.start()
  const gateway = await startGateway(t, {})
  await play(gateway, 'webPushWakeUp', { fakePush: fake })
})

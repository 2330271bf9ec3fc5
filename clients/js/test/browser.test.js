// The SDK inside real headless Chromium (Debian's `chromium`, driven by puppeteer-core;
// no browser is downloaded) against a real gateway process: the page imports the SDK
// and cbor-x as ES modules, unbundled, as a web app would, and runs every scenario of
// scenarios.js.
//
// The browser is $CHROMIUM, else /usr/bin/chromium.

import { createReadStream, existsSync, mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { extname, join, normalize, resolve } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'

import puppeteer from 'puppeteer-core'

import { GatewayClient } from '../src/index.js'
import { scenarios } from './scenarios.js'
import { FakePush } from './support/fakepush.js'
import { Gateway } from './support/gateway.js'

const ROOT = resolve(fileURLToPath(new URL('..', import.meta.url)))
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium'
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>gateway client</title>
<script type="importmap">{"imports": {"cbor-x": "/node_modules/cbor-x/index.js"}}</script>
<script type="module">
  import * as sdk from '/src/index.js'
  import { play } from '/test/scenarios.js'
  // The harness exposes gatewayControl('stop' | 'start') to scenarios that need it,
  // gatewayAdmin(method, path, body), the backend API called from Node (no CORS there),
  // and the fake Web Push service's controls.
  window.run = (name, env) => play(sdk, name, {
    ...env,
    control: (action) => window.gatewayControl(action),
    admin: (method, path, body) => window.gatewayAdmin(method, path, body ?? null),
    fakePush: {
      subscribe: (key) => window.fakePushSubscribe(key),
      waitRequests: (count) => window.fakePushWaitRequests(count)
    }
  })
  window.ready = true
</script>`
const LIMIT = 60000 // bounds a hang; every scenario takes a few seconds at most
const TYPES = { '.js': 'text/javascript', '.html': 'text/html', '.json': 'application/json' }

/** Serve the page, the SDK, the scenarios and node_modules from this package, read-only. */
function serveStatic () {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname))
    if (path === '/favicon.ico') {
      res.writeHead(204).end()
      return
    }
    if (path === '/') {
      res.writeHead(200, { 'content-type': 'text/html' }).end(PAGE)
      return
    }
    const file = join(ROOT, path)
    const allowed = ['/src/', '/test/', '/node_modules/'].some((dir) => path.startsWith(dir))
    if (!allowed || !file.startsWith(ROOT) || !existsSync(file)) {
      res.writeHead(404).end()
      return
    }
    res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' })
    createReadStream(file).pipe(res)
  })
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)))
}

function tokensFor (gateway, devices) {
  return Object.fromEntries(devices.map((name) => {
    const [user, device] = name.split('#')[0].split('/')
    return [name, gateway.token(user, device)]
  }))
}

let browser, web, profile

before(async () => {
  web = await serveStatic()
  profile = mkdtempSync(join(tmpdir(), 'chromium-'))
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in a container needs --no-sandbox; the rest keep Chromium off the network.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      `--user-data-dir=${profile}`]
  })
})

after(async () => {
  await browser?.close()
  web?.close()
  if (profile) rmSync(profile, { recursive: true, force: true })
})

/** A fresh page with the SDK loaded; page errors and console errors are printed. */
async function openPage (t) {
  const page = await browser.newPage()
  t.after(() => page.close())
  page.on('pageerror', (error) => console.error('page error:', error.message))
  page.on('console', (msg) => { if (msg.type() === 'error') console.error('page console:', msg.text()) })
  await page.goto(`http://127.0.0.1:${web.address().port}/`)
  await page.waitForFunction('window.ready === true', { timeout: 10000 })
  return page
}

async function play (page, gateway, name) {
  const scenario = scenarios[name]
  if (scenario.nextSid !== undefined) gateway.setNextSid(scenario.nextSid)
  const env = { url: gateway.url, tokens: tokensFor(gateway, scenario.devices), nextSid: scenario.nextSid?.toString() }
  await page.exposeFunction('gatewayAdmin', (method, path, body) => gateway.admin(method, path, body))
  await page.evaluate((n, e) => window.run(n, e), name, env)
}

describe('in Chromium, against one gateway', () => {
  const gateway = new Gateway({})
  before(() => gateway.start())
  after(() => gateway.dispose())

  test('the page is a real browser with the platform WebSocket', { timeout: LIMIT }, async (t) => {
    const page = await openPage(t)
    const agent = await page.evaluate(() => [navigator.userAgent, typeof WebSocket, typeof Buffer])
    if (!/Chrome\//.test(agent[0]) || agent[1] !== 'function' || agent[2] !== 'undefined') {
      throw new Error(`not a browser page: ${agent}`)
    }
  })

  for (const name of ['conversation', 'presence', 'offline', 'push', 'resend', 'batches', 'bigSids', 'closeCodes', 'groups', 'webPush']) {
    test(name, { timeout: LIMIT }, async (t) => play(await openPage(t), gateway, name))
  }
})

test('in Chromium: rateLimit', { timeout: LIMIT }, async (t) => {
  const gateway = new Gateway({ limits: { send_rate: 0.001, send_burst: 2, rate_limit_strikes: 3 } })
  t.after(() => gateway.dispose())
  await gateway.start()
  await play(await openPage(t), gateway, 'rateLimit')
})

test('in Chromium: restart, with 1012, backoff while down, and a send re-sent after', { timeout: LIMIT }, async (t) => {
  const gateway = new Gateway({})
  t.after(() => gateway.dispose())
  await gateway.start()
  const page = await openPage(t)
  await page.exposeFunction('gatewayControl', async (action) => {
    if (action === 'stop') await gateway.stop()
    else await gateway.start()
  })
  await play(page, gateway, 'restart')
})

test('in Chromium: overCapacity, where the page sees 1013 and its hint, not a failed 503', { timeout: LIMIT }, async (t) => {
  const gateway = new Gateway({ limits: { max_connections: 1, retry_after: 3 } })
  t.after(() => gateway.dispose())
  await gateway.start()
  const holder = new GatewayClient({ url: gateway.url, token: gateway.token('holder', 'x') })
  await holder.connect()
  t.after(() => holder.close())
  await play(await openPage(t), gateway, 'overCapacity')
})

test('in Chromium: webPushWakeUp, a VAPID-signed, encrypted wake-up for the page\'s subscription', { timeout: LIMIT }, async (t) => {
  const fake = new FakePush()
  t.after(() => fake.dispose())
  await fake.start()
  const gateway = new Gateway({})
  t.after(() => gateway.dispose())
  await gateway.start()
  const page = await openPage(t)
  await page.exposeFunction('fakePushSubscribe', (key) => fake.subscribe(key))
  await page.exposeFunction('fakePushWaitRequests', (count) => fake.waitRequests(count))
  await play(page, gateway, 'webPushWakeUp')
})

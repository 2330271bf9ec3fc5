// The repository's fake push services (`python -m scripts.fake_push`, loopback only), for
// a Web Push wake-up end to end: its Web Push service makes subscriptions (playing the
// browser's push service), verifies each push's VAPID token, decrypts it and records it.

import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'

import { python, REPO } from './gateway.js'

const START_TIMEOUT_MS = 30000

export class FakePush {
  constructor () {
    this.dir = mkdtempSync(join(tmpdir(), 'fake-push-'))
    this.process = null
    this.webpushPort = 0
    this.output = ''
  }

  get origin () {
    return `http://127.0.0.1:${this.webpushPort}`
  }

  /** Start the fakes on free loopback ports; resolves once they serve. */
  async start () {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('GATEWAY__')))
    this.process = spawn(python(), ['-m', 'scripts.fake_push', '--dir', this.dir, '--host', '127.0.0.1',
      '--apns-port', '0', '--fcm-port', '0', '--webpush-port', '0', '--ready-json', '--quiet'], {
      cwd: REPO, env, stdio: ['ignore', 'pipe', 'pipe']
    })
    this.exited = new Promise((resolve) => this.process.once('exit', resolve))
    this.process.stderr.on('data', (chunk) => { this.output += chunk })
    const lines = createInterface({ input: this.process.stdout })
    const ready = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the fake push services did not start:\n${this.output}`)), START_TIMEOUT_MS)
      lines.once('line', (line) => { clearTimeout(timer); resolve(JSON.parse(line)) })
      this.exited.then((code) => { clearTimeout(timer); reject(new Error(`fake_push exited ${code}:\n${this.output}`)) })
    })
    this.webpushPort = ready.webpush
    return this
  }

  async dispose () {
    if (this.process && this.process.exitCode === null && this.process.signalCode === null) {
      this.process.kill('SIGTERM')
      await this.exited
    }
    rmSync(this.dir, { recursive: true, force: true })
  }

  async _call (method, path, body) {
    const response = await fetch(`${this.origin}${path}`, {
      method,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10000)
    })
    if (response.status !== 200) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`)
    return response.json()
  }

  /**
   * A new subscription on the fake, made as a browser would for `applicationServerKey`:
   * resolves to {id, subscription: {endpoint, keys: {p256dh, auth}}}.
   */
  subscribe (applicationServerKey) {
    return this._call('POST', '/_fake/subscribe', { application_server_key: applicationServerKey })
  }

  /** Every push request received so far (decrypted payload, VAPID claims, status). */
  requests () {
    return this._call('GET', '/_fake/requests')
  }

  /**
   * Wait until at least `count` push requests have arrived, and return them all. The fake
   * has no push channel to the test, so this polls its record (every 50 ms), bounded.
   */
  async waitRequests (count, timeoutMs = 10000) {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const records = await this.requests()
      if (records.length >= count) return records
      if (Date.now() > deadline) throw new Error(`${records.length} push requests after ${timeoutMs} ms, expected ${count}`)
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
  }
}

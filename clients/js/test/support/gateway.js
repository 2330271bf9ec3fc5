// A real `gateway serve` process for the tests, on loopback ports it picks itself (the
// ports it bound are read from its log, so parallel test files never race for a number),
// with its own SQLite file, and HS256 tokens signed with the secret it is configured with. Its backend
// API (admin port) has an API key, for `admin()`; Web Push is configured with a fresh
// VAPID key and only 127.0.0.1 in `[push.webpush] allowed_hosts`.
//
// The interpreter is $GATEWAY_PYTHON, else the repository's .venv, else python3.

import { spawn, spawnSync } from 'node:child_process'
import { createHmac, generateKeyPairSync, randomBytes } from 'node:crypto'
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../../..')
const START_TIMEOUT_MS = 30000

export function python () {
  if (process.env.GATEWAY_PYTHON) return process.env.GATEWAY_PYTHON
  const venv = join(REPO, '.venv', 'bin', 'python')
  return existsSync(venv) ? venv : 'python3'
}

function toml (sections) {
  const value = (v) => typeof v === 'string' || Array.isArray(v) ? JSON.stringify(v) : String(v)
  return Object.entries(sections)
    .map(([name, keys]) => `[${name}]\n` + Object.entries(keys).map(([k, v]) => `${k} = ${value(v)}`).join('\n'))
    .join('\n\n') + '\n'
}

// What `gateway serve` logs, at info level, once each listener is bound.
const DEVICE_READY = /gateway listening on wss?:\/\/[^\s]*:(\d+)\//
const ADMIN_READY = /admin API listening on [^\s]*:(\d+)/

function base64url (data) {
  return Buffer.from(data).toString('base64url')
}

export class Gateway {
  /**
   * @param {Record<string, Record<string, unknown>>} sections TOML sections merged over
   *   the test defaults, e.g. {limits: {max_connections: 2}}
   */
  constructor (sections = {}) {
    this.dir = mkdtempSync(join(tmpdir(), 'gateway-js-'))
    this.secret = randomBytes(32).toString('hex')
    this.dbPath = join(this.dir, 'gateway.db')
    this.logPath = join(this.dir, 'gateway.log')
    this.sections = sections
    this.process = null
    this.port = 0
    this.adminPort = 0
    this.apiKey = randomBytes(16).toString('hex')
    this.vapidKeyPath = join(this.dir, 'vapid.pem')
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' })
    writeFileSync(this.vapidKeyPath, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 })
  }

  /** The backend API: `fetch` with the API key; resolves to {status, body} (body parsed). */
  async admin (method, path, body) {
    const response = await fetch(`http://127.0.0.1:${this.adminPort}${path}`, {
      method,
      headers: { authorization: `Bearer ${this.apiKey}`, 'content-type': 'application/json' },
      body: body == null ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10000)
    })
    const text = await response.text()
    return { status: response.status, body: text ? JSON.parse(text) : null }
  }

  get url () {
    return `ws://127.0.0.1:${this.port}/ws`
  }

  /** Start (or start again, on the same ports and store) and wait until it listens. The
   * first start binds port 0 for both listeners and learns the ports from the log. */
  async start () {
    const defaults = {
      server: { host: '127.0.0.1', port: this.port, drain_seconds: 0.2, shutdown_timeout: 5 },
      admin: { host: '127.0.0.1', port: this.adminPort, api_key: this.apiKey },
      store: { path: this.dbPath },
      auth: { jwt_secret: this.secret },
      presence: { offline_grace: 0.2, batch_ms: 50 },
      'push.webpush': { vapid_private_key_file: this.vapidKeyPath, subject: 'mailto:tests@example.com', allowed_hosts: ['127.0.0.1'] },
      log: { level: 'info' }
    }
    const merged = { ...defaults }
    for (const [name, keys] of Object.entries(this.sections)) merged[name] = { ...merged[name], ...keys }
    const configPath = join(this.dir, 'gateway.toml')
    writeFileSync(configPath, toml(merged))
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('GATEWAY__')))
    const logStart = this.log().length // this start's lines come after it
    const log = openSync(this.logPath, 'a')
    this.process = spawn(python(), ['-m', 'gateway.cli', 'serve', '--config', configPath], {
      cwd: REPO, env, stdio: ['ignore', log, log]
    })
    closeSync(log) // the child has its own copy
    const exited = new Promise((resolve) => this.process.once('exit', resolve))
    this.exited = exited
    const deadline = Date.now() + START_TIMEOUT_MS
    for (;;) {
      const lines = this.log().slice(logStart)
      const device = DEVICE_READY.exec(lines)
      const admin = ADMIN_READY.exec(lines)
      if (device && admin) {
        this.port = Number(device[1])
        this.adminPort = Number(admin[1])
        return this
      }
      if (this.process.exitCode !== null || Date.now() > deadline) {
        throw new Error(`the gateway did not start:\n${this.log()}`)
      }
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
  }

  /** SIGTERM: the gateway drains (1012 with a reconnect hint) and exits; wait for that. */
  async stop () {
    if (!this.process || this.process.exitCode !== null) return
    this.process.kill('SIGTERM')
    await this.exited
  }

  /** Stop, and remove the work directory. */
  async dispose () {
    if (this.process && this.process.exitCode === null) {
      this.process.kill('SIGKILL')
      await this.exited
    }
    rmSync(this.dir, { recursive: true, force: true })
  }

  log () {
    return existsSync(this.logPath) ? readFileSync(this.logPath, 'utf8') : ''
  }

  /** An HS256 token for (user, device), as `gateway token` mints it. */
  token (user, device, { ttl = 3600, secret = this.secret } = {}) {
    const now = Math.floor(Date.now() / 1000)
    const head = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
    const body = base64url(JSON.stringify({ sub: user, dev: device, iat: now, exp: now + ttl }))
    const signature = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url')
    return `${head}.${body}.${signature}`
  }

  /** Make the store's next sid `next` (SQLite's AUTOINCREMENT sequence, set directly). */
  setNextSid (next) {
    const code = [
      'import sqlite3, sys',
      'db = sqlite3.connect(sys.argv[1], timeout=10)',
      'seq = int(sys.argv[2]) - 1',
      "cur = db.execute(\"UPDATE sqlite_sequence SET seq = ? WHERE name = 'queue'\", (seq,))",
      "cur.rowcount or db.execute(\"INSERT INTO sqlite_sequence (name, seq) VALUES ('queue', ?)\", (seq,))",
      'db.commit()'
    ].join('\n')
    const done = spawnSync(python(), ['-c', code, this.dbPath, String(next)], { encoding: 'utf8' })
    if (done.status !== 0) throw new Error(`setting the sid failed: ${done.stderr}`)
  }
}

/** Start a gateway with `sections`; the test's `after` hook disposes of it. */
export async function startGateway (t, sections) {
  const gateway = new Gateway(sections)
  t.after(() => gateway.dispose())
  try {
    return await gateway.start()
  } catch (error) {
    await gateway.dispose()
    throw error
  }
}

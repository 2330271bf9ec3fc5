// GatewayClient: one device's connection to the gateway, kept open with backoff, for
// browsers and Node alike (the platform WebSocket; Node 20 needs --experimental-websocket).
//
// What it does for the application (docs: ../README.md):
// - hello with a token (a string, or a function called for every connection), then
//   welcome, the queued backlog and drained;
// - reconnects after any close but 4001 (a new token is needed) and 4009 (another
//   instance of this device is active), or `close()`: after the server's hint
//   (`reconnect_after_ms=N` in a 1012 or 1013 reason) plus jitter, else with exponential
//   backoff and full jitter;
// - `send` resolves on `sent`; an unanswered send is re-sent, same id, after a reconnect,
//   which the server's idempotency makes safe;
// - messages, receipts and group events are acked automatically once the listeners have
//   run without throwing (never when no listener is attached), or by the application
//   (`autoAck: false`);
// - presence subscriptions, client state and the last push registration are restored on
//   every new connection;
// - everything written in one turn of the event loop goes out as one WebSocket message
//   (a batch), split to stay within `maxMessageSize`.

import { batchHeaderSize, decodeMessage, encodeFrame, joinBatch } from './codec.js'
import { CloseError, ErrorFrameError, GatewayError, TimeoutError } from './errors.js'

const STOP_CODES = new Set([4001, 4009])
const HINT = /reconnect_after_ms=(\d+)/
const MAX_LIST = 1000 // the gateway's bound on `sids`, `ids` and `users` lists
const NORMAL = 1000
const SUBPROTOCOL = 'gateway.v1'
const CLOSE_WAIT_MS = 5000 // how long close() waits for the server's close frame

/**
 * How long to wait before reconnecting after a close.
 *
 * With the server's hint (`reconnect_after_ms=N` in the reason of a 1012 or 1013): N ms
 * plus up to `initialMs` of jitter. Otherwise "full jitter": a uniformly random time
 * between 0 and min(maxMs, initialMs * 2^attempt).
 *
 * @param {number} code the close code
 * @param {string} reason the close reason
 * @param {number} attempt failed connections since the last welcome (0 for the first)
 * @param {{initialMs: number, maxMs: number}} backoff
 * @param {() => number} random uniform in [0, 1)
 * @returns {number} milliseconds
 */
export function reconnectDelay (code, reason, attempt, backoff, random = Math.random) {
  const hint = (code === 1012 || code === 1013) ? parseRetryHint(reason) : null
  if (hint !== null) return hint + random() * backoff.initialMs
  const ceiling = Math.min(backoff.maxMs, backoff.initialMs * 2 ** Math.min(attempt, 30))
  return random() * ceiling
}

/**
 * The server's reconnect hint in a close reason, in ms: the decimal digits after
 * `reconnect_after_ms=`, or null when there is none.
 * @param {string} reason
 * @returns {number | null}
 */
export function parseRetryHint (reason) {
  const found = HINT.exec(reason ?? '')
  return found ? Number(found[1]) : null
}

function randomId () {
  return globalThis.crypto.randomUUID()
}

function checkList (name, items) {
  if (!Array.isArray(items)) throw new TypeError(`${name} must be an array`)
}

export class GatewayClient {
  /**
   * @param {object} options see index.d.ts, `ClientOptions`
   */
  constructor (options) {
    if (!options || !options.url) throw new TypeError('options.url is required')
    if (options.token === undefined) throw new TypeError('options.token is required')
    this.url = options.url
    this._token = options.token
    this._active = options.active ?? true
    this.autoAck = options.autoAck ?? true
    this.maxMessageSize = options.maxMessageSize ?? 65536
    this.openTimeoutMs = options.openTimeoutMs ?? 20000
    this.backoff = { initialMs: 500, maxMs: 30000, ...options.backoff }
    this._random = options.random ?? Math.random
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket
    this._socketOptions = options.socketOptions
    if (typeof this._WebSocket !== 'function') {
      throw new GatewayError(
        'no WebSocket: Node 20 needs --experimental-websocket (Node 22 has it built in)'
      )
    }

    /** @type {'idle' | 'connecting' | 'open' | 'waiting' | 'stopped'} */
    this.state = 'idle'
    /** The latest `welcome` frame, or null before the first. */
    this.welcome = null
    this._listeners = new Map()
    this._ws = null
    this._ready = false // welcome received on the current socket
    this._running = false
    this._attempt = 0
    this._wake = null // ends the wait between two connections early
    this._openTimer = null
    this._endAttempt = null // ends the current attempt, as if its socket had closed
    this._pending = new Map() // send id -> {frame, resolve, reject}
    this._queue = [] // frames to write on the next flush
    this._held = [] // frames (read, push, privacy) waiting for a connection
    this._acks = []
    this._flushDue = false
    this._watched = new Set()
    this._push = undefined // the last push frame, restored on reconnect
    this._hidden = undefined
    this._stopError = null
    this._stopped = null // resolves when stopped
  }

  // -- events -------------------------------------------------------------------------

  /**
   * Listen to an event; returns a function that removes the listener.
   * @param {string} type
   * @param {(value: any) => void} listener
   * @returns {() => void}
   */
  on (type, listener) {
    let set = this._listeners.get(type)
    if (!set) this._listeners.set(type, (set = new Set()))
    set.add(listener)
    return () => this.off(type, listener)
  }

  /** Remove a listener added with `on`. */
  off (type, listener) {
    this._listeners.get(type)?.delete(listener)
  }

  /**
   * The next event of `type` (that `filter` accepts), as a promise. Rejects with the
   * stop error if the client stops first, or a TimeoutError after `timeoutMs`.
   */
  next (type, { filter, timeoutMs } = {}) {
    return new Promise((resolve, reject) => {
      let timer = null
      const done = () => {
        offEvent()
        offStop()
        if (timer !== null) clearTimeout(timer)
      }
      const offEvent = this.on(type, (value) => {
        if (filter && !filter(value)) return
        done()
        resolve(value)
      })
      const offStop = type === 'stopped'
        ? () => {}
        : this.on('stopped', (error) => { done(); reject(error) })
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          done()
          reject(new TimeoutError(`no ${type} event within ${timeoutMs} ms`))
        }, timeoutMs)
      }
    })
  }

  _emit (type, value) {
    const set = this._listeners.get(type)
    if (!set) return true
    let ok = true
    for (const listener of [...set]) {
      try {
        listener(value)
      } catch (error) {
        ok = false
        reportError(error)
      }
    }
    return ok
  }

  // -- lifecycle ----------------------------------------------------------------------

  /**
   * Start connecting (if not already) and wait for a `welcome`.
   * @returns {Promise<object>} the welcome frame
   * @throws {CloseError} the client stopped first (4001, 4009, or `close()`)
   */
  connect () {
    if (this.state === 'stopped') return Promise.reject(this._stopError)
    const welcomed = this._ready
      ? Promise.resolve(this.welcome)
      : this.next('welcome')
    if (!this._running) {
      this._running = true
      this._stopped = this._run()
    }
    return welcomed
  }

  /**
   * Close cleanly with 1000 and stop reconnecting. Unanswered sends are given up to
   * `timeoutMs` to be answered first; those still unanswered reject with a CloseError
   * (re-send them by id on a later client: the server keeps no second copy).
   */
  async close ({ timeoutMs = 2000 } = {}) {
    if (this.state === 'stopped') return
    if (this._ready && this._pending.size > 0 && timeoutMs > 0) {
      await Promise.race([
        Promise.allSettled([...this._pending.values()].map((p) => p.promise)),
        new Promise((resolve) => setTimeout(resolve, timeoutMs)),
        this._stopped
      ])
    }
    this._stop(new CloseError(NORMAL, 'closed by the client'))
    let unanswered = null
    if (this._ws) {
      this._flush()
      this._ws.close(NORMAL)
      // A server that never answers the close frame does not hold close() up.
      const end = this._endAttempt
      unanswered = setTimeout(() => end?.(1006, 'close not answered'), CLOSE_WAIT_MS)
    }
    this._wake?.()
    await this._stopped
    clearTimeout(unanswered)
  }

  _stop (error) {
    if (this.state === 'stopped') return
    this.state = 'stopped'
    this._stopError = error
    for (const pending of this._pending.values()) pending.reject(error)
    this._pending.clear()
    this._emit('stopped', error)
  }

  async _run () {
    while (this.state !== 'stopped') {
      this.state = 'connecting'
      let token
      try {
        token = typeof this._token === 'function' ? await this._token() : this._token
      } catch (error) {
        this._stop(new GatewayError('the token function failed', { cause: error }))
        break
      }
      if (this.state === 'stopped') break
      const { code, reason } = await this._connectOnce(token)
      if (this.state === 'stopped') break
      if (STOP_CODES.has(code)) {
        this._stop(new CloseError(code, reason))
        break
      }
      const delayMs = reconnectDelay(code, reason, this._attempt, this.backoff, this._random)
      this._attempt += 1
      this.state = 'waiting'
      this._emit('disconnect', { code, reason, delayMs })
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, delayMs)
        this._wake = () => { clearTimeout(timer); resolve() }
      })
      this._wake = null
    }
    this._running = false
  }

  /** One connection, from opening to close: resolves with the close code and reason. */
  _connectOnce (token) {
    return new Promise((resolve) => {
      let ws
      try {
        ws = this._socketOptions
          ? new this._WebSocket(this.url, { protocols: [SUBPROTOCOL], ...this._socketOptions })
          : new this._WebSocket(this.url, [SUBPROTOCOL])
      } catch (error) {
        this._stop(new GatewayError(`cannot open ${this.url}`, { cause: error }))
        resolve({ code: 1006, reason: '' })
        return
      }
      ws.binaryType = 'arraybuffer'
      this._ws = ws
      let finished = false
      // Ends this attempt once: at the close event, at an error (Node 20's WebSocket
      // reports a refused connection with an error event and never a close event), or
      // when no welcome came within openTimeoutMs (a black-holed or stalled connection).
      const finish = (code, reason) => {
        if (finished) return
        finished = true
        clearTimeout(this._openTimer)
        if (this._ws === ws) {
          this._ws = null
          this._ready = false
          this._queue = []
        }
        resolve({ code, reason })
      }
      const abandon = (reason) => {
        finish(1006, reason)
        try {
          ws.close()
        } catch {}
      }
      this._openTimer = setTimeout(() => abandon('no welcome in time'), this.openTimeoutMs)
      this._endAttempt = finish
      ws.onopen = () => {
        const hello = { t: 'hello', v: 1, token, active: this._active }
        ws.send(encodeFrame(hello))
      }
      ws.onmessage = (event) => {
        if (this._ws !== ws) return
        if (typeof event.data === 'string') return // the gateway sends binary only
        let frames
        try {
          frames = decodeMessage(event.data)
        } catch (error) {
          reportError(new GatewayError('undecodable message from the server', { cause: error }))
          return
        }
        for (const frame of frames) this._handle(frame)
      }
      // An error event means the connection failed (WHATWG: a close with 1006 follows,
      // where the platform sends one at all); a clean close never fires one.
      ws.onerror = () => abandon('')
      ws.onclose = (event) => finish(event.code, event.reason ?? '')
    })
  }

  // -- incoming -----------------------------------------------------------------------

  _handle (frame) {
    this._emit('frame', frame)
    const handler = HANDLERS[frame?.t]
    if (handler) handler(this, frame)
  }

  _onWelcome (frame) {
    clearTimeout(this._openTimer)
    this.welcome = frame
    this._ready = true
    this._attempt = 0
    this.state = 'open'
    // Restore what the server forgets with the connection, then what waited for one.
    if (this._watched.size > 0) this._queueChunks('sub', 'users', [...this._watched])
    if (this._hidden !== undefined) this._queue.push({ t: 'privacy', hide_presence: this._hidden })
    if (this._push !== undefined) this._queue.push(this._push)
    this._queue.push(...this._held)
    this._held = []
    for (const pending of this._pending.values()) this._queue.push(pending.frame)
    this._scheduleFlush()
    this._emit('welcome', frame)
  }

  _onSent (frame) {
    const pending = this._pending.get(frame.id)
    if (pending) {
      this._pending.delete(frame.id)
      pending.resolve(frame)
    }
    this._emit('sent', frame)
  }

  _onError (frame) {
    const error = new ErrorFrameError(frame)
    const pending = frame.ref !== undefined ? this._pending.get(frame.ref) : undefined
    if (pending) {
      this._pending.delete(frame.ref)
      pending.reject(error)
      return
    }
    this._emit('error', error)
  }

  _onStored (type, frame) {
    const item = { ...frame, ack: () => this.ack([frame.sid]) }
    // An item that no listener saw is not acked: it comes again on the next connection.
    const heard = (this._listeners.get(type)?.size ?? 0) > 0
    const ok = this._emit(type, item)
    if (this.autoAck && heard && ok) this.ack([frame.sid])
  }

  // -- outgoing -----------------------------------------------------------------------

  /**
   * Send a message to a user; resolves with the `sent` frame once it is durably stored.
   * @param {string} to
   * @param {Uint8Array | null} body the ciphertext for every device (or null with `bodies`)
   * @param {object} [options] `id`, `urgent`, `ttl`, `bodies`
   */
  send (to, body, options = {}) {
    const frame = { t: 'send', id: options.id ?? randomId(), to, urgent: options.urgent, ttl: options.ttl }
    if (options.bodies !== undefined) frame.bodies = options.bodies
    else frame.body = body
    return this._sendFrame(frame)
  }

  /**
   * Send a message to every member of a group (protocol extension); resolves on `sent`.
   * @param {string} group
   * @param {Uint8Array} body
   * @param {object} [options] `id`, `urgent`, `ttl`
   */
  sendToGroup (group, body, options = {}) {
    const frame = { t: 'send', id: options.id ?? randomId(), group, body, urgent: options.urgent, ttl: options.ttl }
    return this._sendFrame(frame)
  }

  _sendFrame (frame) {
    if (this.state === 'stopped') return Promise.reject(this._stopError)
    let size
    try {
      size = encodeFrame(frame).length
    } catch (error) {
      return Promise.reject(error)
    }
    if (size > this.maxMessageSize) {
      return Promise.reject(new GatewayError(
        `the send frame is ${size} bytes, over maxMessageSize (${this.maxMessageSize})`
      ))
    }
    if (this._pending.has(frame.id)) return this._pending.get(frame.id).promise
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    this._pending.set(frame.id, { frame, resolve, reject, promise })
    if (this._ready) this._write(frame)
    return promise
  }

  /** Ack stored items (messages, receipts, group events) by sid; batched per turn. */
  ack (sids) {
    checkList('sids', sids)
    this._acks.push(...sids)
    if (this._ready) this._scheduleFlush()
  }

  /** Tell user `to` that their messages `ids` were read. Held while disconnected. */
  read (to, ids) {
    checkList('ids', ids)
    for (let i = 0; i < ids.length; i += MAX_LIST) {
      this._writeOrHold({ t: 'read', to, ids: ids.slice(i, i + MAX_LIST) })
    }
  }

  /**
   * A typing indicator for user `to`. Ephemeral: dropped while disconnected.
   * @returns {boolean} whether it was written
   */
  typing (to, on) {
    if (!this._ready) return false
    this._write({ t: 'typing', to, on: Boolean(on) })
    return true
  }

  /** Watch users' presence (kept across reconnects); `presence` events follow. */
  subscribe (users) {
    checkList('users', users)
    for (const user of users) this._watched.add(user)
    if (this._ready) this._queueChunks('sub', 'users', users)
  }

  /** Stop watching users' presence. */
  unsubscribe (users) {
    checkList('users', users)
    for (const user of users) this._watched.delete(user)
    if (this._ready) this._queueChunks('unsub', 'users', users)
  }

  /** The users whose presence is watched. */
  get watched () {
    return [...this._watched]
  }

  /** Client state: inactive devices get no typing and held presence. Kept for reconnects. */
  setActive (active) {
    this._active = Boolean(active)
    if (this._ready) this._write({ t: 'state', active: this._active })
  }

  /** Hide this user's presence from everyone (gateway extension `privacy`). */
  setPresenceHidden (hidden) {
    this._hidden = Boolean(hidden)
    if (this._ready) this._write({ t: 'privacy', hide_presence: this._hidden })
  }

  /**
   * Register an APNs or FCM token for wake-ups; re-sent on every new connection.
   * @param {{provider: 'apns' | 'fcm', token: string, topic?: string, sandbox?: boolean}} registration
   */
  registerPush ({ provider, token, topic, sandbox }) {
    this._setPush({ t: 'push', provider, token, topic, sandbox })
  }

  /**
   * Register a browser's Web Push subscription (a PushSubscription, or its toJSON()).
   * @param {PushSubscription | {endpoint: string, keys: {p256dh: string, auth: string}}} subscription
   */
  registerWebPush (subscription) {
    const json = typeof subscription?.toJSON === 'function' ? subscription.toJSON() : subscription
    if (!json || typeof json.endpoint !== 'string' || !json.keys) {
      throw new TypeError('a Web Push subscription has an endpoint and keys')
    }
    const { p256dh, auth } = json.keys
    this._setPush({ t: 'push', provider: 'webpush', subscription: { endpoint: json.endpoint, keys: { p256dh, auth } } })
  }

  /** Remove this device's push registration. */
  unregisterPush () {
    this._setPush({ t: 'push', provider: null })
  }

  _setPush (frame) {
    this._push = frame
    if (this._ready) this._write(frame)
  }

  /**
   * Write any frame as it is (for protocol extensions this SDK does not know). Throws
   * TypeError for values that cannot be sent without a tag or a float.
   * @returns {boolean} whether it was written (false while disconnected)
   */
  sendFrame (frame) {
    encodeFrame(frame) // refuse it now rather than at the flush
    if (!this._ready) return false
    this._write(frame)
    return true
  }

  /**
   * Write raw data on the socket at once, bypassing the codec: for testing the server's
   * limits (a text message closes with 1003, an oversized one with 1009).
   * @returns {boolean} whether it was written
   */
  sendRaw (data) {
    if (!this._ws || this._ws.readyState !== 1) return false
    this._flush()
    this._ws.send(data)
    return true
  }

  _writeOrHold (frame) {
    if (this._ready) this._write(frame)
    else this._held.push(frame)
  }

  _queueChunks (t, key, items) {
    for (let i = 0; i < items.length; i += MAX_LIST) {
      this._queue.push({ t, [key]: items.slice(i, i + MAX_LIST) })
    }
    this._scheduleFlush()
  }

  _write (frame) {
    this._queue.push(frame)
    this._scheduleFlush()
  }

  _scheduleFlush () {
    if (this._flushDue) return
    this._flushDue = true
    queueMicrotask(() => {
      this._flushDue = false
      this._flush()
    })
  }

  /** Write the queue (acks first) as few messages as `maxMessageSize` allows. */
  _flush () {
    if (!this._ready || !this._ws || this._ws.readyState !== 1) return
    const frames = []
    for (let i = 0; i < this._acks.length; i += MAX_LIST) {
      frames.push({ t: 'ack', sids: this._acks.slice(i, i + MAX_LIST) })
    }
    this._acks = []
    frames.push(...this._queue)
    this._queue = []
    let batch = []
    let size = 0
    const sendBatch = () => {
      if (batch.length === 1) this._ws.send(batch[0])
      else if (batch.length > 1) this._ws.send(joinBatch(batch))
      batch = []
      size = 0
    }
    for (const frame of frames) {
      const bytes = encodeFrame(frame)
      if (batch.length > 0 && size + bytes.length + batchHeaderSize(batch.length + 1) > this.maxMessageSize) {
        sendBatch()
      }
      batch.push(bytes)
      size += bytes.length
    }
    sendBatch()
  }
}

const HANDLERS = {
  welcome: (client, frame) => client._onWelcome(frame),
  drained: (client, frame) => client._emit('drained', frame),
  sent: (client, frame) => client._onSent(frame),
  error: (client, frame) => client._onError(frame),
  msg: (client, frame) => client._onStored('message', frame),
  receipt: (client, frame) => client._onStored('receipt', frame),
  group: (client, frame) => client._onStored('group', frame),
  typing: (client, frame) => client._emit('typing', frame),
  presence: (client, frame) => client._emit('presence', frame)
}

/** Report an error that has no caller to go to (a listener threw) without stopping. */
function reportError (error) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(error)
  else console.error(error)
}

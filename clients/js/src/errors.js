// The SDK's errors: one base class and three kinds, each naming what the server said.

/** Base class of every error this SDK raises or emits. */
export class GatewayError extends Error {
  constructor (message, options) {
    super(message, options)
    this.name = 'GatewayError'
  }
}

/**
 * The connection was closed, or the client stopped: carries the WebSocket close code
 * and reason (4001 unauthorized, 4009 replaced, 1000 after `close()`, 1006 when the
 * socket failed without a close frame).
 */
export class CloseError extends GatewayError {
  constructor (code, reason = '') {
    const name = CLOSE_NAMES[code] ?? 'closed'
    super(`connection closed with ${code} (${name})${reason ? `: ${reason}` : ''}`)
    this.name = 'CloseError'
    /** @type {number} */
    this.code = code
    /** @type {string} */
    this.reason = reason
  }
}

/** The server answered with an `error` frame: carries the frame and its fields. */
export class ErrorFrameError extends GatewayError {
  constructor (frame) {
    const ref = frame.ref !== undefined ? ` (ref ${frame.ref})` : ''
    super(`server error ${frame.code}${ref}${frame.reason ? `: ${frame.reason}` : ''}`)
    this.name = 'ErrorFrameError'
    /** @type {Record<string, unknown>} */
    this.frame = frame
    /** @type {string} */
    this.code = frame.code
    /** @type {string | undefined} */
    this.ref = frame.ref
    /** @type {string | undefined} */
    this.serverReason = frame.reason
  }
}

/** A wait gave up: `next()` past its timeout. */
export class TimeoutError extends GatewayError {
  constructor (message) {
    super(message)
    this.name = 'TimeoutError'
  }
}

/** What each close code means, for messages and logs (docs/protocol.md, close codes). */
export const CLOSE_NAMES = Object.freeze({
  1000: 'normal',
  1001: 'going away / no pong in time',
  1002: 'protocol error',
  1003: 'text message',
  1006: 'abnormal: no close frame',
  1007: 'invalid UTF-8',
  1008: 'policy violation',
  1009: 'message too large',
  1011: 'internal error',
  1012: 'server restarting',
  1013: 'overloaded, try again later',
  4001: 'unauthorized',
  4008: 'no hello in time',
  4009: 'replaced by a newer connection'
})

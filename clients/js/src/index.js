// @trio-mobile-gateway/client: the JavaScript client of the gateway's device protocol.
// See ../README.md for a tour and index.d.ts for the types.

export { GatewayClient, parseRetryHint, reconnectDelay } from './client.js'
export { decodeMessage, encodeFrame, fromWire, joinBatch, toWire } from './codec.js'
export { CLOSE_NAMES, CloseError, ErrorFrameError, GatewayError, TimeoutError } from './errors.js'

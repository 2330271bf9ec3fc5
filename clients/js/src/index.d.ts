// Types of @trio-mobile-gateway/client. The protocol: docs/protocol.md in the repository.

/** A server-assigned id: a Number up to 2^53 - 1, a BigInt from 2^53 on. Ack it as given. */
export type Sid = number | bigint

export interface WelcomeFrame { t: 'welcome'; user: string; device: string; ts: number; heartbeat: number; queued: number }
export interface DrainedFrame { t: 'drained' }
export interface SentFrame { t: 'sent'; id: string; ts: number; skipped?: string[] }
export interface ErrorFrame { t: 'error'; code: string; ref?: string; reason?: string }
export interface TypingFrame { t: 'typing'; from: string; on: boolean }
export interface PresenceItem { user: string; online: boolean; last_seen: number | null }
export interface PresenceFrame { t: 'presence'; items: PresenceItem[] }

/** A stored item: `ack()` acks it (needed only with `autoAck: false`). */
export interface Ackable { sid: Sid; ack(): void }

export interface Message extends Ackable {
  t: 'msg'
  id: string
  from: string
  dev: string
  ts: number
  body: Uint8Array
  urgent: boolean
  /** Set for a group message (protocol extension). */
  group?: string
}

export interface Receipt extends Ackable {
  t: 'receipt'
  kind: 'delivered' | 'read'
  ids: string[]
  by: string
  dev: string
  ts: number
}

/** A group membership change (protocol extension). */
export interface GroupEvent extends Ackable {
  t: 'group'
  group: string
  event: 'added' | 'removed' | 'deleted'
  users: string[]
  ts: number
}

export interface Disconnect {
  /** The close code (1006 when the socket failed without a close frame). */
  code: number
  reason: string
  /** How long the client waits before its next attempt. */
  delayMs: number
}

export interface ClientEvents {
  welcome: WelcomeFrame
  drained: DrainedFrame
  sent: SentFrame
  message: Message
  receipt: Receipt
  group: GroupEvent
  typing: TypingFrame
  presence: PresenceFrame
  /** Error frames not tied to a pending send (a `push`, a `sub` over the limit, ...). */
  error: ErrorFrameError
  /** A connection ended and another will be tried after `delayMs`. */
  disconnect: Disconnect
  /** The client stopped for good: 4001, 4009, `close()`, or a failure to open. */
  stopped: GatewayError
  /** Every frame received, before its own event. */
  frame: Record<string, unknown>
}

export interface Backoff {
  /** First ceiling of the full-jitter backoff, and the jitter added to a server hint. Default 500. */
  initialMs?: number
  /** The largest ceiling. Default 30000. */
  maxMs?: number
}

export interface ClientOptions {
  /** The device endpoint, e.g. `wss://gateway.example.com/ws`. */
  url: string
  /** The JWT, or a function called for a fresh one before every connection. */
  token: string | (() => string | Promise<string>)
  /** The client state sent in `hello` (default true). */
  active?: boolean
  /** Ack messages, receipts and group events once the listeners ran without throwing; never one no listener saw (default true). */
  autoAck?: boolean
  /** A connection that has no welcome this long after it was opened is given up and retried (default 20000). */
  openTimeoutMs?: number
  /** Outgoing batches are split to stay within this (the gateway's `max_message_size`, default 65536). */
  maxMessageSize?: number
  backoff?: Backoff
  /** Uniform in [0, 1), for the jitter (default Math.random). */
  random?: () => number
  /** A WebSocket class (default the platform's `globalThis.WebSocket`). */
  WebSocket?: typeof WebSocket
  /** Passed to the WebSocket constructor as its second argument, with `protocols` (Node's WebSocket takes `headers`). */
  socketOptions?: Record<string, unknown>
}

export interface SendOptions {
  /** The message id (default a random UUID). Re-sending the same id is safe. */
  id?: string
  urgent?: boolean
  /** Seconds, up to the gateway's `max_ttl`. */
  ttl?: number
}

export interface WebPushSubscriptionJSON {
  endpoint: string
  keys: { p256dh: string; auth: string }
}

export type ClientState = 'idle' | 'connecting' | 'open' | 'waiting' | 'stopped'

export class GatewayClient {
  constructor (options: ClientOptions)
  readonly url: string
  readonly state: ClientState
  /** The latest welcome, or null before the first. */
  readonly welcome: WelcomeFrame | null
  /** The users whose presence is watched. */
  readonly watched: string[]
  autoAck: boolean
  maxMessageSize: number

  on<K extends keyof ClientEvents>(type: K, listener: (value: ClientEvents[K]) => void): () => void
  off<K extends keyof ClientEvents>(type: K, listener: (value: ClientEvents[K]) => void): void
  /** The next event of `type` that `filter` accepts; rejects if the client stops first or after `timeoutMs`. */
  next<K extends keyof ClientEvents>(type: K, options?: { filter?: (value: ClientEvents[K]) => boolean; timeoutMs?: number }): Promise<ClientEvents[K]>

  /** Start connecting (and reconnecting) and wait for a welcome. Rejects with a CloseError on 4001/4009. */
  connect (): Promise<WelcomeFrame>
  /** Close with 1000 and stop; unanswered sends get up to `timeoutMs` (default 2000) first. */
  close (options?: { timeoutMs?: number }): Promise<void>

  /** Resolves on `sent` (durably stored); rejects with an ErrorFrameError, or a CloseError if the client stops first. */
  send (to: string, body: Uint8Array, options?: SendOptions): Promise<SentFrame>
  /** One ciphertext per recipient device. */
  send (to: string, body: null, options: SendOptions & { bodies: Record<string, Uint8Array> }): Promise<SentFrame>
  /** A group message (protocol extension). */
  sendToGroup (group: string, body: Uint8Array, options?: SendOptions): Promise<SentFrame>
  ack (sids: Sid[]): void
  read (to: string, ids: string[]): void
  /** False (and nothing sent) while disconnected. */
  typing (to: string, on: boolean): boolean
  subscribe (users: string[]): void
  unsubscribe (users: string[]): void
  setActive (active: boolean): void
  setPresenceHidden (hidden: boolean): void
  registerPush (registration: { provider: 'apns' | 'fcm'; token: string; topic?: string; sandbox?: boolean }): void
  registerWebPush (subscription: PushSubscription | WebPushSubscriptionJSON): void
  unregisterPush (): void
  /** Write any frame (protocol extensions); false while disconnected. */
  sendFrame (frame: Record<string, unknown>): boolean
  /** Write raw data at once, bypassing the codec: for testing a server's limits. */
  sendRaw (data: string | Uint8Array | ArrayBuffer): boolean
}

export class GatewayError extends Error {}
export class CloseError extends GatewayError {
  readonly code: number
  readonly reason: string
}
export class ErrorFrameError extends GatewayError {
  readonly frame: ErrorFrame
  readonly code: string
  readonly ref: string | undefined
  readonly serverReason: string | undefined
}
export class TimeoutError extends GatewayError {}
export const CLOSE_NAMES: Readonly<Record<number, string>>

/** The delay before the next attempt: the server's hint (1012/1013) plus jitter, else full jitter. */
export function reconnectDelay (code: number, reason: string, attempt: number, backoff: Required<Backoff>, random?: () => number): number
/** `reconnect_after_ms=N` in a close reason, in ms, or null. */
export function parseRetryHint (reason: string): number | null

/** One frame to CBOR, never with a tag; integers beyond 32 bits as integers. Throws TypeError for floats, Dates, Maps, ... */
export function encodeFrame (frame: unknown): Uint8Array
/** Frames encoded with encodeFrame, as one batch. */
export function joinBatch (encoded: Uint8Array[]): Uint8Array
/** One WebSocket message to its frames (a lone frame becomes a list of one). */
export function decodeMessage (data: ArrayBuffer | Uint8Array): Array<Record<string, unknown>>
export function toWire (value: unknown, path?: string): unknown
export function fromWire (value: unknown): unknown

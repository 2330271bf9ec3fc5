// Compiled (never run) by types.test.js with `tsc --strict`: the declarations in
// src/index.d.ts must accept what an application writes, and refuse what is wrong.
import { GatewayClient, CloseError, ErrorFrameError, type Message } from '../../src/index.js'
const c = new GatewayClient({ url: 'ws://x/ws', token: () => 'T', autoAck: false })
c.on('message', (m: Message) => { const s: number | bigint = m.sid; m.ack(); void s })
c.on('stopped', (e) => { if (e instanceof CloseError) console.log(e.code) })
async function f () {
  await c.connect()
  const sent = await c.send('bob', new Uint8Array([1]), { urgent: false })
  const n: number = sent.ts
  await c.send('bob', null, { bodies: { a: new Uint8Array() } })
  try { await c.sendToGroup('g', new Uint8Array()) } catch (e) { if (e instanceof ErrorFrameError) console.log(e.frame.code) }
  const p = await c.next('presence', { filter: (p) => p.items.length > 0, timeoutMs: 10 })
  c.typing('bob', true); c.read('bob', ['x']); c.ack([1, 2n]); c.subscribe(['a']); c.setActive(false)
  c.registerWebPush({ endpoint: 'https://x', keys: { p256dh: 'a', auth: 'b' } })
  await c.close()
  return [n, p]
}
void f

// @ts-expect-error: a sent frame's ts is a number, not a string
const wrong: string = (null as unknown as Awaited<ReturnType<GatewayClient['send']>>).ts
// @ts-expect-error: there is no 'messages' event
c.on('messages', () => {})
// @ts-expect-error: the token is required
void new GatewayClient({ url: 'ws://x/ws' })
void wrong

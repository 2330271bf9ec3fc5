// The TypeScript declarations (src/index.d.ts) compile under `tsc --strict`, with an
// application's use of the API in test/types/usage.ts.

import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { createRequire } from 'node:module'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'

test('the declarations type-check an application under tsc --strict', () => {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
  const project = fileURLToPath(new URL('./types/tsconfig.json', import.meta.url))
  const result = spawnSync(process.execPath, [tsc, '-p', project], { encoding: 'utf8' })
  assert.equal(result.status, 0, result.stdout + result.stderr)
})

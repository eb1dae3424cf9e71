// Every node serves this package's module at /replimesh.js on its ws://
// listeners (where the clients connect), not only on the admin port.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { sharedNodes, stopAll } from './helpers.js';

after(stopAll);

test('a ws:// listener answers GET /replimesh.js with the package file', { timeout: 30000 }, async () => {
  const { a } = await sharedNodes();
  const url = new URL('/replimesh.js', a.replace(/^ws/, 'http'));
  const res = await fetch(url, { signal: AbortSignal.timeout(10000) });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/javascript/);
  assert.equal(res.headers.get('access-control-allow-origin'), '*');
  const served = await res.text();
  const file = readFileSync(new URL('../replimesh.js', import.meta.url), 'utf8');
  assert.equal(served, file, 'the node serves another file than clients/js/replimesh.js');
  // The served module loads and has the client.
  const mod = await import(`data:text/javascript;base64,${Buffer.from(served).toString('base64')}`);
  assert.equal(typeof mod.Client, 'function');
  assert.equal(typeof mod.StoreReplica, 'function');
});

// Test helpers: `replimesh node` processes and bounded waits.
//
// The Rust test crates/cli/tests/js_client.rs runs these tests with
// REPLIMESH_BIN (the binary), REPLIMESH_WS_A and REPLIMESH_WS_B (two linked
// nodes it started) and REPLIMESH_CALLBACK_URL (a mesh server whose
// `callback` route asks the calling client back). Run by hand (`npm test`
// after `cargo build -p replimesh-cli`), the tests start their own nodes
// from target/debug/replimesh, and skip the callback test.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

/** The replimesh binary. */
export function binary() {
  const b = process.env.REPLIMESH_BIN || join(here, '../../../target/debug/replimesh');
  if (!existsSync(b)) {
    throw new Error(`replimesh binary not found at ${b}: run cargo build -p replimesh-cli or set REPLIMESH_BIN`);
  }
  return b;
}

const children = new Set();

/** Kills every node this process started (each test file's `after`). */
export async function stopAll() {
  for (const c of children) {
    try { c.kill('SIGKILL'); } catch { /* gone */ }
  }
  children.clear();
}
process.on('exit', () => {
  for (const c of children) {
    try { c.kill('SIGKILL'); } catch { /* gone */ }
  }
});

/** Rejects after `ms` with a message naming `what`. */
export function deadline(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** The next `event` of `emitter` (its arguments' first), within `ms`. */
export function next(emitter, event, ms = 10000) {
  let off;
  return deadline(new Promise(resolve => { off = emitter.on(event, resolve); }), ms, `event '${event}'`)
    .finally(() => off());
}

/** Resolves once `client` is connected (at once if it is). */
export function connected(client, ms = 10000) {
  return client.connected ? Promise.resolve() : next(client, 'connect', ms);
}

/** Resolves once `check()` is true (polled), within `ms`. */
export async function until(check, ms = 10000, what = 'a condition') {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise(r => setTimeout(r, 20));
  }
}

export const sleep = ms => new Promise(r => setTimeout(r, ms));

/**
 * The configured value of the test login's password `secret`: a cheap
 * Argon2id hash from the Rust test (tests need no slow logins), else the
 * plaintext (hashed by the node at start).
 */
const SECRET = process.env.REPLIMESH_TEST_SECRET_HASH || 'secret';

/** A node config: one ws listener, stores kv and counter with login web/secret. */
export function nodeConfig({ id, listen = 'ws://127.0.0.1:0/', extra = '' }) {
  return `
id = "${id}"
[[listen]]
url = "${listen}"
[auth]
token = "js-test-token"
[[store]]
name = "kv"
reducer = "kv"
logins = { web = "${SECRET}" }
[[store]]
name = "counter"
reducer = "counter"
logins = { web = "${SECRET}" }
${extra}
`;
}

/**
 * Starts a `replimesh node` process; resolves once it printed `ready`, with
 * its listener URLs and `stop()` (SIGKILL: the node vanishes at once).
 */
export async function startNode(toml) {
  const dir = mkdtempSync(join(tmpdir(), 'replimesh-js-'));
  const path = join(dir, 'node.toml');
  writeFileSync(path, toml);
  const child = spawn(binary(), ['node', '--config', path], {
    stdio: ['ignore', 'pipe', process.env.REPLIMESH_JS_LOG ? 'inherit' : 'ignore'],
  });
  children.add(child);
  const exited = new Promise(resolve => child.once('exit', resolve));
  const urls = [];
  const lines = createInterface({ input: child.stdout });
  await deadline(new Promise((resolve, reject) => {
    lines.on('line', line => {
      if (line.startsWith('listening ')) urls.push(line.slice('listening '.length).trim());
      if (line === 'ready') resolve();
    });
    exited.then(code => reject(new Error(`replimesh node exited (${code}) before it was ready`)));
  }), 30000, 'replimesh node to start');
  return {
    urls,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await deadline(exited, 10000, 'replimesh node to exit');
      children.delete(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

let shared = null;

/** The two linked nodes of the test run: `{ a, b }` (ws URLs). */
export async function sharedNodes() {
  if (process.env.REPLIMESH_WS_A && process.env.REPLIMESH_WS_B) {
    return { a: process.env.REPLIMESH_WS_A, b: process.env.REPLIMESH_WS_B };
  }
  if (!shared) {
    shared = (async () => {
      const a = await startNode(nodeConfig({ id: 'js-a' }));
      const peer = a.urls[0];
      const b = await startNode(nodeConfig({ id: 'js-b', extra: `[[peer]]\nid = "js-a"\nurl = "${peer}"\n` }));
      return { a: a.urls[0], b: b.urls[0] };
    })();
  }
  return shared;
}

// Reconnect over several URLs, the outboxes, and authentication errors,
// with nodes this file starts and kills itself.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, StoreReplica, CloseCode } from '../replimesh.js';
import { connected, next, nodeConfig, sharedNodes, sleep, startNode, stopAll, until } from './helpers.js';

after(stopAll);

const T = { timeout: 60000 };
const login = { login: 'web', password: 'secret' };

test('round robin over URLs; a lost node: reconnect with subscriptions', T, async () => {
  const n1 = await startNode(nodeConfig({ id: 'rr-1' }));
  const n2 = await startNode(nodeConfig({ id: 'rr-2' }));
  // A URL where nothing listens (a node that is gone) comes first.
  const dead = await startNode(nodeConfig({ id: 'rr-dead' }));
  const deadUrl = dead.urls[0];
  await dead.stop();
  const c = new Client([deadUrl, n1.urls[0], n2.urls[0]], { minDelay: 20, maxDelay: 200 });
  const closes = [];
  c.on('close', i => closes.push(i));
  const got = [];
  c.on('message', m => got.push(m.text));
  c.subscribe('g');
  const p2 = new Client(n2.urls[0]);
  try {
    await next(c, 'connect');
    assert.equal(c.url, n1.urls[0]);
    assert.equal(closes[0].url, deadUrl);
    assert.equal(closes[0].wasOpen, false);
    assert.match(closes[0].reason, /could not connect/);

    const lost = next(c, 'disconnect');
    const back = next(c, 'connect', 20000);
    await n1.stop();
    const info = await lost;
    assert.equal(info.wasOpen, true);
    assert.ok(info.reason.length > 0, 'a close has a reason');
    await back;
    assert.equal(c.url, n2.urls[0]);
    await connected(p2);
    // The subscription was restored on the new node.
    await until(() => {
      p2.publish('g', 'after the move');
      return got.includes('after the move');
    }, 10000, 'a message after the reconnect');
  } finally {
    c.close();
    p2.close();
    await n2.stop();
  }
});

test('the mesh outbox: queued while away, sent in order, bounded', T, async () => {
  const first = await startNode(nodeConfig({ id: 'ob-1' }));
  const url = first.urls[0];
  const c = new Client(url, { minDelay: 20, maxDelay: 200, outbox: 50 });
  // The client's own subscription is restored ahead of the queued messages
  // on the new connection, so it gets them all back.
  const got = [];
  c.on('message', m => got.push(m.text));
  c.subscribe('q');
  try {
    await next(c, 'connect');
    const lost = next(c, 'disconnect');
    await first.stop();
    await lost;
    // Away: publishes and a request wait.
    for (let i = 0; i < 49; i++) c.publish('q', `m${i}`);
    const reply = c.request('echo', '', 'queued request', { timeout: 20000 });
    assert.equal(c.queued, 50);
    assert.throws(() => c.publish('q', 'one too many'), e => e.kind === 'outbox-full');
    // The node comes back on the same address.
    const back = next(c, 'connect', 20000);
    const again = await startNode(nodeConfig({ id: 'ob-2', listen: url }));
    try {
      await back;
      assert.equal((await reply).text, 'queued request');
      assert.equal(c.queued, 0);
      await until(() => got.length === 49, 10000, 'the queued messages');
      assert.deepEqual(got, Array.from({ length: 49 }, (_, i) => `m${i}`));
    } finally {
      await again.stop();
    }
  } finally {
    c.close();
  }
});

test('the store outbox: dispatches made while away are committed once', T, async () => {
  const first = await startNode(nodeConfig({ id: 'so-1' }));
  const url = first.urls[0];
  const r = new StoreReplica(url, { store: 'kv', reducer: 'kv', minDelay: 20, maxDelay: 200, ...login });
  try {
    await next(r, 'connect');
    assert.equal(await r.dispatch({ type: 'set', payload: { key: 'before', value: '1' } }), 1);
    const lost = next(r, 'disconnect');
    await first.stop();
    await lost;
    const away = [r.dispatch({ type: 'set', payload: { key: 'a', value: '1' } }), r.dispatch({ type: 'set', payload: { key: 'b', value: '2' } })];
    assert.equal(r.pending, 2);
    // A fresh node (a new history, no persistence) on the same address.
    const again = await startNode(nodeConfig({ id: 'so-2', listen: url }));
    try {
      const seqs = await Promise.all(away);
      assert.deepEqual(seqs, [1, 2]);
      await r.waitFor(2);
      assert.deepEqual(r.getState(), { a: '1', b: '2' });
    } finally {
      await again.stop();
    }
  } finally {
    r.close();
  }
});

test('a wrong password is an error with the reason and stops reconnecting', T, async () => {
  const { a } = await sharedNodes();
  const c = new Client([a, a], { login: 'web', password: 'wrong', minDelay: 20 });
  let tries = 0;
  c.conn.on('url', () => tries++);
  const errors = [];
  c.on('error', e => errors.push(e));
  const closes = [];
  c.on('close', i => closes.push(i));
  const stop = await next(c, 'stop');
  assert.equal(errors.length, 1);
  assert.equal(errors[0].kind, 'auth');
  assert.equal(errors[0].code, CloseCode.AUTH_FAILED);
  assert.equal(errors[0].message, 'wrong login or password');
  assert.equal(stop.reason, 'wrong login or password');
  assert.equal(closes.length, 1);
  assert.equal(closes[0].fatal, true);
  await sleep(500);
  assert.equal(tries, 1, 'it tried again after an authentication failure');
  assert.ok(c.stopped);
  assert.throws(() => c.publish('g', 'x'), e => e.kind === 'closed' && /wrong login or password/.test(e.message));
  // The address is not banned: the right password works.
  const ok = new Client(a, login);
  try {
    await next(ok, 'connect');
  } finally {
    ok.close();
  }
});

test('a ban is an error with the reason and stops reconnecting', T, async () => {
  const n = await startNode(nodeConfig({ id: 'ban', extra: '[limits]\nmax_login_failures = 1\nban_seconds = 600\n' }));
  try {
    const wrong = new Client(n.urls[0], { login: 'web', password: 'wrong' });
    const e1 = await next(wrong, 'error');
    assert.equal(e1.kind, 'banned');
    assert.match(e1.message, /wrong login or password; address banned/);
    const right = new Client(n.urls[0], { ...login, minDelay: 20 });
    let tries = 0;
    right.conn.on('url', () => tries++);
    const e2 = await next(right, 'error');
    assert.equal(e2.kind, 'banned');
    assert.equal(e2.code, CloseCode.BANNED);
    assert.match(e2.message, /banned after too many failed logins/);
    await sleep(300);
    assert.equal(tries, 1);
    assert.ok(right.stopped && wrong.stopped);
  } finally {
    await n.stop();
  }
});

// Store replicas against real nodes: the redux interface, shared and own
// connections, refusals.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, StoreReplica } from '../replimesh.js';
import { next, sharedNodes, stopAll, until } from './helpers.js';

after(stopAll);

const T = { timeout: 30000 };
const login = { login: 'web', password: 'secret' };

test('a replica is a redux store: getState, dispatch, subscribe', T, async () => {
  const { a } = await sharedNodes();
  const mesh = new Client(a, login);
  const kv = mesh.store({ store: 'kv', reducer: 'kv' });
  const other = new StoreReplica([a], { store: 'kv', reducer: 'kv', ...login });
  try {
    await Promise.all([next(kv, 'connect'), next(other, 'connect')]);
    assert.equal(kv.conn, mesh.conn, 'Client.store shares the connection');
    assert.ok(kv.shared);
    const calls = [];
    const unsubscribe = kv.subscribe(() => calls.push(kv.getState()));
    const key = `k${Date.now()}`;
    const seq = await kv.dispatch({ type: 'set', payload: { key, value: 'blue' } });
    assert.ok(Number.isInteger(seq) && seq > 0, `seq ${seq}`);
    await kv.waitFor(seq);
    assert.equal(kv.getState()[key], 'blue');
    assert.equal(kv.seq >= seq, true);
    assert.ok(calls.some(s => s[key] === 'blue'), 'the listener saw the change');
    // The other replica (its own connection) sees it too.
    await other.waitFor(seq);
    assert.equal(other.getState()[key], 'blue');
    // The state object stays the same while nothing changes (react-redux).
    const before = kv.getState();
    assert.equal(kv.getState(), before);
    unsubscribe();
    const n = calls.length;
    const seq2 = await other.dispatch({ type: 'delete', payload: key });
    await kv.waitFor(seq2);
    assert.equal(kv.getState()[key], undefined);
    assert.equal(calls.length, n, 'an unsubscribed listener was called');
    assert.equal(kv.pending, 0);
  } finally {
    kv.close();
    other.close();
    mesh.close();
  }
});

test('a redux reducer function serves as the replica reducer', T, async () => {
  const { b } = await sharedNodes();
  // The node's counter takes {type: 'add', payload: n} and {type: 'reset'}.
  const counter = (state = 0, action) => {
    if (action.type === 'reset') return 0;
    if (action.type === 'add') return state + action.payload;
    return state;
  };
  const r = new StoreReplica(b, { store: 'counter', reducer: counter, ...login });
  try {
    assert.equal(r.getState(), 0, 'initial state from reducer(undefined, {type: "@@INIT"})');
    await next(r, 'connect');
    await r.dispatch({ type: 'reset' });
    const start = r.getState();
    const add = (payload) => r.dispatch({ type: 'add', payload });
    const seqs = await Promise.all([add(2), add(3), add(5)]);
    assert.deepEqual(seqs, [seqs[0], seqs[0] + 1, seqs[0] + 2], 'in order, consecutive');
    await r.waitFor(seqs[2]);
    assert.equal(r.getState(), start + 10);
  } finally {
    r.close();
  }
});

test('refusals reach the program: unknown store, no login, bad action', T, async () => {
  const { a } = await sharedNodes();
  const mesh = new Client(a, login);
  const anon = new Client(a);
  try {
    const unknown = mesh.store({ store: 'nope' });
    const err = await next(unknown, 'error');
    assert.equal(err.kind, 'store');
    assert.equal(err.code, 1);
    assert.match(err.message, /unknown store/);
    await assert.rejects(unknown.dispatch({ Set: { key: 'a', value: 'b' } }), e => e === err);

    const noLogin = anon.store({ store: 'kv' });
    const err2 = await next(noLogin, 'error');
    assert.match(err2.message, /needs a login/);

    const kv = mesh.store({ store: 'kv' });
    await next(kv, 'connect');
    await assert.rejects(kv.dispatch({ NotAnAction: 1 }), e => e.kind === 'store' && e.code === 3);
    // The replica goes on; the older serde form is still read.
    assert.ok(await kv.dispatch({ Set: { key: 'after', value: 'bad' } }) > 0);
  } finally {
    mesh.close();
    anon.close();
  }
});

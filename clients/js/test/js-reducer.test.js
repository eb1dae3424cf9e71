// A JavaScript reducer run by a node (`reducer = { js = ... }`) and, from
// the same file, by JavaScript replicas: the same states everywhere, and
// actions that throw or pass the node's limits refused with the node's
// reason and no change of state.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { StoreReplica, schemaOf, StoreErrorCode } from '../replimesh.js';
import todos from './reducers/todos.js';
import { next, startNode, stopAll } from './helpers.js';

after(stopAll);

const T = { timeout: 30000 };
const login = { login: 'web', password: 'secret' };
const file = join(dirname(fileURLToPath(import.meta.url)), 'reducers/todos.js');
const SECRET = process.env.REPLIMESH_TEST_SECRET_HASH || 'secret';

let node;
before(async () => {
  node = await startNode(`
id = "js-reducer"
[[listen]]
url = "ws://127.0.0.1:0/"
[[store]]
name = "todos"
reducer = { js = ${JSON.stringify(file)}, time_limit_ms = 50, memory_limit_mib = 16 }
logins = { web = "${SECRET}" }
[[store]]
name = "pinned"
reducer = { js = ${JSON.stringify(file)}, schema = 7 }
logins = { web = "${SECRET}" }
`);
});

test('the node and JavaScript replicas run the same reducer file', T, async () => {
  const schema = await schemaOf(readFileSync(file));
  const a = new StoreReplica(node.urls, { store: 'todos', reducer: todos, schema, ...login });
  const b = new StoreReplica(node.urls, { store: 'todos', reducer: todos, schema, ...login });
  try {
    await Promise.all([next(a, 'connect'), next(b, 'connect')]);
    assert.deepEqual(a.getState(), { todos: [], done: 0 }, 'the initial state of reducer(undefined, @@INIT)');
    await a.dispatch({ type: 'add', payload: 'milk' });
    await b.dispatch({ type: 'add', payload: 'bread' });
    const seq = await a.dispatch({ type: 'toggle', payload: 1 });
    await Promise.all([a.waitFor(seq), b.waitFor(seq)]);
    const want = { todos: [{ text: 'milk', done: false }, { text: 'bread', done: true }], done: 1 };
    assert.deepEqual(a.getState(), want);
    assert.deepEqual(b.getState(), want);
  } finally {
    a.close();
    b.close();
  }
});

test('throwing and over-limit actions are refused; the state stays', T, async () => {
  const schema = await schemaOf(readFileSync(file));
  const r = new StoreReplica(node.urls, { store: 'todos', reducer: todos, schema, ...login });
  try {
    await next(r, 'connect');
    await r.dispatch({ type: 'clear' });
    const seq = await r.dispatch({ type: 'add', payload: 'tea' });
    await r.waitFor(seq);
    const kept = r.getState();
    const cases = [
      [{ type: 'toggle', payload: 9 }, /RangeError: no todo 9/],
      [{ type: 'spin' }, /time limit \(50ms\)/],
      [{ type: 'hog' }, /out of memory \(limit 16777216 bytes\)/],
      [{ type: 'stamp' }, /Date\.now\(\) reads the clock/],
      [{ payload: 'no type' }, /string "type"/],
    ];
    for (const [action, why] of cases) {
      await assert.rejects(r.dispatch(action), e => {
        assert.equal(e.kind, 'store', `${action.type}: ${e.message}`);
        assert.equal(e.code, StoreErrorCode.REDUCER_PANIC, e.message);
        assert.match(e.message, why);
        assert.match(e.message, /not committed/);
        return true;
      });
      assert.deepEqual(r.getState(), kept, `state after ${action.type}`);
    }
    // The store goes on, from the state it had.
    const last = await r.dispatch({ type: 'toggle', payload: 0 });
    assert.equal(last, seq + 1, 'no refused action took a seq');
    await r.waitFor(last);
    assert.deepEqual(r.getState(), { todos: [{ text: 'tea', done: true }], done: 1 });
  } finally {
    r.close();
  }
});

test('the schema is the file hash unless the config gives one', T, async () => {
  const wrong = new StoreReplica(node.urls, { store: 'todos', reducer: todos, schema: 7, ...login });
  const pinned = new StoreReplica(node.urls, { store: 'pinned', reducer: todos, schema: 7, ...login });
  try {
    const e = await next(wrong, 'error');
    const schema = await schemaOf(readFileSync(file));
    assert.match(e.message, new RegExp(`replica schema 7 differs from authority schema ${schema}`));
    await next(pinned, 'connect');
    assert.deepEqual(pinned.getState(), { todos: [], done: 0 });
  } finally {
    wrong.close();
    pinned.close();
  }
});

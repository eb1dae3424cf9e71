// The mesh client against real nodes: groups across two linked nodes,
// request/response both ways, middlewares, the WebSocket option.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, Connection, Flow, ReplimeshError } from '../replimesh.js';
import { next, sharedNodes, stopAll, until } from './helpers.js';

after(stopAll);

const T = { timeout: 30000 };

test('publish on one node reaches a subscriber on the other', T, async () => {
  const { a, b } = await sharedNodes();
  const sub = new Client(a);
  const pub = new Client(b);
  try {
    const got = [];
    sub.on('message', m => got.push(m));
    sub.subscribe('news');
    await Promise.all([next(sub, 'connect'), next(pub, 'connect')]);
    // The subscription travels to the other node by interest routing:
    // publish until it arrives.
    await until(() => {
      pub.publish('news', { n: 1 });
      return got.length > 0;
    }, 20000, 'the message on the other node');
    assert.equal(got[0].group, 'news');
    assert.equal(got[0].from, pub.id);
    assert.deepEqual(got[0].json(), { n: 1 });
    assert.equal(got[0].text, '{"n":1}');
    // notToMe keeps it from the publisher's own subscription.
    pub.subscribe('news');
    const own = [];
    pub.on('message', m => own.push(m));
    await until(() => {
      sub.publish('news', 'both');
      return own.some(m => m.text === 'both');
    }, 20000, 'the message back on node b');
    pub.publish('news', 'not to me', { notToMe: true });
    await until(() => got.some(m => m.text === 'not to me'), 10000, 'the notToMe message');
    pub.publish('news', 'marker');
    await until(() => own.some(m => m.text === 'marker'), 10000, 'the marker');
    assert.ok(!own.some(m => m.text === 'not to me'), 'notToMe came back to its publisher');
    assert.deepEqual(sub.myGroups(), ['news']);
  } finally {
    sub.close();
    pub.close();
  }
});

test('requests: echo, errors, timeouts', T, async () => {
  const { a } = await sharedNodes();
  const c = new Client([a]);
  try {
    await next(c, 'connect');
    const r = await c.request('echo', 'any', { hello: 'world' });
    assert.deepEqual(r.json(), { hello: 'world' });
    const bytes = await c.request('echo', '', new Uint8Array([0, 1, 255]));
    assert.deepEqual([...bytes.bytes], [0, 1, 255]);
    await assert.rejects(c.request('nowhere', 'x', 'data'), e => {
      assert.ok(e instanceof ReplimeshError);
      assert.equal(e.kind, 'response');
      assert.equal(e.code, 404);
      assert.match(e.message, /no route/);
      return true;
    });
  } finally {
    c.close();
  }
  // A stopped client refuses at once, with the reason.
  assert.throws(() => c.publish('g', 'x'), e => e.kind === 'closed');
  await assert.rejects(c.request('echo', '', 'x'), e => e.kind === 'closed');
});

test('the server can ask the client: routes and middlewares', T, async t => {
  const url = process.env.REPLIMESH_CALLBACK_URL;
  if (!url) {
    t.skip('REPLIMESH_CALLBACK_URL is not set (run by crates/cli/tests/js_client.rs)');
    return;
  }
  const c = new Client(url);
  const seen = [];
  c.use(ctx => { seen.push(`${ctx.route}/${ctx.act}`); });
  c.use(ctx => (ctx.act === 'blocked' ? Flow.reply('blocked by middleware') : Flow.next));
  c.route('client', 'double', data => data.json() * 2);
  c.route('client', 'fail', () => { throw Object.assign(new Error('nope'), { code: 418 }); });
  c.route('client', '', (data, ctx) => `any act: ${ctx.act} ${data.text}`);
  try {
    await next(c, 'connect');
    // `callback/ACT` makes the server request `client/ACT` from the caller
    // and answer with what it got.
    assert.equal((await c.request('callback', 'double', 21)).json(), 42);
    assert.equal((await c.request('callback', 'other', 'x')).text, 'any act: other x');
    assert.equal((await c.request('callback', 'blocked', 'x')).text, 'blocked by middleware');
    await assert.rejects(c.request('callback', 'fail', ''), e => {
      assert.equal(e.kind, 'response');
      assert.match(e.message, /418.*nope|nope/);
      return true;
    });
    assert.deepEqual(seen, ['client/double', 'client/other', 'client/blocked', 'client/fail']);
  } finally {
    c.close();
  }
});

test('the WebSocket implementation can be passed in', T, async () => {
  const { a } = await sharedNodes();
  const made = [];
  const Global = globalThis.WebSocket;
  class Counting extends Global {
    constructor(url, protocols) {
      super(url, protocols);
      made.push({ url, protocols });
    }
  }
  const c = new Client(a, { WebSocket: Counting });
  try {
    await next(c, 'connect');
    assert.equal(made.length, 1);
    assert.equal(made[0].protocols, 'replimesh.v1.json');
  } finally {
    c.close();
  }
  // Without one (Node.js 20 without the flag), a clear error.
  delete globalThis.WebSocket;
  try {
    assert.throws(() => new Connection(a), e => e.kind === 'config' && /WebSocket/.test(e.message));
  } finally {
    globalThis.WebSocket = Global;
  }
});

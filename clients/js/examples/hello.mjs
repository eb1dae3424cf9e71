// A runnable example of the Replimesh JavaScript client (Node.js 20+).
//
// Start a node with the example config (from the repository root):
//   cargo run -p replimesh-cli -- node --config crates/cli/examples/node.toml
// then, in clients/js/:
//   node --experimental-websocket examples/hello.mjs     (Node.js 22+: no flag)
// Another URL: REPLIMESH_URL=ws://host:port/ node ... examples/hello.mjs

import { Client } from '../replimesh.js'; // from an installed package: 'replimesh'

const url = process.env.REPLIMESH_URL || 'ws://127.0.0.1:7001/';
const mesh = new Client([url], { login: 'web', password: 'secret' });

// Wrong password or a banned address: an error with the server's reason,
// and the client stops (no retries that would get the address banned).
mesh.on('error', e => console.error(`error (${e.kind}): ${e.message}`));
mesh.on('disconnect', c => console.log(`disconnected: ${c.reason}`));
let done = false;
mesh.on('stop', s => {
  console.log(`stopped: ${s.reason}`);
  if (!done) process.exitCode = 1;
});

mesh.subscribe('news');
mesh.on('message', m => console.log(`message on ${m.group}:`, m.json()));

// A store replica over the same connection, usable as a redux store.
const kv = mesh.store({ store: 'kv', reducer: 'kv' });
kv.subscribe(() => console.log('kv state:', kv.getState()));

mesh.once('connect', async () => {
  const reply = await mesh.request('echo', 'any', { hello: 'node' });
  console.log('echo replied:', reply.json());
  mesh.publish('news', { text: 'hello from JavaScript' });
  const seq = await kv.dispatch({ type: 'set', payload: { key: 'greeting', value: 'hello' } });
  console.log(`dispatch committed as seq ${seq}`);
  await kv.waitFor(seq);
  done = true;
  setTimeout(() => mesh.close(), 200); // let the message arrive, then leave
});

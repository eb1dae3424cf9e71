// replimesh.js: a dependency-free browser client for Replimesh.
//
// Speaks the `replimesh.v1.json` WebSocket subprotocol: every frame is the
// canonical proto3 JSON form of `replimesh.v1.Frame` (see replimesh.proto):
// bytes fields are base64 strings, uint64 fields are decimal strings, enums
// are their names. Served by every `replimesh node` at `/replimesh.js`.
//
// One connection carries both the mesh and the stores (a node's listeners
// serve both); the login, if any, is the connection's and is checked per store.
//
//   import { Client, StoreReplica, reducers } from '/replimesh.js';
//   const mesh = new Client(['ws://host:7001/', 'ws://host:7002/'],
//                           { login: 'web', password: 'secret' });
//   mesh.subscribe('news');
//   mesh.on('message', m => console.log(m.group, m.text));
//   mesh.publish('news', {hello: 'world'});
//   const reply = await mesh.request('users', 'get', {id: 1});
//
//   const kv = mesh.store({ store: 'kv', reducer: reducers.kv });  // same connection
//   kv.subscribe((state, seq) => render(state));
//   await kv.dispatch({Set: {key: 'a', value: '1'}});
//
// `new StoreReplica(urls, {store, login, password, ...})` opens a connection
// of its own instead.

export const PROTOCOL = 'replimesh.v1.json';
export const VERSION = 1;

// ---- encoding helpers -------------------------------------------------------

const utf8enc = new TextEncoder();
const utf8dec = new TextDecoder();

/** Base64 of a Uint8Array. */
export function toBase64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

/** Uint8Array from base64 (empty for a missing field). */
export function fromBase64(b64) {
  if (!b64) return new Uint8Array(0);
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** Encodes an application payload: bytes as is, strings as UTF-8, anything else as JSON. */
export function encodeData(data) {
  if (data === undefined || data === null) return '';
  if (data instanceof Uint8Array) return toBase64(data);
  if (typeof data === 'string') return toBase64(utf8enc.encode(data));
  return toBase64(utf8enc.encode(JSON.stringify(data)));
}

/** A received payload: `.bytes`, `.text` and `.json()`. */
export function decodeData(b64) {
  const bytes = fromBase64(b64);
  return {
    bytes,
    get text() { return utf8dec.decode(bytes); },
    json() { return JSON.parse(utf8dec.decode(bytes)); },
  };
}

function randomId(prefix) {
  const a = new Uint8Array(8);
  crypto.getRandomValues(a);
  return prefix + Array.from(a, b => b.toString(16).padStart(2, '0')).join('');
}

// ---- events -----------------------------------------------------------------

class Emitter {
  constructor() { this._handlers = new Map(); }
  /** Adds a handler for `event`; returns a function that removes it. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this._handlers.get(event).delete(fn);
  }
  /** Calls `fn` the next time `event` fires. */
  once(event, fn) {
    const off = this.on(event, (...a) => { off(); fn(...a); });
    return off;
  }
  emit(event, ...args) {
    const hs = this._handlers.get(event);
    if (!hs) return;
    for (const h of [...hs]) {
      try { h(...args); } catch (e) { console.error('replimesh handler', e); }
    }
  }
}

// ---- connection -------------------------------------------------------------

/**
 * One logical connection over several server URLs: it sends `Hello`, waits
 * for `Welcome`, answers pings, and on a broken connection moves to the next
 * URL (round robin) after a jittered exponential backoff.
 *
 * Events: 'open' (welcome), 'frame' (every frame after the welcome),
 * 'close' ({code, reason}: the server's `Close` code by name, such as
 * 'CLOSE_CODE_GOING_AWAY', or the WebSocket close code, a number, when the
 * server sent no `Close`), 'error', 'url' (the URL being tried), 'stop'.
 */
export class Connection extends Emitter {
  constructor(urls, opts = {}) {
    super();
    this.urls = (Array.isArray(urls) ? urls : [urls]).slice();
    if (this.urls.length === 0) throw new Error('replimesh: no URL');
    this.id = opts.id || randomId('web-');
    this.data = opts.data;
    this.login = opts.login || '';
    this.password = opts.password || '';
    this.reconnect = opts.reconnect !== false;
    this.minDelay = opts.minDelay ?? 100;
    this.maxDelay = opts.maxDelay ?? 5000;
    this.attempts = opts.attempts ?? 0; // 0: forever
    this.index = 0;
    this.failures = 0;
    this.ws = null;
    this.ready = false;
    this.stopped = false;
    this.welcome = null;
    this._timer = null;
    setTimeout(() => this._connect(), 0);
  }

  /** The URL currently used (or being tried). */
  get url() { return this.urls[this.index % this.urls.length]; }

  addUrl(url) { if (!this.urls.includes(url)) this.urls.push(url); }
  deleteUrl(url) {
    const i = this.urls.indexOf(url);
    if (i >= 0 && this.urls.length > 1) this.urls.splice(i, 1);
  }
  /** Drops the current connection and moves to the next URL. */
  nextUrl() { if (this.ws) this.ws.close(); }

  _connect() {
    if (this.stopped) return;
    const url = this.url;
    this.emit('url', url);
    let ws;
    try {
      ws = new WebSocket(url, PROTOCOL);
    } catch (e) {
      this.emit('error', e);
      this._scheduleReconnect();
      return;
    }
    this.ws = ws;
    let closeInfo = null;
    ws.onopen = () => {
      const hello = { version: VERSION, kind: 'PEER_KIND_CLIENT', id: this.id };
      if (this.data !== undefined) hello.data = encodeData(this.data);
      if (this.login) { hello.login = this.login; hello.password = this.password; }
      ws.send(JSON.stringify({ hello }));
    };
    ws.onmessage = ev => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch (e) { this.emit('error', e); return; }
      if (frame.ping) { ws.send(JSON.stringify({ pong: { nonce: frame.ping.nonce || '0' } })); return; }
      if (frame.pong) return;
      if (frame.close) { closeInfo = { code: frame.close.code || 'CLOSE_CODE_NORMAL', reason: frame.close.reason || '' }; return; }
      if (!this.ready) {
        if (frame.welcome) {
          this.ready = true;
          this.failures = 0;
          this.welcome = frame.welcome;
          this.emit('open', frame.welcome);
        }
        return;
      }
      this.emit('frame', frame);
    };
    ws.onerror = () => this.emit('error', new Error('WebSocket error on ' + url));
    ws.onclose = ev => {
      const was = this.ready;
      this.ready = false;
      this.ws = null;
      const info = closeInfo || { code: ev.code, reason: ev.reason || '' };
      if (was) this.emit('close', info);
      this.index = (this.index + 1) % this.urls.length;
      this._scheduleReconnect();
    };
  }

  _scheduleReconnect() {
    if (this.stopped || !this.reconnect) { this.emit('stop'); return; }
    this.failures++;
    if (this.attempts > 0 && this.failures > this.attempts) { this.stopped = true; this.emit('stop'); return; }
    // Only back off after a whole round of URLs failed.
    const round = Math.floor((this.failures - 1) / this.urls.length);
    const base = round === 0 ? this.minDelay / 4 : Math.min(this.maxDelay, this.minDelay * 2 ** (round - 1));
    const delay = base / 2 + Math.random() * base / 2;
    this._timer = setTimeout(() => this._connect(), delay);
  }

  /** Sends a frame object if connected; returns whether it was sent. */
  send(frame) {
    if (!this.ready || !this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Closes for good. */
  close() {
    this.stopped = true;
    clearTimeout(this._timer);
    if (this.ws) {
      try { this.ws.send(JSON.stringify({ close: { code: 'CLOSE_CODE_NORMAL', reason: 'client closed' } })); } catch (e) { /* closed */ }
      this.ws.close();
    }
  }
}

// ---- mesh client ------------------------------------------------------------

/**
 * A mesh client: groups (subscribe, publish, messages), request/response and
 * routes in both directions. Subscriptions are restored after a reconnect.
 *
 * Events: 'connect' (welcome), 'disconnect' ({code, reason}), 'message'
 * ({group, from, data, text, json()}), 'send' (a routed message without
 * reply from the server), 'noroute', 'error'.
 */
export class Client extends Emitter {
  constructor(urls, opts = {}) {
    super();
    this.groups = new Set();
    this.pending = new Map();
    this.routes = new Map();
    this.nextId = 1;
    this.timeout = opts.timeout ?? 10000;
    this.conn = new Connection(urls, opts);
    this.id = this.conn.id;
    this.conn.on('open', w => {
      if (this.groups.size) this.conn.send({ subscribe: { groups: [...this.groups] } });
      this.emit('connect', w);
    });
    this.conn.on('close', c => this.emit('disconnect', c));
    this.conn.on('error', e => this.emit('error', e));
    this.conn.on('frame', f => this._frame(f));
  }

  get connected() { return this.conn.ready; }
  get url() { return this.conn.url; }
  /** Groups this client is subscribed to. */
  myGroups() { return [...this.groups]; }

  subscribe(...groups) {
    groups = groups.flat();
    groups.forEach(g => this.groups.add(g));
    this.conn.send({ subscribe: { groups } });
  }

  unsubscribe(...groups) {
    groups = groups.flat();
    groups.forEach(g => this.groups.delete(g));
    this.conn.send({ unsubscribe: { groups } });
  }

  /** Publishes to a group or list of groups (`'*'` or `{all: true}`: every group). */
  publish(groups, data, opts = {}) {
    const all = groups === '*' || opts.all === true;
    const list = all ? [] : (Array.isArray(groups) ? groups : [groups]);
    return this.conn.send({ publish: { groups: list, all, notToMe: !!opts.notToMe, data: encodeData(data) } });
  }

  /** A routed message with no reply. */
  send(route, act, data) {
    return this.conn.send({ send: { route, act: act || '', data: encodeData(data) } });
  }

  /** A routed request; resolves with the reply's payload, rejects on error or timeout. */
  request(route, act, data, opts = {}) {
    const id = this.nextId++;
    const timeout = opts.timeout ?? this.timeout;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`replimesh: request ${route}/${act} timed out after ${timeout} ms`));
      }, timeout);
      this.pending.set(id, { resolve, reject, timer });
      if (!this.conn.send({ request: { id: String(id), route, act: act || '', data: encodeData(data) } })) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(new Error('replimesh: not connected'));
      }
    });
  }

  /** A replica of a store over this client's connection (see `StoreReplica`). */
  store(opts) { return new StoreReplica(this, opts); }

  /** Handles requests and sends from the server: `handler(data, {route, act})` may return (a promise of) a reply. */
  route(route, act, handler) {
    this.routes.set(route + '\u0000' + (act || ''), handler);
  }

  close() { this.conn.close(); }

  _frame(f) {
    if (f.deliver) {
      const d = f.deliver;
      const data = decodeData(d.data);
      this.emit('message', { group: d.group, from: d.from || '', data: data.bytes, get text() { return data.text; }, json: data.json });
    } else if (f.response) {
      const r = f.response;
      const p = this.pending.get(Number(r.id));
      if (!p) return;
      this.pending.delete(Number(r.id));
      clearTimeout(p.timer);
      if (r.error && (r.error.code || r.error.message)) p.reject(Object.assign(new Error(r.error.message || 'error'), { code: r.error.code || 0 }));
      else p.resolve(decodeData(r.data));
    } else if (f.request || f.send) {
      this._serve(f.request || f.send, !!f.request);
    }
  }

  async _serve(m, wantsReply) {
    const h = this.routes.get(m.route + '\u0000' + (m.act || '')) || this.routes.get(m.route + '\u0000');
    if (!h) {
      this.emit('noroute', m);
      if (wantsReply) this.conn.send({ response: { id: m.id, error: { code: 404, message: `no route ${m.route}/${m.act || ''}` } } });
      return;
    }
    try {
      const out = await h(decodeData(m.data), { route: m.route, act: m.act || '' });
      if (wantsReply) this.conn.send({ response: { id: m.id, data: encodeData(out) } });
    } catch (e) {
      if (wantsReply) this.conn.send({ response: { id: m.id, error: { code: 500, message: String(e && e.message || e) } } });
    }
  }
}

// ---- store replica ----------------------------------------------------------

/** Reducers of the stores built into `replimesh node` (JSON actions as serde writes them). */
export const reducers = {
  counter: {
    initial: () => 0,
    reduce(state, action) {
      if (action === 'Reset') return 0;
      if (action && typeof action.Add === 'number') return state + action.Add;
      return state;
    },
  },
  kv: {
    initial: () => ({}),
    reduce(state, action) {
      if (action === 'Clear') return {};
      const next = Object.assign({}, state);
      if (action && action.Set) next[action.Set.key] = action.Set.value;
      else if (action && typeof action.Delete === 'string') delete next[action.Delete];
      return next;
    },
  },
};

/**
 * A replica of a store: it follows the authority's history (snapshot plus
 * actions, in sequence order, asking for a resync on a gap) and dispatches
 * actions that resolve with their committed sequence number. Dispatches made
 * while disconnected wait in an outbox and are sent once after reconnect; the
 * authority applies each exactly once (by client id and op id).
 *
 * `source` is the server URL(s) for a connection of its own, or a `Client`
 * (or `Connection`) whose connection it shares: then the login is that
 * connection's, and `close()` detaches the replica only.
 *
 * Options: store (name), login, password, reducer ({initial, reduce}),
 * schema (default 1), clientId, plus the Connection options.
 * Events: 'state' (state, seq), 'connect', 'disconnect', 'error' ({code, message}).
 */
export class StoreReplica extends Emitter {
  constructor(source, opts = {}) {
    super();
    if (!opts.store) throw new Error('replimesh: StoreReplica needs opts.store');
    this.store = opts.store;
    this.schema = opts.schema ?? 1;
    this.reducer = opts.reducer || reducers.kv;
    this.clientId = opts.clientId || randomId('web-replica-');
    this.state = this.reducer.initial();
    this.seq = 0;
    this.historyId = '0';
    this.nextOp = 1;
    this.outbox = new Map(); // opId -> {action, resolve, reject}
    this.waiters = [];
    this.attached = false;
    this.closed = false;
    const shared = source instanceof Client ? source.conn : (source instanceof Connection ? source : null);
    this.shared = !!shared;
    this.conn = shared || new Connection(source, Object.assign({}, opts, { id: this.clientId }));
    this._off = [
      this.conn.on('open', () => this._hello()),
      this.conn.on('close', c => { this.attached = false; this.emit('disconnect', c); }),
      this.conn.on('frame', f => this._frame(f)),
    ];
    // A shared connection may be up already.
    if (this.shared && this.conn.ready) setTimeout(() => this._hello(), 0);
  }

  get connected() { return this.attached; }

  /** Calls `fn(state, seq)` now and after every change; returns an unsubscribe function. */
  subscribe(fn) {
    fn(this.state, this.seq);
    return this.on('state', fn);
  }

  /** Resolves once the replica has applied `seq`. */
  waitFor(seq) {
    if (this.seq >= seq) return Promise.resolve(this.seq);
    return new Promise(resolve => this.waiters.push({ seq, resolve }));
  }

  /** Sends an action; resolves with its sequence number once committed. */
  dispatch(action) {
    const opId = this.nextOp++;
    return new Promise((resolve, reject) => {
      this.outbox.set(opId, { action, resolve, reject });
      if (this.attached) this._sendDispatch(opId);
    });
  }

  /** Stops the replica; closes its connection unless it shares a client's. */
  close() {
    this.closed = true;
    this.attached = false;
    this._off.forEach(off => off());
    if (!this.shared) this.conn.close();
  }

  _hello() {
    if (this.closed) return;
    this.conn.send({ storeHello: {
      store: this.store, schema: this.schema, clientId: this.clientId,
      historyId: this.historyId, lastSeq: String(this.seq), encoding: 'ENCODING_JSON' } });
  }

  _sendDispatch(opId) {
    const e = this.outbox.get(opId);
    this.conn.send({ dispatch: { store: this.store, opId: String(opId), action: encodeData(e.action) } });
  }

  _setState(state, seq) {
    this.state = state;
    this.seq = seq;
    this.emit('state', state, seq);
    const still = [];
    for (const w of this.waiters) (w.seq <= seq ? w.resolve(seq) : still.push(w));
    this.waiters = still;
  }

  _resync() {
    this.conn.send({ resync: { store: this.store, historyId: this.historyId, lastSeq: String(this.seq) } });
  }

  _frame(f) {
    const body = f.storeWelcome || f.snapshot || f.actions || f.committed || f.storeError || f.digest;
    if (!body || (body.store && body.store !== this.store)) return;
    if (f.storeWelcome) {
      const w = f.storeWelcome;
      if (w.historyId !== this.historyId && this.historyId !== '0') {
        // A new history: start from its snapshot.
        this.seq = 0;
      }
      this.historyId = w.historyId || '0';
      this.attached = true;
      const last = Number(w.lastOpId || 0);
      for (const [opId] of this.outbox) if (opId > last) this._sendDispatch(opId);
      this.emit('connect', w);
    } else if (f.snapshot) {
      const s = f.snapshot;
      this.historyId = s.historyId || this.historyId;
      this._setState(decodeData(s.state).json(), Number(s.seq || 0));
    } else if (f.actions) {
      const a = f.actions;
      let seq = Number(a.firstSeq || 0);
      let state = this.state;
      let applied = this.seq;
      for (const b64 of a.actions || []) {
        if (seq <= applied) { seq++; continue; }
        if (seq !== applied + 1) { this._resync(); break; }
        state = this.reducer.reduce(state, decodeData(b64).json());
        applied = seq++;
      }
      if (applied !== this.seq) this._setState(state, applied);
    } else if (f.committed) {
      const c = f.committed;
      const seqs = [Number(c.seq || 0), ...(c.moreSeqs || []).map(Number)];
      seqs.forEach((seq, i) => {
        const opId = Number(c.opId) + i;
        const e = this.outbox.get(opId);
        if (!e || seq === 0) return;
        this.outbox.delete(opId);
        e.resolve(seq);
      });
    } else if (f.storeError) {
      const err = f.storeError.error || {};
      const opId = Number(f.storeError.opId || 0);
      const e = opId && this.outbox.get(opId);
      const error = Object.assign(new Error(err.message || 'store error'), { code: err.code || 0 });
      if (e) { this.outbox.delete(opId); e.reject(error); } else this.emit('error', error);
    }
  }
}

// replimesh.js: the JavaScript client of Replimesh, for browsers and Node.js.
//
// One ES module with no dependencies; types in replimesh.d.ts. Speaks the
// `replimesh.v1.json` WebSocket subprotocol: every frame is the canonical
// proto3 JSON form of `replimesh.v1.Frame` (see docs/protocol.md): bytes
// fields are base64 strings, 64-bit integers decimal strings. Every
// `replimesh node` serves this very file at `/replimesh.js`, on its admin port
// and on its `ws://` listeners.
//
//   import { Client } from 'replimesh';          // or from '/replimesh.js'
//   const mesh = new Client(['ws://host:7001/', 'ws://host:7002/'],
//                           { login: 'web', password: 'secret' });
//   mesh.on('error', e => console.error(e.message));  // wrong password, ban
//   mesh.subscribe('news');
//   mesh.on('message', m => console.log(m.group, m.text));
//   mesh.publish('news', { hello: 'world' });
//   const reply = await mesh.request('echo', 'x', { id: 1 });
//
//   const kv = mesh.store({ store: 'kv', reducer: 'kv' });  // same connection
//   kv.subscribe(() => render(kv.getState()));             // a redux store
//   const seq = await kv.dispatch({ Set: { key: 'a', value: '1' } });
//
// Node.js 22+ has a global WebSocket; Node.js 20 needs
// `node --experimental-websocket`, or pass one: `{ WebSocket }` from the
// `ws` package.

export const PROTOCOL = 'replimesh.v1.json';
export const VERSION = 1;

/** `Close` codes (docs/protocol.md, "Close codes"). */
export const CloseCode = Object.freeze({
  NORMAL: 0,
  GOING_AWAY: 1,
  PROTOCOL_ERROR: 2,
  FRAME_TOO_LARGE: 3,
  SLOW_CONSUMER: 4,
  TIMEOUT: 5,
  AUTH_FAILED: 6,
  BANNED: 7,
  UNSUPPORTED_VERSION: 8,
});

/** Store error codes (`StoreError.error.code`). */
export const StoreErrorCode = Object.freeze({
  UNKNOWN_STORE: 1,
  SCHEMA_MISMATCH: 2,
  BAD_ACTION: 3,
  REDUCER_PANIC: 4,
  FORGOTTEN: 5,
  OUTBOX_FULL: 6,
  NOT_ATTACHED: 7,
  HISTORY_LOST: 8,
  INTERNAL: 9,
  OP_ID_REUSED: 10,
});

/** Close codes after which reconnecting is pointless (and would get the address banned). */
const FATAL = new Map([
  [CloseCode.AUTH_FAILED, 'auth'],
  [CloseCode.BANNED, 'banned'],
  [CloseCode.UNSUPPORTED_VERSION, 'version'],
]);

/**
 * Every error this module reports: `kind` says what happened ('auth',
 * 'banned', 'version', 'disconnected', 'closed', 'outbox-full', 'timeout',
 * 'response', 'store', 'protocol', 'config'); `code` is the server's numeric
 * code where there is one; `url` the server URL where it matters.
 */
export class ReplimeshError extends Error {
  constructor(kind, message, extra = {}) {
    super(message);
    this.name = 'ReplimeshError';
    this.kind = kind;
    this.code = extra.code;
    if (extra.url !== undefined) this.url = extra.url;
  }
}

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

function messageText(data) {
  if (typeof data === 'string') return data;
  if (data instanceof ArrayBuffer) return utf8dec.decode(new Uint8Array(data));
  if (ArrayBuffer.isView(data)) return utf8dec.decode(data);
  if (Array.isArray(data)) return data.map(messageText).join(''); // ws: fragments
  return String(data);
}

// ---- events -----------------------------------------------------------------

/** A minimal event emitter (the same in browsers and Node.js). */
export class Emitter {
  constructor() { this._handlers = new Map(); }
  /** Adds a handler for `event`; returns a function that removes it. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }
  /** Removes a handler. */
  off(event, fn) {
    const hs = this._handlers.get(event);
    if (hs) hs.delete(fn);
  }
  /** Calls `fn` the next time `event` fires; returns a function that removes it. */
  once(event, fn) {
    const off = this.on(event, (...a) => { off(); fn(...a); });
    return off;
  }
  /** Calls the handlers of `event`; an 'error' nobody listens to goes to console.error. */
  emit(event, ...args) {
    const hs = this._handlers.get(event);
    if (!hs || hs.size === 0) {
      if (event === 'error') console.error('replimesh:', args[0] && args[0].message || args[0]);
      return;
    }
    for (const h of [...hs]) {
      try { h(...args); } catch (e) { console.error('replimesh: event handler threw', e); }
    }
  }
}

// ---- connection -------------------------------------------------------------

/**
 * One logical connection over several server URLs: it sends `Hello`, waits
 * for `Welcome`, answers pings, and when the connection breaks moves to the
 * next URL (round robin) after a jittered exponential backoff.
 *
 * Events: 'url' (the URL being tried), 'open' (the server's welcome),
 * 'frame' (every frame after the welcome), 'close' ({code, reason, url,
 * wasOpen, fatal}: every closed socket, with its reason), 'error'
 * (ReplimeshError: authentication failed, banned, unsupported version, or a
 * malformed frame), 'stop' ({code, reason}: no more connection attempts).
 * After 'auth', 'banned' and 'version' errors it stops reconnecting, so a
 * wrong password does not get the address banned.
 */
export class Connection extends Emitter {
  constructor(urls, opts = {}) {
    super();
    this.urls = (Array.isArray(urls) ? urls : [urls]).slice();
    if (this.urls.length === 0) throw new ReplimeshError('config', 'replimesh: no URL');
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    if (typeof this.WebSocket !== 'function') {
      throw new ReplimeshError('config', 'replimesh: no WebSocket implementation: pass one as ' +
        'the WebSocket option (e.g. `import { WebSocket } from "ws"`), or use Node.js 22+ ' +
        '(Node.js 20: node --experimental-websocket)');
    }
    this.id = opts.id || randomId('web-');
    this.data = opts.data;
    this.login = opts.login || '';
    this.password = opts.password || '';
    this.reconnect = opts.reconnect !== false;
    this.minDelay = opts.minDelay ?? 100;
    this.maxDelay = opts.maxDelay ?? 5000;
    this.attempts = opts.attempts ?? 0; // 0: forever
    this.handshakeTimeout = opts.handshakeTimeout ?? 10000;
    this.idleTimeout = opts.idleTimeout ?? 30000; // 0: off
    this.index = 0;
    this.failures = 0;
    this.ws = null;
    this.ready = false;
    this.stopped = false;
    this.welcome = null;
    /** Connections made so far. */
    this.connections = 0;
    /** The last close: {code, reason, url, wasOpen, fatal}. */
    this.lastClose = null;
    this._timer = null;
    this._stopInfo = null;
    this._timer = setTimeout(() => this._connect(), 0);
  }

  /** The URL currently used (or being tried). */
  get url() { return this.urls[this.index % this.urls.length]; }

  /** Adds a server URL to the rotation. */
  addUrl(url) { if (!this.urls.includes(url)) this.urls.push(url); }
  /** Removes a server URL from the rotation (never the last one). */
  deleteUrl(url) {
    const i = this.urls.indexOf(url);
    if (i >= 0 && this.urls.length > 1) this.urls.splice(i, 1);
  }
  /** Drops the current connection and moves to the next URL. */
  nextUrl() { if (this.ws) this._drop({ code: null, reason: 'moving to the next URL (nextUrl)' }); }

  _connect() {
    this._timer = null;
    if (this.stopped) return;
    const url = this.url;
    this.emit('url', url);
    let ws;
    try {
      ws = new this.WebSocket(url, PROTOCOL);
    } catch (e) {
      this._closed({ code: null, reason: `cannot connect to ${url}: ${e && e.message || e}`, url, wasOpen: false });
      return;
    }
    this.ws = ws;
    this._why = null; // why this socket closed, when known before its close event
    let lastRx = Date.now();
    let idle = null;
    const handshake = setTimeout(() => {
      if (!this.ready && this.ws === ws) {
        this._drop({ code: CloseCode.TIMEOUT, reason: `no welcome from ${url} within ${this.handshakeTimeout} ms` });
      }
    }, this.handshakeTimeout);
    ws.onopen = () => {
      const hello = { version: VERSION, kind: 'PEER_KIND_CLIENT', id: this.id };
      if (this.data !== undefined) hello.data = encodeData(this.data);
      if (this.login) { hello.login = this.login; hello.password = this.password; }
      ws.send(JSON.stringify({ hello }));
    };
    ws.onmessage = ev => {
      if (this.ws !== ws) return;
      lastRx = Date.now();
      let frame;
      try {
        frame = JSON.parse(messageText(ev.data));
      } catch (e) {
        this.emit('error', new ReplimeshError('protocol', `replimesh: malformed frame from ${url}: ${e.message}`, { url }));
        return;
      }
      if (frame === null || typeof frame !== 'object') return;
      if (frame.ping) { ws.send(JSON.stringify({ pong: { nonce: frame.ping.nonce || '0' } })); return; }
      if (frame.pong) return;
      if (frame.close) {
        this._why = { code: closeCodeOf(frame.close.code), reason: frame.close.reason || '' };
        return;
      }
      if (!this.ready) {
        if (frame.welcome) {
          clearTimeout(handshake);
          this.ready = true;
          this.failures = 0;
          this.connections++;
          this.welcome = frame.welcome;
          if (this.idleTimeout > 0) {
            idle = setInterval(() => {
              if (this.ws !== ws) { clearInterval(idle); return; }
              if (Date.now() - lastRx > this.idleTimeout) {
                this._drop({ code: CloseCode.TIMEOUT, reason: `nothing from ${url} for ${this.idleTimeout} ms` });
              }
            }, Math.max(50, Math.min(5000, this.idleTimeout / 3)));
          }
          this.emit('open', frame.welcome);
        }
        return;
      }
      this.emit('frame', frame);
    };
    // Some implementations (Node.js 20's) report a failed connection with
    // an error and never a close: either one ends this socket.
    const finish = ev => {
      clearTimeout(handshake);
      clearInterval(idle);
      if (this.ws !== ws) return;
      const wasOpen = this.ready;
      this.ready = false;
      this.ws = null;
      ws.onmessage = null;
      if (ev.type === 'error') {
        try { ws.close(); } catch (e) { /* not open */ }
      }
      const what = ev.type === 'error' ? 'WebSocket error' : `WebSocket close ${ev.code}`;
      const why = this._why || {
        code: null,
        reason: ev.reason || (wasOpen ? `connection to ${url} lost (${what})` : `could not connect to ${url} (${what})`),
      };
      this._closed({ code: why.code, reason: why.reason, url, wasOpen });
    };
    ws.onerror = ev => finish({ type: 'error', reason: ev && ev.message && !this.ready ? `could not connect to ${url}: ${ev.message}` : '' });
    ws.onclose = ev => finish({ type: 'close', code: ev.code, reason: ev.reason });
  }

  /** Closes the current socket with a known reason. */
  _drop(why) {
    const ws = this.ws;
    if (!ws) return;
    this._why = why;
    try { ws.close(1000); } catch (e) { /* already closing */ }
    // Some implementations are slow to report the close: act now.
    const wasOpen = this.ready;
    this.ws = null;
    this.ready = false;
    ws.onmessage = null;
    this._closed(Object.assign({ url: this.urls[this.index % this.urls.length], wasOpen }, why));
  }

  _closed(info) {
    const kind = FATAL.get(info.code);
    info.fatal = kind !== undefined;
    this.lastClose = info;
    if (kind) {
      this.emit('error', new ReplimeshError(kind, info.reason || `closed by the server (code ${info.code})`,
        { code: info.code, url: info.url }));
    }
    this.emit('close', info);
    if (info.fatal) { this._stop(info); return; }
    if (!info.wasOpen) this.failures++;
    this.index = (this.index + 1) % this.urls.length;
    if (this.stopped) { this._stop(this._stopInfo || info); return; }
    if (!this.reconnect) { this._stop({ code: info.code, reason: `${info.reason} (reconnect is off)` }); return; }
    if (this.attempts > 0 && this.failures >= this.attempts) {
      this._stop({ code: info.code, reason: `gave up after ${this.failures} failed attempts; last: ${info.reason}` });
      return;
    }
    const exp = Math.min(this.maxDelay, this.minDelay * 2 ** Math.min(this.failures, 10));
    const delay = exp * (0.5 + Math.random() * 0.5);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _stop(info) {
    const first = !this._stopped;
    this.stopped = true;
    this._stopped = true;
    clearTimeout(this._timer);
    this._timer = null;
    if (first) this.emit('stop', { code: info.code, reason: info.reason });
  }

  /** Sends a frame object if connected; returns whether it was sent. */
  send(frame) {
    if (!this.ready || !this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Closes for good (tells the server) and stops reconnecting. */
  close(reason = 'closed by the client') {
    if (this.stopped && !this.ws) { this._stop({ code: CloseCode.NORMAL, reason }); return; }
    this.stopped = true;
    this._stopInfo = { code: CloseCode.NORMAL, reason };
    clearTimeout(this._timer);
    if (this.ws) {
      if (this.ready) {
        try { this.ws.send(JSON.stringify({ close: { code: 'CLOSE_CODE_NORMAL', reason } })); } catch (e) { /* closed */ }
      }
      this._drop({ code: CloseCode.NORMAL, reason });
    } else {
      this._stop(this._stopInfo);
    }
  }
}

function closeCodeOf(code) {
  if (typeof code === 'number') return code;
  if (typeof code === 'string') {
    const n = Number(code);
    if (Number.isInteger(n)) return n;
    const name = code.replace(/^CLOSE_CODE_/, '');
    if (name in CloseCode) return CloseCode[name];
  }
  return CloseCode.NORMAL;
}

// ---- mesh client ------------------------------------------------------------

/** What a middleware may return: go on, stop, or stop and reply. */
export const Flow = Object.freeze({
  next: undefined,
  stop: Object.freeze({ stop: true }),
  reply: data => ({ reply: data }),
});

/**
 * A mesh client: groups (subscribe, publish, messages), request/response in
 * both directions (routes and middlewares for the server's requests), and a
 * bounded outbox: while disconnected and reconnecting, `send`, `publish` and
 * `request` wait (at most `outbox` of them, default 1,024) and go out in
 * order right after the next welcome; past that they throw an 'outbox-full'
 * ReplimeshError. Subscriptions are restored after every reconnect.
 *
 * Events: 'connect' (welcome), 'disconnect' ({code, reason, url}: an open
 * connection closed), 'close' (every closed socket, with its reason),
 * 'message' ({group, from, data, text, json()}), 'noroute', 'error'
 * (ReplimeshError; 'auth'/'banned' stop the client), 'stop' ({code, reason}).
 */
export class Client extends Emitter {
  constructor(urls, opts = {}) {
    super();
    this.groups = new Set();
    this.pending = new Map();
    this.routes = new Map();
    this.middlewares = [];
    this.nextId = 1;
    this.timeout = opts.timeout ?? 10000;
    this.outboxLimit = opts.outbox ?? 1024;
    this.outbox = [];
    this.epoch = 0;
    this.conn = new Connection(urls, opts);
    this.id = this.conn.id;
    this.conn.on('open', w => {
      this.epoch++;
      if (this.groups.size) this.conn.send({ subscribe: { groups: [...this.groups] } });
      const queued = this.outbox;
      this.outbox = [];
      for (const o of queued) {
        if (o.requestId !== undefined) {
          const p = this.pending.get(o.requestId);
          if (!p) continue; // timed out meanwhile
          p.sent = true;
        }
        this.conn.send(o.frame);
      }
      this.emit('connect', w);
    });
    this.conn.on('close', c => {
      this.epoch++;
      // Requests in flight on the lost connection fail (as the Rust client's).
      for (const [id, p] of this.pending) {
        if (p.sent) {
          this.pending.delete(id);
          clearTimeout(p.timer);
          p.reject(new ReplimeshError('disconnected', `replimesh: disconnected before the response: ${c.reason}`, { code: c.code, url: c.url }));
        }
      }
      if (c.wasOpen) this.emit('disconnect', c);
      this.emit('close', c);
    });
    this.conn.on('error', e => this.emit('error', e));
    this.conn.on('stop', s => {
      const queued = this.outbox;
      this.outbox = [];
      for (const o of queued) {
        const p = o.requestId !== undefined && this.pending.get(o.requestId);
        if (p) {
          this.pending.delete(o.requestId);
          clearTimeout(p.timer);
          p.reject(new ReplimeshError('closed', `replimesh: client stopped: ${s.reason}`, { code: s.code }));
        }
      }
      this.emit('stop', s);
    });
    this.conn.on('frame', f => this._frame(f));
  }

  /** Whether the client is connected (welcomed) now. */
  get connected() { return this.conn.ready; }
  /** Whether the client has stopped for good (closed, refused, or gave up). */
  get stopped() { return this.conn.stopped; }
  /** The URL in use (or being tried). */
  get url() { return this.conn.url; }
  /** Groups this client is subscribed to. */
  myGroups() { return [...this.groups]; }

  /** Joins groups (restored after every reconnect). */
  subscribe(...groups) {
    groups = groups.flat();
    groups.forEach(g => this.groups.add(g));
    this.conn.send({ subscribe: { groups } });
  }

  /** Leaves groups. */
  unsubscribe(...groups) {
    groups = groups.flat();
    groups.forEach(g => this.groups.delete(g));
    this.conn.send({ unsubscribe: { groups } });
  }

  /**
   * Publishes to a group or list of groups (`'*'` or `{all: true}`: every
   * group). Returns true (sent or queued); throws a ReplimeshError when the
   * outbox is full or the client has stopped.
   */
  publish(groups, data, opts = {}) {
    const all = groups === '*' || opts.all === true;
    const list = all ? [] : (Array.isArray(groups) ? groups : [groups]);
    this._sendOrQueue({ publish: { groups: list, all, notToMe: !!opts.notToMe, data: encodeData(data) } });
    return true;
  }

  /** A routed message with no reply; true (sent or queued), throws like `publish`. */
  send(route, act, data) {
    this._sendOrQueue({ send: { route, act: act || '', data: encodeData(data) } });
    return true;
  }

  /**
   * A routed request; resolves with the reply's payload ({bytes, text,
   * json()}), rejects with a ReplimeshError: 'response' (the server's error,
   * with its code: 404 no route, ...), 'timeout' (counted from this call,
   * outbox time included), 'disconnected', 'outbox-full', 'closed'.
   */
  request(route, act, data, opts = {}) {
    const id = this.nextId++;
    const timeout = opts.timeout ?? this.timeout;
    return new Promise((resolve, reject) => {
      const p = { resolve, reject, sent: false, timer: null };
      p.timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ReplimeshError('timeout', `replimesh: request ${route}/${act || ''} timed out after ${timeout} ms`));
      }, timeout);
      this.pending.set(id, p);
      try {
        p.sent = this._sendOrQueue({ request: { id: String(id), route, act: act || '', data: encodeData(data) } }, id);
      } catch (e) {
        clearTimeout(p.timer);
        this.pending.delete(id);
        reject(e);
      }
    });
  }

  /** Sends now, or queues while reconnecting; returns whether it was sent now. */
  _sendOrQueue(frame, requestId) {
    if (this.conn.send(frame)) return true;
    if (this.conn.stopped) {
      const why = this.conn.lastClose ? `: ${this.conn.lastClose.reason}` : '';
      throw new ReplimeshError('closed', `replimesh: the client has stopped${why}`);
    }
    if (!this.conn.reconnect || this.outboxLimit <= 0) {
      throw new ReplimeshError('disconnected', 'replimesh: not connected');
    }
    if (this.outbox.length >= this.outboxLimit) {
      this.outbox = this.outbox.filter(o => o.requestId === undefined || this.pending.has(o.requestId));
      if (this.outbox.length >= this.outboxLimit) {
        throw new ReplimeshError('outbox-full', `replimesh: disconnected and the outbox (${this.outboxLimit} entries) is full`);
      }
    }
    this.outbox.push({ frame, requestId });
    return false;
  }

  /** Entries waiting in the outbox for the next connection. */
  get queued() { return this.outbox.length; }

  /** A replica of a store over this client's connection (see `StoreReplica`). */
  store(opts) { return new StoreReplica(this, opts); }

  /**
   * Handles requests and sends from the server: `handler(data, ctx)` may
   * return (a promise of) the reply; a throw answers with an error (its
   * numeric `code`, else 500). An empty `act` matches any act of the route
   * without a handler of its own.
   */
  route(route, act, handler) {
    this.routes.set(route + '\u0000' + (act || ''), handler);
  }

  /**
   * Adds a middleware, run in order before the route handler: `fn(ctx)` may
   * return (a promise of) `Flow.next` (undefined: go on), `Flow.stop` (a
   * request gets an empty reply) or `Flow.reply(data)`; a throw answers with
   * an error.
   */
  use(fn) { this.middlewares.push(fn); }

  /** Closes for good: queued messages are dropped, waiting requests fail. */
  close() { this.conn.close(); }

  _frame(f) {
    if (f.deliver) {
      const d = f.deliver;
      const data = decodeData(d.data);
      this.emit('message', { group: d.group || '', from: d.from || '', data: data.bytes, get text() { return data.text; }, json: data.json });
    } else if (f.response) {
      const r = f.response;
      const id = Number(r.id);
      const p = this.pending.get(id);
      if (!p) return; // late, after its timeout
      this.pending.delete(id);
      clearTimeout(p.timer);
      if (r.error && (r.error.code || r.error.message)) {
        p.reject(new ReplimeshError('response', r.error.message || 'error', { code: r.error.code || 0 }));
      } else {
        p.resolve(decodeData(r.data));
      }
    } else if (f.request || f.send) {
      this._serve(f.request || f.send, !!f.request);
    }
  }

  async _serve(m, wantsReply) {
    const epoch = this.epoch;
    const reply = body => {
      if (wantsReply && this.epoch === epoch) this.conn.send({ response: Object.assign({ id: m.id }, body) });
    };
    const data = decodeData(m.data);
    const ctx = { route: m.route || '', act: m.act || '', data, isRequest: wantsReply, client: this };
    try {
      for (const mw of this.middlewares) {
        const flow = await mw(ctx);
        if (flow === undefined || flow === null || flow === true) continue;
        if (flow && 'reply' in flow) { reply({ data: encodeData(flow.reply) }); return; }
        reply({});
        return;
      }
      const h = this.routes.get(ctx.route + '\u0000' + ctx.act) || this.routes.get(ctx.route + '\u0000');
      if (!h) {
        this.emit('noroute', ctx);
        reply({ error: { code: 404, message: 'no route' } });
        return;
      }
      const out = await h(data, ctx);
      reply({ data: encodeData(out) });
    } catch (e) {
      const code = e && Number.isInteger(e.code) && e.code > 0 ? e.code : 500;
      reply({ error: { code, message: String(e && e.message || e) } });
    }
  }
}

// ---- store replica ----------------------------------------------------------

/**
 * Reducers of the stores built into `replimesh node`, with their action
 * formats (docs/store.md#built-in-reducers): redux-shaped, as the node writes
 * them to JSON peers; the older serde form is read too.
 * counter: `{type: 'add', payload: 5}`, `{type: 'reset'}` (older: `{Add: 5}`, `'Reset'`);
 * kv: `{type: 'set', payload: {key: 'a', value: '1'}}`, `{type: 'delete', payload: 'a'}`,
 * `{type: 'clear'}` (older: `{Set: {key, value}}`, `{Delete: 'a'}`, `'Clear'`).
 */
export const reducers = {
  counter: {
    initial: () => 0,
    reduce(state, action) {
      const type = action && action.type;
      if (type === 'reset' || action === 'Reset') return 0;
      if (type === 'add' && typeof action.payload === 'number') return state + action.payload;
      if (action && typeof action.Add === 'number') return state + action.Add;
      return state;
    },
  },
  kv: {
    initial: () => ({}),
    reduce(state, action) {
      const type = action && action.type;
      if (type === 'clear' || action === 'Clear') return {};
      const set = type === 'set' ? action.payload : action && action.Set;
      const del = type === 'delete' ? action.payload : action && action.Delete;
      const next = Object.assign({}, state);
      if (set && typeof set.key === 'string') next[set.key] = set.value;
      else if (typeof del === 'string') delete next[del];
      return next;
    },
  },
};

/**
 * The schema version a node gives a JavaScript reducer file whose config
 * names none (`reducer = { js = "file.js" }`): the first 4 bytes of the
 * SHA-256 of the file's bytes, big-endian. Pass the file's exact content (a
 * string is UTF-8 encoded). Uses `crypto.subtle` (Node.js 20+; browsers in
 * secure contexts).
 */
export async function schemaOf(source) {
  const bytes = typeof source === 'string' ? utf8enc.encode(source) : source;
  const digest = await globalThis.crypto.subtle.digest('SHA-256', bytes);
  return new DataView(digest).getUint32(0);
}

/** `{initial, reduce}` from a redux reducer function, a built-in name or such an object. */
function toReducer(r) {
  if (r === undefined) return reducers.kv;
  if (typeof r === 'string') {
    if (!reducers[r]) throw new ReplimeshError('config', `replimesh: no built-in reducer ${JSON.stringify(r)}`);
    return reducers[r];
  }
  if (typeof r === 'function') {
    return { initial: () => r(undefined, { type: '@@INIT' }), reduce: r };
  }
  if (r && typeof r.initial === 'function' && typeof r.reduce === 'function') return r;
  throw new ReplimeshError('config', 'replimesh: reducer must be a function (state, action) => state, "kv", "counter" or {initial, reduce}');
}

/**
 * A replica of a store, usable as a redux store (`getState`, `dispatch`,
 * `subscribe`; e.g. react-redux's `<Provider store={replica}>`): it follows
 * the authority's history (snapshot plus actions, in sequence order, asking
 * for a resync on a gap); `dispatch(action)` resolves with the action's
 * sequence number once committed. Dispatches made while detached wait in an
 * outbox (at most `maxOutbox`, default 16,384; past that dispatch rejects
 * with 'outbox-full') and are sent again after every reconnect: the
 * authority applies each exactly once (by client id and op id).
 *
 * `source` is the server URL(s) for a connection of its own, or a `Client`
 * (or `Connection`) whose connection it shares: then the login is that
 * connection's, and `close()` detaches the replica only.
 *
 * Options: store (name), reducer (a redux reducer function, 'kv',
 * 'counter' or {initial, reduce}), schema (default 1), clientId, maxOutbox,
 * plus the Connection options. Events: 'state' (state, seq), 'connect'
 * (attached), 'disconnect', 'error' (ReplimeshError), 'stop'.
 */
export class StoreReplica extends Emitter {
  constructor(source, opts = {}) {
    super();
    if (!opts.store) throw new ReplimeshError('config', 'replimesh: StoreReplica needs opts.store');
    this.store = opts.store;
    this.schema = opts.schema ?? 1;
    this.reducer = toReducer(opts.reducer);
    this.clientId = opts.clientId || randomId('web-replica-');
    this.maxOutbox = opts.maxOutbox ?? 16384;
    this.state = this.reducer.initial();
    this.seq = 0;
    this.historyId = '0';
    this.nextOp = 1;
    this.outbox = new Map(); // opId -> {action, resolve, reject}
    this.waiters = [];
    this.attached = false;
    this.closed = false;
    /** Why the authority refused this replica (unknown store, schema), if it did. */
    this.refused = null;
    const shared = source instanceof Client ? source.conn : (source instanceof Connection ? source : null);
    this.shared = !!shared;
    this.conn = shared || new Connection(source, Object.assign({}, opts, { id: opts.id || this.clientId }));
    this._off = [
      this.conn.on('open', () => this._hello()),
      this.conn.on('close', c => {
        const was = this.attached;
        this.attached = false;
        if (was) this.emit('disconnect', c);
      }),
      this.conn.on('frame', f => this._frame(f)),
      this.conn.on('stop', s => this._stopped(s)),
    ];
    if (!this.shared) this._off.push(this.conn.on('error', e => this.emit('error', e)));
    // A shared connection may be up already.
    if (this.shared && this.conn.ready) setTimeout(() => this._hello(), 0);
  }

  /** Whether the replica is attached to the authority now. */
  get connected() { return this.attached; }

  /** The current state (redux). */
  getState() { return this.state; }

  /**
   * Calls `listener(state, seq)` after every change; returns the function
   * that removes it (redux).
   */
  subscribe(listener) {
    if (typeof listener !== 'function') throw new TypeError('replimesh: subscribe needs a function');
    return this.on('state', listener);
  }

  /** Resolves once the replica has applied `seq`. */
  waitFor(seq) {
    if (this.seq >= seq) return Promise.resolve(this.seq);
    return new Promise(resolve => this.waiters.push({ seq, resolve }));
  }

  /** Sends an action (JSON); resolves with its sequence number once committed. */
  dispatch(action) {
    if (this.closed || this.conn.stopped) {
      return Promise.reject(new ReplimeshError('closed', 'replimesh: the replica is closed'));
    }
    if (this.refused) return Promise.reject(this.refused);
    if (this.outbox.size >= this.maxOutbox) {
      return Promise.reject(new ReplimeshError('outbox-full', `replimesh: ${this.outbox.size} dispatches wait (limit ${this.maxOutbox})`));
    }
    const opId = this.nextOp++;
    return new Promise((resolve, reject) => {
      this.outbox.set(opId, { action, resolve, reject });
      if (this.attached) this._sendDispatch(opId);
    });
  }

  /** Dispatches that wait to be committed. */
  get pending() { return this.outbox.size; }

  /** Stops the replica (waiting dispatches fail); closes its connection unless shared. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.attached = false;
    this._off.forEach(off => off());
    this._failAll(new ReplimeshError('closed', 'replimesh: the replica was closed'));
    if (!this.shared) this.conn.close();
  }

  _stopped(s) {
    this.attached = false;
    this._failAll(new ReplimeshError('closed', `replimesh: the connection stopped: ${s.reason}`, { code: s.code }));
    this.emit('stop', s);
  }

  _failAll(err) {
    const waiting = [...this.outbox.values()];
    this.outbox.clear();
    for (const e of waiting) e.reject(err);
  }

  _hello() {
    if (this.closed || this.refused) return;
    this.conn.send({ storeHello: {
      store: this.store, schema: this.schema, clientId: this.clientId,
      historyId: this.historyId, lastSeq: String(this.seq), encoding: 'ENCODING_JSON' } });
  }

  _sendDispatch(opId) {
    const e = this.outbox.get(opId);
    // Actions are JSON (redux-shaped `{type, payload}`; any JSON value passes).
    const action = toBase64(utf8enc.encode(JSON.stringify(e.action)));
    this.conn.send({ dispatch: { store: this.store, opId: String(opId), action } });
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
    if (!body || (body.store || '') !== this.store || this.closed) return;
    if (f.storeWelcome) {
      const w = f.storeWelcome;
      if ((w.historyId || '0') !== this.historyId && this.historyId !== '0') {
        // A new history: start again from its snapshot.
        this.seq = 0;
      }
      this.historyId = w.historyId || '0';
      this.attached = true;
      // Everything not yet acknowledged goes again: the authority answers
      // what it already committed with its original seq.
      for (const [opId] of this.outbox) this._sendDispatch(opId);
      this.emit('connect', w);
    } else if (f.snapshot) {
      const s = f.snapshot;
      this.historyId = s.historyId || this.historyId;
      let state;
      try { state = decodeData(s.state).json(); } catch (e) {
        this.emit('error', new ReplimeshError('protocol', `replimesh: undecodable snapshot of ${this.store}: ${e.message}`));
        return;
      }
      this._setState(state, Number(s.seq || 0));
    } else if (f.actions) {
      const a = f.actions;
      let seq = Number(a.firstSeq || 0);
      let state = this.state;
      let applied = this.seq;
      for (const b64 of a.actions || []) {
        if (seq <= applied) { seq++; continue; }
        if (seq !== applied + 1) { this._resync(); break; }
        try {
          state = this.reducer.reduce(state, decodeData(b64).json());
        } catch (e) {
          this.emit('error', new ReplimeshError('store', `replimesh: the reducer of ${this.store} threw on seq ${seq}: ${e && e.message || e}`));
          this._resync();
          break;
        }
        applied = seq++;
      }
      if (applied !== this.seq) this._setState(state, applied);
    } else if (f.committed) {
      const c = f.committed;
      if (c.clientId) return; // a relayed client's
      const seqs = [Number(c.seq || 0), ...(c.moreSeqs || []).map(Number)];
      seqs.forEach((seq, i) => {
        const opId = Number(c.opId || 0) + i;
        const e = this.outbox.get(opId);
        if (!e || seq === 0) return;
        this.outbox.delete(opId);
        e.resolve(seq);
      });
    } else if (f.storeError) {
      const se = f.storeError;
      if (se.clientId) return;
      const err = se.error || {};
      const error = new ReplimeshError('store', err.message || 'store error', { code: err.code || 0 });
      const opId = Number(se.opId || 0);
      if (opId) {
        const count = Math.max(1, Math.min(Number(se.count || 1), 4096));
        for (let i = 0; i < count; i++) {
          const e = this.outbox.get(opId + i);
          if (e) { this.outbox.delete(opId + i); e.reject(error); }
        }
        return;
      }
      if (!this.attached && (err.code === StoreErrorCode.UNKNOWN_STORE || err.code === StoreErrorCode.SCHEMA_MISMATCH)) {
        // Refused: dispatches cannot succeed; say why once.
        this.refused = error;
        this._failAll(error);
      }
      this.emit('error', error);
    }
  }
}

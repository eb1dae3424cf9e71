// Type declarations of replimesh.js (the Replimesh JavaScript client).

/** The WebSocket subprotocol the client speaks: `replimesh.v1.json`. */
export const PROTOCOL: 'replimesh.v1.json';
/** The protocol version sent in `Hello`. */
export const VERSION: 1;

/** `Close` codes (docs/protocol.md, "Close codes"). */
export const CloseCode: Readonly<{
  NORMAL: 0;
  GOING_AWAY: 1;
  PROTOCOL_ERROR: 2;
  FRAME_TOO_LARGE: 3;
  SLOW_CONSUMER: 4;
  TIMEOUT: 5;
  AUTH_FAILED: 6;
  BANNED: 7;
  UNSUPPORTED_VERSION: 8;
}>;

/** Store error codes (`StoreError.error.code`). */
export const StoreErrorCode: Readonly<{
  UNKNOWN_STORE: 1;
  SCHEMA_MISMATCH: 2;
  BAD_ACTION: 3;
  REDUCER_PANIC: 4;
  FORGOTTEN: 5;
  OUTBOX_FULL: 6;
  NOT_ATTACHED: 7;
  HISTORY_LOST: 8;
  INTERNAL: 9;
  OP_ID_REUSED: 10;
}>;

/** What kind of error a ReplimeshError is. */
export type ErrorKind =
  | 'auth'          // the server refused the login (stops reconnecting)
  | 'banned'        // the address is banned (stops reconnecting)
  | 'version'       // the server does not speak this protocol version (stops)
  | 'disconnected'  // the connection broke before the answer, or not connected and no outbox
  | 'closed'        // the client or replica has stopped
  | 'outbox-full'   // disconnected and the outbox is full
  | 'timeout'       // a request got no response in time
  | 'response'      // the other side answered a request with an error (`code`: 404 no route, 500, ...)
  | 'store'         // a store error (`code`: a StoreErrorCode)
  | 'protocol'      // a malformed frame from the server
  | 'config';       // a bad option

/** Every error the client reports. */
export class ReplimeshError extends Error {
  constructor(kind: ErrorKind, message: string, extra?: { code?: number; url?: string });
  readonly name: 'ReplimeshError';
  /** What happened. */
  readonly kind: ErrorKind;
  /** The server's numeric code, where there is one. */
  readonly code?: number;
  /** The server URL, where it matters. */
  readonly url?: string;
}

/** Base64 of bytes. */
export function toBase64(bytes: Uint8Array): string;
/** Bytes from base64 (empty for a missing field). */
export function fromBase64(b64: string | undefined | null): Uint8Array;
/** An application payload: bytes as is, strings as UTF-8, anything else as JSON. */
export type Payload = Uint8Array | string | number | boolean | object | null | undefined;
/** Encodes a payload as the base64 of a `bytes` field. */
export function encodeData(data: Payload): string;
/** A received payload. */
export interface Data {
  /** The raw bytes. */
  readonly bytes: Uint8Array;
  /** The bytes as UTF-8 text. */
  readonly text: string;
  /** The bytes parsed as JSON. */
  json<T = any>(): T;
}
/** Decodes the base64 of a `bytes` field. */
export function decodeData(b64: string | undefined | null): Data;

/** A handler removal function. */
export type Off = () => void;

/** A minimal event emitter (the same in browsers and Node.js). */
export class Emitter<Events extends Record<string, (...args: any[]) => void> = Record<string, (...args: any[]) => void>> {
  /** Adds a handler; returns a function that removes it. */
  on<E extends keyof Events & string>(event: E, fn: Events[E]): Off;
  /** Removes a handler. */
  off<E extends keyof Events & string>(event: E, fn: Events[E]): void;
  /** Calls `fn` the next time `event` fires. */
  once<E extends keyof Events & string>(event: E, fn: Events[E]): Off;
  /** Calls the handlers of `event` (an 'error' nobody listens to goes to console.error). */
  emit<E extends keyof Events & string>(event: E, ...args: Parameters<Events[E]>): void;
}

/** A WebSocket constructor: the browser's, Node.js 22's global one, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Options of a connection. */
export interface ConnectionOptions {
  /** The WebSocket implementation (default: the global `WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /** This client's id (default: random). */
  id?: string;
  /** Application data sent in the hello. */
  data?: Payload;
  /** Login for the stores (checked when connecting). */
  login?: string;
  /** Password of `login`. */
  password?: string;
  /** Reconnect after a broken connection (default true). */
  reconnect?: boolean;
  /** First reconnect delay in ms (default 100); doubles per failed attempt, jittered. */
  minDelay?: number;
  /** Largest reconnect delay in ms (default 5000). */
  maxDelay?: number;
  /** Consecutive failed attempts before giving up; 0 = forever (default). */
  attempts?: number;
  /** Time for the welcome after connecting, in ms (default 10000). */
  handshakeTimeout?: number;
  /** Close a connection on which nothing arrived for this long, in ms (default 30000; 0: off). */
  idleTimeout?: number;
}

/** A closed socket, with its reason. */
export interface CloseInfo {
  /** The server's close code (`CloseCode`), or null when the socket just ended. */
  code: number | null;
  /** Why. */
  reason: string;
  /** The server URL. */
  url: string;
  /** Whether the connection had been welcomed. */
  wasOpen: boolean;
  /** Whether it stops reconnecting (auth failed, banned, unsupported version). */
  fatal: boolean;
}

/** Why a connection stopped for good. */
export interface StopInfo {
  code: number | null;
  reason: string;
}

/** The server's welcome. */
export interface Welcome {
  version?: number;
  id?: string;
  url?: string;
  incarnation?: string;
  data?: string;
}

/** A frame in its proto3 JSON form. */
export type Frame = Record<string, any>;

export interface ConnectionEvents {
  [event: string]: (...args: any[]) => void;
  url: (url: string) => void;
  open: (welcome: Welcome) => void;
  frame: (frame: Frame) => void;
  close: (info: CloseInfo) => void;
  error: (error: ReplimeshError) => void;
  stop: (info: StopInfo) => void;
}

/** One logical connection over several server URLs (round robin, backoff). */
export class Connection extends Emitter<ConnectionEvents> {
  constructor(urls: string | string[], opts?: ConnectionOptions);
  readonly urls: string[];
  readonly id: string;
  /** Whether the connection is welcomed now. */
  readonly ready: boolean;
  /** Whether it has stopped for good. */
  readonly stopped: boolean;
  /** Whether it reconnects. */
  readonly reconnect: boolean;
  /** The server's last welcome. */
  readonly welcome: Welcome | null;
  /** Connections made so far. */
  readonly connections: number;
  /** The last close. */
  readonly lastClose: CloseInfo | null;
  /** The URL in use (or being tried). */
  readonly url: string;
  addUrl(url: string): void;
  deleteUrl(url: string): void;
  /** Drops the current connection and moves to the next URL. */
  nextUrl(): void;
  /** Sends a frame if connected; returns whether it was sent. */
  send(frame: Frame): boolean;
  /** Closes for good (tells the server) and stops reconnecting. */
  close(reason?: string): void;
}

/** A group message. */
export interface Message {
  group: string;
  /** The publishing client's id (empty when a server published). */
  from: string;
  data: Uint8Array;
  readonly text: string;
  json<T = any>(): T;
}

/** What a route handler or middleware gets besides the payload. */
export interface RouteContext {
  route: string;
  act: string;
  data: Data;
  /** Whether the server waits for a response. */
  isRequest: boolean;
  client: Client;
}

/** What a middleware returns: `Flow.next` (undefined), `Flow.stop` or `Flow.reply(data)`. */
export type FlowResult = undefined | void | true | { stop: true } | { reply: Payload };
export const Flow: Readonly<{
  next: undefined;
  stop: { readonly stop: true };
  reply(data: Payload): { reply: Payload };
}>;
export type Middleware = (ctx: RouteContext) => FlowResult | Promise<FlowResult>;
export type RouteHandler = (data: Data, ctx: RouteContext) => Payload | Promise<Payload>;

/** Options of a mesh client. */
export interface ClientOptions extends ConnectionOptions {
  /** Response timeout of requests in ms (default 10000), counted from the call. */
  timeout?: number;
  /** Messages and requests that may wait while reconnecting (default 1024; 0: none). */
  outbox?: number;
}

export interface PublishOptions {
  /** Publish to every group. */
  all?: boolean;
  /** Keep the message from this client. */
  notToMe?: boolean;
}

export interface ClientEvents {
  [event: string]: (...args: any[]) => void;
  connect: (welcome: Welcome) => void;
  disconnect: (info: CloseInfo) => void;
  close: (info: CloseInfo) => void;
  message: (message: Message) => void;
  noroute: (ctx: RouteContext) => void;
  error: (error: ReplimeshError) => void;
  stop: (info: StopInfo) => void;
}

/** A mesh client: groups, request/response both ways, a bounded outbox. */
export class Client extends Emitter<ClientEvents> {
  constructor(urls: string | string[], opts?: ClientOptions);
  readonly id: string;
  readonly conn: Connection;
  readonly connected: boolean;
  readonly stopped: boolean;
  readonly url: string;
  /** Entries waiting in the outbox. */
  readonly queued: number;
  myGroups(): string[];
  subscribe(...groups: (string | string[])[]): void;
  unsubscribe(...groups: (string | string[])[]): void;
  /** Publishes (`'*'`: every group); true when sent or queued, throws a ReplimeshError otherwise. */
  publish(groups: string | string[], data?: Payload, opts?: PublishOptions): true;
  /** A routed message without reply; true when sent or queued. */
  send(route: string, act: string, data?: Payload): true;
  /** A routed request: the reply's payload, or a ReplimeshError. */
  request(route: string, act: string, data?: Payload, opts?: { timeout?: number }): Promise<Data>;
  /** A replica of a store over this client's connection. */
  store<S = any, A = any>(opts: StoreOptions<S, A>): StoreReplica<S, A>;
  /** Handles the server's requests and sends to `route`/`act` (empty act: any). */
  route(route: string, act: string, handler: RouteHandler): void;
  /** Adds a middleware, run in order before the route handler. */
  use(fn: Middleware): void;
  /** Closes for good. */
  close(): void;
}

/** A reducer as `{initial, reduce}`. */
export interface ReducerObject<S, A> {
  initial(): S;
  reduce(state: S, action: A): S;
}
/** A redux reducer: `(state, action) => newState`, initial state from `reducer(undefined, {type: '@@INIT'})`. */
export type ReduxReducer<S, A> = (state: S | undefined, action: A) => S;

/** Actions of the built-in `counter` reducer (the older `{ Add: number } | 'Reset'` is read too). */
export type CounterAction = { type: 'add'; payload: number } | { type: 'reset' } | { Add: number } | 'Reset';
/** Actions of the built-in `kv` reducer (the older `{ Set }`, `{ Delete }`, `'Clear'` are read too). */
export type KvAction =
  | { type: 'set'; payload: { key: string; value: string } }
  | { type: 'delete'; payload: string }
  | { type: 'clear' }
  | { Set: { key: string; value: string } }
  | { Delete: string }
  | 'Clear';
/** The reducers built into `replimesh node`. */
export const reducers: {
  counter: ReducerObject<number, CounterAction>;
  kv: ReducerObject<Record<string, string>, KvAction>;
};

/**
 * The schema version a node gives a JavaScript reducer file whose config
 * names none: the first 4 bytes of the SHA-256 of the file's content,
 * big-endian (uses `crypto.subtle`).
 */
export function schemaOf(source: string | Uint8Array): Promise<number>;

/** Options of a store replica. */
export interface StoreOptions<S = any, A = any> extends ConnectionOptions {
  /** The store's name. */
  store: string;
  /** The reducer (default: 'kv'). */
  reducer?: ReduxReducer<S, A> | ReducerObject<S, A> | 'kv' | 'counter';
  /** Schema version (default 1); must be the authority's. */
  schema?: number;
  /** Stable client id for exactly-once dispatch (default: random). */
  clientId?: string;
  /** Dispatches that may wait (default 16384). */
  maxOutbox?: number;
}

export interface StoreEvents<S> {
  [event: string]: (...args: any[]) => void;
  state: (state: S, seq: number) => void;
  connect: (welcome: Frame) => void;
  disconnect: (info: CloseInfo) => void;
  error: (error: ReplimeshError) => void;
  stop: (info: StopInfo) => void;
}

/** A store replica; a redux-compatible store (react-redux's Provider takes it). */
export class StoreReplica<S = any, A = any> extends Emitter<StoreEvents<S>> {
  constructor(source: string | string[] | Client | Connection, opts: StoreOptions<S, A>);
  readonly store: string;
  readonly clientId: string;
  readonly conn: Connection;
  /** Whether it shares a Client's connection. */
  readonly shared: boolean;
  /** The state (also `getState()`). */
  readonly state: S;
  /** The sequence number of the last applied action. */
  readonly seq: number;
  /** Whether it is attached now. */
  readonly connected: boolean;
  /** Dispatches waiting to be committed. */
  readonly pending: number;
  /** Why the authority refused this replica, if it did. */
  readonly refused: ReplimeshError | null;
  /** The current state (redux). */
  getState(): S;
  /** Commits an action; resolves with its sequence number. */
  dispatch(action: A): Promise<number>;
  /** Calls `listener` after every change; returns the unsubscribe function (redux). */
  subscribe(listener: (state: S, seq: number) => void): Off;
  /** Resolves once the replica has applied `seq`. */
  waitFor(seq: number): Promise<number>;
  /** Stops the replica; closes its connection unless shared. */
  close(): void;
}

#!/usr/bin/env python3
"""A Replimesh client in Python, written from docs/protocol.md alone.

Standard library only: a small WebSocket client (RFC 6455) carrying the
`replimesh.v1.json` subprotocol, one proto3 JSON frame per text message.

It connects to a node, subscribes to a group and publishes to it, sends
requests (one answered, one to a route that does not exist), logs in to a
store with the built-in `counter` reducer, dispatches to it (one action, a
batch, and an action the reducer cannot read), follows the state as a
replica, and reads the state back on a second connection. It exits with
status 0 when every step did what the protocol doc promises, 1 otherwise.

    python3 replimesh_client.py --url ws://127.0.0.1:7600/ \\
        --login app --password secret --store counter
"""

import argparse
import base64
import hashlib
import json
import os
import socket
import struct
import sys
import time
import urllib.parse

SUBPROTOCOL = "replimesh.v1.json"
PROTOCOL_VERSION = 1
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BAD_ACTION = 3  # store error code (docs/protocol.md, "Store error codes")
NO_ROUTE = 404  # response error code of an unknown route


class ProtocolFailure(Exception):
    """The server did something the protocol doc does not promise."""


class Closed(Exception):
    """The connection ended (with the server's Close frame, if it sent one)."""

    def __init__(self, close):
        self.close = close or {}
        code = self.close.get("code", "CLOSE_CODE_NORMAL")
        super().__init__(f"connection closed: {code}: {self.close.get('reason', '')}")


def b64(data):
    """bytes or str -> base64 text (proto3 JSON `bytes`)."""
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def unb64(text):
    """base64 text (absent: empty) -> bytes."""
    return base64.b64decode(text or "")


def u64(value):
    """A proto3 JSON 64-bit integer: a decimal string (or a number); absent: 0."""
    return int(value or 0)


class WebSocket:
    """Just enough of RFC 6455 for text messages, with a deadline on every read."""

    def __init__(self, url, subprotocol, timeout):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "ws":
            raise ProtocolFailure(f"only ws:// URLs are supported, not {url}")
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path or "/"
        request = (
            f"GET {path} HTTP/1.1\r\n"
            f"Host: {u.hostname}:{u.port or 80}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ProtocolFailure(f"upgrade refused: {lines[0]}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise ProtocolFailure("bad Sec-WebSocket-Accept")
        if headers.get("sec-websocket-protocol") != subprotocol:
            raise ProtocolFailure(
                f"server picked subprotocol {headers.get('sec-websocket-protocol')!r}")

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed(None)
        self.buf += chunk

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode, payload):
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_text(self, text):
        self._send_frame(0x1, text.encode())

    def recv_text(self, deadline):
        """The next text message; raises socket.timeout past `deadline`."""
        message = b""
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            b0, b1 = self._take(2)
            opcode, fin = b0 & 0x0F, b0 & 0x80
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._take(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._take(8))[0]
            mask = self._take(4) if b1 & 0x80 else None
            payload = self._take(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:  # WebSocket close
                raise Closed(None)
            if opcode == 0x9:  # WebSocket ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x2:
                raise ProtocolFailure("binary message on the JSON subprotocol")
            message += payload
            if fin:
                return message.decode()

    def close(self):
        try:
            self._send_frame(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


class Connection:
    """One Replimesh connection: hello/welcome, keep-alive, JSON frames."""

    def __init__(self, url, client_id, login, password, timeout):
        self.timeout = timeout
        self.ws = WebSocket(url, SUBPROTOCOL, timeout)
        self.pending = []  # frames read while waiting for another kind
        hello = {"version": PROTOCOL_VERSION, "kind": "PEER_KIND_CLIENT", "id": client_id}
        if login:
            hello["login"] = login
            hello["password"] = password
        self.send({"hello": hello})
        self.welcome = self.wait("welcome")

    def send(self, frame):
        self.ws.send_text(json.dumps(frame))

    def recv(self, deadline):
        """The next frame; answers pings; raises Closed on a close frame."""
        while True:
            frame = json.loads(self.ws.recv_text(deadline))
            if not isinstance(frame, dict) or len(frame) != 1:
                raise ProtocolFailure(f"a frame has exactly one key: {frame}")
            (kind, body), = frame.items()
            if kind == "ping":
                pong = {"nonce": body["nonce"]} if "nonce" in body else {}
                self.send({"pong": pong})
                continue
            if kind == "pong":
                continue
            if kind == "close":
                raise Closed(body)
            return kind, body

    def wait(self, kind, match=lambda body: True, on_other=None):
        """Reads frames until one of `kind` for which `match` holds. Other
        frames go to `on_other` (or are kept for later waits)."""
        for i, (k, body) in enumerate(self.pending):
            if k == kind and match(body):
                del self.pending[i]
                return body
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                k, body = self.recv(deadline)
            except socket.timeout:
                raise ProtocolFailure(f"no {kind} within {self.timeout} s") from None
            if k == kind and match(body):
                return body
            if on_other is None or not on_other(k, body):
                self.pending.append((k, body))

    def close(self):
        try:
            self.send({"close": {"reason": "done"}})
        except OSError:
            pass
        self.ws.close()


class CounterReplica:
    """Follows a store of the built-in `counter` reducer (JSON encoding)."""

    def __init__(self, conn, store, client_id):
        self.conn, self.store, self.client_id = conn, store, client_id
        self.state, self.seq, self.history = None, 0, 0
        self.states = {}  # seq -> the state after it (this history)
        self.committed = {}  # op id -> seq (0: not committed)
        self.errors = {}  # op id -> ErrorInfo
        self.next_op = 1

    def attach(self):
        self.conn.send({"storeHello": {
            "store": self.store, "schema": 1, "clientId": self.client_id,
            "historyId": str(self.history), "lastSeq": str(self.seq),
            "encoding": "ENCODING_JSON"}})
        welcome = self.conn.wait("storeWelcome", lambda b: b.get("store") == self.store,
                                 self.handle)
        if welcome.get("schema", 0) != 1:
            raise ProtocolFailure(f"schema {welcome.get('schema')} != 1")
        self.next_op = u64(welcome.get("lastOpId")) + 1
        self.history = u64(welcome.get("historyId"))
        self.until(lambda: self.state is not None, "the first snapshot")
        return welcome

    @staticmethod
    def reduce(state, action):
        # docs/protocol.md: {"type": "add", "payload": n}, {"type": "reset"}.
        kind = action.get("type") if isinstance(action, dict) else None
        if kind == "reset":
            return 0
        if kind == "add" and isinstance(action.get("payload"), int):
            return state + action["payload"]
        raise ProtocolFailure(f"not a counter action: {action!r}")

    def handle(self, kind, body):
        """Takes a store frame of this store; False for anything else."""
        if body.get("store") != self.store:
            return False
        if kind == "snapshot":
            seq, history = u64(body.get("seq")), u64(body.get("historyId"))
            if history != self.history or seq >= self.seq or self.state is None:
                self.state = json.loads(unb64(body.get("state")))
                if history != self.history:
                    self.states = {}
                self.seq, self.history = seq, history
                self.states[seq] = self.state
        elif kind == "actions":
            first = u64(body.get("firstSeq"))
            if u64(body.get("historyId")) != self.history or first > self.seq + 1:
                self.conn.send({"resync": {"store": self.store,
                                           "historyId": str(self.history),
                                           "lastSeq": str(self.seq)}})
                return True
            for i, raw in enumerate(body.get("actions", [])):
                if first + i > self.seq:
                    self.state = self.reduce(self.state, json.loads(unb64(raw)))
                    self.seq = first + i
                    self.states[self.seq] = self.state
        elif kind == "committed":
            op = u64(body.get("opId"))
            seqs = [u64(body.get("seq"))] + [u64(s) for s in body.get("moreSeqs", [])]
            for i, s in enumerate(seqs):
                self.committed[op + i] = s
        elif kind == "storeError":
            op, count = u64(body.get("opId")), max(1, u64(body.get("count")))
            if op == 0:
                raise ProtocolFailure(f"store error: {body.get('error')}")
            for i in range(count):
                self.errors[op + i] = body.get("error", {})
        elif kind in ("storeWelcome", "digest"):
            pass  # digests are over the binary state: a JSON client ignores them
        else:
            return False
        return True

    def dispatch(self, *actions):
        """Dispatches actions in one frame; returns their op ids."""
        ops = list(range(self.next_op, self.next_op + len(actions)))
        self.next_op += len(actions)
        frame = {"store": self.store, "opId": str(ops[0]), "action": b64(json.dumps(actions[0]))}
        if len(actions) > 1:
            frame["more"] = [b64(json.dumps(a)) for a in actions[1:]]
        self.conn.send({"dispatch": frame})
        return ops

    def until(self, done, what):
        """Reads frames until `done()` holds."""
        deadline = time.monotonic() + self.conn.timeout
        while not done():
            try:
                kind, body = self.conn.recv(deadline)
            except socket.timeout:
                raise ProtocolFailure(f"timed out waiting for {what}") from None
            if not self.handle(kind, body):
                self.conn.pending.append((kind, body))


def step(name):
    print(f"ok: {name}", flush=True)


def run(args):
    me = "py-" + os.urandom(4).hex()
    conn = Connection(args.url, me, args.login, args.password, args.timeout)
    if conn.welcome.get("version") != PROTOCOL_VERSION:
        raise ProtocolFailure(f"welcome version {conn.welcome.get('version')}")
    step(f"hello/welcome (node {conn.welcome.get('id', '')!r})")

    # Mesh: subscribe, publish to the group, get it back.
    group = "py-room-" + os.urandom(3).hex()
    conn.send({"subscribe": {"groups": [group]}})
    conn.send({"publish": {"groups": [group], "data": b64("hello mesh")}})
    d = conn.wait("deliver", lambda b: b.get("group") == group)
    # The node names a logged-in client after its login: "<login>/<id>".
    sender = f"{args.login}/{me}" if args.login else me
    if unb64(d.get("data")) != b"hello mesh" or d.get("from") != sender:
        raise ProtocolFailure(f"unexpected deliver {d}")
    conn.send({"publish": {"groups": [group], "notToMe": True, "data": b64("not me")}})
    step("subscribe, publish and deliver")

    # Requests: the node's echo route, and a route that does not exist.
    conn.send({"request": {"id": "1", "route": "echo", "act": "any", "data": b64("ping?")}})
    r = conn.wait("response", lambda b: b.get("id") == "1")
    if "error" in r or unb64(r.get("data")) != b"ping?":
        raise ProtocolFailure(f"unexpected echo response {r}")
    conn.send({"request": {"id": "2", "route": "no-such-route"}})
    r = conn.wait("response", lambda b: b.get("id") == "2")
    if r.get("error", {}).get("code") != NO_ROUTE:
        raise ProtocolFailure(f"expected error 404, got {r}")
    step("request/response (echo, and 404 for an unknown route)")

    # Store: attach, dispatch, follow.
    replica = CounterReplica(conn, args.store, "py-" + os.urandom(8).hex())
    replica.attach()
    # The snapshot may be older than the newest action: the actions after
    # it follow.
    step(f"store hello/welcome/snapshot ({args.store} = {replica.state} at seq {replica.seq})")
    add = lambda n: {"type": "add", "payload": n}
    [one] = replica.dispatch(add(5))
    batch = replica.dispatch(add(2), add(-1), add(10))
    [bad] = replica.dispatch(add("five"))
    wanted = [one] + batch + [bad]
    replica.until(lambda: all(o in replica.committed or o in replica.errors for o in wanted),
                  "answers to the dispatches")
    for o in [one] + batch:
        if not replica.committed.get(o):
            raise ProtocolFailure(f"op {o} not committed: {replica.errors.get(o)}")
    if replica.errors.get(bad, {}).get("code") != BAD_ACTION:
        raise ProtocolFailure(f"op {bad}: expected BAD_ACTION, got "
                              f"{replica.errors.get(bad) or replica.committed.get(bad)}")
    seqs = sorted(replica.committed[o] for o in [one] + batch)
    last = seqs[-1]
    replica.until(lambda: replica.seq >= last, "the committed actions")
    # Nobody else dispatched in between: our four actions add 16.
    if seqs == list(range(seqs[0], last + 1)) and seqs[0] - 1 in replica.states:
        before, after = replica.states[seqs[0] - 1], replica.states[last]
        if after != before + 16:
            raise ProtocolFailure(f"state {after} at seq {last}, expected {before} + 16")
    step(f"dispatch, batch, committed, actions; BAD_ACTION for a bad action "
         f"({args.store} = {replica.state} at seq {replica.seq})")

    # The mesh subscription is still there after the store traffic, and
    # notToMe kept our second publish from us.
    conn.send({"publish": {"groups": [group], "data": b64("still here")}})
    d = conn.wait("deliver", lambda b: b.get("group") == group)
    if unb64(d.get("data")) != b"still here":
        raise ProtocolFailure(f"notToMe publish was delivered to its publisher: {d}")
    step("notToMe honoured")

    # Read the state back on a second connection.
    other = Connection(args.url, me + "-reader", args.login, args.password, args.timeout)
    reader = CounterReplica(other, args.store, "py-" + os.urandom(8).hex())
    reader.attach()
    reader.until(lambda: reader.seq >= last, "the state on a second connection")
    if reader.state != replica.state:
        raise ProtocolFailure(f"second connection sees {reader.state}, not {replica.state}")
    step(f"state read back on a second connection ({reader.state})")
    other.close()
    conn.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the node's ws:// URL")
    p.add_argument("--login", default="", help="store login")
    p.add_argument("--password", default="", help="its password")
    p.add_argument("--store", default="counter", help="a store with the counter reducer")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per step")
    args = p.parse_args()
    try:
        run(args)
    except (ProtocolFailure, Closed, OSError, ValueError, KeyError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print("all steps passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

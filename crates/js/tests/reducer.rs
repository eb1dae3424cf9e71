//! JavaScript reducers in the engine: redux semantics, refusals with the
//! state unchanged, the sandbox and the limits.

use std::time::{Duration, Instant};

use replimesh_js::{schema_of, JsError, JsReducer, Json, Limits};
use store::{Encoding, Reducer};

const TODOS: &str = r#"
const initial = { todos: [], done: 0 };
export default function todos(state = initial, action) {
  switch (action.type) {
    case "add":
      return { ...state, todos: [...state.todos, { text: action.payload, done: false }] };
    case "toggle": {
      const t = state.todos[action.payload];
      if (!t) throw new RangeError("no todo " + action.payload);
      const todos = state.todos.map((x, i) => (i === action.payload ? { ...x, done: !x.done } : x));
      return { ...state, todos, done: todos.filter((x) => x.done).length };
    }
    case "spin": for (;;) {}
    case "hog": { const a = []; for (;;) a.push(new Uint8Array(1 << 20)); }
    case "deep": { const f = (n) => f(n + 1) + 1; return f(0); }
    case "now": return { ...state, at: Date.now() };
    case "newdate": return { ...state, at: new Date().getTime() };
    case "random": return { ...state, r: Math.random() };
    case "utc": return { ...state, at: new Date(Date.UTC(2026, 0, 2)).toISOString() };
    case "caught": try { for (;;) {} } catch (e) { return { ...state, escaped: true }; }
    case "undefined": return undefined;
    default:
      return state;
  }
}
"#;

fn todos(limits: Limits) -> JsReducer {
    JsReducer::from_source("todos", "todos.js", TODOS, None, limits).unwrap()
}

fn act(text: &str) -> Json {
    Json::new(text).unwrap()
}

fn short() -> Limits {
    Limits {
        time: Duration::from_millis(50),
        memory: 8 << 20,
    }
}

#[test]
fn a_redux_reducer_runs_from_its_initial_state() {
    let r = todos(Limits::default());
    assert_eq!(r.name(), "todos");
    assert_eq!(r.schema(), schema_of(TODOS.as_bytes()));
    let mut s = r.initial_state();
    assert_eq!(s.as_str(), r#"{"todos":[],"done":0}"#);
    r.try_reduce(&mut s, &act(r#"{"type":"add","payload":"milk"}"#))
        .unwrap();
    r.try_reduce(&mut s, &act(r#"{"type": "toggle", "payload": 0}"#))
        .unwrap();
    r.try_reduce(&mut s, &act(r#"{"type":"unknown"}"#)).unwrap();
    assert_eq!(
        s.as_str(),
        r#"{"todos":[{"text":"milk","done":true}],"done":1}"#
    );
    let t = r.try_reduce(&mut s, &act(r#"{"type":"utc"}"#));
    assert!(t.is_ok(), "{t:?}");
    assert!(
        s.as_str().contains(r#""at":"2026-01-02T00:00:00.000Z""#),
        "{s}"
    );
}

/// Every refused action names why and leaves the state as it was; the
/// reducer goes on working after each.
#[test]
fn refused_actions_leave_the_state_unchanged() {
    let r = todos(short());
    let mut s = r.initial_state();
    r.try_reduce(&mut s, &act(r#"{"type":"add","payload":"a"}"#))
        .unwrap();
    let before = s.clone();
    let cases = [
        (r#"{"type":"toggle","payload":7}"#, "RangeError: no todo 7"),
        (r#"{"type":"spin"}"#, "time limit"),
        (r#"{"type":"caught"}"#, "time limit"),
        (r#"{"type":"hog"}"#, "out of memory"),
        (r#"{"type":"deep"}"#, "Maximum call stack size exceeded"),
        (r#"{"type":"now"}"#, "Date.now() reads the clock"),
        (r#"{"type":"newdate"}"#, "new Date() reads the clock"),
        (r#"{"type":"random"}"#, "TypeError"),
        (r#"{"type":"undefined"}"#, "returned undefined"),
        (r#"{"payload":1}"#, r#"string "type""#),
        (r#"[1]"#, r#"string "type""#),
    ];
    for (action, why) in cases {
        let started = Instant::now();
        let e = r.try_reduce(&mut s, &act(action)).unwrap_err();
        assert!(e.0.contains(why), "{action}: {e}");
        assert_eq!(s, before, "{action}");
        // The time limit is 50 ms; a hog is stopped by memory well before
        // the watchdog of the test harness.
        assert!(started.elapsed() < Duration::from_secs(5), "{action}");
        r.try_reduce(&mut s, &act(r#"{"type":"unknown"}"#)).unwrap();
    }
    r.try_reduce(&mut s, &act(r#"{"type":"toggle","payload":0}"#))
        .unwrap();
    assert_eq!(
        s.as_str(),
        r#"{"todos":[{"text":"a","done":true}],"done":1}"#
    );
}

#[test]
fn the_error_kinds_are_told_apart() {
    let r = todos(short());
    let s = r.initial_state();
    let run = |a: &str| r.apply(&s, &act(a)).unwrap_err();
    assert_eq!(
        run(r#"{"type":"spin"}"#),
        JsError::TimeLimit(Duration::from_millis(50))
    );
    assert_eq!(run(r#"{"type":"hog"}"#), JsError::MemoryLimit(8 << 20));
    assert!(
        matches!(run(r#"{"type":"toggle","payload":1}"#), JsError::Thrown(t) if t.contains("todos.js"))
    );
}

#[test]
fn modules_that_cannot_serve_are_refused_at_load() {
    let load = |src: &str| {
        JsReducer::from_source("x", "x.js", src, Some(3), short())
            .unwrap_err()
            .to_string()
    };
    assert!(load("export default 5;").contains("not a function"));
    assert!(load("export default (s, a) => { throw new Error('boom') };").contains("boom"));
    assert!(load("import fs from 'fs'; export default (s) => s;").contains("x.js"));
    assert!(load("for (;;) {}").contains("time limit"));
    assert!(load("export default (s = 1,").contains("SyntaxError"));
    let ok = JsReducer::from_source(
        "x",
        "x.js",
        "export default (s = 1) => s;",
        Some(3),
        short(),
    );
    assert_eq!(ok.unwrap().schema(), 3);
}

/// State and actions are the JSON values themselves in JSON payloads and
/// strings holding the text in binary ones.
#[test]
fn json_texts_encode_as_values_and_strings() {
    let v = act(r#"{"type":"add","payload":[1,2.5,"x"]}"#);
    let json = Encoding::Json.encode(&v).unwrap();
    assert_eq!(&json[..], v.as_str().as_bytes());
    assert_eq!(Encoding::Json.decode::<Json>(&json).unwrap(), v);
    let bin = Encoding::Binary.encode(&v).unwrap();
    assert_eq!(bin[0] as usize, v.as_str().len());
    assert_eq!(Encoding::Binary.decode::<Json>(&bin).unwrap(), v);
    assert!(Encoding::Json.decode::<Json>(b"{oops").is_err());
    assert!(Json::new("1 2").is_err());
}

/// The schema is the SHA-256 prefix JavaScript computes with
/// `crypto.subtle.digest` (`clients/js` does).
#[test]
fn the_schema_is_a_sha256_prefix() {
    // SHA-256("abc") = ba7816bf...
    assert_eq!(schema_of(b"abc"), 0xba78_16bf);
}

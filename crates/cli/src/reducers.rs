//! The reducers built into `replimesh node` (a node cannot load Rust code;
//! applications with their own reducers embed the `replimesh` crates).

use std::collections::BTreeMap;

use replimesh::store::Reducer;
use serde::{Deserialize, Serialize};

/// An `i64` counter store.
#[derive(Debug, Clone)]
pub struct CounterReducer {
    /// The store's name.
    pub name: String,
}

/// Actions of [`CounterReducer`] (JSON: `{"Add": 5}`, `"Reset"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterAction {
    /// Adds a number (may be negative).
    Add(i64),
    /// Back to zero.
    Reset,
}

impl Reducer for CounterReducer {
    type State = i64;
    type Action = CounterAction;
    fn name(&self) -> &str {
        &self.name
    }
    fn initial_state(&self) -> i64 {
        0
    }
    fn reduce(&self, state: &mut i64, action: &CounterAction) {
        match action {
            CounterAction::Add(n) => *state = state.wrapping_add(*n),
            CounterAction::Reset => *state = 0,
        }
    }
}

/// A string → string map store.
#[derive(Debug, Clone)]
pub struct Kv {
    /// The store's name.
    pub name: String,
}

/// Actions of [`Kv`] (JSON: `{"Set": {"key": "a", "value": "1"}}`,
/// `{"Delete": "a"}`, `"Clear"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvAction {
    /// Sets a key.
    Set {
        /// The key.
        key: String,
        /// Its new value.
        value: String,
    },
    /// Removes a key.
    Delete(String),
    /// Removes every key.
    Clear,
}

impl Reducer for Kv {
    type State = BTreeMap<String, String>;
    type Action = KvAction;
    fn name(&self) -> &str {
        &self.name
    }
    fn initial_state(&self) -> Self::State {
        BTreeMap::new()
    }
    fn reduce(&self, state: &mut Self::State, action: &KvAction) {
        match action {
            KvAction::Set { key, value } => {
                state.insert(key.clone(), value.clone());
            }
            KvAction::Delete(key) => {
                state.remove(key);
            }
            KvAction::Clear => state.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replimesh::store::Encoding;

    /// The payloads `docs/protocol.md` promises for the built-in reducers.
    #[test]
    fn payloads_are_the_documented_ones() {
        let counter = CounterReducer { name: "c".into() };
        let kv = Kv { name: "k".into() };
        assert_eq!((counter.schema(), kv.schema()), (1, 1));
        let json = |a: &CounterAction| Encoding::Json.encode(a).unwrap();
        assert_eq!(&json(&CounterAction::Add(5))[..], br#"{"Add":5}"#);
        assert_eq!(&json(&CounterAction::Reset)[..], br#""Reset""#);
        let bin = |a: &CounterAction| Encoding::Binary.encode(a).unwrap();
        assert_eq!(&bin(&CounterAction::Add(5))[..], [0x00, 0x0a]);
        assert_eq!(&bin(&CounterAction::Reset)[..], [0x01]);
        assert_eq!(
            &Encoding::Json.encode(&counter.initial_state()).unwrap()[..],
            b"0"
        );
        let set = KvAction::Set {
            key: "k".into(),
            value: "v".into(),
        };
        for (action, text) in [
            (set, r#"{"Set":{"key":"k","value":"v"}}"#),
            (KvAction::Delete("k".into()), r#"{"Delete":"k"}"#),
            (KvAction::Clear, r#""Clear""#),
        ] {
            assert_eq!(
                &Encoding::Json.encode(&action).unwrap()[..],
                text.as_bytes()
            );
            assert_eq!(
                Encoding::Json.decode::<KvAction>(text.as_bytes()).unwrap(),
                action
            );
        }
        assert_eq!(
            &Encoding::Json.encode(&kv.initial_state()).unwrap()[..],
            b"{}"
        );
        // A negative number and wrapping, as documented.
        let mut n = i64::MAX;
        counter.reduce(&mut n, &CounterAction::Add(1));
        assert_eq!(n, i64::MIN);
    }
}

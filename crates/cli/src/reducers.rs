//! The reducers built into `replimesh node` (a node cannot load Rust code;
//! applications with their own reducers embed the `replimesh` crates).

use std::collections::BTreeMap;

use replimesh::store::Reducer;
use serde::{Deserialize, Serialize};

/// An `i64` counter store.
#[derive(Debug, Clone)]
pub struct Counter {
    /// The store's name.
    pub name: String,
}

/// Actions of [`Counter`] (JSON: `{"Add": 5}`, `"Reset"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterAction {
    /// Adds a number (may be negative).
    Add(i64),
    /// Back to zero.
    Reset,
}

impl Reducer for Counter {
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

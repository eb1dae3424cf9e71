//! The reducers built into `replimesh node` (a node cannot load Rust code;
//! applications with their own reducers embed the `replimesh` crates).

use std::collections::BTreeMap;

use replimesh::store::Reducer;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// An `i64` counter store.
#[derive(Debug, Clone)]
pub struct CounterReducer {
    /// The store's name.
    pub name: String,
}

/// Actions of [`CounterReducer`]. JSON: redux-shaped
/// `{"type": "add", "payload": 5}` and `{"type": "reset"}`; the older
/// serde form `{"Add": 5}`, `"Reset"` is read too. Binary: serde's enum
/// encoding (`Add(5)` is `00 0a`, `Reset` is `01`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterAction {
    /// Adds a number (may be negative).
    Add(i64),
    /// Back to zero.
    Reset,
}

/// [`CounterAction`] as serde writes enums: the binary form, and the older
/// JSON one.
#[derive(Serialize, Deserialize)]
#[serde(rename = "CounterAction")]
enum CounterSerde {
    Add(i64),
    Reset,
}

impl Serialize for CounterAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self, s.is_human_readable()) {
            (CounterAction::Add(n), true) => Redux::new("add", Some(n)).serialize(s),
            (CounterAction::Reset, true) => Redux::<()>::new("reset", None).serialize(s),
            (CounterAction::Add(n), false) => CounterSerde::Add(*n).serialize(s),
            (CounterAction::Reset, false) => CounterSerde::Reset.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for CounterAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let old = if d.is_human_readable() {
            let v = Value::deserialize(d)?;
            if let Some((ty, payload)) = redux(&v) {
                return match ty {
                    "add" => payload
                        .and_then(Value::as_i64)
                        .map(CounterAction::Add)
                        .ok_or_else(|| {
                            D::Error::custom("counter: \"add\" takes an integer payload")
                        }),
                    "reset" => Ok(CounterAction::Reset),
                    other => Err(D::Error::custom(format!(
                        "counter: no action type {other:?} (add, reset)"
                    ))),
                };
            }
            CounterSerde::deserialize(v).map_err(D::Error::custom)?
        } else {
            CounterSerde::deserialize(d)?
        };
        Ok(match old {
            CounterSerde::Add(n) => CounterAction::Add(n),
            CounterSerde::Reset => CounterAction::Reset,
        })
    }
}

/// A redux-shaped action as it is written: `{"type": .., "payload": ..}`.
#[derive(Serialize)]
struct Redux<'a, P: Serialize> {
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a P>,
}

impl<'a, P: Serialize> Redux<'a, P> {
    fn new(r#type: &'static str, payload: Option<&'a P>) -> Self {
        Redux { r#type, payload }
    }
}

/// The type and payload of a redux-shaped JSON action (an object with a
/// string `type`).
fn redux(v: &Value) -> Option<(&str, Option<&Value>)> {
    let o = v.as_object()?;
    Some((o.get("type")?.as_str()?, o.get("payload")))
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

/// Actions of [`Kv`]. JSON: redux-shaped
/// `{"type": "set", "payload": {"key": "a", "value": "1"}}`,
/// `{"type": "delete", "payload": "a"}`, `{"type": "clear"}`; the older
/// serde form `{"Set": {"key": "a", "value": "1"}}`, `{"Delete": "a"}`,
/// `"Clear"` is read too. Binary: serde's enum encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// [`KvAction`] as serde writes enums: the binary form, and the older JSON
/// one.
#[derive(Serialize, Deserialize)]
#[serde(rename = "KvAction")]
enum KvSerde {
    Set { key: String, value: String },
    Delete(String),
    Clear,
}

/// The payload of a redux-shaped `set`.
#[derive(Serialize, Deserialize)]
struct KeyValue {
    key: String,
    value: String,
}

impl Serialize for KvAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return match self.clone() {
                KvAction::Set { key, value } => KvSerde::Set { key, value },
                KvAction::Delete(key) => KvSerde::Delete(key),
                KvAction::Clear => KvSerde::Clear,
            }
            .serialize(s);
        }
        match self {
            KvAction::Set { key, value } => {
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                };
                Redux::new("set", Some(&kv)).serialize(s)
            }
            KvAction::Delete(key) => Redux::new("delete", Some(key)).serialize(s),
            KvAction::Clear => Redux::<()>::new("clear", None).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for KvAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let old = if d.is_human_readable() {
            let v = Value::deserialize(d)?;
            if let Some((ty, payload)) = redux(&v) {
                let payload = payload.cloned().unwrap_or(Value::Null);
                return match ty {
                    "set" => KeyValue::deserialize(payload)
                        .map(|KeyValue { key, value }| KvAction::Set { key, value })
                        .map_err(|e| {
                            D::Error::custom(format!("kv: \"set\" takes {{key, value}}: {e}"))
                        }),
                    "delete" => String::deserialize(payload)
                        .map(KvAction::Delete)
                        .map_err(|e| D::Error::custom(format!("kv: \"delete\" takes a key: {e}"))),
                    "clear" => Ok(KvAction::Clear),
                    other => Err(D::Error::custom(format!(
                        "kv: no action type {other:?} (set, delete, clear)"
                    ))),
                };
            }
            KvSerde::deserialize(v).map_err(D::Error::custom)?
        } else {
            KvSerde::deserialize(d)?
        };
        Ok(match old {
            KvSerde::Set { key, value } => KvAction::Set { key, value },
            KvSerde::Delete(key) => KvAction::Delete(key),
            KvSerde::Clear => KvAction::Clear,
        })
    }
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
        let bin = |a: &CounterAction| Encoding::Binary.encode(a).unwrap();
        assert_eq!(&bin(&CounterAction::Add(5))[..], [0x00, 0x0a]);
        assert_eq!(&bin(&CounterAction::Reset)[..], [0x01]);
        for (action, redux, old) in [
            (
                CounterAction::Add(5),
                r#"{"type":"add","payload":5}"#,
                r#"{"Add":5}"#,
            ),
            (CounterAction::Reset, r#"{"type":"reset"}"#, r#""Reset""#),
        ] {
            assert_eq!(
                &Encoding::Json.encode(&action).unwrap()[..],
                redux.as_bytes()
            );
            for text in [redux, old] {
                assert_eq!(
                    Encoding::Json
                        .decode::<CounterAction>(text.as_bytes())
                        .unwrap(),
                    action
                );
            }
            let b = Encoding::Binary.encode(&action).unwrap();
            assert_eq!(
                Encoding::Binary.decode::<CounterAction>(&b).unwrap(),
                action
            );
        }
        assert_eq!(
            &Encoding::Json.encode(&counter.initial_state()).unwrap()[..],
            b"0"
        );
        let set = KvAction::Set {
            key: "k".into(),
            value: "v".into(),
        };
        for (action, redux, old) in [
            (
                set,
                r#"{"type":"set","payload":{"key":"k","value":"v"}}"#,
                r#"{"Set":{"key":"k","value":"v"}}"#,
            ),
            (
                KvAction::Delete("k".into()),
                r#"{"type":"delete","payload":"k"}"#,
                r#"{"Delete":"k"}"#,
            ),
            (KvAction::Clear, r#"{"type":"clear"}"#, r#""Clear""#),
        ] {
            assert_eq!(
                &Encoding::Json.encode(&action).unwrap()[..],
                redux.as_bytes()
            );
            for text in [redux, old] {
                assert_eq!(
                    Encoding::Json.decode::<KvAction>(text.as_bytes()).unwrap(),
                    action
                );
            }
            let b = Encoding::Binary.encode(&action).unwrap();
            assert_eq!(Encoding::Binary.decode::<KvAction>(&b).unwrap(), action);
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

    /// Malformed actions are refused with a reason naming the formats.
    #[test]
    fn bad_actions_say_what_is_expected() {
        for (text, why) in [
            (r#"{"type":"add","payload":"five"}"#, "integer payload"),
            (r#"{"type":"sub","payload":1}"#, "(add, reset)"),
            (r#"{"Sub":1}"#, "unknown variant"),
        ] {
            let e = Encoding::Json
                .decode::<CounterAction>(text.as_bytes())
                .unwrap_err();
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
        for (text, why) in [
            (
                r#"{"type":"set","payload":{"key":"k"}}"#,
                "takes {key, value}",
            ),
            (r#"{"type":"delete"}"#, "takes a key"),
            (r#"{"type":"put"}"#, "(set, delete, clear)"),
        ] {
            let e = Encoding::Json
                .decode::<KvAction>(text.as_bytes())
                .unwrap_err();
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }
}

//! [`JsReducer`]: a store reducer written in JavaScript.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use store::{Reducer, Rejection};

use crate::engine::{Engine, JsError, Limits};

/// A JSON value kept as its text: the state and the actions of a
/// [`JsReducer`].
///
/// In JSON payloads it is the value itself; in binary (`postcard`)
/// payloads, a string holding the text. Cloning is cheap (shared text).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Json(Arc<str>);

impl Json {
    /// Checks that `text` is one JSON value and keeps it as it is.
    pub fn new(text: &str) -> Result<Json, serde_json::Error> {
        serde_json::from_str::<&serde_json::value::RawValue>(text)?;
        Ok(Json(text.into()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            let raw = serde_json::value::RawValue::from_string(self.0.to_string())
                .map_err(serde::ser::Error::custom)?;
            raw.serialize(s)
        } else {
            s.serialize_str(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        if d.is_human_readable() {
            let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
            Ok(Json(raw.get().into()))
        } else {
            let text = String::deserialize(d)?;
            if text.is_empty() {
                return Err(D::Error::custom("empty JSON text"));
            }
            Ok(Json(text.into()))
        }
    }
}

/// The schema version of a reducer file when none is given: the first four
/// bytes of the SHA-256 of its content, big-endian. In JavaScript:
/// `new DataView(await crypto.subtle.digest('SHA-256', bytes)).getUint32(0)`.
pub fn schema_of(source: &[u8]) -> u32 {
    let d = ring::digest::digest(&ring::digest::SHA256, source);
    let b = d.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A store reducer written in JavaScript: an ES module whose default
/// export is a redux reducer `(state, action) => newState`.
///
/// - The initial state is `reducer(undefined, {type: "@@INIT"})`.
/// - Actions are JSON objects with a string `type` (redux's
///   `{type, payload}`); states are JSON values.
/// - The module runs in its own QuickJS engine with no clock
///   (`Date.now()` and `new Date()` throw), no `Math.random`, no timers,
///   network, file system or `import`, under [`Limits`]. An action that
///   throws or passes a limit is refused ([`Reducer::try_reduce`]): the
///   dispatcher gets the reason and the state is unchanged.
/// - The engine is behind a lock (rquickjs' `parallel` feature): the
///   reducer runs on the thread of the store that calls it.
#[derive(Debug)]
pub struct JsReducer {
    name: String,
    schema: u32,
    engine: Engine,
    initial: Json,
}

impl JsReducer {
    /// Loads the reducer module at `path` for the store `name`; `schema`
    /// `None` takes [`schema_of`] the file.
    pub fn load(
        name: &str,
        path: &Path,
        schema: Option<u32>,
        limits: Limits,
    ) -> Result<JsReducer, JsError> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| JsError::Load {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let short = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or(file);
        JsReducer::from_source(name, &short, &source, schema, limits)
    }

    /// As [`JsReducer::load`], from the module's text (`file` names it in
    /// errors and stack traces).
    pub fn from_source(
        name: &str,
        file: &str,
        source: &str,
        schema: Option<u32>,
        limits: Limits,
    ) -> Result<JsReducer, JsError> {
        let engine = Engine::load(file, source, limits)?;
        let initial = engine.call("init", &[]).map_err(|e| JsError::Load {
            file: file.to_owned(),
            reason: format!("the initial state (reducer(undefined, {{type: \"@@INIT\"}})): {e}"),
        })?;
        Ok(JsReducer {
            name: name.to_owned(),
            schema: schema.unwrap_or_else(|| schema_of(source.as_bytes())),
            engine,
            initial: Json(initial.into()),
        })
    }

    /// The limits the reducer runs under.
    pub fn limits(&self) -> Limits {
        self.engine.limits()
    }

    /// Applies one action to a state: the next state, or why not.
    pub fn apply(&self, state: &Json, action: &Json) -> Result<Json, JsError> {
        self.engine
            .call("reduce", &[state.as_str(), action.as_str()])
            .map(|t| Json(t.into()))
    }
}

impl Reducer for JsReducer {
    type State = Json;
    type Action = Json;

    fn name(&self) -> &str {
        &self.name
    }

    fn schema(&self) -> u32 {
        self.schema
    }

    fn initial_state(&self) -> Json {
        self.initial.clone()
    }

    /// Applies the action; a refused one leaves the state as it is (the
    /// store calls [`Reducer::try_reduce`], which reports it).
    fn reduce(&self, state: &mut Json, action: &Json) {
        if let Err(e) = self.try_reduce(state, action) {
            tracing::debug!(store = %self.name, "action refused: {e}");
        }
    }

    fn try_reduce(&self, state: &mut Json, action: &Json) -> Result<(), Rejection> {
        *state = self
            .apply(state, action)
            .map_err(|e| Rejection(e.to_string()))?;
        Ok(())
    }
}

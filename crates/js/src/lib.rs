//! Replimesh in JavaScript, run by the node: store reducers written as
//! ES modules, run by an embedded QuickJS engine (through `rquickjs`) in a
//! sandbox with time and memory limits.
//!
//! ```
//! use replimesh_js::{JsReducer, Json, Limits};
//! use store::Reducer;
//!
//! let source = "export default (state = 0, action) =>
//!     action.type === 'add' ? state + action.payload : state;";
//! let counter = JsReducer::from_source("counter", "counter.js", source, None, Limits::default())?;
//! let mut state = counter.initial_state();
//! assert_eq!(state.as_str(), "0");
//! counter.try_reduce(&mut state, &Json::new(r#"{"type":"add","payload":5}"#)?)?;
//! assert_eq!(state.as_str(), "5");
//! // A refused action leaves the state as it was.
//! assert!(counter.try_reduce(&mut state, &Json::new(r#"{"payload":1}"#)?).is_err());
//! assert_eq!(state.as_str(), "5");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What a reducer may and may not do is in `docs/javascript.md`.

mod engine;
mod reducer;

pub use engine::{JsError, Limits};
pub use reducer::{schema_of, JsReducer, Json};

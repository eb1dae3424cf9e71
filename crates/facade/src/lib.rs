//! Replimesh: a messaging mesh and a replicated redux-style store.
//!
//! This is the thin facade over the Replimesh crates: depend on `replimesh`
//! alone, or on the single crates it re-exports.
//!
//! ```
//! use replimesh::proto::Frame;
//! let frame = Frame::ping(1);
//! assert_eq!(frame.kind(), "ping");
//! ```

#[doc(inline)]
pub use backup;
#[doc(inline)]
pub use mesh;
#[doc(inline)]
pub use proto;
#[doc(inline)]
pub use store;
#[doc(inline)]
pub use transport;

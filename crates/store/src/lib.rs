//! Replimesh store: redux-style state replicated from one authority.

pub mod core;
mod error;
mod reducer;

pub use crate::core::SyncMode;
pub use error::{DispatchError, ErrorCode, RemoteError};
pub use reducer::{CodecError, Encoding, Reducer};

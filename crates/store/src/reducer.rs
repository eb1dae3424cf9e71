//! The [`Reducer`] trait and the payload encodings.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A redux-style reducer: the pure function that turns a state and an action
/// into the next state.
///
/// Every peer of a store (the authority and all replicas) runs the same
/// reducer over the same actions in the same order, so the reducer **must be
/// deterministic**: no clocks, no randomness, no iteration over a `HashMap`
/// whose order could differ between processes (use a `BTreeMap` when the state
/// is compared by digest, see [`SyncMode::Digest`](crate::SyncMode::Digest)).
///
/// The state is changed in place (`&mut`) so that small actions on large
/// states stay cheap.
///
/// # Panics
///
/// A reducer should not panic. If it does on the authority, the action is
/// **rejected**: it gets no sequence number, the dispatcher receives a
/// [`ErrorCode::ReducerPanic`](crate::ErrorCode::ReducerPanic) error, and the
/// authority rebuilds its state from its latest snapshot plus the committed
/// actions after it (so a half-applied action leaves no trace). If a replica's
/// reducer panics on a committed action, the replica asks the authority for a
/// snapshot. The process keeps running in both cases (unless it is built with
/// `panic = "abort"`).
pub trait Reducer: Send + Sync + 'static {
    /// The state of the store.
    type State: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The actions that change the state.
    type Action: Serialize + DeserializeOwned + Send + 'static;

    /// The store's name: peers attach to a store by name, so two stores of one
    /// server need different names.
    fn name(&self) -> &str;

    /// The schema version of `State` and `Action`. A replica whose schema
    /// differs from the authority's is refused with an error naming both.
    fn schema(&self) -> u32 {
        1
    }

    /// The state before the first action.
    fn initial_state(&self) -> Self::State;

    /// Applies `action` to `state`. Must be deterministic.
    fn reduce(&self, state: &mut Self::State, action: &Self::Action);

    /// Applies `action` to `state`, or refuses it: on `Err` the state must be
    /// unchanged. The store calls this method (the default calls
    /// [`Reducer::reduce`] and never refuses). A refused action is handled as
    /// a panicking one (see above), except that the authority has nothing to
    /// rebuild and the dispatcher's error carries the [`Rejection`]'s reason.
    /// Refusals must be deterministic too, or replicas fall back to snapshots.
    fn try_reduce(&self, state: &mut Self::State, action: &Self::Action) -> Result<(), Rejection> {
        self.reduce(state, action);
        Ok(())
    }
}

/// Why a reducer refused an action (see [`Reducer::try_reduce`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

/// How applying one action went wrong.
pub(crate) enum ApplyError {
    /// The reducer panicked: the state may be half changed.
    Panicked,
    /// The reducer refused the action; the state is unchanged.
    Refused(Rejection),
}

/// Applies one action through [`Reducer::try_reduce`], catching a panic.
pub(crate) fn apply<R: Reducer>(
    reducer: &R,
    state: &mut R::State,
    action: &R::Action,
) -> Result<(), ApplyError> {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    match catch_unwind(AssertUnwindSafe(|| reducer.try_reduce(state, action))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(r)) => Err(ApplyError::Refused(r)),
        Err(_) => Err(ApplyError::Panicked),
    }
}

/// How actions and states are encoded inside store frames.
///
/// Rust peers use [`Encoding::Binary`] (compact `postcard`); browsers use
/// [`Encoding::Json`]. The authority keeps its history in binary and converts
/// for JSON peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// `postcard`: compact, varint-based serde format.
    #[default]
    Binary,
    /// `serde_json`.
    Json,
}

impl Encoding {
    pub(crate) fn from_proto(value: i32) -> Encoding {
        match proto::Encoding::try_from(value) {
            Ok(proto::Encoding::Json) => Encoding::Json,
            _ => Encoding::Binary,
        }
    }

    pub(crate) fn to_proto(self) -> proto::Encoding {
        match self {
            Encoding::Binary => proto::Encoding::Binary,
            Encoding::Json => proto::Encoding::Json,
        }
    }

    /// Encodes a value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, PayloadError> {
        match self {
            Encoding::Binary => postcard::to_stdvec(value)
                .map(Bytes::from)
                .map_err(|e| PayloadError(e.to_string())),
            Encoding::Json => serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(|e| PayloadError(e.to_string())),
        }
    }

    /// Decodes a value.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, PayloadError> {
        match self {
            Encoding::Binary => {
                postcard::from_bytes(bytes).map_err(|e| PayloadError(e.to_string()))
            }
            Encoding::Json => {
                serde_json::from_slice(bytes).map_err(|e| PayloadError(e.to_string()))
            }
        }
    }
}

/// A payload that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload encoding: {0}")]
pub struct PayloadError(pub String);

/// Re-encodes a binary payload for a peer that wants `to`.
pub(crate) fn transcode<T: Serialize + DeserializeOwned>(
    binary: &Bytes,
    to: Encoding,
) -> Result<Bytes, PayloadError> {
    match to {
        Encoding::Binary => Ok(binary.clone()),
        Encoding::Json => {
            let value: T = Encoding::Binary.decode(binary)?;
            Encoding::Json.encode(&value)
        }
    }
}

/// Converts a payload received in `from` into the binary form kept in histories.
pub(crate) fn to_binary<T: Serialize + DeserializeOwned>(
    bytes: &Bytes,
    from: Encoding,
) -> Result<(T, Bytes), PayloadError> {
    let value: T = from.decode(bytes)?;
    let binary = match from {
        Encoding::Binary => bytes.clone(),
        Encoding::Json => Encoding::Binary.encode(&value)?,
    };
    Ok((value, binary))
}

/// A 16-byte digest of an encoded state (BLAKE2b-128).
pub(crate) fn digest(encoded_state: &[u8]) -> Bytes {
    use blake2::digest::consts::U16;
    use blake2::{Blake2b, Digest};
    let mut h = Blake2b::<U16>::new();
    h.update(encoded_state);
    Bytes::copy_from_slice(&h.finalize())
}

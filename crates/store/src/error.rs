//! Error types.

use crate::reducer::PayloadError;

/// The codes carried in `StoreError.error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No store with that name is served here.
    UnknownStore,
    /// The replica's schema version differs from the authority's.
    SchemaMismatch,
    /// The action could not be decoded (or re-encoded).
    BadAction,
    /// The reducer panicked on the action; it was not committed.
    ReducerPanic,
    /// A resent dispatch is older than the authority's duplicate window: it
    /// was handled before, but its sequence number is no longer known.
    Forgotten,
    /// A relay's outbox is full; the dispatch was not accepted (retry later).
    OutboxFull,
    /// A frame named a store this connection has not attached.
    NotAttached,
    /// The history the dispatch was committed in is gone (the authority
    /// restarted without persistence).
    HistoryLost,
    /// Something else went wrong on the peer.
    Internal,
    /// The op id of this client id was already committed with another
    /// action (a client id reused by a client that numbers its ops from 1
    /// again); nothing was committed.
    OpIdReused,
    /// A store frame had a value that could not be read (an enum value
    /// the schema does not have, a JSON value of the wrong type); the frame
    /// was ignored and the connection goes on.
    BadFrame,
    /// A code this version does not know.
    Unknown(u32),
}

impl ErrorCode {
    /// The numeric code.
    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::UnknownStore => 1,
            ErrorCode::SchemaMismatch => 2,
            ErrorCode::BadAction => 3,
            ErrorCode::ReducerPanic => 4,
            ErrorCode::Forgotten => 5,
            ErrorCode::OutboxFull => 6,
            ErrorCode::NotAttached => 7,
            ErrorCode::HistoryLost => 8,
            ErrorCode::Internal => 9,
            ErrorCode::OpIdReused => 10,
            ErrorCode::BadFrame => proto::STORE_ERROR_BAD_FRAME,
            ErrorCode::Unknown(c) => c,
        }
    }

    /// The code for a numeric value.
    pub fn from_u32(code: u32) -> ErrorCode {
        match code {
            1 => ErrorCode::UnknownStore,
            2 => ErrorCode::SchemaMismatch,
            3 => ErrorCode::BadAction,
            4 => ErrorCode::ReducerPanic,
            5 => ErrorCode::Forgotten,
            6 => ErrorCode::OutboxFull,
            7 => ErrorCode::NotAttached,
            8 => ErrorCode::HistoryLost,
            9 => ErrorCode::Internal,
            10 => ErrorCode::OpIdReused,
            proto::STORE_ERROR_BAD_FRAME => ErrorCode::BadFrame,
            c => ErrorCode::Unknown(c),
        }
    }
}

/// An error reported by a peer in a `StoreError` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct RemoteError {
    /// What kind of error.
    pub code: ErrorCode,
    /// A human-readable description.
    pub message: String,
}

impl RemoteError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RemoteError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn from_frame(e: &proto::StoreError) -> Self {
        match &e.error {
            Some(info) => RemoteError::new(ErrorCode::from_u32(info.code), info.message.clone()),
            None => RemoteError::new(ErrorCode::Internal, "unspecified store error"),
        }
    }

    /// The `StoreError` frame carrying this error (`op_id` 0: not about a dispatch).
    pub fn to_frame(&self, store: &str, op_id: u64) -> proto::Frame {
        self.to_frame_for(store, op_id, "")
    }

    /// As [`RemoteError::to_frame`], for an op id of `client_id` (a relay's
    /// downstream client; empty: the receiver's own).
    pub fn to_frame_for(&self, store: &str, op_id: u64, client_id: &str) -> proto::Frame {
        self.to_frame_range(store, op_id, 1, client_id)
    }

    /// As [`RemoteError::to_frame_for`], for op ids `op_id .. op_id + count`
    /// (one frame for a refused batch or a run of refused op ids).
    pub fn to_frame_range(
        &self,
        store: &str,
        op_id: u64,
        count: u64,
        client_id: &str,
    ) -> proto::Frame {
        proto::Frame::new(proto::frame::Body::StoreError(proto::StoreError {
            store: store.to_owned(),
            op_id,
            error: Some(proto::ErrorInfo {
                code: self.code.as_u32(),
                message: self.message.clone(),
            }),
            client_id: client_id.to_owned(),
            count: if count > 1 { count } else { 0 },
        }))
    }
}

/// Why a dispatch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// Too many dispatches are waiting to be committed; nothing was queued.
    #[error("outbox full: {pending} dispatches waiting (limit {limit})")]
    OutboxFull {
        /// Dispatches waiting now.
        pending: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The action could not be encoded.
    #[error(transparent)]
    Encode(#[from] PayloadError),
    /// The authority refused the action (or the store).
    #[error("rejected: {0}")]
    Rejected(#[from] RemoteError),
    /// The store was shut down before the dispatch was committed.
    #[error("store closed")]
    Closed,
}

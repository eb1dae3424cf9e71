//! Replimesh transports (in progress).

//! Replimesh mesh: servers ("clones") that find each other and form a mesh.

pub mod core;

//! Helpers shared by the node tests that include this module.

use replimesh::store;

/// A cheap Argon2id PHC string for `password` (unoptimized test builds
/// would pay the production cost at every login check).
pub(crate) fn cheap_phc(password: &str) -> String {
    let cost = store::HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    store::hash_password(password, cost).unwrap()
}

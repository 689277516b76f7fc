//! Integration tests of the store, one binary with a module per topic.

mod common;
mod corruption;
mod gc;
mod hashing;
mod locking;
mod roundtrip;
mod write_errors;

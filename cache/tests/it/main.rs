//! Integration tests of the store, one binary with a module per topic.

// Tests print the reason when they skip an environment-dependent check.
#![allow(clippy::print_stderr)]

mod common;
mod corruption;
mod gc;
mod hashing;
mod locking;
mod memo;
mod roundtrip;
mod sigkill;
mod write_errors;

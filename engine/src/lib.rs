//! The `pipeline` engine: recipes -> graph -> keys -> scheduling -> executors.
//!
//! The engine knows nothing about ML: stage kinds are registered through [`stage::Registry`]
//! by the `stages` crate (and by the engine's own `shell` kind).
#![allow(unreachable_pub)]

pub mod stage;

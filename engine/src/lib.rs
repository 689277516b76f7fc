//! The `pipeline` engine: recipes -> graph -> keys -> scheduling -> executors.
//!
//! The engine knows nothing about ML: stage kinds are registered through [`stage::Registry`]
//! by the `stages` crate (and by the engine's own `shell` kind).
#![allow(unreachable_pub)]

pub mod env_vars;
pub mod events;
pub mod exec;
pub mod graph;
pub mod key;
mod orphans;
pub mod plan;
pub mod recipe;
pub mod shell;
pub mod stage;
#[cfg(feature = "testing")]
pub mod testing;

/// A registry holding the kinds the engine itself provides (`shell`); the binary adds the
/// ML kinds from the `stages` crate.
#[must_use]
pub fn builtin_registry() -> stage::Registry {
    let mut registry = stage::Registry::new();
    registry.register(shell::Shell);
    registry
}

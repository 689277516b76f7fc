//! The ML stage kinds, registered into the engine's [`engine::stage::Registry`].
//!
//! Each kind lives in its own module and implements [`engine::stage::StageKind`]; this module
//! only lists them, so that adding a kind is one line here plus its module.

pub mod cl_metrics;
pub mod coin_data;
pub mod coin_eval;
mod common;
pub mod merge_kinds;
pub mod report;
pub mod sft;
pub mod tokenizer_kind;
pub mod train_kinds;
pub mod vision_kind;

use engine::stage::Registry;

/// Register every ML stage kind.
pub fn register_all(registry: &mut Registry) {
    coin_data::register(registry);
    train_kinds::register(registry);
    vision_kind::register(registry);
    merge_kinds::register(registry);
    coin_eval::register(registry);
    cl_metrics::register(registry);
    report::register(registry);
}

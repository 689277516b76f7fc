//! Evaluation logic shared by the eval stage kinds, kept free of I/O so it can be tested on
//! hand-written cases.
//!
//! - [`coin_score`]: CoIN's per-task scoring rules (with its quirks behind a flag).
//! - [`cl_metrics`]: the continual-learning accuracy matrix and its summary metrics.

pub mod cl_metrics;
pub mod coin_score;

//! Dataset formats, readers and synthetic generators shared by the data stage kinds.
//!
//! - [`coin`]: CoIN's annotation formats and the project's CoIN dataset artifact
//!   (`dataset.json` + `annotations/`), with field-precise validation.
//! - [`synth_coin`]: the deterministic CoIN look-alike generator behind `data.synth-coin`.
//! - [`asd`]: Answer Style Diversification (SEFE), behind `asd.rewrite`.

pub mod asd;
pub mod coin;
pub mod synth_coin;

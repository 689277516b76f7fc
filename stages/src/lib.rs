//! Stage kinds and the ML they need.
#![allow(unreachable_pub)]
pub mod data;
pub mod eval;
pub mod model;

pub mod kinds;
pub mod ops;
pub mod report;
pub mod train;

pub use kinds::register_all;

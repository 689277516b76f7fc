//! End-to-end tests of the `pipeline` binary: they run the real executable on recipes of
//! `shell` stages in temporary directories and assert on its exit codes, its `--json`
//! event stream, its stderr status lines and the files it leaves behind.
//!
//! The `shell` kind is enough to exercise every engine behaviour (keys, early cutoff,
//! locking, resume, cache verification) without the ML stage kinds, so these tests pass
//! with `cargo test --no-default-features --test cli`.

mod common;

mod cache_integrity;
mod cli_errors;
mod concurrency;
mod explain;
mod freshness;
mod gc_exec;
mod json_events;
mod kill_resume;
mod smoke;
mod verbose_log;

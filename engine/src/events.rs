//! The events a run emits, and their `--json` wire format.
//!
//! ## Overview
//!
//! The executor reports everything it does as an [`Event`] to a [`Reporter`]. The binary has
//! two reporters: a human one (cargo-style status lines on stderr, indicatif bars) and a JSON
//! one that prints each event as one line on stdout (JSON Lines). Both see exactly the same
//! events, so anything a human can see a script can parse.
//!
//! ## Wire format
//!
//! Each line is one object `{"type": <kebab-case type>, "data": {...}}`. Field names in
//! `data` are snake_case; durations are integer milliseconds; keys are 64-char hex blake3.
//!
//! | type | data fields |
//! |---|---|
//! | `run-started` | `experiment`, `stages` (number selected), `jobs` |
//! | `stage-started` | `stage`, `key`, `reasons` (list of tagged [`RerunReason`]), `cascade` |
//! | `stage-progress` | `stage`, `done`, `total`, `message` |
//! | `stage-cached` | `stage`, `key`, `time_saved_ms`, `log` |
//! | `stage-finished` | `stage`, `key`, `elapsed_ms`, `log` |
//! | `stage-failed` | `stage`, `key` (or `null` if it failed before its key was known), `error`, `elapsed_ms` |
//! | `run-finished` | `ran`, `cached`, `failed`, `skipped` (names of stages not run because an upstream failed), `interrupted`, `elapsed_ms` |
//! | `error` | `exit_code`, `message`, `causes` (the source chain, outermost first), `help`, `diagnostic` (the full diagnostic as miette renders it to JSON: `code`, `labels`, `related`, ...) |
//!
//! `error` is the last line of a command that fails as a whole (invalid recipe, unusable cache:
//! exit codes 2 and 3); the same diagnostic is printed for people on stderr.
//!
//! `log` is the path of the stage's captured stdout and stderr in its cache entry
//! (`<cache>/v1/entries/<key>/log.txt`); the file exists only if the stage printed something.
//!
//! A reason is an object tagged by `reason` (`never-run`, `param-changed` with `path`/`old`/
//! `new`, `input-changed` with `input`/`upstream`/`reran`, `external-file-changed` with
//! `path`, `kind-version-changed`, `env-changed`, `seed-changed`, `forced`,
//! `outputs-missing`, `cache-corrupt`, `previous-attempt-incomplete`, ...).
//!
//! ## Example
//!
//! ```text
//! {"type":"run-started","data":{"experiment":"demo","stages":2,"jobs":2}}
//! {"type":"stage-cached","data":{"stage":"a","key":"9f2c…","time_saved_ms":1200,"log":"/p/.pipeline/v1/entries/9f2c…/log.txt"}}
//! {"type":"stage-started","data":{"stage":"b","key":"01ab…","reasons":[{"reason":"param-changed","path":"p","old":1,"new":2}],"cascade":false}}
//! {"type":"stage-finished","data":{"stage":"b","key":"01ab…","elapsed_ms":35,"log":"/p/.pipeline/v1/entries/01ab…/log.txt"}}
//! {"type":"run-finished","data":{"ran":1,"cached":1,"failed":0,"skipped":[],"interrupted":false,"elapsed_ms":48}}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::key::RerunReason;

/// One thing that happened during a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum Event {
    /// The run begins.
    RunStarted {
        /// Experiment name.
        experiment: String,
        /// Number of stages selected for this run.
        stages: usize,
        /// Parallel job limit.
        jobs: usize,
    },
    /// A stage starts computing (a miss).
    StageStarted {
        /// Stage name.
        stage: String,
        /// Stage key (hex).
        key: String,
        /// Why it runs.
        reasons: Vec<RerunReason>,
        /// Whether every reason is an upstream rerun.
        cascade: bool,
    },
    /// Progress reported by a running stage.
    StageProgress {
        /// Stage name.
        stage: String,
        /// Units done.
        done: u64,
        /// Units in total.
        total: u64,
        /// Short message (loss, item...).
        message: String,
    },
    /// A stage was a cache hit.
    StageCached {
        /// Stage name.
        stage: String,
        /// Stage key (hex).
        key: String,
        /// How long the cached run took when it was computed.
        time_saved_ms: u64,
        /// Where the stage's captured output (stdout and stderr) is stored in its cache
        /// entry; the file exists only if the stage printed something. `-v` replays it.
        log: PathBuf,
    },
    /// A stage committed its outputs.
    StageFinished {
        /// Stage name.
        stage: String,
        /// Stage key (hex).
        key: String,
        /// Wall time of the stage.
        elapsed_ms: u64,
        /// Where its captured output is stored (as for `stage-cached`).
        log: PathBuf,
    },
    /// A stage failed; it left no cache entry.
    StageFailed {
        /// Stage name.
        stage: String,
        /// Stage key (hex), if it was known.
        key: Option<String>,
        /// The error, one line.
        error: String,
        /// Wall time until the failure.
        elapsed_ms: u64,
    },
    /// The run is over.
    RunFinished {
        /// Stages computed.
        ran: usize,
        /// Stages that were hits.
        cached: usize,
        /// Stages that failed.
        failed: usize,
        /// Stages not run because an upstream stage failed or the run was interrupted.
        skipped: Vec<String>,
        /// Whether the run was interrupted (Ctrl-C).
        interrupted: bool,
        /// Wall time of the run.
        elapsed_ms: u64,
    },
    /// The command failed as a whole, outside any one stage (invalid recipe or usage,
    /// unusable cache). Emitted by the binary, not the executor.
    Error {
        /// The process's exit code (2 usage, 3 environment).
        exit_code: u8,
        /// The top-level message.
        message: String,
        /// The source chain below it, outermost first (down to the OS error).
        causes: Vec<String>,
        /// How to fix it, when known.
        help: Option<String>,
        /// The whole diagnostic as miette renders it to JSON (`code`, `labels`, `related`
        /// errors of a recipe, ...).
        diagnostic: serde_json::Value,
    },
}

/// Receives the events of a run. Implementations must be cheap: they are called from the
/// scheduler thread and from stage threads (progress).
pub trait Reporter: Send + Sync {
    /// Handle one event.
    fn event(&self, event: &Event);
}

/// A reporter that drops everything.
#[derive(Debug, Default)]
pub struct NullReporter;

impl Reporter for NullReporter {
    fn event(&self, _: &Event) {}
}

/// A reporter that records every event (for tests and for `--json` buffering).
#[derive(Debug, Default)]
pub struct Recorder {
    events: std::sync::Mutex<Vec<Event>>,
}

impl Recorder {
    /// A snapshot of the events so far.
    #[must_use]
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Reporter for Recorder {
    fn event(&self, event: &Event) {
        if let Ok(mut e) = self.events.lock() {
            e.push(event.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelope_is_type_and_data() {
        let e = Event::StageCached {
            stage: "a".into(),
            key: "k".into(),
            time_saved_ms: 5,
            log: PathBuf::from("e/log.txt"),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            json!({"type": "stage-cached", "data": {"stage": "a", "key": "k", "time_saved_ms": 5, "log": "e/log.txt"}})
        );
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn every_type_round_trips() {
        let events = [
            Event::RunStarted {
                experiment: "x".into(),
                stages: 2,
                jobs: 1,
            },
            Event::StageStarted {
                stage: "a".into(),
                key: "k".into(),
                reasons: vec![RerunReason::NeverRun],
                cascade: false,
            },
            Event::StageProgress {
                stage: "a".into(),
                done: 1,
                total: 2,
                message: String::new(),
            },
            Event::StageFinished {
                stage: "a".into(),
                key: "k".into(),
                elapsed_ms: 3,
                log: PathBuf::from("e/log.txt"),
            },
            Event::StageFailed {
                stage: "a".into(),
                key: None,
                error: "boom".into(),
                elapsed_ms: 3,
            },
            Event::RunFinished {
                ran: 1,
                cached: 0,
                failed: 1,
                skipped: vec!["b".into()],
                interrupted: false,
                elapsed_ms: 4,
            },
            Event::Error {
                exit_code: 3,
                message: "cannot use the cache directory `c`".into(),
                causes: vec!["Not a directory (os error 20)".into()],
                help: None,
                diagnostic: json!({"message": "cannot use the cache directory `c`"}),
            },
        ];
        let types = [
            "run-started",
            "stage-started",
            "stage-progress",
            "stage-finished",
            "stage-failed",
            "run-finished",
            "error",
        ];
        for (e, ty) in events.iter().zip(types) {
            let line = serde_json::to_string(e).unwrap();
            assert!(
                line.starts_with(&format!("{{\"type\":\"{ty}\",\"data\":")),
                "{line}"
            );
            assert_eq!(&serde_json::from_str::<Event>(&line).unwrap(), e);
        }
    }
}

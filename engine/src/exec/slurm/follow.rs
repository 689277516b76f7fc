//! Following the jobs: one `squeue` per poll, and what each state means for its stage.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cli;
use super::{Scheduler, slurm_error};
use crate::events::Event;
use crate::exec::ExecError;
use crate::exec::run_state::Slot;
use crate::exec::stage_run::{self, FinishError};

/// How long the controller may be unreachable before the run gives up.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(60);

impl Scheduler<'_> {
    /// One `squeue` for every job of the run, and what follows from each state.
    pub(super) fn poll(&mut self) -> Result<(), ExecError> {
        let ids = self.job_ids();
        if ids.is_empty() {
            return Ok(());
        }
        let states = match cli::squeue(&ids) {
            Ok(s) => {
                self.unreachable_since = None;
                s
            }
            Err(e) => {
                let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() < UNREACHABLE_LIMIT {
                    return Ok(());
                }
                let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
                return Err(slurm_error(
                    format!(
                        "lost contact with the Slurm controller for {} s: {e}; jobs {} may still \
                         be queued or running",
                        UNREACHABLE_LIMIT.as_secs(),
                        list.join(", ")
                    ),
                    "when the controller is back, rerun: committed stages are hits, and \
                     running jobs of this run finish on their own (or `scancel` them)",
                ));
            }
        };
        // Topological order: an upstream's end is handled before its dependents' states.
        for i in 0..self.run.slots.len() {
            let Slot::Remote(job) = &self.run.slots[i] else {
                continue;
            };
            let id = job.id;
            match states.get(&id) {
                None => self.ended(i, None),
                Some(s) if s.state == "COMPLETED" => self.ended(i, Some("COMPLETED")),
                Some(s) if cli::is_terminal(&s.state) => {
                    let state = s.state.clone();
                    self.job_failed(i, &state);
                }
                Some(s) if cli::is_stuck(&s.state, &s.reason) => {
                    let _ = cli::scancel(&[id]);
                    let msg = format!(
                        "Slurm job {id} can never start ({}: {}); cancelled it",
                        s.state, s.reason
                    );
                    self.fail(i, None, msg, Duration::ZERO);
                }
                Some(s) => {
                    let shown = if s.reason.is_empty() || s.reason == "None" {
                        s.state.clone()
                    } else {
                        format!("{} ({})", s.state, s.reason)
                    };
                    if s.state == "RUNNING" {
                        self.announce(i);
                    }
                    self.show(i, shown);
                }
            }
        }
        Ok(())
    }

    /// Report a state change of `i`'s job as progress.
    fn show(&mut self, i: usize, shown: String) {
        let Slot::Remote(job) = &mut self.run.slots[i] else {
            return;
        };
        if job.shown == shown {
            return;
        }
        let message = format!("Slurm job {}: {shown}", job.id);
        job.shown = shown;
        self.run.reporter.event(&Event::StageProgress {
            stage: self.run.recipe.stages[i].name.clone(),
            done: 0,
            total: 0,
            message,
        });
    }

    /// `stage-started` for a job seen running (or ended before any poll saw it run).
    fn announce(&mut self, i: usize) {
        let known = match &self.run.slots[i] {
            Slot::Remote(j) if j.announced => return,
            Slot::Remote(j) => j.key.clone(),
            _ => return,
        };
        let Some((key, reasons)) = known.or_else(|| self.run.key_and_reasons(i)) else {
            return;
        };
        if let Slot::Remote(j) = &mut self.run.slots[i] {
            j.announced = true;
        }
        self.run.started(i, key, reasons);
    }

    /// A job ended with exit 0 (`Some("COMPLETED")`) or is no longer known to Slurm
    /// (`None`): either way the cache says whether the stage committed.
    fn ended(&mut self, i: usize, state: Option<&str>) {
        let Slot::Remote(job) = &self.run.slots[i] else {
            return;
        };
        let (id, log, submitted) = (job.id, job.log.clone(), job.submitted);
        let node = &self.run.recipe.stages[i];
        let how = state.map_or_else(
            || "is no longer known to Slurm".to_owned(),
            |s| format!("ended {s}"),
        );
        let entry = self.run.input_entries(i).and_then(|up| {
            let m = self.run.manifest(i, &up).ok()?;
            self.run.cache.lookup(&m.key()).ok().flatten()
        });
        let Some(entry) = entry else {
            let msg = format!(
                "Slurm job {id} {how} but committed no entry{}; job log: {}",
                last_error(&log).map_or_else(String::new, |e| format!(" ({e})")),
                log.display()
            );
            self.fail(i, None, msg, submitted.elapsed());
            return;
        };
        let entry = Arc::new(entry);
        self.announce(i);
        let env = self.run.env();
        let Some(kind) = self.run.kinds[i].clone() else {
            return;
        };
        if let Err(e) = stage_run::finish(&env, node, kind.as_ref(), &entry) {
            let msg = match e {
                FinishError::Corrupt(m, _) => m,
                FinishError::Other(e) => e.to_string(),
            };
            self.fail(i, Some(entry.key), msg, submitted.elapsed());
            return;
        }
        if job_hit(&log, &node.name) {
            self.run.hit(i, entry);
        } else {
            self.run.ran(i, entry);
        }
    }

    fn job_failed(&mut self, i: usize, state: &str) {
        let Slot::Remote(job) = &self.run.slots[i] else {
            return;
        };
        let (id, log, submitted) = (job.id, job.log.clone(), job.submitted);
        let code = cli::exit_code(id).map_or_else(String::new, |c| format!(", exit code {c}"));
        let cause = last_error(&log).map_or_else(String::new, |e| format!(": {e}"));
        let msg = format!(
            "Slurm job {id} ended {state}{code}{cause}; job log: {}",
            log.display()
        );
        self.fail(i, None, msg, submitted.elapsed());
    }

    /// Ctrl-C or an environment error: cancel every job of the run and wait (up to 30 s)
    /// until they have ended, so that their stages have stopped before the run returns.
    pub(super) fn cancel_all_jobs(&mut self) {
        let ids = self.job_ids();
        if ids.is_empty() || cli::scancel(&ids).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match cli::squeue(&ids) {
                Ok(s) if s.values().all(|j| cli::is_terminal(&j.state)) => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(200)),
                Err(_) => return,
            }
        }
    }
}

/// The `--json` events `pipeline exec` wrote to a job log, last first, as plain JSON (the
/// log may come from a different version of the binary; only `type` and a few fields of
/// `data` are read).
fn job_events(log: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(|v| v["type"].is_string() && v["data"].is_object())
        .collect()
}

/// Whether the job found `stage` already committed (another run computed it, or an early
/// cutoff made it a hit).
fn job_hit(log: &Path, stage: &str) -> bool {
    job_events(log)
        .iter()
        .any(|e| e["type"] == "stage-cached" && e["data"]["stage"] == stage)
}

/// Why the job failed, in its own words: its last `stage-failed` error, or else the last
/// non-empty lines it printed (a crash, a recipe that no longer loads).
fn last_error(log: &Path) -> Option<String> {
    let failed = job_events(log).into_iter().find_map(|e| {
        (e["type"] == "stage-failed")
            .then(|| e["data"]["error"].as_str().map(str::to_owned))
            .flatten()
    });
    if failed.is_some() {
        return failed;
    }
    let text = std::fs::read_to_string(log).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('{'))
        .collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    (!tail.is_empty()).then(|| tail.join(" / "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_logs_are_read_for_hits_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("7.log");
        let started = r#"{"type":"run-started","data":{"experiment":"e","stages":1,"jobs":1}}"#;
        let failed = r#"{"type":"stage-failed","data":{"stage":"b","key":null,"error":"command exited with 3","elapsed_ms":5}}"#;
        std::fs::write(&log, format!("{started}\n{failed}\n")).unwrap();
        assert_eq!(last_error(&log).as_deref(), Some("command exited with 3"));
        assert!(!job_hit(&log, "b"));

        let cached = r#"{"type":"stage-cached","data":{"stage":"b","key":"00","time_saved_ms":1,"log":"x"}}"#;
        std::fs::write(&log, format!("{started}\n{cached}\n")).unwrap();
        assert!(job_hit(&log, "b"));
        assert!(!job_hit(&log, "c"));

        std::fs::write(
            &log,
            "slurmstepd: error: *** JOB 7 CANCELLED ***\n\nError: boom\n",
        )
        .unwrap();
        assert_eq!(
            last_error(&log).as_deref(),
            Some("slurmstepd: error: *** JOB 7 CANCELLED *** / Error: boom")
        );
        assert_eq!(last_error(&dir.path().join("none.log")), None);
    }
}

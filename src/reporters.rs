//! Reporters: how run events reach the user.
//!
//! - [`Json`]: every event as one JSON line on stdout (the wire format of `engine::events`).
//! - [`Human`]: cargo-style status lines on stderr (`   Running task/GQA`), `[RERUN]` /
//!   `[CASCADE]` / `[HIT]` lines with `-v` (which also prints each finished or cached stage's
//!   stored log, indented by `      | `), and indicatif bars (a run bar and one bar per
//!   stage that reports progress). Bars are drawn only when stderr is a terminal and neither
//!   `--json`, `-v` nor `--no-progress` is given; while they are drawn, status lines go
//!   through the bars so the two never garble each other.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use engine::events::{Event, Reporter};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// JSON Lines on stdout.
pub struct Json;

impl Reporter for Json {
    fn event(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe must not kill the run: the cache work matters more than output.
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        }
    }
}

/// How much a human wants to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// Status lines and bars on stderr.
pub struct Human {
    verbosity: Verbosity,
    bars: Option<Bars>,
}

struct Bars {
    multi: MultiProgress,
    run: ProgressBar,
    stages: Mutex<HashMap<String, ProgressBar>>,
}

impl Human {
    pub fn new(verbosity: Verbosity, no_progress: bool) -> Self {
        let draw =
            verbosity == Verbosity::Normal && !no_progress && std::io::stderr().is_terminal();
        let bars = draw.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let run = multi.add(ProgressBar::new(0));
            run.set_style(
                ProgressStyle::with_template(
                    "    {prefix:>7.cyan.bold} [{bar:30}] {pos}/{len} stages, {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            run.set_prefix("Running");
            Bars {
                multi,
                run,
                stages: Mutex::new(HashMap::new()),
            }
        });
        Self { verbosity, bars }
    }

    /// One status line with a right-aligned verb.
    fn status(&self, verb: &str, width: usize, rest: &str) {
        let line = format!("{verb:>width$} {rest}");
        match &self.bars {
            Some(b) => {
                let _ = b.multi.println(line);
            }
            None => {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
    }

    fn verbose(&self, line: &str) {
        if self.verbosity == Verbosity::Verbose {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }

    /// With `-v`, the stage's captured output, indented under its status line, so that a
    /// cached stage shows what it printed when it ran (as a running one does).
    fn replay_log(&self, log: &Path) {
        if self.verbosity != Verbosity::Verbose {
            return;
        }
        // A stage that printed nothing has no log file.
        let Ok(bytes) = std::fs::read(log) else {
            return;
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut err = std::io::stderr().lock();
        for line in text.lines() {
            let _ = writeln!(err, "      | {line}");
        }
    }

    fn done_stage(&self, stage: &str) {
        if let Some(b) = &self.bars {
            b.run.inc(1);
            if let Some(bar) = b.stages.lock().ok().and_then(|mut s| s.remove(stage)) {
                bar.finish_and_clear();
                b.multi.remove(&bar);
            }
        }
    }
}

/// `41.2s`, `41m 12s`, `2h 03m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h {:02}m", d.as_secs() / 3600, (d.as_secs() % 3600) / 60)
    }
}

fn ms(v: u64) -> String {
    duration(Duration::from_millis(v))
}

impl Reporter for Human {
    fn event(&self, event: &Event) {
        let normal = self.verbosity != Verbosity::Quiet;
        match event {
            Event::RunStarted { stages, .. } => {
                if let Some(b) = &self.bars {
                    b.run.set_length(*stages as u64);
                }
            }
            Event::StageStarted {
                stage,
                reasons,
                cascade,
                ..
            } => {
                let tag = if *cascade { "CASCADE" } else { "RERUN" };
                let text: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                self.verbose(&format!("[{tag}] {stage}: {}", text.join("; ")));
                if normal {
                    self.status("Running", 10, stage);
                }
            }
            Event::StageProgress {
                stage,
                done,
                total,
                message,
            } => {
                if let Some(b) = &self.bars {
                    let Ok(mut stages) = b.stages.lock() else {
                        return;
                    };
                    let bar = stages.entry(stage.clone()).or_insert_with(|| {
                        let bar = b.multi.add(ProgressBar::new(*total));
                        bar.set_style(
                            ProgressStyle::with_template(
                                "    {prefix:>7} [{bar:30}] {pos}/{len} {msg}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        bar.set_prefix(stage.clone());
                        bar
                    });
                    bar.set_length(*total);
                    bar.set_position(*done);
                    bar.set_message(message.clone());
                }
            }
            Event::StageCached {
                stage,
                time_saved_ms,
                log,
                ..
            } => {
                self.verbose(&format!("[HIT] {stage}"));
                self.replay_log(log);
                if normal {
                    self.status(
                        "Cached",
                        10,
                        &format!("{stage} (saved {})", ms(*time_saved_ms)),
                    );
                }
                self.done_stage(stage);
            }
            Event::StageFinished {
                stage,
                elapsed_ms,
                log,
                ..
            } => {
                self.replay_log(log);
                if normal {
                    self.status("Finished", 10, &format!("{stage} in {}", ms(*elapsed_ms)));
                }
                self.done_stage(stage);
            }
            Event::StageFailed { stage, error, .. } => {
                self.status("Failed", 10, &format!("{stage}: {error}"));
                self.done_stage(stage);
            }
            // Printed for people by `main`, from the same diagnostic.
            Event::Error { .. } => {}
            Event::RunFinished {
                ran,
                cached,
                failed,
                skipped,
                interrupted,
                elapsed_ms,
            } => {
                if let Some(b) = &self.bars {
                    b.run.finish_and_clear();
                    let _ = b.multi.clear();
                }
                if *interrupted {
                    self.status(
                        "Interrupted",
                        11,
                        "nothing was committed for the stages that were running",
                    );
                }
                if normal || *failed > 0 || *interrupted {
                    let total = ran + cached + failed + skipped.len();
                    let skipped = if skipped.is_empty() {
                        String::new()
                    } else {
                        format!(", {} skipped", skipped.len())
                    };
                    self.status(
                        "Summary",
                        11,
                        &format!("{total} stages: {ran} ran, {cached} cached, {failed} failed{skipped} in {}", ms(*elapsed_ms)),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_human_wrote_them() {
        assert_eq!(duration(Duration::from_millis(41_200)), "41.2s");
        assert_eq!(duration(Duration::from_secs(41 * 60 + 12)), "41m 12s");
        assert_eq!(duration(Duration::from_secs(2 * 3600 + 3 * 60)), "2h 03m");
    }
}

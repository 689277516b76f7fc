//! Slurm's command-line tools, as the executor uses them: `sbatch --parsable` to submit,
//! one `squeue --states=all` per poll for every job of the run, `scontrol show job` for a
//! failed job's exit code, `scancel` to stop jobs. Slurm has no stable library API (the C
//! API changes every release) while these commands and their output formats have been
//! stable for many releases, which is also why other workflow engines drive Slurm this way.
//! `sacct` is not used: it needs the accounting daemon, which many clusters (and the test
//! cluster) do not run.
//!
//! Everything that parses Slurm's output is a pure function, unit-tested on the text the
//! tools print.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A Slurm job id (`JobId`, not an array task).
pub(crate) type JobId = u64;

/// Why a Slurm command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The tool is not on `PATH`.
    #[error("`{tool}` is not on PATH")]
    Missing {
        /// Tool name.
        tool: &'static str,
    },
    /// The tool ran and failed (or printed something unexpected).
    #[error("`{tool}` failed: {detail}")]
    Failed {
        /// Tool name.
        tool: &'static str,
        /// Its stderr (or what was wrong with its output), trimmed.
        detail: String,
    },
}

/// The tools the executor needs; all must be present before anything is submitted.
pub(crate) const TOOLS: &[&str] = &["sbatch", "squeue", "scontrol", "scancel"];

/// Find `tool` on `PATH`.
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn run(tool: &'static str, args: &[String], stdin: Option<&[u8]>) -> Result<String, CliError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CliError::Missing { tool },
        _ => CliError::Failed {
            tool,
            detail: e.to_string(),
        },
    })?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits before reading its stdin reports why on stderr; that is the
        // error worth showing, not the broken pipe.
        let _ = pipe.write_all(bytes);
    }
    let out = child.wait_with_output().map_err(|e| CliError::Failed {
        tool,
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let detail = if err.is_empty() {
            format!("exit status {}", out.status)
        } else {
            err
        };
        Err(CliError::Failed { tool, detail })
    }
}

/// Submit `script` (given on stdin) with `args`; the job id.
pub(crate) fn sbatch(args: &[String], script: &str) -> Result<JobId, CliError> {
    let out = run("sbatch", args, Some(script.as_bytes()))?;
    parse_parsable(&out).ok_or_else(|| CliError::Failed {
        tool: "sbatch",
        detail: format!("unexpected output `{}`", out.trim()),
    })
}

/// `sbatch --parsable` prints `ID` or `ID;cluster`.
pub(crate) fn parse_parsable(out: &str) -> Option<JobId> {
    let line = out.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    line.split(';').next()?.trim().parse().ok()
}

/// One job as `squeue` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobState {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`...
    pub state: String,
    /// Why it is pending (`Dependency`, `Resources`, `None`...).
    pub reason: String,
}

/// The states of `ids`, including finished jobs still known to the controller. Jobs the
/// controller no longer knows (purged after `MinJobAge`) are absent from the map.
pub(crate) fn squeue(ids: &[JobId]) -> Result<BTreeMap<JobId, JobState>, CliError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let args = vec![
        "--noheader".to_owned(),
        "--states=all".to_owned(),
        "--format=%i|%T|%r".to_owned(),
        format!("--jobs={}", list.join(",")),
    ];
    match run("squeue", &args, None) {
        Ok(out) => Ok(parse_squeue(&out)),
        // Every id unknown: squeue exits 1 instead of printing nothing.
        Err(CliError::Failed { detail, .. }) if detail.contains("Invalid job id") => {
            Ok(BTreeMap::new())
        }
        Err(e) => Err(e),
    }
}

/// Lines of `squeue --format=%i|%T|%r`.
pub(crate) fn parse_squeue(out: &str) -> BTreeMap<JobId, JobState> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let id = f.next()?.trim().parse().ok()?;
            let state = f.next()?.trim().to_owned();
            let reason = f.next().unwrap_or("").trim().to_owned();
            Some((id, JobState { state, reason }))
        })
        .collect()
}

/// `ExitCode=status:signal` of a job, from `scontrol show job -o`; `None` if the controller
/// no longer knows the job.
pub(crate) fn exit_code(id: JobId) -> Option<String> {
    let out = run(
        "scontrol",
        &["show".into(), "job".into(), "-o".into(), id.to_string()],
        None,
    )
    .ok()?;
    field(&out, "ExitCode").map(str::to_owned)
}

/// The value of `Name=value` in `scontrol -o` output (space-separated fields).
pub(crate) fn field<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// Cancel `ids` (ignoring ones that already ended).
pub(crate) fn scancel(ids: &[JobId]) -> Result<(), CliError> {
    if ids.is_empty() {
        return Ok(());
    }
    let args: Vec<String> = ids.iter().map(ToString::to_string).collect();
    run("scancel", &args, None).map(|_| ())
}

/// Whether `state` is final: the job will not run (again) by itself.
pub(crate) fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "CANCELLED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "OUT_OF_MEMORY"
            | "BOOT_FAIL"
            | "DEADLINE"
            | "SPECIAL_EXIT"
            | "REVOKED"
    )
}

/// Pending reasons that never clear by themselves: the job would wait forever. Temporary
/// ones (`Priority`, `Resources`, `Dependency`, a partition down for maintenance, a QOS
/// limit) are left to the cluster.
pub(crate) fn is_stuck(state: &str, reason: &str) -> bool {
    state == "PENDING"
        && matches!(
            reason,
            "DependencyNeverSatisfied"
                | "PartitionConfig"
                | "BadConstraints"
                | "InvalidAccount"
                | "InvalidQOS"
                | "PartitionTimeLimit"
                | "PartitionNodeLimit"
        )
}

/// `--time` from seconds: `H:MM:SS` (rounded up to whole minutes, Slurm's granularity).
pub(crate) fn time_limit(secs: u64) -> String {
    let mins = secs.div_ceil(60).max(1);
    format!("{}:{:02}:00", mins / 60, mins % 60)
}

/// A stage or experiment name as a relative path: `/` separates directories, anything but
/// `[A-Za-z0-9._,=+-]` becomes `_` (`%` would be a `--output` pattern), and `.`/`..`
/// components are renamed so the path stays below its root.
pub(crate) fn path_safe(name: &str) -> PathBuf {
    let mut p = PathBuf::new();
    for part in name.split('/') {
        let clean: String = part
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._,=+-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        p.push(match clean.as_str() {
            "" | "." | ".." => clean.replace('.', "_") + "_",
            _ => clean,
        });
    }
    p
}

/// Quote a word for `sh` (always, so the script reads the same for every path).
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsable_output_with_and_without_cluster() {
        assert_eq!(parse_parsable("122\n"), Some(122));
        assert_eq!(parse_parsable("7;localci\n"), Some(7));
        assert_eq!(parse_parsable("sbatch: warning: x\n15\n"), Some(15));
        assert_eq!(parse_parsable("Submitted batch job 3\n"), None);
        assert_eq!(parse_parsable(""), None);
    }

    #[test]
    fn squeue_lines() {
        let m = parse_squeue("12|PENDING|Dependency\n13|RUNNING|None\n14|COMPLETED|None\n\n");
        assert_eq!(m.len(), 3);
        assert_eq!(m[&12].state, "PENDING");
        assert_eq!(m[&12].reason, "Dependency");
        assert_eq!(m[&14].state, "COMPLETED");
        assert!(parse_squeue("garbage\n").is_empty());
    }

    #[test]
    fn scontrol_fields() {
        let line = "JobId=126 JobName=F UserId=root(0) JobState=FAILED Reason=NonZeroExitCode \
                    Dependency=(null) ExitCode=3:0 RunTime=00:00:01";
        assert_eq!(field(line, "ExitCode"), Some("3:0"));
        assert_eq!(field(line, "JobState"), Some("FAILED"));
        assert_eq!(field(line, "Job"), None);
        assert_eq!(field(line, "Missing"), None);
    }

    #[test]
    fn states() {
        assert!(is_terminal("TIMEOUT"));
        assert!(!is_terminal("RUNNING"));
        assert!(!is_terminal("COMPLETING"));
        assert!(is_stuck("PENDING", "DependencyNeverSatisfied"));
        assert!(!is_stuck("PENDING", "Resources"));
        assert!(!is_stuck("RUNNING", "DependencyNeverSatisfied"));
    }

    #[test]
    fn time_limits_round_up_to_minutes() {
        assert_eq!(time_limit(1), "0:01:00");
        assert_eq!(time_limit(60), "0:01:00");
        assert_eq!(time_limit(61), "0:02:00");
        assert_eq!(time_limit(3600), "1:00:00");
        assert_eq!(time_limit(90_000), "25:00:00");
    }

    #[test]
    fn names_become_safe_relative_paths() {
        assert_eq!(path_safe("task/GQA"), PathBuf::from("task/GQA"));
        assert_eq!(
            path_safe("sweep/method=lora,lr=0.0001"),
            PathBuf::from("sweep/method=lora,lr=0.0001")
        );
        assert_eq!(path_safe("a%j b"), PathBuf::from("a_j_b"));
        assert_eq!(path_safe("../x"), PathBuf::from("___/x"));
        assert!(
            path_safe("a/../../b")
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}

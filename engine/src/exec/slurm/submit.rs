//! Submitting stages: the checks before the first job, the `sbatch` options of a stage
//! and the batch script that runs `pipeline exec` on the node.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cache::{Cache, Key};

use super::cli;
use super::{Scheduler, SlurmJob, SlurmOptions, slurm_error};
use crate::events::Event;
use crate::exec::run_state::Slot;
use crate::exec::{ExecError, RunOptions};
use crate::key::RerunReason;

/// Paths every job is given, absolute so that the job's working directory does not matter.
pub(super) struct Paths {
    program: PathBuf,
    recipe: PathBuf,
    cache: PathBuf,
    runs: Option<PathBuf>,
    cwd: PathBuf,
}

pub(super) fn check_tools() -> Result<(), ExecError> {
    let missing: Vec<&str> = cli::TOOLS
        .iter()
        .copied()
        .filter(|t| cli::which(t).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing.iter().map(|t| format!("`{t}`")).collect();
    Err(slurm_error(
        format!(
            "the Slurm executor needs {}, which {} not on PATH",
            list.join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        ),
        "run on a machine with Slurm's client tools (a login node), or use `--executor local`",
    ))
}

pub(super) fn absolute_paths(
    cache: &Cache,
    opts: &RunOptions,
    slurm: &SlurmOptions,
) -> Result<Paths, ExecError> {
    let abs = |p: &Path| {
        std::path::absolute(p).map_err(|e| {
            slurm_error(
                format!("cannot make `{}` absolute for the jobs: {e}", p.display()),
                "run from an existing working directory",
            )
        })
    };
    Ok(Paths {
        program: abs(&slurm.program)?,
        recipe: abs(&slurm.recipe)?,
        cache: abs(cache.root())?,
        runs: opts.runs_dir.as_deref().map(abs).transpose()?,
        cwd: abs(Path::new("."))?,
    })
}

impl Scheduler<'_> {
    /// `sbatch` stage `i`, depending on its upstream stages' jobs.
    pub(super) fn submit(
        &mut self,
        i: usize,
        key: Option<(Key, Vec<RerunReason>)>,
    ) -> Result<(), ExecError> {
        let node = &self.run.recipe.stages[i];
        let deps: Vec<String> = self.run.upstream[i]
            .iter()
            .filter_map(|&u| match &self.run.slots[u] {
                Slot::Remote(j) => Some(j.id.to_string()),
                _ => None,
            })
            .collect();
        let log_dir = self
            .paths
            .cache
            .join("slurm")
            .join(cli::path_safe(&self.run.recipe.experiment))
            .join(cli::path_safe(&node.name));
        std::fs::create_dir_all(&log_dir).map_err(|e| {
            slurm_error(
                format!(
                    "cannot create the job log directory `{}`: {e}",
                    log_dir.display()
                ),
                "the cache directory must be writable",
            )
        })?;
        let r = node.resources;
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name={}:{}", self.run.recipe.experiment, node.name),
            format!("--output={}/%j.log", log_dir.display()),
            format!("--chdir={}", self.paths.cwd.display()),
            "--kill-on-invalid-dep=yes".to_owned(),
            format!("--cpus-per-task={}", r.cpus.max(1)),
            format!("--mem={}M", r.memory_mb.max(1)),
        ];
        if r.gpus > 0 {
            args.push(format!("--gres=gpu:{}", r.gpus));
        }
        if r.time_s > 0 {
            args.push(format!("--time={}", cli::time_limit(r.time_s)));
        }
        if let Some(p) = &self.slurm.partition {
            args.push(format!("--partition={p}"));
        }
        if let Some(a) = &self.slurm.account {
            args.push(format!("--account={a}"));
        }
        if !deps.is_empty() {
            args.push(format!("--dependency=afterok:{}", deps.join(":")));
        }
        args.extend(self.slurm.sbatch_args.iter().cloned());
        let script = self.script(&node.name);
        let id = cli::sbatch(&args, &script).map_err(|e| {
            slurm_error(
                format!("cannot submit stage `{}`: {e}", node.name),
                "check the cluster with `sinfo` and the options (`--slurm-partition`, \
                 `--slurm-account`, `--sbatch-arg`, the stage's `resources`); \
                 rerunning resumes where this run stopped",
            )
        })?;
        self.run.reporter.event(&Event::StageProgress {
            stage: node.name.clone(),
            done: 0,
            total: 0,
            message: format!("Slurm job {id} submitted"),
        });
        self.run.slots[i] = Slot::Remote(Box::new(SlurmJob {
            id,
            log: log_dir.join(format!("{id}.log")),
            key,
            announced: false,
            shown: String::new(),
            submitted: Instant::now(),
        }));
        Ok(())
    }

    /// The batch script of a stage's job: the keyed environment exactly as the driver saw it
    /// (so the node computes the same keys whatever `--export` says), then `pipeline exec`.
    fn script(&self, stage: &str) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "#!/bin/sh\n# pipeline: stage {stage} of experiment {}\n",
            self.run.recipe.experiment
        );
        for var in crate::env_vars::KEYED {
            match self.run.opts.env.env.get(*var) {
                Some(v) => {
                    let _ = writeln!(s, "export {var}={}", cli::sh_quote(v));
                }
                None => {
                    let _ = writeln!(s, "unset {var}");
                }
            }
        }
        let q = |p: &Path| cli::sh_quote(&p.to_string_lossy());
        let _ = write!(
            s,
            "exec {} --json --no-progress --cache-dir {}",
            q(&self.paths.program),
            q(&self.paths.cache)
        );
        if let Some(runs) = &self.paths.runs {
            let _ = write!(s, " --runs-dir {}", q(runs));
        }
        let _ = write!(
            s,
            " exec {} {}",
            q(&self.paths.recipe),
            cli::sh_quote(stage)
        );
        for o in &self.slurm.overrides {
            let _ = write!(s, " --set {}", cli::sh_quote(o));
        }
        s.push('\n');
        s
    }
}

//! `pipeline run`: run a recipe (or a selection of it) on this machine.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine::events::Reporter;
use engine::exec::{self, KeyEnv, RunOptions};
use engine::graph::Graph;
use engine::recipe::Recipe;
use engine::stage::Registry;

use super::{CmdResult, Failure, exit, load, open_cache, registry, runs_dir};
use crate::cli::{ExecutorChoice, GlobalArgs, RunArgs};
use crate::reporters::{Human, Json, Verbosity};

pub fn run(g: &GlobalArgs, args: &RunArgs) -> CmdResult {
    let registry = registry();
    let recipe = load(&args.recipe.recipe, &args.recipe.set, &registry)?;
    if args.executor == ExecutorChoice::Slurm {
        return Err(slurm_unavailable());
    }
    let graph = Graph::new(&recipe);
    let selected = if args.only.is_empty() && args.from.is_empty() && args.until.is_empty() {
        None
    } else {
        Some(
            graph
                .select(&args.only, &args.from, &args.until)
                .map_err(Failure::usage)?
                .into_iter()
                .collect(),
        )
    };
    let mut force = BTreeSet::new();
    for name in &args.force {
        force.extend(graph.matching("force", name).map_err(Failure::usage)?);
    }
    let jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        |j| j as usize,
    );
    let mut opts = RunOptions::new(jobs);
    opts.selected = selected;
    opts.force = force;
    execute(g, &recipe, &registry, opts)
}

/// Run with the reporters and Ctrl-C handling of the command line; shared with `exec`.
pub fn execute(
    g: &GlobalArgs,
    recipe: &Recipe,
    registry: &Registry,
    mut opts: RunOptions,
) -> CmdResult {
    let cache = open_cache(g)?;
    opts.env = KeyEnv {
        env: engine::env_vars::keyed_env(),
    };
    opts.runs_dir = Some(runs_dir(g));
    opts.cancel = cancel_flag();
    let reporter: Box<dyn Reporter> = if g.json {
        Box::new(Json)
    } else {
        let verbosity = if g.quiet {
            Verbosity::Quiet
        } else if g.verbose > 0 {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        };
        Box::new(Human::new(verbosity, g.no_progress))
    };
    let summary = exec::run(recipe, registry, &cache, reporter.as_ref(), &opts)
        .map_err(Failure::environment)?;
    if let Err(e) = cache.save_stat_cache() {
        // Only a speed-up is lost; the results are committed.
        #[allow(clippy::print_stderr)]
        {
            eprintln!("warning: cannot save the stat cache: {e}");
        }
    }
    Ok(match summary.exit_code() {
        0 => 0,
        130 => exit::INTERRUPTED,
        _ => exit::STAGE_FAILED,
    })
}

/// The first Ctrl-C asks running stages to stop (shell children are killed, nothing is
/// committed); a second one exits at once.
fn cancel_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(i32::from(exit::INTERRUPTED));
        }
    });
    flag
}

fn slurm_unavailable() -> Failure {
    let has_sbatch = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("sbatch").is_file()));
    let report = if has_sbatch {
        miette::miette!(
            help = "run with `--executor local`, or submit `pipeline exec <recipe> <stage>` jobs yourself",
            "the Slurm executor is not part of this build"
        )
    } else {
        miette::miette!(
            help = "install Slurm's client tools, or run with `--executor local`",
            "`--executor slurm` needs `sbatch`, which is not on PATH"
        )
    };
    Failure::environment(report)
}

//! `pipeline run`: run a recipe (or a selection of it) on this machine, or its stages as
//! Slurm jobs (`--executor slurm`, or stages with `executor = "slurm"`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine::events::Reporter;
use engine::exec::slurm::SlurmOptions;
use engine::exec::{self, KeyEnv, RunOptions};
use engine::graph::Graph;
use engine::recipe::Recipe;
use engine::stage::Registry;

use super::{CmdResult, Failure, exit, load_cached, open_cache, registry, runs_dir};
use crate::cli::{ExecutorChoice, GlobalArgs, RunArgs};
use crate::reporters::{Human, Json, Verbosity};

pub fn run(g: &GlobalArgs, args: &RunArgs) -> CmdResult {
    let registry = registry();
    let recipe = load_cached(g, &args.recipe.recipe, &args.recipe.set, &registry)?;
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
    let slurm = slurm_options(args, &recipe, selected.as_ref())?;
    opts.selected = selected;
    opts.force = force;
    execute_on(g, &recipe, &registry, opts, slurm.as_ref())
}

/// The Slurm options when any selected stage runs on Slurm (`--executor slurm`, or the
/// stage's `executor` key without `--executor`); `None` runs everything locally.
fn slurm_options(
    args: &RunArgs,
    recipe: &Recipe,
    selected: Option<&BTreeSet<usize>>,
) -> Result<Option<SlurmOptions>, Failure> {
    let choice = args.executor.map(|e| match e {
        ExecutorChoice::Local => "local",
        ExecutorChoice::Slurm => "slurm",
    });
    let on_slurm = exec::slurm::on_slurm(recipe, choice);
    let any = on_slurm
        .iter()
        .enumerate()
        .any(|(i, &s)| s && selected.is_none_or(|sel| sel.contains(&i)));
    if !any {
        return Ok(None);
    }
    // Jobs run this very binary, so that the nodes compute keys with the same code.
    let program = std::env::current_exe().map_err(|e| {
        Failure::environment(miette::miette!(
            "cannot find the path of the running `pipeline` binary for the Slurm jobs: {e}"
        ))
    })?;
    let mut slurm = SlurmOptions::new(program, args.recipe.recipe.clone(), recipe);
    slurm.on_slurm = on_slurm;
    slurm.overrides.clone_from(&args.recipe.set);
    slurm.partition.clone_from(&args.slurm.slurm_partition);
    slurm.account.clone_from(&args.slurm.slurm_account);
    slurm.sbatch_args.clone_from(&args.slurm.sbatch_arg);
    Ok(Some(slurm))
}

/// Run with the reporters and Ctrl-C handling of the command line; shared with `exec`.
pub fn execute(
    g: &GlobalArgs,
    recipe: &Recipe,
    registry: &Registry,
    opts: RunOptions,
) -> CmdResult {
    execute_on(g, recipe, registry, opts, None)
}

/// [`execute`] with the stages marked in `slurm` submitted as Slurm jobs.
fn execute_on(
    g: &GlobalArgs,
    recipe: &Recipe,
    registry: &Registry,
    mut opts: RunOptions,
    slurm: Option<&SlurmOptions>,
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
    let summary = match slurm {
        Some(slurm) => exec::slurm::run(recipe, registry, &cache, reporter.as_ref(), &opts, slurm),
        None => exec::run(recipe, registry, &cache, reporter.as_ref(), &opts),
    }
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

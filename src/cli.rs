//! The command line (clap derive). Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run multimodal-LLM research experiments from TOML recipes, caching every stage.
#[derive(Debug, Parser)]
#[command(name = "pipeline", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Cache directory [default: `.pipeline` in the current directory].
    #[arg(long, global = true, env = "PIPELINE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Where `runs/<experiment>/<stage>/` links go [default: `runs` in the current directory].
    #[arg(long, global = true, env = "PIPELINE_RUNS_DIR", value_name = "DIR")]
    pub runs_dir: Option<PathBuf>,
    /// Print JSON Lines events on stdout instead of status lines.
    #[arg(long, global = true)]
    pub json: bool,
    /// Explain every stage: `[RERUN]`, `[CASCADE]` and `[HIT]` lines (hides progress bars).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a recipe: compute every stage that is not cached, reuse the rest.
    Run(RunArgs),
    /// Show what a run would do for every stage (hit, run or maybe) and why.
    Plan(RecipeArgs),
    /// Show every difference between a stage and its last committed run.
    Explain(StageArgs),
    /// Print the stage graph.
    Dag(DagArgs),
    /// Run exactly one stage (its inputs must be cached) and commit it; used by Slurm jobs.
    Exec(StageArgs),
    /// List the stage kinds with their parameters, defaults and documentation.
    Kinds,
    /// Remove cache entries the given recipes no longer reference.
    Gc(GcArgs),
    /// Run or benchmark the LLaVA model directly (parity checks, benchmarks).
    #[cfg(feature = "ml")]
    Model(crate::model_cmd::ModelArgs),
}

/// A recipe and its overrides.
#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// Override a recipe value: `--set asd.x=40`, `--set experiment.seed=3`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Run only these stages (their inputs must be cached).
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// Run these stages and everything downstream of them.
    #[arg(long, value_name = "STAGE")]
    pub from: Vec<String>,
    /// Run these stages and everything they depend on.
    #[arg(long, value_name = "STAGE")]
    pub until: Vec<String>,
    /// Recompute these stages even if they are cached.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Stages running at once [default: the number of available cores].
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    /// Where stages run, for every stage [default: each stage's `executor`, else local].
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorChoice>,
    #[command(flatten)]
    pub slurm: SlurmArgs,
}

/// How stages are submitted to Slurm (`--executor slurm`, or `executor = "slurm"` stages).
#[derive(Debug, Args)]
#[command(next_help_heading = "Slurm")]
pub struct SlurmArgs {
    /// Partition of every job (`sbatch --partition`).
    #[arg(long, env = "PIPELINE_SLURM_PARTITION", value_name = "NAME")]
    pub slurm_partition: Option<String>,
    /// Account charged for every job (`sbatch --account`).
    #[arg(long, env = "PIPELINE_SLURM_ACCOUNT", value_name = "NAME")]
    pub slurm_account: Option<String>,
    /// One more `sbatch` option for every job, e.g. `--sbatch-arg=--qos=high` (repeatable).
    #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch_arg: Vec<String>,
}

/// Executors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorChoice {
    /// This machine.
    Local,
    /// A Slurm cluster (`sbatch`).
    Slurm,
}

/// A recipe and one stage of it.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// The stage (full name, e.g. `task/GQA`).
    pub stage: String,
    /// Override a recipe value: `--set asd.x=40`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
}

/// `dag`.
#[derive(Debug, Args)]
pub struct DagArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DagFormat::Dot)]
    pub format: DagFormat,
}

/// Graph formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DagFormat {
    /// Graphviz.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// `gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Recipes whose stages to keep (their current keys and last committed keys).
    #[arg(required = true)]
    pub recipes: Vec<PathBuf>,
    /// Say what would be removed without removing anything.
    #[arg(long)]
    pub dry_run: bool,
}

//! One module per subcommand, plus what they share: loading a recipe, opening the cache,
//! and the error type that carries an exit code.

mod dag;
mod exec;
mod explain;
mod gc;
mod kinds;
mod plan;
mod run;

use std::path::{Path, PathBuf};

use cache::Cache;
use engine::events::{Event, Reporter as _};
use engine::recipe::{self, Recipe};
use engine::stage::Registry;

use crate::cli::{Cli, Command, GlobalArgs};

/// Exit codes.
pub mod exit {
    /// A stage failed.
    pub const STAGE_FAILED: u8 = 1;
    /// Invalid recipe or usage.
    pub const USAGE: u8 = 2;
    /// Environment error (unwritable cache, missing `sbatch`).
    pub const ENVIRONMENT: u8 = 3;
    /// Interrupted (Ctrl-C).
    pub const INTERRUPTED: u8 = 130;
}

/// An error that ends the command with `code`.
pub struct Failure {
    pub code: u8,
    pub report: miette::Report,
}

impl Failure {
    pub fn usage(report: impl Into<miette::Report>) -> Self {
        Self {
            code: exit::USAGE,
            report: report.into(),
        }
    }

    pub fn environment(report: impl Into<miette::Report>) -> Self {
        Self {
            code: exit::ENVIRONMENT,
            report: report.into(),
        }
    }
}

pub type CmdResult = Result<u8, Failure>;

pub fn dispatch(cli: Cli) -> CmdResult {
    let g = &cli.global;
    let result = dispatch_command(g, cli.command);
    if g.json
        && let Err(failure) = &result
    {
        // Tools reading `--json` get the error on stdout too; people keep it on stderr.
        crate::reporters::Json.event(&error_event(failure));
    }
    result
}

fn dispatch_command(g: &GlobalArgs, command: Command) -> CmdResult {
    match command {
        Command::Run(args) => run::run(g, &args),
        Command::Plan(args) => plan::plan(g, &args),
        Command::Explain(args) => explain::explain(g, &args),
        Command::Dag(args) => dag::dag(g, &args),
        Command::Exec(args) => exec::exec(g, &args),
        Command::Kinds => kinds::kinds(g),
        Command::Gc(args) => gc::gc(g, &args),
        #[cfg(feature = "ml")]
        Command::Model(args) => crate::model_cmd::run(args)
            .map(|()| 0)
            .map_err(|e| Failure {
                code: exit::STAGE_FAILED,
                report: miette::miette!("{e:#}"),
            }),
    }
}

/// Every kind this build knows: the engine's own (`shell`) and, with the `ml` feature, the
/// stage kinds of the `stages` crate once it exports them.
pub fn registry() -> Registry {
    #[allow(unused_mut)]
    let mut registry = engine::builtin_registry();
    #[cfg(feature = "ml")]
    stages::register_all(&mut registry);
    registry
}

pub fn load(path: &Path, sets: &[String], registry: &Registry) -> Result<Recipe, Failure> {
    recipe::load(path, sets, registry).map_err(Failure::usage)
}

/// [`load`] through the resolved-recipe cache in `<cache>/v1/recipes/`
/// ([`recipe::load_memo`]): for the commands that use the cache anyway, so that `dag`
/// never creates a cache directory.
pub fn load_cached(
    g: &GlobalArgs,
    path: &Path,
    sets: &[String],
    registry: &Registry,
) -> Result<Recipe, Failure> {
    let dir = cache_dir(g).join(cache::LAYOUT_VERSION).join("recipes");
    recipe::load_memo(path, sets, registry, &dir).map_err(Failure::usage)
}

pub fn cache_dir(g: &GlobalArgs) -> PathBuf {
    g.cache_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".pipeline"))
}

pub fn runs_dir(g: &GlobalArgs) -> PathBuf {
    g.runs_dir.clone().unwrap_or_else(|| PathBuf::from("runs"))
}

pub fn open_cache(g: &GlobalArgs) -> Result<Cache, Failure> {
    let dir = cache_dir(g);
    Cache::open(&dir).map_err(|source| Failure::environment(CacheUnusable { dir, source }))
}

/// The cache directory cannot be opened. The cache's error and its OS cause (`Not a
/// directory`, `Read-only file system`) are the source chain, rendered below the message.
#[derive(Debug, miette::Diagnostic)]
#[diagnostic(
    code(pipeline::cache::unusable),
    help("pass a writable directory with `--cache-dir` or `PIPELINE_CACHE_DIR`")
)]
pub struct CacheUnusable {
    dir: PathBuf,
    source: cache::Error,
}

impl std::fmt::Display for CacheUnusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot use the cache directory `{}`", self.dir.display())
    }
}

impl std::error::Error for CacheUnusable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The `--json` form of a failure: an `error` event (see `engine::events`).
pub fn error_event(failure: &Failure) -> Event {
    let mut rendered = String::new();
    let diagnostic: &dyn miette::Diagnostic = failure.report.as_ref();
    let json = miette::JSONReportHandler::new()
        .render_report(&mut rendered, diagnostic)
        .ok()
        .and_then(|()| serde_json::from_str::<serde_json::Value>(&rendered).ok())
        .unwrap_or(serde_json::Value::Null);
    let mut causes = Vec::new();
    let mut cause = diagnostic.source();
    while let Some(c) = cause {
        causes.push(c.to_string());
        cause = c.source();
    }
    Event::Error {
        exit_code: failure.code,
        message: failure.report.to_string(),
        causes,
        help: diagnostic.help().map(|h| h.to_string()),
        diagnostic: json,
    }
}

/// The index of a stage named on the command line, with a did-you-mean.
pub fn stage_index(recipe: &Recipe, name: &str) -> Result<usize, Failure> {
    recipe.index_of(name).ok_or_else(|| {
        let best = recipe
            .stages
            .iter()
            .map(|s| (strsim::jaro_winkler(&s.name, name), &s.name))
            .filter(|(score, _)| *score > 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| n.clone());
        let help = best.map_or_else(
            || "`pipeline plan <recipe>` lists the stages".to_owned(),
            |b| format!("did you mean `{b}`?"),
        );
        Failure::usage(miette::miette!(
            help = help,
            "no stage `{name}` in this recipe"
        ))
    })
}

/// Write to stdout, ignoring a closed pipe (`pipeline plan x | head` must not fail).
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

//! Recipes: TOML experiment descriptions, validated and expanded into a list of stages.
//!
//! [`load`] turns a recipe file (plus `--set` overrides) into a [`Recipe`]: concrete stages
//! in topological order, each with canonical parameters, resolved inputs and external
//! files. Nothing runs here; the graph, keys and executors work from the result.
//!
//! ## Language
//! ```toml
//! [experiment]
//! name = "sefe_coin"        # default: the file stem
//! seed = 1234               # default: 0
//! extends = "base.toml"     # inherit, overriding key by key (see `load.rs`)
//! include = ["evals.toml"]  # add stages and vars; redefining one is an error
//!
//! [vars]
//! tasks = ["ScienceQA", "GQA"]
//! methods = ["lora", "sefe"]
//!
//! [stages.task]
//! kind = "train.lora"       # every key but the reserved ones is a parameter of the kind
//! foreach = "tasks"         # or an inline list: stages task/ScienceQA, task/GQA
//! chain = "base"            # task/GQA gets base = "@task/ScienceQA" (`chain = true`: `prev`)
//! base = "@base"
//! data = "@asd/{item}"      # `{item}`, `{index}` (and matrix dimensions) are substituted
//! resources = { cpus = 2, memory_mb = 4096, gpus = 0, time_s = 3600 }
//! executor = "slurm"        # or "local"
//! after = ["prepare"]       # ordering without data
//!
//! [stages.sweep]
//! kind = "train.lora"
//! matrix = { method = "methods", lr = [1e-4, 2e-4] }   # sweep/method=lora,lr=0.0001 ...
//!
//! [stages.cl]               # a sweep x a chain: the chain runs along the last dimension
//! kind = "train.lora"
//! matrix = { lam = [0.0, 2500.0], task = "tasks" }     # cl/lam=2500,task=GQA ...
//! chain = { base = "merged" }  # cl/lam=0,task=GQA gets base = "@merged/lam=0,task=ScienceQA"
//!
//! [stages.metrics]
//! kind = "eval.cl-metrics"
//! matrix = { lam = [0.0, 2500.0] }
//! evals = "@eval/lam={lam},task=*"   # a glob gather: this `lam`'s evals, in order
//! ```
//! A matrix dimension named like a parameter of the kind sets it (typed); any dimension can
//! be substituted as `{method}` (floats render short: `2500.0` is `2500`). `chain` links
//! element `i` to element `i-1` of the same stage (`true`, `"param"`) or of other stages
//! expanded the same way (a table param -> stage; see `chain.rs`). References: `@stage`,
//! `@stage.output`, `@stage/item`, `@stage/item.output`, and the gather `@stage/<pattern>`
//! whose `*` matches any run of characters (`@stage/*`: all expansions; in expansion order,
//! optionally `.output`). `--set` overrides are described in `overrides.rs`.
//!
//! ## Phases
//! 1. `load`: parse the file and everything it `extends`/`include`s into one spanned document
//!    (`value.rs` keeps a source + byte span on every value; `parse.rs` parses a long file in
//!    parallel pieces).
//! 2. `overrides`: apply `--set path=value` (the command line is a source of its own).
//! 3. `expand`: per stage, look up the kind, expand `foreach`/`matrix` into concrete stages
//!    (`task/GQA`, `sweep/method=lora,lr=0.0001`), substitute `{item}`/`{index}`/`{<dim>}`,
//!    wire `chain`, type-check every parameter against the kind's schema and fill defaults.
//! 4. `resolve`: resolve references (`@stage`, `@stage/item`, `@stage.output`,
//!    `@stage/item.output`, `@stage/<glob>`) by name through hash maps (a 10,000-stage recipe
//!    loads in milliseconds), check output types, order stages topologically (declaration
//!    order breaks ties, so the order is stable) and report cycles.
//!
//! ## Sharing
//! Only a stage that declares `foreach` or `matrix` is multiplied. A reference is resolved
//! per expansion after substitution, so `data = "@coin"` in every element of a sweep names the
//! one `coin` stage, while `data = "@asd/{item}"` names a different element each time.
//! A bare `@task` to an expanded stage is ambiguous and rejected, with a hint to write
//! `@task/{item}` or `@task/*`.
//!
//! ## Errors
//! Every phase keeps going after a problem, so [`RecipeError`] lists all of them at once,
//! each pointing at its file, line and column (see `error.rs` for the codes).

mod chain;
mod error;
mod expand;
mod experiment;
mod items;
mod load;
mod memo;
mod overrides;
mod params;
mod parse;
mod reserved;
mod resolve;
mod template;
mod value;

use std::path::{Path, PathBuf};

pub use error::{Problem, RecipeError};
pub use memo::load_memo;

use crate::stage::{OutputSpec, Registry, Resources};
use error::{Diags, Sources};
use value::Loc;

/// A loaded, validated and expanded recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Experiment name (`[experiment] name`, default: the file stem).
    pub experiment: String,
    /// Experiment seed (`[experiment] seed`, default 0).
    pub seed: u64,
    /// The directory of the recipe file; relative paths resolve here.
    pub dir: PathBuf,
    /// Every file read: the recipe first, then the files it extends or includes.
    pub files: Vec<PathBuf>,
    /// The concrete stages in topological order (every input's stage comes first).
    pub stages: Vec<StageNode>,
}

impl Recipe {
    /// The index of the stage named `name` (exact expansion name, e.g. `task/GQA`).
    #[must_use]
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }
}

/// One concrete stage after expansion.
#[derive(Debug, Clone)]
pub struct StageNode {
    /// Full name: `coin`, `task/GQA`, `sweep/method=lora,lr=0.0001`.
    pub name: String,
    /// The name of the recipe table it came from (`task` for `task/GQA`; equal to `name`
    /// for a stage without `foreach`/`matrix`).
    pub base: String,
    /// The kind (`train.lora`).
    pub kind: String,
    /// Canonical parameters: a JSON object with every schema parameter (defaults filled),
    /// integers widened for `Float` parameters, `{item}` substituted. References stay strings
    /// but fully qualified (`"@task/GQA"`, `"@coin.test"`); a gather (`"@eval/*"`) becomes the
    /// list of its members (`["@eval/A", "@eval/B"]`), spliced into the list if it was one
    /// element of a list parameter.
    pub params: serde_json::Value,
    /// Inputs: one per referenced artifact, in parameter order.
    pub inputs: Vec<Input>,
    /// External files and directories named by `Path` (and `RefOrPath`) parameters.
    pub externals: Vec<External>,
    /// Resources: the kind's defaults overridden by the stage's `resources` table.
    pub resources: Resources,
    /// `executor = "local" | "slurm"`, if the stage chose one.
    pub executor: Option<String>,
    /// Explicit ordering edges (`after = [...]`), as indices into [`Recipe::stages`].
    pub after: Vec<usize>,
    /// The kind's outputs for these parameters (the first is the default output).
    pub outputs: Vec<OutputSpec>,
}

/// One resolved reference: parameter `param` reads output `output` of stage `stage`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Input {
    /// The parameter holding the reference.
    pub param: String,
    /// Index into [`Recipe::stages`].
    pub stage: usize,
    /// The output name (the default output's name when the reference named none).
    pub output: String,
    /// Index of this input among the parameter's inputs (list and gather order).
    pub position: usize,
}

/// One external path named by a parameter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct External {
    /// The parameter naming it.
    pub param: String,
    /// The path as written (after `{item}` substitution), relative to [`Recipe::dir`].
    pub path: PathBuf,
}

/// Load, validate and expand the recipe at `path`.
///
/// `overrides` are `--set` arguments (`stages.asd.x=40`, `asd.x=40`, `experiment.seed=3`,
/// `vars.tasks=["A"]`), applied before validation. Kinds come from `registry`.
///
/// # Errors
/// A [`RecipeError`] listing every problem found (syntax, unknown kinds or parameters, type
/// mismatches, dangling references, cycles, bad overrides...), each with its source span.
pub fn load(path: &Path, overrides: &[String], registry: &Registry) -> Result<Recipe, RecipeError> {
    load_with_digests(path, overrides, registry).map(|(recipe, _)| recipe)
}

/// [`load`], with the blake3 digest of each file in [`Recipe::files`] as the load read it.
fn load_with_digests(
    path: &Path,
    overrides: &[String],
    registry: &Registry,
) -> Result<(Recipe, Vec<[u8; 32]>), RecipeError> {
    let mut ctx = Ctx::default();
    let display = path.display().to_string();
    let Some(mut doc) = load::load_root(path, &mut ctx) else {
        return Err(ctx.diags.into_error(display));
    };
    overrides::apply(&mut doc, overrides, &mut ctx);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (experiment, seed) = experiment::experiment(&doc, &stem, &mut ctx);
    let expanded = expand::expand(&doc, registry, &mut ctx);
    // The document is not needed past expansion. Freeing a large one is thousands of small
    // `free`s: done on another thread while resolution goes on.
    if doc.stages.len() >= FREE_ASIDE {
        rayon::spawn(move || drop(doc));
    } else {
        drop(doc);
    }
    let stages = resolve::resolve(expanded, &mut ctx);
    if !ctx.diags.is_empty() {
        return Err(ctx.diags.into_error(display));
    }
    let recipe = Recipe {
        experiment,
        seed,
        // A bare file name (`pipeline run demo.toml`) has the empty path as parent, and
        // `sh -c` cannot be started in "": that is the current directory.
        dir: match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
        files: ctx.files,
        stages,
    };
    Ok((recipe, ctx.digests))
}

/// Documents with at least this many stage tables are freed on a rayon thread.
const FREE_ASIDE: usize = 512;

/// Shared state of one load: the sources read so far, the problems found, the files read.
#[derive(Default)]
pub(crate) struct Ctx {
    sources: Sources,
    diags: Diags,
    files: Vec<PathBuf>,
    /// The blake3 digest of each file of `files`, of the text that was parsed.
    digests: Vec<[u8; 32]>,
    /// Parameter schemas by kind, built once per kind.
    specs: std::collections::HashMap<&'static str, std::sync::Arc<Vec<crate::stage::ParamSpec>>>,
    /// `--set <stage>/<expansion>.<param>=v`: overrides of one expansion, applied when that
    /// element is built ([`overrides::ElementSet`]).
    element_sets: Vec<overrides::ElementSet>,
}

impl Ctx {
    /// Report a problem with one label; `short` is the code without its prefix.
    pub(crate) fn err(
        &mut self,
        short: &str,
        loc: Loc,
        label: &str,
        message: String,
        help: Option<String>,
    ) {
        self.diags
            .at(&self.sources, code(short), loc, label, message, help);
    }
}

/// The full stable code for a short name.
pub(crate) fn code(short: &str) -> &'static str {
    macro_rules! codes {
        ($($name:literal),* $(,)?) => {
            match short {
                $($name => concat!("pipeline::recipe::", $name),)*
                _ => "pipeline::recipe::internal",
            }
        };
    }
    codes!(
        "toml_syntax",
        "missing_file",
        "extends_cycle",
        "unknown_key",
        "bad_value",
        "bad_name",
        "unknown_kind",
        "unknown_param",
        "mistyped_param",
        "missing_param",
        "unknown_var",
        "missing_stage",
        "missing_output",
        "output_type",
        "ambiguous_ref",
        "duplicate_stage",
        "duplicate_var",
        "cycle",
        "bad_set",
        "chain_mismatch",
    )
}

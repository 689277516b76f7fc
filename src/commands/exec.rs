//! `pipeline exec`: run exactly one stage whose inputs are cached, and commit it. A Slurm
//! job runs this for its stage; the shared cache makes the result visible to everyone.

use engine::exec::RunOptions;

use super::run::execute;
use super::{CmdResult, load_cached, registry, stage_index};
use crate::cli::{GlobalArgs, StageArgs};

pub fn exec(g: &GlobalArgs, args: &StageArgs) -> CmdResult {
    let registry = registry();
    let recipe = load_cached(g, &args.recipe, &args.set, &registry)?;
    let idx = stage_index(&recipe, &args.stage)?;
    let mut opts = RunOptions::new(1);
    opts.selected = Some([idx].into());
    execute(g, &recipe, &registry, opts)
}

//! `pipeline explain`: every difference between a stage and its last committed run.

use std::fmt::Write as _;

use engine::exec::KeyEnv;
use engine::plan::Status;

use super::{CmdResult, load_cached, open_cache, out, registry, stage_index};
use crate::cli::{GlobalArgs, StageArgs};

pub fn explain(g: &GlobalArgs, args: &StageArgs) -> CmdResult {
    let registry = registry();
    let recipe = load_cached(g, &args.recipe, &args.set, &registry)?;
    let idx = stage_index(&recipe, &args.stage)?;
    let cache = open_cache(g)?;
    let env = KeyEnv {
        env: engine::env_vars::keyed_env(),
    };
    let e = engine::plan::explain(&recipe, &registry, &cache, &env, idx);
    if g.json {
        let line = serde_json::to_string(&e).unwrap_or_default();
        out(&format!("{line}\n"));
        return Ok(0);
    }
    let mut text = String::new();
    let row = &e.row;
    let _ = writeln!(text, "{}: {}", row.stage, row.status.as_str());
    if let Some(k) = row.key {
        let _ = writeln!(text, "  key now:      {k:#}");
    }
    match e.previous_key {
        Some(k) => {
            let _ = writeln!(text, "  last run key: {k:#}");
        }
        None => {
            let _ = writeln!(
                text,
                "  last run:     none (never run in experiment `{}`)",
                recipe.experiment
            );
        }
    }
    match (row.status, e.differences.is_empty()) {
        (Status::Hit, true) => {
            let _ = writeln!(
                text,
                "  up to date: cached with the same inputs as its last run"
            );
        }
        (Status::Hit, false) => {
            let _ = writeln!(
                text,
                "  cached (an earlier run had these inputs); differences from the last run:"
            );
        }
        (Status::Error, _) => {
            let _ = writeln!(
                text,
                "  cannot run: {}",
                row.error.as_deref().unwrap_or("unknown error")
            );
        }
        (Status::Maybe, _) => {
            let _ = writeln!(
                text,
                "  runs only if its upstream stages produce different outputs:"
            );
        }
        (Status::Run, _) => {
            let _ = writeln!(text, "  will run because:");
        }
    }
    for d in &e.differences {
        let _ = writeln!(text, "    - {d}");
    }
    out(&text);
    Ok(0)
}

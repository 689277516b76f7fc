//! `pipeline plan`: a table of every stage with its status (hit, run, maybe) and reasons.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use engine::exec::KeyEnv;
use engine::plan::Status;

use super::{CmdResult, load_cached, open_cache, out, registry};
use crate::cli::{GlobalArgs, RecipeArgs};

pub fn plan(g: &GlobalArgs, args: &RecipeArgs) -> CmdResult {
    let registry = registry();
    let recipe = load_cached(g, &args.recipe, &args.set, &registry)?;
    let cache = open_cache(g)?;
    let env = KeyEnv {
        env: engine::env_vars::keyed_env(),
    };
    let plan = engine::plan::plan(&recipe, &registry, &cache, &env, &BTreeSet::new());
    let mut text = String::new();
    if g.json {
        for row in &plan.rows {
            if let Ok(line) = serde_json::to_string(row) {
                let _ = writeln!(text, "{line}");
            }
        }
        out(&text);
        let errors = plan.rows.iter().any(|r| r.status == Status::Error);
        return Ok(u8::from(errors));
    }
    let width = plan
        .rows
        .iter()
        .map(|r| r.stage.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(text, "{:<width$}  {:<6} REASONS", "STAGE", "STATUS");
    // Rows are appended piece by piece rather than through `writeln!` with padding: for a
    // 10,000-stage plan the formatting machinery was a few percent of the command.
    text.reserve(plan.rows.len() * (width + 20));
    for row in &plan.rows {
        padded(&mut text, &row.stage, width + 2);
        padded(&mut text, row.status.as_str(), 7);
        match row.status {
            Status::Hit => {}
            Status::Error => text.push_str(row.error.as_deref().unwrap_or_default()),
            Status::Run | Status::Maybe => {
                for (i, r) in row.reasons.iter().enumerate() {
                    if i > 0 {
                        text.push_str("; ");
                    }
                    let _ = write!(text, "{r}");
                }
            }
        }
        text.push('\n');
    }
    if !g.quiet {
        let count = |s: Status| plan.rows.iter().filter(|r| r.status == s).count();
        let _ = writeln!(
            text,
            "\n{} stages: {} hit, {} run, {} maybe, {} error",
            plan.rows.len(),
            count(Status::Hit),
            count(Status::Run),
            count(Status::Maybe),
            count(Status::Error)
        );
    }
    // Every missing or unreadable external input, once, so a recipe pointed at data or
    // weights that are not there says exactly what to provide.
    let mut missing: Vec<&str> = Vec::new();
    for row in &plan.rows {
        for part in row.error.iter().flat_map(|e| e.split("; ")) {
            if part.starts_with("cannot read `") && !missing.contains(&part) {
                missing.push(part);
            }
        }
    }
    if !missing.is_empty() {
        let _ = writeln!(text, "\nmissing inputs:");
        for m in &missing {
            let _ = writeln!(text, "  {m}");
        }
    }
    let errors = plan.rows.iter().any(|r| r.status == Status::Error);
    out(&text);
    // The process ends here: freeing a 10,000-stage recipe and plan one allocation at a
    // time would cost ~6% of the command (measured with callgrind), for nothing.
    std::mem::forget((recipe, plan));
    // A stage that cannot run makes the plan fail (exit 1), so scripts can check a recipe.
    Ok(u8::from(errors))
}

/// `s` left-aligned in `width` columns (as `{:<width$}` pads: by characters).
fn padded(text: &mut String, s: &str, width: usize) {
    text.push_str(s);
    let n = width.saturating_sub(s.chars().count());
    text.extend(std::iter::repeat_n(' ', n));
}

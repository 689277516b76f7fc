//! `[experiment]`: the experiment's name and seed.

use super::Ctx;
use super::error::{did_you_mean, one_of};
use super::load::Doc;
use super::value::V;

/// `[experiment]`: name (default: the file stem) and seed (default 0).
pub(crate) fn experiment(doc: &Doc, stem: &str, ctx: &mut Ctx) -> (String, u64) {
    let mut name = stem.to_string();
    let mut seed = 0;
    for e in doc.experiment.iter() {
        match (e.key.as_str(), &e.val.v) {
            ("name", V::Str(s)) if valid_experiment_name(s) => name.clone_from(s),
            ("name", V::Str(s)) => ctx.err(
                "bad_value",
                e.val.loc,
                "invalid name",
                format!("experiment name `{s}` is not a plain file name"),
                Some("use letters, digits, `-`, `_` and `.` (not first)".to_string()),
            ),
            ("seed", V::Int(n)) if *n >= 0 => seed = n.unsigned_abs(),
            ("seed", V::Int(n)) => ctx.err(
                "bad_value",
                e.val.loc,
                "negative",
                format!("`experiment.seed` must be a non-negative integer, got `{n}`"),
                Some("write e.g. `seed = 1234`".to_string()),
            ),
            ("name" | "seed", v) => {
                let want = if e.key == "name" {
                    "a string"
                } else {
                    "a non-negative integer"
                };
                ctx.err(
                    "bad_value",
                    e.val.loc,
                    "wrong type",
                    format!(
                        "`experiment.{}` must be {want}, got {}",
                        e.key,
                        v.type_name()
                    ),
                    None,
                );
            }
            (other, _) => {
                let keys = ["name", "seed", "extends", "include"];
                let help = did_you_mean(other, keys)
                    .unwrap_or_else(|| format!("`[experiment]` takes {}", one_of(keys)));
                ctx.err(
                    "unknown_key",
                    e.key_loc,
                    "unknown key",
                    format!("unknown key `{other}` in `[experiment]`"),
                    Some(help),
                );
            }
        }
    }
    (name, seed)
}

fn valid_experiment_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

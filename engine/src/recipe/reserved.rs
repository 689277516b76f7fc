//! The reserved stage keys that do not shape the expansion: `resources`, `executor` and
//! `after`. Each is checked once per stage table, before expansion, so its problems are
//! reported even when the expansion itself fails.

use super::Ctx;
use super::error::{did_you_mean, one_of};
use super::value::{Node, Table, V};
use crate::stage::Resources;

const EXECUTORS: [&str; 2] = ["local", "slurm"];
const RESOURCE_KEYS: [&str; 4] = ["cpus", "memory_mb", "gpus", "time_s"];

/// `executor = "local" | "slurm"`, if the stage chose one.
pub(crate) fn executor(t: &Table, ctx: &mut Ctx) -> Option<String> {
    t.get("executor").and_then(|e| match &e.val.v {
        V::Str(x) if EXECUTORS.contains(&x.as_str()) => Some(x.clone()),
        v => {
            let got = if let V::Str(s) = v {
                format!("`{s}`")
            } else {
                v.type_name().to_string()
            };
            ctx.err(
                "bad_value",
                e.val.loc,
                "unknown executor",
                format!("`executor` must be `local` or `slurm`, got {got}"),
                Some("`local` runs on this machine, `slurm` submits with `sbatch`".to_string()),
            );
            None
        }
    })
}

/// The `after` entries that are strings (stage names, substituted per expansion later).
pub(crate) fn after<'t>(t: &'t Table, ctx: &mut Ctx) -> Vec<&'t Node> {
    match t.get("after").map(|e| &e.val) {
        None => Vec::new(),
        Some(Node {
            v: V::Array(items), ..
        }) => items.iter().filter(|n| check_after_item(n, ctx)).collect(),
        Some(n) => {
            ctx.err(
                "bad_value",
                n.loc,
                "expected a list",
                format!(
                    "`after` must be a list of stage names, got {}",
                    n.v.type_name()
                ),
                Some("write e.g. `after = [\"prepare\"]`".to_string()),
            );
            Vec::new()
        }
    }
}

fn check_after_item(n: &Node, ctx: &mut Ctx) -> bool {
    if matches!(n.v, V::Str(_)) {
        return true;
    }
    ctx.err(
        "bad_value",
        n.loc,
        "expected a stage name",
        format!(
            "`after` entries must be stage names, got {}",
            n.v.type_name()
        ),
        None,
    );
    false
}

/// The recipe's `resources` overrides, parsed once per stage.
#[derive(Default)]
pub(crate) struct ResourceOverrides {
    cpus: Option<u32>,
    memory_mb: Option<u64>,
    gpus: Option<u32>,
    time_s: Option<u64>,
}

impl ResourceOverrides {
    pub(crate) fn apply(&self, r: &mut Resources) {
        r.cpus = self.cpus.unwrap_or(r.cpus);
        r.memory_mb = self.memory_mb.unwrap_or(r.memory_mb);
        r.gpus = self.gpus.unwrap_or(r.gpus);
        r.time_s = self.time_s.unwrap_or(r.time_s);
    }
}

pub(crate) fn recipe_resources(t: &Table, ctx: &mut Ctx) -> ResourceOverrides {
    let mut r = ResourceOverrides::default();
    let Some(e) = t.get("resources") else {
        return r;
    };
    let V::Table(rt) = &e.val.v else {
        ctx.err(
            "bad_value",
            e.val.loc,
            "expected a table",
            format!("`resources` must be a table, got {}", e.val.v.type_name()),
            Some("write e.g. `resources = { cpus = 2, memory_mb = 4096 }`".to_string()),
        );
        return r;
    };
    for kv in rt.iter() {
        let n = match &kv.val.v {
            V::Int(n) if *n >= 0 => n.unsigned_abs(),
            v => {
                ctx.err(
                    "bad_value",
                    kv.val.loc,
                    "expected a non-negative integer",
                    format!(
                        "`resources.{}` must be a non-negative integer, got {}",
                        kv.key,
                        v.type_name()
                    ),
                    None,
                );
                continue;
            }
        };
        let small = || u32::try_from(n).ok();
        match kv.key.as_str() {
            "cpus" => r.cpus = small(),
            "gpus" => r.gpus = small(),
            "memory_mb" => r.memory_mb = Some(n),
            "time_s" => r.time_s = Some(n),
            other => {
                let help = did_you_mean(other, RESOURCE_KEYS)
                    .unwrap_or_else(|| format!("resources are {}", one_of(RESOURCE_KEYS)));
                ctx.err(
                    "unknown_key",
                    kv.key_loc,
                    "unknown resource",
                    format!("unknown resource `{other}`"),
                    Some(help),
                );
            }
        }
    }
    r
}

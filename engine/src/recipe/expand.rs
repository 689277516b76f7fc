//! Expansion and parameter checking: recipe tables -> concrete, typed stages.
//!
//! A stage table holds reserved keys (`kind`, `foreach`, `matrix`, `chain`, `resources`,
//! `executor`, `after`); every other key is a parameter of the kind. `foreach` (a var name or
//! an inline list) makes one stage per item, named `<stage>/<item>`; `matrix` (a table of var
//! names or inline lists) makes one per element of the cartesian product, named
//! `<stage>/<dim>=<value>,...` in the table's key order. In string parameters (at any depth)
//! and `after` entries, `{item}`, `{index}` and `{<dim>}` are replaced; other braces are left
//! alone, so shell snippets like `awk '{print $1}'` survive.
//!
//! `chain = true` (or `chain = "<param>"`) links a `foreach` sequence: element `i > 0` gets
//! the parameter `prev` (or the named one) set to `@<stage>/<item i-1>`, so each task trains
//! on the previous task's model while the first keeps what the recipe wrote.
//!
//! Parameters are checked per expansion after substitution (a substituted value can be
//! wrong where the template was not); identical problems from several expansions collapse
//! into one report. References are only recorded here and resolved in `resolve.rs`, once
//! every stage name is known.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::Ctx;
use super::error::{Label, did_you_mean, one_of};
use super::load::Doc;
use super::value::{Loc, Node, Table, V, scalar_text};
use crate::stage::{ArtifactType, ParamSpec, ParamType, Registry, Resources, StageKind};

pub(crate) const RESERVED: [&str; 7] = [
    "kind",
    "foreach",
    "matrix",
    "chain",
    "resources",
    "executor",
    "after",
];
const EXECUTORS: [&str; 2] = ["local", "slurm"];
const RESOURCE_KEYS: [&str; 4] = ["cpus", "memory_mb", "gpus", "time_s"];

/// A concrete stage whose references are not resolved yet.
pub(crate) struct Pending {
    pub name: String,
    pub name_loc: Loc,
    pub base: String,
    /// Whether the stage came from `foreach`/`matrix` (then `@base` alone is ambiguous).
    pub expanded: bool,
    pub kind: Option<Arc<dyn StageKind>>,
    pub kind_name: String,
    pub params: Map<String, Value>,
    pub refs: Vec<PendingRef>,
    pub externals: Vec<super::External>,
    pub resources: Resources,
    pub executor: Option<String>,
    pub after: Vec<(String, Loc)>,
    /// Parameters all valid: the kind's `outputs` may be asked.
    pub ok: bool,
}

/// A reference found in a parameter, resolved later.
pub(crate) struct PendingRef {
    pub param: String,
    /// Where the string sits inside the parameter's value (list indices).
    pub pointer: Vec<usize>,
    /// The text after `@`, substituted.
    pub target: String,
    pub loc: Loc,
    pub want: ArtifactType,
}

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

fn valid_stage_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// The expanded stages, and the names of stages whose expansion failed (references to them
/// are not reported again as missing).
pub(crate) struct Expanded {
    pub pending: Vec<Pending>,
    pub broken: HashSet<String>,
}

/// Expand every stage of `doc`, in declaration order.
pub(crate) fn expand(doc: &Doc, registry: &Registry, ctx: &mut Ctx) -> Expanded {
    let vars = check_vars(&doc.vars, ctx);
    let mut out = Expanded {
        pending: Vec::with_capacity(doc.stages.len()),
        broken: HashSet::new(),
    };
    for e in doc.stages.iter() {
        if let V::Table(t) = &e.val.v
            && !expand_stage(
                &e.key,
                e.key_loc,
                t,
                &doc.vars,
                &vars,
                registry,
                ctx,
                &mut out.pending,
            )
        {
            out.broken.insert(e.key.clone());
        }
    }
    out
}

/// Vars are lists of scalars; returns each var's items (None for a bad var, which is
/// reported here once rather than at every use).
fn check_vars(vars: &Table, ctx: &mut Ctx) -> Vec<(String, Option<Vec<Item>>)> {
    vars.iter()
        .map(|e| {
            (
                e.key.clone(),
                items_of(&e.val, &format!("var `{}`", e.key), ctx),
            )
        })
        .collect()
}

/// One item of a `foreach` or `matrix` list: its text (for names and `{item}`) and its value
/// (a matrix dimension named like a parameter sets that parameter to the typed value).
#[derive(Clone)]
struct Item {
    text: String,
    node: Node,
}

fn items_of(node: &Node, what: &str, ctx: &mut Ctx) -> Option<Vec<Item>> {
    let V::Array(items) = &node.v else {
        ctx.err(
            "bad_value",
            node.loc,
            "expected a list",
            format!("{what} must be a list, got {}", node.v.type_name()),
            Some("write e.g. `[\"A\", \"B\"]`".to_string()),
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        match scalar_text(&it.v) {
            Some(text) => out.push(Item {
                text,
                node: it.clone(),
            }),
            None => {
                ctx.err(
                    "bad_value",
                    it.loc,
                    "not a scalar",
                    format!(
                        "items of {what} must be strings, numbers or booleans, got {}",
                        it.v.type_name()
                    ),
                    None,
                );
                return None;
            }
        }
    }
    Some(out)
}

/// A foreach/matrix list: a var name or an inline list.
fn list_of(
    node: &Node,
    what: &str,
    vars_t: &Table,
    vars: &[(String, Option<Vec<Item>>)],
    ctx: &mut Ctx,
) -> Option<Vec<Item>> {
    match &node.v {
        V::Str(var) => match vars.iter().find(|(n, _)| n == var) {
            Some((_, items)) => items.clone(),
            None => {
                let help = did_you_mean(var, vars_t.keys()).unwrap_or_else(|| {
                    "define it under `[vars]` or write an inline list".to_string()
                });
                ctx.err(
                    "unknown_var",
                    node.loc,
                    "no such var",
                    format!("{what} names var `{var}`, which is not defined"),
                    Some(help),
                );
                None
            }
        },
        _ => items_of(node, what, ctx),
    }
}

/// One expansion: its name and substitutions.
struct Element {
    name: String,
    subs: Vec<(String, String)>,
    /// Matrix dimensions, with their item values (those named like a parameter set it).
    dims: Vec<(String, Node)>,
}

/// Expand one stage into `out`; `false` if its expansion itself failed (no elements).
#[allow(clippy::too_many_arguments)]
fn expand_stage(
    name: &str,
    name_loc: Loc,
    t: &Table,
    vars_t: &Table,
    vars: &[(String, Option<Vec<Item>>)],
    registry: &Registry,
    ctx: &mut Ctx,
    out: &mut Vec<Pending>,
) -> bool {
    if !valid_stage_name(name) {
        ctx.err("bad_name", name_loc, "invalid stage name", format!("stage name `{name}` may only contain letters, digits, `-` and `_`"), Some("in references `/` selects an expansion and `.` an output, so names cannot contain them".to_string()));
    }
    let kind = match t.get("kind") {
        None => {
            ctx.err(
                "missing_param",
                name_loc,
                "no `kind`",
                format!("stage `{name}` has no `kind`"),
                Some("add e.g. `kind = \"shell\"`; `pipeline kinds` lists them".to_string()),
            );
            None
        }
        Some(e) => match &e.val.v {
            V::Str(k) => match registry.get(k) {
                Some(kind) => Some(Arc::clone(kind)),
                None => {
                    let help = did_you_mean(k, registry.names())
                        .unwrap_or_else(|| "`pipeline kinds` lists the known kinds".to_string());
                    ctx.err(
                        "unknown_kind",
                        e.val.loc,
                        "unknown kind",
                        format!("unknown stage kind `{k}`"),
                        Some(help),
                    );
                    None
                }
            },
            v => {
                ctx.err(
                    "bad_value",
                    e.val.loc,
                    "expected a string",
                    format!("`kind` must be a string, got {}", v.type_name()),
                    None,
                );
                None
            }
        },
    };
    let kind_name = t
        .get("kind")
        .and_then(|e| {
            if let V::Str(s) = &e.val.v {
                Some(s.clone())
            } else {
                None
            }
        })
        .unwrap_or_default();

    // Elements: one plain stage, or the foreach items, or the matrix product.
    let foreach = t.get("foreach");
    let matrix = t.get("matrix");
    let chain = chain_param(name, t, foreach.is_some(), kind.as_deref(), ctx);
    let res = recipe_resources(t, ctx);
    let executor = t.get("executor").and_then(|e| match &e.val.v {
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
    });
    let after: Vec<&Node> = match t.get("after").map(|e| &e.val) {
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
    };
    // Elements: one plain stage, or the foreach items, or the matrix product. The keys
    // above are checked first so their problems are reported even when expansion fails.
    let mut elements = Vec::new();
    let expanded = foreach.is_some() || matrix.is_some();
    match (foreach, matrix) {
        (Some(_), Some(m)) => {
            ctx.err(
                "bad_value",
                m.key_loc,
                "second expansion",
                format!("stage `{name}` has both `foreach` and `matrix`"),
                Some("use `matrix` with several dimensions instead".to_string()),
            );
            return false;
        }
        (Some(f), None) => {
            let Some(items) = list_of(
                &f.val,
                &format!("`foreach` of stage `{name}`"),
                vars_t,
                vars,
                ctx,
            ) else {
                return false;
            };
            for (i, item) in items.into_iter().enumerate() {
                elements.push(Element {
                    name: format!("{name}/{}", item.text),
                    subs: vec![
                        ("item".to_string(), item.text),
                        ("index".to_string(), i.to_string()),
                    ],
                    dims: Vec::new(),
                });
            }
        }
        (None, Some(m)) => {
            let V::Table(dims) = &m.val.v else {
                ctx.err(
                    "bad_value",
                    m.val.loc,
                    "expected a table",
                    format!(
                        "`matrix` must be a table of lists, got {}",
                        m.val.v.type_name()
                    ),
                    Some(
                        "write e.g. `matrix = { method = \"methods\", lr = [1e-4, 2e-4] }`"
                            .to_string(),
                    ),
                );
                return false;
            };
            let mut lists = Vec::new();
            for d in dims.iter() {
                let Some(items) = list_of(
                    &d.val,
                    &format!("matrix dimension `{}`", d.key),
                    vars_t,
                    vars,
                    ctx,
                ) else {
                    return false;
                };
                lists.push((d.key.clone(), items));
            }
            if lists.is_empty() {
                ctx.err(
                    "bad_value",
                    m.val.loc,
                    "empty matrix",
                    format!("`matrix` of stage `{name}` has no dimensions"),
                    None,
                );
                return false;
            }
            elements = product(name, &lists);
        }
        (None, None) => elements.push(Element {
            name: name.to_string(),
            subs: Vec::new(),
            dims: Vec::new(),
        }),
    }

    // With an unknown kind there is no schema: its parameters are not checked, since every
    // one of them would look unknown and bury the real problem.
    // Schemas are built once per kind, not once per stage.
    let specs: Arc<Vec<ParamSpec>> = match &kind {
        Some(k) => Arc::clone(
            ctx.specs
                .entry(k.kind())
                .or_insert_with(|| Arc::new(k.params())),
        ),
        None => Arc::default(),
    };
    if let Some(V::Table(dims)) = matrix.map(|m| &m.val.v) {
        for d in dims.iter() {
            if let Some(e) = t
                .get(&d.key)
                .filter(|_| specs.iter().any(|s| s.name == d.key))
            {
                let labels = vec![
                    Label::new(e.key_loc, "set here"),
                    Label::new(d.key_loc, "and swept here"),
                ];
                ctx.diags.labelled(
                    &ctx.sources,
                    super::code("bad_value"),
                    format!(
                        "parameter `{}` of stage `{name}` is both set and swept by `matrix`",
                        d.key
                    ),
                    Some(format!(
                        "remove `{} = ...`; the matrix sets it in every expansion",
                        d.key
                    )),
                    labels,
                );
            }
        }
    }

    for (i, el) in elements.iter().enumerate() {
        let mut p = Pending {
            name: el.name.clone(),
            name_loc,
            base: name.to_string(),
            expanded,
            kind: kind.clone(),
            kind_name: kind_name.clone(),
            params: Map::new(),
            refs: Vec::new(),
            externals: Vec::new(),
            resources: Resources::default(),
            executor: executor.clone(),
            after: after
                .iter()
                .filter_map(|n| {
                    if let V::Str(s) = &n.v {
                        Some((subst(s, &el.subs).into_owned(), n.loc))
                    } else {
                        None
                    }
                })
                .collect(),
            ok: false,
        };
        if let Some(k) = &kind {
            // For i > 0 of a chain, the chained parameter points at the previous element.
            let mut set: Vec<(&str, Node)> = el
                .dims
                .iter()
                .filter(|(d, _)| specs.iter().any(|s| s.name == d))
                .map(|(d, n)| (d.as_str(), n.clone()))
                .collect();
            if let Some((param, loc)) = chain.as_ref().filter(|_| i > 0) {
                let prev = &elements[i - 1].name;
                set.push((
                    param.as_str(),
                    Node {
                        loc: *loc,
                        v: V::Str(format!("@{prev}")),
                    },
                ));
            }
            p.ok = super::params::check_params(&mut p, t, &specs, &el.subs, &set, ctx);
            p.resources = if p.ok {
                // Lend the params to the kind as a JSON object without copying them.
                let params = Value::Object(std::mem::take(&mut p.params));
                let r = k.resources(&params);
                if let Value::Object(m) = params {
                    p.params = m;
                }
                r
            } else {
                Resources::default()
            };
            res.apply(&mut p.resources);
        }
        out.push(p);
    }
    true
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

/// The cartesian product of the matrix dimensions, in row-major order (last dim fastest).
fn product(name: &str, lists: &[(String, Vec<Item>)]) -> Vec<Element> {
    let mut combos: Vec<Vec<usize>> = vec![Vec::new()];
    for (_, items) in lists {
        combos = combos
            .into_iter()
            .flat_map(|c| (0..items.len()).map(move |j| [c.clone(), vec![j]].concat()))
            .collect();
    }
    combos
        .into_iter()
        .enumerate()
        .map(|(idx, combo)| {
            let mut subs = Vec::with_capacity(lists.len() + 1);
            let mut label = Vec::with_capacity(lists.len());
            let mut dims = Vec::with_capacity(lists.len());
            for ((dim, items), &j) in lists.iter().zip(&combo) {
                label.push(format!("{dim}={}", items[j].text));
                subs.push((dim.clone(), items[j].text.clone()));
                dims.push((dim.clone(), items[j].node.clone()));
            }
            subs.push(("index".to_string(), idx.to_string()));
            Element {
                name: format!("{name}/{}", label.join(",")),
                subs,
                dims,
            }
        })
        .collect()
}

/// `chain = true` -> `prev`; `chain = "param"` -> that parameter. It must be a parameter of
/// the kind, and chain needs `foreach`.
fn chain_param(
    name: &str,
    t: &Table,
    has_foreach: bool,
    kind: Option<&dyn StageKind>,
    ctx: &mut Ctx,
) -> Option<(String, Loc)> {
    let e = t.get("chain")?;
    let param = match &e.val.v {
        V::Bool(false) => return None,
        V::Bool(true) => "prev".to_string(),
        V::Str(s) => s.clone(),
        v => {
            ctx.err(
                "bad_value",
                e.val.loc,
                "expected a boolean or a parameter name",
                format!(
                    "`chain` must be `true` or a parameter name, got {}",
                    v.type_name()
                ),
                None,
            );
            return None;
        }
    };
    if !has_foreach {
        ctx.err(
            "bad_value",
            e.key_loc,
            "chain without foreach",
            format!("stage `{name}` has `chain` but no `foreach`"),
            Some("`chain` links the elements of a `foreach` sequence".to_string()),
        );
        return None;
    }
    let kind = kind?;
    let specs = kind.params();
    match specs.iter().find(|s| s.name == param) {
        Some(s) if is_ref_type(&s.ty) => Some((param, e.val.loc)),
        Some(_) => {
            ctx.err(
                "mistyped_param",
                e.val.loc,
                "not a reference parameter",
                format!(
                    "`chain` sets `{param}`, but `{param}` of `{}` is not a reference",
                    kind.kind()
                ),
                None,
            );
            None
        }
        None => {
            let help = did_you_mean(&param, specs.iter().map(|s| s.name)).unwrap_or_else(|| {
                format!(
                    "write `chain = \"<param>\"` naming a reference parameter of `{}`",
                    kind.kind()
                )
            });
            ctx.err(
                "unknown_param",
                e.val.loc,
                "unknown parameter",
                format!(
                    "`chain` sets `{param}`, which `{}` does not have",
                    kind.kind()
                ),
                Some(help),
            );
            None
        }
    }
}

pub(crate) fn is_ref_type(ty: &ParamType) -> bool {
    matches!(ty, ParamType::Ref(_) | ParamType::RefOrPath)
}

/// The recipe's `resources` overrides, parsed once per stage.
#[derive(Default)]
struct ResourceOverrides {
    cpus: Option<u32>,
    memory_mb: Option<u64>,
    gpus: Option<u32>,
    time_s: Option<u64>,
}

impl ResourceOverrides {
    fn apply(&self, r: &mut Resources) {
        r.cpus = self.cpus.unwrap_or(r.cpus);
        r.memory_mb = self.memory_mb.unwrap_or(r.memory_mb);
        r.gpus = self.gpus.unwrap_or(r.gpus);
        r.time_s = self.time_s.unwrap_or(r.time_s);
    }
}

fn recipe_resources(t: &Table, ctx: &mut Ctx) -> ResourceOverrides {
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

/// Replace `{name}` for every substitution; unknown braces stay as written.
pub(crate) fn subst<'s>(s: &'s str, subs: &[(String, String)]) -> Cow<'s, str> {
    if subs.is_empty() || !s.contains('{') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = after.find('}').and_then(|close| {
            subs.iter()
                .find(|(k, _)| k == &after[..close])
                .map(|(_, v)| (close, v))
        });
        match hit {
            Some((close, v)) => {
                out.push_str(v);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::subst;

    fn subs() -> Vec<(String, String)> {
        vec![("item".into(), "GQA".into()), ("index".into(), "2".into())]
    }

    #[test]
    fn substitutes_known_names_only() {
        assert_eq!(subst("@asd/{item}", &subs()), "@asd/GQA");
        assert_eq!(subst("{index}-{item}-{index}", &subs()), "2-GQA-2");
        assert_eq!(
            subst("awk '{print $1}' {item}", &subs()),
            "awk '{print $1}' GQA"
        );
        assert_eq!(subst("unclosed {item", &subs()), "unclosed {item");
        assert_eq!(subst("{}{{item}}", &subs()), "{}{GQA}");
        assert_eq!(subst("no braces", &[]), "no braces");
    }
}

//! Expansion and parameter checking: recipe tables -> concrete, typed stages.
//!
//! A stage table holds reserved keys (`kind`, `foreach`, `matrix`, `chain`, `resources`,
//! `executor`, `after`); every other key is a parameter of the kind. Per stage table:
//!
//! - `items.rs` turns `foreach`/`matrix` into elements (names and substitutions);
//! - `chain.rs` reads `chain`, which links consecutive elements;
//! - `reserved.rs` checks `resources`, `executor` and `after`;
//! - here each element becomes a [`Pending`] stage: `{item}`, `{index}` and `{<dim>}` are
//!   substituted (`template.rs`), matrix dimensions named like parameters and chain links
//!   are set, and `params.rs` type-checks every parameter against the kind's schema.
//!
//! Parameters are checked per expansion after substitution (a substituted value can be
//! wrong where the template was not); identical problems from several expansions collapse
//! into one report. References are only recorded here and resolved in `resolve.rs`, once
//! every stage name is known.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::Ctx;
use super::chain::{TargetCheck, check_targets, links, suffix};
use super::error::{Label, did_you_mean};
use super::items::{Item, check_vars, elements};
use super::load::Doc;
use super::template::subst;
use super::value::{Loc, Node, Table, V};
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
    /// Whether the reference stands in a list (an element, or a list parameter written as
    /// one string): only there may a gather expand to several references.
    pub many: bool,
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
    /// Chains to other stages, checked once every stage is expanded.
    pub chained: Vec<TargetCheck>,
    /// Places of generated references already reported wrong (a chain to a stage that does
    /// not match): resolution does not report them again.
    pub quiet: HashSet<Loc>,
}

/// Expand every stage of `doc`, in declaration order.
pub(crate) fn expand(doc: &Doc, registry: &Registry, ctx: &mut Ctx) -> Expanded {
    let vars = check_vars(&doc.vars, ctx);
    let mut out = Expanded {
        pending: Vec::with_capacity(doc.stages.len()),
        broken: HashSet::new(),
        chained: Vec::new(),
        quiet: HashSet::new(),
    };
    for e in doc.stages.iter() {
        if let V::Table(t) = &e.val.v
            && !expand_stage(
                &e.key, e.key_loc, t, &doc.vars, &vars, registry, ctx, &mut out,
            )
        {
            out.broken.insert(e.key.clone());
        }
    }
    check_targets(doc, &mut out, ctx);
    let names: Vec<&str> = out.pending.iter().map(|p| p.name.as_str()).collect();
    super::overrides::check_element_sets(ctx, &names);
    out
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
    out: &mut Expanded,
) -> bool {
    if !valid_stage_name(name) {
        ctx.err("bad_name", name_loc, "invalid stage name", format!("stage name `{name}` may only contain letters, digits, `-` and `_`"), Some("in references `/` selects an expansion and `.` an output, so names cannot contain them".to_string()));
    }
    let kind = stage_kind(t, name, name_loc, registry, ctx);
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

    // The keys that do not shape the expansion are checked first, so their problems are
    // reported even when the expansion fails.
    let foreach = t.get("foreach");
    let matrix = t.get("matrix");
    let expanded = foreach.is_some() || matrix.is_some();
    let links = links(name, t, expanded, kind.as_deref(), ctx);
    let res = super::reserved::recipe_resources(t, ctx);
    let executor = super::reserved::executor(t, ctx);
    let after = super::reserved::after(t, ctx);
    let Some(elements) = elements(name, foreach, matrix, vars_t, vars, ctx) else {
        return false;
    };

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

    for l in &links {
        if let Some(target) = &l.target {
            out.chained.push(TargetCheck {
                stage: name.to_string(),
                param: l.param.clone(),
                target: target.clone(),
                loc: l.loc,
            });
        }
    }
    for el in &elements {
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
            let mut set: Vec<(&str, Node)> = el
                .dims
                .iter()
                .filter(|(d, _)| specs.iter().any(|s| s.name == d))
                .map(|(d, n)| (d.as_str(), n.clone()))
                .collect();
            // `--set <stage>/<expansion>.<param>=v` for this very element.
            let own = super::overrides::element_sets(ctx, &el.name);
            for (key, node) in &own {
                if specs.iter().any(|s| s.name == key) {
                    set.retain(|(c, _)| c != key);
                    set.push((key.as_str(), node.clone()));
                } else {
                    let help = super::error::did_you_mean(key, specs.iter().map(|s| s.name))
                        .unwrap_or_else(|| {
                            format!(
                                "`{kind_name}` takes {}",
                                super::error::one_of(specs.iter().map(|s| s.name))
                            )
                        });
                    ctx.err(
                        "unknown_param",
                        node.loc,
                        "unknown parameter",
                        format!("`--set`: kind `{kind_name}` has no parameter `{key}`"),
                        Some(help),
                    );
                }
            }
            // An element with a predecessor in the chain: each chained parameter references
            // that predecessor's element of the linked stage (this one by default).
            if let Some(prev) = el.prev.filter(|_| !links.is_empty()) {
                let prev = suffix(&elements[prev].name);
                for l in links
                    .iter()
                    .filter(|l| !own.iter().any(|(k, _)| *k == l.param))
                {
                    let target = l.target.as_deref().unwrap_or(name);
                    set.push((
                        l.param.as_str(),
                        Node {
                            loc: l.loc,
                            v: V::Str(format!("@{target}/{prev}")),
                        },
                    ));
                }
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
        out.pending.push(p);
    }
    true
}

/// The stage's kind, looked up in the registry (with did-you-mean for a typo).
fn stage_kind(
    t: &Table,
    name: &str,
    name_loc: Loc,
    registry: &Registry,
    ctx: &mut Ctx,
) -> Option<Arc<dyn StageKind>> {
    match t.get("kind") {
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
    }
}

pub(crate) fn is_ref_type(ty: &ParamType) -> bool {
    matches!(ty, ParamType::Ref(_) | ParamType::RefOrPath)
}

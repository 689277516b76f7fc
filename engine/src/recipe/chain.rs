//! `chain`: linking the elements of an expanded stage into a sequence.
//!
//! The chain runs along the `foreach` items, or along the last `matrix` dimension with the
//! other dimensions held fixed (`items.rs` gives every element its predecessor). Element
//! `i > 0` of the sequence gets each chained parameter set to a reference to the element
//! before it; element 0 keeps what the recipe wrote (or the default):
//!
//! - `chain = true` sets `prev`, `chain = "<param>"` sets that parameter, to
//!   `@<stage>/<suffix of element i-1>`: each task trains on the previous task's model;
//! - `chain = { base = "merged", key_elements = "keys" }` points each parameter at the
//!   element before it of *another* stage: `base = "@merged/<suffix of element i-1>"`. So
//!   train -> merge -> next train are separate cached stages (task `i` reads merged `i-1`,
//!   which reads task `i-1`: no cycle). The named stage must be expanded like this one
//!   (the same suffixes), which [`check_targets`] verifies once every stage is expanded.

use std::collections::HashSet;

use super::Ctx;
use super::error::{Label, did_you_mean, one_of};
use super::expand::{Expanded, is_ref_type};
use super::load::Doc;
use super::value::{Loc, Table, V};
use crate::stage::StageKind;

/// One chained parameter.
pub(crate) struct Link {
    /// The reference parameter it sets.
    pub param: String,
    /// The stage whose previous element it references; `None`: this stage.
    pub target: Option<String>,
    /// Where the link is written (the value for `true`/`"param"`, the target for a table).
    pub loc: Loc,
}

/// A link to another stage, checked by [`check_targets`] once every stage is expanded.
pub(crate) struct TargetCheck {
    pub stage: String,
    pub param: String,
    pub target: String,
    pub loc: Loc,
}

/// The links of stage `name`'s `chain` key (empty without one, or after a reported
/// problem). Each must name a reference parameter of the kind, and chain needs `foreach`
/// or `matrix`.
pub(crate) fn links(
    name: &str,
    t: &Table,
    expanded: bool,
    kind: Option<&dyn StageKind>,
    ctx: &mut Ctx,
) -> Vec<Link> {
    let Some(e) = t.get("chain") else {
        return Vec::new();
    };
    // (param, where the param is named, target stage, where the link is written)
    let mut wanted: Vec<(String, Loc, Option<String>, Loc)> = Vec::new();
    match &e.val.v {
        V::Bool(false) => return Vec::new(),
        V::Bool(true) => wanted.push(("prev".to_string(), e.val.loc, None, e.val.loc)),
        V::Str(s) => wanted.push((s.clone(), e.val.loc, None, e.val.loc)),
        V::Table(tt) if tt.len() > 0 => {
            for kv in tt.iter() {
                let V::Str(target) = &kv.val.v else {
                    ctx.err(
                        "bad_value",
                        kv.val.loc,
                        "expected a stage name",
                        format!(
                            "`chain.{}` must name the stage to chain to, got {}",
                            kv.key,
                            kv.val.v.type_name()
                        ),
                        Some(format!(
                            "write e.g. `chain = {{ {} = \"merged\" }}`",
                            kv.key
                        )),
                    );
                    continue;
                };
                // Chaining to itself is the plain `chain = "param"`.
                let target = (target != name).then(|| target.clone());
                wanted.push((kv.key.clone(), kv.key_loc, target, kv.val.loc));
            }
        }
        v => {
            ctx.err(
                "bad_value",
                e.val.loc,
                "expected a boolean, a parameter name or a table",
                format!(
                    "`chain` must be `true`, a parameter name or a table of parameter = stage, \
                     got {}",
                    if matches!(v, V::Table(_)) {
                        "an empty table"
                    } else {
                        v.type_name()
                    }
                ),
                Some(
                    "write `chain = true`, `chain = \"base\"` or `chain = { base = \"merged\" }`"
                        .to_string(),
                ),
            );
            return Vec::new();
        }
    }
    if !expanded {
        ctx.err(
            "bad_value",
            e.key_loc,
            "chain without foreach or matrix",
            format!("stage `{name}` has `chain` but no `foreach` or `matrix`"),
            Some(
                "`chain` links the elements of a `foreach` sequence (or the last `matrix` \
                 dimension)"
                    .to_string(),
            ),
        );
        return Vec::new();
    }
    let Some(kind) = kind else {
        return Vec::new();
    };
    let specs = kind.params();
    let mut out = Vec::with_capacity(wanted.len());
    for (param, param_loc, target, loc) in wanted {
        match specs.iter().find(|s| s.name == param) {
            Some(s) if is_ref_type(&s.ty) => out.push(Link { param, target, loc }),
            Some(_) => ctx.err(
                "mistyped_param",
                param_loc,
                "not a reference parameter",
                format!(
                    "`chain` sets `{param}`, but `{param}` of `{}` is not a reference",
                    kind.kind()
                ),
                Some(format!(
                    "chain a reference parameter of `{}`: {}",
                    kind.kind(),
                    one_of(specs.iter().filter(|s| is_ref_type(&s.ty)).map(|s| s.name))
                )),
            ),
            None => {
                let help =
                    did_you_mean(&param, specs.iter().map(|s| s.name)).unwrap_or_else(|| {
                        format!(
                            "write `chain = \"<param>\"` naming a reference parameter of `{}`",
                            kind.kind()
                        )
                    });
                ctx.err(
                    "unknown_param",
                    param_loc,
                    "unknown parameter",
                    format!(
                        "`chain` sets `{param}`, which `{}` does not have",
                        kind.kind()
                    ),
                    Some(help),
                );
            }
        }
    }
    out
}

/// The part of an expansion name after `<stage>/` (`x=0,task=A` of `task/x=0,task=A`).
pub(crate) fn suffix(name: &str) -> &str {
    name.split_once('/').map_or("", |(_, s)| s)
}

/// Every stage chained to another must be expanded like it: the same suffixes, so that the
/// element each link names exists. Links found wrong are added to `ex.quiet`, so that the
/// references they generated are not reported again as missing stages.
pub(crate) fn check_targets(doc: &Doc, ex: &mut Expanded, ctx: &mut Ctx) {
    for c in std::mem::take(&mut ex.chained) {
        if ex.broken.contains(&c.target) {
            continue;
        }
        let Some(target_table) = doc.stages.get(&c.target) else {
            let help = did_you_mean(&c.target, doc.stages.keys()).unwrap_or_else(|| {
                "`chain = { <param> = \"<stage>\" }` names a stage of this recipe".to_string()
            });
            ctx.err(
                "missing_stage",
                c.loc,
                "no such stage",
                format!(
                    "`chain` of stage `{}` links `{}` to a stage `{}` that does not exist",
                    c.stage, c.param, c.target
                ),
                Some(help),
            );
            ex.quiet.insert(c.loc);
            continue;
        };
        let suffixes = |base: &str| -> Vec<&str> {
            ex.pending
                .iter()
                .filter(|p| p.expanded && p.base == base)
                .map(|p| suffix(&p.name))
                .collect()
        };
        let own = suffixes(&c.stage);
        let theirs = suffixes(&c.target);
        let (own_set, their_set): (HashSet<&str>, HashSet<&str>) = (
            own.iter().copied().collect(),
            theirs.iter().copied().collect(),
        );
        // Where the target is expanded (or, for a plain stage, its name).
        let target_loc = match &target_table.val.v {
            V::Table(t) => t
                .get("foreach")
                .or_else(|| t.get("matrix"))
                .map_or(target_table.key_loc, |e| e.val.loc),
            _ => target_table.key_loc,
        };
        let (message, label, help) = if theirs.is_empty() {
            (
                format!(
                    "`chain` of stage `{}` links `{}` to `{}`, which has no `foreach` or `matrix`",
                    c.stage, c.param, c.target
                ),
                format!("`{}` is a single stage", c.target),
                format!(
                    "give `{}` the same `foreach`/`matrix` as `{}`, so that each element can \
                     read the matching element before it",
                    c.target, c.stage
                ),
            )
        } else if let Some(missing) = own.iter().find(|s| !their_set.contains(*s)) {
            (
                format!(
                    "`chain` of stage `{}` links `{}` to `{}`, which is expanded differently",
                    c.stage, c.param, c.target
                ),
                format!("`{}` expands here", c.target),
                format!(
                    "`{}` has the element `{missing}` but `{}` does not; give both stages the \
                     same `foreach`/`matrix`",
                    c.stage, c.target
                ),
            )
        } else if let Some(extra) = theirs.iter().find(|s| !own_set.contains(*s)) {
            (
                format!(
                    "`chain` of stage `{}` links `{}` to `{}`, which is expanded differently",
                    c.stage, c.param, c.target
                ),
                format!("`{}` expands here", c.target),
                format!(
                    "`{}` has the element `{extra}` but `{}` does not; give both stages the \
                     same `foreach`/`matrix`",
                    c.target, c.stage
                ),
            )
        } else {
            continue;
        };
        let labels = vec![
            Label::new(c.loc, format!("chains `{}` to `{}`", c.param, c.target)),
            Label::new(target_loc, label),
        ];
        ctx.diags.labelled(
            &ctx.sources,
            super::code("chain_mismatch"),
            message,
            Some(help),
            labels,
        );
        ex.quiet.insert(c.loc);
    }
}

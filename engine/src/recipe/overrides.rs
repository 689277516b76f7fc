//! `--set path=value` overrides, applied to the merged document before validation.
//!
//! The overrides are joined into one text, `--set a=1 --set b=2`, registered as the source
//! `command line`: a value given on the command line is then located there, so a mistyped
//! `--set asd.x=abc` is reported with a caret under `abc` exactly like a bad line in a file.
//!
//! Paths:
//! - `experiment.name`, `experiment.seed`;
//! - `vars.<name>` (the var must exist: a typo would otherwise silently do nothing);
//! - `stages.<stage>.<key>[.<subkey>...]`, or the shorthand `<stage>.<key>...`;
//! - `<stage>/<expansion>.<param>` (optionally after `stages.`): one element of a `foreach` or
//!   `matrix`, e.g. `task/x=0,reglora=0,task=GQA.lr=1e-3`. Only that element's key changes, so
//!   only it and what depends on it rerun. Expansion names contain `=` and `.` themselves, so
//!   the parameter is the first `.<identifier>=` after the `/`. Applied when the element is
//!   built; an expansion that does not exist is an error listing the ones that do.
//!
//! The value is parsed as a TOML value (`40`, `1e-4`, `["A", "B"]`, `{ train = 10 }`); text
//! that is not valid TOML is taken as a string, so `--set base.model=llava-tiny` works
//! without shell-quoting the quotes.

use std::sync::Arc;

use toml::de::DeValue;

use super::Ctx;
use super::error::{closest, did_you_mean};
use super::load::Doc;
use super::value::{Entry, Loc, Node, Table, V, from_de_value};

const EXPERIMENT_KEYS: [&str; 2] = ["name", "seed"];

/// Apply every override to `doc`; bad paths are reported and skipped.
pub(crate) fn apply(doc: &mut Doc, overrides: &[String], ctx: &mut Ctx) {
    if overrides.is_empty() {
        return;
    }
    let mut text = String::new();
    let mut starts = Vec::with_capacity(overrides.len());
    for o in overrides {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str("--set ");
        starts.push(text.len());
        text.push_str(o);
    }
    let src = ctx
        .sources
        .add("command line".to_string(), Arc::from(text.as_str()));
    for (o, &start) in overrides.iter().zip(&starts) {
        apply_one(doc, o, start, src, ctx);
    }
}

/// A pending override of one expansion's parameter.
pub(crate) struct ElementSet {
    /// The full element name, `<stage>/<expansion>`.
    pub element: String,
    /// Where the element name is on the command line.
    pub element_loc: Loc,
    /// The parameter.
    pub key: String,
    /// The value.
    pub val: Node,
    /// Whether an element of that name was built.
    pub used: bool,
}

/// `<stage>/<expansion>.<param>=<value>` split into its parts: (element, param, value start),
/// as byte offsets into `o`. `None` when `o` is not of that form.
fn split_element(o: &str) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>, usize)> {
    let off = if o.starts_with("stages.") { 7 } else { 0 };
    let rest = &o[off..];
    let slash = rest.find('/')?;
    // A `/` after a `.` or `=` belongs to the value (`--set a.b=x/y`).
    if rest[..slash].contains('.') || rest[..slash].contains('=') {
        return None;
    }
    let bytes = rest.as_bytes();
    let mut i = slash + 1;
    while i < bytes.len() {
        if bytes[i] == b'.' {
            let k0 = i + 1;
            let mut k = k0;
            while k < bytes.len() && (bytes[k].is_ascii_alphanumeric() || bytes[k] == b'_') {
                k += 1;
            }
            let ident = k > k0 && !bytes[k0].is_ascii_digit();
            if ident && k < bytes.len() && bytes[k] == b'=' {
                return Some((off..off + i, off + k0..off + k, off + k + 1));
            }
        }
        i += 1;
    }
    None
}

fn apply_one(doc: &mut Doc, o: &str, start: usize, src: u32, ctx: &mut Ctx) {
    let whole = Loc::new(src, start..start + o.len());
    if let Some((el, key, value_at)) = split_element(o) {
        let value_text = &o[value_at..];
        let value_start = start + value_at;
        let val = match DeValue::parse(value_text) {
            Ok(v) => from_de_value(src, value_start, &v),
            Err(_) => Node {
                loc: Loc::new(src, value_start..value_start + value_text.len()),
                v: V::Str(value_text.to_string()),
            },
        };
        let element = o[el.clone()].to_string();
        let stage = element.split('/').next().unwrap_or_default();
        if doc.stages.get(stage).is_none() {
            let help = closest(stage, doc.stages.keys())
                .map(|c| format!("did you mean `{c}`?"))
                .unwrap_or_else(|| "name a stage of the recipe".to_string());
            return ctx.err(
                "bad_set",
                Loc::new(src, start + el.start..start + el.start + stage.len()),
                "unknown stage",
                format!("`--set {o}`: the recipe has no stage `{stage}`"),
                Some(help),
            );
        }
        ctx.element_sets.push(ElementSet {
            element,
            element_loc: Loc::new(src, start + el.start..start + el.end),
            key: o[key].to_string(),
            val,
            used: false,
        });
        return;
    }
    let Some(eq) = o.find('=') else {
        ctx.err(
            "bad_set",
            whole,
            "no `=` here",
            format!("`--set {o}` is not of the form `path=value`"),
            Some("write e.g. `--set stages.asd.x=40` or `--set asd.x=40`".to_string()),
        );
        return;
    };
    let path = &o[..eq];
    let mut segs: Vec<(&str, Loc)> = Vec::new();
    let mut at = start;
    for s in path.split('.') {
        segs.push((s, Loc::new(src, at..at + s.len())));
        at += s.len() + 1;
    }
    if let Some((_, loc)) = segs.iter().find(|(s, _)| s.trim().is_empty()) {
        let loc = if loc.start == loc.end {
            Loc::new(src, start..start + eq)
        } else {
            *loc
        };
        ctx.err(
            "bad_set",
            loc,
            "empty path segment",
            format!("`--set {o}` has an empty path segment"),
            Some("write e.g. `--set stages.asd.x=40`".to_string()),
        );
        return;
    }
    let value_start = start + eq + 1;
    let value_text = &o[eq + 1..];
    let val = match DeValue::parse(value_text) {
        Ok(v) => from_de_value(src, value_start, &v),
        Err(_) => Node {
            loc: Loc::new(src, value_start..value_start + value_text.len()),
            v: V::Str(value_text.to_string()),
        },
    };

    let (first, _) = segs[0];
    match first {
        "experiment" => {
            let [_, (key, key_loc)] = segs.as_slice() else {
                return bad_path(
                    ctx,
                    whole,
                    o,
                    "`experiment` takes one key: `experiment.name` or `experiment.seed`",
                );
            };
            if !EXPERIMENT_KEYS.contains(key) {
                let help = did_you_mean(key, EXPERIMENT_KEYS)
                    .unwrap_or_else(|| "the experiment keys are `name` and `seed`".to_string());
                return ctx.err(
                    "bad_set",
                    *key_loc,
                    "unknown experiment key",
                    format!("`--set {o}`: `{key}` is not an experiment key"),
                    Some(help),
                );
            }
            doc.experiment.insert(Entry {
                key: (*key).to_string(),
                key_loc: *key_loc,
                val,
            });
        }
        "vars" => {
            let [_, (key, key_loc)] = segs.as_slice() else {
                return bad_path(ctx, whole, o, "`vars` takes one key: `vars.<name>=[...]`");
            };
            if doc.vars.get(key).is_none() {
                let help = did_you_mean(key, doc.vars.keys()).unwrap_or_else(|| {
                    "only vars defined in the recipe can be overridden".to_string()
                });
                return ctx.err(
                    "bad_set",
                    *key_loc,
                    "no such var",
                    format!("`--set {o}`: the recipe has no var `{key}`"),
                    Some(help),
                );
            }
            doc.vars.insert(Entry {
                key: (*key).to_string(),
                key_loc: *key_loc,
                val,
            });
        }
        _ => {
            let rest = if first == "stages" {
                &segs[1..]
            } else {
                &segs[..]
            };
            let [(stage, stage_loc), keys @ ..] = rest else {
                return bad_path(ctx, whole, o, "write `stages.<stage>.<param>=value`");
            };
            if keys.is_empty() {
                return bad_path(
                    ctx,
                    whole,
                    o,
                    "name a parameter of the stage: `<stage>.<param>=value`",
                );
            }
            let Some(entry) = doc.stages.get_mut(stage) else {
                let mut help =
                    "the path must start with `experiment`, `vars`, `stages` or a stage name"
                        .to_string();
                if let Some(c) = closest(stage, doc.stages.keys()) {
                    help = format!("did you mean `{c}`?");
                }
                let what = if first == "stages" {
                    format!("the recipe has no stage `{stage}`")
                } else {
                    format!("`{stage}` is not a stage, `experiment`, `vars` or `stages`")
                };
                return ctx.err(
                    "bad_set",
                    *stage_loc,
                    "unknown stage",
                    format!("`--set {o}`: {what}"),
                    Some(help),
                );
            };
            set_in(&mut entry.val, keys, val, ctx, whole, o);
        }
    }
}

/// Set `keys` (a path of nested tables) inside a stage table, creating missing tables.
fn set_in(node: &mut Node, keys: &[(&str, Loc)], val: Node, ctx: &mut Ctx, whole: Loc, o: &str) {
    let mut cur = node;
    for (i, (key, key_loc)) in keys.iter().enumerate() {
        let V::Table(t) = &mut cur.v else {
            return bad_path(
                ctx,
                whole,
                o,
                "the path goes through a value that is not a table",
            );
        };
        if i + 1 == keys.len() {
            t.insert(Entry {
                key: (*key).to_string(),
                key_loc: *key_loc,
                val,
            });
            return;
        }
        if t.get(key).is_none() {
            t.insert(Entry {
                key: (*key).to_string(),
                key_loc: *key_loc,
                val: Node {
                    loc: *key_loc,
                    v: V::Table(Table::default()),
                },
            });
        }
        let Some(next) = t.get_mut(key) else { return };
        cur = &mut next.val;
    }
}

fn bad_path(ctx: &mut Ctx, loc: Loc, o: &str, help: &str) {
    ctx.err(
        "bad_set",
        loc,
        "bad override path",
        format!("`--set {o}` does not name a recipe value"),
        Some(help.to_string()),
    );
}

/// The overrides of element `name` as (parameter, value) pairs; marks them used.
pub(crate) fn element_sets(ctx: &mut Ctx, name: &str) -> Vec<(String, Node)> {
    ctx.element_sets
        .iter_mut()
        .filter(|e| e.element == name)
        .map(|e| {
            e.used = true;
            (e.key.clone(), e.val.clone())
        })
        .collect()
}

/// Reports every element override whose element was never built, listing the expansions
/// of its stage.
pub(crate) fn check_element_sets(ctx: &mut Ctx, names: &[&str]) {
    let unused: Vec<(String, Loc)> = ctx
        .element_sets
        .iter()
        .filter(|e| !e.used)
        .map(|e| (e.element.clone(), e.element_loc))
        .collect();
    for (element, loc) in unused {
        let stage = element.split('/').next().unwrap_or_default();
        let prefix = format!("{stage}/");
        let have: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        let help = match closest(&element, have.iter().copied()) {
            Some(c) => format!("did you mean `{c}`?"),
            None if have.is_empty() => format!(
                "stage `{stage}` has no `foreach` or `matrix`; write `--set {stage}.<param>=...`"
            ),
            None => format!("its expansions: {}", have.join(", ")),
        };
        ctx.err(
            "bad_set",
            loc,
            "no such expansion",
            format!("`--set`: the recipe has no stage expansion `{element}`"),
            Some(help),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::split_element;

    fn parts(o: &str) -> Option<(&str, &str, &str)> {
        split_element(o).map(|(e, k, v)| (&o[e], &o[k], &o[v..]))
    }

    #[test]
    fn element_overrides_split_at_the_first_parameter_after_the_slash() {
        assert_eq!(
            parts("task/x=0,reglora=0,task=GQA.lr=1e-3"),
            Some(("task/x=0,reglora=0,task=GQA", "lr", "1e-3"))
        );
        // Dots inside the expansion name (a float dimension) are not the parameter.
        assert_eq!(
            parts("stages.t/lr=0.0001,n=2.steps=5"),
            Some(("t/lr=0.0001,n=2", "steps", "5"))
        );
        assert_eq!(
            parts("s/a.params={ n = 2 }"),
            Some(("s/a", "params", "{ n = 2 }"))
        );
        // Not element overrides: plain paths, and a slash inside the value.
        assert_eq!(parts("asd.x=40"), None);
        assert_eq!(parts("prep.cmd=cat a/b"), None);
        assert_eq!(parts("s/a=1"), None);
    }
}

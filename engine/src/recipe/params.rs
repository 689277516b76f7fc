//! Parameter checking: one stage table against its kind's schema.
//!
//! Each value is checked against its [`ParamType`] after `{item}` substitution and converted
//! to canonical JSON: integers are widened for `Float`, defaults fill what the recipe leaves
//! out, and the object follows the schema's order so that the way a recipe is written never
//! changes a key. Strings in `Ref` positions are recorded as [`PendingRef`]s (resolved once
//! every stage name is known) and `Path` strings as externals, whose content goes into keys.

use serde_json::{Map, Value};

use super::Ctx;
use super::error::{did_you_mean, one_of};
use super::expand::{Pending, PendingRef, RESERVED, is_ref_type};
use super::resolve::gather_parts;
use super::template::subst;
use super::value::{Node, Table, V};
use crate::stage::{ArtifactType, ParamSpec, ParamType};

/// Check every parameter of one expansion; fills `p.params`, `p.refs`, `p.externals`.
/// Returns whether all were valid.
/// `set` holds values that replace what the recipe wrote (matrix dimensions, chain links).
pub(crate) fn check_params(
    p: &mut Pending,
    t: &Table,
    specs: &[ParamSpec],
    subs: &[(String, String)],
    set: &[(&str, Node)],
    ctx: &mut Ctx,
) -> bool {
    let mut ok = true;
    // Values by schema position: the canonical object is built once, in schema order, at
    // the end, so it never depends on how the recipe was written.
    let mut values: Vec<Option<Value>> = vec![None; specs.len()];
    // Taken, not cloned (once per expansion), and put back below.
    let kind = std::mem::take(&mut p.kind_name);
    for e in t.iter() {
        if RESERVED.contains(&e.key.as_str()) {
            continue;
        }
        if set.iter().any(|(c, _)| *c == e.key) {
            continue;
        }
        let Some(at) = specs.iter().position(|s| s.name == e.key) else {
            let names = specs.iter().map(|s| s.name).chain(RESERVED);
            let help = did_you_mean(&e.key, names).unwrap_or_else(|| {
                format!("`{kind}` takes {}", one_of(specs.iter().map(|s| s.name)))
            });
            ctx.err(
                "unknown_param",
                e.key_loc,
                "unknown parameter",
                format!("kind `{kind}` has no parameter `{}`", e.key),
                Some(help),
            );
            ok = false;
            continue;
        };
        let spec = &specs[at];
        let mut c = Checker {
            ctx,
            subs,
            param: spec.name,
            kind: &kind,
            refs: &mut p.refs,
            externals: &mut p.externals,
            many: false,
        };
        match c.check(&e.val, &spec.ty, &mut Vec::new()) {
            Some(v) => values[at] = Some(v),
            None => ok = false,
        }
    }
    for (param, node) in set {
        if let Some(at) = specs.iter().position(|s| s.name == *param) {
            let spec = &specs[at];
            let mut c = Checker {
                ctx,
                subs,
                param: spec.name,
                kind: &kind,
                refs: &mut p.refs,
                externals: &mut p.externals,
                many: false,
            };
            match c.check(node, &spec.ty, &mut Vec::new()) {
                Some(v) => values[at] = Some(v),
                None => ok = false,
            }
        }
    }
    for (spec, value) in specs.iter().zip(values.iter_mut()) {
        if value.is_some() {
            continue;
        }
        // A parameter the recipe (or `set`) gave a value that failed its check is reported
        // as mistyped, never also as missing.
        if t.get(spec.name).is_some() || set.iter().any(|(c, _)| *c == spec.name) {
            continue;
        }
        match &spec.default {
            Some(d) => *value = Some(d.clone()),
            None => {
                ctx.err(
                    "missing_param",
                    p.name_loc,
                    "in this stage",
                    format!(
                        "stage `{}` is missing the required parameter `{}`",
                        p.base, spec.name
                    ),
                    Some(format!(
                        "add `{} = ...` ({}: {})",
                        spec.name,
                        describe(&spec.ty),
                        spec.doc
                    )),
                );
                ok = false;
            }
        }
    }
    let mut params = Map::with_capacity(specs.len());
    for (spec, value) in specs.iter().zip(values) {
        if let Some(v) = value {
            params.insert(spec.name.to_string(), v);
        }
    }
    p.params = params;
    p.kind_name = kind;
    ok
}

/// What a parameter type accepts, for messages.
pub(crate) fn describe(ty: &ParamType) -> String {
    match ty {
        ParamType::Bool => "a boolean".to_string(),
        ParamType::Int => "an integer".to_string(),
        ParamType::Float => "a number".to_string(),
        ParamType::Str => "a string".to_string(),
        ParamType::Enum(opts) => format!("one of {}", one_of(opts.iter().copied())),
        ParamType::Path => "a file path".to_string(),
        ParamType::Ref(t) => format!("a reference to a `{}` output (`@stage`)", type_name(*t)),
        ParamType::List(inner) => format!("a list of {}", plural(&describe(inner))),
        ParamType::Table => "a table".to_string(),
        ParamType::RefOrPath => "a reference (`@stage`) or a file path".to_string(),
    }
}

fn plural(s: &str) -> String {
    s.strip_prefix("a ")
        .or_else(|| s.strip_prefix("an "))
        .map_or_else(|| s.to_string(), |r| format!("{r}s"))
}

/// An artifact type as written in recipes and messages (`dataset`, `model`).
pub(crate) fn type_name(t: ArtifactType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Type-checks one parameter value (recursively for lists) and converts it to JSON.
struct Checker<'a> {
    ctx: &'a mut Ctx,
    subs: &'a [(String, String)],
    param: &'a str,
    kind: &'a str,
    refs: &'a mut Vec<PendingRef>,
    externals: &'a mut Vec<super::External>,
    /// Checking a list parameter written as one string (a gather standing for the list).
    many: bool,
}

impl Checker<'_> {
    fn mistyped(
        &mut self,
        node: &Node,
        ty: &ParamType,
        got: &str,
        pointer: &[usize],
    ) -> Option<Value> {
        // An element of a list is named by its index, `tasks[1]`.
        let at: String = pointer.iter().map(|i| format!("[{i}]")).collect();
        let what = if at.is_empty() {
            "parameter"
        } else {
            "element"
        };
        let msg = format!(
            "{what} `{}{at}` of `{}` must be {}, got {got}",
            self.param,
            self.kind,
            describe(ty)
        );
        let help = match (ty, &node.v) {
            (ParamType::Ref(_), _) => {
                "a reference is a string starting with `@`, e.g. `\"@data\"` or `\"@task/{item}\"`"
                    .to_string()
            }
            (ParamType::Enum(opts), V::Str(s)) => {
                did_you_mean(&subst(s, self.subs), opts.iter().copied())
                    .unwrap_or_else(|| format!("`{}` takes {}", self.param, describe(ty)))
            }
            _ => format!("`{}` takes {}", self.param, describe(ty)),
        };
        let help = Some(help);
        self.ctx
            .err("mistyped_param", node.loc, "wrong type", msg, help);
        None
    }

    fn check(&mut self, node: &Node, ty: &ParamType, pointer: &mut Vec<usize>) -> Option<Value> {
        match (ty, &node.v) {
            (ParamType::Bool, V::Bool(b)) => Some(Value::Bool(*b)),
            (ParamType::Int, V::Int(n)) => Some(Value::from(*n)),
            (ParamType::Float, V::Int(n)) => Some(Value::from(*n as f64)),
            (ParamType::Float, V::Float(f)) if f.is_finite() => Some(Value::from(*f)),
            (ParamType::Float, V::Float(_)) => {
                self.mistyped(node, ty, "a non-finite float", pointer)
            }
            (ParamType::Str, V::Str(s)) => Some(Value::String(subst(s, self.subs).into_owned())),
            (ParamType::Enum(opts), V::Str(s)) => {
                let s = subst(s, self.subs);
                if opts.contains(&s.as_ref()) {
                    Some(Value::String(s.into_owned()))
                } else {
                    self.mistyped(node, ty, &format!("`{s}`"), pointer)
                }
            }
            (ParamType::Path, V::Str(s)) => {
                let s = subst(s, self.subs);
                if s.starts_with('@') {
                    return self.mistyped(node, ty, &format!("the reference `{s}`"), pointer);
                }
                self.externals.push(super::External {
                    param: self.param.to_string(),
                    path: s.as_ref().into(),
                });
                Some(Value::String(s.into_owned()))
            }
            (ParamType::Ref(want), V::Str(s)) => {
                let s = subst(s, self.subs);
                let Some(target) = s.strip_prefix('@') else {
                    return self.mistyped(node, ty, &format!("`{s}`"), pointer);
                };
                self.refs.push(PendingRef {
                    param: self.param.to_string(),
                    pointer: pointer.clone(),
                    target: target.to_string(),
                    loc: node.loc,
                    want: *want,
                    many: self.many || !pointer.is_empty(),
                });
                Some(Value::String(s.into_owned()))
            }
            (ParamType::RefOrPath, V::Str(s)) => {
                let s = subst(s, self.subs);
                if let Some(target) = s.strip_prefix('@') {
                    self.refs.push(PendingRef {
                        param: self.param.to_string(),
                        pointer: pointer.clone(),
                        target: target.to_string(),
                        loc: node.loc,
                        want: ArtifactType::Files,
                        many: self.many || !pointer.is_empty(),
                    });
                } else {
                    self.externals.push(super::External {
                        param: self.param.to_string(),
                        path: s.as_ref().into(),
                    });
                }
                Some(Value::String(s.into_owned()))
            }
            // `evals = "@eval/*"`: a gather written alone stands for the whole list.
            (ParamType::List(inner), V::Str(s))
                if is_ref_type(inner)
                    && subst(s, self.subs)
                        .strip_prefix('@')
                        .and_then(gather_parts)
                        .is_some() =>
            {
                self.many = true;
                let v = self.check(node, inner, pointer);
                self.many = false;
                v
            }
            (ParamType::List(inner), V::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, it) in items.iter().enumerate() {
                    pointer.push(i);
                    match self.check(it, inner, pointer) {
                        Some(v) => out.push(v),
                        None => ok = false,
                    }
                    pointer.pop();
                }
                ok.then_some(Value::Array(out))
            }
            (ParamType::Table, V::Table(_)) => self.table_json(node),
            (_, v) => {
                let got = v.type_name();
                self.mistyped(node, ty, got, pointer)
            }
        }
    }

    /// Free-form JSON for `Table` parameters (strings substituted, floats finite).
    fn table_json(&mut self, node: &Node) -> Option<Value> {
        Some(match &node.v {
            V::Str(s) => Value::String(subst(s, self.subs).into_owned()),
            V::Int(n) => Value::from(*n),
            V::Float(f) if f.is_finite() => Value::from(*f),
            V::Bool(b) => Value::Bool(*b),
            V::Datetime(d) => Value::String(d.clone()),
            V::Float(_) | V::OutOfRange => {
                let msg = format!(
                    "parameter `{}` of `{}` contains {}, which cannot be stored",
                    self.param,
                    self.kind,
                    node.v.type_name()
                );
                self.ctx.err(
                    "mistyped_param",
                    node.loc,
                    "not representable",
                    msg,
                    Some("use a finite number within 64 bits".to_string()),
                );
                return None;
            }
            V::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.table_json(i))
                    .collect::<Option<_>>()?,
            ),
            V::Table(t) => {
                let mut m = Map::with_capacity(t.len());
                for e in t.iter() {
                    m.insert(e.key.clone(), self.table_json(&e.val)?);
                }
                Value::Object(m)
            }
        })
    }
}

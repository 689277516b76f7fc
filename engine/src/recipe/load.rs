//! Reading recipe files: TOML parsing, `extends` and `include`.
//!
//! A file is parsed with `toml`'s span-preserving parser (recovering, so every syntax error of
//! a file is reported at once; a long file in parallel pieces, see `parse.rs`) and converted
//! to the recipe's own spanned tree. Then its
//! `[experiment]` table may name other files, relative to the file naming them:
//!
//! - `extends = "base.toml"`: inheritance. The parent is loaded first; the child overrides it
//!   key by key: a stage the child also defines keeps the parent's keys that the child does
//!   not set, a var or an `[experiment]` key is replaced.
//! - `include = ["a.toml", ...]`: composition. Each included file adds vars and stages; one
//!   that is already defined (by the parent or an earlier include) is a duplicate, because
//!   two unrelated files silently replacing each other's stages is a classic source of wrong
//!   results. The including file itself may still override included stages key by key.
//!
//! Files are tracked by canonical path on a stack, so `a extends b extends a` is reported as
//! a cycle instead of recursing forever.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::Ctx;
use super::error::{Label, did_you_mean, one_of};
use super::value::{Entry, Loc, Node, Table, V};

/// One recipe document after merging: `[experiment]` (without `extends`/`include`), `[vars]`
/// and `[stages]` (each value a table).
#[derive(Debug, Default)]
pub(crate) struct Doc {
    pub experiment: Table,
    pub vars: Table,
    pub stages: Table,
}

const TOP_KEYS: [&str; 3] = ["experiment", "vars", "stages"];

/// Load `path` and everything it extends or includes. `None` if the file itself could not
/// be read or parsed (the problems are in `ctx`).
pub(crate) fn load_root(path: &Path, ctx: &mut Ctx) -> Option<Doc> {
    let mut stack = Stack::new();
    load_file(path.to_path_buf(), None, ctx, &mut stack)
}

/// The files being loaded: canonical path (identity) and path as displayed.
type Stack = Vec<(PathBuf, PathBuf)>;

fn load_file(path: PathBuf, from: Option<Loc>, ctx: &mut Ctx, stack: &mut Stack) -> Option<Doc> {
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("cannot read `{}`: {e}", path.display());
            match from {
                Some(loc) => ctx.err(
                    "missing_file",
                    loc,
                    "this file cannot be read",
                    msg,
                    Some("paths are relative to the file that names them".to_string()),
                ),
                None => ctx.diags.plain("pipeline::recipe::io", msg, None),
            }
            return None;
        }
    };
    let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    if let Some(pos) = stack.iter().position(|(c, _)| *c == canonical) {
        let mut chain: Vec<String> = stack[pos..]
            .iter()
            .map(|(_, p)| format!("`{}`", p.display()))
            .collect();
        chain.push(format!("`{}`", path.display()));
        if let Some(loc) = from {
            ctx.err(
                "extends_cycle",
                loc,
                "this closes the cycle",
                format!(
                    "recipe files extend or include each other in a cycle: {}",
                    chain.join(" -> ")
                ),
                Some("remove one `extends` or `include` of the cycle".to_string()),
            );
        }
        return None;
    }
    ctx.files.push(path.clone());
    ctx.digests.push(*blake3::hash(text.as_bytes()).as_bytes());
    let text: Arc<str> = Arc::from(text);
    let src = ctx
        .sources
        .add(path.display().to_string(), Arc::clone(&text));
    let top = match super::parse::parse(src, &text) {
        Ok(top) => top,
        Err(errors) => {
            for e in errors {
                let span = e.span().unwrap_or(0..0);
                let loc = Loc::new(src, span);
                ctx.err(
                    "toml_syntax",
                    loc,
                    "here",
                    format!("invalid TOML: {}", e.message().trim_end()),
                    Some("see https://toml.io for the syntax".to_string()),
                );
            }
            return None;
        }
    };

    stack.push((canonical, path.clone()));
    let doc = split_file(top, &path, ctx, stack);
    stack.pop();
    Some(doc)
}

/// Split a parsed file into its tables, load its parents and merge.
fn split_file(top: Table, path: &Path, ctx: &mut Ctx, stack: &mut Stack) -> Doc {
    let mut own = Doc::default();
    for e in top.into_entries() {
        let slot = match e.key.as_str() {
            "experiment" => &mut own.experiment,
            "vars" => &mut own.vars,
            "stages" => &mut own.stages,
            other => {
                let help = did_you_mean(other, TOP_KEYS)
                    .unwrap_or_else(|| format!("a recipe has only {}", one_of(TOP_KEYS)));
                ctx.err(
                    "unknown_key",
                    e.key_loc,
                    "unknown key",
                    format!("unknown top-level key `{other}`"),
                    Some(help),
                );
                continue;
            }
        };
        match e.val.v {
            V::Table(t) => *slot = t,
            other => ctx.err(
                "bad_value",
                e.val.loc,
                "expected a table",
                format!("`{}` must be a table, got {}", e.key, other.type_name()),
                Some(format!("write `[{}]` on a line of its own", e.key)),
            ),
        }
    }
    // A stage must be a table; reject anything else here so later phases can assume it.
    if own.stages.iter().any(|e| !matches!(e.val.v, V::Table(_))) {
        own.stages = only_tables(std::mem::take(&mut own.stages), ctx);
    }

    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    let mut base = Doc::default();
    if let Some(ext) = own.experiment.remove("extends") {
        match &ext.val.v {
            V::Str(rel) => {
                if let Some(parent) =
                    load_file(normalize(&dir.join(rel)), Some(ext.val.loc), ctx, stack)
                {
                    base = parent;
                }
            }
            other => ctx.err(
                "bad_value",
                ext.val.loc,
                "expected a string",
                format!("`extends` must be a file path, got {}", other.type_name()),
                Some("write `extends = \"base.toml\"`".to_string()),
            ),
        }
    }
    if let Some(inc) = own.experiment.remove("include") {
        let items: Vec<Node> = match inc.val.v {
            V::Array(items) => items,
            V::Str(_) => vec![inc.val],
            other => {
                ctx.err(
                    "bad_value",
                    inc.val.loc,
                    "expected a list of paths",
                    format!(
                        "`include` must be a list of file paths, got {}",
                        other.type_name()
                    ),
                    Some("write `include = [\"a.toml\", \"b.toml\"]`".to_string()),
                );
                Vec::new()
            }
        };
        for item in items {
            match &item.v {
                V::Str(rel) => {
                    if let Some(doc) =
                        load_file(normalize(&dir.join(rel)), Some(item.loc), ctx, stack)
                    {
                        merge_include(&mut base, doc, ctx);
                    }
                }
                other => ctx.err(
                    "bad_value",
                    item.loc,
                    "expected a string",
                    format!(
                        "`include` entries must be file paths, got {}",
                        other.type_name()
                    ),
                    None,
                ),
            }
        }
    }
    merge_override(&mut base, own);
    base
}

/// The stage entries that are tables; each other one is reported.
fn only_tables(all: Table, ctx: &mut Ctx) -> Table {
    let mut stages = Table::default();
    for e in all.into_entries() {
        if matches!(e.val.v, V::Table(_)) {
            stages.insert(e);
        } else {
            ctx.err(
                "bad_value",
                e.val.loc,
                "expected a table",
                format!(
                    "stage `{}` must be a table, got {}",
                    e.key,
                    e.val.v.type_name()
                ),
                Some(format!(
                    "write `[stages.{}]` followed by `kind = \"...\"`",
                    e.key
                )),
            );
        }
    }
    stages
}

/// Merge an included document: new vars and stages are added, existing ones are duplicates;
/// its `[experiment]` keys only fill what is not set yet.
fn merge_include(base: &mut Doc, inc: Doc, ctx: &mut Ctx) {
    for e in inc.experiment.into_entries() {
        if base.experiment.get(&e.key).is_none() {
            base.experiment.insert(e);
        }
    }
    for (what, code, into, from) in [
        ("var", "duplicate_var", &mut base.vars, inc.vars),
        ("stage", "duplicate_stage", &mut base.stages, inc.stages),
    ] {
        for e in from.into_entries() {
            if let Some(first) = into.get(&e.key) {
                let labels = vec![
                    Label::new(e.key_loc, format!("{what} `{}` defined again here", e.key)),
                    Label::new(first.key_loc, "first defined here"),
                ];
                ctx.diags.labelled(
                    &ctx.sources,
                    super::code(code),
                    format!("{what} `{}` is defined twice", e.key),
                    Some(format!(
                        "rename one of them, or use `extends` to override a {what} on purpose"
                    )),
                    labels,
                );
            } else {
                into.insert(e);
            }
        }
    }
}

/// Merge the including/extending file's own content over `base`, key by key.
fn merge_override(base: &mut Doc, own: Doc) {
    // A file that extends and includes nothing merges into an empty document: its tables
    // are taken whole (re-inserting 10,000 stages one by one was a visible part of a load).
    if base.experiment.len() == 0 && base.vars.len() == 0 && base.stages.len() == 0 {
        *base = own;
        return;
    }
    for e in own.experiment.into_entries() {
        base.experiment.insert(e);
    }
    for e in own.vars.into_entries() {
        base.vars.insert(e);
    }
    for e in own.stages.into_entries() {
        match (base.stages.get_mut(&e.key), e.val.v) {
            (Some(existing), V::Table(child)) => {
                if let V::Table(parent) = &mut existing.val.v {
                    for kv in child.into_entries() {
                        parent.insert(kv);
                    }
                }
            }
            (_, v) => base.stages.insert(Entry {
                key: e.key,
                key_loc: e.key_loc,
                val: Node { loc: e.val.loc, v },
            }),
        }
    }
}

/// Lexically clean `a/./b/../c` to `a/c`, so the same file reached two ways displays alike.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    out.pop();
                } else {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::normalize;

    #[test]
    fn normalizes_lexically() {
        assert_eq!(
            normalize(Path::new("a/./b/../c.toml")),
            Path::new("a/c.toml")
        );
        assert_eq!(
            normalize(Path::new("a/parts/../../x.toml")),
            Path::new("x.toml")
        );
        assert_eq!(normalize(Path::new("../up.toml")), Path::new("../up.toml"));
        assert_eq!(
            normalize(Path::new("/r/a/../b.toml")),
            Path::new("/r/b.toml")
        );
    }
}

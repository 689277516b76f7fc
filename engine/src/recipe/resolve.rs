//! Reference resolution, output type checks, topological order and cycle reports.
//!
//! Every lookup goes through hash maps built once (`name -> index`, `base -> expansions`),
//! so resolution is linear in the number of references; a 10,000-stage recipe resolves in
//! milliseconds.
//!
//! A reference `@x.y` is first looked up as the stage `x.y`, then as output `y` of stage `x`:
//! expansion names may contain dots (`sweep/lr=0.0001`), stage names may not, so trying the
//! whole name first is what makes `@sweep/lr=0.0001` and `@sweep/lr=0.0001.model` both work.
//!
//! The order is Kahn's algorithm with a min-heap on declaration index: among the stages that
//! are ready, the one declared first comes first, so the order is stable under edits that do
//! not touch the dependencies. Stages left over are on or behind a cycle; each cycle is
//! reported once, naming every stage on it and labelling the reference that closes each edge.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use foldhash::{HashMap, HashMapExt};
use serde_json::Value;

use super::error::{Label, closest, did_you_mean, one_of};
use super::template::glob_match;
use std::collections::HashSet;

use super::expand::{Expanded, Pending, PendingRef};
use super::params::type_name;
use super::value::Loc;
use super::{Ctx, Input, StageNode};
use crate::stage::OutputSpec;

/// A stage with its resolved inputs, `after` indices and outputs, waiting to be placed.
type Slot = (Pending, Vec<Input>, Vec<usize>, Option<Vec<OutputSpec>>);

/// Why one stage must run after another (for cycle reports).
struct Edge {
    from: usize,
    loc: Loc,
}

/// Resolve `pending` into ordered stages. Problems go to `ctx`; the result is only used when
/// there are none.
pub(crate) fn resolve(expanded: Expanded, ctx: &mut Ctx) -> Vec<StageNode> {
    let Expanded {
        mut pending,
        broken,
        quiet,
        ..
    } = expanded;
    // Outputs first (lending each stage's params to its kind needs `&mut`), so that the
    // name maps below can borrow the names instead of copying 10,000 of them.
    let outputs: Vec<Option<Vec<OutputSpec>>> = pending
        .iter_mut()
        .map(|p| {
            let kind = p.kind.as_ref().filter(|_| p.ok)?;
            // Lend the params to the kind as a JSON object without copying them.
            let params = Value::Object(std::mem::take(&mut p.params));
            let outs = kind.outputs(&params);
            if let Value::Object(m) = params {
                p.params = m;
            }
            Some(outs)
        })
        .collect();
    let mut names: HashMap<&str, usize> = HashMap::with_capacity(pending.len());
    let mut bases: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in pending.iter().enumerate() {
        if names.contains_key(p.name.as_str()) {
            ctx.err(
                "duplicate_stage",
                p.name_loc,
                "defined again here",
                format!("stage `{}` is defined twice", p.name),
                Some("each stage (and each `foreach` item) needs a distinct name".to_string()),
            );
            continue;
        }
        names.insert(p.name.as_str(), i);
        if p.expanded {
            bases.entry(p.base.as_str()).or_default().push(i);
        }
    }
    let r = Resolver {
        names: &names,
        bases: &bases,
        broken: &broken,
        quiet: &quiet,
        pending: &pending,
        outputs: &outputs,
    };

    let mut preds: Vec<Vec<Edge>> = Vec::with_capacity(pending.len());
    let mut inputs: Vec<Vec<Input>> = Vec::with_capacity(pending.len());
    let mut afters: Vec<Vec<usize>> = Vec::with_capacity(pending.len());
    let mut rewrites: Vec<Vec<(usize, Vec<String>)>> = Vec::with_capacity(pending.len());
    for p in &pending {
        let mut edges = Vec::new();
        let mut ins = Vec::new();
        let mut rw = Vec::new();
        // Inputs counted per parameter; a stage has a handful of parameters, so a scan.
        let mut position: Vec<(&str, usize)> = Vec::new();
        for (k, rf) in p.refs.iter().enumerate() {
            let Some(targets) = r.resolve_ref(rf, ctx) else {
                continue;
            };
            let mut texts = Vec::with_capacity(targets.len());
            for (stage, output, written) in targets {
                let pos = match position.iter_mut().find(|(p, _)| *p == rf.param) {
                    Some((_, n)) => n,
                    None => {
                        position.push((rf.param.as_str(), 0));
                        &mut position.last_mut().expect("just pushed").1
                    }
                };
                ins.push(Input {
                    param: rf.param.clone(),
                    stage,
                    output,
                    position: *pos,
                });
                *pos += 1;
                edges.push(Edge {
                    from: stage,
                    loc: rf.loc,
                });
                texts.push(written);
            }
            rw.push((k, texts));
        }
        let mut after = Vec::new();
        for (name, loc) in &p.after {
            for stage in r.resolve_after(name, *loc, ctx) {
                after.push(stage);
                edges.push(Edge {
                    from: stage,
                    loc: *loc,
                });
            }
        }
        if ins.len() > 1 {
            // Inputs follow the schema's parameter order (the canonical params are in that
            // order; chained and swept values were checked after the recipe's own keys).
            // A stage has a handful of parameters: their rank is found by a scan.
            let rank = |param: &str| p.params.keys().position(|k| k == param);
            ins.sort_by_cached_key(|i| (rank(&i.param).unwrap_or(usize::MAX), i.position));
        }
        preds.push(edges);
        inputs.push(ins);
        afters.push(after);
        rewrites.push(rw);
    }
    for (p, rw) in pending.iter_mut().zip(&rewrites) {
        rewrite_refs(p, rw);
    }

    let Some(order) = topo(&pending, &preds, ctx) else {
        return Vec::new();
    };
    let mut pos = vec![0; pending.len()];
    for (new, &old) in order.iter().enumerate() {
        pos[old] = new;
    }
    let mut slots: Vec<Option<Slot>> = pending
        .into_iter()
        .zip(inputs)
        .zip(afters)
        .zip(outputs)
        .map(|(((p, i), a), o)| Some((p, i, a, o)))
        .collect();
    let mut out = Vec::with_capacity(slots.len());
    for &old in &order {
        let Some((p, mut ins, mut after, outs)) = slots[old].take() else {
            continue;
        };
        for i in &mut ins {
            i.stage = pos[i.stage];
        }
        for a in &mut after {
            *a = pos[*a];
        }
        after.sort_unstable();
        after.dedup();
        out.push(StageNode {
            name: p.name,
            base: p.base,
            kind: p.kind_name,
            params: Value::Object(p.params),
            inputs: ins,
            externals: p.externals,
            resources: p.resources,
            executor: p.executor,
            after,
            outputs: outs.unwrap_or_default(),
        });
    }
    out
}

struct Resolver<'a> {
    names: &'a HashMap<&'a str, usize>,
    bases: &'a HashMap<&'a str, Vec<usize>>,
    /// Stages whose expansion failed (already reported): references to them stay silent.
    broken: &'a HashSet<String>,
    /// Places of generated references whose problem is already reported (`chain` links).
    quiet: &'a HashSet<Loc>,
    pending: &'a [Pending],
    outputs: &'a [Option<Vec<OutputSpec>>],
}

impl Resolver<'_> {
    /// Resolve one reference to `(stage, output name, fully qualified text)` per target.
    fn resolve_ref(&self, rf: &PendingRef, ctx: &mut Ctx) -> Option<Vec<(usize, String, String)>> {
        let t = rf.target.as_str();
        if let Some((base, pattern)) = gather_parts(t) {
            let Some(members) = self.bases.get(base) else {
                if self.names.contains_key(base) {
                    ctx.err("ambiguous_ref", rf.loc, "not an expanded stage", format!("`@{t}` gathers the expansions of `{base}`, but `{base}` has no `foreach` or `matrix`"), Some(format!("write `@{base}` to reference the single stage")));
                } else {
                    self.missing_stage(rf.loc, base, t, ctx);
                }
                return None;
            };
            if !rf.many {
                ctx.err(
                    "ambiguous_ref",
                    rf.loc,
                    "a gather",
                    format!(
                        "`@{t}` gathers several stages, but parameter `{}` takes one reference",
                        rf.param
                    ),
                    Some(format!(
                        "reference one expansion (`@{base}/<item>`), or gather into a list \
                         parameter"
                    )),
                );
                return None;
            }
            let (matched, output) = self.glob(base, members, pattern);
            if matched.is_empty() {
                self.no_match(rf.loc, base, members, t, ctx);
                return None;
            }
            let mut out = Vec::with_capacity(matched.len());
            for &m in &matched {
                let resolved = self.output_of(m, output, rf, ctx)?;
                let text = ref_text(&self.pending[m].name, output);
                out.push((m, resolved, text));
            }
            return Some(out);
        }
        let (stage, output) = if let Some(&i) = self.names.get(t) {
            (i, None)
        } else if let Some((i, o)) = t
            .rsplit_once('.')
            .and_then(|(n, o)| self.names.get(n).map(|&i| (i, o)))
        {
            (i, Some(o))
        } else {
            let stem = t.rsplit_once('.').map_or(t, |(n, _)| n);
            let base = if self.bases.contains_key(t) { t } else { stem };
            if self.bases.contains_key(base) {
                ctx.err("ambiguous_ref", rf.loc, "expanded stage", format!("`@{t}` is ambiguous: `{base}` is expanded by `foreach` or `matrix`"), Some(format!("reference one expansion (`@{base}/{{item}}`) or gather all of them (`@{base}/*`)")));
            } else {
                self.missing_stage(rf.loc, stem, t, ctx);
            }
            return None;
        };
        let resolved = self.output_of(stage, output, rf, ctx)?;
        let text = ref_text(&self.pending[stage].name, output);
        Some(vec![(stage, resolved, text)])
    }

    /// The output `output` (default: the first) of `stage`, type-checked against the
    /// reference. A stage whose own parameters are invalid has no known outputs; references
    /// to it are accepted silently, since its own problem is already reported.
    fn output_of(
        &self,
        stage: usize,
        output: Option<&str>,
        rf: &PendingRef,
        ctx: &mut Ctx,
    ) -> Option<String> {
        let Some(outs) = &self.outputs[stage] else {
            return Some(output.unwrap_or_default().to_string());
        };
        let name = &self.pending[stage].name;
        let spec = match output {
            None => match outs.first() {
                Some(o) => o,
                None => {
                    ctx.err(
                        "missing_output",
                        rf.loc,
                        "no outputs",
                        format!(
                            "`@{}` names stage `{name}`, which has no outputs",
                            rf.target
                        ),
                        None,
                    );
                    return None;
                }
            },
            Some(o) => match outs.iter().find(|s| s.name == o) {
                Some(s) => s,
                None => {
                    let help = did_you_mean(o, outs.iter().map(|s| s.name)).unwrap_or_else(|| {
                        format!("`{name}` has {}", one_of(outs.iter().map(|s| s.name)))
                    });
                    ctx.err(
                        "missing_output",
                        rf.loc,
                        "no such output",
                        format!("stage `{name}` has no output `{o}`"),
                        Some(help),
                    );
                    return None;
                }
            },
        };
        if !spec.ty.fits(rf.want) {
            let msg = format!(
                "`{}` of `{name}` is a `{}`, but parameter `{}` takes a `{}`",
                spec.name,
                type_name(spec.ty),
                rf.param,
                type_name(rf.want)
            );
            let label = format!("this is a `{}`", type_name(spec.ty));
            let help = outs.iter().find(|s| s.ty.fits(rf.want)).map_or_else(
                || format!("reference a stage with a `{}` output", type_name(rf.want)),
                |s| {
                    format!(
                        "`{name}` has a `{}` output: `@{name}.{}`",
                        type_name(s.ty),
                        s.name
                    )
                },
            );
            ctx.err("output_type", rf.loc, &label, msg, Some(help));
            return None;
        }
        Some(spec.name.to_string())
    }

    fn missing_stage(&self, loc: Loc, stem: &str, written: &str, ctx: &mut Ctx) {
        let base = stem.split_once('/').map_or(stem, |(b, _)| b);
        if self.broken.contains(base) || self.quiet.contains(&loc) {
            return;
        }
        if let Some((base, _)) = stem.split_once('/')
            && self.names.contains_key(base)
            && !self.bases.contains_key(base)
        {
            ctx.err("missing_stage", loc, "no such expansion", format!("`@{written}`: stage `{base}` has no `foreach` or `matrix`, so it has no expansions"), Some(format!("write `@{base}`, or add `foreach` to `{base}`")));
            return;
        }
        if let Some((base, item)) = stem.split_once('/')
            && let Some(members) = self.bases.get(base)
        {
            let items = members
                .iter()
                .filter_map(|&m| self.pending[m].name.split_once('/').map(|(_, i)| i));
            let help = closest(item, items.clone()).map_or_else(
                || format!("`{base}` has {}", one_of(items.take(8))),
                |c| format!("did you mean `@{base}/{c}`?"),
            );
            ctx.err(
                "missing_stage",
                loc,
                "no such expansion",
                format!("`@{written}`: stage `{base}` has no expansion `{item}`"),
                Some(help),
            );
            return;
        }
        let bases = self.bases.keys().copied();
        let plain = self
            .pending
            .iter()
            .filter(|p| !p.expanded)
            .map(|p| p.name.as_str());
        let help = did_you_mean(stem, bases.chain(plain)).unwrap_or_else(|| "references name a stage of this recipe: `@stage`, `@stage/item`, `@stage.output`, `@stage/*`".to_string());
        ctx.err(
            "missing_stage",
            loc,
            "no such stage",
            format!("`@{written}` refers to a stage `{stem}` that does not exist"),
            Some(help),
        );
    }

    /// The expansions of `base` whose suffix matches `pattern`, in expansion order, and the
    /// output named after the pattern. As for `@x.y`, the whole pattern is tried first
    /// (suffixes may contain dots, `lr=0.0001`), then `<pattern>.<output>`.
    fn glob<'t>(
        &self,
        base: &str,
        members: &[usize],
        pattern: &'t str,
    ) -> (Vec<usize>, Option<&'t str>) {
        if pattern == "*" {
            return (members.to_vec(), None);
        }
        let matching = |p: &str| -> Vec<usize> {
            members
                .iter()
                .copied()
                .filter(|&m| glob_match(p, &self.pending[m].name[base.len() + 1..]))
                .collect()
        };
        let whole = matching(pattern);
        if !whole.is_empty() {
            return (whole, None);
        }
        match pattern.rsplit_once('.') {
            Some((head, output)) if !output.contains('*') => (matching(head), Some(output)),
            _ => (Vec::new(), None),
        }
    }

    /// A gather pattern that matches nothing: list what there is.
    fn no_match(&self, loc: Loc, base: &str, members: &[usize], written: &str, ctx: &mut Ctx) {
        const SHOWN: usize = 8;
        let suffixes = members
            .iter()
            .map(|&m| &self.pending[m].name[base.len() + 1..]);
        let shown: Vec<String> = suffixes.take(SHOWN).map(|s| format!("`{s}`")).collect();
        let more = match members.len().saturating_sub(SHOWN) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let help = format!(
            "`{base}` has {} expansions: {}{more}; `*` matches any run of characters",
            members.len(),
            shown.join(", ")
        );
        ctx.err(
            "missing_stage",
            loc,
            "matches nothing",
            format!("`@{written}` matches no expansion of `{base}`"),
            Some(help),
        );
    }

    fn resolve_after(&self, name: &str, loc: Loc, ctx: &mut Ctx) -> Vec<usize> {
        if let Some(&i) = self.names.get(name) {
            return vec![i];
        }
        if let Some(members) = self.bases.get(name) {
            return members.clone();
        }
        if self
            .broken
            .contains(name.split_once('/').map_or(name, |(b, _)| b))
        {
            return Vec::new();
        }
        let candidates = self.bases.keys().copied().chain(
            self.pending
                .iter()
                .filter(|p| !p.expanded)
                .map(|p| p.name.as_str()),
        );
        let help = did_you_mean(name, candidates)
            .unwrap_or_else(|| "`after` names stages of this recipe".to_string());
        ctx.err(
            "missing_stage",
            loc,
            "no such stage",
            format!("`after` names a stage `{name}` that does not exist"),
            Some(help),
        );
        Vec::new()
    }
}

/// A gather `x/<pattern>` (the pattern has a `*`, and may end in `.output`) ->
/// (`x`, pattern).
/// The fully qualified text of a reference, `@stage` or `@stage.output`: built by hand,
/// since `format!` costs several times more and a generated recipe has one per stage.
fn ref_text(stage: &str, output: Option<&str>) -> String {
    let mut s = String::with_capacity(2 + stage.len() + output.map_or(0, str::len));
    s.push('@');
    s.push_str(stage);
    if let Some(o) = output {
        s.push('.');
        s.push_str(o);
    }
    s
}

pub(crate) fn gather_parts(t: &str) -> Option<(&str, &str)> {
    let (base, pattern) = t.split_once('/')?;
    pattern.contains('*').then_some((base, pattern))
}

/// Replace each reference string by its fully qualified form; a gather becomes a list,
/// spliced into the enclosing list if it was an element of one.
fn rewrite_refs(p: &mut Pending, rewrites: &[(usize, Vec<String>)]) {
    // Reverse order: splicing a gather into a list shifts the indices after it.
    for (k, texts) in rewrites.iter().rev() {
        let rf = &p.refs[*k];
        let gather = gather_parts(&rf.target).is_some();
        let Some(root) = p.params.get_mut(&rf.param) else {
            continue;
        };
        let Some((last, parent_path)) = rf.pointer.split_last() else {
            *root = if gather {
                Value::Array(texts.iter().cloned().map(Value::String).collect())
            } else {
                texts.first().cloned().map_or(Value::Null, Value::String)
            };
            continue;
        };
        let ptr: String = parent_path.iter().map(|i| format!("/{i}")).collect();
        let Some(list) = root.pointer_mut(&ptr).and_then(Value::as_array_mut) else {
            continue;
        };
        if *last >= list.len() {
            continue;
        }
        if gather {
            list.splice(*last..=*last, texts.iter().cloned().map(Value::String));
        } else if let Some(t) = texts.first() {
            list[*last] = Value::String(t.clone());
        }
    }
}

/// Topological order (declaration order breaks ties), or `None` after reporting cycles.
fn topo(pending: &[Pending], preds: &[Vec<Edge>], ctx: &mut Ctx) -> Option<Vec<usize>> {
    let n = pending.len();
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indeg = vec![0usize; n];
    for (to, edges) in preds.iter().enumerate() {
        for e in edges {
            succ[e.from].push(to);
            indeg[to] += 1;
        }
    }
    let mut heap: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indeg[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = heap.pop() {
        order.push(i);
        for &s in &succ[i] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                heap.push(Reverse(s));
            }
        }
    }
    if order.len() == n {
        return Some(order);
    }
    report_cycles(pending, preds, &succ, &indeg, ctx);
    None
}

/// Every stage left by Kahn's algorithm has a predecessor also left, so walking predecessors
/// from any of them must reach a cycle. Report each cycle once; stages merely downstream of
/// a reported cycle are not reported again.
fn report_cycles(
    pending: &[Pending],
    preds: &[Vec<Edge>],
    succ: &[Vec<usize>],
    indeg: &[usize],
    ctx: &mut Ctx,
) {
    let n = pending.len();
    let left = |i: usize| indeg[i] > 0;
    let mut explained = vec![false; n];
    for start in 0..n {
        if !left(start) || explained[start] {
            continue;
        }
        let mut seen_at: HashMap<usize, usize> = HashMap::new();
        let mut walk = vec![start];
        let cycle = loop {
            let cur = *walk.last().unwrap_or(&start);
            seen_at.insert(cur, walk.len() - 1);
            let Some(e) = preds[cur]
                .iter()
                .filter(|e| left(e.from))
                .min_by_key(|e| e.from)
            else {
                break None;
            };
            if explained[e.from] {
                break None;
            }
            if let Some(&at) = seen_at.get(&e.from) {
                break Some(walk[at..].to_vec());
            }
            walk.push(e.from);
        };
        for &w in &walk {
            explained[w] = true;
        }
        let Some(mut cycle) = cycle else { continue };
        // `cycle` runs against the edges (consumer first); turn it into data-flow order,
        // starting from the stage declared first.
        cycle.reverse();
        let first = cycle
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| **s)
            .map_or(0, |(k, _)| k);
        cycle.rotate_left(first);
        let mut labels = Vec::new();
        let mut path: Vec<String> = cycle
            .iter()
            .map(|&s| format!("`{}`", pending[s].name))
            .collect();
        path.push(path[0].clone());
        for (k, &from) in cycle.iter().enumerate() {
            let to = cycle[(k + 1) % cycle.len()];
            if let Some(e) = preds[to].iter().find(|e| e.from == from) {
                labels.push(Label::new(
                    e.loc,
                    format!("`{}` needs `{}` here", pending[to].name, pending[from].name),
                ));
            }
        }
        ctx.diags.labelled(
            &ctx.sources,
            super::code("cycle"),
            format!(
                "stages depend on each other in a cycle: {}",
                path.join(" -> ")
            ),
            Some("remove one of the labelled references or `after` entries".to_string()),
            labels,
        );
        // Everything downstream of the cycle is blocked by it, not by a cycle of its own.
        let mut stack = cycle;
        while let Some(s) = stack.pop() {
            for &t in &succ[s] {
                if !explained[t] {
                    explained[t] = true;
                    stack.push(t);
                }
            }
        }
    }
}

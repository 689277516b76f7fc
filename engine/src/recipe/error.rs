//! Recipe diagnostics.
//!
//! Every problem found in a recipe is a [`Problem`]: a stable code
//! (`pipeline::recipe::unknown_kind`), a lower-case message, a help line that says how to fix
//! it, and labelled spans into the text it came from — a recipe file, a file it extends or
//! includes, or the `--set` command line, which is a source of its own so that a bad override
//! is pointed at exactly like a bad line in a file.
//!
//! Loading never stops at the first problem: [`RecipeError`] carries all of them as miette
//! `related` diagnostics, so one run of `pipeline plan` shows everything to fix. The same
//! problem found in several expansions of a `foreach` stage is reported once.
//!
//! | code (`pipeline::recipe::…`) | meaning |
//! |---|---|
//! | `io` | the recipe file itself cannot be read |
//! | `toml_syntax` | invalid TOML (every error of a file, via the recovering parser) |
//! | `missing_file` | an `extends`/`include` path cannot be read |
//! | `extends_cycle` | files extend or include each other in a cycle |
//! | `unknown_key` | a key outside the language (top level, `[experiment]`, `resources`) |
//! | `bad_value` | a reserved key with a wrong value (`foreach`, `matrix`, `chain`, `executor`...) |
//! | `bad_name` | a stage name with characters other than letters, digits, `-`, `_` |
//! | `unknown_kind` | no registered kind of that name (with did-you-mean) |
//! | `unknown_param` | the kind has no such parameter (with did-you-mean) |
//! | `mistyped_param` | a parameter value of the wrong type |
//! | `missing_param` | a required parameter (or `kind`) is absent |
//! | `unknown_var` | `foreach`/`matrix` names a var that is not defined |
//! | `missing_stage` | a reference or `after` names no stage or expansion |
//! | `missing_output` | a reference names an output the stage does not have |
//! | `output_type` | the referenced output's type does not fit the parameter |
//! | `ambiguous_ref` | `@x` to an expanded stage, or `@x/*` to a plain one |
//! | `duplicate_stage`, `duplicate_var` | defined twice (includes, repeated `foreach` items) |
//! | `cycle` | stages depend on each other in a cycle (every stage named, every edge labelled) |
//! | `chain_mismatch` | `chain` links to a stage not expanded like the chained one |
//! | `bad_set` | a `--set` path that names nothing |
//!
//! `Diagnostic` is implemented by hand rather than derived because codes, the number of
//! labels (a cycle labels every edge) and the source vary per problem.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};

use super::value::Loc;

/// The texts a recipe was read from; a [`Loc`] indexes into this list.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    list: Vec<(String, Arc<str>)>,
}

impl Sources {
    pub(crate) fn add(&mut self, name: String, text: Arc<str>) -> u32 {
        self.list.push((name, text));
        u32::try_from(self.list.len() - 1).unwrap_or(u32::MAX)
    }

    pub(crate) fn named(&self, src: u32) -> Option<NamedSource<Arc<str>>> {
        let (name, text) = self.list.get(src as usize)?;
        Some(NamedSource::new(name, Arc::clone(text)).with_language("toml"))
    }

    pub(crate) fn name(&self, src: u32) -> &str {
        self.list.get(src as usize).map_or("", |(n, _)| n.as_str())
    }
}

/// One problem in a recipe, rendered by miette with its source and labels.
#[derive(Debug)]
pub struct Problem {
    code: &'static str,
    message: String,
    help: Option<String>,
    source: Option<NamedSource<Arc<str>>>,
    labels: Vec<LabeledSpan>,
    related: Vec<Problem>,
    /// Sort key: (source id, start offset), so problems are listed in document order.
    order: (u32, u32),
}

impl Problem {
    /// The stable code, e.g. `pipeline::recipe::unknown_kind`.
    #[must_use]
    pub fn code_str(&self) -> &'static str {
        self.code
    }

    /// The one-line message.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The help line, if any.
    #[must_use]
    pub fn help_text(&self) -> Option<&str> {
        self.help.as_deref()
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.source.as_ref().map(|s| s as &dyn SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() || self.source.is_none() {
            return None;
        }
        Some(Box::new(self.labels.iter().cloned()))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        if self.related.is_empty() {
            return None;
        }
        Some(Box::new(self.related.iter().map(|p| p as &dyn Diagnostic)))
    }
}

/// A recipe that cannot be loaded, with every problem found in it.
#[derive(Debug)]
pub struct RecipeError {
    path: String,
    problems: Vec<Problem>,
}

impl RecipeError {
    /// All problems, in document order.
    #[must_use]
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The stable codes of all problems, in order (handy in tests and `--json`).
    #[must_use]
    pub fn codes(&self) -> Vec<&'static str> {
        self.problems.iter().map(|p| p.code).collect()
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.len() {
            1 => write!(f, "recipe `{}` is invalid (1 error)", self.path),
            n => write!(f, "recipe `{}` is invalid ({n} errors)", self.path),
        }
    }
}

impl std::error::Error for RecipeError {}

impl Diagnostic for RecipeError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new("pipeline::recipe::invalid"))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(self.problems.iter().map(|p| p as &dyn Diagnostic)))
    }
}

/// A label to attach to a problem: where, and what to say there.
pub(crate) struct Label {
    pub loc: Loc,
    pub text: String,
}

impl Label {
    pub(crate) fn new(loc: Loc, text: impl Into<String>) -> Self {
        Self {
            loc,
            text: text.into(),
        }
    }
}

/// Collects problems while a recipe is loaded, keeping one problem per code and place: the
/// same template checked in every expansion of a `foreach` stage reports once.
#[derive(Default)]
pub(crate) struct Diags {
    problems: Vec<Problem>,
    seen: HashSet<(&'static str, Loc)>,
}

impl Diags {
    pub(crate) fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// A problem with one label.
    pub(crate) fn at(
        &mut self,
        sources: &Sources,
        code: &'static str,
        loc: Loc,
        label: &str,
        message: String,
        help: impl Into<Option<String>>,
    ) {
        self.labelled(
            sources,
            code,
            message,
            help.into(),
            vec![Label::new(loc, label)],
        );
    }

    /// A problem with any number of labels; labels in other sources than the first one's
    /// become related notes, because one miette diagnostic shows one source.
    pub(crate) fn labelled(
        &mut self,
        sources: &Sources,
        code: &'static str,
        message: String,
        help: Option<String>,
        labels: Vec<Label>,
    ) {
        let Some(first) = labels.first().map(|l| l.loc) else {
            self.plain(code, message, help);
            return;
        };
        if !self.seen.insert((code, first)) {
            return;
        }
        let mut here = Vec::new();
        let mut elsewhere: Vec<(u32, Vec<LabeledSpan>)> = Vec::new();
        for l in labels {
            let span = LabeledSpan::new(
                Some(l.text),
                l.loc.start as usize,
                (l.loc.end - l.loc.start) as usize,
            );
            if l.loc.src == first.src {
                here.push(span);
            } else if let Some((_, v)) = elsewhere.iter_mut().find(|(s, _)| *s == l.loc.src) {
                v.push(span);
            } else {
                elsewhere.push((l.loc.src, vec![span]));
            }
        }
        let related = elsewhere
            .into_iter()
            .map(|(src, labels)| Problem {
                code,
                message: format!("(continued in `{}`)", sources.name(src)),
                help: None,
                source: sources.named(src),
                labels,
                related: Vec::new(),
                order: (src, 0),
            })
            .collect();
        self.problems.push(Problem {
            code,
            message,
            help,
            source: sources.named(first.src),
            labels: here,
            related,
            order: (first.src, first.start),
        });
    }

    /// A problem with no place in any source (an unreadable top-level file).
    pub(crate) fn plain(&mut self, code: &'static str, message: String, help: Option<String>) {
        self.problems.push(Problem {
            code,
            message,
            help,
            source: None,
            labels: Vec::new(),
            related: Vec::new(),
            order: (0, 0),
        });
    }

    pub(crate) fn into_error(mut self, path: String) -> RecipeError {
        // Stable sort: problems at the same place keep the order they were found in.
        self.problems.sort_by_key(|p| p.order);
        RecipeError {
            path,
            problems: self.problems,
        }
    }
}

/// `help` line suggesting the closest candidate, if one is close enough.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// The candidate closest to `word` by Jaro-Winkler similarity, if it is similar enough to be
/// a plausible typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(word, c);
        if score > 0.8 && best.is_none_or(|(b, _)| score > b) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c)
}

/// `a`, `a` or `b`, `a`, `b` or `c`: a list of names for help lines.
pub(crate) fn one_of<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    match names.as_slice() {
        [] => "nothing".to_string(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

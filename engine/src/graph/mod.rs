//! The stage graph of a loaded recipe: order, selection and rendering.
//!
//! [`Graph`] is a petgraph `DiGraph` whose node `i` is stage `i` of [`Recipe::stages`] and
//! whose edges run from producer to consumer (an [`Edge`] per input parameter, or `after`).
//! The recipe loader has already rejected cycles and ordered the stages topologically, so the
//! graph answers the questions the CLI asks:
//!
//! - [`Graph::topo_order`]: the order to run in (the recipe's, which is topological with
//!   declaration order breaking ties, so it is stable across runs);
//! - [`Graph::select`]: which stages `--only`, `--from`, `--until` pick. Each given flag is a
//!   filter and the filters intersect:
//!   `--only X` is X alone (its inputs must already be cached, which the executor checks);
//!   `--from X` is X and everything downstream; `--until X` is X and everything upstream.
//!   `--from A --until B` is thus the stages between A and B. A name matches a stage exactly
//!   or, for `foreach`/`matrix` stages, by its base name (`task` selects every `task/*`);
//! - [`Graph::to_dot`] and [`Graph::to_mermaid`]: stable text renderings (same recipe, same
//!   bytes), with expansions of one stage grouped in a cluster/subgraph.

mod render;

use std::collections::HashMap;

use miette::Diagnostic;
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed, Walker};

use crate::recipe::Recipe;

/// Why an edge exists: the consumer's parameter reading the producer, or `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edge {
    /// The consumer's parameter `param` reads an output of the producer.
    Input {
        /// Parameter name.
        param: String,
        /// Output name.
        output: String,
    },
    /// An explicit `after = [...]` ordering edge.
    After,
}

/// A stage selection that names no stage.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("no stage `{name}` in this recipe (`--{flag}`)")]
#[diagnostic(code(pipeline::graph::unknown_stage))]
pub struct SelectError {
    /// The flag (`only`, `from`, `until`).
    pub flag: &'static str,
    /// The name as given.
    pub name: String,
    /// A suggestion.
    #[help]
    pub help: Option<String>,
}

/// The stage graph of one recipe.
#[derive(Debug)]
pub struct Graph<'r> {
    recipe: &'r Recipe,
    graph: DiGraph<usize, Edge>,
    by_name: HashMap<&'r str, usize>,
    by_base: HashMap<&'r str, Vec<usize>>,
}

impl<'r> Graph<'r> {
    /// Build the graph of `recipe` (node `i` is `recipe.stages[i]`).
    #[must_use]
    pub fn new(recipe: &'r Recipe) -> Self {
        let n = recipe.stages.len();
        let mut graph = DiGraph::with_capacity(n, n);
        for i in 0..n {
            graph.add_node(i);
        }
        let mut by_name = HashMap::with_capacity(n);
        let mut by_base: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, s) in recipe.stages.iter().enumerate() {
            by_name.insert(s.name.as_str(), i);
            if s.base != s.name {
                by_base.entry(s.base.as_str()).or_default().push(i);
            }
            for input in &s.inputs {
                graph.add_edge(
                    NodeIndex::new(input.stage),
                    NodeIndex::new(i),
                    Edge::Input {
                        param: input.param.clone(),
                        output: input.output.clone(),
                    },
                );
            }
            for &a in &s.after {
                graph.add_edge(NodeIndex::new(a), NodeIndex::new(i), Edge::After);
            }
        }
        Self {
            recipe,
            graph,
            by_name,
            by_base,
        }
    }

    /// The recipe this graph was built from.
    #[must_use]
    pub fn recipe(&self) -> &'r Recipe {
        self.recipe
    }

    /// The underlying petgraph graph (node weight = stage index).
    #[must_use]
    pub fn inner(&self) -> &DiGraph<usize, Edge> {
        &self.graph
    }

    /// Stage indices in run order. The loader already sorted the stages, so this is
    /// `0..n`; it exists so callers do not depend on that detail.
    #[must_use]
    pub fn topo_order(&self) -> Vec<usize> {
        (0..self.recipe.stages.len()).collect()
    }

    /// The stage named exactly `name`.
    #[must_use]
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Direct producers of stage `i` (deduplicated, ascending).
    #[must_use]
    pub fn dependencies(&self, i: usize) -> Vec<usize> {
        self.neighbors(i, Direction::Incoming)
    }

    /// Direct consumers of stage `i` (deduplicated, ascending).
    #[must_use]
    pub fn dependents(&self, i: usize) -> Vec<usize> {
        self.neighbors(i, Direction::Outgoing)
    }

    fn neighbors(&self, i: usize, dir: Direction) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), dir)
            .map(NodeIndex::index)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Stage `i` and everything that (transitively) depends on it.
    #[must_use]
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = Dfs::new(&self.graph, NodeIndex::new(i))
            .iter(&self.graph)
            .map(NodeIndex::index)
            .collect();
        v.sort_unstable();
        v
    }

    /// Stage `i` and everything it (transitively) depends on.
    #[must_use]
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        let rev = Reversed(&self.graph);
        let mut v: Vec<usize> = Dfs::new(rev, NodeIndex::new(i))
            .iter(rev)
            .map(NodeIndex::index)
            .collect();
        v.sort_unstable();
        v
    }

    /// Resolve a selection name: an exact stage name or the base name of expansions.
    ///
    /// # Errors
    /// [`SelectError`] with a did-you-mean suggestion when nothing matches.
    pub fn matching(&self, flag: &'static str, name: &str) -> Result<Vec<usize>, SelectError> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok(vec![i]);
        }
        if let Some(v) = self.by_base.get(name) {
            return Ok(v.clone());
        }
        let mut best: Option<(f64, &str)> = None;
        for c in self.by_base.keys().chain(self.by_name.keys()) {
            let score = strsim::jaro_winkler(name, c);
            if score > 0.8 && best.is_none_or(|(b, _)| score > b) {
                best = Some((score, c));
            }
        }
        let help = best
            .map(|(_, c)| format!("did you mean `{c}`?"))
            .or_else(|| Some("`pipeline plan` lists the stages".to_string()));
        Err(SelectError {
            flag,
            name: name.to_string(),
            help,
        })
    }

    /// The stages to run for `--only`, `--from` and `--until` (each a list of names; an
    /// empty list is no filter). The result is in run order.
    ///
    /// # Errors
    /// [`SelectError`] for the first name that matches no stage.
    pub fn select(
        &self,
        only: &[String],
        from: &[String],
        until: &[String],
    ) -> Result<Vec<usize>, SelectError> {
        let n = self.recipe.stages.len();
        let mut keep = vec![true; n];
        let mut filter = |flag: &'static str,
                          names: &[String],
                          expand: &dyn Fn(usize) -> Vec<usize>|
         -> Result<(), SelectError> {
            if names.is_empty() {
                return Ok(());
            }
            let mut hit = vec![false; n];
            for name in names {
                for i in self.matching(flag, name)? {
                    for j in expand(i) {
                        hit[j] = true;
                    }
                }
            }
            for (k, h) in keep.iter_mut().zip(hit) {
                *k &= h;
            }
            Ok(())
        };
        filter("only", only, &|i| vec![i])?;
        filter("from", from, &|i| self.descendants(i))?;
        filter("until", until, &|i| self.ancestors(i))?;
        Ok((0..n).filter(|&i| keep[i]).collect())
    }

    /// Graphviz DOT text of the graph (stable output).
    #[must_use]
    pub fn to_dot(&self) -> String {
        render::dot(self)
    }

    /// Mermaid flowchart text of the graph (stable output).
    #[must_use]
    pub fn to_mermaid(&self) -> String {
        render::mermaid(self)
    }
}

//! `pipeline dag`: the stage graph as Graphviz dot or a Mermaid flowchart.

use engine::graph::Graph;

use super::{CmdResult, load, out, registry};
use crate::cli::{DagArgs, DagFormat, GlobalArgs};

pub fn dag(_g: &GlobalArgs, args: &DagArgs) -> CmdResult {
    let registry = registry();
    let recipe = load(&args.recipe.recipe, &args.recipe.set, &registry)?;
    let graph = Graph::new(&recipe);
    let text = match args.format {
        DagFormat::Dot => graph.to_dot(),
        DagFormat::Mermaid => graph.to_mermaid(),
    };
    out(&text);
    if !text.ends_with('\n') {
        out("\n");
    }
    Ok(0)
}

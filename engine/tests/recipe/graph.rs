//! Graph: order, selection (`--only`, `--from`, `--until`), DOT and Mermaid output.

use engine::graph::Graph;

use super::load;

fn loaded() -> engine::recipe::Recipe {
    load("ok/coin_chain.toml", &[r#"vars.tasks=["A","B"]"#])
        .unwrap_or_else(|e| panic!("{}", super::render(&e)))
}

fn sel(g: &Graph<'_>, only: &[&str], from: &[&str], until: &[&str]) -> Vec<String> {
    let v = |x: &[&str]| x.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    let picked = g
        .select(&v(only), &v(from), &v(until))
        .unwrap_or_else(|e| panic!("{e}"));
    picked
        .into_iter()
        .map(|i| g.recipe().stages[i].name.clone())
        .collect()
}

#[test]
fn topo_order_respects_every_edge() {
    let r = loaded();
    let g = Graph::new(&r);
    let order = g.topo_order();
    let pos: Vec<usize> = {
        let mut p = vec![0; order.len()];
        for (k, &i) in order.iter().enumerate() {
            p[i] = k;
        }
        p
    };
    for e in g.inner().raw_edges() {
        assert!(pos[e.source().index()] < pos[e.target().index()]);
    }
    assert_eq!(g.inner().node_count(), r.stages.len());
    // declaration order breaks ties: coin, then the asd expansions, then base.
    let names: Vec<&str> = order.iter().map(|&i| r.stages[i].name.as_str()).collect();
    assert_eq!(&names[..4], &["coin", "asd/A", "asd/B", "base"]);
}

#[test]
fn selection() {
    let r = loaded();
    let g = Graph::new(&r);
    assert_eq!(
        sel(&g, &[], &[], &[]).len(),
        r.stages.len(),
        "no flag selects everything"
    );
    assert_eq!(sel(&g, &["base"], &[], &[]), vec!["base"]);
    assert_eq!(
        sel(&g, &["task"], &[], &[]),
        vec!["task/A", "task/B"],
        "a base name selects its expansions"
    );
    assert_eq!(
        sel(&g, &[], &["task/B"], &[]),
        vec!["task/B", "eval/B", "metrics", "report"]
    );
    assert_eq!(
        sel(&g, &[], &[], &["task/A"]),
        vec!["coin", "asd/A", "base", "task/A"]
    );
    assert_eq!(
        sel(&g, &[], &["base"], &["eval/A"]),
        vec!["base", "task/A", "eval/A"],
        "from and until intersect"
    );
    assert_eq!(
        sel(&g, &[], &[], &["report"]).len(),
        r.stages.len(),
        "report needs everything"
    );
}

#[test]
fn selection_errors_suggest() {
    let r = loaded();
    let g = Graph::new(&r);
    let err = g
        .select(&["tsak".to_string()], &[], &[])
        .expect_err("no such stage");
    assert_eq!(err.help.as_deref(), Some("did you mean `task`?"));
    insta::assert_snapshot!("select_error", super::render(&err));
}

#[test]
fn neighbours() {
    let r = loaded();
    let g = Graph::new(&r);
    let i = g.index_of("task/B").expect("exists");
    let deps: Vec<&str> = g
        .dependencies(i)
        .into_iter()
        .map(|j| r.stages[j].name.as_str())
        .collect();
    assert_eq!(deps, vec!["asd/B", "task/A"]);
    let users: Vec<&str> = g
        .dependents(i)
        .into_iter()
        .map(|j| r.stages[j].name.as_str())
        .collect();
    assert_eq!(users, vec!["eval/B"]);
}

#[test]
fn dot_and_mermaid() {
    let r = loaded();
    let g = Graph::new(&r);
    assert_eq!(g.to_dot(), Graph::new(&r).to_dot(), "stable");
    insta::assert_snapshot!("dot", g.to_dot());
    insta::assert_snapshot!("mermaid", g.to_mermaid());
}

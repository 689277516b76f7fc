//! `plan` and `explain`.

use std::collections::BTreeSet;

use engine::exec::KeyEnv;
use engine::plan::{self, Status};

use crate::{CHAIN, Project};

#[test]
fn plan_says_hit_run_and_maybe() {
    let p = Project::new();
    let recipe = p.load(CHAIN, &[]);
    let cold = plan::plan(
        &recipe,
        &p.registry,
        &p.cache,
        &KeyEnv::default(),
        &BTreeSet::new(),
    );
    let statuses: Vec<Status> = cold.rows.iter().map(|r| r.status).collect();
    // a never ran; b and c have never run either, so they certainly run.
    assert_eq!(statuses, [Status::Run, Status::Run, Status::Run]);
    p.run(CHAIN);

    let warm = plan::plan(
        &recipe,
        &p.registry,
        &p.cache,
        &KeyEnv::default(),
        &BTreeSet::new(),
    );
    assert!(warm.rows.iter().all(|r| r.status == Status::Hit));

    // Editing a: b and c depend on whether a's bytes change: maybe. Editing b's q as well
    // makes b a certain run with both reasons listed.
    let edited = p.load(
        &CHAIN
            .replacen("p = 1", "p = 10", 1)
            .replacen("p = 2", "p = 2\nq = 1", 1),
        &[],
    );
    let plan = plan::plan(
        &edited,
        &p.registry,
        &p.cache,
        &KeyEnv::default(),
        &BTreeSet::new(),
    );
    let rows: Vec<(Status, Vec<String>)> = plan
        .rows
        .iter()
        .map(|r| {
            (
                r.status,
                r.reasons.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(
        rows[0],
        (Status::Run, vec!["param `p` changed (1 → 10)".to_owned()])
    );
    assert_eq!(
        rows[1],
        (
            Status::Run,
            vec![
                "param `q` changed (0 → 1)".to_owned(),
                "input `deps` changed (upstream `a` reran)".to_owned()
            ]
        )
    );
    assert_eq!(
        rows[2],
        (
            Status::Maybe,
            vec!["input `deps` changed (upstream `b` reran)".to_owned()]
        )
    );
}

#[test]
fn explain_lists_every_difference_even_for_a_reverted_hit() {
    let p = Project::new();
    p.run(CHAIN);
    p.run(&CHAIN.replacen("p = 3", "p = 30", 1));
    let recipe = p.load(CHAIN, &[]);
    let c = recipe.index_of("c").unwrap();
    let e = plan::explain(&recipe, &p.registry, &p.cache, &KeyEnv::default(), c);
    assert_eq!(e.row.status, Status::Hit);
    let diffs: Vec<String> = e.differences.iter().map(ToString::to_string).collect();
    assert_eq!(diffs, ["param `p` changed (30 → 3)"]);
    assert!(e.previous_key.is_some());
}

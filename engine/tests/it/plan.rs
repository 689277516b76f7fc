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

/// A join stage reading many stages that may rerun: one `input-changed` per upstream, in
/// input order, and the plan stays `maybe` (this shape used to make planning quadratic).
#[test]
fn fan_in_join_lists_each_rerunning_upstream_once() {
    const N: usize = 40;
    let fan = |root_p: u32| {
        let mut s = format!(
            "[experiment]\nname = \"t\"\nseed = 1\n\n[stages.root]\nkind = \"test.echo\"\np = {root_p}\n"
        );
        let mut deps = Vec::new();
        for i in 0..N {
            s.push_str(&format!(
                "\n[stages.m{i:02}]\nkind = \"test.echo\"\np = {i}\ndeps = [\"@root\"]\n"
            ));
            deps.push(format!("\"@m{i:02}\""));
        }
        s.push_str(&format!(
            "\n[stages.join]\nkind = \"test.echo\"\np = 0\ndeps = [{}]\n",
            deps.join(", ")
        ));
        s
    };
    let p = Project::new();
    p.run(&fan(1));
    let edited = p.load(&fan(2), &[]);
    let plan = plan::plan(
        &edited,
        &p.registry,
        &p.cache,
        &KeyEnv::default(),
        &BTreeSet::new(),
    );
    let join = plan.rows.iter().find(|r| r.stage == "join").unwrap();
    assert_eq!(join.status, Status::Maybe);
    let reasons: Vec<String> = join.reasons.iter().map(ToString::to_string).collect();
    let expected: Vec<String> = (0..N)
        .map(|i| format!("input `deps` changed (upstream `m{i:02}` reran)"))
        .collect();
    assert_eq!(reasons, expected);
}

//! Successful loads: foreach, chain, gather, named outputs, matrix sharing, extends/include
//! and `--set` overrides.

use std::fmt::Write as _;
use std::path::PathBuf;

use engine::recipe::{Input, Recipe};
use serde_json::json;

use super::load;

fn names(r: &Recipe) -> Vec<&str> {
    r.stages.iter().map(|s| s.name.as_str()).collect()
}

fn idx(r: &Recipe, name: &str) -> usize {
    r.index_of(name)
        .unwrap_or_else(|| panic!("no stage {name} in {:?}", names(r)))
}

/// A compact, reviewable dump of an expanded recipe.
fn dump(r: &Recipe) -> String {
    let mut s = format!("experiment {} seed {}\n", r.experiment, r.seed);
    for (i, st) in r.stages.iter().enumerate() {
        let _ = writeln!(s, "{i}: {} ({}) {}", st.name, st.kind, st.params);
        for inp in &st.inputs {
            let _ = writeln!(
                s,
                "   {}[{}] <- {}.{}",
                inp.param, inp.position, r.stages[inp.stage].name, inp.output
            );
        }
        for a in &st.after {
            let _ = writeln!(s, "   after {}", r.stages[*a].name);
        }
    }
    s
}

/// Every input and `after` points backwards: the stages are in topological order.
fn assert_topological(r: &Recipe) {
    for (i, st) in r.stages.iter().enumerate() {
        for inp in &st.inputs {
            assert!(
                inp.stage < i,
                "{} reads {} which comes later",
                st.name,
                r.stages[inp.stage].name
            );
        }
        for &a in &st.after {
            assert!(a < i, "{} is after a later stage", st.name);
        }
    }
}

#[test]
fn foreach_chain_gather() {
    let r = load("ok/coin_chain.toml", &[]).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    assert_eq!(r.experiment, "sefe_coin");
    assert_eq!(r.seed, 1234);
    assert_eq!(r.dir, PathBuf::from("tests/fixtures/recipes/ok"));
    assert_topological(&r);
    assert_eq!(r.stages.len(), 1 + 3 + 1 + 3 + 3 + 1 + 1);

    // chain: the first task trains on `@base`, each later one on its predecessor.
    let t0 = &r.stages[idx(&r, "task/ScienceQA")];
    let t1 = &r.stages[idx(&r, "task/TextVQA")];
    let t2 = &r.stages[idx(&r, "task/GQA")];
    assert_eq!(t0.params["base"], json!("@base"));
    assert_eq!(t1.params["base"], json!("@task/ScienceQA"));
    assert_eq!(t2.params["base"], json!("@task/TextVQA"));
    assert_eq!(t2.params["data"], json!("@asd/GQA"));
    assert_eq!(t2.base, "task");
    assert!(t2.inputs.contains(&Input {
        param: "base".into(),
        stage: idx(&r, "task/TextVQA"),
        output: "model".into(),
        position: 0
    }));
    assert!(t2.inputs.contains(&Input {
        param: "data".into(),
        stage: idx(&r, "asd/GQA"),
        output: "data".into(),
        position: 0
    }));
    // defaults are filled, integers widened for floats, tables kept.
    assert_eq!(t0.params["lr"], json!(1e-4));
    assert_eq!(
        t0.params["reglora"],
        json!({"top_percent": 2.0, "lambda": 2500.0})
    );
    assert_eq!(t0.params["prev"], json!(null));

    // {item} in plain strings, named outputs resolved and type-checked.
    let e1 = &r.stages[idx(&r, "eval/TextVQA")];
    assert_eq!(e1.params["upto"], json!("TextVQA"));
    assert_eq!(e1.params["data"], json!("@coin.test"));
    assert_eq!(
        e1.inputs
            .iter()
            .find(|i| i.param == "data")
            .map(|i| i.output.as_str()),
        Some("test")
    );

    // gather: all expansions, in foreach order.
    let m = &r.stages[idx(&r, "metrics")];
    assert_eq!(
        m.params["evals"],
        json!(["@eval/ScienceQA", "@eval/TextVQA", "@eval/GQA"])
    );
    let order: Vec<(usize, &str)> = m
        .inputs
        .iter()
        .map(|i| (i.position, r.stages[i.stage].name.as_str()))
        .collect();
    assert_eq!(
        order,
        vec![(0, "eval/ScienceQA"), (1, "eval/TextVQA"), (2, "eval/GQA")]
    );

    // RefOrPath: one input, one external; `after` on a base name means all its expansions;
    // unknown braces in strings survive.
    let rep = &r.stages[idx(&r, "report")];
    assert_eq!(rep.inputs.len(), 1);
    assert_eq!(rep.externals.len(), 1);
    assert_eq!(rep.externals[0].path, PathBuf::from("notes.md"));
    assert_eq!(rep.after.len(), 3);
    assert_eq!(
        rep.params["cmd"],
        json!("awk '{print $1}' metrics.json > report.txt")
    );

    // resources: kind default (cpus 2) overridden by the recipe; executor kept.
    let base = &r.stages[idx(&r, "base")];
    assert_eq!((base.resources.cpus, base.resources.memory_mb), (4, 8192));
    assert_eq!(base.executor.as_deref(), Some("slurm"));
    assert_eq!(base.externals[0].path, PathBuf::from("tokenizer.json"));
    assert_eq!(t0.resources.cpus, 2);
    assert_eq!(
        base.outputs.iter().map(|o| o.name).collect::<Vec<_>>(),
        vec!["model"]
    );

    insta::assert_snapshot!("coin_chain", dump(&r));
}

#[test]
fn matrix_shares_unswept_stages() {
    let r = load("ok/sweep.toml", &[]).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    assert_topological(&r);
    // one coin and one base, four sweep and four eval elements, one summary.
    assert_eq!(r.stages.len(), 1 + 1 + 4 + 4 + 1);
    let coin = idx(&r, "coin");
    let sweeps: Vec<usize> = r
        .stages
        .iter()
        .enumerate()
        .filter(|(_, s)| s.base == "sweep")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        sweeps
            .iter()
            .map(|&i| r.stages[i].name.as_str())
            .collect::<Vec<_>>(),
        vec![
            "sweep/method=lora,lr=0.0001",
            "sweep/method=lora,lr=0.0002",
            "sweep/method=sefe,lr=0.0001",
            "sweep/method=sefe,lr=0.0002"
        ]
    );
    for &i in &sweeps {
        let data = r.stages[i]
            .inputs
            .iter()
            .find(|inp| inp.param == "data")
            .expect("data input");
        assert_eq!(
            data.stage, coin,
            "every sweep element reads the one coin stage"
        );
    }
    // matrix dimensions named like parameters set them, typed.
    let s = &r.stages[idx(&r, "sweep/method=sefe,lr=0.0002")];
    assert_eq!(s.params["method"], json!("sefe"));
    assert_eq!(s.params["lr"], json!(2e-4));
    // `{dim}` substitution picks the matching element; `{index}` is the product index.
    let e = &r.stages[idx(&r, "eval/method=sefe,lr=0.0001")];
    assert_eq!(e.params["model"], json!("@sweep/method=sefe,lr=0.0001"));
    assert_eq!(e.params["upto"], json!("2"));
    assert_eq!(
        r.stages[e.inputs[0].stage].name,
        "sweep/method=sefe,lr=0.0001"
    );
    // a gather spliced into a list after a single reference.
    let sum = &r.stages[idx(&r, "summary")];
    assert_eq!(sum.params["evals"].as_array().map(Vec::len), Some(5));
    assert_eq!(
        sum.inputs.iter().map(|i| i.position).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    insta::assert_snapshot!("sweep", dump(&r));
}

#[test]
fn extends_and_include() {
    let r = load("ok/child.toml", &[]).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    assert_eq!(r.experiment, "base_exp", "name inherited from the parent");
    assert_eq!(r.seed, 11, "seed overridden by the child");
    let files: Vec<String> = r.files.iter().map(|f| f.display().to_string()).collect();
    assert_eq!(
        files,
        vec![
            "tests/fixtures/recipes/ok/child.toml",
            "tests/fixtures/recipes/ok/parts/base.toml",
            "tests/fixtures/recipes/ok/parts/extra.toml"
        ]
    );
    let coin = &r.stages[idx(&r, "coin")];
    assert_eq!(coin.kind, "data.synth", "kind kept from the parent");
    assert_eq!(
        coin.params["size"],
        json!(99),
        "param overridden by the child"
    );
    assert_eq!(
        names(&r),
        vec!["coin", "base", "eval/A", "eval/B", "eval/C"],
        "the child's var drives the included stage"
    );
}

#[test]
fn set_overrides() {
    let sets = [
        "asd.x=40",
        "stages.task.lr=2e-4",
        "experiment.seed=3",
        r#"vars.tasks=["A","B"]"#,
        "base.preset=big-model",
        "coin.per_task.train=7",
    ];
    let r = load("ok/coin_chain.toml", &sets).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    assert_eq!(r.seed, 3);
    assert_eq!(r.stages[idx(&r, "asd/A")].params["x"], json!(40));
    assert_eq!(r.stages[idx(&r, "task/B")].params["lr"], json!(2e-4));
    assert_eq!(r.stages[idx(&r, "task/B")].params["base"], json!("@task/A"));
    assert_eq!(
        r.stages[idx(&r, "base")].params["preset"],
        json!("big-model"),
        "non-TOML text is a string"
    );
    assert_eq!(
        r.stages[idx(&r, "coin")].params["per_task"],
        json!({"train": 7, "test": 100})
    );
    assert!(r.index_of("task/GQA").is_none());
}

#[test]
fn loading_is_deterministic() {
    let a = dump(&load("ok/coin_chain.toml", &[]).expect("loads"));
    let b = dump(&load("ok/coin_chain.toml", &[]).expect("loads"));
    assert_eq!(a, b);
}

/// Load recipe text from a temporary directory (for small cases not worth a fixture).
fn load_text(text: &str, sets: &[&str]) -> Result<Recipe, engine::recipe::RecipeError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("r.toml");
    std::fs::write(&path, text).expect("write");
    let sets: Vec<String> = sets.iter().map(|s| (*s).to_string()).collect();
    engine::recipe::load(&path, &sets, &super::kinds::registry())
}

#[test]
fn chain_true_sets_prev_and_experiment_defaults() {
    let text = r#"
[stages.coin]
kind = "data.synth"
[stages.base]
kind = "train.pretrain"
data = "@coin"
[stages.task]
kind = "train.lora"
foreach = [1, 2, 3]
chain = true
base = "@base"
data = "@coin"
steps = "{index}"
"#;
    // `steps = "{index}"` is a string, not an integer, even after substitution.
    let err = load_text(text, &[]).expect_err("steps is a string");
    assert_eq!(err.codes(), vec!["pipeline::recipe::mistyped_param"]);

    let r = load_text(&text.replace("steps = \"{index}\"\n", ""), &[])
        .unwrap_or_else(|e| panic!("{}", super::render(&e)));
    assert_eq!(r.experiment, "r", "the name defaults to the file stem");
    assert_eq!(r.seed, 0);
    let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["coin", "base", "task/1", "task/2", "task/3"]);
    assert_eq!(r.stages[2].params["prev"], json!(null));
    assert_eq!(r.stages[3].params["prev"], json!("@task/1"));
    assert_eq!(r.stages[4].params["prev"], json!("@task/2"));
    assert_eq!(
        r.stages[4].params["base"],
        json!("@base"),
        "chain = true leaves `base` alone"
    );
    let params: Vec<&str> = r.stages[4]
        .inputs
        .iter()
        .map(|i| i.param.as_str())
        .collect();
    assert_eq!(
        params,
        vec!["base", "data", "prev"],
        "inputs in schema order"
    );
}

#[test]
fn declaration_order_breaks_ties_and_dependencies_come_first() {
    let text = r#"
[stages.late]
kind = "data.rewrite"
data = "@early"
[stages.other]
kind = "data.synth"
[stages.early]
kind = "data.synth"
"#;
    let r = load_text(text, &[]).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["other", "early", "late"]);
    assert_eq!(
        r.stages[2].inputs[0].stage, 1,
        "indices are remapped to the sorted order"
    );
}

#[test]
fn chain_along_the_last_matrix_dimension() {
    let text = r#"
[vars]
tasks = ["A", "B", "C"]
[stages.coin]
kind = "data.synth"
[stages.base]
kind = "train.pretrain"
data = "@coin"
[stages.task]
kind = "train.lora"
matrix = { lr = [1e-4, 2500.0], task = "tasks" }
chain = true
base = "@base"
data = "@coin"
"#;
    let r = load_text(text, &[]).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    let prev = |n: &str| r.stages[idx(&r, n)].params["prev"].clone();
    // The first task of each `lr` keeps the default; the others read the same `lr`'s
    // previous task, never the other row's.
    assert_eq!(prev("task/lr=0.0001,task=A"), json!(null));
    assert_eq!(
        prev("task/lr=0.0001,task=B"),
        json!("@task/lr=0.0001,task=A")
    );
    assert_eq!(
        prev("task/lr=0.0001,task=C"),
        json!("@task/lr=0.0001,task=B")
    );
    assert_eq!(prev("task/lr=2500,task=A"), json!(null));
    assert_eq!(prev("task/lr=2500,task=B"), json!("@task/lr=2500,task=A"));
    assert_eq!(prev("task/lr=2500,task=C"), json!("@task/lr=2500,task=B"));
    let c = &r.stages[idx(&r, "task/lr=2500,task=C")];
    assert_eq!(
        c.params["lr"],
        json!(2500.0),
        "the typed value, not its text"
    );
    assert!(c.inputs.contains(&Input {
        param: "prev".into(),
        stage: idx(&r, "task/lr=2500,task=B"),
        output: "model".into(),
        position: 0
    }));
    assert_topological(&r);
}

#[test]
fn chain_to_another_stage_with_a_matrix() {
    let r = load("ok/sefe_sweep.toml", &[]).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    assert_topological(&r);
    // coin, base, 12 of each of task, merged, keys, eval, one metrics per method, all.
    assert_eq!(r.stages.len(), 2 + 4 * 12 + 4 + 1);
    assert_eq!(r.stages.iter().filter(|s| s.base == "task").count(), 12);

    // Numeric dimensions: readable names, typed parameters.
    let a = &r.stages[idx(&r, "task/x=20,lam=2500,task=A")];
    assert_eq!(a.params["x"], json!(20));
    assert_eq!(a.params["lam"], json!(2500.0));
    assert_eq!(a.params["task"], json!("A"));
    // Element 0 keeps what the recipe wrote (`base`) or the default (`key_elements`).
    assert_eq!(a.params["base"], json!("@base"));
    assert_eq!(a.params["key_elements"], json!(null));

    // Element i > 0 reads merged i-1 and keys i-1 of the same method.
    let c = &r.stages[idx(&r, "task/x=20,lam=2500,task=C")];
    assert_eq!(c.params["base"], json!("@merged/x=20,lam=2500,task=B"));
    assert_eq!(
        c.params["key_elements"],
        json!("@keys/x=20,lam=2500,task=B")
    );
    let from: Vec<(&str, &str, &str)> = c
        .inputs
        .iter()
        .map(|i| {
            (
                i.param.as_str(),
                r.stages[i.stage].name.as_str(),
                i.output.as_str(),
            )
        })
        .collect();
    assert_eq!(
        from,
        vec![
            ("base", "merged/x=20,lam=2500,task=B", "model"),
            ("data", "coin", "train"),
            ("key_elements", "keys/x=20,lam=2500,task=B", "keys"),
        ]
    );
    // `{dim}` in references: merged i reads task i, with `lam` rendered `0`, not `0.0`.
    let m = &r.stages[idx(&r, "merged/x=0,lam=0,task=B")];
    assert_eq!(m.params["model"], json!("@task/x=0,lam=0,task=B"));
    assert_eq!(m.params["adapter"], json!("@task/x=0,lam=0,task=B.adapter"));
    // No cycle: task B comes after merged A, which comes after task A.
    let pos = |n: &str| idx(&r, n);
    assert!(pos("task/x=0,lam=0,task=A") < pos("merged/x=0,lam=0,task=A"));
    assert!(pos("merged/x=0,lam=0,task=A") < pos("keys/x=0,lam=0,task=A"));
    assert!(pos("keys/x=0,lam=0,task=A") < pos("task/x=0,lam=0,task=B"));

    // Glob gathers after `{dim}` substitution: one method's evals, in task order.
    let m = &r.stages[idx(&r, "metrics/x=20,lam=0")];
    assert_eq!(
        m.params["evals"],
        json!([
            "@eval/x=20,lam=0,task=A",
            "@eval/x=20,lam=0,task=B",
            "@eval/x=20,lam=0,task=C"
        ])
    );
    assert_eq!(
        m.inputs
            .iter()
            .map(|i| (i.position, r.stages[i.stage].name.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (0, "eval/x=20,lam=0,task=A"),
            (1, "eval/x=20,lam=0,task=B"),
            (2, "eval/x=20,lam=0,task=C")
        ]
    );
    // `*` inside the pattern, a named output after it, two gathers spliced into one list.
    let all = &r.stages[idx(&r, "all")];
    assert_eq!(
        all.params["evals"],
        json!([
            "@eval/x=0,lam=0,task=C.metrics",
            "@eval/x=0,lam=2500,task=C.metrics",
            "@eval/x=0,lam=0,task=A",
            "@eval/x=0,lam=2500,task=A",
            "@eval/x=20,lam=0,task=A",
            "@eval/x=20,lam=2500,task=A"
        ])
    );
    assert_eq!(
        all.inputs.iter().map(|i| i.position).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    insta::assert_snapshot!("sefe_sweep", dump(&r));
}

#[test]
fn chain_table_naming_the_stage_itself_is_a_plain_chain() {
    let text = r#"
[stages.coin]
kind = "data.synth"
[stages.base]
kind = "train.pretrain"
data = "@coin"
[stages.task]
kind = "train.lora"
foreach = ["A", "B"]
chain = { base = "task" }
base = "@base"
data = "@coin"
"#;
    let r = load_text(text, &[]).unwrap_or_else(|e| panic!("{}", super::render(&e)));
    assert_eq!(r.stages[idx(&r, "task/A")].params["base"], json!("@base"));
    assert_eq!(r.stages[idx(&r, "task/B")].params["base"], json!("@task/A"));
}

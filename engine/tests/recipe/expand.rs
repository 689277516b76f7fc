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

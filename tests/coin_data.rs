//! End to end through the binary: a recipe chaining `data.synth-coin` → `asd.rewrite` and
//! `data.coin` (the coin-mini fixture) → `asd.rewrite`; a second run is fully cached (the
//! generator is deterministic), and a broken CoIN root fails the stage naming file, record
//! and field.
#![cfg(feature = "ml")]

use std::path::Path;

// This test uses only the `pipeline` command of the shared support module.
#[allow(dead_code)]
mod support;

use support::pipeline;

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("stages/tests/fixtures/coin-mini")
        .to_string_lossy()
        .into_owned()
}

fn recipe(root: &str) -> String {
    format!(
        r#"[experiment]
name = "coin"
seed = 3

[stages.coin]
kind = "data.synth-coin"
per_task = {{ train = 20, test = 5 }}
pretrain = 10

[stages.asd]
kind = "asd.rewrite"
data = "@coin"
x = 40

[stages.real]
kind = "data.coin"
root = "{root}"

[stages.real_asd]
kind = "asd.rewrite"
data = "@real"
"#
    )
}

#[test]
fn coin_recipe_runs_caches_and_reports_broken_data() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("r.toml"), recipe(&fixture())).unwrap();
    let out = pipeline(t.path(), &["run", "r.toml", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("\"stage-finished\"").count(), 4, "{stdout}");

    let asd = t.path().join("runs/coin/asd/dataset");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(asd.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(info["asd"]["x"], 40);
    assert_eq!(info["tasks"][3]["train"], "annotations/GQA/train_x40.json");
    let gqa: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(asd.join("annotations/GQA/train_x40.json")).unwrap())
            .unwrap();
    assert_eq!(
        gqa.iter()
            .filter(|r| r.get("answer_style").is_some())
            .count(),
        8,
        "floor(20 * 40 / 100)"
    );
    let real = t
        .path()
        .join("runs/coin/real_asd/dataset/annotations/ScienceQA/train_x20.json");
    assert!(real.is_file());

    let again = pipeline(t.path(), &["run", "r.toml", "--json"]);
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert_eq!(stdout.matches("\"stage-cached\"").count(), 4, "{stdout}");

    // A CoIN root with a record whose gpt turn is missing its text.
    let broken = t.path().join("broken");
    for entry in ["annotations", "ScienceQA"] {
        copy_dir(&Path::new(&fixture()).join(entry), &broken.join(entry));
    }
    let path = broken.join("annotations/ScienceQA/train.json");
    let text =
        std::fs::read_to_string(&path)
            .unwrap()
            .replacen("\"value\": \"A\"", "\"text\": \"A\"", 1);
    std::fs::write(&path, text).unwrap();
    let r = format!(
        "[experiment]\nname = \"b\"\n\n[stages.real]\nkind = \"data.coin\"\nroot = \"broken\"\ntasks = [\"ScienceQA\"]\n"
    );
    std::fs::write(t.path().join("b.toml"), r).unwrap();
    let out = pipeline(t.path(), &["run", "b.toml"]);
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("annotations/ScienceQA/train.json: record 0 (id `sqa_1`): field `conversations[1].value`: missing"), "{all}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let d = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &d)
        } else {
            std::fs::copy(&p, &d).map(drop).unwrap()
        }
    }
}

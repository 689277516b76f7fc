#![allow(dead_code)] // each bench uses a subset
//! DAG shapes shared by the engine benches (the same as the end-to-end tests' and
//! `scripts/bench_engine.py`'s): chain, fan (one root, N-2 children, one join) and layered
//! (about sqrt(N) layers, each stage reading two stages of the layer above).

use std::path::{Path, PathBuf};

/// Names of the shapes, as used in bench ids (`plan/layered_1000`).
pub(crate) const SHAPES: [&str; 3] = ["chain", "fan", "layered"];

/// `deps[i]`: the indices of the stages stage `i` reads.
pub(crate) fn dag(shape: &str, n: usize) -> Vec<Vec<usize>> {
    let mut deps = vec![Vec::new(); n];
    match shape {
        "chain" => (1..n).for_each(|i| deps[i] = vec![i - 1]),
        "fan" => {
            (1..n - 1).for_each(|i| deps[i] = vec![0]);
            deps[n - 1] = (1..n - 1).collect();
        }
        "layered" => {
            let width = n.isqrt() + usize::from(n.isqrt() * n.isqrt() < n);
            for (i, d) in deps.iter_mut().enumerate().skip(width) {
                let start = (i / width - 1) * width;
                let (a, b) = (start + i % width, start + (i + 1) % width);
                *d = if a == b { vec![a] } else { vec![a, b] };
            }
        }
        other => panic!("unknown shape {other}"),
    }
    deps
}

/// A recipe of `shell` stages of this shape, as TOML text.
pub(crate) fn recipe_text(shape: &str, n: usize) -> String {
    let mut s = String::from("[experiment]\nname = \"bench\"\n");
    for (i, ds) in dag(shape, n).iter().enumerate() {
        let deps = if ds.is_empty() {
            "\"seed.txt\"".to_owned()
        } else {
            ds.iter()
                .map(|d| format!("\"@s{d:05}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        s.push_str(&format!(
            "\n[stages.s{i:05}]\nkind = \"shell\"\ndeps = [{deps}]\ncmd = \"cat ${{deps}} | md5sum > ${{outs}}\"\n\
             outs = [\"out/s{i:05}.txt\"]\nparams = {{ p = {i}, q = 1 }}\n"
        ));
    }
    s
}

/// Write the recipe (and its seed file) into `dir`; returns the recipe path.
pub(crate) fn write_recipe(dir: &Path, shape: &str, n: usize) -> PathBuf {
    std::fs::write(dir.join("seed.txt"), "seed\n").unwrap();
    let path = dir.join(format!("{shape}_{n}.toml"));
    std::fs::write(&path, recipe_text(shape, n)).unwrap();
    path
}

/// A registry with the engine's built-in kinds.
pub(crate) fn registry() -> engine::stage::Registry {
    engine::builtin_registry()
}

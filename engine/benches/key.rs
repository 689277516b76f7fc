//! Key computation: the canonical encoding and blake3 of [`KeyManifest`]s.
//!
//! - `key/manifest_<n>_params`: one key of a stage with `n` parameters and 4 inputs;
//! - `key/<shape>_1000`: the keys of every stage of a loaded 1000-stage recipe, each
//!   stage's input digests being its upstream keys (as the executor does once upstream
//!   outputs are known) -- the per-run key cost of a no-op rerun, without the I/O.

use std::hint::black_box;

use cache::Digest;
use criterion::{Criterion, criterion_group, criterion_main};
use engine::key::{InputDigest, KeyManifest, derive_seed, mask_refs};
use engine::stage::StageKind;

mod common;

fn manifest_with(params: usize) -> KeyManifest {
    let mut map = serde_json::Map::new();
    for i in 0..params {
        let v = match i % 4 {
            0 => serde_json::json!(i),
            1 => serde_json::json!(i as f64 * 1e-4),
            2 => serde_json::json!(format!("value-{i}")),
            _ => serde_json::json!([i, i + 1, { "nested": i }]),
        };
        map.insert(format!("param_{i:03}"), v);
    }
    KeyManifest {
        schema: engine::key::KEY_SCHEMA,
        kind: "train.lora".into(),
        kind_version: 3,
        params: serde_json::Value::Object(map),
        inputs: (0..4)
            .map(|i| InputDigest {
                param: "data".into(),
                position: i,
                upstream: format!("up{i}"),
                output: "dataset".into(),
                digest: Digest::of_bytes(&[i as u8]),
            })
            .collect(),
        externals: Vec::new(),
        seed: derive_seed(1234, "train"),
        env: Default::default(),
    }
}

fn bench_manifest(c: &mut Criterion) {
    for n in [10, 100] {
        let m = manifest_with(n);
        c.bench_function(&format!("key/manifest_{n}_params"), |b| {
            b.iter(|| black_box(&m).key())
        });
    }
}

fn bench_recipe_keys(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let registry = common::registry();
    let shell = engine::shell::Shell;
    for shape in common::SHAPES {
        let path = common::write_recipe(tmp.path(), shape, 1000);
        let recipe = engine::recipe::load(&path, &[], &registry).expect("bench recipe loads");
        let seed_digest = Digest::of_bytes(b"seed\n");
        c.bench_function(&format!("key/{shape}_1000"), |b| {
            b.iter(|| {
                let mut keys: Vec<Digest> = Vec::with_capacity(recipe.stages.len());
                for node in &recipe.stages {
                    let mut params = node.params.clone();
                    mask_refs(&mut params, node.inputs.iter().map(|i| i.param.as_str()));
                    let inputs = node
                        .inputs
                        .iter()
                        .map(|i| InputDigest {
                            param: i.param.clone(),
                            position: i.position,
                            upstream: recipe.stages[i.stage].name.clone(),
                            output: i.output.clone(),
                            digest: keys[i.stage],
                        })
                        .collect();
                    let externals = node
                        .externals
                        .iter()
                        .map(|e| engine::key::ExternalDigest {
                            param: e.param.clone(),
                            path: e.path.to_string_lossy().into_owned(),
                            digest: seed_digest,
                        })
                        .collect();
                    let m = KeyManifest {
                        schema: engine::key::KEY_SCHEMA,
                        kind: node.kind.clone(),
                        kind_version: shell.version(),
                        params,
                        inputs,
                        externals,
                        seed: derive_seed(recipe.seed, &node.name),
                        env: Default::default(),
                    };
                    keys.push(m.key());
                }
                black_box(keys)
            });
        });
    }
}

criterion_group!(benches, bench_manifest, bench_recipe_keys);
criterion_main!(benches);

//! Planning: what `pipeline plan` does after process start, in the three DAG shapes.
//!
//! - `plan/load_<shape>_<n>`: recipe loading alone (parse, expand, type-check, resolve,
//!   topological order) -- the fixed part of every `plan` and `run`;
//! - `plan/cold_<shape>_10000`: load + plan on an empty cache (every root `run`, the rest
//!   `maybe`);
//! - `plan/warm_<shape>_1000`: load + plan after a complete run (every stage a hit: one
//!   key and one cache probe per stage) -- the engine part of a no-op rerun.
//!
//! The end-to-end numbers, process start included and side by side with DVC and
//! Snakemake, come from `scripts/bench_engine.py`.

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use engine::exec::{KeyEnv, RunOptions};
use engine::plan::Status;

mod common;

fn bench_load(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let registry = common::registry();
    let mut group = c.benchmark_group("plan");
    group.sample_size(10);
    for n in [1000, 10_000] {
        for shape in common::SHAPES {
            let path = common::write_recipe(tmp.path(), shape, n);
            // Fail loudly (not inside the timing loop) if the generated recipe is invalid.
            let recipe = engine::recipe::load(&path, &[], &registry).expect("bench recipe loads");
            assert_eq!(recipe.stages.len(), n);
            group.bench_function(format!("load_{shape}_{n}"), |b| {
                b.iter(|| black_box(engine::recipe::load(&path, &[], &registry).unwrap()));
            });
        }
    }
    group.finish();
}

fn bench_plan(c: &mut Criterion) {
    let registry = common::registry();
    let env = KeyEnv::default();
    let none = BTreeSet::new();
    let mut group = c.benchmark_group("plan");
    group.sample_size(10);
    for shape in common::SHAPES {
        let tmp = tempfile::tempdir().unwrap();
        let path = common::write_recipe(tmp.path(), shape, 10_000);
        let cache = cache::Cache::open(&tmp.path().join(".pipeline")).unwrap();
        group.bench_function(format!("cold_{shape}_10000"), |b| {
            b.iter(|| {
                let recipe = engine::recipe::load(&path, &[], &registry).unwrap();
                black_box(engine::plan::plan(&recipe, &registry, &cache, &env, &none))
            });
        });
    }
    for shape in common::SHAPES {
        let tmp = tempfile::tempdir().unwrap();
        let path = common::write_recipe(tmp.path(), shape, 1000);
        let cache = cache::Cache::open(&tmp.path().join(".pipeline")).unwrap();
        let recipe = engine::recipe::load(&path, &[], &registry).unwrap();
        let summary = engine::exec::run(
            &recipe,
            &registry,
            &cache,
            &engine::events::NullReporter,
            &RunOptions::new(2),
        )
        .expect("bench recipe runs");
        assert_eq!(
            summary.ran.len(),
            1000,
            "setup run failed: {:?}",
            summary.failed.first()
        );
        let warm = engine::plan::plan(&recipe, &registry, &cache, &env, &none);
        assert!(
            warm.rows.iter().all(|r| r.status == Status::Hit),
            "after a full run every stage must be a hit"
        );
        group.bench_function(format!("warm_{shape}_1000"), |b| {
            b.iter(|| {
                let recipe = engine::recipe::load(&path, &[], &registry).unwrap();
                black_box(engine::plan::plan(&recipe, &registry, &cache, &env, &none))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_load, bench_plan);
criterion_main!(benches);

//! Recipe loading (parse, expand, type-check, resolve, topological order) of 1000- and
//! 10,000-stage recipes in the three DAG shapes: `plan/load_<shape>_<n>`. This is the
//! fixed part of every `pipeline plan`/`run`; the end-to-end plan including cache probes
//! is timed by `scripts/bench_engine.py`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

mod common;

fn bench_load(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let registry = common::registry();
    let mut group = c.benchmark_group("plan");
    group.sample_size(20);
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

criterion_group!(benches, bench_load);
criterion_main!(benches);

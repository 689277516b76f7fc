//! `store/*`: the per-stage overheads that a 1000-stage no-op rerun and a cold run of tiny
//! stages pay: a lookup hit (one manifest read + object stats) and a commit of a tiny
//! output (with and without fsync). Set `CACHE_BENCH_DIR` to bench another filesystem
//! (e.g. `/dev/shm` to see the store's own overhead without a slow disk's metadata cost).

use std::time::{Duration, SystemTime};

use cache::{Cache, CacheOptions, CommitMeta, Digest};
use criterion::{Criterion, criterion_group, criterion_main};

fn meta() -> CommitMeta {
    CommitMeta {
        kind: "bench".into(),
        stage: "s".into(),
        experiment: "e".into(),
        inputs: serde_json::json!({"p": 1}),
        started: SystemTime::now(),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    for fsync in [false, true] {
        let base = std::env::var_os("CACHE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
        let t = tempfile::tempdir_in(base).unwrap();
        let cache = Cache::open_with(
            t.path(),
            CacheOptions {
                fsync,
                ..CacheOptions::default()
            },
        )
        .unwrap();
        let mut n = 0u64;
        let name = if fsync {
            "commit_tiny_fsync"
        } else {
            "commit_tiny"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                let key = Digest::of_bytes(&n.to_le_bytes());
                let s = cache.stage_dir(&key, &["out"]).unwrap();
                std::fs::write(
                    s.output("out").join("metrics.json"),
                    format!("{{\"n\":{n}}}"),
                )
                .unwrap();
                cache.commit(s, meta()).unwrap()
            });
        });
        if !fsync {
            let key = Digest::of_bytes(&1u64.to_le_bytes());
            g.bench_function("lookup_hit", |b| {
                b.iter(|| cache.lookup(&key).unwrap().unwrap())
            });
            let missing = Digest::of_bytes(b"missing");
            g.bench_function("lookup_miss", |b| {
                b.iter(|| cache.lookup(&missing).unwrap().is_none())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

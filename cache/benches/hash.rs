//! `hash/tree_*`: hash_tree throughput against file size (same total bytes, split into files
//! of different sizes), and the stat-cached re-digest of the same tree. Compare the
//! `file_64mib` throughput against `b3sum` on the same file for the DESIGN §9 target.

use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const TOTAL: usize = 64 << 20;

fn make_tree(dir: &Path, file_size: usize) {
    let mut block = vec![0u8; file_size];
    for i in 0..TOTAL / file_size {
        for (j, b) in block.iter_mut().enumerate().step_by(4096) {
            *b = (i ^ j) as u8;
        }
        // 100 subdirectories, as a dataset of many images would have.
        let sub = dir.join(format!("{:03}", i % 100));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("{i:06}")), &block).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let t = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("hash");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(TOTAL as u64));
    for (name, size) in [
        ("files_4kib", 4 << 10),
        ("files_256kib", 256 << 10),
        ("files_4mib", 4 << 20),
        ("file_64mib", 64 << 20),
    ] {
        let dir = t.path().join(name);
        make_tree(&dir, size);
        g.bench_with_input(BenchmarkId::new("tree", name), &dir, |b, dir| {
            b.iter(|| cache::hash_tree(dir).unwrap())
        });
    }
    let dir = t.path().join("files_4kib");
    let mut stat = cache::StatCache::in_memory();
    stat.set_racy_window(Duration::ZERO);
    stat.tree(&dir).unwrap();
    g.bench_function("tree_stat_cached/files_4kib", |b| {
        b.iter(|| stat.tree(&dir).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

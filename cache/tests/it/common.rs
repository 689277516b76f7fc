//! Helpers shared by the integration tests.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use cache::{Cache, CacheOptions, CommitMeta, Digest, Entry, Key};

pub(crate) fn key(s: &str) -> Key {
    Digest::of_bytes(s.as_bytes())
}

pub(crate) fn open(root: &Path) -> Cache {
    Cache::open_with(
        root,
        CacheOptions {
            fsync: false,
            ..CacheOptions::default()
        },
    )
    .unwrap()
}

pub(crate) fn meta(stage: &str) -> CommitMeta {
    CommitMeta {
        kind: "test.echo".into(),
        stage: stage.into(),
        experiment: "exp".into(),
        inputs: serde_json::json!({"p": 1, "stage": stage}),
        started: SystemTime::now(),
    }
}

pub(crate) fn write(p: &Path, bytes: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

/// Commits `files` (path, content) as output `out` of `key`.
pub(crate) fn commit_files(c: &Cache, key: &Key, files: &[(&str, &[u8])]) -> Entry {
    let s = c.stage_dir(key, &["out"]).unwrap();
    for (p, b) in files {
        write(&s.output("out").join(p), b);
    }
    c.commit(s, meta("s")).unwrap()
}

/// Files under `dir` (relative path, content), sorted.
pub(crate) fn read_tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path()
                    .strip_prefix(dir)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Number of files under `dir`.
pub(crate) fn count_files(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .count()
}

/// Whether this process can bypass file permissions (root), in which case chmod-based
/// read-only tests prove nothing.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

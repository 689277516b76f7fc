//! SIGKILL anywhere: a process committing in a loop is killed at random moments; every
//! entry that exists afterwards must be complete and correct, and nothing else may be a
//! hit.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use cache::{Lookup, MissReason};

use crate::common::*;

const HELPER_ROOT: &str = "CACHE_IT_SIGKILL_ROOT";
const KEYS: usize = 400;

fn files_for(i: usize) -> Vec<(String, Vec<u8>)> {
    (0..3)
        .map(|j| {
            (
                format!("d{j}/f{i}"),
                format!("key {i} file {j} ").repeat(1 + i % 50).into_bytes(),
            )
        })
        .collect()
}

/// Not a test on its own: the body of the process `commits_survive_sigkill` kills.
#[test]
fn helper_commit_loop() {
    let Ok(root) = std::env::var(HELPER_ROOT) else {
        return;
    };
    let c = open(&PathBuf::from(root));
    for i in 0..KEYS {
        let k = key(&format!("k{i}"));
        if c.lookup(&k).unwrap().is_some() {
            continue;
        }
        let files = files_for(i);
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .collect();
        let e = commit_files(&c, &k, &refs);
        c.materialize(&e, "out").unwrap();
    }
}

#[test]
fn commits_survive_sigkill() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let exe = std::env::current_exe().unwrap();
    let mut seed = 0x9e37_79b9_u64;
    for _ in 0..6 {
        let mut child = Command::new(&exe)
            .args(["sigkill::helper_commit_loop", "--exact", "--test-threads=1"])
            .env(HELPER_ROOT, &root)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_millis(30 + (seed >> 33) % 150));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
    }
    let c = open(&root);
    let mut hits = 0;
    for i in 0..KEYS {
        match c.probe(&key(&format!("k{i}"))).unwrap() {
            Lookup::Hit(e) => {
                hits += 1;
                let dir = c.materialize(&e, "out").unwrap();
                for (p, b) in files_for(i) {
                    assert_eq!(std::fs::read(dir.join(&p)).unwrap(), b, "key {i} file {p}");
                }
            }
            Lookup::Miss(MissReason::NotFound) => {}
            Lookup::Miss(other) => panic!("key {i}: a killed commit left a broken entry: {other}"),
        }
    }
    eprintln!("sigkill: {hits} of {KEYS} keys committed before the last kill");
    assert!(
        hits > 0,
        "the helper never committed anything; the test proved nothing"
    );
    // gc clears the debris of the killed attempts without touching the entries.
    c.gc(&(0..KEYS).map(|i| key(&format!("k{i}"))).collect())
        .unwrap();
    assert_eq!(count_files(&root.join("v1/tmp")), 0);
    for i in 0..KEYS {
        if let Some(e) = c.lookup(&key(&format!("k{i}"))).unwrap() {
            c.materialize(&e, "out").unwrap();
        }
    }
}

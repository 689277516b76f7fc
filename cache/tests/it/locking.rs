//! Leases: each key computed once across threads and processes; stale leases broken.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cache::{Cache, CacheOptions, Error, Key, LockOutcome};

use crate::common::*;

const HELPER_ROOT: &str = "CACHE_IT_HELPER_ROOT";

fn lock_file(root: &Path, k: &Key) -> PathBuf {
    root.join("v1/locks").join(format!("{}.lock", k.to_hex()))
}

fn append(p: &Path, line: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

/// The engine's flow for one stage: lookup, else lock, else compute and commit.
fn compute_once(c: &Cache, k: &Key, log: &Path, who: &str) {
    if c.lookup(k).unwrap().is_some() {
        append(log, &format!("hit {who}"));
        return;
    }
    match c.lock(k).unwrap() {
        LockOutcome::Hit(_) => append(log, &format!("hit {who}")),
        LockOutcome::Acquired(guard) => {
            append(log, &format!("computed {who}"));
            std::thread::sleep(Duration::from_millis(300));
            commit_files(c, k, &[("out.txt", b"result")]);
            drop(guard);
        }
    }
}

/// Not a test on its own: the body of the helper processes spawned by
/// `two_processes_and_threads_compute_a_key_once` (a no-op when run normally).
#[test]
fn helper_lock_and_compute() {
    let Ok(root) = std::env::var(HELPER_ROOT) else {
        return;
    };
    let root = PathBuf::from(root);
    let c = open(&root.join("c"));
    compute_once(
        &c,
        &key("shared"),
        &root.join("log"),
        &format!("process {}", std::process::id()),
    );
}

#[test]
fn two_processes_and_threads_compute_a_key_once() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().to_path_buf();
    let c = open(&root.join("c"));
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "locking::helper_lock_and_compute",
                    "--exact",
                    "--test-threads=1",
                ])
                .env(HELPER_ROOT, &root)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for i in 0..3 {
            let (c, root) = (&c, &root);
            s.spawn(move || {
                compute_once(c, &key("shared"), &root.join("log"), &format!("thread {i}"))
            });
        }
    });
    for mut ch in children {
        assert!(ch.wait().unwrap().success());
    }
    let log = fs::read_to_string(root.join("log")).unwrap();
    assert_eq!(log.lines().count(), 6, "{log}");
    assert_eq!(
        log.lines().filter(|l| l.starts_with("computed")).count(),
        1,
        "computed more than once:\n{log}"
    );
    assert!(c.lookup(&key("shared")).unwrap().is_some());
    assert_eq!(
        fs::read_dir(root.join("c/v1/locks"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != ".break")
            .count(),
        0,
        "released leases leave no lock files"
    );
}

#[test]
fn lease_of_a_killed_process_is_broken() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let c = open(&root);
    let k = key("k");
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let record = format!(
        "{{\"pid\":{pid},\"host\":\"{host}\",\"heartbeat_ms\":{}}}",
        now_ms()
    );
    fs::write(lock_file(&root, &k), &record).unwrap();

    // (a) The kernel dropped its flock: the record alone is left, and is reported as broken.
    let start = Instant::now();
    let LockOutcome::Acquired(g) = c.lock(&k).unwrap() else {
        panic!("no entry: must acquire")
    };
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(g.broke_stale().map(|h| h.pid), Some(pid));
    drop(g);

    // (b) The flock is still held (an fd leaked to another process) but the recorded
    // holder is dead on this host: the lease is broken all the same.
    let leaked = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_file(&root, &k))
        .unwrap();
    leaked.try_lock().unwrap();
    fs::write(lock_file(&root, &k), &record).unwrap();
    let LockOutcome::Acquired(g) = c
        .lock_with(&k, Some(Duration::from_secs(5)), &mut |_| {})
        .unwrap()
    else {
        panic!("must acquire")
    };
    assert!(!g.lost());
    assert_eq!(g.broke_stale().map(|h| h.pid), Some(pid));
    drop(g);
    drop(leaked);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn other_host_lease_waits_while_fresh_and_breaks_when_stale() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let opts = CacheOptions {
        fsync: false,
        heartbeat: Duration::from_millis(50),
        stale_after: 4,
        ..CacheOptions::default()
    };
    let c = Cache::open_with(&root, opts).unwrap();
    let k = key("k");
    let held = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_file(&root, &k))
        .unwrap();
    held.try_lock().unwrap();

    // Fresh heartbeat from another host: wait, report progress, time out naming the holder.
    let fresh = format!(
        "{{\"pid\":1,\"host\":\"node-7\",\"heartbeat_ms\":{}}}",
        now_ms() + 60_000
    );
    fs::write(lock_file(&root, &k), &fresh).unwrap();
    let mut polls = 0;
    let err = c.lock_with(&k, Some(Duration::from_millis(300)), &mut |w| {
        assert_eq!(w.holder.map(|h| h.host.as_str()), Some("node-7"));
        polls += 1;
    });
    let err = err.unwrap_err();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err}");
    assert!(err.to_string().contains("pid 1 on node-7"), "{err}");
    assert!(polls >= 2);

    // The heartbeat stops (older than 4 x 50 ms): broken.
    let old = format!(
        "{{\"pid\":1,\"host\":\"node-7\",\"heartbeat_ms\":{}}}",
        now_ms() - 10_000
    );
    fs::write(lock_file(&root, &k), &old).unwrap();
    assert!(matches!(
        c.lock_with(&k, Some(Duration::from_secs(5)), &mut |_| {})
            .unwrap(),
        LockOutcome::Acquired(_)
    ));
}

#[test]
fn holder_heartbeats_so_a_live_lease_is_never_broken() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let opts = CacheOptions {
        fsync: false,
        heartbeat: Duration::from_millis(100),
        stale_after: 4,
        ..CacheOptions::default()
    };
    let c = Cache::open_with(&root, opts).unwrap();
    let k = key("k");
    let LockOutcome::Acquired(g) = c.lock(&k).unwrap() else {
        panic!()
    };
    let read = || -> u64 {
        let bytes = fs::read(lock_file(&root, &k)).unwrap();
        assert_eq!(bytes.len(), 256, "fixed-width record");
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["heartbeat_ms"].as_u64().unwrap()
    };
    let first = read();
    // Well past the 400 ms staleness threshold (with margin for a loaded machine): a second
    // waiter must still see the lease as live.
    let err = c
        .lock_with(&k, Some(Duration::from_millis(1200)), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err}");
    assert!(read() > first, "heartbeat did not advance");
    assert!(!g.lost());
    drop(g);
    assert!(!lock_file(&root, &k).exists());
    // After a commit, a waiter gets the hit instead of the lease.
    commit_files(&c, &k, &[("f", b"x")]);
    assert!(matches!(c.lock(&k).unwrap(), LockOutcome::Hit(_)));
}

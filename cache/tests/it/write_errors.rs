//! A read-only cache directory or a full disk gives a clear error, never a panic, and never
//! a half-committed entry.

use std::path::Path;
use std::process::Command;

use cache::{Cache, Error};

use crate::common::*;

/// A tmpfs mounted at a temp dir for the test's duration (root only).
struct Mount(tempfile::TempDir);

impl Mount {
    fn tmpfs(opts: &str) -> Option<Mount> {
        if !is_root() {
            return None;
        }
        let d = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(d.path())
            .output()
            .ok()?
            .status
            .success();
        ok.then_some(Mount(d))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn read_only_cache_dir_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let (dir, _mount);
    if is_root() {
        // chmod does not stop root: use a read-only filesystem instead.
        match Mount::tmpfs("ro,size=1m") {
            Some(m) => {
                dir = m.path().join("cache");
                _mount = Some(m);
            }
            None => {
                eprintln!("skipped: running as root and cannot mount a read-only tmpfs");
                return;
            }
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        dir = t.path().join("cache");
        _mount = None;
    }
    let err = Cache::open(&dir).unwrap_err();
    assert!(matches!(err, Error::NotWritable { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "cache directory `{}` is not writable",
            dir.display()
        )),
        "{err}"
    );
}

#[test]
fn cache_dir_under_a_regular_file_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("file"), b"x").unwrap();
    let dir = t.path().join("file/cache");
    let err = Cache::open(&dir).unwrap_err();
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "error must name the path: {err}"
    );
}

#[test]
fn full_disk_fails_commit_cleanly() {
    let Some(m) = Mount::tmpfs("size=256k") else {
        eprintln!(
            "skipped: cannot mount a tmpfs (ENOSPC is also covered by the /dev/full unit test)"
        );
        return;
    };
    let root = m.path().join("c");
    let c = open(&root);
    let k = key("k");
    let s = c.stage_dir(&k, &["out"]).unwrap();
    write(&s.output("out").join("f"), b"small result");
    // Fill the filesystem so the manifest cannot be written.
    let filler = m.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    let err = c.commit(s, meta("s")).unwrap_err();
    assert!(matches!(err, Error::NoSpace { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("no space left on device while writing `"),
        "{err}"
    );
    assert!(
        c.lookup(&k).unwrap().is_none(),
        "a failed commit leaves no entry"
    );
    // Space back: the same key commits.
    std::fs::remove_file(&filler).unwrap();
    commit_files(&c, &k, &[("f", b"small result")]);
    assert!(c.lookup(&k).unwrap().is_some());
    drop(c);
}

#[test]
fn read_only_runs_dir_names_the_runs_directory() {
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    let e = commit_files(&c, &key("k"), &[("f", b"x")]);
    let tree = c.materialize(&e, "out").unwrap();
    // A runs root under a regular file cannot be created, as root or not.
    std::fs::write(t.path().join("runs"), b"not a dir").unwrap();
    let err = c
        .link_run(&t.path().join("runs"), "exp", "s", "out", &tree)
        .unwrap_err();
    assert!(err.to_string().contains("runs"), "{err}");
    let ro = match Mount::tmpfs("ro,size=1m") {
        Some(m) => m,
        None if !is_root() => {
            eprintln!("skipped the read-only part: not root, no tmpfs");
            return;
        }
        None => {
            eprintln!("skipped the read-only part: cannot mount a tmpfs");
            return;
        }
    };
    let err = c.link_run(ro.path(), "exp", "s", "out", &tree).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "runs directory `{}` is not writable",
            ro.path().display()
        )),
        "{err}"
    );
}

//! Corrupt or missing objects are detected, reported as misses, and never used.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cache::{Error, Lookup, MissReason};

use crate::common::*;

fn object_of(root: &Path, e: &cache::Entry, file: &str) -> PathBuf {
    let d = e.manifest.outputs["out"]
        .entries
        .iter()
        .find(|x| x.path == file)
        .unwrap()
        .digest
        .unwrap()
        .to_hex();
    root.join("v1/objects").join(&d[..2]).join(d)
}

/// Flips one bit in place, keeping the size (as disk corruption or a stray write would).
fn flip_bit(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 3).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], 3).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(0o444)).unwrap();
}

#[test]
fn bit_flipped_object_is_detected_on_materialize() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let c = open(&root);
    let k = key("k");
    let e = commit_files(&c, &k, &[("a", b"hello world"), ("b", b"fine")]);
    let obj = object_of(&root, &e, "a");
    drop(c);
    flip_bit(&obj);

    let c = open(&root);
    let hit = c
        .lookup(&k)
        .unwrap()
        .expect("same size: lookup (stat only) still hits");
    let err = c.materialize(&hit, "out").unwrap_err();
    match &err {
        Error::Corrupt { path, detail } => {
            assert_eq!(path, &obj);
            assert!(detail.contains("content hash"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(err.is_corrupt());
    assert!(!obj.exists(), "the corrupt object is removed");
    assert!(
        matches!(c.probe(&k).unwrap(), Lookup::Miss(MissReason::NotFound)),
        "the entry is removed"
    );
    assert_eq!(
        count_files(&root.join("v1/trees")),
        0,
        "no tree is left built from bad data"
    );

    // Recomputing restores it.
    let e = commit_files(&c, &k, &[("a", b"hello world"), ("b", b"fine")]);
    assert_eq!(
        fs::read(c.materialize(&e, "out").unwrap().join("a")).unwrap(),
        b"hello world"
    );
}

#[test]
fn corruption_of_an_existing_tree_is_detected_by_the_next_process() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let c = open(&root);
    let k = key("k");
    let e = commit_files(&c, &k, &[("a", b"0123456789")]);
    let dir = c.materialize(&e, "out").unwrap();
    drop(c);
    // The tree file is a hardlink to the object: corrupting either corrupts both.
    flip_bit(&dir.join("a"));

    let c = open(&root);
    let hit = c.lookup(&k).unwrap().unwrap();
    let err = c.materialize(&hit, "out").unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(c.lookup(&k).unwrap().is_none());
    assert!(!dir.exists());
}

#[test]
fn missing_object_is_a_miss() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let c = open(&root);
    let k = key("k");
    let e = commit_files(&c, &k, &[("a", b"x"), ("b", b"y")]);
    let obj = object_of(&root, &e, "b");
    fs::remove_file(&obj).unwrap();
    match c.probe(&k).unwrap() {
        Lookup::Miss(MissReason::MissingObject { path }) => assert_eq!(path, obj),
        other => panic!("expected MissingObject, got {other:?}"),
    }
    assert!(!e.dir.exists(), "the bad entry is removed");
    // The commit left the output's tree, whose files are the objects' inodes and whose
    // bytes the commit hashed: a stale Entry handle may still read those, never others.
    if let Ok(dir) = c.materialize(&e, "out") {
        assert_eq!(fs::read(dir.join("b")).unwrap(), b"y");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
    // Without the tree, a stale handle is refused (the tree cannot be rebuilt), in this
    // process and in a fresh one.
    assert!(matches!(
        c.materialize(&e, "out"),
        Err(Error::Corrupt { .. })
    ));
    drop(c);
    assert!(matches!(
        open(&root).materialize(&e, "out"),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn truncated_object_is_a_miss() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let c = open(&root);
    let k = key("k");
    let e = commit_files(&c, &k, &[("a", b"longer content")]);
    let obj = object_of(&root, &e, "a");
    fs::set_permissions(&obj, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&obj, b"short").unwrap();
    let Lookup::Miss(reason) = c.probe(&k).unwrap() else {
        panic!("truncated object must miss")
    };
    assert!(matches!(reason, MissReason::Corrupt { .. }), "{reason}");
    assert!(reason.to_string().contains("is corrupt"), "{reason}");
    assert!(!obj.exists());
}

#[test]
fn garbage_manifest_is_a_miss() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let c = open(&root);
    let k = key("k");
    let e = commit_files(&c, &k, &[("a", b"x")]);
    fs::write(e.manifest_path(), b"{\"format\": 1, \"key\": ").unwrap();
    let Lookup::Miss(reason) = c.probe(&k).unwrap() else {
        panic!("garbage manifest must miss")
    };
    assert!(matches!(reason, MissReason::BadManifest { .. }), "{reason}");
    // A manifest copied under the wrong key is rejected too.
    let e = commit_files(&c, &k, &[("a", b"x")]);
    let other = key("other");
    let odir = root.join("v1/entries").join(other.to_hex());
    fs::create_dir_all(&odir).unwrap();
    fs::copy(e.manifest_path(), odir.join(cache::manifest::MANIFEST_FILE)).unwrap();
    assert!(matches!(
        c.probe(&other).unwrap(),
        Lookup::Miss(MissReason::BadManifest { .. })
    ));
}

#[test]
fn paranoid_reverifies_a_tree_already_checked_in_this_process() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let opts = cache::CacheOptions {
        paranoid: true,
        fsync: false,
        ..Default::default()
    };
    let c = cache::Cache::open_with(&root, opts).unwrap();
    let k = key("k");
    let e = commit_files(&c, &k, &[("a", b"0123456789")]);
    let dir = c.materialize(&e, "out").unwrap();
    flip_bit(&dir.join("a"));
    let err = c.materialize(&e, "out").unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(c.lookup(&k).unwrap().is_none());
}

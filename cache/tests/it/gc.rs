//! gc keeps what is referenced and never touches locked keys.

use std::collections::HashSet;
use std::fs;

use cache::LockOutcome;

use crate::common::*;

#[test]
fn gc_keeps_referenced_and_removes_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("c");
    let c = open(&root);
    let (ka, kb, kc) = (key("a"), key("b"), key("c"));
    let a = commit_files(&c, &ka, &[("shared", b"common bytes"), ("only-a", b"aaaa")]);
    let b = commit_files(
        &c,
        &kb,
        &[("shared", b"common bytes"), ("only-b", &[b'b'; 1000])],
    );
    let da = c.materialize(&a, "out").unwrap();
    let db = c.materialize(&b, "out").unwrap();
    // kc is being computed right now by someone: its checkpoint and staging must survive.
    let LockOutcome::Acquired(lease) = c.lock(&kc).unwrap() else {
        panic!()
    };
    write(&c.checkpoint_dir(&kc).unwrap().join("step"), b"state");
    let staging = c.stage_dir(&kc, &["out"]).unwrap();
    write(&staging.output("out").join("partial"), b"p");
    // An abandoned checkpoint of a key nobody wants any more.
    write(
        &c.checkpoint_dir(&key("old")).unwrap().join("step"),
        b"old state",
    );

    let keep: HashSet<_> = [ka].into_iter().collect();
    let st = c.gc(&keep).unwrap();
    assert_eq!(st.entries, 1, "{st:?}");
    assert_eq!(st.objects, 1, "only the object unique to b goes: {st:?}");
    assert_eq!(st.trees, 1, "{st:?}");
    assert_eq!(st.checkpoints, 1, "{st:?}");
    assert!(st.bytes >= 1000, "{st:?}");
    assert!(st.skipped_locked >= 2, "{st:?}");

    assert!(c.lookup(&kb).unwrap().is_none());
    assert!(!db.exists());
    assert!(da.join("only-a").exists());
    let a = c.lookup(&ka).unwrap().expect("kept entry survives");
    assert_eq!(
        fs::read(c.materialize(&a, "out").unwrap().join("shared")).unwrap(),
        b"common bytes"
    );
    assert!(
        c.checkpoint_dir(&kc).unwrap().join("step").exists(),
        "locked key's checkpoint kept"
    );
    assert!(
        staging.output("out").join("partial").exists(),
        "locked key's staging kept"
    );

    // The locked stage finishes normally after gc.
    drop(staging);
    commit_files(&c, &kc, &[("out", b"done")]);
    drop(lease);

    // Keeping nothing empties the store.
    let st = c.gc(&HashSet::new()).unwrap();
    assert_eq!(st.entries, 2, "{st:?}");
    assert_eq!(count_files(&root.join("v1/objects")), 0);
    assert_eq!(count_files(&root.join("v1/trees")), 0);
    assert_eq!(count_files(&root.join("v1/checkpoints")), 0);
}

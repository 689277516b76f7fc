//! Run memos: what a memo vouches for, and what makes one go.

use std::collections::HashSet;

use cache::{Cache, Entry, Key, Memo};

use crate::common::{commit_files, key, open};

/// A cache with one committed entry (key `a`).
fn one_entry() -> (tempfile::TempDir, Cache, Key, Entry) {
    let t = tempfile::tempdir().unwrap();
    let c = open(t.path());
    let k = key("a");
    let e = commit_files(&c, &k, &[("x.txt", b"x")]);
    (t, c, k, e)
}

#[test]
fn a_memo_gives_back_the_entry_only_at_its_key() {
    let (_t, c, k, e) = one_entry();
    assert!(
        c.load_memo("exp").is_empty(),
        "no memo before the first save"
    );
    c.save_memo("exp", &Memo::default(), [("s", &e)]).unwrap();

    let m = c.load_memo("exp");
    assert_eq!(m.len(), 1);
    assert_eq!(m.key("s"), Some(k));
    let got = m.entry(&c, "s", &k).expect("the recorded key");
    assert_eq!(got.key, k);
    assert_eq!(got.dir, e.dir);
    assert_eq!(got.manifest.outputs, e.manifest.outputs);
    assert!(m.entry(&c, "s", &key("b")).is_none(), "another key");
    assert!(m.entry(&c, "t", &k).is_none(), "another stage");
    // The manifest names its stage: a record under the wrong stage name is not used.
    c.save_memo("exp", &m, [("t", &e)]).unwrap();
    assert!(c.load_memo("exp").entry(&c, "t", &k).is_none());
    assert!(c.load_memo("other").is_empty(), "memos are per experiment");
}

#[test]
fn saving_keeps_the_records_of_stages_not_in_this_run() {
    let t = tempfile::tempdir().unwrap();
    let c = open(t.path());
    let (ka, kb) = (key("a"), key("b"));
    let a = commit_files(&c, &ka, &[("x.txt", b"a")]);
    let b = commit_files(&c, &kb, &[("x.txt", b"b")]);
    c.save_memo("exp", &Memo::default(), [("s", &a)]).unwrap();
    let m = c.load_memo("exp");
    c.save_memo("exp", &m, [("u", &b)]).unwrap();
    let m = c.load_memo("exp");
    assert_eq!((m.key("s"), m.key("u")), (Some(ka), Some(kb)));
    // A stage done again at another key replaces its record.
    c.save_memo("exp", &m, [("s", &b)]).unwrap();
    assert_eq!(c.load_memo("exp").key("s"), Some(kb));
}

#[test]
fn a_damaged_memo_is_empty_and_drop_and_gc_remove_it() {
    let (t, c, k, e) = one_entry();
    c.save_memo("exp", &Memo::default(), [("s", &e)]).unwrap();
    let file = t.path().join("v1/memo/exp.bin");
    let bytes = std::fs::read(&file).unwrap();
    for cut in [0, 7, 8, 20, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        assert!(c.load_memo("exp").is_empty(), "cut at {cut}");
    }
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(c.load_memo("exp").len(), 1);

    c.drop_memo("exp");
    assert!(!file.exists());
    c.save_memo("exp", &Memo::default(), [("s", &e)]).unwrap();
    // gc may remove the entries a memo names, so it removes memos.
    c.gc(&HashSet::from([k])).unwrap();
    assert!(c.load_memo("exp").is_empty());
}

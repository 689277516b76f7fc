//! Commit → lookup → materialize, refs, runs links, crash points.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cache::{CrashPoint, Lookup, MissReason, hash_tree};

use crate::common::*;

#[test]
fn commit_lookup_materialize_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    let k = key("a");
    assert!(c.lookup(&k).unwrap().is_none());

    let s = c.stage_dir(&k, &["model", "metrics"]).unwrap();
    write(&s.output("model").join("w/weights.bin"), &[7u8; 5000]);
    write(&s.output("model").join("config.json"), b"{}");
    fs::create_dir_all(s.output("model").join("empty")).unwrap();
    std::os::unix::fs::symlink("config.json", s.output("model").join("cfg")).unwrap();
    write(&s.output("model").join("run.sh"), b"#!/bin/sh\n");
    fs::set_permissions(
        s.output("model").join("run.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    write(&s.output("metrics").join("m.json"), b"{\"acc\":1}");
    fs::write(s.log_path(), b"step 1\n").unwrap();
    let staged_model = hash_tree(&s.output("model")).unwrap().digest;
    let staging_dir = s.dir().to_path_buf();
    let e = c.commit(s, meta("train")).unwrap();
    assert!(
        !staging_dir.exists(),
        "staging dir must be removed on commit"
    );
    assert_eq!(e.output_digest("model"), Some(staged_model));

    let hit = c.lookup(&k).unwrap().expect("committed entry is a hit");
    assert_eq!(hit.manifest, e.manifest);
    assert_eq!(hit.manifest.inputs["stage"], "train");
    assert_eq!(fs::read(hit.log_path().unwrap()).unwrap(), b"step 1\n");
    assert_eq!(hit.outputs().collect::<Vec<_>>(), ["metrics", "model"]);

    // A fresh process (new Cache) sees the same entry and materializes it.
    drop(c);
    let c = open(&t.path().join("c"));
    let dir = c
        .materialize(&c.lookup(&k).unwrap().unwrap(), "model")
        .unwrap();
    assert_eq!(
        hash_tree(&dir).unwrap().digest,
        staged_model,
        "materialized tree must hash to the committed digest"
    );
    let names: Vec<String> = read_tree(&dir).into_iter().map(|(p, _)| p).collect();
    assert_eq!(names, ["config.json", "run.sh", "w/weights.bin"]);
    assert_eq!(
        fs::read(dir.join("w/weights.bin")).unwrap(),
        vec![7u8; 5000]
    );
    assert_eq!(
        fs::read_link(dir.join("cfg")).unwrap().to_str(),
        Some("config.json")
    );
    assert!(dir.join("empty").is_dir());
    assert_eq!(
        fs::metadata(dir.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o555
    );
    assert_eq!(
        fs::metadata(dir.join("config.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o222,
        0,
        "tree files are read-only"
    );
    // Materializing again returns the same directory.
    assert_eq!(c.materialize(&hit, "model").unwrap(), dir);
    assert!(matches!(
        c.materialize(&hit, "nope"),
        Err(cache::Error::NoSuchOutput { .. })
    ));
}

#[test]
fn identical_content_is_stored_once() {
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    let a = commit_files(&c, &key("a"), &[("x", b"same"), ("y", b"same")]);
    let b = commit_files(&c, &key("b"), &[("z", b"same")]);
    assert_eq!(count_files(&t.path().join("c/v1/objects")), 1);
    assert_ne!(
        a.output_digest("out"),
        b.output_digest("out"),
        "names are part of the tree digest"
    );
    let b2 = commit_files(&c, &key("b2"), &[("z", b"same")]);
    assert_eq!(
        b.output_digest("out"),
        b2.output_digest("out"),
        "early cutoff: same bytes, same digest"
    );
}

#[test]
fn refs_and_run_links() {
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    assert_eq!(c.get_ref("exp", "task/GQA").unwrap(), None);
    assert!(!c.has_refs("exp"));
    c.set_ref("exp", "task/GQA", &key("1")).unwrap();
    assert!(c.has_refs("exp"));
    assert!(!c.has_refs("other"));
    assert!(!c.has_refs("../exp"));
    c.set_ref("exp", "task/GQA", &key("2")).unwrap();
    assert_eq!(c.get_ref("exp", "task/GQA").unwrap(), Some(key("2")));
    assert!(c.set_ref("exp", "../x", &key("1")).is_err());
    assert!(c.set_ref("a/b", "x", &key("1")).is_err());
    assert!(c.get_ref("exp", "../x").is_err());
    // A ref is a symlink whose text fits in an ext4 inode (< 60 bytes); a task named like
    // a directory of expansions does not collide with it.
    let link = t.path().join("c/v1/refs/exp/task/GQA.key");
    assert!(std::fs::read_link(&link).unwrap().as_os_str().len() < 60);
    c.set_ref("exp", "task", &key("3")).unwrap();
    assert_eq!(c.get_ref("exp", "task").unwrap(), Some(key("3")));
    assert_eq!(c.get_ref("exp", "task/GQA").unwrap(), Some(key("2")));
    // Unreadable text is no ref (refs only feed explanations).
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("not base64!", &link).unwrap();
    assert_eq!(c.get_ref("exp", "task/GQA").unwrap(), None);

    let e1 = commit_files(&c, &key("1"), &[("f", b"one")]);
    let e2 = commit_files(&c, &key("2"), &[("f", b"two")]);
    let runs = t.path().join("runs");
    let d1 = c.materialize(&e1, "out").unwrap();
    let link = c.link_run(&runs, "exp", "train", "out", &d1).unwrap();
    assert_eq!(link, runs.join("exp/train/out"));
    assert_eq!(fs::read(link.join("f")).unwrap(), b"one");
    let d2 = c.materialize(&e2, "out").unwrap();
    c.link_run(&runs, "exp", "train", "out", &d2).unwrap();
    assert_eq!(fs::read(link.join("f")).unwrap(), b"two");
    assert_eq!(
        fs::read_dir(runs.join("exp/train")).unwrap().count(),
        1,
        "no temp links left behind"
    );

    fs::create_dir_all(runs.join("exp/user/out")).unwrap();
    let err = c.link_run(&runs, "exp", "user", "out", &d2).unwrap_err();
    assert!(err.to_string().contains("is not a symlink"), "{err}");
}

#[test]
fn crash_at_any_commit_step_leaves_no_entry() {
    for point in [
        CrashPoint::AfterHash,
        CrashPoint::AfterObjects,
        CrashPoint::AfterLog,
        CrashPoint::BeforeManifestRename,
    ] {
        let t = tempfile::tempdir().unwrap();
        let c = open(&t.path().join("c"));
        let k = key("crash");
        let s = c.stage_dir(&k, &["out"]).unwrap();
        write(&s.output("out").join("f"), b"data");
        fs::write(s.log_path(), b"log").unwrap();
        assert!(c.commit_until(s, meta("s"), Some(point)).is_err());
        // A new process after the "crash" sees nothing.
        drop(c);
        let c = open(&t.path().join("c"));
        assert!(
            matches!(c.probe(&k).unwrap(), Lookup::Miss(MissReason::NotFound)),
            "{point:?} left an entry"
        );
        // Resuming works and gc collects the leftovers of the crashed attempt.
        let e = commit_files(&c, &k, &[("f", b"data")]);
        assert!(c.lookup(&k).unwrap().is_some());
        let st = c.gc(&[k].into_iter().collect()).unwrap();
        assert_eq!(st.entries, 0, "{point:?}");
        assert_eq!(
            count_files(&t.path().join("c/v1/tmp")),
            0,
            "{point:?}: tmp leftovers not collected"
        );
        assert_eq!(
            fs::read(c.materialize(&e, "out").unwrap().join("f")).unwrap(),
            b"data"
        );
    }
}

#[test]
fn failed_stage_drops_staging_and_keeps_checkpoints() {
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    let k = key("k");
    let ck = c.checkpoint_dir(&k).unwrap();
    write(&ck.join("step-10.bin"), b"state");
    let s = c.stage_dir(&k, &["out"]).unwrap();
    let dir = s.dir().to_path_buf();
    drop(s); // the stage failed
    assert!(!dir.exists());
    assert!(
        ck.join("step-10.bin").exists(),
        "a failed attempt keeps its checkpoints for resume"
    );
    commit_files(&c, &k, &[("f", b"x")]);
    assert!(!ck.exists(), "commit removes the checkpoint dir");
}

#[test]
fn bad_output_names_are_rejected() {
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    for bad in ["", "..", "a/b"] {
        let err = c.stage_dir(&key("k"), &[bad]).unwrap_err();
        assert!(err.to_string().starts_with("invalid output name"), "{err}");
    }
}

#[test]
fn cache_is_shareable_and_concurrent_materialize_agrees() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<cache::Cache>();
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("f{i}"), vec![i as u8; 100 + i]))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let e = commit_files(&c, &key("k"), &refs);
    drop(c);
    // Fresh caches (as separate processes would be) race to build the same tree.
    let dirs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (root, e) = (t.path().join("c"), &e);
                s.spawn(move || open(&root).materialize(e, "out").unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(dirs.windows(2).all(|w| w[0] == w[1]));
    let mut expected = files.clone();
    expected.sort();
    assert!(
        read_tree(&dirs[0]) == expected,
        "materialized content differs"
    );
    assert_eq!(
        count_files(&t.path().join("c/v1/tmp")),
        0,
        "losing builders clean up"
    );
}

#[test]
fn hard_linked_outputs_leave_the_users_file_alone() {
    let t = tempfile::tempdir().unwrap();
    let c = open(&t.path().join("c"));
    let user = t.path().join("user-data.txt");
    fs::write(&user, b"user bytes").unwrap();
    let mode_before = fs::metadata(&user).unwrap().permissions().mode();
    let s = c.stage_dir(&key("k"), &["out"]).unwrap();
    fs::hard_link(&user, s.output("out").join("data.txt")).unwrap();
    let e = c.commit(s, meta("s")).unwrap();
    assert_eq!(
        fs::metadata(&user).unwrap().permissions().mode(),
        mode_before,
        "user's file was chmod'ed"
    );
    // Editing the user's file afterwards must not touch the cached copy.
    fs::write(&user, b"edited!!!!").unwrap();
    let dir = c
        .materialize(&c.lookup(&key("k")).unwrap().unwrap(), "out")
        .unwrap();
    assert_eq!(fs::read(dir.join("data.txt")).unwrap(), b"user bytes");
    assert_eq!(
        e.output_digest("out"),
        Some(hash_tree(&dir).unwrap().digest)
    );
}

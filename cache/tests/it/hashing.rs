//! Tree digests are canonical; the stat cache avoids rehashing.

use std::fs::{self, File};
use std::time::{Duration, SystemTime};

use cache::{StatCache, hash_tree};
use proptest::prelude::*;

use crate::common::*;

fn files_strategy() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = "[a-c]{1,2}(/[a-c]{1,2}){0,2}";
    prop::collection::btree_map(name, prop::collection::vec(any::<u8>(), 0..64), 1..12).prop_map(
        |m| {
            // Drop paths that are a prefix directory of another path (file vs dir clash).
            let keys: Vec<String> = m.keys().cloned().collect();
            m.into_iter()
                .filter(|(k, _)| !keys.iter().any(|o| o.starts_with(&format!("{k}/"))))
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Same content written in a different order, at different times, in a different
    /// place gives the same digest.
    #[test]
    fn tree_digest_ignores_order_mtime_and_location(files in files_strategy(), seed in 0u64..1000) {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("deeper/b"));
        for (p, c) in &files {
            write(&a.join(p), c);
        }
        let mut rev = files.clone();
        rev.reverse();
        for (i, (p, c)) in rev.iter().enumerate() {
            write(&b.join(p), c);
            let when = SystemTime::UNIX_EPOCH + Duration::from_secs(seed * 1000 + i as u64);
            File::options().write(true).open(b.join(p)).unwrap().set_modified(when).unwrap();
        }
        let (ta, tb) = (hash_tree(&a).unwrap(), hash_tree(&b).unwrap());
        prop_assert_eq!(ta.digest, tb.digest);
        prop_assert_eq!(ta.size, files.iter().map(|(_, c)| c.len() as u64).sum::<u64>());
    }
}

#[test]
fn stat_cache_hit_avoids_rehash() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    write(&data.join("train.json"), b"[1,2,3]");
    write(&data.join("img/0.png"), &[9u8; 300_000]);
    let mut c = open(&t.path().join("c"));
    c.stat_cache_mut().set_racy_window(Duration::ZERO);
    let d1 = c.digest_path(&data).unwrap();
    assert_eq!(c.stat_cache().hashed(), 2);
    let d2 = c.digest_path(&data).unwrap();
    assert_eq!(d1, d2);
    assert_eq!(
        c.stat_cache().hashed(),
        2,
        "second digest must come from the stat cache"
    );
    assert_eq!(c.stat_cache().hits(), 2);
    c.save_stat_cache().unwrap();
    drop(c);

    // Persisted: a new process hashes nothing.
    let c = open(&t.path().join("c"));
    assert_eq!(c.digest_path(&data).unwrap(), d1);
    assert_eq!(c.stat_cache().hashed(), 0);

    // An edit is seen even when the mtime is put back (ctime still moves).
    let f = data.join("train.json");
    // Past the coarse timestamp tick of the first write (see the racy-window docs).
    std::thread::sleep(Duration::from_millis(30));
    let mtime = fs::metadata(&f).unwrap().modified().unwrap();
    fs::write(&f, b"[1,2,4]").unwrap();
    File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_ne!(c.digest_path(&data).unwrap(), d1);
    assert_eq!(c.stat_cache().hashed(), 1);
}

#[test]
fn digest_path_follows_symlinks_for_external_inputs() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("blobs/x"), b"weights");
    fs::create_dir_all(t.path().join("snap")).unwrap();
    std::os::unix::fs::symlink("../blobs/x", t.path().join("snap/model.bin")).unwrap();
    let s = StatCache::in_memory();
    let before = s.digest_path(&t.path().join("snap")).unwrap();
    fs::write(t.path().join("blobs/x"), b"other weights").unwrap();
    assert_ne!(
        s.digest_path(&t.path().join("snap")).unwrap(),
        before,
        "content behind a link is what a stage reads"
    );
    let err = s.digest_path(&t.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

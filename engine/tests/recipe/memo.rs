//! The resolved-recipe cache (`recipe::load_memo`): it gives exactly what a full load gives,
//! is used while nothing changed, and is never used once anything it was made from changed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use engine::recipe::{Recipe, load_memo};

use super::{fixture, kinds};

fn show(r: &Recipe) -> String {
    format!("{r:?}")
}

/// The one stored file of `store`, by inode (a store written again is a new file).
fn stored_inode(store: &Path) -> u64 {
    let files: Vec<_> = std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".msgpack"))
        .collect();
    assert_eq!(files.len(), 1, "one stored recipe per (directory, path)");
    files[0].metadata().unwrap().ino()
}

#[test]
fn memo_gives_what_a_full_load_gives() {
    let registry = kinds::registry();
    for rel in [
        "ok/child.toml",
        "ok/coin_chain.toml",
        "ok/sefe_sweep.toml",
        "ok/sweep.toml",
    ] {
        for sets in [&[][..], &["experiment.seed=5"][..]] {
            let sets: Vec<String> = sets.iter().map(|s| (*s).to_owned()).collect();
            let store = tempfile::tempdir().unwrap();
            let full = engine::recipe::load(&fixture(rel), &sets, &registry).unwrap();
            let first = load_memo(&fixture(rel), &sets, &registry, store.path()).unwrap();
            let ino = stored_inode(store.path());
            let second = load_memo(&fixture(rel), &sets, &registry, store.path()).unwrap();
            assert_eq!(
                stored_inode(store.path()),
                ino,
                "{rel}: the second load must come from the store (a full one rewrites it)"
            );
            assert_eq!(show(&first), show(&full), "{rel} {sets:?}");
            assert_eq!(show(&second), show(&full), "{rel} {sets:?}");
        }
    }
}

#[test]
fn any_change_of_a_file_read_or_of_the_overrides_is_a_full_load() {
    let registry = kinds::registry();
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("ok");
    for rel in ["child.toml", "parts/base.toml", "parts/extra.toml"] {
        std::fs::create_dir_all(dir.path().join(rel).parent().unwrap()).unwrap();
        std::fs::copy(src.join(rel), dir.path().join(rel)).unwrap();
    }
    let store = dir.path().join("store");
    let child = dir.path().join("child.toml");
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| (*s).to_owned()).collect();
        let memo = load_memo(&child, &sets, &registry, &store).unwrap();
        let full = engine::recipe::load(&child, &sets, &registry).unwrap();
        assert_eq!(show(&memo), show(&full));
        memo
    };
    let before = load(&[]);
    let ino = stored_inode(&store);
    load(&[]);
    assert_eq!(
        stored_inode(&store),
        ino,
        "nothing changed: served from the store"
    );

    // An included file (read through the root) changes: the stored recipe is not used.
    let extra = dir.path().join("parts/extra.toml");
    let text = std::fs::read_to_string(&extra).unwrap();
    std::fs::write(&extra, format!("{text}\n# a comment changes the digest\n")).unwrap();
    load(&[]);
    assert_ne!(stored_inode(&store), ino);
    let ino = stored_inode(&store);
    // The parent of `extends` changes a value: the new value is what comes back.
    let base = dir.path().join("parts/base.toml");
    let text = std::fs::read_to_string(&base).unwrap();
    std::fs::write(&base, text.replacen("seed", "# seed", 1)).unwrap();
    let after = load(&[]);
    assert_ne!(stored_inode(&store), ino);
    assert_eq!(
        show(&after),
        show(&before),
        "the child sets the seed itself"
    );
    // Overrides are part of what is stored.
    let set = load(&["experiment.seed=77"]);
    assert_eq!(set.seed, 77);
    assert_eq!(load(&[]).seed, before.seed);
}

#[test]
fn another_registry_or_a_broken_store_is_a_full_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let path = fixture("ok/sweep.toml");
    let registry = kinds::registry();
    let first = load_memo(&path, &[], &registry, &store).unwrap();
    // A registry with a kind less: the recipe no longer loads, whatever was stored.
    let mut fewer = engine::stage::Registry::new();
    fewer.register(engine::shell::Shell);
    assert!(load_memo(&path, &[], &fewer, &store).is_err());
    // A torn or corrupted store file is ignored (and replaced).
    let stored = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let bytes = std::fs::read(&stored).unwrap();
    for broken in [bytes[..bytes.len() / 2].to_vec(), {
        let mut b = bytes.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        b
    }] {
        std::fs::write(&stored, broken).unwrap();
        let again = load_memo(&path, &[], &registry, &store).unwrap();
        assert_eq!(show(&again), show(&first));
        assert_eq!(std::fs::read(&stored).unwrap().len(), bytes.len());
    }
    // Errors are never stored: a broken recipe fails every time.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[stages.x]\nkind = \"nope\"\n").unwrap();
    for _ in 0..2 {
        assert!(load_memo(&bad, &[], &registry, &store).is_err());
    }
}

//! The cache defends itself: a corrupted object is detected on read and its stage rerun;
//! an unusable cache directory is an environment error (exit 3) with a clear message.

use std::path::{Path, PathBuf};

use crate::common::{Project, RecipeOpts, Shape, is_root};

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(path);
            } else if e.file_type().unwrap().is_file() {
                v.push(path);
            }
        }
    }
    v.sort();
    v
}

/// Flip one byte of `path` in place (making it writable first: objects may be read-only).
fn flip_byte(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o200)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    assert!(!bytes.is_empty());
    bytes[0] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn corrupted_object_is_detected_and_its_stage_rerun() {
    let (p, _) = Project::with_shape(Shape::Chain, 4, &RecipeOpts::default());
    p.run_json(&[]).ok();
    let expected = p.outs();
    let objects = files_under(&p.cache().join("v1/objects"));
    assert!(
        !objects.is_empty(),
        "no objects under {}",
        p.cache().join("v1/objects").display()
    );

    // Find the object holding s0002's output (objects are content-addressed blobs).
    let target = &expected["s0002.txt"];
    let obj = objects
        .iter()
        .find(|o| std::fs::read(o).is_ok_and(|b| &b == target))
        .unwrap_or_else(|| panic!("no object with the bytes of out/s0002.txt among {objects:?}"));
    flip_byte(obj);

    // Remove the restored out so that the run must read the object back.
    std::fs::remove_file(p.proj().join("out/s0002.txt")).unwrap();
    let r = p.run_json(&[]);
    r.ok();
    assert!(
        r.set_of("stage-started").contains("s0002"),
        "the corrupt entry must be rerun, got {:?}",
        r.set_of("stage-started")
    );
    assert!(
        !r.set_of("stage-started").contains("s0000"),
        "intact entries must still hit"
    );
    assert_eq!(
        p.outs(),
        expected,
        "outputs must be correct after the repair"
    );
    assert_eq!(
        std::fs::read(obj).ok().as_ref(),
        Some(target),
        "the object must have been repaired"
    );

    let again = p.run_json(&[]);
    again.ok();
    assert!(
        again.set_of("stage-started").is_empty(),
        "after the repair everything hits"
    );
}

#[test]
fn truncated_object_is_detected() {
    let (p, _) = Project::with_shape(Shape::Chain, 2, &RecipeOpts::default());
    p.run_json(&[]).ok();
    let expected = p.outs();
    for obj in files_under(&p.cache().join("v1/objects")) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&obj, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&obj, b"").unwrap();
    }
    let r = p.run_json(&[]);
    r.ok();
    assert_eq!(
        r.set_of("stage-started").len(),
        2,
        "every stage whose object was emptied reruns"
    );
    assert_eq!(p.outs(), expected);
}

#[test]
fn cache_dir_under_a_regular_file_is_exit_3() {
    let (p, _) = Project::with_shape(Shape::Chain, 2, &RecipeOpts::default());
    let blocker = p.root().join("blocker");
    std::fs::write(&blocker, "not a directory").unwrap();
    // Relative to the working directory (the temp root), so that the snapshot does not
    // depend on the temp path's length (miette wraps long lines).
    let cache = std::path::Path::new("blocker/cache");
    let recipe = p.recipe();
    let r = crate::common::run_cmd(
        p.cmd_with_cache(cache, &["--no-progress", "run", recipe.to_str().unwrap()]),
    );
    assert_eq!(
        r.code, 3,
        "an uncreatable cache dir is an environment error:\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stderr.contains("blocker"),
        "the error must name the path:\n{}",
        r.stderr
    );
    assert!(
        p.exec_counts().is_empty(),
        "nothing may run without a cache"
    );
    // Not snapshotted: miette wraps the message inside the absolute path, whose length
    // depends on the temp dir. The path and the help are what matter.
    assert!(
        r.stderr
            .contains("cannot use the cache directory `blocker/cache`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("--cache-dir"),
        "the help must say how to fix it:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("Not a directory"),
        "the OS reason must be shown:\n{}",
        r.stderr
    );
}

#[test]
fn json_mode_reports_an_unusable_cache_as_an_error_event() {
    let (p, _) = Project::with_shape(Shape::Chain, 2, &RecipeOpts::default());
    std::fs::write(p.root().join("blocker"), "not a directory").unwrap();
    let recipe = p.recipe();
    let r = crate::common::run_cmd(p.cmd_with_cache(
        std::path::Path::new("blocker/cache"),
        &["--json", "run", recipe.to_str().unwrap()],
    ));
    assert_eq!(r.code, 3, "{}", r.stderr);
    let events = r.events();
    assert_eq!(events.len(), 1, "only the error event:\n{}", r.stdout);
    let data = &events[0]["data"];
    assert_eq!(events[0]["type"], "error");
    assert_eq!(data["exit_code"], 3);
    assert!(
        data["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot use the cache directory `blocker/cache`")),
        "{data}"
    );
    let causes: Vec<&str> = data["causes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(
        causes.iter().any(|c| c.contains("Not a directory")),
        "the OS reason is among the causes: {causes:?}"
    );
    assert!(
        data["help"]
            .as_str()
            .is_some_and(|h| h.contains("--cache-dir"))
    );
    // People still get the rendered diagnostic on stderr.
    assert!(
        r.stderr.contains("cannot use the cache directory"),
        "{}",
        r.stderr
    );
}

#[test]
fn read_only_cache_dir_is_exit_3() {
    if is_root() {
        eprintln!("skipped: running as root, chmod does not restrict root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let (p, _) = Project::with_shape(Shape::Chain, 2, &RecipeOpts::default());
    std::fs::create_dir(p.cache()).unwrap();
    std::fs::set_permissions(p.cache(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let r = p.run(&["--no-progress", "run", p.recipe().to_str().unwrap()]);
    std::fs::set_permissions(p.cache(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stderr.contains("cache"), "{}", r.stderr);
}

#[test]
fn env_var_selects_the_cache_dir() {
    let (p, _) = Project::with_shape(Shape::Chain, 2, &RecipeOpts::default());
    let envcache = p.root().join("envcache");
    let recipe = p.recipe();
    let mut c = std::process::Command::new(crate::common::BIN);
    c.current_dir(p.root())
        .env("PIPELINE_CACHE_DIR", &envcache)
        .args(["--json", "run", recipe.to_str().unwrap()]);
    let r = crate::common::run_cmd(c);
    r.ok();
    assert!(
        envcache.join("v1").is_dir(),
        "PIPELINE_CACHE_DIR must be used"
    );
    assert!(
        !p.root().join(".pipeline").exists(),
        "the default cache dir must not be created when the env var is set"
    );
}

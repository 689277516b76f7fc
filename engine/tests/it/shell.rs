//! The `shell` kind end to end.

use crate::{Project, read};

const RECIPE: &str = r#"
[experiment]
name = "t"

[stages.s0]
kind = "shell"
deps = ["seed.txt"]
cmd = "cat ${deps} > ${outs}"
outs = ["out/s0.txt"]

[stages.s1]
kind = "shell"
deps = ["@s0", "seed.txt"]
cmd = "cat ${deps} > ${outs} && echo p=${params.p} >> ${outs}"
outs = ["out/s1.txt"]
params = { p = 1, q = 1 }
"#;

#[test]
fn shell_stages_run_restore_and_cache() {
    let p = Project::new();
    p.write("seed.txt", "seed\n");
    let out = p.run(RECIPE);
    assert_eq!(out.ran(), ["s0", "s1"], "{:?}", out.summary);
    assert_eq!(read(&p.path("out/s1.txt")), "seed\nseed\np=1\n");
    let log = std::fs::read_dir(p.path(".pipeline/v1/entries"))
        .unwrap()
        .count();
    assert_eq!(log, 2);

    // Deleted outs come back from the cache on a hit.
    std::fs::remove_file(p.path("out/s1.txt")).unwrap();
    std::fs::write(p.path("out/s0.txt"), "tampered").unwrap();
    let out = p.run(RECIPE);
    assert!(out.ran().is_empty());
    assert_eq!(read(&p.path("out/s1.txt")), "seed\nseed\np=1\n");
    assert_eq!(read(&p.path("out/s0.txt")), "seed\n");

    // A changed dep file reruns both, naming the file.
    p.write("seed.txt", "new seed\n");
    let out = p.run(RECIPE);
    assert_eq!(out.ran(), ["s0", "s1"]);
    assert_eq!(out.rerun_lines()[0], "[RERUN] s0: file `seed.txt` changed");
    assert_eq!(read(&p.path("out/s1.txt")), "new seed\nnew seed\np=1\n");

    // `q` is hashed: it reruns s1.
    let out = p.run(&RECIPE.replace("q = 1", "q = 2"));
    assert_eq!(out.ran(), ["s1"]);
    assert_eq!(out.rerun_lines(), ["[RERUN] s1: param `q` changed (1 → 2)"]);
}

#[test]
fn missing_declared_out_fails_naming_it() {
    let p = Project::new();
    let out = p.run(
        r#"
[experiment]
name = "t"

[stages.s]
kind = "shell"
cmd = "echo hi"
outs = ["never.txt"]
"#,
    );
    assert_eq!(out.summary.failed.len(), 1);
    assert!(
        out.summary.failed[0].1.contains("`never.txt`"),
        "{:?}",
        out.summary.failed
    );
    assert_eq!(
        std::fs::read_dir(p.path(".pipeline/v1/entries"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn failing_command_reports_its_status_and_keeps_a_log() {
    let p = Project::new();
    let out = p.run(
        r#"
[experiment]
name = "t"

[stages.s]
kind = "shell"
cmd = "echo to-stderr >&2; exit 3"
"#,
    );
    let log = p.path("runs/t/s/failed.log");
    assert_eq!(
        out.summary.failed[0].1,
        format!("command failed with exit status 3 (log: {})", log.display())
    );
    assert_eq!(read(&log), "to-stderr\n");
}

#[test]
fn large_output_and_a_lingering_background_writer_are_all_logged() {
    // More than a pipe buffer (64 KiB) of output, so the stage must keep draining the pipe
    // while it waits for the exit; then `sh` exits while a background process still holds
    // the pipe: its late line belongs in the log too (EOF, not the exit, ends the log).
    let p = Project::new();
    let out = p.run(
        r#"
[experiment]
name = "t"

[stages.s]
kind = "shell"
cmd = "yes line | head -c 200000; echo to-stderr >&2; (sleep 0.3; echo late) & echo ok > ${outs}"
outs = ["out/s.txt"]
"#,
    );
    assert_eq!(out.ran(), ["s"], "{:?}", out.summary);
    let entries: Vec<_> = std::fs::read_dir(p.path(".pipeline/v1/entries"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1);
    let log = read(&entries[0].join("log.txt"));
    assert_eq!(log.len(), 200_000 + "to-stderr\n".len() + "late\n".len());
    assert!(log.starts_with("line\nline\n"));
    assert!(
        log.ends_with("to-stderr\nlate\n"),
        "{:?}",
        &log[log.len() - 40..]
    );
}

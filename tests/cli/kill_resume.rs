//! SIGKILL anywhere: a run killed with `kill -9` at a random moment (possibly several
//! times) and then resumed must end with outputs byte-identical to an uninterrupted run,
//! leave no lock that blocks the resumed run, and a further run must be all hits.
//!
//! Every process of the killed run dies, as in a preempted job or a power cut: `pipeline`
//! is started in a session of its own and every process of that session is killed. Killing
//! only its process group is not enough: each shell stage runs in a process group of its
//! own (so that Ctrl-C reaches only the engine), and a stage command that outlived the
//! kill went on writing its out behind the resumed run's back — a different scenario (not
//! a crash), which made the resumed run fail or differ now and then under load.
//!
//! Kills are placed by progress, not by time: after a random number of stage commands of
//! the run have started (from the side log), plus a random part of one command's sleep. A
//! delay measured against one reference run missed most runs when the load changed
//! between the reference and the killed runs.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{Project, RecipeOpts, Shape, wait_timeout};

const STAGES: usize = 30;

fn opts() -> RecipeOpts {
    RecipeOpts {
        name: "killme".into(),
        sleep: Some(0.02),
        ..RecipeOpts::default()
    }
}

/// A deterministic sequence of delays per seed (splitmix64), so a failing seed can be
/// replayed exactly.
struct Delays(u64);
impl Delays {
    fn next_fraction(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Start `pipeline run` in a session of its own.
fn spawn_run(p: &Project, args: &[&str]) -> std::process::Child {
    let recipe = p.recipe();
    let mut all = vec!["--json", "--no-progress", "run", recipe.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut c = p.cmd(&all);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    c.spawn().expect("spawn")
}

/// SIGKILL every process of session `sid` (the run and every stage command it started,
/// whatever their process groups), until none is left.
fn kill_session(sid: i32) {
    for _ in 0..50 {
        let mut found = false;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid pgrp session ...`; comm may hold spaces or parens.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let session = fields.nth(2).and_then(|s| s.parse().ok());
            // A zombie is dead already (its parent has not reaped it yet).
            if session == Some(sid) && !matches!(state, Some("Z" | "X")) {
                found = true;
                // SAFETY: kill(2) with a pid; no memory is involved.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("processes of session {sid} survive SIGKILL");
}

/// Start a run and SIGKILL all of it once `after` more stage commands have started plus
/// `extra`. Returns whether the run had already finished by then.
fn run_and_kill(p: &Project, after: usize, extra: Duration) -> bool {
    let before: usize = p.exec_counts().values().sum();
    let mut child = spawn_run(p, &["-j", "2"]);
    let sid = child.id() as i32;
    let start = Instant::now();
    let mut finished = false;
    while p.exec_counts().values().sum::<usize>() < before + after {
        if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60) {
            finished = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if !finished {
        std::thread::sleep(extra);
        finished = child.try_wait().unwrap().is_some();
    }
    kill_session(sid);
    child.wait().unwrap();
    finished
}

#[test]
fn sigkill_at_random_moments_then_resume_is_bit_identical() {
    // Reference: one uninterrupted run in its own directory and cache.
    let (reference, _) = Project::with_shape(Shape::Layered, STAGES, &opts());
    let t0 = Instant::now();
    reference.run_json(&["-j", "2"]).ok();
    let full = t0.elapsed();
    let expected = reference.outs();
    let sleep = Duration::from_secs_f64(opts().sleep.unwrap_or(0.0));
    assert_eq!(expected.len(), STAGES);

    let mut killed_mid_run = 0;
    for seed in 1..=6u64 {
        let (p, _) = Project::with_shape(Shape::Layered, STAGES, &opts());
        let mut delays = Delays(seed);
        // One or two kills per seed, anywhere from process start (no command started yet)
        // to the last stages not yet done, at any point of a command.
        let kills = 1 + (seed % 2) as usize;
        for _ in 0..kills {
            let left = STAGES.saturating_sub(p.exec_counts().len());
            let after = (delays.next_fraction() * left as f64) as usize;
            let extra = sleep.mul_f64(1.5 * delays.next_fraction());
            if !run_and_kill(&p, after, extra) {
                killed_mid_run += 1;
            }
        }
        // The resumed run must not be blocked by anything the killed runs left behind.
        let t = Instant::now();
        let resumed = p.run_json(&["-j", "2"]);
        resumed.ok();
        assert!(
            t.elapsed() < full * 3 + Duration::from_secs(10),
            "seed {seed}: resume took {:?}",
            t.elapsed()
        );
        assert_eq!(
            p.outs(),
            expected,
            "seed {seed}: outputs differ from the uninterrupted run"
        );
        let third = p.run_json(&[]);
        third.ok();
        assert!(
            third.set_of("stage-started").is_empty(),
            "seed {seed}: third run reran {:?}",
            third.set_of("stage-started")
        );
        assert_eq!(third.set_of("stage-cached").len(), STAGES, "seed {seed}");
    }
    assert!(
        killed_mid_run >= 3,
        "the kills mostly missed the run ({killed_mid_run}); the test proves nothing"
    );
}

#[test]
fn sigkill_after_every_stage_commit_count() {
    // Kill after a growing number of committed stages (observed through the side log), so
    // kills land right around commits, not only at random.
    let (reference, _) = Project::with_shape(Shape::Chain, 8, &opts());
    reference.run_json(&[]).ok();
    let expected = reference.outs();

    let (p, _) = Project::with_shape(Shape::Chain, 8, &opts());
    for target in 1..8 {
        let mut child = spawn_run(&p, &[]);
        let sid = child.id() as i32;
        let start = Instant::now();
        // Wait until the chain reached stage `target` (its command has started).
        while !p.exec_counts().contains_key(&format!("s{target:04}"))
            && start.elapsed() < Duration::from_secs(30)
        {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        kill_session(sid);
        child.wait().unwrap();
    }
    let recipe = p.recipe();
    let c = p.cmd(&["--json", "--no-progress", "run", recipe.to_str().unwrap()]);
    let mut c = c;
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = wait_timeout(c.spawn().unwrap(), Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.outs(), expected);
    // Every stage before the last kill target committed before it was killed or was
    // resumed: no stage ran more often than the number of kills that could hit it + 1.
    for (stage, n) in p.exec_counts() {
        assert!(n <= 8, "{stage} executed {n} times");
    }
    assert_eq!(
        p.exec_counts()["s0000"],
        1,
        "s0000 committed before the first kill and must never rerun"
    );
}

/// Whether process `pid` still runs (a zombie has died and only awaits its reaper).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X")),
        Err(_) => false,
    }
}

/// The pid a stage command writes to `path`, once it has (30 s at most).
fn pid_when_written(path: &std::path::Path) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            return pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the stage command never wrote {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL process `pid`, so that a failing test leaves nothing behind for the rest of the
/// suite.
fn kill_pid(pid: i32) {
    // SAFETY: kill(2) with a pid; no memory is involved.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[test]
fn sigkill_of_pipeline_alone_takes_its_stage_command_down() {
    // Only `pipeline` is killed, not its session: the stage command, in a process group of
    // its own, must not go on running (and writing its outs) without it.
    let p = Project::new(
        "[experiment]\nname = \"orphan\"\n\n[stages.long]\nkind = \"shell\"\n\
         cmd = \"echo $$ > ../cmd.pid && exec sleep 60\"\nouts = [\"out.txt\"]\n",
    );
    let mut child = spawn_run(&p, &[]);
    let cmd_pid = pid_when_written(&p.root().join("cmd.pid"));
    // Give the `exec` a moment so the pid is `sleep`'s, not only `sh`'s.
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(cmd_pid), "the stage command should be running");
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    while alive(cmd_pid) {
        if start.elapsed() > Duration::from_secs(5) {
            // Do not leave it behind for the rest of the suite.
            kill_pid(cmd_pid);
            panic!("the stage command outlived `pipeline` killed with SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn processes_a_killed_run_forked_die_when_the_stage_is_rerun() {
    // A compound command: `sh` forks the `sleep` and waits for it. PDEATHSIG takes `sh` down
    // with `pipeline`, but not what it forked; the next attempt at the stage must.
    let p = Project::new(
        "[experiment]\nname = \"orphan\"\n\n[stages.long]\nkind = \"shell\"\n\
         cmd = \"if [ -e ../again ]; then echo ok > out.txt; else \
         sh -c 'echo $$ > ../grand.pid && exec sleep 60' & wait; fi\"\n\
         outs = [\"out.txt\"]\n",
    );
    let mut child = spawn_run(&p, &[]);
    let grand = pid_when_written(&p.root().join("grand.pid"));
    // The run records the command's process group once it has run 20 ms; kill after that.
    let recorded = || {
        std::fs::read_dir(p.cache().join("v1/checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join(".pipeline-shell-group").exists())
    };
    let start = Instant::now();
    while !recorded() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the run never recorded the command's process group"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    if !alive(grand) {
        panic!("the forked `sleep` died with `pipeline`: this test no longer tests the rerun");
    }
    std::fs::write(p.root().join("again"), "").unwrap();
    let recipe = p.recipe();
    let out = p
        .cmd(&["--no-progress", "run", recipe.to_str().unwrap()])
        .output()
        .unwrap();
    let survived = alive(grand);
    if survived {
        kill_pid(grand);
    }
    assert!(
        out.status.success(),
        "rerun failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !survived,
        "a process the killed run's command forked was still running after the rerun"
    );
}

#[test]
fn a_run_killed_after_moving_a_ref_leaves_no_memo_that_hides_it() {
    // The run memo lets a hit skip reading its ref when the memo records the stage at the
    // key computed. A run that moves a ref removes the memo first: otherwise a run killed
    // after moving `a`'s ref (and before rewriting the memo) would leave a memo that still
    // records the old key, and the next run at that key would not move the ref back, so
    // `explain` would diff against the killed run's parameters.
    let recipe = |p: u32| {
        format!(
            "[experiment]\nname = \"memo\"\n\n\
             [stages.a]\nkind = \"shell\"\ncmd = \"echo p=${{params.p}} > ${{outs}}\"\n\
             outs = [\"a.txt\"]\nparams = {{ p = {p} }}\n\n\
             [stages.b]\nkind = \"shell\"\ndeps = [\"@a\"]\n\
             cmd = \"touch ../b.started && cat ${{deps}} > ${{outs}} && \
             if grep -q p=2 ${{deps}}; then sleep 60; fi\"\nouts = [\"b.txt\"]\n"
        )
    };
    let p = crate::common::Project::new(&recipe(1));
    let path = p.recipe();
    let path = path.to_str().unwrap();
    p.run(&["--no-progress", "run", path]).ok();

    p.write_recipe(&recipe(2));
    let started = p.root().join("b.started");
    std::fs::remove_file(&started).unwrap();
    let mut child = spawn_run(&p, &[]);
    let sid = child.id() as i32;
    let start = Instant::now();
    while !started.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stage b never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill_session(sid);
    child.wait().unwrap();

    // Back to p = 1: every stage a hit, and `a`'s ref back at its p = 1 key.
    p.write_recipe(&recipe(1));
    p.run(&["--no-progress", "run", path]).ok();
    p.write_recipe(&recipe(3));
    let (line, out) = crate::common::explained_param(&p.run(&["explain", path, "a"]), "p");
    assert!(
        line.contains('1') && line.contains('3') && !line.contains('2'),
        "`a` must be explained against its last finished run (p = 1): {line}\n{out}"
    );
}

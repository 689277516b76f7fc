//! SIGKILL anywhere: a run killed with `kill -9` at a random moment (possibly several
//! times) and then resumed must end with outputs byte-identical to an uninterrupted run,
//! leave no lock that blocks the resumed run, and a further run must be all hits.
//!
//! The whole process group is killed, as a preempted job or a power cut would: killing
//! only `pipeline` would leave its `sh -c` children running, writing outs behind the
//! resumed run's back, which is a different (and not a crash) scenario.

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

/// Start `pipeline run` in its own process group and SIGKILL the group after `delay`.
/// Returns whether the run had already finished before the kill.
fn run_and_kill(p: &Project, delay: Duration) -> bool {
    let recipe = p.recipe();
    let mut c = p.cmd(&[
        "--json",
        "--no-progress",
        "run",
        recipe.to_str().unwrap(),
        "-j",
        "2",
    ]);
    c.process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("spawn");
    let pgid = child.id() as i32;
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill(2) on a process group we created; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    child.wait().unwrap();
    false
}

#[test]
fn sigkill_at_random_moments_then_resume_is_bit_identical() {
    // Reference: one uninterrupted run in its own directory and cache.
    let (reference, _) = Project::with_shape(Shape::Layered, STAGES, &opts());
    let t0 = Instant::now();
    reference.run_json(&["-j", "2"]).ok();
    let full = t0.elapsed();
    let expected = reference.outs();
    assert_eq!(expected.len(), STAGES);

    let mut killed_mid_run = 0;
    for seed in 1..=6u64 {
        let (p, _) = Project::with_shape(Shape::Layered, STAGES, &opts());
        let mut delays = Delays(seed);
        // One or two kills per seed, anywhere from process start to a little past the end.
        let kills = 1 + (seed % 2) as usize;
        for _ in 0..kills {
            let delay = full.mul_f64(1.1 * delays.next_fraction());
            if !run_and_kill(&p, delay) {
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
        let recipe = p.recipe();
        let mut c = p.cmd(&["--json", "--no-progress", "run", recipe.to_str().unwrap()]);
        c.process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let pgid = child.id() as i32;
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
        // SAFETY: kill(2) on a process group we created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
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

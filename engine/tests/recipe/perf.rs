//! Loading stays linear: a 10,000-stage recipe loads within the plan budget (0.2 s for the
//! whole plan). Measured as thread CPU time, best of three, because the test machines are
//! shared and wall time there mostly measures the neighbours; tests build at opt-level 1,
//! so a release binary is several times faster still.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

/// CPU time of the calling thread: on a shared, loaded machine wall time mostly measures
/// the other processes, while this measures the loader.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn best_of_3(text: &str) -> Duration {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    let reg = super::kinds::registry();
    (0..3)
        .map(|_| {
            let t = thread_cpu_time();
            let r = engine::recipe::load(f.path(), &[], &reg)
                .unwrap_or_else(|e| panic!("{}", super::render(&e)));
            assert_eq!(r.stages.len(), 10_000);
            thread_cpu_time() - t
        })
        .min()
        .expect("three runs")
}

/// 10,000 plain stages, each reading its predecessor: a huge `[stages]` table.
#[test]
fn chain_of_10000_plain_stages() {
    let mut text = String::from("[stages.s0]\nkind = \"data.synth\"\n");
    for i in 1..10_000 {
        let _ = write!(
            text,
            "[stages.s{i}]\nkind = \"data.rewrite\"\ndata = \"@s{}\"\nx = {i}\n",
            i - 1
        );
    }
    let t = best_of_3(&text);
    report("chain_of_10000_plain_stages", t);
    assert!(
        t < Duration::from_millis(200),
        "10,000-stage chain took {t:?}"
    );
}

/// 100 layers of a 100-item foreach, each element reading the matching element of the
/// previous layer and the last layer gathering everything.
#[test]
fn layered_10000_expanded_stages() {
    let items: Vec<String> = (0..100).map(|i| format!("\"t{i}\"")).collect();
    let mut text = format!(
        "[vars]\nitems = [{}]\n[stages.l0]\nkind = \"data.synth\"\nforeach = \"items\"\n",
        items.join(", ")
    );
    for l in 1..100 {
        let _ = write!(
            text,
            "[stages.l{l}]\nkind = \"data.rewrite\"\nforeach = \"items\"\ndata = \"@l{}/{{item}}\"\ntask = \"{{item}}-{{index}}\"\n",
            l - 1
        );
    }
    let t = best_of_3(&text);
    report("layered_10000_expanded_stages", t);
    assert!(
        t < Duration::from_millis(200),
        "10,000 expanded stages took {t:?}"
    );
}

/// Shown with `--nocapture`, so the numbers can be quoted.
#[allow(clippy::print_stderr)]
fn report(name: &str, t: Duration) {
    eprintln!("{name}: load took {t:?} of CPU time (best of 3)");
}

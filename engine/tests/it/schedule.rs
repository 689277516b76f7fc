//! Scheduling: jobs and resources bound what runs at once.

use engine::events::Event;

use crate::Project;

fn recipe(cpus: u32) -> String {
    format!(
        r#"
[experiment]
name = "t"

[stages.a]
kind = "test.slow"
steps = 3
step_ms = 40
resources = {{ cpus = {cpus} }}

[stages.b]
kind = "test.slow"
steps = 4
step_ms = 40
resources = {{ cpus = {cpus} }}
"#
    )
}

/// The largest number of stages running at the same time, from the event stream.
fn max_parallel(events: &[Event]) -> usize {
    let (mut now, mut max) = (0usize, 0usize);
    for e in events {
        match e {
            Event::StageStarted { .. } => {
                now += 1;
                max = max.max(now);
            }
            Event::StageFinished { .. } | Event::StageFailed { .. } => now -= 1,
            _ => {}
        }
    }
    max
}

#[test]
fn independent_stages_run_in_parallel_when_they_fit() {
    let p = Project::new();
    let r = p.load(&recipe(1), &[]);
    let mut opts = p.options();
    opts.capacity.cpus = 2;
    let out = p.run_with(&r, &opts);
    assert_eq!(out.ran(), ["a", "b"]);
    assert_eq!(max_parallel(&out.events), 2);
}

#[test]
fn cpus_are_never_oversubscribed() {
    let p = Project::new();
    let r = p.load(&recipe(2), &[]);
    let mut opts = p.options();
    opts.capacity.cpus = 2;
    let out = p.run_with(&r, &opts);
    assert_eq!(out.ran(), ["a", "b"]);
    assert_eq!(max_parallel(&out.events), 1);
}

#[test]
fn a_stage_wanting_more_than_the_machine_still_runs() {
    let p = Project::new();
    let r = p.load(&recipe(64), &[]);
    let mut opts = p.options();
    opts.capacity.cpus = 2;
    let out = p.run_with(&r, &opts);
    assert_eq!(out.ran(), ["a", "b"]);
    assert_eq!(max_parallel(&out.events), 1);
}

#[test]
fn jobs_bound_parallelism() {
    let p = Project::new();
    let r = p.load(&recipe(1), &[]);
    let mut opts = p.options();
    opts.capacity.cpus = 8;
    opts.jobs = 1;
    let out = p.run_with(&r, &opts);
    assert_eq!(max_parallel(&out.events), 1);
}

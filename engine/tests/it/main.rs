//! Engine integration tests: recipes with the `testing` kinds run through the real cache.

mod cancel;
mod failure;
mod freshness;
mod plan;
mod schedule;
mod shell;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cache::{Cache, CacheOptions};
use engine::events::{Event, Recorder};
use engine::exec::{self, KeyEnv, RunOptions, RunSummary};
use engine::recipe::{self, Recipe};
use engine::stage::Registry;

/// A temporary project: a recipe directory, a cache and a runs directory.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub cache: Cache,
    pub registry: Registry,
}

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let opts = CacheOptions {
            fsync: false,
            ..CacheOptions::default()
        };
        let cache = Cache::open_with(&dir.path().join(".pipeline"), opts).unwrap();
        let mut registry = engine::builtin_registry();
        engine::testing::register(&mut registry);
        Self {
            dir,
            cache,
            registry,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn load(&self, toml: &str, overrides: &[&str]) -> Recipe {
        self.write("recipe.toml", toml);
        let overrides: Vec<String> = overrides.iter().map(|s| (*s).to_owned()).collect();
        match recipe::load(&self.path("recipe.toml"), &overrides, &self.registry) {
            Ok(r) => r,
            Err(e) => panic!("recipe error: {:?}", miette::Report::new(e)),
        }
    }

    pub fn options(&self) -> RunOptions {
        let mut opts = RunOptions::new(2);
        opts.runs_dir = Some(self.path("runs"));
        opts.env = KeyEnv::default();
        opts
    }

    pub fn run_with(&self, recipe: &Recipe, opts: &RunOptions) -> Outcome {
        let recorder = Arc::new(Recorder::default());
        let summary =
            exec::run(recipe, &self.registry, &self.cache, recorder.as_ref(), opts).unwrap();
        Outcome {
            summary,
            events: recorder.events(),
        }
    }

    pub fn run(&self, toml: &str) -> Outcome {
        let recipe = self.load(toml, &[]);
        self.run_with(&recipe, &self.options())
    }

    /// The content of `runs/<experiment>/<stage>/out/value.txt`.
    pub fn value(&self, stage: &str) -> String {
        std::fs::read_to_string(
            self.path("runs")
                .join("t")
                .join(stage)
                .join("out")
                .join("value.txt"),
        )
        .unwrap()
    }
}

pub struct Outcome {
    pub summary: RunSummary,
    pub events: Vec<Event>,
}

impl Outcome {
    pub fn ran(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.summary.ran.iter().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn cached(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.summary.cached.iter().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// `[RERUN] stage: reason; reason` / `[CASCADE] ...` lines from the started events, in
    /// the order the stages started.
    pub fn rerun_lines(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::StageStarted {
                    stage,
                    reasons,
                    cascade,
                    ..
                } => {
                    let tag = if *cascade { "CASCADE" } else { "RERUN" };
                    let text: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                    Some(format!("[{tag}] {stage}: {}", text.join("; ")))
                }
                _ => None,
            })
            .collect()
    }
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// A chain a → b → c of echo stages.
pub const CHAIN: &str = r#"
[experiment]
name = "t"
seed = 1

[stages.a]
kind = "test.echo"
p = 1

[stages.b]
kind = "test.echo"
p = 2
deps = ["@a"]

[stages.c]
kind = "test.echo"
p = 3
deps = ["@b"]
"#;

//! Helpers shared by the end-to-end tests: a scratch project (recipe dir, cache dir, runs
//! dir in one temporary directory), recipe generators for the chain / fan / layered DAG
//! shapes, and a runner that captures exit code, stderr and the `--json` event stream.
//!
//! Every invocation passes `--cache-dir` and `--runs-dir` explicitly and clears
//! `PIPELINE_CACHE_DIR`, so a developer's environment can never leak into a test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_pipeline");

/// The event types of the `--json` wire format.
pub(crate) const EVENT_TYPES: &[&str] = &[
    "run-started",
    "stage-started",
    "stage-cached",
    "stage-finished",
    "stage-failed",
    "stage-progress",
    "run-finished",
    "error",
];

/// One scratch project: `<tmp>/proj/recipe.toml`, cache `<tmp>/cache`, runs `<tmp>/runs`.
/// Shell stages append their name to `<tmp>/execlog.txt` (outside every declared out), so
/// tests can count how often each stage really executed.
pub(crate) struct Project {
    pub(crate) tmp: tempfile::TempDir,
}

/// What one invocation produced.
#[derive(Debug)]
pub(crate) struct RunResult {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl RunResult {
    /// Parse stdout as JSON Lines; panics (failing the test) on any line that is not an
    /// `{type, data}` envelope with a known type.
    pub(crate) fn events(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse_event(l))
            .collect()
    }

    /// Stage names of every event of type `ty`, in order.
    pub(crate) fn stages_of(&self, ty: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["type"] == ty)
            .map(|e| {
                e["data"]["stage"]
                    .as_str()
                    .unwrap_or_else(|| panic!("`{ty}` event without a string `data.stage`: {e}"))
                    .to_owned()
            })
            .collect()
    }

    /// The set of stage names of events of type `ty`.
    pub(crate) fn set_of(&self, ty: &str) -> BTreeSet<String> {
        self.stages_of(ty).into_iter().collect()
    }

    /// Assert success, printing everything on failure.
    #[track_caller]
    pub(crate) fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected exit 0\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Parse one `--json` line into its envelope, checking the shape.
#[track_caller]
pub(crate) fn parse_event(line: &str) -> Value {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let ty = v["type"]
        .as_str()
        .unwrap_or_else(|| panic!("no string `type`: {line}"));
    assert!(
        EVENT_TYPES.contains(&ty),
        "unknown event type `{ty}`: {line}"
    );
    assert!(v["data"].is_object(), "`data` is not an object: {line}");
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(2),
        "envelope has keys besides type/data: {line}"
    );
    // The engine's own type must read it back, so the wire format cannot drift from it.
    if let Err(e) = serde_json::from_value::<engine::events::Event>(v.clone()) {
        panic!("line does not deserialize into engine::events::Event ({e}): {line}");
    }
    v
}

/// A stage of a generated recipe: its name and the names of the stages it depends on.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) deps: Vec<String>,
}

/// DAG shapes used across the tests and the benchmarks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shape {
    /// s0 -> s1 -> ... -> s(n-1).
    Chain,
    /// One root, n-2 children of the root, one join of all children.
    Fan,
    /// About sqrt(n) layers; each stage depends on (up to) two stages of the layer above.
    Layered,
}

fn stage_name(i: usize) -> String {
    format!("s{i:04}")
}

/// Generate the dependency structure of `n` stages of `shape`.
pub(crate) fn shape(shape: Shape, n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| Node {
            name: stage_name(i),
            deps: Vec::new(),
        })
        .collect();
    match shape {
        Shape::Chain => {
            for (i, node) in nodes.iter_mut().enumerate().skip(1) {
                node.deps.push(stage_name(i - 1));
            }
        }
        Shape::Fan => {
            assert!(n >= 3, "a fan needs a root, a child and a join");
            for node in nodes.iter_mut().take(n - 1).skip(1) {
                node.deps.push(stage_name(0));
            }
            nodes[n - 1].deps = (1..n - 1).map(stage_name).collect();
        }
        Shape::Layered => {
            let width = (n as f64).sqrt().ceil() as usize;
            for (i, node) in nodes.iter_mut().enumerate().skip(width) {
                let layer_start = (i / width - 1) * width;
                let a = layer_start + i % width;
                let b = layer_start + (i + 1) % width;
                node.deps.push(stage_name(a));
                if b != a {
                    node.deps.push(stage_name(b));
                }
            }
        }
    }
    nodes
}

/// Options for rendering a recipe of shell stages.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecipeOpts {
    /// Experiment name.
    pub(crate) name: String,
    /// `sleep` this many seconds inside every command (for the kill tests).
    pub(crate) sleep: Option<f64>,
    /// Per-stage parameter overrides: stage -> (p, q). Default (1, 1).
    pub(crate) params: BTreeMap<String, (i64, i64)>,
}

/// Render a recipe of shell stages. Each stage hashes its deps' contents together with its
/// own name and `p` into `out/<name>.txt`; `q` is hashed into the key but never reaches the
/// output (early cutoff). Roots depend on the file `seed.txt`.
pub(crate) fn render(nodes: &[Node], opts: &RecipeOpts) -> String {
    let mut s = format!(
        "[experiment]\nname = \"{}\"\n",
        if opts.name.is_empty() {
            "e2e"
        } else {
            &opts.name
        }
    );
    for n in nodes {
        let deps: Vec<String> = if n.deps.is_empty() {
            vec!["\"seed.txt\"".to_owned()]
        } else {
            n.deps.iter().map(|d| format!("\"@{d}\"")).collect()
        };
        let (p, q) = opts.params.get(&n.name).copied().unwrap_or((1, 1));
        let sleep = opts
            .sleep
            .map(|t| format!("sleep {t} && "))
            .unwrap_or_default();
        s.push_str(&format!(
            "\n[stages.{name}]\nkind = \"shell\"\ndeps = [{deps}]\n\
             cmd = \"echo {name} >> ../execlog.txt && {sleep}mkdir -p out && \
             (cat ${{deps}}; echo {name} p=${{params.p}}) | md5sum > ${{outs}}\"\n\
             outs = [\"out/{name}.txt\"]\nparams = {{ p = {p}, q = {q} }}\n",
            name = n.name,
            deps = deps.join(", "),
        ));
    }
    s
}

impl Project {
    /// A fresh project holding `recipe` as `proj/recipe.toml` and a `proj/seed.txt`.
    pub(crate) fn new(recipe: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("proj")).unwrap();
        std::fs::write(tmp.path().join("proj/seed.txt"), "seed 42\n").unwrap();
        let p = Self { tmp };
        p.write_recipe(recipe);
        p
    }

    /// A project with a generated recipe.
    pub(crate) fn with_shape(sh: Shape, n: usize, opts: &RecipeOpts) -> (Self, Vec<Node>) {
        let nodes = shape(sh, n);
        (Self::new(&render(&nodes, opts)), nodes)
    }

    pub(crate) fn root(&self) -> &Path {
        self.tmp.path()
    }
    pub(crate) fn proj(&self) -> PathBuf {
        self.tmp.path().join("proj")
    }
    pub(crate) fn recipe(&self) -> PathBuf {
        self.proj().join("recipe.toml")
    }
    pub(crate) fn cache(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    pub(crate) fn write_recipe(&self, recipe: &str) {
        std::fs::write(self.recipe(), recipe).unwrap();
    }

    /// A `pipeline` command with this project's cache and runs dirs, run from `<tmp>`.
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_with_cache(&self.cache(), args)
    }

    pub(crate) fn cmd_with_cache(&self, cache: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.root())
            .env_remove("PIPELINE_CACHE_DIR")
            .env("NO_COLOR", "1")
            .arg("--cache-dir")
            .arg(cache)
            .arg("--runs-dir")
            .arg(self.root().join("runs"))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Run `pipeline <args>` to completion (60 s limit).
    pub(crate) fn run(&self, args: &[&str]) -> RunResult {
        run_cmd(self.cmd(args))
    }

    /// `pipeline --json run recipe.toml <extra>`.
    pub(crate) fn run_json(&self, extra: &[&str]) -> RunResult {
        let recipe = self.recipe();
        let mut args = vec!["--json", "--no-progress", "run", recipe.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Every output file under `proj/out`, by file name.
    pub(crate) fn outs(&self) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        let dir = self.proj().join("out");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd {
                let e = e.unwrap();
                m.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        m
    }

    /// How many times each stage executed its command, from `<tmp>/execlog.txt`.
    pub(crate) fn exec_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        let log = std::fs::read_to_string(self.root().join("execlog.txt")).unwrap_or_default();
        for l in log.lines() {
            *m.entry(l.trim().to_owned()).or_default() += 1;
        }
        m
    }
}

/// The line of `explain`'s text output (stdout and stderr of `r`, which must have succeeded)
/// about parameter `param`, and the whole output for failure messages.
pub(crate) fn explained_param(r: &RunResult, param: &str) -> (String, String) {
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr);
    let line = out
        .lines()
        .find(|l| {
            l.contains(&format!("`{param}`"))
                || l.contains(&format!("{param}:"))
                || l.contains(&format!(" {param} "))
        })
        .unwrap_or_else(|| panic!("no line about param `{param}`:\n{out}"))
        .to_owned();
    (line, out)
}

/// Run a command to completion, killing it after 60 s (a hang, e.g. on a stale lock, is a
/// test failure rather than a stuck test suite).
pub(crate) fn run_cmd(mut c: Command) -> RunResult {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().expect("spawn pipeline");
    let out = wait_timeout(child, Duration::from_secs(60));
    RunResult {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Wait for `child` with a deadline; on timeout kill it and fail the test.
pub(crate) fn wait_timeout(mut child: std::process::Child, limit: Duration) -> Output {
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            std::io::Read::read_to_end(s, &mut b).ok();
        }
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            std::io::Read::read_to_end(s, &mut b).ok();
        }
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            let err = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!("pipeline did not finish within {limit:?}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Whether the tests run as root (chmod-based permission checks are meaningless then).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Replace every occurrence of the project's temporary path by `[TMP]` (for snapshots).
pub(crate) fn redact(p: &Project, s: &str) -> String {
    let tmp = p.root().to_string_lossy().into_owned();
    let mut out = s.replace(&tmp, "[TMP]");
    // macOS-style /private prefixes and canonicalized paths.
    if let Ok(c) = p.root().canonicalize() {
        out = out.replace(&*c.to_string_lossy(), "[TMP]");
    }
    out
}

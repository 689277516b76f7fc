//! Shared by the end-to-end tests that run synth-coin recipes through the binary
//! (`mod support;`): the `pipeline` command in a test directory, and the continual chain
//! those recipes start with.

use std::path::Path;
use std::process::{Command, Output};

/// `pipeline <args>` in `dir`, with the cache and `runs/` inside it whatever the caller's
/// environment says.
pub(crate) fn pipeline(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .current_dir(dir)
        .env_remove("PIPELINE_CACHE_DIR")
        .env_remove("PIPELINE_RUNS_DIR")
        .args(args)
        .args(["--cache-dir", ".cache", "--runs-dir", "runs"])
        .output()
        .unwrap()
}

/// A JSON file a run wrote, naming it when it is missing or malformed.
pub(crate) fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The head of a two-task continual recipe on a tiny synth-coin (ScienceQA, then GQA):
/// data, tokenizer, a pretrained base, a LoRA per task chained on the previous one
/// (`lora_steps` steps each) and an `eval.coin` after each task with `upto = "{item}"`.
/// Tests append their own stages over `@eval/*` and `@task/*`.
pub(crate) fn coin_chain(experiment: &str, seed: u64, lora_steps: u32) -> String {
    format!(
        r#"[experiment]
name = "{experiment}"
seed = {seed}

[vars]
tasks = ["ScienceQA", "GQA"]

[stages.coin]
kind = "data.synth-coin"
per_task = {{ train = 4, test = 3 }}
pretrain = 8

[stages.tokenizer]
kind = "tokenizer.train"
data = "@coin"

[stages.base]
kind = "train.pretrain"
data = "@coin"
tokenizer = "@tokenizer"
steps = 1
batch_size = 2

[stages.task]
kind = "train.lora"
foreach = "tasks"
chain = "base"
base = "@base"
data = "@coin"
task = "{{item}}"
rank = 2
steps = {lora_steps}
batch_size = 2

[stages.eval]
kind = "eval.coin"
foreach = "tasks"
model = "@task/{{item}}"
data = "@coin"
upto = "{{item}}"
max_new_tokens = 4
batch_size = 3
"#
    )
}

//! The resolved-recipe cache: [`load_memo`] keeps the [`Recipe`] a load produced, and hands
//! it back while nothing it was made from has changed.
//!
//! Loading a 1000-stage recipe (TOML parse, expansion, parameter checks, reference
//! resolution) was a third of the instructions of a no-op rerun; decoding the stored result
//! is a tenth of that. A stored recipe is used only if everything the load read is the same:
//!
//! - the **content** (blake3) of every recipe file the load read, the root file and every
//!   file it `extends` or `include`s, each read again through the same path;
//! - the **context**: the path as given and the working directory it is relative to, the
//!   `--set` overrides, the schema of every registered kind (name, version, parameters with
//!   types and defaults), and the identity of the running executable (device, inode, size,
//!   mtime and ctime of `/proc/self/exe`): a rebuilt binary, whose expansion or validation
//!   code may differ, never uses a recipe stored by another one. Without an executable
//!   identity nothing is stored or used.
//!
//! Anything else a load depends on is derived again: each stage's outputs are asked from its
//! kind (and must name what was stored). Only successful loads are stored, so every recipe
//! error is still reported by a full load. One file per (working directory, path) is kept,
//! `<dir>/<blake3 of both>.msgpack`: a new context or content replaces it.
//!
//! On disk: the blake3 of the rest, then the MessagePack encoding of [`Stored`]. A file that
//! is torn, corrupt (wrong checksum), of another format or undecodable is ignored and
//! rewritten; writing is temp + rename, so concurrent loads never see half a file. Every
//! failure to read or write the store only costs the full load.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{External, Input, Recipe, RecipeError, StageNode};
use crate::stage::{Registry, Resources};

/// Version of the stored format; bump on any change of [`Stored`] or of what the context
/// digest covers.
const FORMAT: u32 = 1;

/// Load the recipe at `path` like [`super::load`], through the store in `dir` (created when
/// needed). The result is always what [`super::load`] returns for the same arguments.
///
/// # Errors
/// As [`super::load`].
pub fn load_memo(
    path: &Path,
    overrides: &[String],
    registry: &Registry,
    dir: &Path,
) -> Result<Recipe, RecipeError> {
    let Some(ctx) = context(path, overrides, registry) else {
        return super::load(path, overrides, registry);
    };
    let slot = dir.join(format!("{}.msgpack", ctx.slot.to_hex()));
    if let Some(recipe) = read(&slot, &ctx.digest, registry) {
        return Ok(recipe);
    }
    let (recipe, digests) = super::load_with_digests(path, overrides, registry)?;
    // Only a speed-up is lost when the store cannot be written.
    let _ = write(dir, &slot, &ctx.digest, &recipe, &digests);
    Ok(recipe)
}

/// What a stored recipe must have been made in.
struct Context {
    /// Names the store file: the working directory and the path.
    slot: blake3::Hash,
    /// Everything but the files' contents (module docs).
    digest: [u8; 32],
}

fn context(path: &Path, overrides: &[String], registry: &Registry) -> Option<Context> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let cwd = std::env::current_dir().ok()?;
    let mut slot = blake3::Hasher::new();
    for part in [cwd.as_os_str(), path.as_os_str()] {
        slot.update(&(part.len() as u64).to_le_bytes());
        slot.update(part.as_bytes());
    }
    let slot = slot.finalize();
    let exe = std::fs::metadata("/proc/self/exe").ok()?;
    let mut h = blake3::Hasher::new();
    h.update(b"pipeline resolved recipe\0");
    h.update(&FORMAT.to_le_bytes());
    h.update(slot.as_bytes());
    for n in [exe.dev(), exe.ino(), exe.size()] {
        h.update(&n.to_le_bytes());
    }
    for n in [exe.mtime(), exe.mtime_nsec(), exe.ctime(), exe.ctime_nsec()] {
        h.update(&n.to_le_bytes());
    }
    h.update(&(overrides.len() as u64).to_le_bytes());
    for o in overrides {
        h.update(&(o.len() as u64).to_le_bytes());
        h.update(o.as_bytes());
    }
    for kind in registry.iter() {
        // Debug renderings are unambiguous enough here: they only need to differ when the
        // schema does, and every field is in them.
        let schema = format!("{}\0{}\0{:?}\0", kind.kind(), kind.version(), kind.params());
        h.update(&(schema.len() as u64).to_le_bytes());
        h.update(schema.as_bytes());
    }
    Some(Context {
        slot,
        digest: *h.finalize().as_bytes(),
    })
}

/// The stored form: the context digest, every file read with its content digest, and the
/// recipe without what is derived again on reading.
#[derive(Serialize, Deserialize)]
struct Stored<N> {
    format: u32,
    context: [u8; 32],
    files: Vec<(PathBuf, [u8; 32])>,
    experiment: String,
    seed: u64,
    dir: PathBuf,
    stages: Vec<N>,
}

/// A [`StageNode`] as written: its outputs by name only (their specs come from the kind).
#[derive(Serialize)]
struct NodeOut<'a> {
    name: &'a str,
    base: &'a str,
    kind: &'a str,
    params: &'a serde_json::Value,
    inputs: &'a [Input],
    externals: &'a [External],
    resources: Resources,
    executor: Option<&'a str>,
    after: &'a [usize],
    outputs: Vec<&'a str>,
}

/// A [`StageNode`] as read.
#[derive(Deserialize)]
struct NodeIn {
    name: String,
    base: String,
    kind: String,
    params: serde_json::Value,
    inputs: Vec<Input>,
    externals: Vec<External>,
    resources: Resources,
    executor: Option<String>,
    after: Vec<usize>,
    outputs: Vec<String>,
}

fn write(
    dir: &Path,
    slot: &Path,
    context: &[u8; 32],
    recipe: &Recipe,
    digests: &[[u8; 32]],
) -> std::io::Result<()> {
    let other = |e: rmp_serde::encode::Error| std::io::Error::other(e.to_string());
    let stored = Stored {
        format: FORMAT,
        context: *context,
        files: recipe
            .files
            .iter()
            .cloned()
            .zip(digests.iter().copied())
            .collect(),
        experiment: recipe.experiment.clone(),
        seed: recipe.seed,
        dir: recipe.dir.clone(),
        stages: recipe.stages.iter().map(node_out).collect::<Vec<_>>(),
    };
    let mut bytes = vec![0; 32];
    rmp_serde::encode::write(&mut bytes, &stored).map_err(other)?;
    let sum = blake3::hash(&bytes[32..]);
    bytes[..32].copy_from_slice(sum.as_bytes());
    std::fs::create_dir_all(dir)?;
    // Unique enough across processes and hosts sharing the cache (a pid alone is not, on
    // a cluster); a file mixed from two writers would fail its checksum anyway.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.{}.{nanos}.tmp",
        slot.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, slot).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn node_out(s: &StageNode) -> NodeOut<'_> {
    NodeOut {
        name: &s.name,
        base: &s.base,
        kind: &s.kind,
        params: &s.params,
        inputs: &s.inputs,
        externals: &s.externals,
        resources: s.resources,
        executor: s.executor.as_deref(),
        after: &s.after,
        outputs: s.outputs.iter().map(|o| o.name).collect(),
    }
}

/// The stored recipe of `slot`, if it was made in `context` from files that are unchanged.
fn read(slot: &Path, context: &[u8; 32], registry: &Registry) -> Option<Recipe> {
    let bytes = std::fs::read(slot).ok()?;
    let (sum, body) = bytes.split_at_checked(32)?;
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let stored: Stored<NodeIn> = rmp_serde::from_slice(body).ok()?;
    if stored.format != FORMAT || stored.context != *context {
        return None;
    }
    for (file, digest) in &stored.files {
        let text = std::fs::read(file).ok()?;
        if blake3::hash(&text).as_bytes() != digest {
            return None;
        }
    }
    let mut stages = Vec::with_capacity(stored.stages.len());
    for n in stored.stages {
        let outputs = registry.get(&n.kind)?.outputs(&n.params);
        if !outputs.iter().map(|o| o.name).eq(n.outputs.iter()) {
            return None;
        }
        stages.push(StageNode {
            name: n.name,
            base: n.base,
            kind: n.kind,
            params: n.params,
            inputs: n.inputs,
            externals: n.externals,
            resources: n.resources,
            executor: n.executor,
            after: n.after,
            outputs,
        });
    }
    Some(Recipe {
        experiment: stored.experiment,
        seed: stored.seed,
        dir: stored.dir,
        files: stored.files.into_iter().map(|(f, _)| f).collect(),
        stages,
    })
}

//! Computing a stage's [`KeyManifest`] once its inputs are known, and the parameters a stage
//! sees at run time. Shared by `run`, `exec`, `plan` and `explain`, so all of them agree on
//! every key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cache::{Cache, Digest, Entry, Key};

use crate::key::manifest::{KeyParts, MaskedParams};
use crate::key::{self, ExternalDigest, InputDigest, KEY_SCHEMA, KeyManifest};
use crate::recipe::{External, Input, Recipe, StageNode};
use crate::stage::StageKind;

/// Everything a key depends on besides the recipe: the keyed environment.
#[derive(Debug, Clone, Default)]
pub struct KeyEnv {
    /// Allowlisted environment values ([`crate::env_vars::keyed_env`]).
    pub env: BTreeMap<String, String>,
}

/// Why a manifest could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An external file is missing or unreadable.
    #[error("cannot read `{path}` (param `{param}`): {}", root_cause(source))]
    External {
        /// The parameter naming it.
        param: String,
        /// The path as written in the recipe.
        path: String,
        /// The cache's error.
        #[source]
        source: cache::Error,
    },
    /// An upstream entry lacks the output the recipe refers to.
    #[error("BUG: upstream `{upstream}` has no output `{output}`")]
    MissingOutput {
        /// Upstream stage.
        upstream: String,
        /// Output name.
        output: String,
    },
}

/// The digest of the output an input reads, from the upstream stage's committed entry.
///
/// # Errors
/// The entry lacks the output (the recipe and the entry disagree: a bug).
pub fn input_digest(recipe: &Recipe, input: &Input, entry: &Entry) -> Result<Digest, KeyError> {
    entry
        .output_digest(&input.output)
        .ok_or_else(|| KeyError::MissingOutput {
            upstream: recipe.stages[input.stage].name.clone(),
            output: input.output.clone(),
        })
}

/// Build the manifest of `node`. `digest(n, input)` gives the digest of the upstream output
/// that `input` (`node.inputs[n]`) reads, or `None` when it is not known yet (the upstream
/// stage will run): those inputs
/// get an all-zero digest and their indices (into `node.inputs`) are returned, so the
/// manifest is then only good for explaining, never for a lookup.
///
/// # Errors
/// An unreadable external file, or an upstream entry without the referenced output.
pub fn manifest(
    recipe: &Recipe,
    node: &StageNode,
    kind: &dyn StageKind,
    cache: &Cache,
    env: &KeyEnv,
    digest: impl Fn(usize, &Input) -> Result<Option<Digest>, KeyError>,
) -> Result<(KeyManifest, Vec<usize>), KeyError> {
    let mut params = node.params.clone();
    key::mask_refs(&mut params, node.inputs.iter().map(|i| i.param.as_str()));
    let mut inputs = Vec::with_capacity(node.inputs.len());
    let mut unknown = Vec::new();
    for (n, input) in node.inputs.iter().enumerate() {
        let up = &recipe.stages[input.stage];
        let digest = digest(n, input)?.unwrap_or_else(|| {
            unknown.push(n);
            Digest([0; 32])
        });
        inputs.push(InputDigest {
            param: input.param.clone(),
            position: input.position,
            upstream: up.name.clone(),
            output: input.output.clone(),
            digest,
        });
    }
    inputs.sort_by(|a, b| (a.param.as_str(), a.position).cmp(&(b.param.as_str(), b.position)));
    let mut externals = Vec::with_capacity(node.externals.len());
    for ext in &node.externals {
        let shown = ext.path.to_string_lossy().into_owned();
        let digest = external_digest(recipe, cache, ext, &shown)?;
        externals.push(ExternalDigest {
            param: ext.param.clone(),
            path: shown,
            digest,
        });
    }
    externals.sort_by(|a, b| {
        (a.param.as_str(), a.path.as_str()).cmp(&(b.param.as_str(), b.path.as_str()))
    });
    let manifest = KeyManifest {
        schema: KEY_SCHEMA,
        kind: node.kind.clone(),
        kind_version: kind.version(),
        params,
        inputs,
        externals,
        seed: key::derive_seed(recipe.seed, &node.name),
        env: env.env.clone(),
    };
    Ok((manifest, unknown))
}

/// The key of `node` when every input's digest is known (`digest(n, input)` for
/// `node.inputs[n]`): what [`manifest`]'s [`KeyManifest::key`] gives, computed without
/// building the manifest (no string of it copied), for lookups that only need the key.
///
/// # Errors
/// As [`manifest`].
pub fn key(
    recipe: &Recipe,
    node: &StageNode,
    kind: &dyn StageKind,
    cache: &Cache,
    env: &KeyEnv,
    digest: impl Fn(usize, &Input) -> Result<Digest, KeyError>,
) -> Result<Key, KeyError> {
    let mut digests = Vec::with_capacity(node.inputs.len());
    for (n, input) in node.inputs.iter().enumerate() {
        digests.push(digest(n, input)?);
    }
    let mut inputs: Vec<(&str, usize, &Digest)> = node
        .inputs
        .iter()
        .zip(&digests)
        .map(|(i, d)| (i.param.as_str(), i.position, d))
        .collect();
    inputs.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut refs: Vec<&str> = node.inputs.iter().map(|i| i.param.as_str()).collect();
    refs.sort_unstable();
    refs.dedup();
    let mut shown = Vec::with_capacity(node.externals.len());
    for ext in &node.externals {
        let path = ext.path.to_string_lossy();
        let digest = external_digest(recipe, cache, ext, &path)?;
        shown.push((ext.param.as_str(), path, digest));
    }
    let mut externals: Vec<(&str, &str, &Digest)> =
        shown.iter().map(|(p, s, d)| (*p, s.as_ref(), d)).collect();
    externals.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    Ok(KeyParts {
        schema: KEY_SCHEMA,
        kind: &node.kind,
        kind_version: kind.version(),
        params: &MaskedParams {
            params: &node.params,
            refs: &refs,
        },
        inputs: &inputs,
        externals: &externals,
        seed: key::derive_seed(recipe.seed, &node.name),
        env: &env.env,
    }
    .key())
}

/// The content digest of an external path of `node` (`shown` as written), through the
/// stat cache.
fn external_digest(
    recipe: &Recipe,
    cache: &Cache,
    ext: &External,
    shown: &str,
) -> Result<Digest, KeyError> {
    cache
        .digest_path(&recipe.dir.join(&ext.path))
        .map_err(|source| KeyError::External {
            param: ext.param.clone(),
            path: shown.to_owned(),
            source,
        })
}

/// The innermost cause of an error: for a missing file, the OS's own words
/// (`No such file or directory (os error 2)`) rather than our wrapper's restatement of the path.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Checks that every external file of `node` is readable (hashing it through the stat
/// cache, as [`manifest`] would), without building the manifest: what a plan needs for a
/// stage whose key cannot be known yet.
///
/// # Errors
/// An unreadable external file, as from [`manifest`].
pub fn check_externals(recipe: &Recipe, node: &StageNode, cache: &Cache) -> Result<(), KeyError> {
    for ext in &node.externals {
        external_digest(recipe, cache, ext, &ext.path.to_string_lossy())?;
    }
    Ok(())
}

/// The parameters a stage sees when it runs: references replaced by the directories of the
/// referenced outputs (`dirs[i]` for `node.inputs[i]`), external paths made absolute is
/// *not* done (stages resolve them against `recipe_dir`).
#[must_use]
pub fn run_params(
    node: &StageNode,
    dirs: &[PathBuf],
) -> (serde_json::Value, BTreeMap<String, Vec<PathBuf>>) {
    let mut params = node.params.clone();
    let mut by_param: BTreeMap<String, Vec<(usize, PathBuf)>> = BTreeMap::new();
    for (input, dir) in node.inputs.iter().zip(dirs) {
        by_param
            .entry(input.param.clone())
            .or_default()
            .push((input.position, dir.clone()));
    }
    let mut inputs = BTreeMap::new();
    for (param, mut list) in by_param {
        list.sort_by_key(|(pos, _)| *pos);
        let paths: Vec<PathBuf> = list.into_iter().map(|(_, d)| d).collect();
        if let Some(v) = params.get_mut(&param) {
            // The k-th reference string of the parameter is the input at position k.
            let mut next = paths.iter();
            replace_refs(v, &mut next);
        }
        inputs.insert(param, paths);
    }
    (params, inputs)
}

fn replace_refs<'a>(v: &mut serde_json::Value, next: &mut impl Iterator<Item = &'a PathBuf>) {
    match v {
        serde_json::Value::String(s) if s.starts_with('@') => {
            if let Some(p) = next.next() {
                *s = p.to_string_lossy().into_owned();
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| replace_refs(i, next)),
        _ => {}
    }
}

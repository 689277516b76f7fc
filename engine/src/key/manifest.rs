//! [`KeyManifest`]: everything that went into a stage key, kept so that a later miss can say
//! exactly what changed.
//!
//! The manifest is stored in the cache entry (as the entry's metadata) and the stage key is a
//! pure function of it: [`KeyManifest::key`]. Some fields are *recorded but not keyed* (the
//! upstream stage names, external paths as written): they exist only to make `explain`
//! readable, and renaming a stage must not invalidate its dependents.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use cache::Digest;
use serde::{Deserialize, Serialize};

use super::KEY_SCHEMA;
use super::hasher::{StableHash, StableHasher};

/// The blake3 derive-key context for stage keys; versioned together with [`KEY_SCHEMA`].
const KEY_DOMAIN: &str = "pipeline 2026-11 stage key";
/// The blake3 derive-key context for per-stage seeds.
const SEED_DOMAIN: &str = "pipeline 2026-11 stage seed";
/// What a reference string becomes inside the keyed parameters: the input's *content* is
/// keyed through [`KeyManifest::inputs`], never the upstream stage's name.
pub const REF_PLACEHOLDER: &str = "@input";

/// One upstream output feeding this stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigest {
    /// The parameter holding the reference.
    pub param: String,
    /// Position within the parameter (lists and gathers hold several references).
    pub position: usize,
    /// The upstream stage's name (recorded, not keyed).
    pub upstream: String,
    /// The upstream output's name (recorded, not keyed).
    pub output: String,
    /// Digest of the upstream output tree (keyed).
    pub digest: Digest,
}

/// One external file or directory this stage reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalDigest {
    /// The parameter naming it.
    pub param: String,
    /// The path as the user wrote it, relative to the recipe directory (recorded; the
    /// parameter value that spells it is keyed through `params`).
    pub path: String,
    /// Content digest (keyed).
    pub digest: Digest,
}

/// Everything that went into one stage key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyManifest {
    /// The key schema version ([`KEY_SCHEMA`]).
    pub schema: u32,
    /// The stage kind (`train.lora`).
    pub kind: String,
    /// The kind's version.
    pub kind_version: u32,
    /// Canonical parameters, defaults filled, references replaced by [`REF_PLACEHOLDER`].
    pub params: serde_json::Value,
    /// Upstream outputs, sorted by `(param, position)`.
    pub inputs: Vec<InputDigest>,
    /// External files, sorted by `(param, path)`.
    pub externals: Vec<ExternalDigest>,
    /// The derived seed.
    pub seed: u64,
    /// Allowlisted environment values (see [`crate::env_vars::KEYED`]); absent variables are
    /// left out.
    pub env: BTreeMap<String, String>,
}

impl KeyManifest {
    /// The stage key: blake3 over the canonical encoding of the keyed fields.
    #[must_use]
    pub fn key(&self) -> Digest {
        let inputs: Vec<(&str, usize, &Digest)> = self
            .inputs
            .iter()
            .map(|i| (i.param.as_str(), i.position, &i.digest))
            .collect();
        let externals: Vec<(&str, &str, &Digest)> = self
            .externals
            .iter()
            .map(|e| (e.param.as_str(), e.path.as_str(), &e.digest))
            .collect();
        KeyParts {
            schema: self.schema,
            kind: &self.kind,
            kind_version: self.kind_version,
            params: &self.params,
            inputs: &inputs,
            externals: &externals,
            seed: self.seed,
            env: &self.env,
        }
        .key()
    }

    /// Whether this manifest was written by the current key schema.
    #[must_use]
    pub fn current_schema(&self) -> bool {
        self.schema == KEY_SCHEMA
    }
}

/// The keyed fields of a [`KeyManifest`], borrowed: what a key is computed from, whether
/// from a manifest ([`KeyManifest::key`]) or straight from a stage and its inputs' digests
/// (a hit needs only its key, and building the manifest, every string of it copied, was
/// a tenth of a no-op rerun). Both go through [`KeyParts::key`], so they cannot disagree on
/// the encoding.
pub(crate) struct KeyParts<'a, P: StableHash + ?Sized> {
    /// [`KEY_SCHEMA`] for a new key; a manifest's own for its key.
    pub schema: u32,
    pub kind: &'a str,
    pub kind_version: u32,
    /// Canonical parameters with references masked ([`mask_refs`]).
    pub params: &'a P,
    /// `(param, position, digest)`, sorted by `(param, position)`.
    pub inputs: &'a [(&'a str, usize, &'a Digest)],
    /// `(param, path, digest)`, sorted by `(param, path)`.
    pub externals: &'a [(&'a str, &'a str, &'a Digest)],
    pub seed: u64,
    pub env: &'a BTreeMap<String, String>,
}

impl<P: StableHash + ?Sized> KeyParts<'_, P> {
    /// The stage key: blake3 over the canonical encoding of the keyed fields.
    pub(crate) fn key(&self) -> Digest {
        static KEY: OnceLock<blake3::Hasher> = OnceLock::new();
        let mut h = StableHasher::with(
            KEY.get_or_init(|| blake3::Hasher::new_derive_key(KEY_DOMAIN))
                .clone(),
        );
        h.write(&self.schema);
        h.write(self.kind);
        h.write(&self.kind_version);
        h.write(self.params);
        h.write_len(self.inputs.len());
        for (param, position, digest) in self.inputs {
            h.write(*param);
            h.write(position);
            h.write(digest.as_bytes());
        }
        h.write_len(self.externals.len());
        for (param, path, digest) in self.externals {
            h.write(*param);
            h.write(*path);
            h.write(digest.as_bytes());
        }
        h.write(&self.seed);
        h.write(self.env);
        Digest(h.into_digest())
    }
}

/// Parameters hashed as [`mask_refs`] would leave them, without copying them: the values of
/// the top-level parameters named in `refs` have every reference string (`"@..."`, alone
/// or in a list) hashed as [`REF_PLACEHOLDER`].
pub(crate) struct MaskedParams<'a> {
    pub params: &'a serde_json::Value,
    /// Sorted, deduplicated parameter names.
    pub refs: &'a [&'a str],
}

impl StableHash for MaskedParams<'_> {
    fn stable_hash(&self, h: &mut StableHasher) {
        let serde_json::Value::Object(map) = self.params else {
            return self.params.stable_hash(h);
        };
        super::hasher::write_map(h, map, |h, k, v| {
            if self.refs.binary_search(&k).is_ok() {
                h.write(&Masked(v));
            } else {
                h.write(v);
            }
        });
    }
}

/// A parameter value hashed with its reference strings masked (as [`mask_value`] does).
struct Masked<'a>(&'a serde_json::Value);

impl StableHash for Masked<'_> {
    fn stable_hash(&self, h: &mut StableHasher) {
        match self.0 {
            serde_json::Value::String(s) if s.starts_with('@') => h.write_str(REF_PLACEHOLDER),
            serde_json::Value::Array(items) => {
                let items: Vec<Masked<'_>> = items.iter().map(Masked).collect();
                h.write(items.as_slice());
            }
            v => h.write(v),
        }
    }
}

impl StableHash for Digest {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_bytes(self.as_bytes());
    }
}

/// The seed of a stage: blake3 `derive_key` over the experiment seed and the stage name, so
/// that sibling stages draw independent streams and a rerun draws the same one.
#[must_use]
pub fn derive_seed(experiment_seed: u64, stage: &str) -> u64 {
    // The context key is derived once (see `StableHasher::with`).
    static SEED: OnceLock<blake3::Hasher> = OnceLock::new();
    let mut h = SEED
        .get_or_init(|| blake3::Hasher::new_derive_key(SEED_DOMAIN))
        .clone();
    h.update(&experiment_seed.to_le_bytes());
    h.update(&(stage.len() as u64).to_le_bytes());
    h.update(stage.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Replace every reference string (`"@stage..."`) in the parameters named by `ref_params` by
/// [`REF_PLACEHOLDER`], in place.
///
/// `ref_params` usually names one parameter per *input*, so a list parameter holding 10,000
/// references is named 10,000 times: each name is masked once (masking the list per name
/// made a fan-in stage quadratic).
pub fn mask_refs<'a>(
    params: &mut serde_json::Value,
    ref_params: impl IntoIterator<Item = &'a str>,
) {
    let serde_json::Value::Object(map) = params else {
        return;
    };
    let names: std::collections::BTreeSet<&str> = ref_params.into_iter().collect();
    for name in names {
        if let Some(v) = map.get_mut(name) {
            mask_value(v);
        }
    }
}

fn mask_value(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.starts_with('@') => *s = REF_PLACEHOLDER.to_owned(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_value),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> KeyManifest {
        KeyManifest {
            schema: KEY_SCHEMA,
            kind: "test.echo".into(),
            kind_version: 1,
            params: json!({"p": 1, "data": REF_PLACEHOLDER}),
            inputs: vec![InputDigest {
                param: "data".into(),
                position: 0,
                upstream: "a".into(),
                output: "out".into(),
                digest: Digest([7; 32]),
            }],
            externals: vec![],
            seed: 42,
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn recorded_fields_are_not_keyed() {
        let a = manifest();
        let mut b = manifest();
        b.inputs[0].upstream = "renamed".into();
        b.inputs[0].output = "other".into();
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn keyed_fields_change_the_key() {
        let base = manifest().key();
        let mut m = manifest();
        m.inputs[0].digest = Digest([8; 32]);
        assert_ne!(m.key(), base);
        let mut m = manifest();
        m.kind_version = 2;
        assert_ne!(m.key(), base);
        let mut m = manifest();
        m.seed = 43;
        assert_ne!(m.key(), base);
        let mut m = manifest();
        m.env.insert("PIPELINE_DEVICE".into(), "cuda".into());
        assert_ne!(m.key(), base);
        let mut m = manifest();
        m.params["p"] = json!(2);
        assert_ne!(m.key(), base);
    }

    /// Keys are on-disk names: if this fails, bump `KEY_SCHEMA` and update the value.
    #[test]
    fn key_is_stable() {
        assert_eq!(
            manifest().key().to_hex(),
            "4ff190eaf1dec9fb8f6e7d2c849dead473ef08342738e299c3278cff729984ef"
        );
        assert_eq!(derive_seed(1234, "task/GQA"), 16_609_509_672_058_602_596);
    }

    #[test]
    fn seeds_differ_per_stage_and_experiment_seed() {
        assert_eq!(derive_seed(1, "a"), derive_seed(1, "a"));
        assert_ne!(derive_seed(1, "a"), derive_seed(1, "b"));
        assert_ne!(derive_seed(1, "a"), derive_seed(2, "a"));
    }

    #[test]
    fn refs_are_masked_only_in_ref_params() {
        let mut p = json!({"data": "@a", "deps": ["@b", "seed.txt"], "note": "@literal"});
        mask_refs(&mut p, ["data", "deps"]);
        assert_eq!(
            p,
            json!({"data": REF_PLACEHOLDER, "deps": [REF_PLACEHOLDER, "seed.txt"], "note": "@literal"})
        );
    }
}

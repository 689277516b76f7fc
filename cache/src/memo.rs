//! Run memos: `memo/<experiment>.bin`, the manifests of an experiment's stages as its last
//! run left them, read once per run instead of one manifest and one ref per stage.
//!
//! A no-op rerun used to cost every hit an `open`, `read` and `close` of its manifest and a
//! `readlink` of its ref: four of its eight syscalls, and on a VM whose syscalls cost
//! several microseconds most of the run. A memo holds, per stage, the encoded manifest of
//! the entry the stage's ref named when the run that wrote it ended. The engine uses a
//! memo record only when its key is the key it just computed, so the memo can never make
//! a stage reuse another key's outputs; what it vouches for is that
//! - `entries/<key>/` was committed with this manifest (commits of a key are idempotent,
//!   and the outputs are still verified file by file when they are materialized, so an
//!   object that went missing or changed size is caught as before), and
//! - the stage's ref is that key: every run that moves a ref first removes the memo
//!   ([`Cache::drop_memo`]), so a run killed after moving one leaves no memo behind.
//!
//! `gc` removes all memos (it may remove the entries they name); a missing, truncated or
//! foreign memo is empty; a save replaces the file atomically. Two runs of one experiment
//! at once that move one stage's ref to different keys can leave a memo naming the older
//! key (each writes what was true when it looked); a later run at that key then leaves the
//! ref where the other run put it. Refs only feed explanations, so this costs at worst an
//! `explain` that diffs against the other run.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::digest::Key;
use crate::error::Result;
use crate::fsutil;
use crate::manifest::{MANIFEST_FORMAT, Manifest};
use crate::store::Cache;

/// The file: this magic (its last two bytes the layout version; another is ignored),
/// then per stage a little-endian `u32` length and the stage name, the 32 bytes of its key,
/// a `u32` length and the encoded manifest.
const MAGIC: &[u8; 8] = b"PLMEMO01";

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The records of a memo file; `None` for anything but a whole, well-formed one.
fn parse(bytes: &[u8]) -> Option<HashMap<String, (Key, Vec<u8>)>> {
    let mut rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let mut stages = HashMap::new();
    while !rest.is_empty() {
        let (name, tail) = field(rest)?;
        let (key, tail) = tail.split_first_chunk::<32>()?;
        let (manifest, tail) = field(tail)?;
        let name = String::from_utf8(name.to_vec()).ok()?;
        stages.insert(name, (crate::Digest(*key), manifest.to_vec()));
        rest = tail;
    }
    Some(stages)
}

/// A length-prefixed field and what follows it.
fn field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, tail) = bytes.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    Some((tail.get(..len)?, tail.get(len..)?))
}

/// The loaded memo of one experiment (empty when there is none).
#[derive(Debug, Default)]
pub struct Memo {
    stages: HashMap<String, (Key, Vec<u8>)>,
}

impl Memo {
    /// The entry `stage` had when the memo was written, if its key is `key`.
    #[must_use]
    pub fn entry(&self, cache: &Cache, stage: &str, key: &Key) -> Option<crate::Entry> {
        let (recorded, bytes) = self.stages.get(stage)?;
        if recorded != key {
            return None;
        }
        let manifest = Manifest::decode(bytes, false).ok()?;
        (manifest.key == *key && manifest.format == MANIFEST_FORMAT && manifest.stage == stage)
            .then(|| crate::Entry {
                key: *key,
                dir: cache.entry_dir(key),
                manifest,
            })
    }

    /// The key recorded for `stage`: its ref when the memo was written.
    #[must_use]
    pub fn key(&self, stage: &str) -> Option<Key> {
        self.stages.get(stage).map(|(k, _)| *k)
    }

    /// Stages recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Whether no stage is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }
}

impl Cache {
    fn memo_path(&self, experiment: &str) -> Result<PathBuf> {
        let p = fsutil::safe_join(&self.v.join("memo"), "experiment", experiment, false)?;
        let mut s = p.into_os_string();
        s.push(".bin");
        Ok(PathBuf::from(s))
    }

    /// The memo of `experiment`; empty when there is none or it is unreadable.
    #[must_use]
    pub fn load_memo(&self, experiment: &str) -> Memo {
        let Ok(path) = self.memo_path(experiment) else {
            return Memo::default();
        };
        let Ok(bytes) = std::fs::read(path) else {
            return Memo::default();
        };
        Memo {
            stages: parse(&bytes).unwrap_or_default(),
        }
    }

    /// Replaces the memo of `experiment` with `old`'s records updated by `entries`
    /// (`(stage, entry)`, each stage's ref being that entry's key now).
    ///
    /// # Errors
    /// Unsafe names; the cache is not writable.
    pub fn save_memo<'e>(
        &self,
        experiment: &str,
        old: &Memo,
        entries: impl IntoIterator<Item = (&'e str, &'e crate::Entry)>,
    ) -> Result<()> {
        let path = self.memo_path(experiment)?;
        let mut stages: HashMap<&str, (Key, std::borrow::Cow<'_, [u8]>)> = old
            .stages
            .iter()
            .map(|(name, (k, b))| (name.as_str(), (*k, b.as_slice().into())))
            .collect();
        for (stage, entry) in entries {
            // An entry that cannot be encoded is left out: its stage reads its manifest.
            match entry.manifest.encode() {
                Ok(bytes) => stages.insert(stage, (entry.key, bytes.into())),
                Err(_) => stages.remove(stage),
            };
        }
        let mut list: Vec<_> = stages.into_iter().collect();
        list.sort_by(|a, b| a.0.cmp(b.0));
        let mut bytes = MAGIC.to_vec();
        for (name, (key, manifest)) in list {
            put(&mut bytes, name.as_bytes());
            bytes.extend_from_slice(key.as_bytes());
            put(&mut bytes, &manifest);
        }
        fsutil::mkdirs(&self.root, &self.v.join("memo"))?;
        fsutil::write_atomic(&self.root, &path, &bytes, false)
    }

    /// Removes the memo of `experiment` (before a ref moves; see the module docs). Best
    /// effort: where it cannot be removed, the ref cannot be moved either.
    pub fn drop_memo(&self, experiment: &str) {
        if let Ok(path) = self.memo_path(experiment) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Removes every memo (`gc`).
    pub(crate) fn drop_all_memos(&self) -> Result<()> {
        let dir = self.v.join("memo");
        if dir.exists() {
            fsutil::remove_tree(&self.root, &dir)?;
        }
        Ok(())
    }
}

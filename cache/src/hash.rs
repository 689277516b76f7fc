//! Content hashing: files, and canonical Merkle digests of directory trees.
//!
//! A tree digest is blake3 over a versioned, length-prefixed encoding of the tree's listing,
//! sorted by relative path (bytewise, `/`-separated):
//!
//! ```text
//! "pipeline-tree-v1\0"
//! per entry:  kind byte ('f' file, 'x' executable file, 'd' directory, 'l' symlink)
//!             u64-le path length, path bytes
//!             file: u64-le size, 32-byte blake3 of the content
//!             symlink: u64-le target length, target bytes (the link text, never followed)
//! ```
//!
//! Only content, names, kinds and the executable bit go in: mtimes, owners, other permission
//! bits and the absolute location of the tree stay out, so the digest is the same wherever
//! and whenever the tree was written. This is the *output* digest that downstream keys use,
//! which gives early cutoff: a stage that reruns and writes the same bytes leaves its
//! dependents cached.
//!
//! Files are hashed in parallel with rayon; big files additionally use blake3's
//! memory-mapped multi-threaded hasher. Small files are read into memory because mapping
//! costs more than reading below a few hundred KiB.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stat_cache::StatCache;

/// Files at least this big are hashed with `mmap` + rayon.
const MMAP_THRESHOLD: u64 = 256 * 1024;

/// Domain-separation prefix of the tree encoding; bump the version if the encoding changes.
const TREE_DOMAIN: &[u8] = b"pipeline-tree-v1\0";

/// What a tree entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeKind {
    /// A regular file.
    File,
    /// A directory (listed so that empty directories survive a round trip).
    Dir,
    /// A symbolic link, stored as its link text.
    Symlink,
}

/// One entry of a tree listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeEntry {
    /// Path relative to the tree root, `/`-separated, UTF-8.
    pub path: String,
    /// File, directory or symlink.
    pub kind: NodeKind,
    /// File size in bytes (0 for directories and symlinks).
    pub size: u64,
    /// `0o755` for executable files and directories, `0o644` for other files, `0o777` for
    /// symlinks. Only the executable bit is part of the digest.
    pub mode: u32,
    /// Content digest (files only).
    pub digest: Option<Digest>,
    /// Link text (symlinks only).
    pub target: Option<String>,
}

impl TreeEntry {
    /// Whether this is an executable file.
    #[must_use]
    pub fn is_exec(&self) -> bool {
        self.kind == NodeKind::File && self.mode & 0o111 != 0
    }
}

/// A hashed directory tree: its digest, total file size and sorted listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tree {
    /// The canonical Merkle digest (see the module docs).
    pub digest: Digest,
    /// Sum of file sizes.
    pub size: u64,
    /// Entries sorted by path.
    pub entries: Vec<TreeEntry>,
}

impl Tree {
    /// Builds a tree from entries (sorted here) and computes its digest.
    #[must_use]
    pub fn from_entries(mut entries: Vec<TreeEntry>) -> Tree {
        entries.sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let mut h = blake3::Hasher::new();
        h.update(TREE_DOMAIN);
        let mut size = 0;
        for e in &entries {
            let tag = match e.kind {
                NodeKind::File if e.is_exec() => b'x',
                NodeKind::File => b'f',
                NodeKind::Dir => b'd',
                NodeKind::Symlink => b'l',
            };
            h.update(&[tag]);
            h.update(&(e.path.len() as u64).to_le_bytes());
            h.update(e.path.as_bytes());
            match e.kind {
                NodeKind::File => {
                    size += e.size;
                    h.update(&e.size.to_le_bytes());
                    h.update(e.digest.as_ref().map_or(&[0u8; 32], |d| d.as_bytes()));
                }
                NodeKind::Symlink => {
                    let t = e.target.as_deref().unwrap_or("");
                    h.update(&(t.len() as u64).to_le_bytes());
                    h.update(t.as_bytes());
                }
                NodeKind::Dir => {}
            }
        }
        Tree {
            digest: h.finalize().into(),
            size,
            entries,
        }
    }

    /// The file entries.
    pub fn files(&self) -> impl Iterator<Item = &TreeEntry> {
        self.entries.iter().filter(|e| e.kind == NodeKind::File)
    }
}

fn read_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        what: "cannot read",
        path: path.to_path_buf(),
        source,
    }
}

/// Hashes one file's content; returns its digest and size.
///
/// # Errors
/// The file cannot be opened or read.
pub fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let mut f = File::open(path).map_err(|e| read_err(path, e))?;
    let size = f.metadata().map_err(|e| read_err(path, e))?.len();
    let mut h = blake3::Hasher::new();
    if size >= MMAP_THRESHOLD {
        h.update_mmap_rayon(path).map_err(|e| read_err(path, e))?;
    } else {
        // `size` bounds the first read; `read_to_end` still copes with a file that grew.
        let mut buf = Vec::with_capacity(size as usize + 1);
        f.read_to_end(&mut buf).map_err(|e| read_err(path, e))?;
        h.update(&buf);
    }
    Ok((h.finalize().into(), h.count()))
}

/// Hashes a directory tree, recording symlinks as link text (see the module docs).
///
/// # Errors
/// Unreadable files, non-UTF-8 names, special files (sockets, devices, fifos).
pub fn hash_tree(dir: &Path) -> Result<Tree> {
    hash_tree_with(dir, None, false)
}

/// A file found while walking a tree, before its content is hashed.
pub(crate) struct Walked {
    /// Absolute path on disk.
    pub abs: PathBuf,
    /// The entry (digest not yet filled in for files).
    pub entry: TreeEntry,
    /// The walk's own stat of a file, reused for the stat-cache lookup (saves a syscall
    /// per file on the fully-cached path).
    pub meta: Option<fs::Metadata>,
}

/// Walks `dir` and lists its entries without hashing content. With `follow`, symlinks are
/// followed (and appear as what they point to); otherwise they are recorded as link text.
pub(crate) fn walk(dir: &Path, follow: bool) -> Result<Vec<Walked>> {
    let mut out = Vec::new();
    for item in walkdir::WalkDir::new(dir).min_depth(1).follow_links(follow) {
        let item = item.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_path_buf();
            let source = e.into_io_error().unwrap_or_else(|| {
                std::io::Error::other("symlink loop (a link points to one of its parents)")
            });
            read_err(&path, source)
        })?;
        let abs = item.path().to_path_buf();
        let rel = item
            .path()
            .strip_prefix(dir)
            .expect("walkdir yields paths under its root");
        let Some(rel_str) = rel.to_str() else {
            return Err(Error::NonUtf8Path { path: abs });
        };
        let path = rel_str.to_owned();
        let ft = item.file_type();
        let mut file_meta = None;
        let entry = if ft.is_dir() {
            TreeEntry {
                path,
                kind: NodeKind::Dir,
                size: 0,
                mode: 0o755,
                digest: None,
                target: None,
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&abs).map_err(|e| read_err(&abs, e))?;
            let Some(target) = target.to_str().map(str::to_owned) else {
                return Err(Error::NonUtf8Path { path: abs });
            };
            TreeEntry {
                path,
                kind: NodeKind::Symlink,
                size: 0,
                mode: 0o777,
                digest: None,
                target: Some(target),
            }
        } else if ft.is_file() {
            let meta = item.metadata().map_err(|e| read_err(&abs, e.into()))?;
            file_meta = Some(meta.clone());
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            TreeEntry {
                path,
                kind: NodeKind::File,
                size: meta.len(),
                mode,
                digest: None,
                target: None,
            }
        } else {
            return Err(Error::UnsupportedFileType { path: abs });
        };
        out.push(Walked {
            abs,
            entry,
            meta: file_meta,
        });
    }
    Ok(out)
}

/// Hashes a tree, optionally through a stat cache, optionally following symlinks.
pub(crate) fn hash_tree_with(dir: &Path, stat: Option<&StatCache>, follow: bool) -> Result<Tree> {
    let walked = hash_walked(walk(dir, follow)?, stat)?;
    Ok(Tree::from_entries(
        walked.into_iter().map(|w| w.entry).collect(),
    ))
}

/// Fills in the digests (and exact sizes) of the files of a walk, in parallel when there
/// are enough of them (see [`crate::fsutil::PAR_MIN`]).
pub(crate) fn hash_walked(
    mut walked: Vec<Walked>,
    stat: Option<&StatCache>,
) -> Result<Vec<Walked>> {
    let hash_one = |w: &mut Walked| {
        let cached = match (stat, &w.meta) {
            (Some(s), Some(m)) => s.get(m).map(|d| (d, m.len())),
            _ => None,
        };
        let (digest, size) = match (cached, stat) {
            (Some(hit), _) => hit,
            (None, Some(s)) => s.file_digest(&w.abs)?,
            (None, None) => hash_file(&w.abs)?,
        };
        w.entry.digest = Some(digest);
        w.entry.size = size;
        Ok::<(), Error>(())
    };
    let is_file = |w: &&mut Walked| w.entry.kind == NodeKind::File;
    if walked.len() < crate::fsutil::PAR_MIN {
        walked.iter_mut().filter(is_file).try_for_each(hash_one)?;
    } else {
        walked
            .par_iter_mut()
            .filter(is_file)
            .try_for_each(hash_one)?;
    }
    Ok(walked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(p: &Path, s: &[u8]) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn file_digest_matches_blake3_small_and_big() {
        let t = tempfile::tempdir().unwrap();
        let small = t.path().join("s");
        fs::write(&small, b"abc").unwrap();
        assert_eq!(hash_file(&small).unwrap(), (Digest::of_bytes(b"abc"), 3));
        let big_bytes: Vec<u8> = (0..MMAP_THRESHOLD as usize * 3)
            .map(|i| (i % 251) as u8)
            .collect();
        let big = t.path().join("b");
        fs::write(&big, &big_bytes).unwrap();
        assert_eq!(
            hash_file(&big).unwrap(),
            (Digest::of_bytes(&big_bytes), big_bytes.len() as u64)
        );
    }

    #[test]
    fn tree_digest_sees_names_content_kind_exec_and_links() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        write(&d.join("a/x.txt"), b"1");
        write(&d.join("b"), b"2");
        fs::create_dir_all(d.join("empty")).unwrap();
        symlink("a/x.txt", d.join("ln")).unwrap();
        let base = hash_tree(&d).unwrap();
        assert_eq!(
            base.entries
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>(),
            ["a", "a/x.txt", "b", "empty", "ln"]
        );
        assert_eq!(base.size, 2);

        let mut digests = vec![base.digest];
        let mut check = |what: &str| {
            let now = hash_tree(&d).unwrap().digest;
            assert!(!digests.contains(&now), "{what} did not change the digest");
            digests.push(now);
        };
        fs::write(d.join("b"), b"3").unwrap();
        check("content");
        fs::set_permissions(d.join("b"), fs::Permissions::from_mode(0o755)).unwrap();
        check("exec bit");
        fs::remove_file(d.join("ln")).unwrap();
        symlink("b", d.join("ln")).unwrap();
        check("link text");
        fs::remove_dir(d.join("empty")).unwrap();
        check("empty dir");
        fs::rename(d.join("a/x.txt"), d.join("a/y.txt")).unwrap();
        check("rename");
    }

    #[test]
    fn special_files_are_rejected() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        fs::create_dir(&d).unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = hash_tree(&d).unwrap_err();
        assert!(matches!(err, Error::UnsupportedFileType { .. }), "{err}");
    }
}

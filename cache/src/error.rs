//! The cache's error type. Every variant names the path it is about.
//!
//! I/O errors are classified once, in [`Error::io`], so that the two environment failures a
//! user can fix get a message that says what to do: a read-only cache directory
//! (`EACCES`/`EPERM`/`EROFS`) and a full disk (`ENOSPC`/`EDQUOT`). Read failures of cache
//! content (a corrupt object, an unreadable manifest) are not errors of `lookup`: they are
//! misses with a reason, and the bad entry is removed.

use std::io;
use std::path::{Path, PathBuf};

use crate::digest::Key;

/// Result alias for the cache.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the content-addressed store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cache directory (or the runs directory, or a file in them) cannot be written.
    #[error("{dir_kind} `{}` is not writable (while writing `{}`)", root.display(), path.display())]
    NotWritable {
        /// "cache directory" or "runs directory".
        dir_kind: &'static str,
        /// The cache root.
        root: PathBuf,
        /// The path that failed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The disk (or quota) is full.
    #[error("no space left on device while writing `{}`", path.display())]
    NoSpace {
        /// The path that failed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Any other I/O error on a named path.
    #[error("{what} `{}`", path.display())]
    Io {
        /// What was being done ("cannot read", "cannot create directory", ...).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An object or tree file does not have the content its manifest records. The entry that
    /// referenced it has been removed; the caller treats this as a miss and reruns.
    #[error("corrupt cache file `{}`: {detail}", path.display())]
    Corrupt {
        /// The bad file.
        path: PathBuf,
        /// What was wrong (size or digest mismatch, missing).
        detail: String,
    },
    /// A manifest could not be encoded or decoded.
    #[error("cannot parse `{}`", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The encoding's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A name used as a path component (experiment, stage, output) is not safe.
    #[error("invalid {what} name `{name}`: {why}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The name.
        name: String,
        /// Why it is rejected.
        why: &'static str,
    },
    /// A file name in an output is not UTF-8 (manifests store paths as strings).
    #[error("file name `{}` is not valid UTF-8; outputs must use UTF-8 names", path.display())]
    NonUtf8Path {
        /// The path.
        path: PathBuf,
    },
    /// An output contains something that is neither a file, a directory nor a symlink.
    #[error("`{}` is not a regular file, directory or symlink", path.display())]
    UnsupportedFileType {
        /// The path.
        path: PathBuf,
    },
    /// The entry has no output of that name.
    #[error("entry {key} has no output `{output}`")]
    NoSuchOutput {
        /// The key.
        key: Key,
        /// The requested output.
        output: String,
    },
    /// Waiting for another process's lease on a key took longer than allowed.
    #[error("timed out after {waited_s:.0}s waiting for the lock on {key} held by {holder}")]
    LockTimeout {
        /// The key.
        key: Key,
        /// Who holds it (pid@host).
        holder: String,
        /// How long we waited.
        waited_s: f64,
    },
    /// A user-facing link location is occupied by something that is not our symlink.
    #[error("`{}` exists and is not a symlink; refusing to replace it", path.display())]
    LinkOccupied {
        /// The path.
        path: PathBuf,
    },
}

impl Error {
    /// Classifies an I/O error on `path` under cache `root`.
    pub fn io(root: &Path, path: &Path, what: &'static str, source: io::Error) -> Self {
        Error::io_in("cache directory", root, path, what, source)
    }

    /// Classifies an I/O error on `path` under `root`, a directory of kind `dir_kind`
    /// ("cache directory", "runs directory") that the not-writable message names.
    pub fn io_in(
        dir_kind: &'static str,
        root: &Path,
        path: &Path,
        what: &'static str,
        source: io::Error,
    ) -> Self {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => Error::NotWritable {
                dir_kind,
                root: root.to_path_buf(),
                path,
                source,
            },
            Some(libc::ENOSPC | libc::EDQUOT) => Error::NoSpace { path, source },
            _ => Error::Io { what, path, source },
        }
    }

    /// Whether this error means "the cached data is bad; rerun" rather than an environment
    /// failure.
    #[must_use]
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::Parse { .. })
    }

    /// The file, when this error is a [`Error::Corrupt`] for a file that is not there at all
    /// (rather than one with the wrong size or content).
    #[must_use]
    pub fn missing_file(&self) -> Option<&std::path::Path> {
        match self {
            Error::Corrupt { path, detail } if detail == MISSING => Some(path),
            _ => None,
        }
    }
}

/// The `detail` of an [`Error::Corrupt`] for a missing file.
pub(crate) const MISSING: &str = "missing";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_read_only_and_full_disk() {
        let root = Path::new("/c");
        let p = Path::new("/c/v1/x");
        let e = Error::io(
            root,
            p,
            "cannot write",
            io::Error::from_raw_os_error(libc::EROFS),
        );
        assert_eq!(
            e.to_string(),
            "cache directory `/c` is not writable (while writing `/c/v1/x`)"
        );
        let e = Error::io(
            root,
            p,
            "cannot write",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(
            e.to_string(),
            "no space left on device while writing `/c/v1/x`"
        );
        let e = Error::io(
            root,
            p,
            "cannot read",
            io::Error::from_raw_os_error(libc::EIO),
        );
        assert_eq!(e.to_string(), "cannot read `/c/v1/x`");
    }
}

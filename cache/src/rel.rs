//! Reads and `stat`s relative to the store's `v1/` directory, through a directory file
//! descriptor opened once per [`crate::Cache`].
//!
//! A cache hit reads a manifest, a ref, and `stat`s every object and tree file it names,
//! all of them under `<root>/v1/`. With absolute paths, every one of those calls makes the
//! kernel walk every component of the root again (`/home/me/project/.pipeline/v1/...`):
//! on the development VM the path walk was the largest kernel cost of a no-op rerun, and a
//! `stat` relative to an open directory took about 1 µs less than the same `stat` by its
//! absolute path. So the hot paths pass paths relative to `v1/` (`objects/ab/ab12...`) to
//! `openat`/`statx` on this descriptor ([`rustix`]'s safe wrappers); everything else keeps
//! using absolute paths. Paths in errors and messages stay absolute.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, CWD, Mode, OFlags, StatxFlags};

use crate::stat_cache::Stamp;

/// An open `O_PATH` descriptor of a directory.
#[derive(Debug)]
pub(crate) struct DirFd(OwnedFd);

impl DirFd {
    /// Opens `dir` (which must exist).
    pub(crate) fn open(dir: &Path) -> io::Result<DirFd> {
        let fd = rustix::fs::openat(
            CWD,
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(DirFd(fd))
    }

    /// The whole content of the small file `rel`: `openat`, `read` until end of file,
    /// `close` (no `fstat` to size the buffer, as `fs::read` would do).
    pub(crate) fn read(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let fd = rustix::fs::openat(
            &self.0,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut buf = Vec::with_capacity(4096);
        // Through `Take`, `read_to_end` has no size hint to ask the file for.
        File::from(fd).take(u64::MAX).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// The identity and timestamps of `rel` (symlinks followed), as the stat cache keys
    /// them: the same values `std::fs::metadata` gives ([`Stamp::of`]).
    pub(crate) fn stamp(&self, rel: &Path) -> io::Result<Stamp> {
        let st = rustix::fs::statx(&self.0, rel, AtFlags::empty(), StatxFlags::BASIC_STATS)?;
        Ok(Stamp::from_parts(
            rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            st.stx_ino,
            st.stx_size,
            (st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec),
            (st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec),
        ))
    }

    /// The size of `rel` (symlinks followed).
    pub(crate) fn size(&self, rel: &Path) -> io::Result<u64> {
        let st = rustix::fs::statx(&self.0, rel, AtFlags::empty(), StatxFlags::SIZE)?;
        Ok(st.stx_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn relative_calls_see_what_absolute_ones_see() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("a/b")).unwrap();
        fs::write(t.path().join("a/b/f.txt"), b"hello").unwrap();
        let d = DirFd::open(t.path()).unwrap();
        assert_eq!(d.read(Path::new("a/b/f.txt")).unwrap(), b"hello");
        assert_eq!(d.size(Path::new("a/b/f.txt")).unwrap(), 5);
        let meta = fs::metadata(t.path().join("a/b/f.txt")).unwrap();
        assert_eq!(d.stamp(Path::new("a/b/f.txt")).unwrap(), Stamp::of(&meta));
        let missing = d.read(Path::new("a/b/none")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            d.size(Path::new("a/none")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // A file larger than the first buffer is read whole.
        let big = vec![7u8; 10_000];
        fs::write(t.path().join("big"), &big).unwrap();
        assert_eq!(d.read(Path::new("big")).unwrap(), big);
    }
}

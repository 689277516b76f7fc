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

/// An open `O_PATH` descriptor of a directory, for calls relative to it. Public for the
/// engine's own hot paths outside the store (the recipe directory a hit restores outputs
/// into, the `runs/` links it checks); see [`crate::Cache::file_digest_at`].
#[derive(Debug)]
pub struct DirFd(OwnedFd);

impl DirFd {
    /// Opens `dir` (which must exist).
    ///
    /// # Errors
    /// The directory cannot be opened.
    pub fn open(dir: &Path) -> io::Result<DirFd> {
        let fd = rustix::fs::openat(
            CWD,
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(DirFd(fd))
    }

    /// Reads the small file `rel` and hands its content to `parse`, in one `read` when the
    /// file fits the buffer: a regular file's `read` returns less than asked for only at its
    /// end, so when that content parses, the second `read` that would confirm the end of the
    /// file is skipped (one syscall less per manifest and per ref of every cache hit). When
    /// it does not parse, or fills the buffer, the rest is read and the whole content comes
    /// back for the caller to parse (and report) as usual.
    pub(crate) fn read_parsed<T>(
        &self,
        rel: &Path,
        parse: impl FnOnce(&[u8]) -> Option<T>,
    ) -> io::Result<Parsed<T>> {
        thread_local! {
            // Zeroed once per thread, then reused: no per-read allocation or clearing.
            static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
        }
        let fd = rustix::fs::openat(
            &self.0,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut file = File::from(fd);
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let n = loop {
                match file.read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            if n < buf.len()
                && let Some(t) = parse(&buf[..n])
            {
                return Ok(Parsed::Value(t));
            }
            let mut all = buf[..n].to_vec();
            file.take(u64::MAX).read_to_end(&mut all)?;
            Ok(Parsed::Bytes(all))
        })
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

    /// The text of the symbolic link `rel`.
    ///
    /// # Errors
    /// As `readlinkat(2)`.
    pub fn read_link(&self, rel: &Path) -> io::Result<Vec<u8>> {
        Ok(rustix::fs::readlinkat(&self.0, rel, Vec::new())?.into_bytes())
    }

    /// The size of `rel` (symlinks followed).
    pub(crate) fn size(&self, rel: &Path) -> io::Result<u64> {
        let st = rustix::fs::statx(&self.0, rel, AtFlags::empty(), StatxFlags::SIZE)?;
        Ok(st.stx_size)
    }
}

/// What [`DirFd::read_parsed`] got.
pub(crate) enum Parsed<T> {
    /// The file's content, parsed.
    Value(T),
    /// The file's whole content, which the parser did not take in one piece.
    Bytes(Vec<u8>),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;

    /// The whole content of `rel`, through `read_parsed` with a parser that takes nothing.
    pub(crate) fn read_all(d: &DirFd, rel: &str) -> io::Result<Vec<u8>> {
        match d.read_parsed(Path::new(rel), |_| None::<()>)? {
            Parsed::Bytes(b) => Ok(b),
            Parsed::Value(()) => unreachable!("the parser takes nothing"),
        }
    }

    #[test]
    fn relative_calls_see_what_absolute_ones_see() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("a/b")).unwrap();
        fs::write(t.path().join("a/b/f.txt"), b"hello").unwrap();
        let d = DirFd::open(t.path()).unwrap();
        assert_eq!(read_all(&d, "a/b/f.txt").unwrap(), b"hello");
        assert_eq!(d.size(Path::new("a/b/f.txt")).unwrap(), 5);
        let meta = fs::metadata(t.path().join("a/b/f.txt")).unwrap();
        assert_eq!(d.stamp(Path::new("a/b/f.txt")).unwrap(), Stamp::of(&meta));
        std::os::unix::fs::symlink("some text", t.path().join("a/link")).unwrap();
        assert_eq!(d.read_link(Path::new("a/link")).unwrap(), b"some text");
        assert!(d.read_link(Path::new("a/b/f.txt")).is_err());
        let missing = read_all(&d, "a/b/none").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            d.size(Path::new("a/none")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // A file larger than the first buffer is read whole.
        let big = vec![7u8; 10_000];
        fs::write(t.path().join("big"), &big).unwrap();
        assert_eq!(read_all(&d, "big").unwrap(), big);
    }

    #[test]
    fn read_parsed_parses_in_one_piece_or_returns_everything() {
        let t = tempfile::tempdir().unwrap();
        let d = DirFd::open(t.path()).unwrap();
        fs::write(t.path().join("small"), b"{\"a\":1}").unwrap();
        let got = d
            .read_parsed(Path::new("small"), |b| Some(b.len()))
            .unwrap();
        assert!(matches!(got, Parsed::Value(7)));
        // A parser that refuses gets the whole content back, also past the buffer.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(t.path().join("big"), &big).unwrap();
        let mut called = false;
        let got = d
            .read_parsed(Path::new("big"), |_| -> Option<()> {
                called = true;
                None
            })
            .unwrap();
        assert!(
            !called,
            "a buffer-filling read is never parsed as the whole file"
        );
        assert!(matches!(got, Parsed::Bytes(b) if b == big));
        let got = d.read_parsed(Path::new("small"), |_| None::<()>).unwrap();
        assert!(matches!(got, Parsed::Bytes(b) if b == b"{\"a\":1}"));
        assert_eq!(
            d.read_parsed(Path::new("none"), |_| Some(()))
                .err()
                .map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
    }
}

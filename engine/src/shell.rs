//! The `shell` kind: a user command with declared inputs, outputs and parameters, hashed and
//! cached like any other stage.
//!
//! ```toml
//! [stages.s0001]
//! kind = "shell"
//! deps = ["@s0000", "seed.txt"]   # stage refs or files (content hashed)
//! cmd = "cat ${deps} | md5sum > ${outs} && echo p=${params.p} >> ${outs}"
//! outs = ["out/s0001.txt"]        # relative to the recipe directory
//! params = { p = 1, q = 1 }       # hashed; ${params.NAME} substituted in cmd
//! ```
//!
//! The command runs under `sh -c` in the recipe directory, in its own process group (so a
//! cancel kills the whole pipeline of processes, and the terminal's Ctrl-C reaches only
//! `pipeline`, which then decides). Its stdout and stderr go to the stage log.
//!
//! Substitution: `${deps}` and `${outs}` expand to space-separated, shell-quoted paths;
//! `${params.NAME}` to the value (strings quoted when they are not plain words). Any other
//! `${...}` is left to the shell. A `@stage` dep expands to that stage's `outs` (paths
//! relative to the recipe directory, where they are restored) when it is a `shell` stage, and
//! to its artifact directory in the cache otherwise.
//!
//! Declared outs are deleted before the command runs, so a stale file can never pass for a
//! fresh one; a declared out missing afterwards fails the stage. After success the outs are
//! copied into the stage output (at their recipe-relative paths, plus [`OUTS_FILE`] listing
//! them) and, on every hit or run, restored into the recipe directory when missing or
//! different (tmp + rename, so a reader never sees half a file).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::env_vars;
use crate::stage::{
    ArtifactType, FileDigests, OutputSpec, ParamSpec, ParamType, StageCtx, StageError, StageKind,
};

/// Written into a shell stage's output: the list of its outs, so that a downstream shell
/// stage expands `@stage` to these recipe-relative paths.
pub const OUTS_FILE: &str = ".shell-outs.json";

/// The `shell` kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shell;

#[derive(Deserialize)]
struct Params {
    #[serde(default)]
    deps: Vec<String>,
    cmd: String,
    #[serde(default)]
    outs: Vec<String>,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
}

impl StageKind for Shell {
    fn kind(&self) -> &'static str {
        "shell"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "Run a shell command (`sh -c`, in the recipe directory) with declared deps, outs and \
         params; `${deps}`, `${outs}` and `${params.NAME}` are substituted in `cmd`."
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "cmd",
                ty: ParamType::Str,
                default: None,
                doc: "the command, run with `sh -c` in the recipe directory",
            },
            ParamSpec {
                name: "deps",
                ty: ParamType::List(Box::new(ParamType::RefOrPath)),
                default: Some(json!([])),
                doc: "stage references (`@stage`) or files whose content is hashed",
            },
            ParamSpec {
                name: "outs",
                ty: ParamType::List(Box::new(ParamType::Str)),
                default: Some(json!([])),
                doc: "files or directories the command creates, relative to the recipe directory",
            },
            ParamSpec {
                name: "params",
                ty: ParamType::Table,
                default: Some(json!({})),
                doc: "values substituted as `${params.NAME}`; all of them are hashed",
            },
        ]
    }

    fn outputs(&self, _params: &serde_json::Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "out",
            ty: ArtifactType::Files,
            doc: "the declared outs, at their recipe-relative paths",
        }]
    }

    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        let outs = checked_outs(&p.outs)?;
        let deps = expand_deps(ctx, &p.deps)?;
        let cmd = substitute(&p.cmd, &deps, &p.outs, &p.params)?;
        for out in &outs {
            remove_any(&ctx.recipe_dir.join(out))?;
            if let Some(parent) = ctx.recipe_dir.join(out).parent() {
                std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
            }
        }
        run_command(ctx, &cmd)?;
        let out_dir = ctx.output("out");
        for (out, spelled) in outs.iter().zip(&p.outs) {
            let src = ctx.recipe_dir.join(out);
            if !src.exists() {
                return Err(StageError::Input(format!(
                    "the command did not create declared out `{spelled}`"
                )));
            }
            copy_tree(&src, &out_dir.join(out))?;
        }
        let list = serde_json::to_vec(&p.outs).map_err(|e| StageError::Other(e.to_string()))?;
        let list_path = out_dir.join(OUTS_FILE);
        std::fs::write(&list_path, list).map_err(|e| StageError::io(list_path, e))
    }

    fn restore(
        &self,
        recipe_dir: &Path,
        params: &serde_json::Value,
        outputs: &BTreeMap<String, PathBuf>,
    ) -> Result<(), StageError> {
        restore_outs(recipe_dir, params, outputs, None)
    }

    fn restore_with(
        &self,
        recipe_dir: &Path,
        params: &serde_json::Value,
        outputs: &BTreeMap<String, PathBuf>,
        digests: &dyn FileDigests,
    ) -> Result<(), StageError> {
        restore_outs(recipe_dir, params, outputs, Some(digests))
    }
}

/// Puts the declared outs of a cached entry back into the recipe directory (every out is
/// checked before any is written). Reads the `outs` list in place: this runs for every hit
/// of a rerun.
fn restore_outs(
    recipe_dir: &Path,
    params: &serde_json::Value,
    outputs: &BTreeMap<String, PathBuf>,
    digests: Option<&dyn FileDigests>,
) -> Result<(), StageError> {
    let Some(dir) = outputs.get("out") else {
        return Ok(());
    };
    let Some(list) = params.get("outs").and_then(serde_json::Value::as_array) else {
        return Ok(());
    };
    let outs = list
        .iter()
        .filter_map(serde_json::Value::as_str)
        .map(checked_out)
        .collect::<Result<Vec<_>, _>>()?;
    for out in outs {
        restore_tree(&dir.join(&out), &recipe_dir.join(&out), digests)?;
    }
    Ok(())
}

/// Outs must stay inside the recipe directory.
fn checked_outs(outs: &[String]) -> Result<Vec<PathBuf>, StageError> {
    outs.iter().map(|o| checked_out(o)).collect()
}

fn checked_out(o: &str) -> Result<PathBuf, StageError> {
    let p = PathBuf::from(o);
    let inside = !o.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside {
        Ok(p)
    } else {
        Err(StageError::Input(format!(
            "out `{o}` must be a relative path inside the recipe directory"
        )))
    }
}

/// The words `${deps}` expands to.
fn expand_deps(ctx: &StageCtx<'_>, deps: &[String]) -> Result<Vec<String>, StageError> {
    let refs: &[PathBuf] = ctx.inputs.get("deps").map_or(&[], Vec::as_slice);
    let mut words = Vec::new();
    for dep in deps {
        let path = Path::new(dep);
        if !refs.iter().any(|r| r == path) {
            words.push(dep.clone());
            continue;
        }
        let outs_file = path.join(OUTS_FILE);
        match std::fs::read(&outs_file) {
            Ok(bytes) => {
                let outs: Vec<String> = serde_json::from_slice(&bytes)
                    .map_err(|e| StageError::Other(format!("{}: {e}", outs_file.display())))?;
                words.extend(outs);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => words.push(dep.clone()),
            Err(e) => return Err(StageError::io(outs_file, e)),
        }
    }
    Ok(words)
}

/// Quote a word for `sh` unless it is plainly safe.
#[must_use]
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-=:,+@%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn join_quoted(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Expand `${deps}`, `${outs}` and `${params.NAME}`; leave other `${...}` to the shell.
fn substitute(
    cmd: &str,
    deps: &[String],
    outs: &[String],
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, StageError> {
    let mut out = String::with_capacity(cmd.len());
    let mut rest = cmd;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        match name {
            "deps" => out.push_str(&join_quoted(deps)),
            "outs" => out.push_str(&join_quoted(outs)),
            _ => {
                match name.strip_prefix("params.") {
                    Some(p) => {
                        let v = params.get(p).ok_or_else(|| {
                        let known: Vec<&str> = params.keys().map(String::as_str).collect();
                        StageError::Input(format!(
                            "`cmd` uses `${{params.{p}}}` but `params` has no `{p}` (it has: {})",
                            if known.is_empty() { "nothing".to_owned() } else { known.join(", ") }
                        ))
                    })?;
                        match v {
                            serde_json::Value::String(s) => out.push_str(&shell_quote(s)),
                            other => {
                                let _ = write!(out, "{other}");
                            }
                        }
                    }
                    None => {
                        out.push_str("${");
                        out.push_str(name);
                        out.push('}');
                    }
                }
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Run `sh -c cmd`, copying its merged output into the stage log and killing its process
/// group if the run is cancelled.
fn run_command(ctx: &mut StageCtx<'_>, cmd: &str) -> Result<(), StageError> {
    use std::os::unix::process::CommandExt;
    let left = crate::orphans::reap(ctx.checkpoint_dir);
    if left > 0 {
        let _ = writeln!(
            ctx.log,
            "pipeline: killed {left} process(es) that an interrupted earlier attempt at this \
             stage left running"
        );
    }
    let (mut reader, writer) =
        std::io::pipe().map_err(|e| StageError::Other(format!("cannot create a pipe: {e}")))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| StageError::Other(format!("cannot clone a pipe: {e}")))?;
    let mut command = Command::new(sh_path());
    command
        .arg("-c")
        .arg(cmd)
        // A recipe given as a bare file name has an empty directory: that is the cwd.
        .current_dir(if ctx.recipe_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            ctx.recipe_dir
        })
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .env(env_vars::PIPELINE_SEED, ctx.seed.to_string())
        .env(env_vars::PIPELINE_STAGE, ctx.name)
        .env(env_vars::PIPELINE_CHECKPOINT_DIR, ctx.checkpoint_dir)
        // Its own process group: Ctrl-C in the terminal reaches only us, and a cancel can
        // kill every process the command started, which also closes the pipe.
        .process_group(0);
    die_with_parent(&mut command);
    let child = command
        .spawn()
        .map_err(|e| StageError::Other(format!("cannot start `sh`: {e}")))?;
    // The command holds the only write ends now; drop ours so EOF comes when it exits.
    drop(command);
    let pid = child.id();
    let status = pump_and_wait(ctx, child, pid, &mut reader)?;
    if ctx.cancel.load(Ordering::Relaxed) {
        return Err(StageError::Cancelled);
    }
    if !status.success() {
        let how = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => "a signal".to_owned(),
        };
        return Err(StageError::Other(format!("command failed with {how}")));
    }
    Ok(())
}

/// Have the kernel SIGKILL the command's `sh` when the thread that started it dies, so a
/// `pipeline` killed with SIGKILL (which runs no cleanup) does not leave the command running
/// and writing its outs behind a later run's back. The spawning thread waits for the child
/// in `pump_and_wait`, so it lives exactly as long as the command should. `sh -c` execs a
/// single simple command in place, which then inherits the setting; processes a compound
/// command forks are reparented and survive, and [`crate::orphans`] kills them when the
/// stage is next attempted.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: prctl(2), getppid(2) and raise(3) are async-signal-safe and touch no memory
    // of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nothing will signal us.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// `/bin/sh` (POSIX puts it there), or `sh` looked up in `PATH` on a system without it.
/// The absolute path saves an `execve` attempt per `PATH` entry for every stage.
fn sh_path() -> &'static Path {
    static SH: std::sync::OnceLock<&'static Path> = std::sync::OnceLock::new();
    SH.get_or_init(|| {
        let bin = Path::new("/bin/sh");
        if bin.is_file() { bin } else { Path::new("sh") }
    })
}

/// How often a waiting stage looks at the cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(10);

/// How long a command runs before its process group is recorded for [`crate::orphans`].
/// Trivial commands finish sooner and skip the file's creation and removal, which cost
/// more than the command itself on a disk with slow metadata operations.
const RECORD_AFTER: Duration = Duration::from_millis(20);

/// Copies the command's output into the stage log until EOF and reaps the child, killing
/// its process group as soon as the run is cancelled. Returns the exit status.
///
/// One thread, one `poll` over the output pipe and a pidfd of the child (Linux 5.3+): the
/// output and the exit are both seen the moment they happen, which matters because this
/// wait is on the critical path of every shell stage (a 10 ms sleep-and-`try_wait` watcher
/// thread used to cost each trivial stage several ms). The poll timeout only bounds how
/// late a cancel is noticed. Without a pidfd the exit is found by `try_wait` after each
/// wake-up, with a short growing sleep (0.1 ms up to [`CANCEL_CHECK`]) once the pipe is
/// closed. The log is complete only at EOF, so a command whose background process keeps
/// the pipe open is waited for, as a shell would.
fn pump_and_wait(
    ctx: &mut StageCtx<'_>,
    mut child: std::process::Child,
    pid: u32,
    reader: &mut std::io::PipeReader,
) -> Result<std::process::ExitStatus, StageError> {
    use std::os::fd::AsRawFd;
    let wait_err = |e: std::io::Error| StageError::Other(format!("cannot wait for `sh`: {e}"));
    let pidfd = PidFd::open(pid);
    let mut status = None;
    let mut pipe_open = true;
    let mut check_child = true;
    let mut nap = Duration::from_micros(100);
    let mut buf = [0u8; 8192];
    let started = std::time::Instant::now();
    let mut recorded = false;
    loop {
        if !recorded && status.is_none() && started.elapsed() >= RECORD_AFTER {
            crate::orphans::record(ctx.checkpoint_dir, pid);
            recorded = true;
        }
        if ctx.cancel.load(Ordering::Relaxed) {
            kill_group(pid);
            return match status {
                Some(s) => Ok(s),
                None => child.wait().map_err(wait_err),
            };
        }
        if status.is_none() && check_child {
            status = child.try_wait().map_err(wait_err)?;
        }
        if let (Some(s), false) = (status, pipe_open) {
            return Ok(s);
        }
        let mut fds: [libc::pollfd; 2] = [libc::pollfd {
            fd: -1, // ignored by poll
            events: libc::POLLIN,
            revents: 0,
        }; 2];
        if pipe_open {
            fds[0].fd = reader.as_raw_fd();
        }
        if let (None, Some(p)) = (status, &pidfd) {
            fds[1].fd = p.0.as_raw_fd();
        }
        let timeout = if !pipe_open && pidfd.is_none() {
            let t = nap;
            nap = (nap * 2).min(CANCEL_CHECK);
            t
        } else {
            CANCEL_CHECK
        };
        let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(10);
        // SAFETY: two valid pollfds (a negative fd is skipped by poll), count 2. An error
        // (EINTR) just means another turn of the loop.
        unsafe {
            libc::poll(fds.as_mut_ptr(), 2, ms);
        }
        check_child = pidfd.is_none() || fds[1].revents != 0;
        if pipe_open && fds[0].revents != 0 {
            // Readable or hung up: this read does not block.
            let failed = match reader.read(&mut buf) {
                Ok(0) => {
                    pipe_open = false;
                    None
                }
                Ok(n) => (ctx.log.write_all(&buf[..n]).err())
                    .map(|e| format!("cannot write the stage log: {e}")),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                Err(e) => Some(format!("cannot read the command's output: {e}")),
            };
            if let Some(msg) = failed {
                // Not left running (or unreaped) behind a stage that already failed.
                kill_group(pid);
                let _ = child.wait();
                return Err(StageError::Other(msg));
            }
        }
    }
}

/// A pidfd: a file descriptor that becomes readable when its process exits.
struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    fn open(pid: u32) -> Option<Self> {
        use std::os::fd::FromRawFd;
        let pid = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; no memory
        // is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: the kernel just gave us this fd; nothing else owns it.
        Some(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals the process group we created; it has
        // no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

fn remove_any(path: &Path) -> Result<(), StageError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(|e| StageError::io(path, e)),
        Ok(_) => std::fs::remove_file(path).map_err(|e| StageError::io(path, e)),
        Err(_) => Ok(()),
    }
}

/// Copy a file or a directory tree.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), StageError> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
    }
    let meta = std::fs::metadata(src).map_err(|e| StageError::io(src, e))?;
    if meta.is_dir() {
        std::fs::create_dir_all(dst).map_err(|e| StageError::io(dst, e))?;
        for entry in std::fs::read_dir(src).map_err(|e| StageError::io(src, e))? {
            let entry = entry.map_err(|e| StageError::io(src, e))?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(src, dst)
            .map(|_| ())
            .map_err(|e| StageError::io(src, e))
    }
}

/// Make `dst` equal to `src` (a file or tree), touching only files that differ, each
/// replaced atomically. With `digests`, files are compared by their digests through the
/// stat cache (a `stat` each when unchanged) instead of by reading both.
fn restore_tree(
    src: &Path,
    dst: &Path,
    digests: Option<&dyn FileDigests>,
) -> Result<(), StageError> {
    // The common case first: `src` is a file (it has a digest) and `dst` already holds it.
    // A directory has no digest and goes the long way below.
    if let Some(d) = digests
        && let Some(want) = d.file_digest(src)
        && d.file_digest(dst) == Some(want)
    {
        return Ok(());
    }
    let meta = std::fs::metadata(src).map_err(|e| StageError::io(src, e))?;
    if meta.is_dir() {
        if std::fs::symlink_metadata(dst).is_ok_and(|m| !m.is_dir()) {
            remove_any(dst)?;
        }
        std::fs::create_dir_all(dst).map_err(|e| StageError::io(dst, e))?;
        for entry in std::fs::read_dir(src).map_err(|e| StageError::io(src, e))? {
            let entry = entry.map_err(|e| StageError::io(src, e))?;
            restore_tree(&entry.path(), &dst.join(entry.file_name()), digests)?;
        }
        return Ok(());
    }
    // With `digests`, the check above found them different (or `src` unreadable).
    if digests.is_none() && same_file_content(src, dst) {
        return Ok(());
    }
    if std::fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir()) {
        remove_any(dst)?;
    }
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
    }
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}.pipeline-tmp-{}", std::process::id()));
    std::fs::copy(src, &tmp).map_err(|e| StageError::io(&tmp, e))?;
    std::fs::rename(&tmp, dst).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        StageError::io(dst, e)
    })
}

fn same_file_content(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if !mb.is_file() || ma.len() != mb.len() {
        return false;
    }
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_quotes_and_leaves_shell_vars() {
        let mut params = serde_json::Map::new();
        params.insert("p".into(), json!(1));
        params.insert("name".into(), json!("a b"));
        let cmd = substitute(
            "cat ${deps} > ${outs}; echo ${params.p} ${params.name} $HOME ${HOME}",
            &["x.txt".into(), "my file".into()],
            &["out/a.txt".into()],
            &params,
        )
        .unwrap();
        assert_eq!(
            cmd,
            "cat x.txt 'my file' > out/a.txt; echo 1 'a b' $HOME ${HOME}"
        );
    }

    #[test]
    fn unknown_param_is_a_clear_error() {
        let err = substitute("echo ${params.zz}", &[], &[], &serde_json::Map::new()).unwrap_err();
        assert!(err.to_string().contains("`${params.zz}`"), "{err}");
    }

    #[test]
    fn outs_must_stay_inside() {
        assert!(checked_outs(&["a/b.txt".into()]).is_ok());
        assert!(checked_outs(&["../x".into()]).is_err());
        assert!(checked_outs(&["/etc/passwd".into()]).is_err());
        assert!(checked_outs(&[String::new()]).is_err());
    }

    #[test]
    fn quoting_round_trips_through_sh() {
        let word = "it's a \"test\" $x";
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(word)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), word);
    }
}

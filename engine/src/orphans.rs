//! Processes a killed run's `shell` command left behind.
//!
//! A stage command runs in a process group of its own, and its `sh` dies with `pipeline`
//! (`PR_SET_PDEATHSIG`). What `sh` had forked (the parts of `a && b`, `cmd &`, a pipeline)
//! does not: the death signal is not inherited across `fork`, and nothing is left to kill
//! the group when `pipeline` itself was killed with SIGKILL. Such processes may go on writing
//! the stage's outputs while a later run reruns the stage.
//!
//! So the group of a command that runs longer than a few tens of milliseconds (trivial
//! commands are spared the file) is written down in the stage's checkpoint directory (keyed
//! by the stage key, survives an interruption and is removed when the stage commits), and the
//! next attempt at the same stage kills what is still in that group before it starts its own
//! command. The record is `boot_id pgid sid leader_start`: a group is only killed on the same
//! boot of the same machine (a Slurm job on another node leaves a record this node ignores),
//! and only if a member is in the recorded session and started no earlier than the recorded
//! leader. The kernel does not reuse a number as a process id while a group of that number
//! exists, so a live group with the recorded id, session and start times is the one the
//! earlier attempt made.
//!
//! Linux only (it reads `/proc`); elsewhere both functions do nothing.

use std::path::Path;

/// File name of the record in the checkpoint directory.
const RECORD: &str = ".pipeline-shell-group";

/// Write down process group `pgid`, led by the just-spawned command `leader`. Best effort:
/// without the record a crash can leave stray processes, which is no reason to fail a stage.
pub(crate) fn record(checkpoint_dir: &Path, leader: u32) {
    #[cfg(target_os = "linux")]
    {
        let (Some(boot), Some(stat)) = (boot_id(), Stat::read(leader)) else {
            return;
        };
        let line = format!("{boot} {} {} {}\n", stat.pgrp, stat.session, stat.start);
        let _ = std::fs::write(checkpoint_dir.join(RECORD), line);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (checkpoint_dir, leader);
}

/// Kill what is left of the process group an earlier attempt recorded in `checkpoint_dir`
/// and wait (up to a second) until it is gone. Returns how many processes were found.
pub(crate) fn reap(checkpoint_dir: &Path) -> usize {
    #[cfg(target_os = "linux")]
    {
        let path = checkpoint_dir.join(RECORD);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return 0;
        };
        let _ = std::fs::remove_file(&path);
        let mut fields = text.split_whitespace();
        let (Some(boot), Some(pgid), Some(sid), Some(start)) = (
            fields.next(),
            fields.next().and_then(|s| s.parse::<i32>().ok()),
            fields.next().and_then(|s| s.parse::<i32>().ok()),
            fields.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            return 0;
        };
        if boot_id().as_deref() != Some(boot) || pgid <= 1 {
            return 0;
        }
        let ours = |s: &Stat| s.pgrp == pgid && s.session == sid && s.start >= start;
        let found = members(&ours);
        if found == 0 {
            return 0;
        }
        for _ in 0..100 {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is
            // involved. The group was checked to be the recorded one just above.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            if members(&ours) == 0 {
                break;
            }
        }
        found
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = checkpoint_dir;
        0
    }
}

/// The running (not zombie) processes for which `pred` holds.
#[cfg(target_os = "linux")]
fn members(pred: &dyn Fn(&Stat) -> bool) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(Stat::read)
        .filter(|s| s.state != 'Z' && s.state != 'X' && pred(s))
        .count()
}

#[cfg(target_os = "linux")]
fn boot_id() -> Option<String> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
    })
    .clone()
}

/// The fields of `/proc/<pid>/stat` used here (proc(5)).
#[cfg(target_os = "linux")]
struct Stat {
    state: char,
    pgrp: i32,
    session: i32,
    /// Start time in clock ticks after boot.
    start: u64,
}

#[cfg(target_os = "linux")]
impl Stat {
    fn read(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields resume after the last ')'.
        let (_, rest) = text.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state); pgrp is field 5, session 6, starttime 22.
        Some(Self {
            state: f.first()?.chars().next()?,
            pgrp: f.get(2)?.parse().ok()?,
            session: f.get(3)?.parse().ok()?,
            start: f.get(19)?.parse().ok()?,
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reap_kills_a_recorded_group_and_only_on_this_boot() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("60")
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut a = spawn();
        record(dir.path(), a.id());
        let text = std::fs::read_to_string(dir.path().join(RECORD)).unwrap();
        // Another boot's record is dropped and kills nothing.
        std::fs::write(
            dir.path().join(RECORD),
            format!("other-boot {}", &text[text.find(' ').unwrap() + 1..]),
        )
        .unwrap();
        assert_eq!(reap(dir.path()), 0);
        assert!(
            a.try_wait().unwrap().is_none(),
            "killed on another boot's record"
        );
        assert!(!dir.path().join(RECORD).exists());
        // This boot's record kills the group.
        std::fs::write(dir.path().join(RECORD), &text).unwrap();
        assert_eq!(reap(dir.path()), 1);
        let status = a.wait().unwrap();
        assert!(!status.success());
        // A group whose leader started before the record's leader is not the recorded one.
        let mut b = spawn();
        record(dir.path(), b.id());
        let text = std::fs::read_to_string(dir.path().join(RECORD)).unwrap();
        let mut f: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
        f[3] = (f[3].parse::<u64>().unwrap() + 1_000_000).to_string();
        std::fs::write(dir.path().join(RECORD), f.join(" ")).unwrap();
        assert_eq!(reap(dir.path()), 0);
        assert!(
            b.try_wait().unwrap().is_none(),
            "killed a group that is not the recorded one"
        );
        b.kill().unwrap();
        b.wait().unwrap();
        // No record: nothing to do.
        assert_eq!(reap(dir.path()), 0);
    }
}

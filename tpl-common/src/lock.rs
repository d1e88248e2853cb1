//! One writer per template: the exclusive lock every tool holds on a domain while it decides from the domain's state and changes it.
//!
//! The lock is an flock on `<state>/locks/<UUID>.lock` (see [`crate::state`]), keyed by the
//! UUID because names change. flock, because the kernel drops it when its holder dies
//! however it dies (kill -9 included): a lock is never left behind. The holder writes
//! who it is into the file, so a tool that has to wait can say which tool and pid it is
//! waiting for. A lock file may be removed by whoever holds it (tpl-rm, for a domain that
//! is gone); a locker that got the lock on a file no longer at the path tries again.
//!
//! A script can hold a domain's lock across several tools: open the lock file on a
//! descriptor, flock it, and name the descriptor in `TPL_HELD_LOCKS` (a comma-separated
//! list of descriptor numbers) for the tools it runs:
//!
//! ```sh
//! exec 8>>"/var/lib/tpl/locks/$(virsh domuuid T).lock" && flock -w 300 8
//! TPL_HELD_LOCKS=8 tpl-lock --unlock T
//! ```
//!
//! A tool shares such a lock (the same open file description) instead of waiting for it.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};
use crate::signals::Interrupt;

/// The environment variable naming descriptors on which the caller holds domain locks.
pub const HELD_LOCKS_ENV: &str = "TPL_HELD_LOCKS";

/// A domain's lock, held until dropped.
#[derive(Debug)]
pub struct DomainLock {
    /// None for a lock the caller holds on an inherited descriptor: not ours to release.
    file: Option<Flock<File>>,
    pub path: PathBuf,
}

/// The lock file of the domain with this UUID. libvirt gives the UUID; it is checked all
/// the same, since it becomes a file name.
pub fn lock_path(dir: &Path, uuid: &str) -> Result<PathBuf> {
    let ok = uuid.len() == 36 && uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if !ok {
        return Err(Error::failed(
            "cannot lock the domain",
            format!("'{}' is not a UUID", crate::text::shown(uuid)),
        ));
    }
    Ok(dir.join(format!("{}.lock", uuid.to_ascii_lowercase())))
}

/// Who holds a lock, as its holder wrote it: `TOOL (pid N) since TIME`.
pub fn holder(path: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| crate::text::shown(s))
}

impl DomainLock {
    /// Take the lock of the domain with `uuid` in `dir`, waiting up to `wait` while another
    /// tool holds it. `waiting` is called once, with who holds it, when the lock is busy.
    /// A stopping signal ends the wait (`Interrupted`); the end of it is a refusal (exit 3).
    pub fn acquire(
        dir: &Path,
        uuid: &str,
        tool: &str,
        wait: Duration,
        intr: &Interrupt,
        mut waiting: impl FnMut(&str),
    ) -> Result<DomainLock> {
        let path = lock_path(dir, uuid)?;
        if inherited(&path) {
            return Ok(DomainLock { file: None, path });
        }
        fs::create_dir_all(dir).ctx("cannot create the lock directory", dir)?;
        let start = Instant::now();
        let mut told = false;
        let mut nap = Duration::from_millis(5);
        loop {
            if let Some(l) = Self::try_once(&path, tool)? {
                return Ok(l);
            }
            let who = holder(&path).unwrap_or_else(|| "another tpl tool".into());
            if !told {
                waiting(&who);
                told = true;
            }
            if start.elapsed() >= wait {
                return Err(Error::refused(
                    "the domain is busy",
                    format!(
                        "{who} holds its lock ({}) and has not let go in {} s; try again when \
                         it is done, or wait longer with --wait SECONDS",
                        path.display(),
                        wait.as_secs()
                    ),
                ));
            }
            intr.check()?;
            std::thread::sleep(nap.min(wait.saturating_sub(start.elapsed())));
            nap = (nap * 2).min(Duration::from_millis(100));
        }
    }

    /// Take the lock if nobody holds it; None if somebody does.
    pub fn try_acquire(dir: &Path, uuid: &str, tool: &str) -> Result<Option<DomainLock>> {
        let path = lock_path(dir, uuid)?;
        if inherited(&path) {
            return Ok(Some(DomainLock { file: None, path }));
        }
        fs::create_dir_all(dir).ctx("cannot create the lock directory", dir)?;
        Self::try_once(&path, tool)
    }

    fn try_once(path: &Path, tool: &str) -> Result<Option<DomainLock>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .ctx("cannot open the lock file", path)?;
        let locked = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(e).ctx("cannot lock", path),
        };
        // Whoever held it before may have removed the file (its domain is gone): a lock
        // on an unlinked file locks nothing that the next tool looks at.
        let same = fs::symlink_metadata(path).is_ok_and(|m| {
            locked
                .metadata()
                .is_ok_and(|l| l.dev() == m.dev() && l.ino() == m.ino())
        });
        if !same {
            return Self::try_once(path, tool);
        }
        let who = format!(
            "{tool} (pid {}) since {}\n",
            std::process::id(),
            crate::now_rfc3339()
        );
        // Best effort: it only serves the messages of those who wait.
        let _ = locked.set_len(0);
        let _ = locked.write_all_at(who.as_bytes(), 0);
        Ok(Some(DomainLock {
            file: Some(locked),
            path: path.to_path_buf(),
        }))
    }

    /// Whether this lock is the caller's, shared through `TPL_HELD_LOCKS`.
    pub fn is_inherited(&self) -> bool {
        self.file.is_none()
    }

    /// Remove the lock file while holding it (its domain is gone); the lock is released
    /// when dropped as always.
    pub fn remove_file(&self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Whether the caller holds this lock on a descriptor named in `TPL_HELD_LOCKS`: it must be
/// the same file, and flock on it must succeed (it does at once for the holder's own open
/// file description).
fn inherited(path: &Path) -> bool {
    let Some(list) = std::env::var_os(HELD_LOCKS_ENV) else {
        return false;
    };
    let Ok(want) = fs::symlink_metadata(path) else {
        return false;
    };
    list.to_string_lossy()
        .split(',')
        .filter_map(|s| s.trim().parse::<RawFd>().ok())
        .filter(|&fd| fd > 2)
        .any(|fd| {
            #[allow(deprecated)]
            let same = nix::sys::stat::fstat(fd)
                .is_ok_and(|st| st.st_dev == want.dev() && st.st_ino == want.ino());
            #[allow(deprecated)]
            let held = same && nix::fcntl::flock(fd, FlockArg::LockExclusiveNonblock).is_ok();
            held
        })
}

impl AsRawFd for DomainLock {
    /// The descriptor to name in `TPL_HELD_LOCKS` for a child tool (-1 when inherited).
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "3d06ec5d-1111-2222-3333-444455556666";

    #[test]
    fn one_holder_at_a_time_and_the_waiter_learns_who() {
        let d = tempfile::tempdir().unwrap();
        let intr = Interrupt::default();
        let a = DomainLock::acquire(d.path(), U, "tpl-a", Duration::ZERO, &intr, |_| {}).unwrap();
        assert!(DomainLock::try_acquire(d.path(), U, "tpl-b")
            .unwrap()
            .is_none());
        let mut said = String::new();
        let e = DomainLock::acquire(
            d.path(),
            U,
            "tpl-b",
            Duration::from_millis(50),
            &intr,
            |who| said = who.to_string(),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert!(
            said.starts_with(&format!("tpl-a (pid {})", std::process::id())),
            "{said}"
        );
        assert!(e.to_string().contains("tpl-a (pid"), "{e}");
        drop(a);
        assert!(DomainLock::try_acquire(d.path(), U, "tpl-b")
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_removed_lock_file_is_not_a_lock() {
        let d = tempfile::tempdir().unwrap();
        let a = DomainLock::try_acquire(d.path(), U, "a").unwrap().unwrap();
        // Another tool opened the file meanwhile and waits on it.
        let stale = File::open(&a.path).unwrap();
        a.remove_file();
        drop(a);
        let b = DomainLock::try_acquire(d.path(), U, "b").unwrap().unwrap();
        assert!(b.path.exists(), "a new file at the path");
        // The old file's lock is free, but it is not the domain's lock any more.
        assert!(Flock::lock(stale, FlockArg::LockExclusiveNonblock).is_ok());
        assert!(DomainLock::try_acquire(d.path(), U, "c").unwrap().is_none());
    }

    #[test]
    fn only_uuids_name_lock_files() {
        for bad in ["../../etc/passwd", "", "x", &"g".repeat(36)] {
            assert!(lock_path(Path::new("/l"), bad).is_err(), "{bad}");
        }
        assert_eq!(
            lock_path(Path::new("/l"), &U.to_uppercase()).unwrap(),
            Path::new(&format!("/l/{U}.lock"))
        );
    }

    #[test]
    fn a_stopping_signal_ends_the_wait() {
        let d = tempfile::tempdir().unwrap();
        let intr = Interrupt::default();
        let _a = DomainLock::try_acquire(d.path(), U, "a").unwrap().unwrap();
        intr.raise_flag(libc::SIGINT);
        let e = DomainLock::acquire(d.path(), U, "b", Duration::from_secs(60), &intr, |_| {})
            .unwrap_err();
        assert!(matches!(e, Error::Interrupted { .. }), "{e}");
    }
}

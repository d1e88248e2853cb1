//! One writer per template: the exclusive lock every tool holds on a domain while it decides from the domain's state and changes it.
//!
//! The lock is an flock on `<state>/locks/<UUID>.lock` (see [`crate::state`]), keyed by the
//! UUID because names change. flock, because the kernel drops it when its holder dies
//! however it dies (kill -9 included): a lock is never left behind. Lock files are 0600
//! in a 0700 directory, so only the user the tools run as can open one, and so take the
//! lock (flock needs only a descriptor, read-only will do); a lock file of another owner
//! is refused. A tool that has to wait names the holder as the kernel knows it
//! (`/proc/locks`: its pid and program), with what the holder wrote into the file when
//! that is the same process, and says when it is not a tpl tool. A lock file may be removed by whoever holds it (tpl-rm, for a domain that
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

/// Who holds the lock on `path`, as the kernel says: `TOOL (pid N) since TIME` when the
/// holder is the tpl tool that wrote that into the file, else `PROGRAM (pid N)`, with
/// ", which is not a tpl tool" for another program. None when the kernel lists no holder
/// here (one in another pid namespace, or the lock was just released).
pub fn holder(path: &Path) -> Option<String> {
    let m = fs::metadata(path).ok()?;
    let pid = flock_holder(&fs::read_to_string("/proc/locks").ok()?, m.dev(), m.ino())?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    let mut written = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut written);
    }
    let written = written.trim();
    if written.contains(&format!("(pid {pid})")) {
        return Some(crate::text::shown(written));
    }
    let program = if comm.is_empty() { "a process" } else { comm };
    let tpl = comm.starts_with("tpl-");
    Some(crate::text::shown(&format!(
        "{program} (pid {pid}){}",
        if tpl { "" } else { ", which is not a tpl tool" }
    )))
}

/// The pid that holds an flock on the file with device `dev` and inode `ino`, from the
/// text of /proc/locks (`1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`; the device as
/// hexadecimal major:minor). Lines of waiters (`->`) are not holders.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
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
        crate::state::create_private_dir(dir).ctx("cannot create the lock directory", dir)?;
        let start = Instant::now();
        let mut told = false;
        let mut nap = Duration::from_millis(5);
        loop {
            if let Some(l) = Self::try_once(&path, tool)? {
                return Ok(l);
            }
            // Read from /proc/locks when said, not at every try.
            let who = || holder(&path).unwrap_or_else(|| "another process".into());
            if !told {
                waiting(&who());
                told = true;
            }
            if start.elapsed() >= wait {
                return Err(Error::refused(
                    "the domain is busy",
                    format!(
                        "{} holds its lock ({}) and has not let go in {} s; try again when \
                         it is done, or wait longer with --wait SECONDS",
                        who(),
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
        crate::state::create_private_dir(dir).ctx("cannot create the lock directory", dir)?;
        Self::try_once(&path, tool)
    }

    fn try_once(path: &Path, tool: &str) -> Result<Option<DomainLock>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .ctx("cannot open the lock file", path)?;
        let m = f.metadata().ctx("cannot stat the lock file", path)?;
        let euid = nix::unistd::geteuid().as_raw();
        if m.uid() != euid {
            return Err(Error::refused(
                "cannot take the domain's lock",
                format!(
                    "its lock file {} is owned by uid {}, not by the user the tools run as \
                     (uid {euid}): another user made it, and could hold the lock; remove it",
                    path.display(),
                    m.uid()
                ),
            ));
        }
        // A lock file an older release made 0644: nobody else is to open it from now on.
        if m.mode() & 0o077 != 0 {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .ctx("cannot make the lock file private", path)?;
        }
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
    fn the_kernel_names_the_holder() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 08:02:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 fd:01:1234567 0 EOF\n";
        let dev = libc::makedev(0xfd, 0x01);
        assert_eq!(flock_holder(locks, dev, 1234567), Some(4242));
        assert_eq!(flock_holder(locks, dev, 99), None);
        assert_eq!(
            flock_holder(locks, libc::makedev(8, 2), 99),
            None,
            "POSIX locks"
        );
        // A real one: this process's own lock, by its program's name.
        let d = tempfile::tempdir().unwrap();
        let a = DomainLock::try_acquire(d.path(), U, "tpl-a")
            .unwrap()
            .unwrap();
        let who = holder(&a.path).unwrap();
        assert!(
            who.starts_with(&format!("tpl-a (pid {})", std::process::id())),
            "{who}"
        );
    }

    #[test]
    fn lock_files_are_private_and_another_owners_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let a = DomainLock::try_acquire(d.path(), U, "a").unwrap().unwrap();
        assert_eq!(fs::metadata(&a.path).unwrap().mode() & 0o777, 0o600);
        let p = a.path.clone();
        drop(a);
        // An older release's 0644 file is made private.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        drop(DomainLock::try_acquire(d.path(), U, "a").unwrap().unwrap());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            let e = DomainLock::try_acquire(d.path(), U, "a").unwrap_err();
            assert_eq!(e.exit_code(), 3);
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        }
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

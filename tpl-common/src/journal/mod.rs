//! Intent journals: what a multi-step change is about to do, written and synced before each step, so that whatever a run killed with -9 left is finished or undone by the next run of any tool.
//!
//! A journal is a file of JSON lines, `<kind>-<pid>-<random>.journal` in its kind's
//! directory under the state directory (the random part because pids are reused). Its run
//! holds an exclusive flock on it for its whole life, and the kernel drops the lock when
//! the process dies however it dies: a journal whose lock can be taken belongs to a dead
//! run. Unlike a pid check this survives pid reuse and renamed binaries, and two
//! recoverers never work on one journal at once (the second cannot take the lock). A
//! journal is created under a `-new` name, locked, and only then renamed to its own, so
//! a recoverer never sees it unlocked.
//!
//! [`clone`] journals a tpl-clone run's files; [`rename`] a `tpl-rename --disks`. The
//! recovery of both runs whenever a tool opens a connection and whenever it takes a
//! domain's lock ([`crate::cli::Ctx`]).

pub mod clone;
pub mod remove;
pub mod rename;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, rename_noreplace};
pub use crate::host::{host_tag, pid_exists};

/// A live run's journal, open for appending and locked while the run lives.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Flock<File>,
}

impl Journal {
    /// Create this run's journal of `kind` (`tpl-clone`, `tpl-rename`) in `dir`. Neither
    /// step ever replaces a file: an older journal under the same name is a dead run's
    /// that a recoverer kept on purpose.
    pub fn create(dir: &Path, kind: &str) -> Result<Journal> {
        crate::state::create_private_dir(dir).ctx("cannot create the journal directory", dir)?;
        let pid = std::process::id();
        let mut tries = 0;
        loop {
            tries += 1;
            let rand = &uuid::Uuid::new_v4().simple().to_string()[..8];
            let path = dir.join(format!("{kind}-{pid}-{rand}.journal"));
            let new = path.with_extension("journal-new");
            let file = match OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&new)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => continue,
                Err(e) => return Err(e).ctx("cannot create the journal", &new),
            };
            // Blocking: a recoverer may hold the lock for a moment to look (only when it
            // takes our pid for a dead one's, e.g. from another pid namespace).
            let file = match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(f) => f,
                Err((_, e)) => {
                    let _ = fs::remove_file(&new);
                    return Err(e).ctx("cannot lock the journal", &new);
                }
            };
            match rename_noreplace(&new, &path) {
                Ok(()) => {}
                Err(Error::Refused { .. }) if tries < 8 => {
                    let _ = fs::remove_file(&new);
                    continue;
                }
                Err(e) => {
                    let _ = fs::remove_file(&new);
                    return Err(e);
                }
            }
            fsync_dir(dir)?;
            return Ok(Journal { path, file });
        }
    }

    /// Append one entry and make it durable before the step it announces.
    pub fn log<E: Serialize>(&mut self, e: &E) -> Result<()> {
        let mut line = serde_json::to_string(e).expect("an entry always serializes");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .ctx("cannot write the journal", &self.path)
    }

    /// Append several entries with one sync, before the steps they announce (steps that
    /// run together: a torn last line is ignored when a journal is read).
    pub fn log_all<E: Serialize>(&mut self, es: &[E]) -> Result<()> {
        let mut text = String::new();
        for e in es {
            text.push_str(&serde_json::to_string(e).expect("an entry always serializes"));
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data())
            .ctx("cannot write the journal", &self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run is over, but something it made could not be undone: the journal stays
    /// for the next run of any tool, which finds this run dead and finishes the undo.
    pub fn keep(self) {}

    /// The run is over and everything it did is either finished or undone.
    pub fn close(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// What a file in a journal directory is: a journal of `kind` (`KIND-<pid>-<random>.journal`)
/// or one being created (`.journal-new`), and the pid of its run. None for anything else.
pub fn journal_name(p: &Path, kind: &str) -> Option<(u32, bool)> {
    let name = p
        .file_name()?
        .to_str()?
        .strip_prefix(kind)?
        .strip_prefix('-')?;
    let (id, new) = match name.strip_suffix(".journal") {
        Some(id) => (id, false),
        None => (name.strip_suffix(".journal-new")?, true),
    };
    let (pid, rand) = id.split_once('-')?;
    if rand.is_empty() || !rand.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some((pid.parse().ok()?, new))
}

/// The journal's lock, if its run is dead (nobody holds it).
pub fn lock_if_dead(path: &Path) -> Option<Flock<File>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

/// A dead run's journal, locked while a recoverer works on it.
#[derive(Debug)]
pub struct Dead<E> {
    pub path: PathBuf,
    pub pid: u32,
    /// The entries that could be read; a line cut short by the kill is left out (the step
    /// it announced never started).
    pub entries: Vec<E>,
    _lock: Flock<File>,
}

impl<E> Dead<E> {
    /// Remove the journal, still locked, so no other recoverer reads it half-done.
    pub fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The journals of `kind` in `dir` whose runs are dead, each locked; and why others were
/// not taken (see [`crate::state::untrusted`]: a journal that is not this user's own is
/// never obeyed, only reported). A run killed while creating its journal left it under
/// the `-new` name, before any entry: that file is simply removed (the pid check keeps
/// one a live run has created and not yet locked).
pub fn dead<E: DeserializeOwned>(dir: &Path, kind: &str) -> (Vec<Dead<E>>, Vec<String>) {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return (out, refused);
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some((pid, new)) = journal_name(&path, kind) else {
            continue;
        };
        if let Some(why) = crate::state::untrusted(&path) {
            if note_refusal(&path) {
                refused.push(format!(
                    "ignored the journal '{}': {why}; tpl obeys only journals of its own \
                     user that nobody else may write (remove it, or check who wrote it)",
                    crate::text::shown_path(&path)
                ));
            }
            continue;
        }
        if new {
            if !pid_exists(pid) && lock_if_dead(&path).is_some() {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        let Some(lock) = lock_if_dead(&path) else {
            continue;
        };
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        let entries = BufReader::new(f)
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect();
        out.push(Dead {
            path,
            pid,
            entries,
            _lock: lock,
        });
    }
    (out, refused)
}

/// What recovering one dead run's journal came to.
#[derive(Debug)]
pub enum Verdict {
    /// Not this recoverer's to judge (another connection's, another domain's, a domain
    /// whose lock another tool holds): left as it is.
    Skip,
    /// Finished or undone: the journal goes. The messages for people (warning?, text).
    Done(Vec<(bool, String)>),
    /// Kept for a later run: the messages, saying why.
    Kept(Vec<(bool, String)>),
}

/// The one recovery loop of every journal kind: each journal of `kind` in `dir` whose run
/// is dead, locked, is read and handed to `judge(entries, pid, shown path)`, which acts
/// on it and says what became of it; the journal is removed (still locked) when it is
/// done with. A journal without entries changed nothing (each entry is synced before the
/// step it announces) and goes. Returns the messages for people, with the refusals of
/// journals that are not to be obeyed (see [`dead`]).
pub fn recover_each<E: DeserializeOwned>(
    dir: &Path,
    kind: &str,
    mut judge: impl FnMut(&[E], u32, &str) -> Verdict,
) -> Vec<(bool, String)> {
    let (deads, refused) = dead::<E>(dir, kind);
    let mut notes: Vec<(bool, String)> = refused.into_iter().map(|r| (true, r)).collect();
    for d in deads {
        if d.entries.is_empty() {
            d.remove();
            continue;
        }
        match judge(&d.entries, d.pid, &crate::text::shown_path(&d.path)) {
            Verdict::Skip => {}
            Verdict::Done(n) => {
                notes.extend(n);
                d.remove();
            }
            Verdict::Kept(n) => notes.extend(n),
        }
    }
    notes
}

/// Whether a refused journal is to be reported now: once a run, not at every recovery.
fn note_refusal(path: &Path) -> bool {
    static SAID: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.iter().any(|p| p == path) {
        return false;
    }
    said.push(path.to_path_buf());
    true
}

/// The pids without a process here whose journals of `kind` in `dir` are still locked (a
/// run in another pid namespace sharing the state directory). Only those: trying the
/// lock of a live local run's journal could get between its creation and its locking.
pub fn foreign_live_pids(dir: &Path, kind: &str) -> std::collections::BTreeSet<u32> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Default::default();
    };
    rd.flatten()
        .filter_map(|e| {
            let path = e.path();
            let (pid, _) = journal_name(&path, kind)?;
            (!pid_exists(pid) && lock_if_dead(&path).is_none()).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_names() {
        let j = |n: &str| journal_name(Path::new(n), "tpl-clone");
        assert_eq!(j("tpl-clone-12-0badf00d.journal"), Some((12, false)));
        assert_eq!(j("tpl-clone-12-0badf00d.journal-new"), Some((12, true)));
        for bad in [
            "tpl-clone-x.journal",
            "tpl-clone-12-.journal",
            "tpl-clone-12-zz.journal",
            "tpl-clone-12.log",
            "other-12.journal",
            "tpl-rename-12-0badf00d.journal",
        ] {
            assert_eq!(j(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_live_journal_is_not_dead_and_a_closed_one_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::create(d.path(), "tpl-test").unwrap();
        j.log(&serde_json::json!({"op": "x"})).unwrap();
        assert!(dead::<serde_json::Value>(d.path(), "tpl-test").0.is_empty());
        let p = j.path().to_path_buf();
        j.close();
        assert!(!p.exists());
    }

    /// Entries logged together read back one by one, in order; a kept journal stays.
    #[test]
    fn entries_logged_together_read_back_in_order_and_a_kept_journal_stays() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::create(d.path(), "tpl-test").unwrap();
        j.log(&serde_json::json!({"op": "a"})).unwrap();
        j.log_all(&[
            serde_json::json!({"op": "b"}),
            serde_json::json!({"op": "c"}),
        ])
        .unwrap();
        let p = j.path().to_path_buf();
        j.keep();
        assert!(p.exists());
        let text = fs::read_to_string(&p).unwrap();
        let ops: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            ops,
            [
                serde_json::json!({"op": "a"}),
                serde_json::json!({"op": "b"}),
                serde_json::json!({"op": "c"})
            ]
        );
    }
}

//! The journal of what a run creates, so that whatever a run killed with -9 left behind is removed by the next one.
//!
//! Each run appends JSON lines to `<state>/clone-journal/tpl-clone-<pid>.journal`, each
//! synced before the step it announces:
//!
//! - `clone`: a clone is started (its name, UUID and libvirt URI);
//! - `tmp`: a temporary file is about to be created (its name also carries the pid);
//! - `file`: a finished temporary file is about to be renamed to its final name, with
//!   its device and inode, so the final file is removed only if it is still that file
//!   (a run that lost a race for a name never removes the winner's file).
//!
//! A clone is finished when its domain is defined: that is the commit point. Cleaning a
//! dead run's journal removes the temporary files and final files of every clone whose
//! domain (by UUID) does not exist, then the journal. A normal run removes its journal
//! at the end.
//!
//! A run holds an exclusive flock on its journal for its whole life, and the kernel drops
//! it when the process dies however it dies: a journal whose lock can be taken belongs to
//! a dead run. Unlike a pid check this survives pid reuse and renamed binaries, and two
//! cleaners never clean one journal at once (the second cannot take the lock).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tpl_common::error::{Error, IoContext, Result};

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Entry {
    Clone {
        name: String,
        uuid: String,
        uri: String,
    },
    Tmp {
        uuid: String,
        path: PathBuf,
    },
    File {
        uuid: String,
        path: PathBuf,
        dev: u64,
        ino: u64,
    },
}

/// Where tpl keeps state that is not the domains': `$TPL_STATE_DIR`, else /var/lib/tpl
/// for root, else `$XDG_STATE_HOME/tpl` (or ~/.local/state/tpl).
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TPL_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/tpl");
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("tpl")
}

pub fn journal_dir() -> PathBuf {
    state_dir().join("clone-journal")
}

/// This run's journal, open for appending and locked while the run lives.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Flock<File>,
}

impl Journal {
    /// Create this run's journal in `dir`. It is locked under a temporary name and only
    /// then renamed to its own, so a cleaner never sees it unlocked.
    pub fn create(dir: &Path) -> Result<Journal> {
        fs::create_dir_all(dir).ctx("cannot create the journal directory", dir)?;
        let path = dir.join(format!("tpl-clone-{}.journal", std::process::id()));
        let new = path.with_extension("journal-new");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&new)
            .ctx("cannot create the journal", &new)?;
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .ctx("cannot lock the journal", &new)?;
        // A journal left under our pid is a dead run's (pids are reused) and was cleaned
        // before; replacing it is right.
        fs::rename(&new, &path).ctx("cannot create the journal", &path)?;
        tpl_common::fsutil::fsync_dir(dir)?;
        Ok(Journal { path, file })
    }

    /// Append one entry and make it durable before the step it announces.
    pub fn log(&mut self, e: &Entry) -> Result<()> {
        let mut line = serde_json::to_string(e).expect("an entry always serializes");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .ctx("cannot write the journal", &self.path)
    }

    /// Note the file at `tmp` (finished) before renaming it to `final_path`.
    pub fn log_file(&mut self, uuid: &str, tmp: &Path, final_path: &Path) -> Result<()> {
        let m = fs::symlink_metadata(tmp).ctx("cannot stat", tmp)?;
        self.log(&Entry::File {
            uuid: uuid.into(),
            path: final_path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The run is over and everything it did is either finished or removed.
    pub fn close(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether a process with this pid exists at all (for temporary files without a journal:
/// unsure means alive).
fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a journal's name, or None for anything else in the directory.
fn journal_pid(p: &Path) -> Option<u32> {
    p.file_name()?
        .to_str()?
        .strip_prefix("tpl-clone-")?
        .strip_suffix(".journal")?
        .parse()
        .ok()
}

/// The pid in the name of a journal being created (`tpl-clone-<pid>.journal-new`).
fn new_journal_pid(p: &Path) -> Option<u32> {
    p.file_name()?
        .to_str()?
        .strip_prefix("tpl-clone-")?
        .strip_suffix(".journal-new")?
        .parse()
        .ok()
}

/// The journal's lock, if its run is dead (nobody holds it).
fn lock_if_dead(path: &Path) -> Option<Flock<File>> {
    let f = File::open(path).ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

/// Clean every journal in `dir` whose run is dead. `domain_exists(uri, uuid)` says whether
/// a clone was finished (`None`: cannot tell, keep the journal for a later run). Returns
/// what was removed, for the messages.
pub fn clean_dead(
    dir: &Path,
    mut domain_exists: impl FnMut(&str, &str) -> Option<bool>,
) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return done;
    };
    for e in rd.flatten() {
        let path = e.path();
        // A run killed while creating its journal left it under the new name, before any
        // entry: nothing to clean but the file (the pid check keeps a run that has
        // created it and not yet locked it).
        if let Some(pid) = new_journal_pid(&path) {
            if !pid_exists(pid) && lock_if_dead(&path).is_some() && fs::remove_file(&path).is_ok() {
                done.push(format!("empty journal '{}'", path.display()));
            }
            continue;
        }
        if journal_pid(&path).is_none() {
            continue;
        }
        let Some(_lock) = lock_if_dead(&path) else {
            continue;
        };
        if let Ok(removed) = clean_one(&path, &mut domain_exists) {
            done.extend(removed);
            // Removed while still locked, so no other cleaner reads it half-done.
            let _ = fs::remove_file(&path);
        }
    }
    done
}

fn clean_one(
    journal: &Path,
    domain_exists: &mut impl FnMut(&str, &str) -> Option<bool>,
) -> Result<Vec<String>> {
    let f = File::open(journal).ctx("cannot open the journal", journal)?;
    // A line cut short by the kill is ignored: the step it announced never started.
    let entries: Vec<Entry> = BufReader::new(f)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let mut removed = Vec::new();
    for e in &entries {
        let Entry::Clone { name, uuid, uri } = e else {
            continue;
        };
        match domain_exists(uri, uuid) {
            Some(true) => continue, // finished: its files are the domain's now
            Some(false) => {}
            None => {
                return Err(Error::failed(
                    "cannot tell whether a clone was finished",
                    format!("libvirt at {uri} did not answer"),
                ))
            }
        }
        for f in &entries {
            match f {
                Entry::Tmp { uuid: u, path } if u == uuid && fs::remove_file(path).is_ok() => {
                    removed.push(format!(
                        "temporary file '{}' of unfinished clone '{name}'",
                        path.display()
                    ));
                }
                Entry::File {
                    uuid: u,
                    path,
                    dev,
                    ino,
                } if u == uuid => {
                    let same = fs::symlink_metadata(path)
                        .is_ok_and(|m| m.dev() == *dev && m.ino() == *ino);
                    if same && fs::remove_file(path).is_ok() {
                        removed.push(format!(
                            "file '{}' of unfinished clone '{name}'",
                            path.display()
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(removed)
}

/// The temporary name of a file this run writes: hidden, in the target's directory (so
/// the final rename stays on one file system), and carrying our pid.
pub fn tmp_name(final_path: &Path) -> PathBuf {
    let file = final_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(format!(".{file}.tpl-tmp-{}", std::process::id()))
}

/// Remove temporary files of dead runs in `dir` that no journal accounted for (a journal
/// directory someone wiped, say): their pid has no live journal in `jdir` and no process.
/// Returns what was removed.
pub fn sweep_tmp(dir: &Path, jdir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tpl-tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let journal = jdir.join(format!("tpl-clone-{pid}.journal"));
        let live_journal = journal.exists() && lock_if_dead(&journal).is_none();
        if !live_journal && !pid_exists(pid) && e.file_type().is_ok_and(|t| t.is_file()) {
            let p = e.path();
            if fs::remove_file(&p).is_ok() {
                out.push(format!("temporary file '{}'", p.display()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!pid_exists(pid));
        pid
    }

    #[test]
    fn cleans_unfinished_clones_only_and_never_a_replaced_file() {
        let d = tempfile::tempdir().unwrap();
        let jdir = d.path().join("j");
        fs::create_dir(&jdir).unwrap();
        let pid = dead_pid();
        let tmp = d.path().join(format!(".a.qcow2.tpl-tmp-{pid}"));
        let a = d.path().join("a.qcow2"); // renamed into place, domain never defined
        let b = d.path().join("b.qcow2"); // another run's file that took the name
        let c = d.path().join("c.qcow2"); // a finished clone's file
        for p in [&tmp, &a, &b, &c] {
            fs::write(p, "x").unwrap();
        }
        let ino = |p: &Path| {
            let m = fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        let entries = [
            Entry::Clone {
                name: "a".into(),
                uuid: "u1".into(),
                uri: "test:///x".into(),
            },
            Entry::Tmp {
                uuid: "u1".into(),
                path: tmp.clone(),
            },
            Entry::File {
                uuid: "u1".into(),
                path: a.clone(),
                dev: ino(&a).0,
                ino: ino(&a).1,
            },
            Entry::File {
                uuid: "u1".into(),
                path: b.clone(),
                dev: ino(&b).0,
                ino: ino(&b).1 + 1_000_000,
            },
            Entry::Clone {
                name: "c".into(),
                uuid: "u2".into(),
                uri: "test:///x".into(),
            },
            Entry::File {
                uuid: "u2".into(),
                path: c.clone(),
                dev: ino(&c).0,
                ino: ino(&c).1,
            },
        ];
        let mut text: String = entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        text.push_str("{\"op\":\"tmp\",\"uu"); // cut short by kill -9
        let jpath = jdir.join(format!("tpl-clone-{pid}.journal"));
        fs::write(&jpath, text).unwrap();
        // A run killed while creating its journal left it under the new name.
        let new = jdir.join(format!("tpl-clone-{pid}.journal-new"));
        fs::write(&new, "").unwrap();
        // A live run's journal (ours) is left alone.
        let mine = Journal::create(&jdir).unwrap();

        let removed = clean_dead(&jdir, |_, uuid| Some(uuid == "u2"));
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(!tmp.exists() && !a.exists() && !new.exists());
        assert!(b.exists(), "a file that is not the one journaled stays");
        assert!(c.exists(), "a finished clone's file stays");
        assert!(!jpath.exists());
        assert!(mine.path.exists());
        mine.close();
    }

    #[test]
    fn journal_kept_when_libvirt_cannot_tell() {
        let d = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        let jpath = d.path().join(format!("tpl-clone-{pid}.journal"));
        let e = Entry::Clone {
            name: "a".into(),
            uuid: "u".into(),
            uri: "x".into(),
        };
        fs::write(&jpath, serde_json::to_string(&e).unwrap() + "\n").unwrap();
        assert!(clean_dead(d.path(), |_, _| None).is_empty());
        assert!(jpath.exists());
    }

    #[test]
    fn sweeps_only_dead_runs_temporaries() {
        let d = tempfile::tempdir().unwrap();
        let dead = d.path().join(format!(".x.qcow2.tpl-tmp-{}", dead_pid()));
        let live = tmp_name(&d.path().join("y.qcow2"));
        let other = d.path().join(".x.qcow2.tpl-tmp-abc");
        for p in [&dead, &live, &other] {
            fs::write(p, "x").unwrap();
        }
        assert_eq!(sweep_tmp(d.path(), d.path()).len(), 1);
        assert!(!dead.exists() && live.exists() && other.exists());
    }
}

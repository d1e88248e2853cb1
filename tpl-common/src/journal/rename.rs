//! The journal of `tpl-rename --disks`: the rename's intent, synced before the first file moves, so a rename killed at any point is finished or undone by the next run of any tool.
//!
//! The steps, in order: the intent is journaled; each file is moved (never over another);
//! the directories are synced; the definition is pointed at the new files; the domain is
//! renamed in libvirt. That last step is the commit point: a domain found under its new
//! name is finished (any file still at its old name is moved on); under any other name
//! it is rolled back (files moved back, the definition pointed at them again). Either
//! way the domain ends whole under one name: every file it names exists, nothing is left
//! under the other. A file is moved only while it is still the very file the intent
//! names (same device and inode), so a file someone put at a path since is never moved.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Journal, Verdict};
use crate::dom::Dom;
use crate::error::{Error, Result};
use crate::fsutil::fsync_dir;
use crate::ownfiles::Role;
use crate::session::Session;
use crate::text::{shown, shown_path};
use crate::volume::{Identity, Vol};

/// The journal kind, and the start of its file names.
pub const KIND: &str = "tpl-rename";

/// What a `rename --disks` is about to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    pub uri: String,
    pub uuid: String,
    pub old: String,
    pub new: String,
    pub moves: Vec<Move>,
}

/// One file to move, and the file it is (device and inode when the intent was made).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    #[serde(flatten)]
    pub role: Role,
    pub from: PathBuf,
    pub to: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// The file does not exist yet (an NVRAM libvirt makes at the first start): only the
    /// definition's path changes, so that it is made under the new name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub absent: bool,
    /// An RBD image rather than a file: `from` and `to` are image names in this pool (and
    /// namespace), and the image's id says it is the very image (dev and ino are 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdMove>,
}

/// Where an RBD image being renamed is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RbdMove {
    pub pool: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub id: String,
}

/// How a recovered rename ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    RolledBack,
}

impl Move {
    /// What the definition `x` names in this move's place now (a file's path, an RBD
    /// image's name), and the disk.
    fn named_by(
        &self,
        x: &crate::domxml::DomainXml,
    ) -> (Option<PathBuf>, Option<crate::record::Disk>) {
        let disk = match &self.role {
            Role::Disk { target } => x.disks().into_iter().find(|d| &d.target == target),
            Role::Nvram => None,
        };
        let now = match (&self.role, &disk) {
            (Role::Nvram, _) => x.nvram(),
            (_, Some(d)) if self.rbd.is_some() => d.rbd.as_ref().map(|r| PathBuf::from(&r.image)),
            (_, d) => d.as_ref().and_then(|d| d.path.clone()),
        };
        (now, disk)
    }
    /// The volume this move names at `p` (one of its two names).
    fn vol(&self, p: &Path) -> Vol {
        match &self.rbd {
            None => Vol::File(p.to_path_buf()),
            Some(r) => Vol::Rbd(r.spec(p).to_string()),
        }
    }

    /// Which volume is moved.
    fn identity(&self) -> Identity {
        match &self.rbd {
            None => Identity::Inode {
                dev: self.dev,
                ino: self.ino,
            },
            Some(r) => Identity::Rbd { id: r.id.clone() },
        }
    }

    fn is_at(&self, s: &Session, p: &Path) -> bool {
        self.vol(p).is(s, &self.identity())
    }

    /// Move it from `src` to `dst`, never over another file or image.
    fn rename(&self, s: &Session, src: &Path, dst: &Path) -> Result<()> {
        self.vol(src).rename_noreplace(s, &self.vol(dst))
    }
}

impl RbdMove {
    /// The image `name` of this pool and namespace.
    pub fn spec(&self, name: &Path) -> tpl_ceph::ImageSpec {
        tpl_ceph::ImageSpec::new(&self.pool, name.to_string_lossy()).in_namespace(&self.namespace)
    }
}

impl Intent {
    /// Journal this intent (synced) in `dir` before anything changes. The caller keeps the
    /// journal while it works and closes it when the rename is done or undone.
    pub fn journal(&self, dir: &Path) -> Result<Journal> {
        let mut j = Journal::create(dir, KIND)?;
        j.log(self)?;
        Ok(j)
    }

    /// Move the files to their new names (`forward`) or back. With `strict` the first
    /// failure ends it (a live rename stops there and rolls back); otherwise every file
    /// that can be moved is, and the others are reported (recovery does all it can).
    pub fn move_files(&self, s: &Session, forward: bool, strict: bool) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let order: Vec<&Move> = if forward {
            self.moves.iter().collect()
        } else {
            self.moves.iter().rev().collect()
        };
        for m in order.into_iter().filter(|m| !m.absent) {
            let (src, dst) = if forward {
                (&m.from, &m.to)
            } else {
                (&m.to, &m.from)
            };
            if m.is_at(s, dst) {
                continue;
            }
            let res = if m.is_at(s, src) {
                m.rename(s, src, dst)
            } else {
                Err(Error::failed(
                    format!(
                        "cannot move the {} of domain '{}'",
                        m.role,
                        shown(&self.old)
                    ),
                    format!(
                        "it is neither at '{}' nor at '{}' any more",
                        shown_path(src),
                        shown_path(dst)
                    ),
                ))
            };
            match res {
                Ok(()) => {}
                Err(e) if strict => return Err(e),
                Err(e) => problems.push(e.to_string()),
            }
        }
        let dirs: BTreeSet<&Path> = self
            .moves
            .iter()
            .filter(|m| m.rbd.is_none())
            .flat_map(|m| [m.from.parent(), m.to.parent()])
            .flatten()
            .collect();
        for d in dirs {
            match fsync_dir(d) {
                // A directory that is gone holds nothing of this rename any more.
                Err(e) if crate::image::is_not_found(&e) => {}
                r => r?,
            }
        }
        Ok(problems)
    }

    /// Point the domain's definition at the new files (`forward`) or the old ones, when it
    /// does not already.
    pub fn point_definition(&self, dom: &Dom, forward: bool) -> Result<()> {
        let mut x = dom.xml()?;
        let mut changed = false;
        for m in &self.moves {
            let want = if forward { &m.to } else { &m.from };
            let (now, disk) = m.named_by(&x);
            if now.as_ref() == Some(want) {
                continue;
            }
            match (&m.role, &m.rbd) {
                (Role::Disk { target }, Some(_)) => {
                    let snap = disk.and_then(|d| d.rbd).and_then(|r| r.snapshot);
                    x.set_rbd_image(target, &want.to_string_lossy(), snap.as_deref())?
                }
                (Role::Disk { target }, None) => x.set_disk_path(target, want)?,
                (Role::Nvram, _) => x.set_nvram(want)?,
            }
            changed = true;
        }
        if changed {
            dom.redefine(&x)?;
        }
        Ok(())
    }

    /// Undo a rename that has not committed: the name back if it changed, the definition
    /// and the files back. Returns what could not be undone.
    pub fn roll_back(&self, dom: &mut Dom) -> Vec<String> {
        let mut problems = Vec::new();
        if dom.name == self.new {
            if let Err(e) = dom.dom.rename(&self.old, 0) {
                problems.push(format!(
                    "cannot rename the domain back to '{}': {e}",
                    shown(&self.old)
                ));
            }
            let _ = dom.refresh_name();
        }
        if let Err(e) = self.point_definition(dom, false) {
            problems.push(e.to_string());
        }
        match self.move_files(dom.session, false, false) {
            Ok(p) => problems.extend(p),
            Err(e) => problems.push(e.to_string()),
        }
        problems
    }

    /// Finish or undo this rename after its run died, as the module says.
    pub fn recover(&self, s: &Session) -> Result<(Outcome, Vec<String>)> {
        let r = crate::record::DomainRef {
            uuid: Some(self.uuid.clone()),
            ..Default::default()
        };
        let mut dom = match Dom::lookup(s, &r) {
            Ok(d) => d,
            // No such domain: undefined since, or a journal tpl did not write. Nothing
            // proves the files are a domain's: nothing is moved, the journal is kept.
            Err(Error::Usage { .. }) => {
                return Err(Error::failed(
                    "nothing was acted on",
                    format!(
                        "no domain with UUID {} exists on {}, so nothing proves its files are \
                         a domain's (if the domain was undefined since, move its files back \
                         by hand and remove the journal)",
                        shown(&self.uuid),
                        shown(&s.uri)
                    ),
                ))
            }
            Err(e) => return Err(e),
        };
        self.check_shape(&dom.xml()?)
            .map_err(|why| Error::failed("nothing was acted on", why))?;
        if dom.name == self.new {
            let mut problems = self.move_files(s, true, false)?;
            if let Err(e) = self.point_definition(&dom, true) {
                problems.push(e.to_string());
            }
            Ok((Outcome::Finished, problems))
        } else {
            Ok((Outcome::RolledBack, self.roll_back(&mut dom)))
        }
    }
}

impl Intent {
    /// Whether this intent is of the shape tpl-rename writes for the domain defined as
    /// `x`, and if not why: each file moves within its directory, between absolute paths,
    /// and the definition names each move's old or new place. Recovery acts on nothing
    /// else (a journal could otherwise move any file, or point a disk anywhere).
    pub fn check_shape(&self, x: &crate::domxml::DomainXml) -> std::result::Result<(), String> {
        for m in &self.moves {
            if m.rbd.is_none()
                && !(m.from.is_absolute() && m.to.is_absolute() && m.from.parent() == m.to.parent())
            {
                return Err(format!(
                    "its move of '{}' to '{}' leaves the directory, which tpl-rename never does",
                    shown_path(&m.from),
                    shown_path(&m.to)
                ));
            }
            let (now, _) = m.named_by(x);
            if now.as_ref() != Some(&m.from) && now.as_ref() != Some(&m.to) {
                return Err(format!(
                    "the domain's {} is neither '{}' nor '{}'",
                    m.role,
                    shown_path(&m.from),
                    shown_path(&m.to)
                ));
            }
        }
        Ok(())
    }
}

/// Finish or undo the renames of dead runs on this connection (only the one of domain
/// `only`, when given). `lock(uuid)` takes the domain's lock, or says it is busy (None;
/// its holder recovers it when it takes the lock). Returns the messages for people:
/// (warning?, text).
pub fn recover_dead<L>(
    s: &Session,
    dir: &Path,
    only: Option<&str>,
    mut lock: impl FnMut(&str) -> Option<L>,
) -> Vec<(bool, String)> {
    super::recover_each::<Intent>(dir, KIND, |entries, pid, path| {
        // Journaled before the first change: the intent is the first line.
        let intent = &entries[0];
        if intent.uri != s.uri || only.is_some_and(|u| !u.eq_ignore_ascii_case(&intent.uuid)) {
            return Verdict::Skip;
        }
        let Some(_held) = lock(&intent.uuid) else {
            return Verdict::Skip;
        };
        let what = format!(
            "the rename of domain '{}' to '{}' (tpl-rename, pid {pid}, was killed)",
            shown(&intent.old),
            shown(&intent.new),
        );
        match intent.recover(s) {
            Ok((outcome, problems)) if problems.is_empty() => {
                let done = match outcome {
                    Outcome::Finished => "finished",
                    Outcome::RolledBack => "rolled back",
                };
                Verdict::Done(vec![(false, format!("{done} {what}"))])
            }
            Ok((_, problems)) => Verdict::Kept(vec![(
                true,
                format!(
                    "cannot fully recover {what}: {}; its journal '{path}' is kept for the next run",
                    crate::text::list(problems, "; "),
                ),
            )]),
            Err(e) => Verdict::Kept(vec![(
                true,
                format!("cannot recover {what} now: {e}; its journal '{path}' is kept for the next run"),
            )]),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    fn mv(d: &Path, from: &str, to: &str, role: Role) -> Move {
        let from = d.join(from);
        fs::write(&from, from.to_string_lossy().as_bytes()).unwrap();
        let m = fs::metadata(&from).unwrap();
        Move {
            role,
            from,
            to: d.join(to),
            dev: m.dev(),
            ino: m.ino(),
            absent: false,
            rbd: None,
        }
    }

    #[test]
    fn files_go_forward_and_back_and_only_the_very_files() {
        let d = tempfile::tempdir().unwrap();
        let intent = Intent {
            uri: "test:///default".into(),
            uuid: "u".into(),
            old: "A".into(),
            new: "B".into(),
            moves: vec![
                mv(
                    d.path(),
                    "A.qcow2",
                    "B.qcow2",
                    Role::Disk {
                        target: "vda".into(),
                    },
                ),
                mv(d.path(), "A_VARS.fd", "B_VARS.fd", Role::Nvram),
            ],
        };
        let s = Session::open("test:///default").unwrap();
        assert!(intent.move_files(&s, true, true).unwrap().is_empty());
        assert!(d.path().join("B.qcow2").exists() && !d.path().join("A.qcow2").exists());
        // Moving on again is a no-op.
        assert!(intent.move_files(&s, true, true).unwrap().is_empty());
        // Someone put another file at an old name meanwhile: that one is never moved over.
        fs::write(d.path().join("A_VARS.fd"), "someone else's").unwrap();
        let problems = intent.move_files(&s, false, false).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(d.path().join("A.qcow2").exists(), "the disk went back");
        assert_eq!(
            fs::read_to_string(d.path().join("A_VARS.fd")).unwrap(),
            "someone else's"
        );
        assert!(
            d.path().join("B_VARS.fd").exists(),
            "the NVRAM stays where it is"
        );
        // The journal form round-trips.
        let line = serde_json::to_string(&intent).unwrap();
        assert!(
            line.contains("\"role\":\"disk\",\"target\":\"vda\""),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Intent>(&line).unwrap(), intent);
    }
}

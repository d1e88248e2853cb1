//! The journal of tpl-rm: a removal's intent, synced before the first change, so that a removal killed at any point leaves either the domain whole or nothing of it once the next run of any tool has recovered it.
//!
//! The steps, in order:
//!
//! 1. the intent is journaled: the domain (URI, UUID, name), each of its own files with its
//!    device and inode, whether it has the immutable attribute, and the hidden name it is
//!    to take next to itself (`.FILE.tpl-rm-RANDOM`);
//! 2. each file loses the immutable attribute (a locked template's may have it) and is
//!    renamed to its hidden name, never over another file; the directories are synced;
//! 3. the domain is undefined (its NVRAM kept by libvirt: it is one of the files here).
//!    **This is the commit point**: from here on the removal stands;
//! 4. the hidden files are unlinked and the directories synced;
//! 5. the domain's registration in its template's metadata is dropped, its lock file
//!    removed, and the journal removed.
//!
//! Renaming first proves, before anything is lost, that every file can go: a file that
//! cannot be renamed (immutable, on a read-only mount, in a directory we may not write)
//! cannot be unlinked either, so the removal stops before the commit and puts back what
//! it changed, the domain whole. After the commit only unlinks remain, and a file cannot
//! be half unlinked.
//!
//! Recovering a dead run ([`recover_dead`], called by [`crate::cli::Ctx::recover`] whenever
//! a tool opens its connection or takes a domain's lock) decides by the commit point:
//!
//! - the domain (by UUID) is still defined: **roll back**. Each file still at its hidden
//!   name (the very file journaled: same device and inode) goes back to its own name and
//!   gets its immutable attribute back;
//! - the domain is gone: **finish**. The hidden files are unlinked, the registration
//!   dropped (when the template's lock can be had; a registration whose file is gone is
//!   harmless, and every later tpl-clone drops it anyway), the lock file removed. A file
//!   still at its own name was never hidden, so never committed to removal: it stays;
//! - libvirt cannot tell: the journal is kept for a later run.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Journal, Verdict};
use crate::dom::Dom;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{attr_unsupported, fsync_dir, is_immutable, rename_noreplace, set_immutable};
use crate::lock::DomainLock;
use crate::ownfiles::{OwnFile, OwnRbd, Role};
use crate::record::{DomainRef, Reserved};
use crate::session::Session;
use crate::text::{shown, shown_path};
use crate::volume::{Identity, Vol};

/// The journal kind, and the start of its file names.
pub const KIND: &str = "tpl-rm";

/// What a removal is about to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "IntentOnDisk")]
pub struct Intent {
    pub uri: String,
    pub uuid: String,
    pub name: String,
    /// Its own volumes: files, hidden before the commit, and RBD images, removed after it.
    pub volumes: Vec<Doomed>,
    /// The template whose metadata registers this domain's overlays (a linked clone's
    /// template), to drop the registration from once the domain is gone.
    pub template_uuid: Option<String>,
    /// A clone's fixed address, reserved in a libvirt network's DHCP: released after the
    /// commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<Reserved>,
}

/// An intent as any release wrote it: before 0.19, `files` and `images` apart.
#[derive(Deserialize)]
struct IntentOnDisk {
    uri: String,
    uuid: String,
    name: String,
    #[serde(alias = "files")]
    volumes: Vec<Doomed>,
    template_uuid: Option<String>,
    #[serde(default)]
    reserved: Option<Reserved>,
    #[serde(default)]
    images: Vec<OldImage>,
}

/// An RBD image in the intent of a release before 0.19.
#[derive(Deserialize)]
struct OldImage {
    target: String,
    pool: String,
    #[serde(default)]
    namespace: String,
    image: String,
    id: String,
    snapshot: Option<String>,
}

impl From<IntentOnDisk> for Intent {
    fn from(d: IntentOnDisk) -> Intent {
        let mut volumes = d.volumes;
        volumes.extend(d.images.into_iter().map(|i| {
            Doomed {
                role: Role::Disk { target: i.target },
                vol: Vol::Rbd(
                    tpl_ceph::ImageSpec::new(&i.pool, &i.image)
                        .in_namespace(&i.namespace)
                        .to_string(),
                ),
                hidden: None,
                id: Identity::Rbd { id: i.id },
                immutable: false,
                snapshot: i.snapshot,
            }
        }));
        Intent {
            uri: d.uri,
            uuid: d.uuid,
            name: d.name,
            volumes,
            template_uuid: d.template_uuid,
            reserved: d.reserved,
        }
    }
}

/// One own volume to remove: where it is, which volume it is (a file's device and inode,
/// an RBD image's id, when the intent was made), and what its kind needs: a file's hidden
/// name and immutable attribute, an image's template snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doomed {
    #[serde(flatten)]
    pub role: Role,
    #[serde(flatten)]
    pub vol: Vol,
    /// The hidden name a file takes next to itself before the commit; None for an RBD
    /// image, which is not touched before the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<PathBuf>,
    #[serde(flatten)]
    pub id: Identity,
    /// A file had the immutable attribute (chattr +i), which a roll-back gives back.
    #[serde(default)]
    pub immutable: bool,
    /// The template snapshot to take off an RBD image first (a locked template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A doomed file, as its steps need it.
struct DoomedFile<'a> {
    role: &'a Role,
    path: &'a Path,
    hidden: &'a Path,
    dev: u64,
    ino: u64,
    immutable: bool,
}

/// What a roll-back or a finish left undone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// What failed and may work another time: the journal is kept for it.
    pub problems: Vec<String>,
    /// Files gone from both their names (deleted by hand, their directory removed):
    /// nothing can bring them back, so nothing is kept waiting for them.
    pub lost: Vec<String>,
}

/// How a recovered removal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    RolledBack,
}

/// The hidden name a file takes while it is being removed: next to it (a rename never
/// leaves its file system), hidden, and random so that it never meets another run's.
pub fn hidden_name(path: &Path) -> PathBuf {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rand = &uuid::Uuid::new_v4().simple().to_string()[..8];
    path.with_file_name(format!(".{file}.tpl-rm-{rand}"))
}

/// Open a file to change its attributes, never through a symbolic link, and only if it is
/// the file journaled.
fn open_same(path: &Path, dev: u64, ino: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ctx("cannot open", path)?;
    let m = f.metadata().ctx("cannot stat", path)?;
    if m.dev() != dev || m.ino() != ino {
        return Err(Error::failed(
            format!("cannot remove '{}'", shown_path(path)),
            "it is not the file that was checked any more; something replaced it meanwhile",
        ));
    }
    Ok(f)
}

impl Doomed {
    /// The removal of one checked own file: its hidden name and whether it is immutable
    /// now (a file system without the attribute counts as not).
    pub fn file(f: &OwnFile) -> Result<Doomed> {
        let file = open_same(&f.path, f.dev, f.ino)?;
        let immutable = match is_immutable(&file) {
            Ok(i) => i,
            Err(e) if attr_unsupported(&e) => false,
            Err(e) => return Err(Error::io("cannot read the attributes of", &f.path, e)),
        };
        Ok(Doomed {
            role: f.role.clone(),
            vol: Vol::File(f.path.clone()),
            hidden: Some(hidden_name(&f.path)),
            id: Identity::Inode {
                dev: f.dev,
                ino: f.ino,
            },
            immutable,
            snapshot: None,
        })
    }

    /// The removal of one of domain `dom`'s RBD images: the very image (its id), not open
    /// elsewhere, with the template snapshot to take off it when it has one.
    pub fn image(dom: &Dom, r: &OwnRbd) -> Result<Doomed> {
        let cluster = dom.session.ceph.cluster_for(&r.source)?;
        let spec = crate::rbd::spec_of(&r.source);
        let err = |op: &str, e| crate::rbd::ceph_error(&format!("{op} '{spec}'"), e);
        let info = cluster.info(&spec).map_err(|e| err("read", e))?;
        let what = format!("its disk {} image '{spec}'", r.target);
        if let Some(why) = crate::rbd::open_elsewhere(cluster, &spec, &what)? {
            return Err(Error::refused(
                format!("cannot remove domain '{}'", shown(&dom.name)),
                format!("{why}; try again in a moment"),
            ));
        }
        let snap = crate::rbd::TEMPLATE_SNAPSHOT;
        let has_snap = cluster
            .snapshots(&spec)
            .map_err(|e| err("list the snapshots of", e))?
            .iter()
            .any(|x| x.name == snap);
        Ok(Doomed {
            role: Role::Disk {
                target: r.target.clone(),
            },
            vol: Vol::Rbd(spec.to_string()),
            hidden: None,
            id: Identity::Rbd { id: info.id },
            immutable: false,
            snapshot: has_snap.then(|| snap.to_string()),
        })
    }

    /// A file's steps; None for another kind of volume.
    fn as_file(&self) -> Option<DoomedFile<'_>> {
        match (&self.vol, &self.hidden, &self.id) {
            (Vol::File(path), Some(hidden), Identity::Inode { dev, ino }) => Some(DoomedFile {
                role: &self.role,
                path,
                hidden,
                dev: *dev,
                ino: *ino,
                immutable: self.immutable,
            }),
            _ => None,
        }
    }

    /// Before the commit: a file loses its immutable attribute and takes its hidden name;
    /// an image is not touched.
    fn hide(&self) -> Result<()> {
        self.as_file().map_or(Ok(()), |f| f.hide())
    }

    /// The roll-back: a file back to its own name. False when it is lost.
    fn unhide(&self) -> Result<bool> {
        self.as_file().map_or(Ok(true), |f| f.unhide())
    }

    /// After the commit: the hidden file unlinked, the image removed, each only if it is
    /// still the volume journaled.
    fn remove(&self, s: &Session) -> Result<()> {
        match (&self.vol, &self.id) {
            (Vol::Rbd(_), Identity::Rbd { id }) => remove_image(s, &self.vol, id, &self.snapshot),
            _ => self.as_file().map_or(Ok(()), |f| f.unlink()),
        }
    }

    /// Whether it is of the shape tpl-rm writes, and if not why: a file an absolute path
    /// whose hidden name is [`hidden_name`]'s, next to it, with its inode; an image a
    /// valid image name with its id. Recovery acts on nothing else.
    fn check_shape(&self) -> std::result::Result<(), String> {
        match (&self.vol, &self.id) {
            (Vol::File(path), Identity::Inode { .. }) => {
                let Some(hidden) = &self.hidden else {
                    return Err(format!("'{}' has no hidden name", shown_path(path)));
                };
                let hidden_ok = path.is_absolute()
                    && hidden.parent() == path.parent()
                    && path
                        .file_name()
                        .zip(hidden.file_name())
                        .is_some_and(|(p, h)| {
                            let (p, h) = (p.to_string_lossy(), h.to_string_lossy());
                            h.strip_prefix('.')
                                .and_then(|h| h.strip_prefix(p.as_ref()))
                                .and_then(|h| h.strip_prefix(".tpl-rm-"))
                                .is_some_and(|r| {
                                    r.len() == 8 && r.bytes().all(|b| b.is_ascii_hexdigit())
                                })
                        });
                if hidden_ok {
                    Ok(())
                } else {
                    Err(format!(
                        "'{}' is not the hidden name tpl-rm gives '{}' (.FILE.tpl-rm-RANDOM \
                         next to it)",
                        shown_path(hidden),
                        shown_path(path)
                    ))
                }
            }
            (Vol::Rbd(i), Identity::Rbd { .. }) if self.vol.is_well_formed() => {
                if self.hidden.is_some() {
                    Err(format!("the RBD image '{}' has a hidden name", shown(i)))
                } else {
                    Ok(())
                }
            }
            (Vol::Rbd(i), Identity::Rbd { .. }) => {
                Err(format!("'{}' is not an RBD image name", shown(i)))
            }
            _ => Err(format!(
                "the {} '{}' is identified as another kind of volume",
                self.vol.kind(),
                self.vol.shown()
            )),
        }
    }
}

/// Remove an RBD image if it is still the one journaled (`id`), its template snapshot
/// first. A VM that just stopped still watches it for a few seconds (30 after a kill -9):
/// removal is retried while the image is busy, for a bounded time.
fn remove_image(s: &Session, vol: &Vol, id: &str, snapshot: &Option<String>) -> Result<()> {
    use tpl_ceph::Error as E;
    let spec = vol.spec()?;
    let cluster = s.ceph.cluster()?;
    match cluster.info(&spec) {
        Ok(i) if i.id == id => {}
        Ok(_) | Err(E::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(crate::rbd::ceph_error(&format!("read '{spec}'"), e)),
    }
    let what = |op: &str, e: E| crate::rbd::ceph_error(&format!("{op} '{spec}'"), e);
    if let Some(snap) = snapshot {
        let at = spec.at(snap);
        let exists = cluster
            .snapshots(&spec)
            .map_err(|e| what("list the snapshots of", e))?
            .into_iter()
            .find(|x| &x.name == snap);
        if let Some(x) = exists {
            if x.protected {
                cluster
                    .snap_unprotect(&at)
                    .map_err(|e| what("unprotect the snapshot of", e))?;
            }
            cluster
                .snap_remove(&at)
                .map_err(|e| what("remove the snapshot of", e))?;
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        match cluster.remove(&spec) {
            Ok(()) | Err(E::NotFound { .. }) => return Ok(()),
            Err(E::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Err(e) => return Err(what("remove", e)),
        }
    }
}

impl DoomedFile<'_> {
    fn is_at(&self, p: &Path) -> bool {
        fs::symlink_metadata(p).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    /// Clear the immutable attribute and move the file to its hidden name.
    fn hide(&self) -> Result<()> {
        if self.is_at(self.hidden) {
            return Ok(());
        }
        if !self.is_at(self.path) {
            return Err(Error::failed(
                format!(
                    "cannot remove the {} '{}'",
                    self.role,
                    shown_path(self.path)
                ),
                "it is not the file that was checked any more; something replaced or moved \
                 it meanwhile",
            ));
        }
        if self.immutable {
            let f = open_same(self.path, self.dev, self.ino)?;
            set_immutable(&f, false).ctx("cannot clear the immutable attribute of", self.path)?;
        }
        rename_noreplace(self.path, self.hidden)
    }

    /// Move the file back to its own name and give it its immutable attribute back.
    /// False when it is at neither name any more: lost.
    fn unhide(&self) -> Result<bool> {
        if self.is_at(self.hidden) {
            rename_noreplace(self.hidden, self.path)?;
        } else if !self.is_at(self.path) {
            return Ok(false);
        }
        if self.immutable {
            let f = open_same(self.path, self.dev, self.ino)?;
            set_immutable(&f, true).ctx("cannot set the immutable attribute of", self.path)?;
        }
        Ok(true)
    }

    /// Unlink the hidden file, if it is still the one journaled.
    fn unlink(&self) -> Result<()> {
        if !self.is_at(self.hidden) {
            return Ok(());
        }
        match fs::remove_file(self.hidden) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // A roll-back that got as far as the attribute, then the domain went: clear it.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                let f = open_same(self.hidden, self.dev, self.ino)?;
                set_immutable(&f, false)
                    .ctx("cannot clear the immutable attribute of", self.hidden)?;
                fs::remove_file(self.hidden).ctx("cannot remove", self.hidden)
            }
            Err(e) => Err(e).ctx("cannot remove", self.hidden),
        }
    }
}

impl Intent {
    /// Journal this intent (synced) in `dir` before anything changes. The caller keeps the
    /// journal while it works and closes it when the removal is done or undone.
    pub fn journal(&self, dir: &Path) -> Result<Journal> {
        let mut j = Journal::create(dir, KIND)?;
        j.log(self)?;
        Ok(j)
    }

    /// The directories of its files.
    pub fn dirs(&self) -> BTreeSet<&Path> {
        self.volumes
            .iter()
            .filter_map(|v| v.as_file()?.path.parent())
            .collect()
    }

    /// Sync the directories; what could not be synced, for the messages. A directory
    /// that is gone holds nothing of this removal any more.
    fn sync_dirs(&self) -> Vec<String> {
        self.dirs()
            .into_iter()
            .filter_map(|d| fsync_dir(d).err())
            .filter(|e| !crate::image::is_not_found(e))
            .map(|e| e.to_string())
            .collect()
    }

    /// Step 2: every file to its hidden name, durably. The first failure ends it; the
    /// caller then rolls back with [`Intent::unhide`].
    pub fn hide(&self) -> Result<()> {
        for v in &self.volumes {
            v.hide()?;
        }
        for d in self.dirs() {
            fsync_dir(d)?;
        }
        Ok(())
    }

    /// The roll-back before the commit: every file back to its own name, immutable again
    /// where it was. Does all it can; reports what could not be undone.
    pub fn unhide(&self) -> Report {
        let mut r = Report::default();
        for v in self.volumes.iter().rev() {
            match v.unhide() {
                Ok(true) => {}
                Ok(false) => r.lost.push(format!(
                    "its {} '{}' is neither there nor at '{}' any more",
                    v.role,
                    v.vol.shown(),
                    v.hidden.as_deref().map(shown_path).unwrap_or_default()
                )),
                Err(e) => r.problems.push(e.to_string()),
            }
        }
        r.problems.extend(self.sync_dirs());
        r
    }

    /// Step 4, after the commit: unlink the hidden files, durably, and remove the RBD
    /// images. Does all it can; reports what could not be removed.
    pub fn unlink(&self, s: &Session) -> Report {
        let mut r = Report::default();
        let (files, images): (Vec<&Doomed>, Vec<&Doomed>) =
            self.volumes.iter().partition(|v| v.as_file().is_some());
        for v in files {
            if let Err(e) = v.remove(s) {
                r.problems.push(e.to_string());
            }
        }
        r.problems.extend(self.sync_dirs());
        for v in images {
            if let Err(e) = v.remove(s) {
                r.problems.push(e.to_string());
            }
        }
        if let Some(res) = &self.reserved {
            if let Err(e) = crate::dhcp::release(&s.conn, &s.uri, &res.network, &res.mac, res.ip) {
                r.problems.push(e.to_string());
            }
        }
        r
    }

    /// Whether this intent is of the shape tpl-rm writes, and if not why (see
    /// [`Doomed`]'s). Recovery acts on nothing else.
    pub fn check_shape(&self) -> std::result::Result<(), String> {
        self.volumes.iter().try_for_each(Doomed::check_shape)
    }

    /// Finish or roll back this removal after its run died, as the module says.
    pub fn recover(&self, s: &Session) -> Result<(Outcome, Report)> {
        match s.domain_exists(&self.uuid) {
            Some(true) => Ok((Outcome::RolledBack, self.unhide())),
            Some(false) => Ok((Outcome::Finished, self.unlink(s))),
            None => Err(Error::failed(
                format!(
                    "cannot tell whether domain '{}' is still defined",
                    shown(&self.name)
                ),
                format!("libvirt at '{}' does not answer", shown(&s.uri)),
            )),
        }
    }
}

/// Drop the overlays of the clone with this UUID from the template's registrations (the
/// caller holds the template's lock). Whether there were any.
pub fn drop_registration(tpl: &Dom, clone_uuid: &str) -> Result<bool> {
    drop_registrations(tpl, &[clone_uuid])
}

/// [`drop_registration`] for several clones, in one write of the template's metadata (a
/// batch of 1000 clones rewrote the template's 1000 registrations 1000 times).
pub fn drop_registrations(tpl: &Dom, clone_uuids: &[&str]) -> Result<bool> {
    let mut meta = tpl.meta()?;
    let before = meta.overlays.len();
    meta.overlays.retain(|o| {
        !clone_uuids
            .iter()
            .any(|u| o.clone_uuid.eq_ignore_ascii_case(u))
    });
    if meta.overlays.len() == before {
        return Ok(false);
    }
    tpl.set_meta(&meta)?;
    Ok(true)
}

/// The template with this UUID, if it is defined.
fn template<'s>(s: &'s Session, uuid: &str) -> Option<Dom<'s>> {
    let r = DomainRef {
        uuid: Some(uuid.to_string()),
        ..Default::default()
    };
    Dom::lookup(s, &r).ok()
}

/// Finish or roll back the removals of dead runs on this connection (only the one of
/// domain `only`, when given). `lock(uuid)` takes a domain's lock: `Some(Some(lock))`,
/// `Some(None)` when the caller holds it already, None when another tool does (that tool
/// recovers it when it takes the lock). Returns the messages for people: (warning?, text).
pub fn recover_dead(
    s: &Session,
    dir: &Path,
    only: Option<&str>,
    mut lock: impl FnMut(&str) -> Option<Option<DomainLock>>,
) -> Vec<(bool, String)> {
    super::recover_each::<Intent>(dir, KIND, |entries, pid, path| {
        // Journaled before the first change: the intent is the first line.
        let intent = &entries[0];
        if intent.uri != s.uri || only.is_some_and(|u| !u.eq_ignore_ascii_case(&intent.uuid)) {
            return Verdict::Skip;
        }
        if let Err(why) = intent.check_shape() {
            return Verdict::Kept(vec![(
                true,
                format!(
                    "kept the journal '{path}' of a dead tpl-rm: {why}; nothing in it was acted on"
                ),
            )]);
        }
        let Some(held) = lock(&intent.uuid) else {
            return Verdict::Skip;
        };
        let what = format!(
            "the removal of domain '{}' (tpl-rm, pid {pid}, was killed)",
            shown(&intent.name),
        );
        let (outcome, mut report) = match intent.recover(s) {
            Ok(r) => r,
            Err(e) => {
                return Verdict::Kept(vec![(
                    true,
                    format!(
                    "cannot recover {what} now: {e}; its journal '{path}' is kept for the next run"
                ),
                )])
            }
        };
        if outcome == Outcome::Finished {
            if let Some(t) = &intent.template_uuid {
                // Best effort, see the module: only under the template's lock.
                if let (Some(_tl), Some(tpl)) = (lock(t), template(s, t)) {
                    if let Err(e) = drop_registration(&tpl, &intent.uuid) {
                        report.problems.push(e.to_string());
                    }
                }
            }
        }
        let mut notes = Vec::new();
        if !report.lost.is_empty() {
            notes.push((
                true,
                format!(
                    "while recovering {what}: {}",
                    crate::text::list(&report.lost, "; ")
                ),
            ));
        }
        if !report.problems.is_empty() {
            notes.push((
                true,
                format!(
                    "cannot fully recover {what}: {}; its journal '{path}' is kept for the next run",
                    crate::text::list(&report.problems, "; "),
                ),
            ));
            return Verdict::Kept(notes);
        }
        notes.push(match outcome {
            Outcome::Finished => {
                if let Some(l) = &held {
                    l.remove_file();
                }
                (false, format!("finished {what}: it is gone with its files"))
            }
            Outcome::RolledBack => (
                false,
                format!("rolled back {what}: the domain is whole, its files back in place"),
            ),
        });
        Verdict::Done(notes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(v: &Doomed) -> DoomedFile<'_> {
        v.as_file().expect("a file")
    }

    fn doomed(d: &Path, name: &str, role: Role) -> Doomed {
        let path = d.join(name);
        fs::write(&path, name.as_bytes()).unwrap();
        let m = fs::metadata(&path).unwrap();
        let own = OwnFile {
            role,
            path,
            format: None,
            dev: m.dev(),
            ino: m.ino(),
        };
        Doomed::file(&own).unwrap()
    }

    fn intent(d: &Path) -> Intent {
        Intent {
            uri: "test:///default".into(),
            uuid: "6695eb01-f6a4-8304-79aa-97f2502e193f".into(),
            name: "c1".into(),
            volumes: vec![
                doomed(
                    d,
                    "c1.qcow2",
                    Role::Disk {
                        target: "vda".into(),
                    },
                ),
                doomed(d, "c1_VARS.fd", Role::Nvram),
            ],
            template_uuid: None,
            reserved: None,
        }
    }

    #[test]
    fn hidden_names_are_hidden_next_to_the_file_and_never_the_same() {
        let a = hidden_name(Path::new("/d/c1.qcow2"));
        let b = hidden_name(Path::new("/d/c1.qcow2"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/d")));
        let n = a.file_name().unwrap().to_str().unwrap();
        assert!(n.starts_with(".c1.qcow2.tpl-rm-") && n.len() == ".c1.qcow2.tpl-rm-".len() + 8);
    }

    #[test]
    fn files_hide_come_back_or_go_and_only_the_very_files() {
        let d = tempfile::tempdir().unwrap();
        let i = intent(d.path());
        i.hide().unwrap();
        for f in i.volumes.iter().map(file) {
            assert!(!f.path.exists() && f.hidden.exists());
        }
        // Hiding again (a recovery that went forward) is a no-op.
        i.hide().unwrap();
        assert_eq!(i.unhide(), Report::default());
        for f in i.volumes.iter().map(file) {
            assert!(f.path.exists() && !f.hidden.exists());
            assert_eq!(
                fs::read_to_string(f.path).unwrap(),
                f.path.file_name().unwrap().to_str().unwrap()
            );
        }
        // Someone else's file at a hidden name is never removed.
        fs::write(file(&i.volumes[0]).hidden, "someone else's").unwrap();
        i.volumes[1].hide().unwrap();
        let s = Session::open("test:///default").unwrap();
        assert_eq!(i.unlink(&s), Report::default());
        assert_eq!(
            fs::read_to_string(file(&i.volumes[0]).hidden).unwrap(),
            "someone else's"
        );
        assert!(
            file(&i.volumes[0]).path.exists(),
            "a file never hidden stays"
        );
        assert!(!file(&i.volumes[1]).hidden.exists() && !file(&i.volumes[1]).path.exists());
        // The journal form round-trips.
        let line = serde_json::to_string(&i).unwrap();
        assert!(line.contains("\"role\":\"nvram\""), "{line}");
        assert_eq!(serde_json::from_str::<Intent>(&line).unwrap(), i);
    }

    #[test]
    fn a_replaced_file_is_not_hidden() {
        let d = tempfile::tempdir().unwrap();
        let i = intent(d.path());
        // Replaced since the check (the old one kept, so its inode is not reused).
        fs::rename(file(&i.volumes[1]).path, d.path().join("old")).unwrap();
        fs::write(file(&i.volumes[1]).path, "new").unwrap();
        assert!(i.hide().is_err());
        assert!(
            file(&i.volumes[0]).hidden.exists(),
            "the first one had gone"
        );
        let r = i.unhide();
        assert!(
            r.problems.is_empty() && r.lost.len() == 1,
            "the replaced one is reported: {r:?}"
        );
        assert!(file(&i.volumes[0]).path.exists());
        assert_eq!(fs::read_to_string(file(&i.volumes[1]).path).unwrap(), "new");
    }

    #[test]
    fn recovery_rolls_back_while_the_domain_exists_and_finishes_once_it_is_gone() {
        let s = Session::open("test:///default").unwrap();
        let d = tempfile::tempdir().unwrap();
        let test = Dom::lookup(&s, &DomainRef::by_arg("test")).unwrap();
        let mut i = intent(d.path());
        i.uuid = test.uuid.clone();
        i.hide().unwrap();
        assert_eq!(
            i.recover(&s).unwrap(),
            (Outcome::RolledBack, Report::default())
        );
        assert!(i
            .volumes
            .iter()
            .map(file)
            .all(|f| f.path.exists() && !f.hidden.exists()));
        i.uuid = "00000000-0000-0000-0000-00000000abcd".into();
        i.hide().unwrap();
        assert_eq!(
            i.recover(&s).unwrap(),
            (Outcome::Finished, Report::default())
        );
        assert!(i
            .volumes
            .iter()
            .map(file)
            .all(|f| !f.path.exists() && !f.hidden.exists()));
    }

    /// A pid no process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[test]
    fn a_dead_runs_removal_is_finished_and_its_journal_and_lock_file_go() {
        let s = Session::open("test:///default").unwrap();
        let d = tempfile::tempdir().unwrap();
        let (jdir, ldir) = (d.path().join("j"), d.path().join("l"));
        fs::create_dir_all(&jdir).unwrap();
        let mut i = intent(d.path());
        i.uri = s.uri.clone();
        i.uuid = "00000000-0000-0000-0000-00000000abce".into();
        i.hide().unwrap();
        let lock = DomainLock::try_acquire(&ldir, &i.uuid, "t")
            .unwrap()
            .unwrap();
        let lock_path = lock.path.clone();
        drop(lock);
        let pid = dead_pid();
        let journal = jdir.join(format!("{KIND}-{pid}-0badf00d.journal"));
        // The intent, and a line cut short by the kill.
        fs::write(&journal, serde_json::to_string(&i).unwrap() + "\n{\"cut\":").unwrap();
        // Another connection's journal is not this one's to recover.
        let mut other = i.clone();
        other.uri = "qemu+ssh://elsewhere/system".into();
        let foreign = jdir.join(format!("{KIND}-{pid}-0ddba11a.journal"));
        fs::write(&foreign, serde_json::to_string(&other).unwrap()).unwrap();
        let notes = recover_dead(&s, &jdir, None, |u| {
            DomainLock::try_acquire(&ldir, u, "t")
                .ok()
                .flatten()
                .map(Some)
        });
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(!notes[0].0 && notes[0].1.starts_with("finished the removal"));
        assert!(i
            .volumes
            .iter()
            .map(file)
            .all(|f| !f.path.exists() && !f.hidden.exists()));
        assert!(!journal.exists() && foreign.exists());
        assert!(
            !lock_path.exists(),
            "the lock file of a domain that is gone goes"
        );
    }

    #[test]
    fn the_immutable_attribute_is_cleared_to_hide_and_given_back_to_unhide() {
        let d = tempfile::tempdir().unwrap();
        let i = intent(d.path());
        let f = File::open(file(&i.volumes[0]).path).unwrap();
        // Where the file system or the user cannot set it, there is nothing to prove.
        if set_immutable(&f, true).is_err() {
            return;
        }
        let i = Intent {
            volumes: vec![Doomed::file(&OwnFile {
                role: i.volumes[0].role.clone(),
                path: file(&i.volumes[0]).path.to_path_buf(),
                format: None,
                dev: file(&i.volumes[0]).dev,
                ino: file(&i.volumes[0]).ino,
            })
            .unwrap()],
            ..i
        };
        assert!(i.volumes[0].immutable);
        i.hide().unwrap();
        assert!(!is_immutable(&File::open(file(&i.volumes[0]).hidden).unwrap()).unwrap());
        assert_eq!(i.unhide(), Report::default());
        assert!(is_immutable(&File::open(file(&i.volumes[0]).path).unwrap()).unwrap());
        set_immutable(&File::open(file(&i.volumes[0]).path).unwrap(), false).unwrap();
    }

    /// Issue 19: the intent of a release before the one-volume shape (`files` and
    /// `images` apart, as tpl-rm 0.18 wrote it) reads as the same volumes, and is
    /// written back in the new shape, which reads again the same.
    #[test]
    fn an_intent_of_the_last_release_reads_as_volumes() {
        let old = r#"{"uri":"qemu:///system","uuid":"6695eb01-f6a4-8304-79aa-97f2502e193f","name":"c1","files":[{"role":"disk","target":"vda","path":"/var/lib/libvirt/images/c1.qcow2","hidden":"/var/lib/libvirt/images/.c1.qcow2.tpl-rm-0123abcd","dev":2049,"ino":131,"immutable":true},{"role":"nvram","path":"/var/lib/libvirt/qemu/nvram/c1_VARS.fd","hidden":"/var/lib/libvirt/qemu/nvram/.c1_VARS.fd.tpl-rm-89abcdef","dev":2049,"ino":132,"immutable":false}],"template_uuid":"00000000-0000-0000-0000-0000000000aa","images":[{"target":"vdb","pool":"tpl","namespace":"ns1","image":"c1-vdb","id":"1f2e3d4c5b6a","snapshot":"tpl"}]}"#;
        let i: Intent = serde_json::from_str(old).unwrap();
        assert_eq!(i.volumes.len(), 3);
        assert_eq!(
            i.volumes[0],
            Doomed {
                role: Role::Disk {
                    target: "vda".into()
                },
                vol: Vol::File("/var/lib/libvirt/images/c1.qcow2".into()),
                hidden: Some("/var/lib/libvirt/images/.c1.qcow2.tpl-rm-0123abcd".into()),
                id: Identity::Inode {
                    dev: 2049,
                    ino: 131
                },
                immutable: true,
                snapshot: None,
            }
        );
        assert_eq!(i.volumes[1].role, Role::Nvram);
        assert_eq!(
            i.volumes[2],
            Doomed {
                role: Role::Disk {
                    target: "vdb".into()
                },
                vol: Vol::Rbd("tpl/ns1/c1-vdb".into()),
                hidden: None,
                id: Identity::Rbd {
                    id: "1f2e3d4c5b6a".into()
                },
                immutable: false,
                snapshot: Some("tpl".into()),
            }
        );
        assert_eq!(i.check_shape(), Ok(()));
        assert_eq!(
            i.dirs().into_iter().collect::<Vec<_>>(),
            [
                Path::new("/var/lib/libvirt/images"),
                Path::new("/var/lib/libvirt/qemu/nvram")
            ]
        );
        let line = serde_json::to_string(&i).unwrap();
        assert!(
            line.contains(r#""volumes":["#) && !line.contains(r#""images""#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Intent>(&line).unwrap(), i);
    }

    #[test]
    fn a_volume_of_the_wrong_shape_is_not_acted_on() {
        let d = tempfile::tempdir().unwrap();
        let mut i = intent(d.path());
        i.volumes[0].hidden = None;
        assert!(i.check_shape().unwrap_err().contains("no hidden name"));
        let mut i = intent(d.path());
        i.volumes[0].id = Identity::Rbd { id: "x".into() };
        assert!(i.check_shape().unwrap_err().contains("another kind"));
        let mut i = intent(d.path());
        i.volumes[0].vol = Vol::Rbd("no pool".into());
        i.volumes[0].id = Identity::Rbd { id: "x".into() };
        i.volumes[0].hidden = None;
        assert!(i
            .check_shape()
            .unwrap_err()
            .contains("not an RBD image name"));
    }
}

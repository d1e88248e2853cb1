//! Freezing and thawing a domain's own volumes (tpl-lock's lock and unlock): one plan over every kind of volume, applied as one step and undone as one.
//!
//! A file is frozen by its mode, owner and immutable attribute (here); an RBD image by a
//! protected snapshot the disk is pointed at ([`crate::snapshot`]). A tool asks for a
//! [`Freeze`] of a domain's own volumes, says what it would do, applies it, and undoes
//! it if a later step of its own fails; it never names a file mode or a snapshot.

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use crate::cli::Ctx;
use crate::dom::Dom;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{attr_unsupported, is_immutable, set_immutable};
use crate::ownfiles::{OwnFile, OwnFiles};
use crate::rbd::TEMPLATE_SNAPSHOT;
use crate::session::Session;
use crate::snapshot::{self, RbdChange};
use crate::text::list;

/// The bits of a file lock and unlock change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileState {
    mode: u32,
    uid: u32,
    gid: u32,
    /// None where the file system has no immutable attribute.
    immutable: Option<bool>,
}

/// One own file, open (never through a symlink) and checked to be the file that was
/// planned, with its state before and the state it is to have.
#[derive(Debug)]
struct FileChange {
    file: File,
    path: PathBuf,
    what: String,
    before: FileState,
    after: FileState,
}

/// What freezing (lock) or thawing (unlock) a domain's own volumes takes, worked out with
/// every file open and every image's snapshots read; nothing is changed until
/// [`Freeze::apply`].
#[derive(Debug)]
pub struct Freeze<'c> {
    lock: bool,
    files: Vec<FileChange>,
    images: Vec<RbdChange<'c>>,
    /// What is frozen, in words ("disk vda 'PATH'", "disk vdb 'rbd:POOL/IMAGE' at @tpl").
    volumes: Vec<String>,
}

impl<'c> Freeze<'c> {
    /// Lock: every own file loses its write bits; root, not qemu's user, owns it (libvirt
    /// chowns an image to that user when a domain using it starts, and does not always
    /// give a backing file back: that user could chmod it writable again); qemu's user can
    /// still read it without libvirt relabelling it (its linked clones' backing chains say
    /// so); immutable when asked (`immutable`) or when it was. Every own RBD image gets a
    /// protected snapshot the disk reads. A file system without the immutable attribute
    /// is warned about when it was asked for.
    pub fn lock(
        ctx: &Ctx,
        s: &Session,
        dom: &'c Dom,
        own: &OwnFiles,
        immutable: bool,
    ) -> Result<Freeze<'c>> {
        let qemu = s.qemu_ids(&domain_type(dom)?);
        let mut unsupported = Vec::new();
        let files = plan_files(own, |f, b| {
            let mut a = *b;
            a.mode &= !0o222;
            if let Some((quid, qgid)) = qemu {
                if a.uid == quid {
                    a.uid = 0;
                }
                let readable = a.mode & 0o004 != 0 || (a.gid == qgid && a.mode & 0o040 != 0);
                if !readable {
                    a.gid = qgid;
                    a.mode |= 0o040;
                }
            }
            match b.immutable {
                None if immutable => unsupported.push(f.to_string()),
                Some(i) => a.immutable = Some(i || immutable),
                None => {}
            }
            a
        })?;
        for f in unsupported {
            ctx.warn(format!(
                "{f}: its file system does not support the immutable attribute; it is \
                 read-only by its mode only"
            ));
        }
        Ok(Freeze {
            lock: true,
            files,
            images: snapshot::plan_lock(dom, &own.rbd)?,
            volumes: own
                .files
                .iter()
                .map(ToString::to_string)
                .chain(
                    own.rbd
                        .iter()
                        .map(|r| format!("{r} at @{TEMPLATE_SNAPSHOT}")),
                )
                .collect(),
        })
    }

    /// Unlock: the owner may write every own file again (the immutable attribute goes);
    /// every own RBD disk reads its image again, and the snapshot goes unless it has
    /// clones (`--force`: it stays, protected).
    pub fn unlock(dom: &'c Dom, own: &OwnFiles) -> Result<Freeze<'c>> {
        Ok(Freeze {
            lock: false,
            files: plan_files(own, |_, b| FileState {
                mode: b.mode | 0o200,
                immutable: b.immutable.map(|_| false),
                ..*b
            })?,
            images: snapshot::plan_unlock(dom, &own.rbd)?,
            volumes: own
                .files
                .iter()
                .map(ToString::to_string)
                .chain(own.rbd.iter().map(ToString::to_string))
                .collect(),
        })
    }

    /// Whether applying it changes anything.
    pub fn changes_anything(&self) -> bool {
        self.files.iter().any(|c| c.before != c.after)
            || self.images.iter().any(RbdChange::changes_anything)
    }

    /// Whether a lock leaves every volume immutable too: only files can be, so a domain
    /// with an RBD disk, or with none, is not.
    pub fn all_immutable(&self) -> bool {
        self.images.is_empty()
            && !self.files.is_empty()
            && self.files.iter().all(|c| c.after.immutable == Some(true))
    }

    /// The snapshot a lock freezes RBD volumes at, for the template's metadata; None
    /// when the domain has no RBD volume.
    pub fn snapshot(&self) -> Option<String> {
        (!self.images.is_empty()).then(|| TEMPLATE_SNAPSHOT.to_string())
    }

    /// How a lock freezes them, in words, for the template's history.
    pub fn how(&self) -> String {
        let how = match (self.files.is_empty(), self.images.is_empty()) {
            (false, true) => "read-only (a-w)",
            (true, false) => "protected RBD snapshot",
            (false, false) => "read-only (a-w) files and protected RBD snapshot",
            (true, true) => "read-only",
        };
        format!(
            "{how}{}: {}",
            if self.all_immutable() {
                " and immutable"
            } else {
                ""
            },
            self.volumes()
        )
    }

    /// The volumes, in words ("no writable files" when there are none).
    pub fn volumes(&self) -> String {
        if self.volumes.is_empty() {
            "no writable files".to_string()
        } else {
            list(self.volumes.iter(), ", ")
        }
    }

    /// What it would change, a line each (`--dry-run`).
    pub fn describe(&self) -> Vec<String> {
        self.files
            .iter()
            .flat_map(|c| describe(&c.what, &c.before, &c.after))
            .chain(self.images.iter().flat_map(RbdChange::describe))
            .collect()
    }

    /// Apply it, saying each change on stderr. On a failure what was done is undone,
    /// and what could not be is said.
    pub fn apply(&self, ctx: &Ctx, dom: &Dom) -> Result<()> {
        for (i, c) in self.files.iter().enumerate() {
            if let Err(e) = write_state(&c.file, &c.path, &c.before, &c.after) {
                undo_files(ctx, &self.files[..=i]);
                return Err(e);
            }
            for line in describe(&c.what, &c.before, &c.after) {
                ctx.info(line);
            }
        }
        let images = if self.lock {
            snapshot::apply_lock(ctx, dom, &self.images)
        } else {
            snapshot::apply_unlock(ctx, dom, &self.images)
        };
        if let Err(e) = images {
            undo_files(ctx, &self.files);
            return Err(e);
        }
        Ok(())
    }

    /// Undo an applied freeze after a later step failed. Files are put back; RBD
    /// snapshots stay, as they are idempotent: the next lock takes them as they are, the
    /// next unlock removes them.
    pub fn undo(&self, ctx: &Ctx) {
        undo_files(ctx, &self.files);
    }
}

/// Open every own file and work out its new state with `target`; nothing changes yet.
fn plan_files(
    own: &OwnFiles,
    mut target: impl FnMut(&OwnFile, &FileState) -> FileState,
) -> Result<Vec<FileChange>> {
    own.files
        .iter()
        .map(|f| {
            let file = open_own(f)?;
            let before = read_state(&file, f)?;
            let after = target(f, &before);
            Ok(FileChange {
                file,
                path: f.path.clone(),
                what: f.to_string(),
                before,
                after,
            })
        })
        .collect()
}

fn undo_files(ctx: &Ctx, changes: &[FileChange]) {
    for c in changes.iter().rev() {
        // The state it has now is unknown after a failure halfway: read it again.
        let now = state_of(&c.file, &c.path).unwrap_or(c.after);
        if let Err(e) = write_state(&c.file, &c.path, &now, &c.before) {
            ctx.warn(format!("while undoing the change of {}: {e}", c.what));
        }
    }
}

/// The domain type (`kvm`, `qemu`) whose qemu user libvirt uses.
fn domain_type(dom: &Dom) -> Result<String> {
    Ok(dom
        .xml()?
        .root
        .attributes
        .get("type")
        .cloned()
        .unwrap_or_else(|| "kvm".into()))
}

/// Open a planned file without following a symlink put there since the check, and make
/// sure it is still the very file checked: every later change goes through this descriptor.
fn open_own(f: &OwnFile) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&f.path)
        .ctx(&format!("cannot open {}", f.role), &f.path)?;
    let m = file
        .metadata()
        .ctx(&format!("cannot stat {}", f.role), &f.path)?;
    if !m.is_file() || m.dev() != f.dev || m.ino() != f.ino {
        return Err(Error::refused(
            format!("cannot change {f}"),
            "it is not the file that was checked any more; something replaced it meanwhile",
        ));
    }
    Ok(file)
}

fn read_state(file: &File, f: &OwnFile) -> Result<FileState> {
    state_of(file, &f.path)
}

fn state_of(file: &File, path: &std::path::Path) -> Result<FileState> {
    let m = file.metadata().ctx("cannot stat", path)?;
    let immutable = match is_immutable(file) {
        Ok(i) => Some(i),
        Err(e) if attr_unsupported(&e) => None,
        Err(e) => return Err(Error::io("cannot read the attributes of", path, e)),
    };
    Ok(FileState {
        mode: m.permissions().mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        immutable,
    })
}

/// Bring a file from one state to another. An immutable file refuses every change even
/// to root: the attribute is lifted first and set last.
fn write_state(c: &File, path: &std::path::Path, from: &FileState, to: &FileState) -> Result<()> {
    if from.immutable == Some(true) {
        set_immutable(c, false).ctx("cannot clear the immutable attribute of", path)?;
    }
    if (from.uid, from.gid) != (to.uid, to.gid) {
        std::os::unix::fs::fchown(c, Some(to.uid), Some(to.gid))
            .ctx("cannot change the owner of", path)?;
    }
    // chown may clear set-id bits: the mode is set after it, always.
    c.set_permissions(Permissions::from_mode(to.mode))
        .ctx("cannot change the mode of", path)?;
    if to.immutable == Some(true) {
        set_immutable(c, true).ctx("cannot set the immutable attribute of", path)?;
    }
    Ok(())
}

/// What a change does, in words.
fn describe(what: &str, a: &FileState, b: &FileState) -> Vec<String> {
    let mut out = Vec::new();
    if a.mode != b.mode {
        out.push(format!("{what}: mode {:04o} -> {:04o}", a.mode, b.mode));
    }
    if a.uid != b.uid {
        out.push(format!("{what}: owner uid {} -> {}", a.uid, b.uid));
    }
    if a.gid != b.gid {
        out.push(format!("{what}: group gid {} -> {}", a.gid, b.gid));
    }
    match (a.immutable, b.immutable) {
        (Some(false), Some(true)) => out.push(format!("{what}: immutable attribute set")),
        (Some(true), Some(false)) => out.push(format!("{what}: immutable attribute cleared")),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownfiles::Role;

    fn own(p: &std::path::Path) -> OwnFile {
        let m = std::fs::symlink_metadata(p).unwrap();
        OwnFile {
            role: Role::Disk {
                target: "vda".into(),
            },
            path: p.to_path_buf(),
            format: None,
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    #[test]
    fn open_own_never_follows_a_symlink_nor_takes_another_file() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real.img");
        let link = d.path().join("link.img");
        std::fs::write(&real, b"x").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let f = own(&real);
        assert!(open_own(&f).is_ok());
        let mut l = f.clone();
        l.path = link;
        assert!(open_own(&l).is_err());
        // Replaced by another file since the check (the old one kept, so that its inode
        // number cannot be reused for the new one).
        std::fs::rename(&real, d.path().join("old.img")).unwrap();
        std::fs::write(&real, b"y").unwrap();
        assert_eq!(open_own(&f).unwrap_err().exit_code(), 3);
    }

    #[test]
    fn a_state_goes_and_comes_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(0o640)).unwrap();
        let f = own(&p);
        let file = open_own(&f).unwrap();
        let before = read_state(&file, &f).unwrap();
        assert_eq!(before.mode, 0o640);
        let after = FileState {
            mode: 0o440,
            ..before
        };
        write_state(&file, &p, &before, &after).unwrap();
        assert_eq!(read_state(&file, &f).unwrap().mode, 0o440);
        assert_eq!(
            describe("disk vda", &before, &after),
            ["disk vda: mode 0640 -> 0440"]
        );
        write_state(&file, &p, &after, &before).unwrap();
        assert_eq!(read_state(&file, &f).unwrap(), before);
    }
}

//! tpl-lock: make a generalized, shut-off domain a read-only, unstartable template, and `--unlock` it for maintenance when no linked clone depends on it.

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::dependents::Dependents;
use tpl_common::dom::Dom;
use tpl_common::error::{Error, IoContext, Result};
use tpl_common::fsutil::{attr_unsupported, is_immutable, set_immutable};
use tpl_common::image::writable_backing;
use tpl_common::meta::Meta;
use tpl_common::ownfiles::{OwnFile, OwnFiles};
use tpl_common::rbd::TEMPLATE_SNAPSHOT;
use tpl_common::record::{DomainRef, Record, TemplateState};
use tpl_common::session::Session;
use tpl_common::snapshot as rbd;
use tpl_common::text::{list, shown, shown_path};

const TOOL: &str = "tpl-lock";

/// Lock a template: make a shut-off, generalized libvirt domain read-only and unstartable.
///
/// Every file disk the domain writes (not cdroms, not <readonly/> or <shareable/> disks)
/// and its NVRAM file lose all write bits (chmod a-w; symlinks are never followed), are
/// owned by root rather than by libvirt's qemu user (which could otherwise make them
/// writable again), and stay readable by that user for linked clones; autostart is
/// turned off and the domain's tpl metadata says "locked". Starting the template then
/// fails with "Permission denied" instead of undoing the generalization and corrupting
/// its linked clones. Linked clones still start: qemu only reads their backing file.
///
/// A disk whose image backs onto a writable file is refused: lock that file's own
/// domain first, or flatten the image. A file another domain also uses is refused.
///
/// An RBD disk gets a protected snapshot of its image (@tpl) and is pointed at it without
/// <readonly/>, so that starting the template fails ("Block node is read-only"); its
/// linked clones are rbd clones of that snapshot. --unlock points it back and removes the
/// snapshot, and refuses while the snapshot has clones (Ceph's own list).
///
/// With no DOMAIN, the domains come as records on stdin, so it fits in a pipe:
///
///     tpl-generalize VM | tpl-lock | tpl-rename TplVM
///
/// Locking a locked template is a success that changes nothing (it puts back an owner or
/// a mode someone changed). `--unlock` gives the owner write access back for
/// maintenance, and refuses while any linked clone depends on the template's images: a
/// domain, an overlay tpl-clone registered when it made a linked clone (wherever it is),
/// or any qcow2 file in the template's or the storage pools' directories. Prints each
/// domain's record on stdout.
#[derive(Parser, Debug)]
#[command(name = TOOL, version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// The domain (name or UUID); without it, records are read from stdin
    #[arg(value_name = "DOMAIN")]
    domain: Option<String>,

    /// Make the template writable again (owner write back, immutable cleared, metadata
    /// unlocked); refused while linked clones depend on its images
    #[arg(long)]
    unlock: bool,

    /// Also set the filesystem's immutable attribute (chattr +i) on the files, so that not
    /// even root can change them by accident; a filesystem without it gets a warning
    #[arg(long, conflicts_with = "unlock")]
    immutable: bool,

    /// Lock a domain that is not generalized, or unlock one that linked clones depend on
    /// (they break if the template changes), with a warning instead of a refusal
    #[arg(long)]
    force: bool,

    /// Say what would change, and change nothing
    #[arg(short = 'n', long)]
    dry_run: bool,

    #[command(flatten)]
    common: Common,
}

pub fn main() -> ExitCode {
    cli::run::<Args>(
        TOOL,
        |a| &a.common,
        |args, ctx| {
            ctx.for_each_input(args.domain.as_deref(), |ctx, s, r| {
                if args.unlock {
                    unlock_one(ctx, s, r, args)
                } else {
                    lock_one(ctx, s, r, args)
                }
            })
        },
    )
}

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
struct Change {
    file: File,
    what: String,
    before: FileState,
    after: FileState,
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
    let m = file
        .metadata()
        .ctx(&format!("cannot stat {}", f.role), &f.path)?;
    let immutable = match is_immutable(file) {
        Ok(i) => Some(i),
        Err(e) if attr_unsupported(&e) => None,
        Err(e) => return Err(Error::io("cannot read the attributes of", &f.path, e)),
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

/// Open every own file and work out its new state with `target`; nothing changes yet.
fn plan(
    own: &OwnFiles,
    mut target: impl FnMut(&OwnFile, &FileState) -> FileState,
) -> Result<Vec<Change>> {
    own.files
        .iter()
        .map(|f| {
            let file = open_own(f)?;
            let before = read_state(&file, f)?;
            let after = target(f, &before);
            Ok(Change {
                file,
                what: f.to_string(),
                before,
                after,
            })
        })
        .collect()
}

/// Apply the changes in order; on a failure put back those made, and say what could not be.
fn apply(ctx: &Ctx, changes: &[Change], own: &OwnFiles) -> Result<()> {
    for (i, c) in changes.iter().enumerate() {
        let path = &own.files[i].path;
        if let Err(e) = write_state(&c.file, path, &c.before, &c.after) {
            undo(ctx, &changes[..=i], own);
            return Err(e);
        }
        for line in describe(&c.what, &c.before, &c.after) {
            ctx.info(line);
        }
    }
    Ok(())
}

fn undo(ctx: &Ctx, changes: &[Change], own: &OwnFiles) {
    for (i, c) in changes.iter().enumerate().rev() {
        // The state it has now is unknown after a failure halfway: read it again.
        let now = read_state(&c.file, &own.files[i]).unwrap_or(c.after);
        if let Err(e) = write_state(&c.file, &own.files[i].path, &now, &c.before) {
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

/// Refuse a disk whose image backs onto a writable file: locking the domain's own files
/// would leave what every linked clone reads changeable. Such a base is not this
/// domain's own (it may be another domain's, or shared by several), so tpl-lock does not
/// lock it: an unlock could not know who else relies on it. A base that is already
/// read-only (another locked template's image) is fine: templates can stack.
fn check_chain(dom: &Dom, own: &OwnFiles) -> Result<()> {
    for f in own.disks() {
        if let Some(base) = writable_backing(&f.path)? {
            return Err(Error::refused(
                format!("cannot lock domain '{}'", shown(&dom.name)),
                format!(
                    "its {f} is an overlay on '{}', which is writable: a change to it would \
                     change the template and corrupt every linked clone; lock the domain that \
                     owns that image first (tpl-lock), or make the disk one standalone image \
                     while the domain is shut off: qemu-img rebase -f qcow2 -b '' '{}'",
                    shown_path(&base),
                    shown_path(&f.path)
                ),
            ));
        }
    }
    Ok(())
}

fn lock_one(ctx: &mut Ctx, s: &Session, r: &DomainRef, args: &Args) -> Result<Record> {
    let mut dom = Dom::lookup(s, r)?;
    let _held = ctx.lock(&mut dom)?;
    dom.require_shut_off("lock")?;
    let meta = dom.meta()?;
    check_generalized(ctx, &dom, &meta, args.force)?;
    let own = dom.own_files("lock")?;
    if let Some(note) = own.missing_nvram_note(&dom.name) {
        ctx.warn(note);
    }
    let others = dom.others()?;
    own.check_not_shared(&dom.name, "lock", others.iter().map(|o| &o.files))?;
    check_chain(&dom, &own)?;
    let changes = plan_lock_files(ctx, s, &dom, &own, args.immutable)?;
    let rbd_changes = rbd::plan_lock(&dom, &own.rbd)?;
    let all_immutable = own.rbd.is_empty()
        && !changes.is_empty()
        && changes.iter().all(|c| c.after.immutable == Some(true));
    let autostart = dom.dom.autostart().map_err(|e| {
        Error::libvirt(
            format!("cannot read the autostart of domain '{}'", shown(&dom.name)),
            e,
        )
    })?;
    let mut new_meta = meta.clone();
    new_meta.template = TemplateState {
        locked: true,
        locked_at: meta
            .template
            .locked_at
            .clone()
            .filter(|_| meta.template.locked)
            .or_else(|| Some(tpl_common::now_rfc3339())),
        immutable: all_immutable,
        snapshot: (!own.rbd.is_empty()).then(|| TEMPLATE_SNAPSHOT.to_string()),
        ..meta.template.clone()
    };
    let changing = changes.iter().any(|c| c.before != c.after)
        || rbd_changes.iter().any(rbd::RbdChange::changes_anything)
        || autostart;
    if !changing && new_meta.template == meta.template {
        ctx.info(format!(
            "domain '{}' is already locked; nothing to do",
            shown(&dom.name)
        ));
        return dom.describe();
    }
    if args.dry_run {
        ctx.info(format!("would lock domain '{}'", shown(&dom.name)));
        say_would(ctx, &changes, &rbd_changes);
        if autostart {
            ctx.info("would turn autostart off");
        }
        return dom.describe();
    }
    apply(ctx, &changes, &own)?;
    if let Err(e) = rbd::apply_lock(ctx, &dom, &rbd_changes) {
        undo(ctx, &changes, &own);
        return Err(e);
    }
    // Files lose their write bits; RBD images get a protected snapshot that clones use.
    let how = match (own.files.is_empty(), own.rbd.is_empty()) {
        (false, true) => "read-only (a-w)",
        (true, false) => "protected RBD snapshot",
        (false, false) => "read-only (a-w) files and protected RBD snapshot",
        (true, true) => "read-only",
    };
    let detail = format!(
        "locked: {how}{}: {}",
        if all_immutable { " and immutable" } else { "" },
        if own.files.is_empty() && own.rbd.is_empty() {
            "no writable files".to_string()
        } else {
            list(
                own.files.iter().map(ToString::to_string).chain(
                    own.rbd
                        .iter()
                        .map(|r| format!("{r} at @{TEMPLATE_SNAPSHOT}")),
                ),
                ", ",
            )
        }
    );
    if let Err(e) = finish_lock(ctx, &dom, autostart, new_meta, detail) {
        // The RBD snapshots stay: the next lock takes them as they are, an unlock removes them.
        undo(ctx, &changes, &own);
        return Err(e);
    }
    ctx.info(format!("locked domain '{}'", shown(&dom.name)));
    dom.describe()
}

/// The new state of each own file: no write bits; root, not qemu's user, owns it (libvirt
/// chowns an image to that user when a domain using it starts, and does not always give
/// a backing file back: that user could chmod it writable again); qemu's user can still
/// read it without libvirt relabelling it (its linked clones' backing chains say so);
/// immutable when asked or when it was.
fn plan_lock_files(
    ctx: &Ctx,
    s: &Session,
    dom: &Dom,
    own: &OwnFiles,
    immutable: bool,
) -> Result<Vec<Change>> {
    let qemu = s.qemu_ids(&domain_type(dom)?);
    let mut unsupported = Vec::new();
    let changes = plan(own, |f, b| {
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
            "{f}: its file system does not support the immutable attribute; it is read-only \
             by its mode only"
        ));
    }
    Ok(changes)
}

/// `--dry-run`: what would change.
fn say_would(ctx: &Ctx, changes: &[Change], rbd_changes: &[rbd::RbdChange]) {
    for c in changes {
        for line in describe(&c.what, &c.before, &c.after) {
            ctx.info(format!("would change {line}"));
        }
    }
    for c in rbd_changes {
        for line in c.describe() {
            ctx.info(format!("would change {line}"));
        }
    }
}

/// Autostart off, and the metadata saying "locked", with the step in the history.
fn finish_lock(
    ctx: &Ctx,
    dom: &Dom,
    autostart: bool,
    mut meta: Meta,
    detail: String,
) -> Result<()> {
    if autostart {
        dom.dom.set_autostart(false).map_err(|e| {
            Error::libvirt(
                format!("cannot turn off autostart of domain '{}'", shown(&dom.name)),
                e,
            )
        })?;
        ctx.info(format!(
            "domain '{}': autostart turned off",
            shown(&dom.name)
        ));
    }
    meta.record_step(TOOL, detail);
    let res = dom.set_meta(&meta);
    if res.is_err() && autostart {
        let _ = dom.dom.set_autostart(true);
    }
    res
}

/// An already locked template passed (or forced) this check when it was locked.
fn check_generalized(ctx: &Ctx, dom: &Dom, meta: &Meta, force: bool) -> Result<()> {
    if meta.template.generalized.is_some() || meta.template.locked {
        return Ok(());
    }
    if !force {
        return Err(Error::refused(
            format!("cannot lock domain '{}'", shown(&dom.name)),
            format!(
                "it is not generalized, so every clone would share its identity; run \
                 tpl-generalize {} first, or pass --force if you sealed it yourself",
                shown(&dom.name)
            ),
        ));
    }
    ctx.warn(format!(
        "domain '{}' is not generalized; locking it anyway (--force)",
        shown(&dom.name)
    ));
    Ok(())
}

fn unlock_one(ctx: &mut Ctx, s: &Session, r: &DomainRef, args: &Args) -> Result<Record> {
    let mut dom = Dom::lookup(s, r)?;
    let _held = ctx.lock(&mut dom)?;
    dom.require_shut_off("unlock")?;
    let meta = dom.meta()?;
    let own = dom.own_files("unlock")?;
    let others = dom.others()?;
    own.check_not_shared(&dom.name, "unlock", others.iter().map(|o| &o.files))?;
    let deps = dom.dependents_of(&own, &others, &meta.overlays)?;
    check_no_dependents(ctx, &dom, &deps, args.force)?;
    let changes = plan(&own, |_, b| FileState {
        mode: b.mode | 0o200,
        immutable: b.immutable.map(|_| false),
        ..*b
    })?;
    let rbd_changes = rbd::plan_unlock(&dom, &own.rbd)?;
    let mut new_meta = meta.clone();
    new_meta.template.locked = false;
    new_meta.template.locked_at = None;
    new_meta.template.immutable = false;
    new_meta.template.snapshot = None;
    // Registrations of overlays that are gone are of no use any more.
    new_meta.overlays.retain(|o| o.path.exists());
    let changing = changes.iter().any(|c| c.before != c.after)
        || rbd_changes.iter().any(rbd::RbdChange::changes_anything);
    if !changing && new_meta == meta {
        ctx.info(format!(
            "domain '{}' is not locked; nothing to do",
            shown(&dom.name)
        ));
        return dom.describe();
    }
    if args.dry_run {
        ctx.info(format!("would unlock domain '{}'", shown(&dom.name)));
        say_would(ctx, &changes, &rbd_changes);
        return dom.describe();
    }
    apply(ctx, &changes, &own)?;
    let res = rbd::apply_unlock(ctx, &dom, &rbd_changes).and_then(|()| {
        new_meta.record_step(
            TOOL,
            format!(
                "unlocked{}: owner writes {}",
                if deps.list.is_empty() {
                    ""
                } else {
                    " (forced past linked clones)"
                },
                list(
                    own.files
                        .iter()
                        .map(ToString::to_string)
                        .chain(own.rbd.iter().map(ToString::to_string)),
                    ", "
                )
            ),
        );
        dom.set_meta(&new_meta)
    });
    if let Err(e) = res {
        undo(ctx, &changes, &own);
        return Err(e);
    }
    ctx.info(format!(
        "unlocked domain '{0}'; lock it again with 'tpl-lock {0}' when the maintenance is done",
        shown(&dom.name)
    ));
    dom.describe()
}

/// Refuse (or with --force, warn) while anything depends on the template's images.
fn check_no_dependents(ctx: &Ctx, dom: &Dom, deps: &Dependents, force: bool) -> Result<()> {
    if deps.list.is_empty() {
        return Ok(());
    }
    let names = list(deps.list.iter(), "; ");
    if !force {
        return Err(Error::refused(
            format!("cannot unlock domain '{}'", shown(&dom.name)),
            format!(
                "{} on its images: {names}; a change to the template \
                 would corrupt them: remove them (or flatten them with 'qemu-img rebase', \
                 'virsh blockpull' or 'rbd flatten') first, or pass --force ({})",
                deps.depend(),
                deps.looked
            ),
        ));
    }
    ctx.warn(format!(
        "unlocking domain '{}' although {} on its images (--force); \
         any write to the template's files corrupts them (RBD clones keep reading their \
         snapshot, which stays): {names}",
        shown(&dom.name),
        deps.depend()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpl_common::ownfiles::Role;

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

//! tpl-lock: make a generalized, shut-off domain a read-only, unstartable template, and `--unlock` it for maintenance when no linked clone depends on it.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::error::{Error, IoContext, Result};
use tpl_common::record::{DomainRef, Record, TemplateState};
use tpl_common::session::{Dom, Session};

pub mod fsattr;

const TOOL: &str = "tpl-lock";

/// Lock a template: make a shut-off, generalized libvirt domain read-only and unstartable.
///
/// Every file disk the domain writes (not cdroms, not <readonly/> or <shareable/> disks)
/// and its NVRAM file lose all write bits (chmod a-w; symlinks are never followed);
/// autostart is turned off and the domain's tpl metadata says "locked". libvirt's qemu
/// runs as an unprivileged user, so starting the template then fails with "Permission
/// denied" instead of undoing the generalization and corrupting its linked clones.
/// Linked clones still start: qemu only reads their backing file.
///
/// With no DOMAIN, the domains come as records on stdin, so it fits in a pipe:
///
///     tpl-generalize VM | tpl-lock | tpl-rename TplVM
///
/// Locking a locked template is a success that changes nothing. `--unlock` gives the
/// owner write access back for maintenance, and refuses while any linked clone (a
/// domain, or any qcow2 file in the template's or the storage pools' directories)
/// depends on the template's images. Prints each domain's record on stdout.
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

/// One file lock makes read-only: a disk image or the NVRAM.
#[derive(Debug, Clone)]
struct Target {
    /// How messages name it: `disk vda` or `NVRAM`.
    what: String,
    path: PathBuf,
    is_disk: bool,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} '{}'", self.what, self.path.display())
    }
}

/// The files of the domain that lock covers, every one checked before anything changes:
/// a symlink, a non-regular file or a disk that is not a file refuses the whole domain.
fn plan(ctx: &Ctx, dom: &Dom, action: &str) -> Result<Vec<Target>> {
    let x = dom.xml()?;
    let refuse =
        |why: String| Error::refused(format!("cannot {action} domain '{}'", dom.name), why);
    let mut targets = Vec::new();
    for d in x.disks().into_iter().filter(|d| d.is_writable()) {
        match (d.kind.as_str(), &d.path) {
            ("file", Some(p)) => targets.push(Target {
                what: format!("disk {}", d.target),
                path: p.clone(),
                is_disk: true,
            }),
            // A file disk with no source (an empty floppy) has nothing to lock.
            ("file", None) => {}
            (kind, path) => {
                let src = path
                    .as_ref()
                    .map(|p| format!(" '{}'", p.display()))
                    .unwrap_or_default();
                return Err(refuse(format!(
                    "disk {} is a {kind} disk{src}, and tpl-lock supports only file-backed disks \
                     yet; detach it, or make it read-only yourself and mark it <readonly/> \
                     in the definition",
                    d.target
                )));
            }
        }
    }
    if let Some(why) = x.nvram_not_a_file() {
        return Err(refuse(format!(
            "{why}, and tpl-lock supports only an NVRAM file yet"
        )));
    }
    if let Some(nv) = x.nvram() {
        match std::fs::symlink_metadata(&nv) {
            // libvirt creates a missing NVRAM from its template at the first start, which
            // the read-only disks already prevent.
            Err(e) if e.kind() == io::ErrorKind::NotFound => ctx.warn(format!(
                "domain '{}': NVRAM file '{}' does not exist yet; nothing to {action} there",
                dom.name,
                nv.display()
            )),
            _ => targets.push(Target {
                what: "NVRAM".into(),
                path: nv,
                is_disk: false,
            }),
        }
    }
    for t in &targets {
        let meta = std::fs::symlink_metadata(&t.path).ctx(
            &format!("cannot {action} domain '{}': {}", dom.name, t.what),
            &t.path,
        )?;
        if meta.file_type().is_symlink() {
            return Err(refuse(format!(
                "{t} is a symbolic link, and tpl-lock never follows one (it would change \
                 whatever the link points to); point the domain at the real file with \
                 'virsh edit {}'",
                dom.name
            )));
        }
        if !meta.file_type().is_file() {
            return Err(refuse(format!(
                "{t} is not a regular file; only image files can be locked"
            )));
        }
    }
    Ok(targets)
}

/// Open a planned file without following a symlink put there since the check, and make
/// sure it is still a regular file: every later change goes through this descriptor.
fn open_target(t: &Target) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&t.path)
        .ctx(&format!("cannot open {}", t.what), &t.path)?;
    let meta = f
        .metadata()
        .ctx(&format!("cannot stat {}", t.what), &t.path)?;
    if !meta.is_file() {
        return Err(Error::refused(
            format!("cannot change {t}"),
            "it is no longer a regular file; something replaced it meanwhile",
        ));
    }
    Ok(f)
}

fn mode_of(f: &File, t: &Target) -> Result<u32> {
    Ok(f.metadata()
        .ctx(&format!("cannot stat {}", t.what), &t.path)?
        .permissions()
        .mode()
        & 0o7777)
}

fn chmod(f: &File, t: &Target, mode: u32) -> Result<()> {
    f.set_permissions(Permissions::from_mode(mode))
        .ctx(&format!("cannot change the mode of {}", t.what), &t.path)
}

/// What one file looked like before we changed it, to put back if a later step fails.
#[derive(Debug)]
struct Changed {
    file: File,
    target: Target,
    old_mode: u32,
    /// The immutable attribute before, when we changed it.
    old_immutable: Option<bool>,
}

/// Undo the file changes made so far; returns what could not be undone.
fn roll_back(changed: Vec<Changed>) -> Vec<String> {
    let mut problems = Vec::new();
    for c in changed.into_iter().rev() {
        // An immutable file refuses chmod: lift the attribute, restore the mode, then
        // put the attribute back as it was.
        if c.old_immutable.is_some() {
            if let Err(e) = fsattr::set_immutable(&c.file, false) {
                problems.push(format!(
                    "cannot clear the immutable attribute of {}: {e}",
                    c.target
                ));
            }
        }
        if let Err(e) = chmod(&c.file, &c.target, c.old_mode) {
            problems.push(e.to_string());
        }
        if c.old_immutable == Some(true) {
            if let Err(e) = fsattr::set_immutable(&c.file, true) {
                problems.push(format!(
                    "cannot restore the immutable attribute of {}: {e}",
                    c.target
                ));
            }
        }
    }
    problems
}

fn lock_one(ctx: &mut Ctx, s: &Session, r: &DomainRef, args: &Args) -> Result<Record> {
    let dom = Dom::lookup(s, r)?;
    dom.require_shut_off("lock")?;
    let meta = dom.meta()?;
    // An already locked template passed (or forced) this check when it was locked.
    if meta.template.generalized.is_none() && !meta.template.locked {
        if !args.force {
            return Err(Error::refused(
                format!("cannot lock domain '{}'", dom.name),
                format!(
                    "it is not generalized, so every clone would share its identity; run \
                     tpl-generalize {} first, or pass --force if you sealed it yourself",
                    dom.name
                ),
            ));
        }
        ctx.warn(format!(
            "domain '{}' is not generalized; locking it anyway (--force)",
            dom.name
        ));
    }
    let targets = plan(ctx, &dom, "lock")?;

    let mut changed = Vec::new();
    let mut autostart_was_on = false;
    let res = (|| -> Result<bool> {
        let mut all_immutable = !targets.is_empty();
        for t in &targets {
            let f = open_target(t)?;
            let old_mode = mode_of(&f, t)?;
            let was_immutable = match fsattr::is_immutable(&f) {
                Ok(i) => Some(i),
                Err(e) if fsattr::is_unsupported(&e) => None,
                Err(e) => return Err(Error::io("cannot read the attributes of", &t.path, e)),
            };
            let mut c = Changed {
                file: f,
                target: t.clone(),
                old_mode,
                old_immutable: None,
            };
            let new_mode = old_mode & !0o222;
            if new_mode != old_mode {
                // An immutable file refuses chmod even to root: lift it for the change.
                if was_immutable == Some(true) {
                    set_immutable(&c.file, t, false)?;
                    c.old_immutable = Some(true);
                }
                let r = chmod(&c.file, t, new_mode);
                if let Err(e) = r {
                    changed.push(c);
                    return Err(e);
                }
                ctx.info(format!(
                    "{t}: mode {old_mode:04o} -> {new_mode:04o} (read-only)"
                ));
            }
            let want_immutable = args.immutable || c.old_immutable == Some(true);
            let now_immutable = match was_immutable {
                None => {
                    if args.immutable {
                        ctx.warn(format!(
                            "{t}: its filesystem does not support the immutable attribute; \
                             it is read-only by its mode only"
                        ));
                    }
                    false
                }
                Some(was) => {
                    let now = c.old_immutable.map_or(was, |_| false);
                    if want_immutable && !now {
                        if let Err(e) = set_immutable(&c.file, t, true) {
                            changed.push(c);
                            return Err(e);
                        }
                        c.old_immutable.get_or_insert(false);
                        if args.immutable {
                            ctx.info(format!("{t}: immutable attribute set"));
                        }
                        true
                    } else {
                        now
                    }
                }
            };
            all_immutable &= now_immutable;
            changed.push(c);
        }
        if dom.dom.autostart().map_err(|e| {
            Error::libvirt(
                format!("cannot read the autostart of domain '{}'", dom.name),
                e,
            )
        })? {
            dom.dom.set_autostart(false).map_err(|e| {
                Error::libvirt(
                    format!("cannot turn off autostart of domain '{}'", dom.name),
                    e,
                )
            })?;
            autostart_was_on = true;
            ctx.info(format!("domain '{}': autostart turned off", dom.name));
        }
        Ok(all_immutable)
    })();

    let all_immutable = match res {
        Ok(i) => i,
        Err(e) => {
            undo_lock(ctx, &dom, changed, autostart_was_on);
            return Err(e);
        }
    };
    let files_changed = changed
        .iter()
        .any(|c| c.old_immutable.is_some() || c.old_mode & 0o222 != 0);

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
        ..meta.template.clone()
    };
    if !files_changed && !autostart_was_on && new_meta.template == meta.template {
        ctx.info(format!(
            "domain '{}' is already locked; nothing to do",
            dom.name
        ));
        return dom.describe();
    }
    let names: Vec<String> = targets.iter().map(ToString::to_string).collect();
    new_meta.record_step(
        TOOL,
        format!(
            "locked: read-only (a-w){}: {}",
            if all_immutable { " and immutable" } else { "" },
            if names.is_empty() {
                "no writable files".to_string()
            } else {
                names.join(", ")
            }
        ),
    );
    if let Err(e) = dom.set_meta(&new_meta) {
        undo_lock(ctx, &dom, changed, autostart_was_on);
        return Err(e);
    }
    ctx.info(format!("locked domain '{}'", dom.name));
    dom.describe()
}

/// Put the files and autostart back as they were after a failed lock, warning about
/// whatever cannot be.
fn undo_lock(ctx: &Ctx, dom: &Dom, changed: Vec<Changed>, autostart_was_on: bool) {
    let mut problems = roll_back(changed);
    if autostart_was_on {
        if let Err(e) = dom.dom.set_autostart(true) {
            problems.push(format!("cannot turn autostart back on: {e}"));
        }
    }
    for p in problems {
        ctx.warn(format!("while undoing the lock of '{}': {p}", dom.name));
    }
}

fn set_immutable(f: &File, t: &Target, on: bool) -> Result<()> {
    fsattr::set_immutable(f, on).map(drop).map_err(|e| {
        let what = if on {
            "cannot set the immutable attribute of"
        } else {
            "cannot clear the immutable attribute of"
        };
        Error::io(format!("{what} {}", t.what), &t.path, e)
    })
}

fn unlock_one(ctx: &mut Ctx, s: &Session, r: &DomainRef, args: &Args) -> Result<Record> {
    let dom = Dom::lookup(s, r)?;
    dom.require_shut_off("unlock")?;
    let meta = dom.meta()?;
    let targets = plan(ctx, &dom, "unlock")?;

    let images: Vec<PathBuf> = targets
        .iter()
        .filter(|t| t.is_disk)
        .map(|t| t.path.clone())
        .collect();
    let deps = dom.dependents(&images)?;
    if !deps.is_empty() {
        let list: Vec<String> = deps.iter().map(ToString::to_string).collect();
        if !args.force {
            return Err(Error::refused(
                format!("cannot unlock domain '{}'", dom.name),
                format!(
                    "linked clones depend on its images: {}; a change to the template would \
                     corrupt them: remove them (or flatten them with 'qemu-img rebase' or \
                     'virsh blockpull') first, or pass --force",
                    list.join("; ")
                ),
            ));
        }
        ctx.warn(format!(
            "unlocking domain '{}' although linked clones depend on its images (--force); \
             any write to the template corrupts them: {}",
            dom.name,
            list.join("; ")
        ));
    }

    let mut changed = Vec::new();
    let res = (|| -> Result<()> {
        for t in &targets {
            let f = open_target(t)?;
            let old_mode = mode_of(&f, t)?;
            let mut c = Changed {
                file: f,
                target: t.clone(),
                old_mode,
                old_immutable: None,
            };
            match fsattr::is_immutable(&c.file) {
                Ok(true) => {
                    set_immutable(&c.file, t, false)?;
                    c.old_immutable = Some(true);
                    ctx.info(format!("{t}: immutable attribute cleared"));
                }
                Ok(false) => {}
                Err(e) if fsattr::is_unsupported(&e) => {}
                Err(e) => return Err(Error::io("cannot read the attributes of", &t.path, e)),
            }
            let new_mode = old_mode | 0o200;
            if new_mode != old_mode {
                if let Err(e) = chmod(&c.file, t, new_mode) {
                    changed.push(c);
                    return Err(e);
                }
                ctx.info(format!(
                    "{t}: mode {old_mode:04o} -> {new_mode:04o} (owner writes)"
                ));
            }
            changed.push(c);
        }
        Ok(())
    })();
    if let Err(e) = res {
        for p in roll_back(changed) {
            ctx.warn(format!("while undoing the unlock of '{}': {p}", dom.name));
        }
        return Err(e);
    }
    let files_changed = changed
        .iter()
        .any(|c| c.old_immutable.is_some() || c.old_mode & 0o200 == 0);

    let mut new_meta = meta.clone();
    new_meta.template.locked = false;
    new_meta.template.locked_at = None;
    new_meta.template.immutable = false;
    if !files_changed && new_meta.template == meta.template {
        ctx.info(format!(
            "domain '{}' is not locked; nothing to do",
            dom.name
        ));
        return dom.describe();
    }
    let names: Vec<String> = targets.iter().map(ToString::to_string).collect();
    new_meta.record_step(
        TOOL,
        format!(
            "unlocked{}: owner writes {}",
            if deps.is_empty() {
                ""
            } else {
                " (forced past linked clones)"
            },
            names.join(", ")
        ),
    );
    if let Err(e) = dom.set_meta(&new_meta) {
        for p in roll_back(changed) {
            ctx.warn(format!("while undoing the unlock of '{}': {p}", dom.name));
        }
        return Err(e);
    }
    ctx.info(format!(
        "unlocked domain '{}'; lock it again with 'tpl-lock {}' when the maintenance is done",
        dom.name, dom.name
    ));
    dom.describe()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn target(p: &Path) -> Target {
        Target {
            what: "disk vda".into(),
            path: p.to_path_buf(),
            is_disk: true,
        }
    }

    #[test]
    fn open_target_never_follows_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real.img");
        let link = d.path().join("link.img");
        std::fs::write(&real, b"x").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(open_target(&target(&real)).is_ok());
        let e = open_target(&target(&link)).unwrap_err();
        assert!(e.to_string().contains("link.img"), "{e}");
    }

    #[test]
    fn roll_back_restores_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        std::fs::write(&p, b"x").unwrap();
        let t = target(&p);
        let f = open_target(&t).unwrap();
        chmod(&f, &t, 0o640).unwrap();
        chmod(&f, &t, 0o440).unwrap();
        let problems = roll_back(vec![Changed {
            file: f,
            target: t.clone(),
            old_mode: 0o640,
            old_immutable: None,
        }]);
        assert!(problems.is_empty(), "{problems:?}");
        let f = open_target(&t).unwrap();
        assert_eq!(mode_of(&f, &t).unwrap(), 0o640);
    }
}

//! tpl-lock: make a generalized, shut-off domain a read-only, unstartable template, and `--unlock` it for maintenance when no linked clone depends on it.

use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::dependents::Dependents;
use tpl_common::dom::Dom;
use tpl_common::error::{Error, Result};
use tpl_common::freeze::Freeze;
use tpl_common::image::writable_backing;
use tpl_common::meta::Meta;
use tpl_common::ownfiles::OwnFiles;
use tpl_common::record::{DomainRef, Record, TemplateState};
use tpl_common::session::Session;
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
    let freeze = Freeze::lock(ctx, s, &dom, &own, args.immutable)?;
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
        immutable: freeze.all_immutable(),
        snapshot: freeze.snapshot(),
        ..meta.template.clone()
    };
    let changing = freeze.changes_anything() || autostart;
    if !changing && new_meta.template == meta.template {
        ctx.info(format!(
            "domain '{}' is already locked; nothing to do",
            shown(&dom.name)
        ));
        return dom.describe();
    }
    if args.dry_run {
        ctx.info(format!("would lock domain '{}'", shown(&dom.name)));
        say_would(ctx, &freeze);
        if autostart {
            ctx.info("would turn autostart off");
        }
        return dom.describe();
    }
    freeze.apply(ctx, &dom)?;
    let detail = format!("locked: {}", freeze.how());
    if let Err(e) = finish_lock(ctx, &dom, autostart, new_meta, detail) {
        freeze.undo(ctx);
        return Err(e);
    }
    ctx.info(format!("locked domain '{}'", shown(&dom.name)));
    dom.describe()
}

/// `--dry-run`: what would change.
fn say_would(ctx: &Ctx, freeze: &Freeze) {
    for line in freeze.describe() {
        ctx.info(format!("would change {line}"));
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
    let freeze = Freeze::unlock(&dom, &own)?;
    let mut new_meta = meta.clone();
    new_meta.template.locked = false;
    new_meta.template.locked_at = None;
    new_meta.template.immutable = false;
    new_meta.template.snapshot = None;
    // Registrations of overlays that are gone are of no use any more.
    new_meta.overlays.retain(|o| o.path.exists());
    if !freeze.changes_anything() && new_meta == meta {
        ctx.info(format!(
            "domain '{}' is not locked; nothing to do",
            shown(&dom.name)
        ));
        return dom.describe();
    }
    if args.dry_run {
        ctx.info(format!("would unlock domain '{}'", shown(&dom.name)));
        say_would(ctx, &freeze);
        return dom.describe();
    }
    freeze.apply(ctx, &dom)?;
    new_meta.record_step(
        TOOL,
        format!(
            "unlocked{}: owner writes {}",
            if deps.list.is_empty() {
                ""
            } else {
                " (forced past linked clones)"
            },
            freeze.volumes()
        ),
    );
    if let Err(e) = dom.set_meta(&new_meta) {
        freeze.undo(ctx);
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

//! tpl-rm: remove domains with their own files, all or nothing and crash-safe, refusing whatever would break a linked clone.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::dependents::Dependents;
use tpl_common::dom::{Dom, OtherDomain};
use tpl_common::domxml::{disk_target, DomainXml};
use tpl_common::error::{Error, Result};
use tpl_common::image::{canonical, is_not_found, readable_chain, Dependent};
use tpl_common::journal::remove::{drop_registration, drop_registrations, Doomed, Intent};
use tpl_common::journal::Journal;
use tpl_common::lock::DomainLock;
use tpl_common::ownfiles::OwnFiles;
use tpl_common::record::{CloneMode, DiskKind, DomainRef};
use tpl_common::session::{state_of, Session};
use tpl_common::state;
use tpl_common::text::{list, shown, shown_path};
use virt::domain::DomainState;
use virt::sys;

const TOOL: &str = "tpl-rm";
/// How many clones of a batch (`--with-clones`) are removed before their registrations
/// are dropped from the template, in one write of its metadata: 1000 clones were 1000
/// rewrites of 1000 registrations each.
const UNREGISTER_BATCH: usize = 64;

/// Remove libvirt domains with their own files, and never one that a linked clone needs.
///
///     tpl-rm web1 web2                         # clones: each domain, its disk files, its NVRAM
///     tpl-rm TplOld                            # a template, once no linked clone uses it
///     tpl-rm --with-clones TplOld              # its linked clones first, then the template
///     tpl-list --clones-of TplOld | tpl-rm     # records on stdin, as from any tpl tool
///
/// A domain goes with its own files: the images of the disks it writes (a linked clone's
/// overlay, a full clone's copy, a template's image) and its NVRAM file. CD-ROMs,
/// <readonly/> and <shareable/> disks stay, and so do host files such as a serial log.
/// It refuses (exit 3) while another image uses one of the files as its backing file (a
/// linked clone, or an overlay that no domain uses, found as tpl-lock --unlock finds
/// them), while another domain names one of the files, while the domain runs (--force
/// stops it first), and while it has libvirt snapshots. A template's images need no
/// tpl-lock --unlock first: their immutable attribute is cleared here.
///
/// A linked clone's registration in its template's metadata goes with it. Each removal
/// holds the lock of the domain, and of the template whose metadata it edits, so that a
/// clone being made meanwhile cannot be orphaned (see --wait). Removal is all or nothing
/// per domain: its files are first renamed to hidden names next to them, then the domain
/// is undefined (from there on the removal stands), then the files are unlinked. A
/// failure before the undefine puts everything back; a removal killed at any point
/// (kill -9, a crash) is finished or rolled back by the next run of any tpl tool, from
/// the journal it keeps in $TPL_STATE_DIR/remove-journal (default /var/lib/tpl for root).
///
/// It removes templates and clones; an ordinary VM only with --plain. Every input is
/// read and checked before anything goes: a domain named twice is removed once, and an
/// input that names no domain here, or a record whose UUID and name are two domains
/// (made before a rename), is refused (exit 2) with nothing removed at all.
///
/// Like rm, it prints nothing for a removed domain (-v says on stderr what went), and
/// never anything on stdout. Exit status: 0, 1 failed, 2 bad usage or unknown domain,
/// 3 refused.
#[derive(Parser, Debug)]
#[command(name = TOOL, version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// The domains (names or UUIDs); without any, records are read from stdin
    #[arg(value_name = "DOMAIN")]
    domains: Vec<String>,

    /// Remove a template's linked clones first, then the template (full clones are
    /// independent copies and stay)
    #[arg(long)]
    with_clones: bool,

    /// Stop a running domain (and with --with-clones, running clones) at once, as
    /// 'virsh destroy' does, before removing it; it stays shut off should the removal then
    /// fail
    #[arg(long)]
    force: bool,

    /// Say what would be removed, and remove nothing
    #[arg(short = 'n', long)]
    dry_run: bool,

    /// Say on stderr what was removed
    #[arg(short, long)]
    verbose: bool,

    /// Also remove domains that are neither templates nor clones (ordinary VMs, which tpl
    /// did not make), with their disks; without it such a domain is refused, so that a
    /// careless pipe or a mistyped name cannot take one
    #[arg(long)]
    plain: bool,

    #[command(flatten)]
    common: Common,
}

pub fn main() -> ExitCode {
    cli::run::<Args>(TOOL, |a| &a.common, run)
}

fn run(args: &Args, ctx: &mut Ctx) -> Result<()> {
    for uuid in checked_inputs(ctx, args)? {
        ctx.intr.check()?;
        let res = ctx.session().and_then(|s| {
            let dom = Dom::lookup(&s, &by_uuid(&uuid))?;
            if !args.plain && !is_tpl_domain(&dom)? {
                return Err(Error::refused(
                    format!("cannot remove domain '{}'", shown(&dom.name)),
                    format!(
                        "it is neither a template nor a clone: an ordinary VM, which tpl did \
                         not make; 'virsh undefine' keeps its disks, so tpl-rm does not take \
                         them unless asked: tpl-rm --plain {}",
                        shown(&dom.name)
                    ),
                ));
            }
            Remover { ctx, s: &s, args }.remove(dom, &[], args.with_clones, None)
        });
        match res {
            Ok(()) => {}
            Err(e @ Error::Interrupted { .. }) => return Err(e),
            Err(e) => ctx.fail(&e),
        }
    }
    Ok(())
}

/// Every domain the arguments or the records on stdin name, each once (by UUID), read
/// and checked before anything is removed: an input that names no domain here, a record
/// of another connection or one whose UUID and name are two domains (renamed since the
/// record was made, or edited) is reported, and then nothing at all is removed (exit 2):
/// a pipe that went wrong must not take the half of it that looked right.
fn checked_inputs(ctx: &mut Ctx, args: &Args) -> Result<Vec<String>> {
    let sources: Vec<Option<&str>> = if args.domains.is_empty() {
        vec![None]
    } else {
        args.domains.iter().map(|d| Some(d.as_str())).collect()
    };
    let mut uuids: Vec<String> = Vec::new();
    let mut bad = 0;
    for src in sources {
        for r in ctx.inputs(src)? {
            ctx.intr.check()?;
            let res = r.and_then(|r| {
                let s = ctx.session()?;
                r.check_uri(&s.uri)?;
                let dom = Dom::lookup(&s, &r)?;
                match r.name.as_deref() {
                    Some(n) if r.uuid.is_some() && n != dom.name => Err(Error::usage(
                        format!(
                            "record on stdin line {} names domain '{}', but its UUID {} is \
                             domain '{}'",
                            r.line,
                            shown(n),
                            dom.uuid,
                            shown(&dom.name)
                        ),
                        "renamed since the record was made, or the record was edited; tpl-rm \
                         acts on no record that contradicts itself: name the domain you mean",
                    )),
                    _ => Ok(dom.uuid.clone()),
                }
            });
            match res {
                Ok(u) if !uuids.iter().any(|x| x.eq_ignore_ascii_case(&u)) => uuids.push(u),
                Ok(_) => {} // named twice: one removal
                Err(e @ Error::Interrupted { .. }) => return Err(e),
                Err(e) => {
                    ctx.fail(&e);
                    bad += 1;
                }
            }
        }
    }
    if bad > 0 {
        return Err(Error::usage(
            "nothing removed",
            format!(
                "{bad} of the inputs {} refused above; tpl-rm removes nothing until every \
                 input names a domain it can find",
                if bad == 1 { "was" } else { "were" }
            ),
        ));
    }
    Ok(uuids)
}

/// Whether tpl made or manages this domain: a template (generalized, locked, registering
/// the overlays of its clones) or a clone (a clone origin in its metadata, or a disk whose
/// backing chain reaches another domain's image: a linked clone made by hand, as
/// tpl-list counts it).
fn is_tpl_domain(dom: &Dom) -> Result<bool> {
    let m = dom.meta()?;
    if m.template.generalized.is_some()
        || m.template.locked
        || !m.overlays.is_empty()
        || m.clone.is_some()
    {
        return Ok(true);
    }
    let rec = dom.describe()?;
    let chain: Vec<&std::path::Path> = rec
        .disks
        .iter()
        .flat_map(|d| d.backing.iter().map(|b| b.path.as_path()))
        .collect();
    if chain.is_empty() {
        return Ok(false);
    }
    let others = dom.others()?;
    Ok(others.iter().any(|o| {
        o.files
            .disks
            .iter()
            .any(|(_, p)| chain.contains(&p.as_path()))
            || o.files.rbd.iter().any(|(_, img)| {
                chain.iter().any(|c| {
                    c.to_string_lossy()
                        .strip_prefix("rbd:")
                        .is_some_and(|r| r.split('@').next() == Some(img.as_str()))
                })
            })
    }))
}

fn by_uuid(uuid: &str) -> DomainRef {
    DomainRef {
        uuid: Some(uuid.to_string()),
        ..Default::default()
    }
}

/// One run's removals.
struct Remover<'a> {
    ctx: &'a Ctx,
    s: &'a Session,
    args: &'a Args,
}

impl Remover<'_> {
    /// What went, for -v (and what would go, for --dry-run, which always says it).
    fn say(&self, msg: String) {
        if self.args.verbose || self.args.dry_run {
            self.ctx.info(msg);
        }
    }

    /// The template whose metadata registers this domain's overlays: a linked clone's, if
    /// it is still defined.
    fn registering_template(&self, dom: &Dom) -> Result<Option<Dom<'_>>> {
        let Some(origin) = dom.meta()?.clone.filter(|c| c.mode == CloneMode::Linked) else {
            return Ok(None);
        };
        match Dom::lookup(self.s, &by_uuid(&origin.template_uuid)) {
            Ok(t) => Ok(Some(t)),
            Err(Error::Usage { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Remove one domain, all or nothing (see the module of its journal); with
    /// `with_clones`, the linked clones on it first. `held` are the domains whose locks
    /// callers up the recursion hold.
    fn remove(
        &self,
        mut dom: Dom<'_>,
        held: &[String],
        with_clones: bool,
        snap: Option<&Snapshot>,
    ) -> Result<()> {
        let uuid = dom.uuid.clone();
        // The lock order, which no two runs of tpl-rm can cross: the template whose
        // metadata is to change first, then the domain (tpl-clone holds only the
        // template's). Under the template's lock no linked clone of it is half made.
        let mut reg = self.registering_template(&dom)?;
        let _template_lock = match &mut reg {
            Some(t) if !held.iter().any(|h| h.eq_ignore_ascii_case(&t.uuid)) => {
                Some(self.ctx.lock(t)?)
            }
            _ => None,
        };
        let lock = match self.ctx.lock(&mut dom) {
            Ok(l) => l,
            Err(e) => return self.gone_meanwhile(&uuid, &dom.name, e),
        };
        let name = dom.name.clone();
        let refuse =
            |why: String| Error::refused(format!("cannot remove domain '{}'", shown(&name)), why);
        let persistent = dom
            .dom
            .is_persistent()
            .map_err(|e| Error::libvirt(format!("cannot read domain '{}'", shown(&name)), e))?;
        if !persistent {
            return Err(refuse(
                "it is a transient domain: 'virsh destroy' ends it, and there is no \
                 definition to remove"
                    .into(),
            ));
        }
        let st = dom.state()?;
        if st != DomainState::Shutoff && !self.args.force {
            return Err(refuse(format!(
                "it is {}; shut it down first (virsh shutdown {}), or pass --force to stop it \
                 at once, as 'virsh destroy' does, and remove it",
                state_of(st),
                shown(&name)
            )));
        }
        let snapshots = dom
            .dom
            .list_all_snapshots(0)
            .map_err(|e| {
                Error::libvirt(
                    format!("cannot list the snapshots of domain '{}'", shown(&name)),
                    e,
                )
            })?
            .len();
        if snapshots > 0 {
            return Err(refuse(format!(
                "it has {snapshots} libvirt snapshots, which may keep files tpl-rm does not \
                 know of; delete them first: virsh snapshot-list {0}; virsh snapshot-delete \
                 {0} SNAPSHOT",
                shown(&name)
            )));
        }
        let (own, missing) = own_files(&name, &dom.xml()?)?;
        // Another host's domain: this machine's file of the same path is not its file.
        for f in &own.files {
            dom.session
                .require_same_files(&f.path, &format!("the {f} of domain '{}'", shown(&name)))?;
        }
        let images = own.images();
        let (others, mut deps) = match snap {
            None => {
                let others = dom.others()?;
                own.check_not_shared(&name, "remove", others.iter().map(|o| &o.files))?;
                let deps = dom.dependents(&images, &others, &dom.meta()?.overlays)?;
                (others, deps)
            }
            Some(sn) => {
                sn.check_not_shared(&own, &name, &uuid)?;
                let others = sn.reaching(&images, &uuid);
                let deps = dom.dependents(&images, &others, &dom.meta()?.overlays)?;
                (others, deps)
            }
        };
        let (rbd_deps, rbd_looked) = dom.rbd_dependents(&own, &others)?;
        deps.list.extend(rbd_deps);
        deps.looked.push_str(&rbd_looked);
        if !deps.list.is_empty() && with_clones {
            self.remove_clones(&dom, &deps, &others, held)?;
            deps = if self.args.dry_run {
                // Nothing went: what the clones' removal would leave is what is not theirs.
                Dependents {
                    list: Vec::new(),
                    ..deps
                }
            } else {
                let others = dom.others()?;
                dom.dependents_of(&own, &others, &dom.meta()?.overlays)?
            };
        }
        if !deps.list.is_empty() {
            return Err(refuse(format!(
                "{} on its images: {}; removing it would break them: \
                 remove them first, or with it: tpl-rm --with-clones {} (full clones are \
                 independent and stay) ({})",
                deps.depend(),
                list(deps.list.iter(), "; "),
                shown(&name),
                deps.looked
            )));
        }
        let volumes = own
            .files
            .iter()
            .map(Doomed::file)
            .chain(own.rbd.iter().map(|r| Doomed::image(&dom, r)))
            .collect::<Result<Vec<_>>>()?;
        let what = describe(&name, &own, &missing, reg.as_ref());
        if self.args.dry_run {
            let stop = if st == DomainState::Shutoff {
                String::new()
            } else {
                format!(", stopping it first ({}, --force)", state_of(st))
            };
            self.say(format!("would remove {what}{stop}"));
            return Ok(());
        }
        if st != DomainState::Shutoff {
            dom.dom
                .destroy()
                .map_err(|e| Error::libvirt(format!("cannot stop domain '{}'", shown(&name)), e))?;
            self.say(format!("stopped domain '{}' (--force)", shown(&name)));
        }
        let intent = Intent {
            uri: self.s.uri.clone(),
            uuid: uuid.clone(),
            name: name.clone(),
            volumes,
            template_uuid: reg.as_ref().map(|t| t.uuid.clone()),
            reserved: dom.meta()?.clone.and_then(|c| c.reserved),
        };
        let journal = self.commit(&dom, &intent)?;
        // Committed: what is left cannot undo the removal, only fail to tidy up; the
        // journal stays until the end, so that a kill before then leaves the rest of it
        // to the next run.
        lock.remove_file();
        match (&reg, snap) {
            // A clone of a batch: its registration goes with those of the next clones, in
            // one write of the template's metadata; its journal stays open until then, so
            // that the recovery of a kill meanwhile drops it.
            (Some(t), Some(sn)) if t.uuid.eq_ignore_ascii_case(&sn.template_uuid) => {
                sn.unregistered
                    .borrow_mut()
                    .push((uuid.clone(), name.clone(), journal));
                if sn.unregistered.borrow().len() >= UNREGISTER_BATCH {
                    self.drop_registrations(t, sn);
                }
            }
            _ => {
                if let Some(t) = &reg {
                    if let Err(e) = drop_registration(t, &uuid) {
                        self.warn_registered(&[name.as_str()], t, &e);
                    }
                }
                if let Some(j) = journal {
                    j.close();
                }
            }
        }
        for d in intent.dirs() {
            self.s.refresh_pools_for(d);
        }
        self.say(format!("removed {what}"));
        Ok(())
    }

    /// The removal itself, journaled: hide the files, undefine the domain (the commit),
    /// unlink the files. A failure before the commit puts the files back. Returns the
    /// journal for the caller to close once it has tidied up, or None when files are
    /// left that the next run must remove (the journal stays for it).
    fn commit(&self, dom: &Dom, intent: &Intent) -> Result<Option<Journal>> {
        let journal = intent.journal(&state::remove_journal_dir())?;
        let res = (|| {
            intent.hide()?;
            self.ctx.intr.check()?;
            // Nothing can start it with its files hidden; this is only to say why.
            if dom.state()? != DomainState::Shutoff {
                return Err(Error::refused(
                    format!("cannot remove domain '{}'", shown(&intent.name)),
                    "it was started meanwhile",
                ));
            }
            dom.dom
                .undefine_flags(
                    sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
                )
                .map_err(|e| {
                    Error::libvirt(
                        format!("cannot undefine domain '{}'", shown(&intent.name)),
                        e,
                    )
                })
        })();
        if let Err(e) = res {
            let r = intent.unhide();
            if !r.lost.is_empty() {
                self.ctx.warn(format!(
                    "while putting back domain '{}': {}",
                    shown(&intent.name),
                    list(&r.lost, "; ")
                ));
            }
            if r.problems.is_empty() {
                journal.close();
                self.ctx.warn(format!(
                    "rolled back: domain '{}' stays, with its files",
                    shown(&intent.name)
                ));
            } else {
                // The journal stays (its lock goes with this process): the next tpl run
                // finishes the roll-back.
                self.ctx.warn(format!(
                    "could not put everything of domain '{}' back: {}; the next tpl run \
                     finishes it",
                    shown(&intent.name),
                    list(&r.problems, "; ")
                ));
            }
            return Err(e);
        }
        let problems = intent.unlink(self.s).problems;
        if problems.is_empty() {
            return Ok(Some(journal));
        }
        self.ctx.warn(format!(
            "domain '{}' is removed, but not all its files yet: {}; the next tpl run \
             removes them",
            shown(&intent.name),
            list(problems, "; ")
        ));
        Ok(None)
    }

    /// `--with-clones`: remove the domains among the dependents of `tpl`, each all or
    /// nothing, under the template's lock (which the caller holds). Refused up front when
    /// something else depends on it (an overlay no domain uses, a file that cannot be
    /// read), and, without --force, when a clone runs.
    fn remove_clones(
        &self,
        tpl: &Dom,
        deps: &Dependents,
        others: &[OtherDomain],
        held: &[String],
    ) -> Result<()> {
        let refuse = |why: String| {
            Error::refused(
                format!(
                    "cannot remove domain '{}' with its clones",
                    shown(&tpl.name)
                ),
                why,
            )
        };
        let loose: Vec<&Dependent> = deps
            .list
            .iter()
            .filter(|d| {
                !matches!(
                    d,
                    Dependent::Domain { .. }
                        | Dependent::RbdClone {
                            domain: Some(_),
                            ..
                        }
                )
            })
            .collect();
        if !loose.is_empty() {
            return Err(refuse(format!(
                "{} files that no domain uses depend on its images, or could not be checked: \
                 {}; tpl-rm removes domains with their own files, never a file no domain \
                 owns: remove these by hand if nothing needs them (tpl-list names orphaned \
                 overlays), then run it again ({})",
                loose.len(),
                list(loose, "; "),
                deps.looked
            )));
        }
        // Each clone once (one with two disks on the template is listed twice).
        let mut clones: Vec<&OtherDomain> = Vec::new();
        for d in &deps.list {
            let name = match d {
                Dependent::Domain { name, .. }
                | Dependent::RbdClone {
                    domain: Some(name), ..
                } => name,
                _ => continue,
            };
            if let Some(o) = others.iter().find(|o| &o.files.name == name) {
                if !clones.iter().any(|c| c.uuid == o.uuid) {
                    clones.push(o);
                }
            }
        }
        if !self.args.force {
            for c in &clones {
                let st = match Dom::lookup(self.s, &by_uuid(&c.uuid)) {
                    Ok(d) => d.state()?,
                    Err(Error::Usage { .. }) => continue,
                    Err(e) => return Err(e),
                };
                if st != DomainState::Shutoff {
                    return Err(refuse(format!(
                        "its linked clone '{}' is {}; shut it down first, or pass --force to \
                         stop the clones at once",
                        shown(&c.files.name),
                        state_of(st)
                    )));
                }
            }
        }
        let mut held = held.to_vec();
        held.push(tpl.uuid.clone());
        let snap = Snapshot::new(&tpl.uuid, others);
        for (done, c) in clones.iter().enumerate() {
            let res = self.ctx.intr.check().and_then(|()| {
                match Dom::lookup(self.s, &by_uuid(&c.uuid)) {
                    Ok(d) => self.remove(d, &held, true, Some(&snap)),
                    // Removed meanwhile: nothing left to do for it.
                    Err(Error::Usage { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            });
            snap.removed.borrow_mut().insert(c.uuid.clone());
            if res.is_err() || done + 1 == clones.len() {
                self.drop_registrations(tpl, &snap);
            }
            if let Err(e) = res {
                if done > 0 && !self.args.dry_run {
                    self.ctx.warn(format!(
                        "{done} of the {} linked clones of '{}' are removed; the template \
                         stays, with the others",
                        clones.len(),
                        shown(&tpl.name)
                    ));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Drop the registrations of the clones of a batch removed since the last time, in one
    /// write of the template's metadata, and close their journals.
    fn drop_registrations(&self, tpl: &Dom, sn: &Snapshot) {
        let done = std::mem::take(&mut *sn.unregistered.borrow_mut());
        if done.is_empty() {
            return;
        }
        let uuids: Vec<&str> = done.iter().map(|(u, ..)| u.as_str()).collect();
        if let Err(e) = drop_registrations(tpl, &uuids) {
            let names: Vec<&str> = done.iter().map(|(_, n, _)| n.as_str()).collect();
            self.warn_registered(&names, tpl, &e);
        }
        for (_, _, j) in done {
            if let Some(j) = j {
                j.close();
            }
        }
    }

    fn warn_registered(&self, names: &[&str], tpl: &Dom, e: &Error) {
        self.ctx.warn(format!(
            "{} removed, but {} in template '{}' {}: {e}; that is harmless (the files are \
             gone) and the next tpl-clone of the template drops them",
            if names.len() == 1 {
                format!("domain '{}' is", shown(names[0]))
            } else {
                format!("{} domains are", names.len())
            },
            if names.len() == 1 {
                "its registration"
            } else {
                "their registrations"
            },
            shown(&tpl.name),
            if names.len() == 1 {
                "is not"
            } else {
                "are not"
            },
        ));
    }

    /// The domain could not be locked: if it is gone (the recovery of a killed tpl-rm
    /// finished its removal while we waited), what was asked is done.
    fn gone_meanwhile(&self, uuid: &str, name: &str, e: Error) -> Result<()> {
        if self.s.domain_exists(uuid) != Some(false) {
            return Err(e);
        }
        if let Ok(Some(l)) = DomainLock::try_acquire(&state::lock_dir(), uuid, TOOL) {
            l.remove_file();
        }
        self.say(format!(
            "domain '{}' is gone already (removed meanwhile)",
            shown(name)
        ));
        Ok(())
    }
}

/// The other domains of the connection as they were when a template's lock was taken, for
/// removing its clones one after the other without reading every definition again for
/// each (500 clones: 500 reads of a definition, not 250 000). A domain defined since is
/// not in it; tpl-clone cannot make one on these clones meanwhile (it would need a clone
/// locked as a template, whose overlays it registers in the clone's metadata, which is
/// read fresh for each clone, as is the scan of its directory).
struct Snapshot {
    /// The template whose clones are removed (its lock is held).
    template_uuid: String,
    others: Vec<OtherDomain>,
    /// Each one's files, its disks' own and their backing chains', canonical; None where
    /// a chain could not be read: it may reach anything.
    reach: Vec<Option<HashSet<PathBuf>>>,
    /// Which of them name a file as a disk or NVRAM, and how, by the file's device and
    /// inode and by its canonical path (the sharing check, [`OwnFiles::check_not_shared`],
    /// without a stat and two realpaths per other domain for each clone).
    by_inode: HashMap<(u64, u64), Vec<(usize, String)>>,
    by_path: HashMap<PathBuf, Vec<(usize, String)>>,
    /// Which of them have an RBD image (`POOL/IMAGE`) as a disk, and its target.
    rbd_users: HashMap<String, Vec<(usize, String)>>,
    /// The clones removed so far: they name nothing any more.
    removed: RefCell<HashSet<String>>,
    /// The clones removed whose registrations in the template are still to drop (uuid,
    /// name), each with its journal, closed once they are.
    unregistered: RefCell<Vec<(String, String, Option<Journal>)>>,
}

impl Snapshot {
    fn new(template_uuid: &str, others: &[OtherDomain]) -> Snapshot {
        let reach = others
            .iter()
            .map(|o| {
                let mut files = HashSet::new();
                for d in o.disks.iter().filter(|d| d.kind == DiskKind::File) {
                    let Some(p) = &d.path else { continue };
                    files.insert(canonical(p));
                    if d.format.as_deref() == Some("qcow2") {
                        let (chain, err) = readable_chain(p);
                        if err.is_some_and(|e| !is_not_found(&e)) {
                            return None;
                        }
                        files.extend(chain.iter().map(|l| canonical(&l.path)));
                    }
                }
                Some(files)
            })
            .collect();
        let (mut by_inode, mut by_path, mut rbd_users) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        for (i, o) in others.iter().enumerate() {
            for (p, how) in o.files.named() {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    by_inode
                        .entry((m.dev(), m.ino()))
                        .or_insert_with(Vec::new)
                        .push((i, how.clone()));
                }
                by_path
                    .entry(canonical(p))
                    .or_insert_with(Vec::new)
                    .push((i, how));
            }
            for (t, image) in &o.files.rbd {
                rbd_users
                    .entry(image.clone())
                    .or_insert_with(Vec::new)
                    .push((i, t.clone()));
            }
        }
        Snapshot {
            template_uuid: template_uuid.to_string(),
            others: others.to_vec(),
            reach,
            by_inode,
            by_path,
            rbd_users,
            removed: RefCell::default(),
            unregistered: RefCell::default(),
        }
    }

    /// Whether the other domain `i` is still defined and is not the domain `except`.
    fn is_live(&self, i: usize, except: &str) -> bool {
        let u = &self.others[i].uuid;
        !u.eq_ignore_ascii_case(except) && !self.removed.borrow().contains(u)
    }

    fn live(&self, except: &str) -> impl Iterator<Item = (usize, &OtherDomain)> {
        let except = except.to_string();
        self.others
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.is_live(*i, &except))
    }

    /// [`OwnFiles::check_not_shared`] against the other domains still defined.
    fn check_not_shared(&self, own: &OwnFiles, name: &str, except: &str) -> Result<()> {
        let first_live = |users: Option<&Vec<(usize, String)>>| {
            users?
                .iter()
                .find(|(i, _)| self.is_live(*i, except))
                .map(|(i, how)| (self.others[*i].files.name.clone(), how.clone()))
        };
        own.check_not_shared_by(
            name,
            "remove",
            |image| first_live(self.rbd_users.get(image)),
            |f| {
                first_live(self.by_inode.get(&(f.dev, f.ino)))
                    .or_else(|| first_live(self.by_path.get(&canonical(&f.path))))
            },
        )
    }

    /// The other domains still defined whose disks are, or back onto, one of `images`, or
    /// whose chains could not be read: the only ones the dependents check needs.
    fn reaching(&self, images: &[PathBuf], except: &str) -> Vec<OtherDomain> {
        let wanted: Vec<PathBuf> = images.iter().map(|p| canonical(p)).collect();
        self.live(except)
            .filter(|(i, _)| {
                self.reach[*i]
                    .as_ref()
                    .is_none_or(|r| wanted.iter().any(|w| r.contains(w)))
            })
            .map(|(_, o)| o.clone())
            .collect()
    }
}

/// The domain's own files ([`OwnFiles::of`]), leaving out disk images that are gone
/// already (a broken clone whose overlay someone deleted must still be removable): those
/// are returned apart, with their targets, for the messages.
fn own_files(name: &str, x: &DomainXml) -> Result<(OwnFiles, Vec<(String, PathBuf)>)> {
    // Only files: a disk elsewhere (an RBD image, a block device) would be left behind
    // by the undefine, or is nothing tpl-rm may delete.
    if let Some(d) = x
        .disks()
        .into_iter()
        .find(|d| d.is_writable() && !d.kind.is_volume())
    {
        return Err(Error::refused(
            format!("cannot remove domain '{}'", shown(name)),
            format!(
                "its disk {} is a {} disk, and tpl-rm removes a domain only with all its \
                 disks, which it can do for files and RBD images alone; detach that disk \
                 first (and remove its image with the tool of its storage), then run tpl-rm \
                 again",
                d.target,
                d.kind.as_str()
            ),
        ));
    }
    let missing: Vec<(String, PathBuf)> = x
        .disks()
        .into_iter()
        .filter(|d| d.is_writable() && d.kind == DiskKind::File)
        .filter_map(|d| {
            let p = d.path?;
            let gone = matches!(fs::symlink_metadata(&p), Err(ref e) if e.kind() == io::ErrorKind::NotFound);
            gone.then_some((d.target, p))
        })
        .collect();
    if missing.is_empty() {
        return Ok((OwnFiles::of(name, x, "remove")?, missing));
    }
    let mut x = x.clone();
    if let Some(devs) = x.root.get_mut_child("devices") {
        devs.children.retain(|c| {
            !c.as_element().is_some_and(|e| {
                e.name == "disk"
                    && disk_target(e).is_some_and(|t| missing.iter().any(|(m, _)| *m == t))
            })
        });
    }
    Ok((OwnFiles::of(name, &x, "remove")?, missing))
}

/// What a removal takes away, in words.
fn describe(
    name: &str,
    own: &OwnFiles,
    missing: &[(String, PathBuf)],
    reg: Option<&Dom>,
) -> String {
    let mut out = format!("domain '{}'", shown(name));
    if own.files.is_empty() && own.rbd.is_empty() {
        out.push_str(" (it has no files of its own)");
    } else {
        out.push_str(" and its ");
        out.push_str(&list(
            own.files
                .iter()
                .map(ToString::to_string)
                .chain(own.rbd.iter().map(|r| format!("{r} (RBD image)"))),
            ", ",
        ));
    }
    if !missing.is_empty() {
        out.push_str(&format!(
            " (gone already: {})",
            list(
                missing
                    .iter()
                    .map(|(t, p)| format!("disk {t} '{}'", shown_path(p))),
                ", "
            )
        ));
    }
    if let Some(t) = reg {
        out.push_str(&format!(
            ", and its registration in template '{}'",
            shown(&t.name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a = Args::try_parse_from([TOOL, "a", "b", "--with-clones", "-n", "-v"]).unwrap();
        assert_eq!(a.domains, ["a", "b"]);
        assert!(a.with_clones && a.dry_run && a.verbose && !a.force);
        let a = Args::try_parse_from([TOOL]).unwrap();
        assert!(a.domains.is_empty(), "records come from stdin");
    }

    const XML: &str = r#"<domain type='qemu'><name>c1</name>
      <os><type>hvm</type></os>
      <devices>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='A'/><target dev='vda'/></disk>
        <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='B'/><target dev='vdb'/></disk>
        <disk type='file' device='cdrom'><source file='/nowhere/x.iso'/><target dev='sda'/><readonly/></disk>
      </devices></domain>"#;

    #[test]
    fn a_disk_image_gone_already_is_left_out_not_refused() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("c1.qcow2"), d.path().join("c1-data.img"));
        fs::write(&a, "x").unwrap();
        let x = DomainXml::parse(
            &XML.replace("'A'", &format!("'{}'", a.display()))
                .replace("'B'", &format!("'{}'", b.display())),
        )
        .unwrap();
        let (own, missing) = own_files("c1", &x).unwrap();
        assert_eq!(own.images(), std::slice::from_ref(&a));
        assert_eq!(missing, [("vdb".to_string(), b.clone())]);
        let text = describe("c1", &own, &missing, None);
        assert!(
            text.contains("disk vda") && text.contains("gone already: disk vdb"),
            "{text}"
        );
        fs::write(&b, "y").unwrap();
        let (own, missing) = own_files("c1", &x).unwrap();
        assert_eq!(own.images().len(), 2);
        assert!(missing.is_empty());
        // A writable disk that is not a file would stay behind: refused.
        let net = x.to_xml().replacen(
            "<disk type=\"file\" device=\"disk\">",
            "<disk type=\"network\" device=\"disk\">",
            1,
        );
        let e = own_files("c1", &DomainXml::parse(&net).unwrap()).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("is a network disk"), "{e}");
    }
}

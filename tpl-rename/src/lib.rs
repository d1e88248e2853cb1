//! tpl-rename: rename a shut-off domain, and with `--disks` its image and NVRAM files, all or nothing and crash-safe.

use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::dom::Dom;
use tpl_common::error::{Error, Result};
use tpl_common::journal::rename::{Intent, Move};
use tpl_common::names::validate_name;
use tpl_common::ownfiles::{renamed_file, Naming, Role};
use tpl_common::record::{DomainRef, Record};
use tpl_common::session::Session;
use tpl_common::state;
use tpl_common::text::{list, shown, shown_path};
use tpl_common::volume::Vol;

const TOOL: &str = "tpl-rename";

/// Rename a shut-off libvirt domain, like `virsh domrename`, and optionally its files.
///
/// With one name, the domains come as records on stdin (from another tpl tool), so
/// NEW_NAME usually holds `{name}`, which stands for each domain's current name:
///
///     tpl-generalize VM | tpl-lock | tpl-rename 'Tpl-{name}'
///
/// With --disks the image and NVRAM files named after the domain follow the name
/// (VM.qcow2 -> NEW.qcow2, VM-data.qcow2 -> NEW-data.qcow2, VM_VARS.fd -> NEW_VARS.fd; a
/// file named otherwise becomes NEW.EXT, or NEW-TARGET.EXT when there are several
/// disks). It is all or nothing: a failure puts everything back and says so, and a
/// rename killed at any point (kill -9, a crash) is finished or rolled back by the next
/// run of any tpl tool that touches the domain, from the journal it keeps in
/// $TPL_STATE_DIR/rename-journal (default /var/lib/tpl). It refuses while another image
/// uses one of the files as its backing file (a linked clone, even one no domain names),
/// while another domain names one of them, and it never overwrites a file.
///
/// Renaming a domain to the name it has already is a success that changes nothing.
/// Prints the renamed domain's record on stdout.
#[derive(Parser, Debug)]
#[command(name = TOOL, version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// The domain (name or UUID) and its new name; give only NEW_NAME to read records from stdin
    #[arg(value_name = "[DOMAIN] NEW_NAME", num_args = 1..=2, required = true)]
    names: Vec<String>,

    /// Also rename the domain's disk image files and NVRAM file after the new name
    /// (VM.qcow2 -> NEW.qcow2); refused while another image uses one as its backing file
    #[arg(long)]
    disks: bool,

    /// Say what would be renamed, and change nothing
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
            let (domain, pattern) = match args.names.as_slice() {
                [d, n] => (Some(d.as_str()), n.as_str()),
                [n] => (None, n.as_str()),
                _ => unreachable!("clap takes one or two names"),
            };
            ctx.for_each_input(domain, |ctx, s, r| rename_one(ctx, s, r, pattern, args))
        },
    )
}

fn rename_one(
    ctx: &mut Ctx,
    s: &Session,
    r: &DomainRef,
    pattern: &str,
    args: &Args,
) -> Result<Record> {
    let mut dom = Dom::lookup(s, r)?;
    let _held = ctx.lock(&mut dom)?;
    let old = dom.name.clone();
    let new = pattern.replace("{name}", &old);
    validate_name("new domain name", &new).map_err(|e| match e {
        Error::Usage { what, why } => Error::usage(
            format!("cannot rename domain '{}': {what}", shown(&old)),
            why,
        ),
        e => e,
    })?;
    if new == old {
        ctx.info(format!(
            "domain '{}' already has that name; nothing to do",
            shown(&old)
        ));
        return dom.describe();
    }
    dom.require_shut_off("rename")?;
    if s.name_taken(&new)? {
        return Err(Error::refused(
            format!(
                "cannot rename domain '{}' to '{}'",
                shown(&old),
                shown(&new)
            ),
            format!("a domain named '{}' already exists", shown(&new)),
        ));
    }
    let intent = if args.disks {
        Some(plan(ctx, &dom, &new)?)
    } else {
        None
    };

    if args.dry_run {
        ctx.info(format!(
            "would rename domain '{}' to '{}'",
            shown(&old),
            shown(&new)
        ));
        for m in intent.iter().flat_map(|i| &i.moves) {
            ctx.info(format!(
                "would rename {} '{}' to '{}'",
                m.role,
                m.from.shown(),
                m.to.shown()
            ));
        }
        return dom.describe();
    }

    match &intent {
        None => rename_domain(&dom, &old, &new)?,
        Some(intent) => rename_with_files(ctx, &mut dom, intent)?,
    }
    dom.refresh_name()?;
    ctx.info(format!(
        "renamed domain '{}' to '{}'",
        shown(&old),
        shown(&new)
    ));
    for m in intent.iter().flat_map(|i| &i.moves) {
        let done = if m.absent { "will make" } else { "renamed" };
        ctx.info(format!(
            "{done} {} '{}' {} '{}'",
            m.role,
            m.from.shown(),
            if m.absent { "as" } else { "to" },
            m.to.shown()
        ));
    }
    let mut meta = dom.meta()?;
    meta.record_step(
        TOOL,
        format!(
            "renamed '{old}' to '{new}'{}",
            if intent.is_some() {
                " with its files"
            } else {
                ""
            }
        ),
    );
    if let Err(e) = dom.set_meta(&meta) {
        // The rename stands; only its line in the history is missing.
        ctx.warn(format!(
            "the rename is done, but its history entry is not: {e}"
        ));
    }
    if let Some(i) = &intent {
        for dir in i.moves.iter().filter_map(|m| match &m.to {
            Vol::File(p) => p.parent(),
            Vol::Rbd(_) => None,
        }) {
            s.refresh_pools_for(dir);
        }
    }
    dom.describe()
}

fn rename_domain(dom: &Dom, old: &str, new: &str) -> Result<()> {
    dom.dom.rename(new, 0).map_err(|e| {
        Error::libvirt(
            format!("cannot rename domain '{}' to '{}'", shown(old), shown(new)),
            e,
        )
    })
}

/// Where each own file goes, all checked before anything moves.
fn plan(ctx: &Ctx, dom: &Dom, new: &str) -> Result<Intent> {
    let action = "rename the files of";
    let own = dom.own_files(action).map_err(|e| match e {
        Error::Refused { what, why } => {
            Error::refused(what, format!("{why}; or rename the domain without --disks"))
        }
        e => e,
    })?;
    let others = dom.others()?;
    own.check_not_shared(&dom.name, action, others.iter().map(|o| &o.files))?;
    let refuse = |why: String| {
        Error::refused(
            format!("cannot rename the files of domain '{}'", shown(&dom.name)),
            why,
        )
    };
    let deps = dom.dependents_of(&own, &others, &dom.meta()?.overlays)?;
    if !deps.list.is_empty() {
        return Err(refuse(format!(
            "its images are in use by {} linked clones: {} ({})",
            deps.list.len(),
            list(deps.list.iter(), "; "),
            deps.looked
        )));
    }
    let several = own.disks().count() + own.rbd.len() > 1;
    let mut moves: Vec<Move> = Vec::new();
    for f in &own.files {
        let naming = match &f.role {
            Role::Disk { target } => Naming::Disk {
                target,
                several,
                ext: None,
            },
            Role::Nvram => Naming::Nvram,
            // NAME-cidata.img, as tpl-clone names it.
            Role::Seed { .. } => Naming::Host,
        };
        let to = renamed_file(&f.path, &dom.name, new, naming);
        if to.symlink_metadata().is_ok() || moves.iter().any(|m| m.to == Vol::File(to.clone())) {
            return Err(refuse(format!(
                "'{}' already exists; nothing is ever overwritten",
                shown_path(&to)
            )));
        }
        moves.push(Move::file(f, to));
    }
    for r in &own.rbd {
        let naming = Naming::Disk {
            target: &r.target,
            several,
            ext: None,
        };
        moves.push(Move::image(dom, r, new, naming, &refuse)?);
    }
    // An NVRAM not made yet: the definition names it under the new name, or libvirt
    // would make it under the old one at the first start (and a later domain of that name
    // would share it).
    if let Some(nv) = &own.missing_nvram {
        let to = renamed_file(nv, &dom.name, new, Naming::Nvram);
        if to.symlink_metadata().is_ok() {
            return Err(refuse(format!(
                "'{}' already exists, and the renamed domain would take it for its NVRAM; \
                 nothing is ever overwritten",
                shown_path(&to)
            )));
        }
        ctx.info(format!(
            "domain '{}': its NVRAM file '{}' does not exist yet (libvirt makes it at the \
             first start); the definition will name '{}'",
            shown(&dom.name),
            shown_path(nv),
            shown_path(&to)
        ));
        moves.push(Move::absent_nvram(nv.clone(), to));
    }
    Ok(Intent {
        uri: dom.session.uri.clone(),
        uuid: dom.uuid.clone(),
        old: dom.name.clone(),
        new: new.to_string(),
        moves,
    })
}

/// The rename with its files, as the journal's module describes: journal, move, point
/// the definition at the new files, rename (the commit). A failure before the commit
/// undoes it all and says so.
fn rename_with_files(ctx: &Ctx, dom: &mut Dom, intent: &Intent) -> Result<()> {
    let journal = intent.journal(&state::rename_journal_dir())?;
    let res = (|| {
        intent.move_files(dom.session, true, true)?;
        ctx.intr.check()?;
        intent.point_definition(dom, true)?;
        ctx.intr.check()?;
        // The commit: from here on the rename stands.
        rename_domain(dom, &intent.old, &intent.new)
    })();
    let Err(e) = res else {
        journal.close();
        return Ok(());
    };
    let problems = intent.roll_back(dom);
    if problems.is_empty() {
        journal.close();
        ctx.warn(format!(
            "rolled back: domain '{}' keeps its name and its files",
            shown(&intent.old)
        ));
    } else {
        // The journal stays (its lock goes with this process): the next tpl run that
        // touches the domain finishes the roll-back.
        ctx.warn(format!(
            "could not roll back the rename of '{}' completely: {}; the next tpl run that \
             touches the domain finishes it",
            shown(&intent.old),
            list(problems, "; ")
        ));
    }
    Err(e)
}

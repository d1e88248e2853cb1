//! tpl-rename: rename a shut-off domain, and with `--disks` its image and NVRAM files, all or nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::error::{Error, Result};
use tpl_common::fsutil::{fsync_dir, rename_noreplace};
use tpl_common::names::validate_name;
use tpl_common::record::{DomainRef, Record};
use tpl_common::session::{Dom, Session};

const TOOL: &str = "tpl-rename";

/// Rename a shut-off libvirt domain, like `virsh domrename`, and optionally its files.
///
/// With one name, the domains come as records on stdin (from another tpl tool), so
/// NEW_NAME usually holds `{name}`, which stands for each domain's current name:
///
///     tpl-generalize VM | tpl-lock | tpl-rename 'Tpl-{name}'
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
    #[arg(long)]
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

/// One file to move: where it is and where it goes.
#[derive(Debug)]
struct Move {
    what: String,
    from: PathBuf,
    to: PathBuf,
}

fn rename_one(
    ctx: &mut Ctx,
    s: &Session,
    r: &DomainRef,
    pattern: &str,
    args: &Args,
) -> Result<Record> {
    let mut dom = Dom::lookup(s, r)?;
    let old = dom.name.clone();
    let new = pattern.replace("{name}", &old);
    validate_name("new domain name", &new).map_err(|e| match e {
        Error::Usage { what, why } => {
            Error::usage(format!("cannot rename domain '{old}': {what}"), why)
        }
        e => e,
    })?;
    if new == old {
        ctx.info(format!(
            "domain '{old}' already has that name; nothing to do"
        ));
        return dom.describe();
    }
    dom.require_shut_off("rename")?;
    if s.name_taken(&new)? {
        return Err(Error::refused(
            format!("cannot rename domain '{old}' to '{new}'"),
            format!("a domain named '{new}' already exists"),
        ));
    }
    let moves = if args.disks {
        plan_moves(&dom, &new)?
    } else {
        Vec::new()
    };

    if args.dry_run {
        ctx.info(format!("would rename domain '{old}' to '{new}'"));
        for m in &moves {
            ctx.info(format!(
                "would rename {} '{}' to '{}'",
                m.what,
                m.from.display(),
                m.to.display()
            ));
        }
        return dom.describe();
    }

    // Ctrl-C, a closed terminal or a broken pipe between the domain rename and the file
    // moves would leave a definition naming files that moved: they wait until the domain
    // and its files agree again, renamed or rolled back.
    let res = tpl_common::cli::uninterrupted(|| {
        let mut undo = Undo::default();
        let res = apply(ctx, &mut dom, &old, &new, &moves, &mut undo);
        if res.is_err() {
            for p in undo.roll_back(&dom, &old) {
                ctx.warn(format!("while undoing the rename of '{old}': {p}"));
            }
        }
        res
    });
    res?;
    for dir in moves.iter().filter_map(|m| m.to.parent()) {
        s.refresh_pools_for(dir);
    }
    dom.describe()
}

/// Where each writable file of the domain goes, checked before anything moves.
fn plan_moves(dom: &Dom, new: &str) -> Result<Vec<Move>> {
    let x = dom.xml()?;
    let disks: Vec<_> = x.disks().into_iter().filter(|d| d.is_writable()).collect();
    let mut moves = Vec::new();
    for d in &disks {
        if d.kind != "file" {
            return Err(Error::refused(
                format!("cannot rename the files of domain '{}'", dom.name),
                format!(
                    "disk {} is a {} disk, not a file; rename without --disks",
                    d.target, d.kind
                ),
            ));
        }
        // A file disk without a source (an empty drive) has nothing to rename.
        let Some(path) = d.path.clone() else { continue };
        let suffix = (disks.len() > 1).then_some(d.target.as_str());
        let to = renamed(&path, &dom.name, new, suffix);
        moves.push(Move {
            what: format!("disk {}", d.target),
            from: path,
            to,
        });
    }
    if let Some(why) = x.nvram_not_a_file() {
        return Err(Error::refused(
            format!("cannot rename the files of domain '{}'", dom.name),
            format!("{why}; rename without --disks"),
        ));
    }
    if let Some(nv) = x.nvram() {
        let to = renamed(&nv, &dom.name, new, None);
        moves.push(Move {
            what: "NVRAM".into(),
            from: nv,
            to,
        });
    }
    let refuse = |why: String| {
        Error::refused(
            format!("cannot rename the files of domain '{}'", dom.name),
            why,
        )
    };
    for (i, m) in moves.iter().enumerate() {
        // A file that cannot be looked at is a failure, not a refusal (exit 1, as tpl-lock).
        let meta = std::fs::symlink_metadata(&m.from).map_err(|e| {
            Error::failed(
                format!("cannot rename the files of domain '{}'", dom.name),
                format!("{} '{}': {e}", m.what, m.from.display()),
            )
        })?;
        if !meta.file_type().is_file() {
            return Err(refuse(format!(
                "{} '{}' is not a regular file (a symlink?)",
                m.what,
                m.from.display()
            )));
        }
        if m.to.symlink_metadata().is_ok() || moves[..i].iter().any(|o| o.to == m.to) {
            return Err(refuse(format!(
                "'{}' already exists; nothing is ever overwritten",
                m.to.display()
            )));
        }
    }
    let images: Vec<PathBuf> = moves
        .iter()
        .filter(|m| m.what != "NVRAM")
        .map(|m| m.from.clone())
        .collect();
    let deps = dom.dependents(&images)?;
    if !deps.is_empty() {
        let list: Vec<String> = deps.iter().map(ToString::to_string).collect();
        return Err(refuse(format!(
            "its images are in use by: {}",
            list.join("; ")
        )));
    }
    Ok(moves)
}

/// The file name after the rename: the old name in it becomes the new one
/// (`VM.qcow2` -> `NEW.qcow2`, `VM-data.qcow2` -> `NEW-data.qcow2`, `VM_VARS.fd` ->
/// `NEW_VARS.fd`); a file not named after the domain is named `NEW[-TARGET].EXT`.
fn renamed(path: &Path, old: &str, new: &str, target: Option<&str>) -> PathBuf {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match file.strip_prefix(old) {
        Some(rest) if rest.is_empty() || rest.starts_with(['.', '-', '_']) => {
            format!("{new}{rest}")
        }
        _ => {
            let ext = path
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default();
            match target {
                Some(t) => format!("{new}-{t}{ext}"),
                None => format!("{new}{ext}"),
            }
        }
    };
    path.with_file_name(name)
}

/// What has been done so far, to put back on failure.
#[derive(Debug, Default)]
struct Undo {
    renamed_domain: bool,
    moved: Vec<(PathBuf, PathBuf)>,
    old_xml: Option<tpl_common::domxml::DomainXml>,
}

impl Undo {
    /// Put everything back in reverse order; returns what could not be.
    fn roll_back(&mut self, dom: &Dom, old: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(x) = self.old_xml.take() {
            if let Err(e) = dom.redefine(&x) {
                problems.push(e.to_string());
            }
        }
        for (from, to) in self.moved.drain(..).rev() {
            if let Err(e) = rename_noreplace(&to, &from) {
                problems.push(e.to_string());
            }
        }
        if self.renamed_domain {
            if let Err(e) = dom.dom.rename(old, 0) {
                problems.push(format!("cannot rename the domain back to '{old}': {e}"));
            }
        }
        problems
    }
}

fn apply(
    ctx: &Ctx,
    dom: &mut Dom,
    old: &str,
    new: &str,
    moves: &[Move],
    undo: &mut Undo,
) -> Result<()> {
    dom.dom
        .rename(new, 0)
        .map_err(|e| Error::libvirt(format!("cannot rename domain '{old}' to '{new}'"), e))?;
    undo.renamed_domain = true;
    dom.refresh_name()?;
    ctx.info(format!("renamed domain '{old}' to '{new}'"));

    if !moves.is_empty() {
        // The definition libvirt keeps after the rename, pointed at the new files.
        let mut x = dom.xml()?;
        undo.old_xml = Some(x.clone());
        for m in moves {
            rename_noreplace(&m.from, &m.to)?;
            undo.moved.push((m.from.clone(), m.to.clone()));
            match m.what.strip_prefix("disk ") {
                Some(target) => x.set_disk_path(target, &m.to)?,
                None => x.set_nvram(&m.to)?,
            }
        }
        for dir in moves.iter().filter_map(|m| m.to.parent()) {
            fsync_dir(dir)?;
        }
        dom.redefine(&x)?;
        for m in moves {
            ctx.info(format!(
                "renamed {} '{}' to '{}'",
                m.what,
                m.from.display(),
                m.to.display()
            ));
        }
    }
    let mut meta = dom.meta()?;
    meta.record_step(TOOL, format!("renamed '{old}' to '{new}'"));
    dom.set_meta(&meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_follow_the_name() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            renamed(&p("/i/VM.qcow2"), "VM", "Tpl", None),
            p("/i/Tpl.qcow2")
        );
        assert_eq!(
            renamed(&p("/i/VM-data.qcow2"), "VM", "Tpl", Some("vdb")),
            p("/i/Tpl-data.qcow2")
        );
        assert_eq!(
            renamed(&p("/n/VM_VARS.fd"), "VM", "Tpl", None),
            p("/n/Tpl_VARS.fd")
        );
        assert_eq!(
            renamed(&p("/i/VMware.img"), "VM", "Tpl", None),
            p("/i/Tpl.img")
        );
        assert_eq!(
            renamed(&p("/i/disk.img"), "VM", "Tpl", Some("vdb")),
            p("/i/Tpl-vdb.img")
        );
    }
}

//! tpl-list: the inventory of a connection — every template with its versions, the clones that stand on it and the space they take — and the orphans, for people (a tree) and for pipes (records).

mod inventory;
mod tree;

use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::error::{Error, Result};
use tpl_common::record::{CloneMode, Record};
use tpl_common::text::{shown, shown_path};

use crate::inventory::{Inventory, Item, Role};

const TOOL: &str = "tpl-list";

/// List the templates of a connection, their versions and the clones that stand on each,
/// with the space they take; report orphans.
///
///     tpl-list                                # a tree on a terminal, records in a pipe
///     tpl-list --templates | jq -r .name      # the templates' names
///     tpl-list --clones-of TplUbuntu          # what stands on one template
///     tpl-list --clones-of TplOld | tpl-rm    # and remove it all
///
/// A template is a domain tpl-generalize or tpl-lock marked, or one whose images other
/// domains' disks back onto. Its clones are the linked clones whose disks back onto its
/// images (found from every domain's backing chain, made by tpl-clone or not) and the
/// full clones whose tpl metadata names it. Its versions are those tpl-refresh makes,
/// TEMPLATE-YYYYmmdd-HHMMSS (each titled with its version name); TEMPLATE itself is the
/// newest. Domains that are neither templates nor clones are listed with --all.
///
/// On a terminal it prints a tree: each template with its clones under it, their
/// states and the space they take (the allocated blocks of each domain's own files: its
/// writable disk images and NVRAM; a template's line adds what its linked clones take),
/// and a summary line. In a pipe, or with --json, it prints one JSON record per domain
/// in the same order: the record every tpl tool prints, with "role", "allocated",
/// "linked_allocated", "stands_on", "clones", "dependents", "version", "version_of",
/// "versions" and "problems" added (the README says what each holds). --clones-of
/// prints the records of the clones only.
///
/// Orphans are reported on stderr, one error line each, and make the exit status 1, so
/// that cron can tell: an overlay on a template's image that no domain uses (one that
/// tpl-clone registered in the template's metadata, wherever it is, or one found in the
/// template's directory or a storage pool's), a clone or template whose disk image or
/// backing file is missing, and a linked clone whose template is gone. A full clone
/// whose template is gone is not one: it stands alone. Exit status: 0; 1 orphans, or a
/// failure; 2 bad usage, or an unknown --clones-of domain.
#[derive(Parser, Debug)]
#[command(name = TOOL, version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// Only the templates
    #[arg(long, conflicts_with = "clones_of")]
    templates: bool,

    /// Only the clones that stand on TEMPLATE (name or UUID), with the template at the
    /// top of the tree (not among the records)
    #[arg(long, value_name = "TEMPLATE")]
    clones_of: Option<String>,

    /// Print JSON records even on a terminal
    #[arg(long)]
    json: bool,

    /// Also list the domains that are neither templates nor clones
    #[arg(long)]
    all: bool,

    #[command(flatten)]
    common: Common,
}

pub fn main() -> ExitCode {
    cli::run::<Args>(TOOL, |a| &a.common, run)
}

/// One line of the listing: an item and how deep in the tree it is (0 or 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    pub item: usize,
    pub depth: usize,
}

fn run(args: &Args, ctx: &mut Ctx) -> Result<()> {
    let s = ctx.session()?;
    let inv = inventory::collect(&s)?;
    let shown = view(&inv, args)?;
    let out = io::stdout();
    let tree = out.is_terminal() && !args.json;
    let text = if tree {
        tree::render(&inv, &shown, !args.templates)
    } else {
        let mut text = String::new();
        for sh in &shown {
            // The template named by --clones-of heads the tree; its records are its clones.
            if args.clones_of.is_some() && sh.depth == 0 {
                continue;
            }
            let line = serde_json::to_string(&listed(&inv.items, sh.item))
                .expect("a record always serializes");
            text.push_str(&line);
            text.push('\n');
        }
        text
    };
    let mut w = out.lock();
    match w.write_all(text.as_bytes()).and_then(|_| w.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Error::StdoutClosed),
        Err(e) => return Err(Error::io("cannot write the listing to", "stdout", e)),
    }
    drop(w);
    for w in &inv.warnings {
        ctx.warn(w);
    }
    for e in problems(&inv, &shown) {
        ctx.fail(&e);
    }
    Ok(())
}

/// How templates are ordered: by stable name, the stable one first, then its older
/// versions newest first.
fn template_key(items: &[Item], i: usize) -> (String, bool, std::cmp::Reverse<Option<String>>) {
    let it = &items[i];
    let base = it
        .version_of
        .map_or_else(|| it.name().to_string(), |s| items[s].name().to_string());
    (
        base,
        it.version_of.is_some(),
        std::cmp::Reverse(it.version.clone()),
    )
}

/// What to list, in order, as the options say. `--clones-of` names a domain that must
/// exist (exit 2 otherwise, like any unknown domain).
fn view(inv: &Inventory, args: &Args) -> Result<Vec<Shown>> {
    let items = &inv.items;
    let sorted = |role: Role, root: bool| {
        let mut v: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].role == role && (!root || items[i].parent.is_none()))
            .collect();
        v.sort_by(|&a, &b| items[a].name().cmp(items[b].name()));
        v
    };
    let mut out = Vec::new();
    let with_children = |out: &mut Vec<Shown>, t: usize| {
        out.push(Shown { item: t, depth: 0 });
        out.extend(
            items[t]
                .children
                .iter()
                .map(|&c| Shown { item: c, depth: 1 }),
        );
    };
    if let Some(want) = &args.clones_of {
        let t = items
            .iter()
            .position(|it| it.name() == want)
            .or_else(|| {
                items
                    .iter()
                    .position(|it| it.rec.uuid.eq_ignore_ascii_case(want))
            })
            .ok_or_else(|| {
                Error::usage(
                    format!("domain '{}' not found", shown(want)),
                    format!("no such domain on {}", shown(&inv_uri(items))),
                )
            })?;
        with_children(&mut out, t);
        return Ok(out);
    }
    let mut templates = sorted(Role::Template, false);
    templates.sort_by_key(|&t| template_key(items, t));
    for t in templates {
        if args.templates {
            out.push(Shown { item: t, depth: 0 });
        } else {
            with_children(&mut out, t);
        }
    }
    if !args.templates {
        out.extend(
            sorted(Role::Clone, true)
                .into_iter()
                .map(|c| Shown { item: c, depth: 0 }),
        );
        if args.all {
            for p in sorted(Role::Plain, false) {
                with_children(&mut out, p);
            }
        }
        // Every domain asked for, once: a clone whose source is not listed where the
        // clone would go under it (a full clone of a plain VM without --all, a clone of
        // a clone) stands on its own line rather than vanish.
        let mut shown = vec![false; items.len()];
        for sh in &out {
            shown[sh.item] = true;
        }
        let mut rest: Vec<usize> = (0..items.len())
            .filter(|&i| !shown[i] && (items[i].role != Role::Plain || args.all))
            .collect();
        rest.sort_by(|&a, &b| items[a].name().cmp(items[b].name()));
        out.extend(rest.into_iter().map(|i| Shown { item: i, depth: 0 }));
    }
    Ok(out)
}

fn inv_uri(items: &[Item]) -> String {
    items
        .first()
        .map(|i| i.rec.uri.clone())
        .unwrap_or_else(|| "this connection".into())
}

/// The orphans and broken domains among what is listed, one error each: what is not
/// listed is not checked (`--clones-of T` answers for T's clones, for cron per template).
fn problems(inv: &Inventory, listed: &[Shown]) -> Vec<Error> {
    let items = &inv.items;
    let mut out = Vec::new();
    for sh in listed {
        let it = &items[sh.item];
        if !it.problems.is_empty() {
            let what = match (it.role, it.mode) {
                (Role::Template, _) => "template",
                (_, Some(CloneMode::Full)) => "full clone",
                _ => "linked clone",
            };
            out.push(Error::failed(
                format!("{what} '{}' is broken or orphaned", shown(it.name())),
                it.problems.join("; "),
            ));
        }
        for o in &it.orphans {
            out.push(Error::failed(
                format!(
                    "orphaned overlay '{}' on template '{}'",
                    shown_path(&o.path),
                    shown(it.name())
                ),
                format!(
                    "{}, it takes {}; remove it with rm if nothing needs it, while it stays \
                     the template cannot be removed",
                    orphan_origin(o),
                    tree::human(o.allocated)
                ),
            ));
        }
    }
    out
}

/// Where an orphaned overlay came from, in words.
pub fn orphan_origin(o: &inventory::Orphan) -> String {
    match &o.registered {
        Some(r) => format!(
            "no domain uses it: tpl-clone made it for clone '{}' (UUID {}), which is gone",
            shown(&r.clone_name),
            shown(&r.clone_uuid)
        ),
        None => "no domain uses it: found in the directory scan, not made by tpl-clone \
                 for a clone it knows of"
            .to_string(),
    }
}

/// A domain's name and UUID.
#[derive(Debug, Serialize)]
struct Ref<'a> {
    name: &'a str,
    uuid: &'a str,
}

#[derive(Debug, Serialize)]
struct CloneRef<'a> {
    name: &'a str,
    uuid: &'a str,
    mode: Option<CloneMode>,
    allocated: u64,
}

/// What depends on a template's images.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum DepOut<'a> {
    /// A domain whose disk backs onto them (at any depth).
    Domain {
        name: &'a str,
        uuid: &'a str,
        target: &'a str,
        path: &'a Path,
    },
    /// An overlay on them that no domain uses.
    Overlay {
        path: &'a Path,
        registered: bool,
        clone_name: Option<&'a str>,
        clone_uuid: Option<&'a str>,
        allocated: u64,
    },
}

#[derive(Debug, Serialize)]
struct VersionRef<'a> {
    name: &'a str,
    uuid: &'a str,
    version: Option<&'a str>,
    /// The version that has the stable name.
    current: bool,
}

/// One record of the listing: the record every tool prints, and the inventory's fields.
#[derive(Debug, Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    record: &'a Record,
    role: Role,
    allocated: u64,
    linked_allocated: Option<u64>,
    stands_on: Option<Ref<'a>>,
    clones: Vec<CloneRef<'a>>,
    dependents: Vec<DepOut<'a>>,
    version: Option<&'a str>,
    version_of: Option<&'a str>,
    versions: Vec<VersionRef<'a>>,
    problems: &'a [String],
}

fn listed(items: &[Item], i: usize) -> Listed<'_> {
    let it = &items[i];
    let r = |j: usize| Ref {
        name: items[j].name(),
        uuid: &items[j].rec.uuid,
    };
    let mut dependents: Vec<DepOut> = it
        .dependents
        .iter()
        .map(|d| DepOut::Domain {
            name: items[d.item].name(),
            uuid: &items[d.item].rec.uuid,
            target: &d.target,
            path: &d.path,
        })
        .collect();
    dependents.extend(it.orphans.iter().map(|o| DepOut::Overlay {
        path: &o.path,
        registered: o.registered.is_some(),
        clone_name: o.registered.as_ref().map(|r| r.clone_name.as_str()),
        clone_uuid: o.registered.as_ref().map(|r| r.clone_uuid.as_str()),
        allocated: o.allocated,
    }));
    let mut versions = Vec::new();
    if !it.versions.is_empty() {
        versions.push(VersionRef {
            name: it.name(),
            uuid: &it.rec.uuid,
            version: it.version.as_deref(),
            current: true,
        });
        versions.extend(it.versions.iter().map(|&v| VersionRef {
            name: items[v].name(),
            uuid: &items[v].rec.uuid,
            version: items[v].version.as_deref(),
            current: false,
        }));
    }
    Listed {
        record: &it.rec,
        role: it.role,
        allocated: it.allocated,
        linked_allocated: (it.role == Role::Template).then(|| it.linked_allocated(items)),
        stands_on: it.parent.map(r),
        clones: it
            .children
            .iter()
            .map(|&c| CloneRef {
                name: items[c].name(),
                uuid: &items[c].rec.uuid,
                mode: items[c].mode,
                allocated: items[c].allocated,
            })
            .collect(),
        dependents,
        version: it.version.as_deref(),
        version_of: it.version_of.map(|v| items[v].name()),
        versions,
        problems: &it.problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let a = Args::try_parse_from([TOOL, "--clones-of", "T", "--json"]).unwrap();
        assert_eq!(a.clones_of.as_deref(), Some("T"));
        assert!(a.json && !a.templates && !a.all);
        assert!(Args::try_parse_from([TOOL, "--clones-of", "T", "--templates"]).is_err());
        assert!(
            Args::try_parse_from([TOOL, "DOMAIN"]).is_err(),
            "no positional"
        );
    }
}

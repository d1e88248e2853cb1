//! The inventory of one connection, read in one pass: every domain's record from one definition read each, the states from three bulk listings, who stands on whose images from the backing chains, the orphans from the templates' registrations and one scan of their directories.
//!
//! What it costs, for N domains: three listings and one definition read per domain from
//! libvirt (its own bulk state call needs typed parameters this crate cannot read
//! safely), the qcow2 headers of each domain's backing chain, and one walk of the
//! templates' directories and the storage pools' for overlays no domain uses. The
//! relations between domains are worked out from maps in memory, never by asking again
//! per pair, so 500 clones of one template cost what listing them costs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tpl_common::dom::Dom;
use tpl_common::domxml::DomainXml;
use tpl_common::error::{Error, Result};
use tpl_common::image::{self, overlays_in, readable_chain, Dependent};
use tpl_common::meta::{Meta, Registered};
use tpl_common::record::{CloneMode, DiskKind, Record, State};
use tpl_common::session::{state_of, Session};
use tpl_common::text::{shown, shown_path};
use tpl_common::volume;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

/// What a domain is to the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Generalized or locked by tpl, or a domain whose images other disks back onto.
    Template,
    /// Made by tpl-clone (its metadata says so), or a domain whose disk backs onto a
    /// template's image.
    Clone,
    /// Neither.
    Plain,
}

/// A domain whose disk is, or backs onto, another domain's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependentDomain {
    pub item: usize,
    pub target: String,
    pub path: PathBuf,
}

/// An overlay on a template's image that no domain uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub path: PathBuf,
    /// tpl-clone's registration of it in the template's metadata, when it has one (it
    /// names the clone it was made for); None when only the directory scan found it.
    pub registered: Option<Registered>,
    pub allocated: u64,
}

/// One domain of the inventory.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its record, as [`Dom::describe`] makes it.
    pub rec: Record,
    pub role: Role,
    pub title: Option<String>,
    /// The overlays tpl-clone registered on it as a template.
    pub registered: Vec<Registered>,
    /// The images of the disks it writes, as the definition names them.
    pub images: Vec<PathBuf>,
    /// Bytes its own files (those images and its NVRAM file) take on disk.
    pub allocated: u64,
    /// For a clone: the template it stands on (linked: whose image its disk backs onto
    /// first; full: the one its metadata names, while that exists).
    pub parent: Option<usize>,
    pub mode: Option<CloneMode>,
    /// For a template: the clones that stand on it, by name.
    pub children: Vec<usize>,
    /// The domains whose disks back onto its images, at any depth: what breaks without it.
    pub dependents: Vec<DependentDomain>,
    pub orphans: Vec<Orphan>,
    /// Why it is broken or orphaned, one text each (clones and templates only).
    pub problems: Vec<String>,
    /// Its tpl-refresh version name (`TEMPLATE-YYYYmmdd-HHMMSS[-old]`), if it is one.
    pub version: Option<String>,
    /// For an older version: the template that has the stable name.
    pub version_of: Option<usize>,
    /// For a template with the stable name: its older versions, newest first.
    pub versions: Vec<usize>,
    /// Facts about its disks, for the problems.
    missing: Vec<String>,
}

impl Item {
    pub fn name(&self) -> &str {
        &self.rec.name
    }

    /// Bytes its linked clones' overlays (and the orphaned ones) take, for a template.
    pub fn linked_allocated(&self, items: &[Item]) -> u64 {
        self.children
            .iter()
            .filter(|&&c| items[c].mode == Some(CloneMode::Linked))
            .map(|&c| items[c].allocated)
            .sum::<u64>()
            + self.orphans.iter().map(|o| o.allocated).sum::<u64>()
    }
}

/// The whole inventory, and what could not be checked.
#[derive(Debug, Default)]
pub struct Inventory {
    pub items: Vec<Item>,
    /// Files that could not be read while looking for orphans: they may be one.
    pub warnings: Vec<String>,
}

fn gone(e: &Error) -> bool {
    matches!(e, Error::Libvirt { source, .. } if matches!(source.code(), Enum::Known(ErrorNumber::NoDomain)))
}

/// Bytes a file takes on disk (its blocks; a symbolic link's own, never its target's:
/// tpl never follows one), or 0 when it is not there.
pub fn allocated(p: &Path) -> u64 {
    fs::symlink_metadata(p).map_or(0, |m| m.blocks() * 512)
}

/// The states of all domains, from one listing per state libvirt can filter by; a domain
/// in none of them (idle, crashed, in shutdown) is asked on its own.
fn bulk_states(s: &Session) -> HashMap<String, State> {
    let mut out = HashMap::new();
    for (flag, state) in [
        (sys::VIR_CONNECT_LIST_DOMAINS_RUNNING, State::Running),
        (sys::VIR_CONNECT_LIST_DOMAINS_PAUSED, State::Paused),
        (sys::VIR_CONNECT_LIST_DOMAINS_SHUTOFF, State::ShutOff),
    ] {
        for d in s.conn.list_all_domains(flag).unwrap_or_default() {
            if let Ok(u) = d.uuid_string() {
                out.insert(u.to_ascii_lowercase(), state);
            }
        }
    }
    out
}

/// Our metadata, from a definition read in bulk.
pub fn meta_of(x: &DomainXml) -> Result<Meta> {
    Meta::of_definition(x)
}

/// One domain as an item, with what its disks say about missing files.
fn item_of(s: &Session, dom: &Dom, x: &DomainXml, state: State, warn: &mut Vec<String>) -> Item {
    let m = meta_of(x).unwrap_or_else(|e| {
        warn.push(format!(
            "domain '{}': {e}; listed as if tpl knew nothing of it",
            shown(&dom.name)
        ));
        Meta::default()
    });
    // The record every tool prints, from the definition read in bulk.
    let rec = dom.record_from(x, &m, state);
    let mut missing = Vec::new();
    let mut images = Vec::new();
    let mut alloc = 0;
    for d in rec.disks.iter().filter(|d| d.own) {
        let Some(taken) = volume::allocated(s, d) else {
            let name = match (&d.rbd, &d.path) {
                (Some(r), _) => format!("rbd:{}", r.name()),
                (None, Some(p)) => shown_path(p),
                (None, None) => continue,
            };
            missing.push(format!("its disk {} image '{name}' is missing", d.target));
            continue;
        };
        alloc += taken;
        // What stands on an RBD image is Ceph's to say, not the files'.
        let (None, Some(p)) = (&d.rbd, &d.path) else {
            continue;
        };
        images.push(p.clone());
        // A chain ends at the first link that cannot be read; the record lists that link
        // last, so a missing one is the last one, if any.
        if let Some(last) = d.backing.last() {
            if fs::symlink_metadata(&last.path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
            {
                missing.push(format!(
                    "its disk {} backs onto '{}', which is missing",
                    d.target,
                    shown_path(&last.path)
                ));
            }
        }
    }
    if let Some(nv) = &rec.nvram {
        alloc += allocated(nv);
    }
    Item {
        role: Role::Plain,
        title: x
            .root
            .get_child("title")
            .and_then(|t| t.get_text())
            .map(|t| t.trim().to_string()),
        registered: m.overlays.clone(),
        images,
        allocated: alloc,
        parent: None,
        mode: None,
        children: Vec::new(),
        dependents: Vec::new(),
        orphans: Vec::new(),
        problems: Vec::new(),
        version: None,
        version_of: None,
        versions: Vec::new(),
        missing,
        rec,
    }
}

/// `canonical` with a memory: the template's image is met once per clone.
#[derive(Default)]
struct Canon(HashMap<PathBuf, PathBuf>);

impl Canon {
    fn of(&mut self, p: &Path) -> PathBuf {
        if let Some(c) = self.0.get(p) {
            return c.clone();
        }
        let c = image::canonical(p);
        self.0.insert(p.to_path_buf(), c.clone());
        c
    }
}

/// Read the inventory of the connection.
pub fn collect(s: &Session) -> Result<Inventory> {
    let mut inv = Inventory::default();
    let states = bulk_states(s);
    let domains = s.all_domains()?;
    let definitions = tpl_common::dom::definitions(&domains);
    for (d, x) in domains.into_iter().zip(definitions) {
        let dom = match Dom::new(s, d) {
            Ok(d) => d,
            // Undefined between the listing and now: it is not there any more.
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let x = match x {
            Ok(x) => x,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let state = match states.get(&dom.uuid.to_ascii_lowercase()) {
            Some(st) => *st,
            None => match dom.state() {
                Ok(st) => state_of(st),
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            },
        };
        let item = item_of(s, &dom, &x, state, &mut inv.warnings);
        inv.items.push(item);
    }
    relate(s, &mut inv);
    Ok(inv)
}

/// Work out who stands on whom, the roles, the orphans, the problems and the versions.
fn relate(s: &Session, inv: &mut Inventory) {
    let items = &mut inv.items;
    let mut canon = Canon::default();
    // Whose image a file is, and every file some domain's disk is or backs onto.
    let mut owner: HashMap<PathBuf, usize> = HashMap::new();
    let mut used: HashSet<PathBuf> = HashSet::new();
    for (i, it) in items.iter().enumerate() {
        for p in &it.images {
            owner.entry(canon.of(p)).or_insert(i);
        }
        for d in it.rec.disks.iter().filter(|d| d.kind == DiskKind::File) {
            used.extend(d.path.iter().map(|p| canon.of(p)));
            used.extend(d.backing.iter().map(|b| canon.of(&b.path)));
        }
    }
    let by_uuid: HashMap<String, usize> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.rec.uuid.to_ascii_lowercase(), i))
        .collect();

    // Linked clones: a disk whose chain reaches another domain's image depends on it; the
    // first such image is the template it stands on.
    let mut nearest: Vec<Option<usize>> = vec![None; items.len()];
    let mut deps: Vec<Vec<DependentDomain>> = vec![Vec::new(); items.len()];
    for (i, it) in items.iter().enumerate() {
        for d in it.rec.disks.iter().filter(|d| d.kind == DiskKind::File) {
            let Some(path) = &d.path else { continue };
            let mut seen_owner = BTreeSet::new();
            for link in &d.backing {
                let Some(&o) = owner.get(&canon.of(&link.path)) else {
                    continue;
                };
                if o == i || !seen_owner.insert(o) {
                    continue;
                }
                nearest[i].get_or_insert(o);
                deps[o].push(DependentDomain {
                    item: i,
                    target: d.target.clone(),
                    path: path.clone(),
                });
            }
        }
    }
    for (i, it) in items.iter_mut().enumerate() {
        it.dependents = std::mem::take(&mut deps[i]);
        let m = &it.rec;
        let is_template = m.template.generalized.is_some()
            || m.template.locked
            || !it.registered.is_empty()
            || !it.dependents.is_empty();
        it.role = if is_template {
            Role::Template
        } else if m.clone.is_some() || nearest[i].is_some() {
            Role::Clone
        } else {
            Role::Plain
        };
    }

    // Where each clone stands, and what is wrong with it.
    for i in 0..items.len() {
        if items[i].role != Role::Clone {
            if items[i].role == Role::Template {
                let m = std::mem::take(&mut items[i].missing);
                items[i].problems.extend(m);
            }
            continue;
        }
        let origin = items[i].rec.clone.clone();
        let by_meta = origin
            .as_ref()
            .and_then(|o| by_uuid.get(&o.template_uuid.to_ascii_lowercase()).copied());
        let (parent, mode) = match (nearest[i], &origin) {
            (Some(t), _) => (Some(t), CloneMode::Linked),
            (None, Some(o)) => (by_meta, o.mode),
            (None, None) => (None, CloneMode::Linked),
        };
        let mut problems = std::mem::take(&mut items[i].missing);
        if let Some(o) = origin.as_ref().filter(|o| o.mode == CloneMode::Linked) {
            // A linked clone whose template lives on another connection (tpl-clone --to)
            // stands on it when all its own disks are RBD clones that still have their
            // parent: Ceph keeps that snapshot for them. A file-backed clone without its
            // template domain is an orphan: nothing keeps its base read-only any more, and
            // a path seen from here says nothing about the files of another host.
            let own: Vec<_> = items[i].rec.disks.iter().filter(|d| d.own).collect();
            let stands = !own.is_empty()
                && own
                    .iter()
                    .all(|d| d.kind == tpl_common::record::DiskKind::Rbd && !d.backing.is_empty());
            if by_meta.is_none() && !stands {
                problems.push(format!(
                    "the template it was made from, '{}' (UUID {}), is gone",
                    shown(&o.template_name),
                    shown(&o.template_uuid)
                ));
            }
        }
        let it = &mut items[i];
        it.parent = parent;
        it.mode = Some(mode);
        it.problems = problems;
        if let Some(t) = parent {
            items[t].children.push(i);
        }
    }
    for i in 0..items.len() {
        let mut c = std::mem::take(&mut items[i].children);
        c.sort_by(|&a, &b| items[a].name().cmp(items[b].name()));
        items[i].children = c;
    }

    // Orphans: registered overlays no domain uses, then one scan of the templates'
    // directories and the pools' for the overlays no registration names.
    let templates: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].role == Role::Template)
        .collect();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for &t in &templates {
        let mine: HashSet<PathBuf> = items[t].images.iter().map(|p| canon.of(p)).collect();
        for r in items[t].registered.clone() {
            let c = canon.of(&r.path);
            if used.contains(&c) || !seen.insert(c) {
                continue;
            }
            let md = match fs::symlink_metadata(&r.path) {
                Ok(md) => md,
                // Its clone was removed with it, or never made: nothing there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    inv.warnings.push(format!(
                        "cannot check the overlay '{}' that tpl-clone registered on template \
                         '{}' for clone '{}': {e}",
                        shown_path(&r.path),
                        shown(items[t].name()),
                        shown(&r.clone_name)
                    ));
                    continue;
                }
            };
            let (chain, err) = readable_chain(&r.path);
            if chain.iter().any(|l| mine.contains(&canon.of(&l.path))) {
                items[t].orphans.push(Orphan {
                    path: r.path.clone(),
                    registered: Some(r),
                    allocated: md.blocks() * 512,
                });
            } else if let Some(e) = err.filter(|e| !image::is_not_found(e)) {
                inv.warnings.push(format!(
                    "cannot check the overlay '{}' that tpl-clone registered on template '{}': \
                     {e}",
                    shown_path(&r.path),
                    shown(items[t].name())
                ));
            }
        }
    }
    let images: Vec<PathBuf> = templates
        .iter()
        .flat_map(|&t| items[t].images.iter().cloned())
        .collect();
    let mut dirs: BTreeSet<PathBuf> = images
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    match s.pool_dirs() {
        Ok(p) => dirs.extend(p.into_iter().map(|(_, d)| d)),
        Err(e) => inv.warnings.push(format!(
            "cannot list the storage pools, so their directories are not searched for \
             orphaned overlays: {e}"
        )),
    }
    let dirs: Vec<PathBuf> = dirs.into_iter().collect();
    if !images.is_empty() {
        for o in overlays_in(&dirs, &images) {
            match o {
                Dependent::Overlay { path, backing } => {
                    let c = canon.of(&path);
                    if used.contains(&c) || !seen.insert(c) {
                        continue;
                    }
                    if let Some(&t) = owner.get(&backing) {
                        let allocated = allocated(&path);
                        items[t].orphans.push(Orphan {
                            path,
                            registered: None,
                            allocated,
                        });
                    }
                }
                Dependent::Unchecked { path, reason } => inv.warnings.push(format!(
                    "cannot tell whether '{}' is an overlay on a template ({reason})",
                    shown_path(&path)
                )),
                // The scan finds only overlays and files it cannot read.
                _ => {}
            }
        }
    }
    for it in items.iter_mut() {
        it.orphans.sort_by(|a, b| a.path.cmp(&b.path));
    }
    versions(items);
}

/// A tpl-refresh version name, `BASE-YYYYmmdd-HHMMSS` or `BASE-YYYYmmdd-HHMMSS-old`: its
/// base (the stable name) and its time stamp.
pub fn split_version(name: &str) -> Option<(&str, &str)> {
    let core = name.strip_suffix("-old").unwrap_or(name);
    let cut = core.len().checked_sub(16)?;
    let (base, stamp) = (core.get(..cut)?, core.get(cut + 1..)?);
    let b = stamp.as_bytes();
    let ok = core.as_bytes()[cut] == b'-'
        && b.len() == 15
        && b[8] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 8 || c.is_ascii_digit());
    (ok && !base.is_empty()).then_some((base, stamp))
}

/// Which templates are versions of which (see [`split_version`]): a template named
/// `BASE-STAMP` is an older version of the template named BASE when that exists, or when
/// its title says it is a version (tpl-refresh titles every version with its name); the
/// template named BASE is the newest version, the one its title names.
fn versions(items: &mut [Item]) {
    let by_name: HashMap<String, usize> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| it.role == Role::Template)
        .map(|(i, it)| (it.name().to_string(), i))
        .collect();
    for i in 0..items.len() {
        if items[i].role != Role::Template {
            continue;
        }
        let name = items[i].name().to_string();
        let title = items[i].title.clone();
        if let Some((base, _)) = split_version(&name) {
            let stable = by_name.get(base).copied();
            if stable.is_some() || title.as_deref() == Some(name.as_str()) {
                items[i].version = Some(name.clone());
                items[i].version_of = stable;
                if let Some(s) = stable {
                    items[s].versions.push(i);
                }
                continue;
            }
        }
        if let Some(t) = title.filter(|t| split_version(t).is_some_and(|(b, _)| b == name)) {
            items[i].version = Some(t);
        }
    }
    for i in 0..items.len() {
        let mut v = std::mem::take(&mut items[i].versions);
        v.sort_by(|&a, &b| items[b].version.cmp(&items[a].version));
        items[i].versions = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names() {
        assert_eq!(
            split_version("Tpl-20260101-031700"),
            Some(("Tpl", "20260101-031700"))
        );
        assert_eq!(
            split_version("a-b-20260101-031700-old"),
            Some(("a-b", "20260101-031700"))
        );
        for bad in [
            "Tpl",
            "-20260101-031700",
            "Tpl-2026010-031700",
            "Tpl_20260101-031700",
            "Tpl-20260101_031700",
            "Tpl-20260101-03170x",
            "Tpl-20260101-031700-new",
            "ü-2026010é-031700",
        ] {
            assert_eq!(split_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_record_is_the_one_every_tool_prints() {
        let s = Session::open("test:///default").unwrap();
        let dom = Dom::lookup(&s, &tpl_common::record::DomainRef::by_arg("test")).unwrap();
        let mut m = dom.meta().unwrap();
        m.record_step("tpl-list-test", "a step & <more>");
        m.template.locked = true;
        m.overlays.push(Registered {
            path: "/x/c1.qcow2".into(),
            clone_uuid: "u1".into(),
            clone_name: "c1".into(),
            at: "t".into(),
        });
        dom.set_meta(&m).unwrap();
        let x = dom.xml().unwrap();
        let read = meta_of(&x).unwrap();
        assert_eq!(read, m);
        let rec = dom.record_from(&x, &read, state_of(dom.state().unwrap()));
        assert_eq!(rec, dom.describe().unwrap());
        let st = bulk_states(&s);
        assert_eq!(st.get(&dom.uuid), Some(&State::Running));
    }
}

//! The libvirt connection: opening it as virsh does, finding domains, describing them as records, and our metadata.

use std::path::{Path, PathBuf};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::sys;

use crate::domxml::DomainXml;
use crate::error::{Error, Result};
use crate::image::{self, canonical, Dependent};
use crate::meta::{self, Meta, Registered};
use crate::ownfiles::OtherFiles;
use crate::ownfiles::OwnFiles;
use crate::rbd::{self, Ceph, CephOptions};
use crate::record::{Disk, DiskKind, DomainRef, Record, State, SCHEMA};
use crate::text::{shown, shown_path};

/// An open libvirt connection, and the run's Ceph connection for RBD disks.
pub struct Session {
    pub conn: Connect,
    pub uri: String,
    pub ceph: Ceph,
    /// What the locality probe found for each directory, once per run: None for the same
    /// files, else why not and whether that was proven (rather than undecided).
    seen_dirs: std::cell::RefCell<std::collections::HashMap<PathBuf, Option<NotSame>>>,
    /// The qcow2 files of the directories searched for dependents, read once a run.
    overlays: std::cell::RefCell<crate::overlays::OverlayIndex>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("uri", &self.uri).finish()
    }
}

fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
    matches!(e.code(), Enum::Known(c) if c == code)
}

/// A domain's run state as the record says it.
pub fn state_of(s: DomainState) -> State {
    match s {
        DomainState::NoState => State::NoState,
        DomainState::Running => State::Running,
        DomainState::Blocked => State::Idle,
        DomainState::Paused => State::Paused,
        DomainState::Shutdown => State::InShutdown,
        DomainState::Shutoff => State::ShutOff,
        DomainState::Crashed => State::Crashed,
        DomainState::PMSuspended => State::PmSuspended,
    }
}

impl Session {
    pub fn open(uri: &str) -> Result<Session> {
        Session::open_with(uri, CephOptions::default())
    }

    /// Open the connection, with how to reach Ceph when an RBD disk needs it.
    pub fn open_with(uri: &str, ceph: CephOptions) -> Result<Session> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| {
            let hint = if e.message().contains("ermission denied")
                || e.message().contains("uthentication")
            {
                "this user may not use that connection: run as root, join the libvirt \
                 group, or pick another with -c (qemu:///session is your own)"
            } else {
                "is libvirtd running? on a systemd host: systemctl start libvirtd; on a \
                 test machine: make libvirtd"
            };
            Error::libvirt(
                format!("cannot connect to libvirt at '{}' ({hint})", shown(uri)),
                e,
            )
        })?;
        Ok(Session {
            conn,
            uri: uri.to_string(),
            ceph: Ceph::new(ceph),
            seen_dirs: Default::default(),
            overlays: Default::default(),
        })
    }

    /// Find a domain as virsh does: by UUID when the reference has one, else by name (or a
    /// name that is a UUID). Nothing found is bad input (exit 2).
    pub fn lookup(&self, r: &DomainRef) -> Result<Domain> {
        let not_found = |what: &str| {
            Error::usage(
                format!("domain '{}' not found", shown(what)),
                format!("no such domain on {}", shown(&self.uri)),
            )
        };
        if let Some(uuid) = r.uuid.as_deref().filter(|u| !u.is_empty()) {
            return match self.conn.lookup_domain_by_uuid_string(uuid) {
                Ok(d) => Ok(d),
                Err(e)
                    if is_code(&e, ErrorNumber::NoDomain)
                        || is_code(&e, ErrorNumber::InvalidArg) =>
                {
                    Err(Error::usage(
                        format!("domain '{}' not found", shown(&r.label())),
                        format!(
                            "no domain with UUID {} on {}",
                            shown(uuid),
                            shown(&self.uri)
                        ),
                    ))
                }
                Err(e) => Err(Error::libvirt(
                    format!("cannot look up domain '{}'", shown(&r.label())),
                    e,
                )),
            };
        }
        let name = r.name.as_deref().unwrap_or_default();
        match self.conn.lookup_domain_by_name(name) {
            Ok(d) => Ok(d),
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => {
                match self.conn.lookup_domain_by_uuid_string(name) {
                    Ok(d) => Ok(d),
                    Err(_) => Err(not_found(name)),
                }
            }
            Err(e) => Err(Error::libvirt(
                format!("cannot look up domain '{}'", shown(name)),
                e,
            )),
        }
    }

    /// Whether a domain with this name is defined.
    pub fn name_taken(&self, name: &str) -> Result<bool> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => Ok(false),
            Err(e) => Err(Error::libvirt(
                format!("cannot look up domain '{}'", shown(name)),
                e,
            )),
        }
    }

    /// Whether the domain with this UUID exists (None: libvirt cannot tell).
    pub fn domain_exists(&self, uuid: &str) -> Option<bool> {
        match self.conn.lookup_domain_by_uuid_string(uuid) {
            Ok(_) => Some(true),
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => Some(false),
            Err(_) => None,
        }
    }

    /// Every domain on the connection, defined or running.
    pub fn all_domains(&self) -> Result<Vec<Domain>> {
        self.conn
            .list_all_domains(0)
            .map_err(|e| Error::libvirt("cannot list domains", e))
    }

    /// The directories of active storage pools that hold files (dir, fs, netfs).
    pub fn pool_dirs(&self) -> Result<Vec<(StoragePool, PathBuf)>> {
        let pools = self
            .conn
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(|e| Error::libvirt("cannot list storage pools", e))?;
        let mut out = Vec::new();
        for p in pools {
            let Ok(xml) = p.xml_desc(0) else { continue };
            let Ok(x) = DomainXml::parse(&xml) else {
                continue;
            };
            let ty = x.root.attributes.get("type").map(String::as_str);
            if !matches!(ty, Some("dir" | "fs" | "netfs")) {
                continue;
            }
            if let Some(path) = x
                .root
                .get_child("target")
                .and_then(|t| t.get_child("path"))
                .and_then(|p| p.get_text())
            {
                let path = PathBuf::from(path.trim());
                // A locality probe of a tpl tool running now (a transient pool of ours
                // over its fresh directory holding only marker files) is not storage.
                let probe = p
                    .name()
                    .is_ok_and(|n| n.starts_with(crate::locality::PREFIX))
                    && !p.is_persistent().unwrap_or(true)
                    && path.file_name().is_some_and(|f| {
                        f.to_string_lossy()
                            .starts_with(&format!(".{}", crate::locality::PREFIX))
                    });
                if !probe {
                    out.push((p, path));
                }
            }
        }
        Ok(out)
    }

    /// Tell libvirt's storage pools that files in `dir` changed, so `virsh vol-list` and
    /// virt-manager see them. Best effort: a pool that cannot refresh is not our failure.
    pub fn refresh_pools_for(&self, dir: &Path) {
        let dir = canonical(dir);
        if let Ok(pools) = self.pool_dirs() {
            for (pool, path) in pools {
                if canonical(&path) == dir {
                    let _ = pool.refresh(0);
                }
            }
        }
    }
}

/// Why a directory was not proven to be the hypervisor's as this process sees it.
#[derive(Debug, Clone)]
struct NotSame {
    why: String,
    /// proven another directory, not merely undecided
    proven: bool,
    /// undecided because this process may not write there
    unwritable: bool,
}

impl Session {
    /// Why the hypervisor does not (or may not) see `dir` as this process does; None when
    /// it was proven to see the same directory. Probed once per directory per run.
    pub fn not_same_files(&self, dir: &Path) -> Option<String> {
        self.locality(dir).map(|n| n.why)
    }

    /// Whether the hypervisor was proven to see another directory at `dir` (not merely
    /// that it could not be told).
    pub fn proven_other_files(&self, dir: &Path) -> bool {
        self.locality(dir).is_some_and(|n| n.proven)
    }

    fn locality(&self, dir: &Path) -> Option<NotSame> {
        if let Some(r) = self.seen_dirs.borrow().get(dir) {
            return r.clone();
        }
        use crate::locality::{Error as L, Locality};
        let r = match crate::locality::probe(&self.conn, dir) {
            Ok(Locality::Same) => None,
            Ok(Locality::Different(why)) => Some(NotSame {
                why,
                proven: true,
                unwritable: false,
            }),
            Err(e) => Some(NotSame {
                why: e.to_string(),
                proven: false,
                unwritable: matches!(e, L::Unwritable { .. }),
            }),
        };
        self.seen_dirs
            .borrow_mut()
            .insert(dir.to_path_buf(), r.clone());
        r
    }

    /// Refuse (exit 2) to act on `path` (`what` names it: "disk vda '…'") unless the
    /// hypervisor sees its directory as this process does: on another host's domain this
    /// machine's file of the same path is someone else's.
    pub fn require_same_files(&self, path: &Path, what: &str) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        match self.locality(dir) {
            None => Ok(()),
            // a local directory this process may not write is not a sign of another host:
            // say what the check needs instead of sending the user to "that host"
            Some(NotSame {
                why,
                unwritable: true,
                ..
            }) => Err(Error::usage(
                format!(
                    "cannot check that {what} is this machine's file as the hypervisor at {} sees it",
                    shown(&self.uri)
                ),
                format!(
                    "{why}; tpl proves that the hypervisor and this process see the same \
                     directory by writing a marker there for a moment: make '{}' writable \
                     (chattr -i, a read-write mount), or move the file to a directory that is",
                    shown_path(dir)
                ),
            )),
            Some(NotSame { why, .. }) => Err(Error::usage(
                format!(
                    "{what} is a file of the hypervisor at {}, not known to be this machine's",
                    shown(&self.uri)
                ),
                format!(
                    "{why}; tpl acts only on files it sees as the hypervisor does: run tpl on \
                     that host, or keep the template on Ceph RBD, which every host reaches"
                ),
            )),
        }
    }

    /// The user and group libvirt runs qemu as for domains of `domain_type` (`qemu`, `kvm`),
    /// from the DAC security model in the host capabilities; None when libvirt does not
    /// say (no DAC model, a remote driver that hides it).
    pub fn qemu_ids(&self, domain_type: &str) -> Option<(u32, u32)> {
        let caps = self.conn.capabilities().ok()?;
        let x = DomainXml::parse(&caps).ok()?;
        let host = x.root.get_child("host")?;
        let ids = crate::domxml::children_named(host, "secmodel")
            .filter(|m| {
                m.get_child("model")
                    .and_then(|e| e.get_text())
                    .is_some_and(|t| t.trim() == "dac")
            })
            .flat_map(|m| crate::domxml::children_named(m, "baselabel"))
            .find(|b| b.attributes.get("type").map(String::as_str) == Some(domain_type))
            .and_then(|b| parse_dac_label(b.get_text()?.trim()));
        ids
    }
}

/// `+64055:+64055` (or `64055:64055`) as a uid and gid.
fn parse_dac_label(l: &str) -> Option<(u32, u32)> {
    let (u, g) = l.split_once(':')?;
    let num = |s: &str| s.trim_start_matches('+').parse().ok();
    Some((num(u)?, num(g)?))
}

/// Another domain of the connection, as the checks of a domain's files need it.
#[derive(Debug, Clone)]
pub struct OtherDomain {
    pub uuid: String,
    /// The files it names (for the sharing check).
    pub files: OtherFiles,
    /// Its disks, for the backing chains of the dependents check.
    pub disks: Vec<Disk>,
}

/// What depends on a set of images, and where the search looked (for the messages).
#[derive(Debug, Clone, Default)]
pub struct Dependents {
    pub list: Vec<Dependent>,
    pub looked: String,
}

impl Dependents {
    /// "1 linked clone depends" or "N linked clones depend", for the messages.
    pub fn depend(&self) -> String {
        match self.list.len() {
            1 => "1 linked clone depends".into(),
            n => format!("{n} linked clones depend"),
        }
    }
}

/// Accessors for one domain, with errors that name it.
pub struct Dom<'a> {
    pub session: &'a Session,
    pub dom: Domain,
    pub name: String,
    pub uuid: String,
}

impl std::fmt::Debug for Dom<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dom")
            .field("name", &self.name)
            .field("uuid", &self.uuid)
            .finish()
    }
}

impl<'a> Dom<'a> {
    pub fn new(session: &'a Session, dom: Domain) -> Result<Dom<'a>> {
        let name = dom
            .name()
            .map_err(|e| Error::libvirt("cannot read domain name", e))?;
        let uuid = dom
            .uuid_string()
            .map_err(|e| Error::libvirt(format!("cannot read UUID of '{name}'"), e))?;
        Ok(Dom {
            session,
            dom,
            name,
            uuid,
        })
    }

    pub fn lookup(session: &'a Session, r: &DomainRef) -> Result<Dom<'a>> {
        Dom::new(session, session.lookup(r)?)
    }

    /// Re-read the name (after a rename).
    /// The domain was undefined while this handle was held (bad input, as any domain that
    /// is not there).
    fn gone(&self) -> Error {
        Error::usage(
            format!("domain '{}' is gone", shown(&self.name)),
            format!(
                "it was removed (undefined) meanwhile; no domain with UUID {} exists on {} \
                 any more",
                self.uuid,
                shown(&self.session.uri)
            ),
        )
    }

    pub fn refresh_name(&mut self) -> Result<()> {
        // A handle outlives its domain's undefinition, and then reads an unknown state.
        if self.session.domain_exists(&self.uuid) == Some(false) {
            return Err(self.gone());
        }
        self.name = self
            .dom
            .name()
            .map_err(|e| Error::libvirt("cannot read domain name", e))?;
        Ok(())
    }

    pub fn state(&self) -> Result<DomainState> {
        match self.dom.state() {
            Ok((Enum::Known(s), _)) => Ok(s),
            Ok((Enum::Unknown(_), _)) if self.session.domain_exists(&self.uuid) == Some(false) => {
                Err(self.gone())
            }
            Ok((Enum::Unknown(v), _)) => Err(Error::failed(
                format!("cannot read state of domain '{}'", self.name),
                format!("libvirt reported unknown state {v}"),
            )),
            Err(e) => Err(Error::libvirt(
                format!("cannot read state of domain '{}'", self.name),
                e,
            )),
        }
    }

    /// Refuse (exit 3) unless the domain is shut off.
    pub fn require_shut_off(&self, action: &str) -> Result<()> {
        let s = self.state()?;
        if s != DomainState::Shutoff {
            return Err(Error::refused(
                format!("cannot {action} domain '{}'", shown(&self.name)),
                format!(
                    "it is {}; shut it down first: virsh shutdown {}",
                    state_of(s),
                    shown(&self.name)
                ),
            ));
        }
        Ok(())
    }

    /// The persistent definition (what the next start uses), with security info.
    pub fn xml(&self) -> Result<DomainXml> {
        let flags = sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE;
        let xml = self.dom.xml_desc(flags).map_err(|e| {
            Error::libvirt(
                format!("cannot read the definition of domain '{}'", self.name),
                e,
            )
        })?;
        DomainXml::parse(&xml)
    }

    /// Define the domain anew from an edited definition (same UUID).
    pub fn redefine(&self, x: &DomainXml) -> Result<()> {
        self.session
            .conn
            .define_domain_xml(&x.to_xml())
            .map(drop)
            .map_err(|e| {
                Error::libvirt(
                    format!("cannot update the definition of domain '{}'", self.name),
                    e,
                )
            })
    }

    pub fn meta(&self) -> Result<Meta> {
        match self.dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(meta::NS),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        ) {
            Ok(xml) => Meta::from_xml(&xml),
            Err(e) if is_code(&e, ErrorNumber::NoDomainMetadata) => Ok(Meta::default()),
            Err(e) => Err(Error::libvirt(
                format!("cannot read tpl metadata of domain '{}'", self.name),
                e,
            )),
        }
    }

    pub fn set_meta(&self, m: &Meta) -> Result<()> {
        self.dom
            .set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&m.to_xml()),
                Some(meta::PREFIX),
                Some(meta::NS),
                sys::VIR_DOMAIN_AFFECT_CONFIG,
            )
            .map_err(|e| {
                Error::libvirt(
                    format!("cannot write tpl metadata of domain '{}'", self.name),
                    e,
                )
            })
    }

    /// The domain as a record: state, disks with backing chains, NVRAM and our metadata.
    pub fn describe(&self) -> Result<Record> {
        let state = state_of(self.state()?);
        Ok(self.record_from(&self.xml()?, &self.meta()?, state))
    }

    /// The record of this domain from a definition, metadata and state already read (a
    /// listing reads every definition once, in bulk): what [`Dom::describe`] returns.
    /// Backing chains are read here: a file's from its qcow2 headers, an RBD image's from
    /// Ceph; an image that cannot be read, or a cluster that cannot be reached, leaves its
    /// chain empty, and the record still describes the domain.
    pub fn record_from(&self, x: &DomainXml, m: &Meta, state: State) -> Record {
        let mut disks = x.disks();
        for d in &mut disks {
            if let (Some(p), DiskKind::File, Some("qcow2")) = (&d.path, d.kind, d.format.as_deref())
            {
                d.backing = image::readable_chain(p).0;
            }
            if let Some(src) = &d.rbd {
                d.backing = self.session.ceph.parent_chain(src).unwrap_or_default();
            }
        }
        Record {
            schema: SCHEMA,
            uri: self.session.uri.clone(),
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            state,
            disks,
            nvram: x.nvram(),
            template: m.template.clone(),
            clone: m.clone.clone(),
            history: m.history.clone(),
        }
    }

    /// The domain's own files and RBD images (see [`OwnFiles::of`]), each file checked to be
    /// one the hypervisor sees as this process does.
    pub fn own_files(&self, action: &str) -> Result<OwnFiles> {
        let own = OwnFiles::of(&self.name, &self.xml()?, action)?;
        for f in &own.files {
            self.session.require_same_files(
                &f.path,
                &format!("the {f} of domain '{}'", shown(&self.name)),
            )?;
        }
        if let Some(nv) = &own.missing_nvram {
            self.session.require_same_files(
                nv,
                &format!(
                    "the NVRAM '{}' of domain '{}'",
                    shown_path(nv),
                    shown(&self.name)
                ),
            )?;
        }
        Ok(own)
    }

    /// Every other domain of the connection, with the files it names. A domain undefined
    /// between the listing and its read is left out: it names nothing any more.
    pub fn others(&self) -> Result<Vec<OtherDomain>> {
        let mut out = Vec::new();
        for d in self.session.all_domains()? {
            let other = match Dom::new(self.session, d) {
                Ok(o) => o,
                Err(Error::Libvirt { source, .. }) if is_code(&source, ErrorNumber::NoDomain) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            if other.uuid == self.uuid {
                continue;
            }
            let x = match other.xml() {
                Ok(x) => x,
                Err(Error::Libvirt { source, .. }) if is_code(&source, ErrorNumber::NoDomain) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let disks = x.disks();
            let files = OtherFiles {
                name: other.name.clone(),
                disks: disks
                    .iter()
                    .filter_map(|d| Some((d.target.clone(), d.path.clone()?)))
                    .collect(),
                rbd: disks
                    .iter()
                    .filter_map(|d| Some((d.target.clone(), d.rbd.as_ref()?.name())))
                    .collect(),
                nvram: x.nvram(),
            };
            out.push(OtherDomain {
                uuid: other.uuid,
                files,
                disks,
            });
        }
        Ok(out)
    }

    /// Everything that depends on the domain's own images: for files, see
    /// [`Dom::dependents`]; for RBD images, the clones of their snapshots (Ceph's list,
    /// each named with the domain that uses it, if one does).
    pub fn dependents_of(
        &self,
        own: &OwnFiles,
        others: &[OtherDomain],
        registered: &[Registered],
    ) -> Result<Dependents> {
        let mut deps = self.dependents(&own.images(), others, registered)?;
        let (rbd, looked) = self.rbd_dependents(own, others)?;
        deps.list.extend(rbd);
        deps.looked.push_str(&looked);
        Ok(deps)
    }

    /// The clones of the snapshots of the domain's RBD images (Ceph's list, each named
    /// with the domain of `others` that uses it, if one does), and where it looked.
    pub fn rbd_dependents(
        &self,
        own: &OwnFiles,
        others: &[OtherDomain],
    ) -> Result<(Vec<Dependent>, String)> {
        let mut out = Vec::new();
        let mut looked = String::new();
        for r in &own.rbd {
            let cluster = self.session.ceph.cluster_for(&r.source)?;
            let spec = rbd::spec_of(&r.source);
            let kids = rbd::children(cluster, &spec)?;
            for k in &kids {
                let name = k.spec.to_string();
                let domain = others
                    .iter()
                    .find(|o| o.files.rbd.iter().any(|(_, n)| *n == name))
                    .map(|o| o.files.name.clone());
                out.push(Dependent::RbdClone {
                    image: name,
                    domain,
                    in_trash: k.in_trash,
                });
            }
            looked.push_str(&format!(
                "; and Ceph's list of the clones of '{}' ({} found)",
                shown(&spec.to_string()),
                kids.len()
            ));
        }
        Ok((out, looked))
    }

    /// Everything that depends on these images of this domain: other domains whose disks
    /// are or back onto them, the overlays registered in its metadata (tpl-clone's linked
    /// clones, wherever they are), and qcow2 overlays in the images' directories and the
    /// storage pools'.
    pub fn dependents(
        &self,
        images: &[PathBuf],
        others: &[OtherDomain],
        registered: &[Registered],
    ) -> Result<Dependents> {
        let mut found = Found {
            wanted: images.iter().map(|p| canonical(p)).collect(),
            ..Default::default()
        };
        found.domains(others);
        let live_registered = found.registered(registered);
        let dirs = self.scan_dirs(images)?;
        let found_overlays = self
            .session
            .overlays
            .borrow_mut()
            .overlays_in(&dirs, images);
        for o in found_overlays {
            // A file a domain uses, or one registered, is listed once.
            let path = match &o {
                Dependent::Overlay { path, .. } | Dependent::Unchecked { path, .. } => path,
                Dependent::Domain { .. }
                | Dependent::Registered { .. }
                | Dependent::RbdClone { .. } => continue,
            };
            if !found.listed.contains(&canonical(path)) {
                found.out.push(o);
            }
        }
        let looked = format!(
            "looked at the {} other domains on {}, the {} overlays registered by tpl-clone \
             ({live_registered} still there), and {}",
            others.len(),
            shown(&self.session.uri),
            registered.len(),
            if dirs.is_empty() {
                "no directory (no image file, no storage pool)".to_string()
            } else {
                format!(
                    "the qcow2 files in {}",
                    crate::text::list(dirs.iter().map(|d| shown_path(d)), ", ")
                )
            }
        );
        Ok(Dependents {
            list: found.out,
            looked,
        })
    }

    /// The directories whose qcow2 files may back onto `images`: theirs, and the storage
    /// pools'. A pool's directory of another host is not this machine's directory of the
    /// same path: its files are not scanned here. One that cannot be told is scanned: a
    /// dependent found wrongly only refuses, one missed could be corrupted.
    fn scan_dirs(&self, images: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut dirs: Vec<PathBuf> = images
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.extend(self.session.pool_dirs()?.into_iter().map(|(_, p)| p));
        dirs.sort();
        dirs.dedup();
        dirs.retain(|d| !self.session.proven_other_files(d));
        Ok(dirs)
    }
}

/// What the dependents search has found so far, and which files it has listed.
#[derive(Default)]
struct Found {
    /// The images looked for, canonical.
    wanted: Vec<PathBuf>,
    out: Vec<Dependent>,
    listed: Vec<PathBuf>,
}

impl Found {
    fn reaches(&self, chain: &[PathBuf]) -> bool {
        chain.iter().any(|p| self.wanted.contains(&canonical(p)))
    }

    /// Other domains whose file disks are, or back onto, the images.
    fn domains(&mut self, others: &[OtherDomain]) {
        for other in others {
            for disk in &other.disks {
                let Some(path) = disk.path.clone().filter(|_| disk.kind == DiskKind::File) else {
                    continue;
                };
                let mut chain = vec![path.clone()];
                // qemu reads a header only from a disk it is told is qcow2.
                let mut unreadable = None;
                if disk.format.as_deref() == Some("qcow2") {
                    let (links, err) = image::readable_chain(&path);
                    chain.extend(links.into_iter().map(|b| b.path));
                    // A chain too long or looping is one qemu refuses to open: nothing
                    // runs on it. A file that could not be read may hide one that does.
                    unreadable =
                        err.filter(|e| matches!(e, Error::Io { .. }) && !image::is_not_found(e));
                }
                if self.reaches(&chain) {
                    self.listed.push(canonical(&path));
                    self.out.push(Dependent::Domain {
                        name: other.files.name.clone(),
                        target: disk.target.clone(),
                        path,
                    });
                } else if let Some(e) = unreadable {
                    // Part of the chain could not be read: it may reach the images below.
                    self.listed.push(canonical(&path));
                    self.out.push(Dependent::Unchecked {
                        path,
                        reason: format!(
                            "disk {} of domain '{}': {e}",
                            disk.target,
                            shown(&other.files.name)
                        ),
                    });
                }
            }
        }
    }

    /// The overlays tpl-clone registered that still back onto the images (wherever they
    /// are); returns how many of them are still there.
    fn registered(&mut self, registered: &[Registered]) -> usize {
        let mut live = 0;
        for r in registered {
            if self.listed.contains(&canonical(&r.path)) {
                live += 1;
                continue;
            }
            let (links, err) = image::readable_chain(&r.path);
            let backing: Vec<PathBuf> = links.into_iter().map(|b| b.path).collect();
            if self.reaches(&backing) {
                live += 1;
                self.listed.push(canonical(&r.path));
                self.out.push(Dependent::Registered {
                    path: r.path.clone(),
                    clone_name: r.clone_name.clone(),
                });
            } else if let Some(e) = err.filter(|e| !image::is_not_found(e)) {
                self.listed.push(canonical(&r.path));
                self.out.push(Dependent::Unchecked {
                    path: r.path.clone(),
                    reason: format!(
                        "the overlay of clone '{}' registered by tpl-clone: {e}",
                        shown(&r.clone_name)
                    ),
                });
            }
        }
        live
    }
}

#[cfg(test)]
mod tests {
    //! The libvirt layer against libvirt's own `test:///default` driver (a real libvirt,
    //! in-process); the tools themselves are proven on qemu:///system in tests/.
    use super::*;

    fn session() -> Session {
        Session::open("test:///default").unwrap()
    }

    #[test]
    fn looks_up_by_uuid_first_then_name() {
        let s = session();
        let by_name = Dom::lookup(&s, &DomainRef::by_arg("test")).unwrap();
        assert_eq!(by_name.name, "test");
        // A stale name in a record does not matter when the UUID is there.
        let r = DomainRef {
            uuid: Some(by_name.uuid.clone()),
            name: Some("stale".into()),
            ..Default::default()
        };
        assert_eq!(Dom::lookup(&s, &r).unwrap().name, "test");
        // A name argument that is a UUID works as in virsh.
        assert_eq!(
            Dom::lookup(&s, &DomainRef::by_arg(&by_name.uuid))
                .unwrap()
                .name,
            "test"
        );
    }

    #[test]
    fn dac_labels() {
        assert_eq!(parse_dac_label("+64055:+64055"), Some((64055, 64055)));
        assert_eq!(parse_dac_label("107:108"), Some((107, 108)));
        assert_eq!(parse_dac_label("qemu:kvm"), None);
    }

    #[test]
    fn unknown_domains_are_bad_input() {
        let s = session();
        let e = s.lookup(&DomainRef::by_arg("no-such-domain")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("'no-such-domain' not found"), "{e}");
        let r = DomainRef {
            uuid: Some("00000000-0000-0000-0000-00000000abcd".into()),
            ..Default::default()
        };
        assert_eq!(s.lookup(&r).unwrap_err().exit_code(), 2);
        let r = DomainRef {
            uuid: Some("not-a-uuid".into()),
            name: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(s.lookup(&r).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn describes_and_keeps_metadata() {
        let s = session();
        let d = Dom::lookup(&s, &DomainRef::by_arg("test")).unwrap();
        let rec = d.describe().unwrap();
        assert_eq!(rec.uri, "test:///default");
        assert_eq!(rec.state, State::Running);
        assert!(d
            .require_shut_off("rename")
            .unwrap_err()
            .to_string()
            .contains("it is running"));
        let mut m = d.meta().unwrap();
        m.record_step("tpl-test", "hello");
        d.set_meta(&m).unwrap();
        assert_eq!(d.meta().unwrap().history.last().unwrap().detail, "hello");
        assert_eq!(
            d.describe().unwrap().history.last().unwrap().tool,
            "tpl-test"
        );
        assert!(s.name_taken("test").unwrap());
        assert!(!s.name_taken("free-name").unwrap());
    }

    #[test]
    fn a_domain_disk_that_cannot_be_read_through_is_an_unchecked_dependent() {
        use std::os::unix::ffi::OsStrExt;
        let s = session();
        let d = tempfile::tempdir().unwrap();
        let (image, disk) = (d.path().join("tpl.qcow2"), d.path().join("odd.qcow2"));
        let qemu_img = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new("qemu-img").args(args).output();
            assert!(out.expect("qemu-img (make deps)").status.success());
        };
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            image.as_os_str(),
            "1M".as_ref(),
        ]);
        // Its backing file name is not UTF-8: where the chain leads is unknown.
        let odd = std::ffi::OsStr::from_bytes(b"/nowhere/\xff.qcow2");
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-u".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            odd,
            disk.as_os_str(),
            "1M".as_ref(),
        ]);
        let xml = format!(
            "<domain type='test'><name>odd-disk</name><memory>65536</memory>\
             <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda'/>\
             </disk></devices></domain>",
            disk.display()
        );
        let odd_dom = s.conn.define_domain_xml(&xml).unwrap();
        let tpl = Dom::lookup(&s, &DomainRef::by_arg("test")).unwrap();
        let others = tpl.others().unwrap();
        let deps = tpl
            .dependents(std::slice::from_ref(&image), &others, &[])
            .unwrap();
        odd_dom.undefine().unwrap();
        assert!(
            deps.looked.contains("registered by tpl-clone"),
            "{}",
            deps.looked
        );
        assert!(
            deps.list
                .iter()
                .any(|x| matches!(x, Dependent::Unchecked { path, reason }
                if path == &disk && reason.contains("odd-disk"))),
            "{deps:?}"
        );
    }
}

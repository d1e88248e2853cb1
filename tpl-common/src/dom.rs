//! One domain of a session: lookups by UUID or name, its definition, metadata and state, its record, its own files and the other domains beside it.

use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use crate::domxml::DomainXml;
use crate::error::{Error, Result};
use crate::image;
use crate::meta::{self, Meta};
use crate::ownfiles::{OtherFiles, OwnFiles};
use crate::record::{Disk, DiskKind, DomainRef, Record, State, SCHEMA};
use crate::session::{is_code, state_of, Session};
use crate::text::{shown, shown_path};
/// Another domain of the connection, as the checks of a domain's files need it.
#[derive(Debug, Clone)]
pub struct OtherDomain {
    pub uuid: String,
    /// The files it names (for the sharing check).
    pub files: OtherFiles,
    /// Its disks, for the backing chains of the dependents check.
    pub disks: Vec<Disk>,
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

/// The definitions of many domains, as [`Dom::xml`] reads each, fetched and parsed by a
/// few threads at once: a listing of 1000 domains waits on 1000 round trips to libvirtd,
/// which overlap (the connection is thread-safe), and parses 1000 documents on every core.
/// In the order of `domains`.
pub fn definitions(domains: &[Domain]) -> Vec<Result<DomainXml>> {
    const THREADS: usize = 8;
    let read = |d: &Domain| definition(d, || d.name().unwrap_or_default());
    if domains.len() < 2 * THREADS {
        return domains.iter().map(read).collect();
    }
    let chunk = domains.len().div_ceil(THREADS);
    std::thread::scope(|sc| {
        let handles: Vec<_> = domains
            .chunks(chunk)
            .map(|part| sc.spawn(move || part.iter().map(read).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a definition reader panicked"))
            .collect()
    })
}

/// The persistent definition of `d` (what the next start uses), with security info;
/// `name` names the domain in the error.
fn definition(d: &Domain, name: impl FnOnce() -> String) -> Result<DomainXml> {
    let flags = sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE;
    let xml = d.xml_desc(flags).map_err(|e| {
        Error::libvirt(
            format!("cannot read the definition of domain '{}'", name()),
            e,
        )
    })?;
    DomainXml::parse(&xml)
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
        definition(&self.dom, || self.name.clone())
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
            // A clone's seed is read-only to the guest but the clone's own file.
            let seed = m.clone.as_ref().and_then(|c| c.seed.as_deref());
            if d.path.is_some() && d.path.as_deref() == seed {
                d.own = true;
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
            ready: None,
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
}

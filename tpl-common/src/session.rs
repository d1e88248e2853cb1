//! The libvirt connection: opening it as virsh does, finding domains, storage pools, whether the hypervisor sees this host's files, the qemu user. One domain is `dom`, what depends on its images `dependents`.

use std::path::{Path, PathBuf};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::sys;

use crate::domxml::DomainXml;
use crate::error::{Error, Result};
use crate::image::canonical;
use crate::rbd::{Ceph, CephOptions};
use crate::record::{DomainRef, State};
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
    pub(crate) overlays: std::cell::RefCell<crate::overlays::OverlayIndex>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("uri", &self.uri).finish()
    }
}

pub(crate) fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
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

/// A session on libvirt's own `test:///default` driver (a real libvirt, in-process), for
/// the unit tests of the libvirt layer; the tools are proven on qemu:///system in tests/.
#[cfg(test)]
pub(crate) fn test_session() -> Session {
    Session::open("test:///default").unwrap()
}

#[cfg(test)]
mod tests {
    use super::test_session as session;
    use super::*;
    use crate::dom::Dom;

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
}

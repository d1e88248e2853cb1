//! What depends on a domain's images: other domains whose chains reach them, the overlays tpl-clone registered, qcow2 files in the images' and pools' directories, and the clones of RBD snapshots.

use std::path::{Path, PathBuf};

use crate::dom::{Dom, OtherDomain};
use crate::error::{Error, Result};
use crate::image::{self, canonical, Dependent};
use crate::meta::Registered;
use crate::ownfiles::OwnFiles;
use crate::rbd;
use crate::record::DiskKind;
use crate::text::{shown, shown_path};
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

impl Dom<'_> {
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
    use super::*;
    use crate::record::DomainRef;
    use crate::session::test_session as session;

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

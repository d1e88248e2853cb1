//! A domain's own files (its writable file disks and its NVRAM file), with the one set of refusals and the one naming rule that tpl-lock, tpl-rename, tpl-clone and tpl-refresh share.
//!
//! "Own" means the domain writes it and nothing else should: what lock makes read-only,
//! clone copies or overlays, `rename --disks` renames. A writable disk that is not a file
//! (a block device, a network or volume disk), a symbolic link, something that is not a
//! regular file, or a file another domain also names is refused here, for every tool
//! alike, with one message each; CD-ROMs, `<readonly/>` and `<shareable/>` disks are not
//! own files and are shared by design.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domxml::DomainXml;
use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::record::RbdSource;
use crate::text::{shown, shown_path};

/// What an own file is to its domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Role {
    /// The image of the disk with this target (`vda`).
    Disk { target: String },
    /// The UEFI variables file.
    Nvram,
    /// A clone's NoCloud seed, the read-only disk with this target: tpl-clone made it,
    /// so it is the clone's own although the guest does not write it.
    Seed { target: String },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Disk { target } => write!(f, "disk {target}"),
            Role::Nvram => f.write_str("NVRAM"),
            Role::Seed { target } => write!(f, "seed disk {target}"),
        }
    }
}

/// One own file, as it was when it was checked.
#[derive(Debug, Clone)]
pub struct OwnFile {
    pub role: Role,
    pub path: PathBuf,
    /// The disk's format from the definition (None for the NVRAM, or when not given).
    pub format: Option<String>,
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for OwnFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}'", self.role, shown_path(&self.path))
    }
}

impl OwnFile {
    /// Whether `path` is this very file now (same device and inode).
    pub fn is_at(&self, path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

/// A domain's own RBD image: a writable disk on Ceph.
#[derive(Debug, Clone)]
pub struct OwnRbd {
    pub target: String,
    pub source: RbdSource,
}

impl fmt::Display for OwnRbd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "disk {} '{}'",
            self.target,
            shown(&self.source.to_string())
        )
    }
}

/// A domain's own files and RBD images, each checked.
#[derive(Debug, Clone, Default)]
pub struct OwnFiles {
    pub files: Vec<OwnFile>,
    /// Its RBD disks, handled disk by disk beside the files.
    pub rbd: Vec<OwnRbd>,
    /// An NVRAM file the definition names that does not exist yet: libvirt makes it from
    /// its template at the first start. Every tool skips it, with a note.
    pub missing_nvram: Option<PathBuf>,
}

impl OwnFiles {
    /// Read the own files of domain `name` from its definition, refusing (exit 3) what
    /// no tool may treat as the domain's own; `action` is what the caller is about to do
    /// ("lock", "clone", "rename the files of"), for the messages. A missing disk image is
    /// a failure (exit 1): nothing unsafe was asked, the domain is broken.
    pub fn of(name: &str, x: &DomainXml, action: &str) -> Result<OwnFiles> {
        let refuse =
            |why: String| Error::refused(format!("cannot {action} domain '{}'", shown(name)), why);
        let mut out = OwnFiles::default();
        for d in x.disks().into_iter().filter(|d| d.is_writable()) {
            if let Some(source) = d.rbd {
                out.rbd.push(OwnRbd {
                    target: d.target,
                    source,
                });
                continue;
            }
            if !d.kind.is_volume() {
                let src = d
                    .path
                    .as_ref()
                    .map(|p| format!(" '{}'", shown_path(p)))
                    .unwrap_or_default();
                return Err(refuse(format!(
                    "its disk {} is a {} disk{src} that it writes to, and tpl handles only \
                     file and RBD disks as a domain's own; detach it, or mark it <readonly/> \
                     or <shareable/> if it is meant to be shared",
                    d.target,
                    d.kind.as_str()
                )));
            }
            // A file disk without a source (an empty floppy): nothing there.
            let Some(path) = d.path else { continue };
            let role = Role::Disk { target: d.target };
            let (dev, ino) = check_file(&refuse, name, action, &role, &path)?
                .expect("a disk image is never allowed to be missing");
            out.files.push(OwnFile {
                role,
                path,
                format: d.format,
                dev,
                ino,
            });
        }
        // A clone's seed: a read-only file disk, named by the clone's metadata. One that
        // is gone has nothing left to act on.
        let seed = Meta::of_definition(x).ok().and_then(|m| m.clone?.seed);
        if let Some(seed) = seed {
            if let Some(d) = x
                .disks()
                .into_iter()
                .find(|d| !d.is_writable() && d.path.as_deref() == Some(seed.as_path()))
            {
                let role = Role::Seed { target: d.target };
                if let Some((dev, ino)) = check_file(&refuse, name, action, &role, &seed)? {
                    out.files.push(OwnFile {
                        role,
                        path: seed,
                        format: Some("raw".into()),
                        dev,
                        ino,
                    });
                }
            }
        }
        if let Some(why) = x.nvram_not_a_file() {
            return Err(refuse(format!(
                "{why}: every clone would share it and write to it, and a mode cannot lock \
                 it; tpl handles only an NVRAM file"
            )));
        }
        if let Some(nv) = x.nvram() {
            match check_file(&refuse, name, action, &Role::Nvram, &nv)? {
                Some((dev, ino)) => out.files.push(OwnFile {
                    role: Role::Nvram,
                    path: nv,
                    format: None,
                    dev,
                    ino,
                }),
                None => out.missing_nvram = Some(nv),
            }
        }
        Ok(out)
    }

    /// The disk images, without the NVRAM.
    pub fn disks(&self) -> impl Iterator<Item = &OwnFile> {
        self.files
            .iter()
            .filter(|f| matches!(f.role, Role::Disk { .. }))
    }

    /// The paths of the disk images.
    pub fn images(&self) -> Vec<PathBuf> {
        self.disks().map(|f| f.path.clone()).collect()
    }

    /// The note every tool gives for an NVRAM that does not exist yet.
    pub fn missing_nvram_note(&self, name: &str) -> Option<String> {
        self.missing_nvram.as_ref().map(|nv| {
            format!(
                "domain '{}': its NVRAM file '{}' does not exist yet (libvirt makes it at the \
                 first start); nothing to do with it",
                shown(name),
                shown_path(nv)
            )
        })
    }

    /// Refuse (exit 3) when another domain names one of these files as a disk or its NVRAM:
    /// such a file is neither domain's own, and renaming, locking or copying it as one
    /// would break or silently change the other domain.
    pub fn check_not_shared<'a>(
        &self,
        name: &str,
        action: &str,
        others: impl IntoIterator<Item = &'a OtherFiles> + Clone,
    ) -> Result<()> {
        self.check_not_shared_by(
            name,
            action,
            |image| {
                others.clone().into_iter().find_map(|o| {
                    o.rbd
                        .iter()
                        .find(|(_, n)| n == image)
                        .map(|(t, _)| (o.name.clone(), t.clone()))
                })
            },
            |f| {
                others
                    .clone()
                    .into_iter()
                    .find_map(|o| o.names(f).map(|how| (o.name.clone(), how)))
            },
        )
    }

    /// [`Self::check_not_shared`] with the lookups given: which other domain has an RBD
    /// image as a disk (its name and the disk's target), and which other domain names a
    /// file, and how (its name and "the disk vdb image" or "the NVRAM"). A batch that
    /// checks many domains against the same others answers from an index.
    pub fn check_not_shared_by(
        &self,
        name: &str,
        action: &str,
        rbd_user: impl Fn(&str) -> Option<(String, String)>,
        file_user: impl Fn(&OwnFile) -> Option<(String, String)>,
    ) -> Result<()> {
        for r in &self.rbd {
            if let Some((other, t)) = rbd_user(&r.source.name()) {
                return Err(Error::refused(
                    format!("cannot {action} domain '{}'", shown(name)),
                    format!(
                        "its {r} is also the disk {t} image of domain '{}', so it is not \
                         this domain's own; give each domain its own image first",
                        shown(&other)
                    ),
                ));
            }
        }
        for f in &self.files {
            if let Some((other, how)) = file_user(f) {
                return Err(Error::refused(
                    format!("cannot {action} domain '{}'", shown(name)),
                    format!(
                        "its {f} is also {how} of domain '{}', so it is not this domain's \
                         own; give each domain its own copy first (or mark a shared disk \
                         <shareable/> in both)",
                        shown(&other)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The files another domain names: what the sharing check compares with.
#[derive(Debug, Clone)]
pub struct OtherFiles {
    pub name: String,
    /// Its disks' top-level sources (not their backing chains: a linked clone's overlay
    /// backs onto the template's image without sharing it) with their targets.
    pub disks: Vec<(String, PathBuf)>,
    /// Its RBD disks' images (`POOL/IMAGE`) with their targets.
    pub rbd: Vec<(String, String)>,
    pub nvram: Option<PathBuf>,
}

impl OtherFiles {
    /// How this domain names the file, if it does: "the disk vdb image", "the NVRAM".
    fn names(&self, f: &OwnFile) -> Option<String> {
        let same =
            |p: &Path| f.is_at(p) || crate::image::canonical(p) == crate::image::canonical(&f.path);
        self.named().find(|(p, _)| same(p)).map(|(_, how)| how)
    }

    /// Each file this domain names, with how: "the disk vdb image", "the NVRAM".
    pub fn named(&self) -> impl Iterator<Item = (&Path, String)> {
        self.disks
            .iter()
            .map(|(t, p)| (p.as_path(), format!("the disk {t} image")))
            .chain(self.nvram.as_deref().map(|p| (p, "the NVRAM".to_string())))
    }
}

/// Check one own file: a regular file, not through a symbolic link. Its device and inode,
/// or None for an NVRAM that does not exist yet.
fn check_file(
    refuse: &dyn Fn(String) -> Error,
    name: &str,
    action: &str,
    role: &Role,
    path: &Path,
) -> Result<Option<(u64, u64)>> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && matches!(role, Role::Nvram | Role::Seed { .. }) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(Error::failed(
                format!("cannot {action} domain '{}'", shown(name)),
                format!(
                    "its {role} image '{}' cannot be read: {e}",
                    shown_path(path)
                ),
            ))
        }
    };
    if m.file_type().is_symlink() {
        return Err(refuse(format!(
            "its {role} '{}' is a symbolic link, and tpl never follows one (it would act on \
             whatever the link points to); point the domain at the real file with 'virsh edit \
             {}'",
            shown_path(path),
            shown(name)
        )));
    }
    if !m.file_type().is_file() {
        return Err(refuse(format!(
            "its {role} '{}' is not a regular file",
            shown_path(path)
        )));
    }
    Ok(Some((m.dev(), m.ino())))
}

/// What a per-domain file is to the naming rule.
#[derive(Debug, Clone, Copy)]
pub enum Naming<'a> {
    /// A disk image: `target` names it when the file is not named after the domain and the
    /// domain has `several` disks; `ext` replaces its extension (a linked clone's overlay
    /// is qcow2 whatever the template's image is).
    Disk {
        target: &'a str,
        several: bool,
        ext: Option<&'a str>,
    },
    /// The NVRAM file: libvirt's own convention, `NAME_VARS.fd`, when it is not named
    /// after the domain.
    Nvram,
    /// Any other per-domain host file (a serial log, a socket): the new name in front.
    Host,
}

/// The one naming rule for a domain's file when the domain is renamed or cloned from `old`
/// to `new`, as virt-clone names a clone's disks: a file named after the domain (the name
/// is the whole stem, or the start of it followed by `.`, `-` or `_`: `VM.qcow2`,
/// `VM-data.qcow2`, `VM_VARS.fd`, `VM.console.log`) gets the new name in its place, and
/// nothing but that place changes (`deb` does not touch `debug.log`). Any other file is
/// named after the new domain as [`Naming`] says.
pub fn renamed_file(path: &Path, old: &str, new: &str, naming: Naming) -> PathBuf {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let after_old = file
        .strip_prefix(old)
        .filter(|rest| !old.is_empty() && (rest.is_empty() || rest.starts_with(['.', '-', '_'])));
    let name = match (after_old, naming) {
        (Some(rest), Naming::Disk { ext: Some(ext), .. }) => {
            let (stem, _) = split_ext(rest);
            format!("{new}{stem}.{ext}")
        }
        (Some(rest), _) => format!("{new}{rest}"),
        (
            None,
            Naming::Disk {
                target,
                several,
                ext,
            },
        ) => {
            let ext = ext.map(str::to_string).or_else(|| {
                let (_, e) = split_ext(&file);
                e.map(str::to_string)
            });
            let mut n = new.to_string();
            if several {
                n.push('-');
                n.push_str(target);
            }
            if let Some(e) = ext {
                n.push('.');
                n.push_str(&e);
            }
            n
        }
        (None, Naming::Nvram) => format!("{new}_VARS.fd"),
        (None, Naming::Host) => format!("{new}-{file}"),
    };
    path.with_file_name(name)
}

/// A file name's stem and extension, the extension only when it is 1 to 7 characters
/// (virt-clone's rule: a longer "extension" is part of the name).
fn split_ext(file: &str) -> (&str, Option<&str>) {
    match file.rsplit_once('.') {
        Some((stem, ext)) if !ext.is_empty() && ext.len() <= 7 && !ext.contains('-') => {
            (stem, Some(ext))
        }
        _ => (file, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(target: &str, several: bool) -> Naming<'_> {
        Naming::Disk {
            target,
            several,
            ext: None,
        }
    }

    #[test]
    fn the_one_naming_rule() {
        let r = |p: &str, n: Naming| renamed_file(Path::new(p), "VM", "Tpl", n);
        let p = PathBuf::from;
        assert_eq!(r("/i/VM.qcow2", disk("vda", false)), p("/i/Tpl.qcow2"));
        assert_eq!(
            r("/i/VM-data.qcow2", disk("vdb", true)),
            p("/i/Tpl-data.qcow2")
        );
        assert_eq!(r("/n/VM_VARS.fd", Naming::Nvram), p("/n/Tpl_VARS.fd"));
        assert_eq!(r("/n/other_VARS.fd", Naming::Nvram), p("/n/Tpl_VARS.fd"));
        assert_eq!(r("/i/VMware.img", disk("vda", false)), p("/i/Tpl.img"));
        assert_eq!(r("/i/disk.img", disk("vdb", true)), p("/i/Tpl-vdb.img"));
        assert_eq!(r("/i/VM", disk("vda", false)), p("/i/Tpl"));
        assert_eq!(
            r("/l/VM.console.log", Naming::Host),
            p("/l/Tpl.console.log")
        );
        assert_eq!(r("/l/serial.log", Naming::Host), p("/l/Tpl-serial.log"));
        // The template's name is a stem, never a piece of another word.
        let c = |p: &str, n: Naming| renamed_file(Path::new(p), "deb", "c1", n);
        assert_eq!(c("/l/debug.log", Naming::Host), p("/l/c1-debug.log"));
        assert_eq!(c("/l/deb.log", Naming::Host), p("/l/c1.log"));
        // A linked clone's overlay is qcow2 whatever the template's image is.
        let linked = Naming::Disk {
            target: "vda",
            several: false,
            ext: Some("qcow2"),
        };
        assert_eq!(r("/i/VM.img", linked), p("/i/Tpl.qcow2"));
        assert_eq!(r("/i/VM-data.raw", linked), p("/i/Tpl-data.qcow2"));
        assert_eq!(r("/i/base", linked), p("/i/Tpl.qcow2"));
        // A long "extension" is part of the name (virt-clone).
        assert_eq!(r("/i/disk.verylongext", disk("vda", false)), p("/i/Tpl"));
    }

    const XML: &str = r#"<domain type='qemu'><name>A</name>
      <os><type>hvm</type><nvram>NVRAM</nvram></os>
      <devices>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='DISK'/><target dev='vda'/></disk>
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>
      </devices></domain>"#;

    fn xml(disk: &Path, nvram: &Path) -> DomainXml {
        DomainXml::parse(
            &XML.replace("DISK", disk.to_str().unwrap())
                .replace("NVRAM", nvram.to_str().unwrap()),
        )
        .unwrap()
    }

    #[test]
    fn own_files_and_their_refusals() {
        let d = tempfile::tempdir().unwrap();
        let (img, nv) = (d.path().join("A.qcow2"), d.path().join("A_VARS.fd"));
        fs::write(&img, "x").unwrap();
        // An NVRAM that does not exist yet is noted, not refused.
        let own = OwnFiles::of("A", &xml(&img, &nv), "lock").unwrap();
        assert_eq!(own.files.len(), 1);
        assert_eq!(own.missing_nvram.as_deref(), Some(nv.as_path()));
        assert!(own
            .missing_nvram_note("A")
            .unwrap()
            .contains("does not exist yet"));
        fs::write(&nv, "v").unwrap();
        let own = OwnFiles::of("A", &xml(&img, &nv), "lock").unwrap();
        assert_eq!(own.files.len(), 2);
        assert_eq!(own.images(), std::slice::from_ref(&img));
        assert!(own.files[1].is_at(&nv));

        // Shared with another domain: refused, naming it.
        let other = OtherFiles {
            name: "B".into(),
            disks: vec![("vdb".into(), d.path().join("B.qcow2"))],
            rbd: Vec::new(),
            nvram: Some(nv.clone()),
        };
        let e = own
            .check_not_shared("A", "rename the files of", &[other])
            .unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert!(
            e.to_string().contains("also the NVRAM of domain 'B'"),
            "{e}"
        );

        // A symbolic link, a missing image.
        let link = d.path().join("link.qcow2");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let e = OwnFiles::of("A", &xml(&link, &nv), "lock").unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = OwnFiles::of("A", &xml(&d.path().join("gone.qcow2"), &nv), "clone").unwrap_err();
        assert_eq!(e.exit_code(), 1);
        // A writable disk that is not a file.
        let net = XML.replace(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='DISK'/>",
            "<disk type='network' device='disk'><source protocol='nbd' name='x'/>",
        );
        let net = DomainXml::parse(&net.replace("NVRAM", nv.to_str().unwrap())).unwrap();
        let e = OwnFiles::of("A", &net, "clone").unwrap_err();
        assert!(e.to_string().contains("is a network disk"), "{e}");
    }
}

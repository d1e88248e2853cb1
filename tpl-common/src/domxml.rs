//! Reading and editing libvirt domain XML (disks, NVRAM, name) as a tree.

use std::path::{Path, PathBuf};

use xmltree::{Element, EmitterConfig, XMLNode};

use crate::error::{Error, Result};
use crate::record::{Device, Disk, DiskKind, RbdSource};

/// A parsed domain definition. Edits go through the tree and are written back whole.
#[derive(Debug, Clone)]
pub struct DomainXml {
    pub root: Element,
}

impl DomainXml {
    pub fn parse(xml: &str) -> Result<Self> {
        let root = Element::parse(xml.as_bytes()).map_err(|e| {
            Error::failed(
                "cannot parse the domain XML libvirt returned",
                e.to_string(),
            )
        })?;
        Ok(DomainXml { root })
    }

    pub fn to_xml(&self) -> String {
        let mut out = Vec::new();
        let cfg = EmitterConfig::new()
            .perform_indent(true)
            .write_document_declaration(false);
        self.root
            .write_with_config(&mut out, cfg)
            .expect("writing XML to memory cannot fail");
        String::from_utf8(out).expect("xmltree writes UTF-8")
    }

    pub fn name(&self) -> Option<String> {
        self.root
            .get_child("name")
            .and_then(|e| e.get_text())
            .map(|t| t.trim().to_string())
    }

    /// The `<disk>` elements under `<devices>`.
    pub fn disk_elements(&self) -> impl Iterator<Item = &Element> {
        self.root
            .get_child("devices")
            .into_iter()
            .flat_map(|d| children_named(d, "disk"))
    }

    pub fn disk_elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.root
            .get_mut_child("devices")
            .into_iter()
            .flat_map(|d| children_named_mut(d, "disk"))
    }

    /// The disks as the record shows them, without backing chains (see `image`).
    pub fn disks(&self) -> Vec<Disk> {
        self.disk_elements().map(disk_of).collect()
    }

    /// Point the disk with this target at a new file.
    pub fn set_disk_path(&mut self, target: &str, path: &Path) -> Result<()> {
        let disk = self
            .disk_elements_mut()
            .find(|d| disk_target(d).as_deref() == Some(target))
            .ok_or_else(|| {
                Error::failed(
                    format!("no disk '{target}' in the definition"),
                    "it changed meanwhile?",
                )
            })?;
        let source = disk.get_mut_child("source").ok_or_else(|| {
            Error::failed(
                format!("disk '{target}' has no <source>"),
                "nothing to point elsewhere",
            )
        })?;
        source
            .attributes
            .insert("file".into(), path.display().to_string());
        Ok(())
    }

    /// Point the RBD disk with this target at another image of its pool (`image`), at
    /// `snapshot` or at its head.
    pub fn set_rbd_image(
        &mut self,
        target: &str,
        image: &str,
        snapshot: Option<&str>,
    ) -> Result<()> {
        self.set_rbd_source(target, None, image, snapshot)
    }

    /// Point the RBD disk with this target at `POOL[/NS]/IMAGE` (`name`; None keeps its
    /// pool and namespace and takes `image`), at `snapshot` or at its head.
    pub fn set_rbd_source(
        &mut self,
        target: &str,
        name: Option<&str>,
        image: &str,
        snapshot: Option<&str>,
    ) -> Result<()> {
        let disk = self
            .disk_elements_mut()
            .find(|d| disk_target(d).as_deref() == Some(target))
            .ok_or_else(|| {
                Error::failed(
                    format!("no disk '{target}' in the definition"),
                    "it changed meanwhile?",
                )
            })?;
        let src = disk
            .get_mut_child("source")
            .filter(|s| s.attributes.get("protocol").map(String::as_str) == Some("rbd"))
            .ok_or_else(|| {
                Error::failed(
                    format!("disk '{target}' is not an RBD disk"),
                    "it changed meanwhile?",
                )
            })?;
        let new = match name {
            Some(n) => n.to_string(),
            None => {
                let old = src.attributes.get("name").cloned().unwrap_or_default();
                let (prefix, _) = old.rsplit_once('/').unwrap_or(("", ""));
                format!("{prefix}/{image}")
            }
        };
        src.attributes.insert("name".into(), new);
        src.children
            .retain(|c| c.as_element().is_none_or(|e| e.name != "snapshot"));
        if let Some(snap) = snapshot {
            let mut e = Element::new("snapshot");
            e.attributes.insert("name".into(), snap.into());
            src.children.push(XMLNode::Element(e));
        }
        Ok(())
    }

    /// The NVRAM file, when the domain has one: `<os><nvram>PATH</nvram>`, or the form
    /// libvirt 8.5 added and keeps when a definition uses it,
    /// `<nvram type='file'><source file='PATH'/></nvram>`.
    pub fn nvram(&self) -> Option<PathBuf> {
        let nv = self.root.get_child("os")?.get_child("nvram")?;
        if let Some(source) = nv.get_child("source") {
            let file = source.attributes.get("file")?;
            return (!file.is_empty()).then(|| PathBuf::from(file));
        }
        let text = nv.get_text()?;
        let text = text.trim();
        (!text.is_empty()).then(|| PathBuf::from(text))
    }

    /// What the NVRAM is when it is not a file (`<nvram type='block'|'network'>`), for the
    /// tools to refuse: each clone would share it, and chmod cannot lock it.
    pub fn nvram_not_a_file(&self) -> Option<String> {
        let nv = self.root.get_child("os")?.get_child("nvram")?;
        let ty = nv
            .attributes
            .get("type")
            .map(String::as_str)
            .unwrap_or("file");
        (ty != "file").then(|| format!("its NVRAM is a {ty} NVRAM, not a file"))
    }

    /// Point the NVRAM at a new file, in the form the definition already uses.
    pub fn set_nvram(&mut self, path: &Path) -> Result<()> {
        let nv = self
            .root
            .get_mut_child("os")
            .and_then(|os| os.get_mut_child("nvram"))
            .ok_or_else(|| {
                Error::failed("the definition has no <nvram>", "it changed meanwhile?")
            })?;
        let path = path.display().to_string();
        match nv.get_mut_child("source") {
            Some(source) => {
                source.attributes.insert("file".into(), path);
            }
            None => nv.children = vec![XMLNode::Text(path)],
        }
        Ok(())
    }
}

pub fn children_named<'a>(e: &'a Element, name: &'a str) -> impl Iterator<Item = &'a Element> {
    e.children
        .iter()
        .filter_map(move |c| c.as_element().filter(|c| c.name == name))
}

pub fn children_named_mut<'a>(
    e: &'a mut Element,
    name: &'a str,
) -> impl Iterator<Item = &'a mut Element> {
    e.children.iter_mut().filter_map(move |c| match c {
        XMLNode::Element(c) if c.name == name => Some(c),
        _ => None,
    })
}

pub fn disk_target(disk: &Element) -> Option<String> {
    disk.get_child("target")?.attributes.get("dev").cloned()
}

fn disk_of(d: &Element) -> Disk {
    let attr = |e: Option<&Element>, a: &str| e.and_then(|e| e.attributes.get(a).cloned());
    let source = d.get_child("source");
    let rbd = rbd_source(d);
    let kind = match &rbd {
        Some(_) => DiskKind::Rbd,
        None => DiskKind::parse(d.attributes.get("type").map_or("file", String::as_str)),
    };
    let path = match kind {
        DiskKind::File => attr(source, "file"),
        DiskKind::Block => attr(source, "dev"),
        DiskKind::Dir => attr(source, "dir"),
        _ => None,
    };
    let mut disk = Disk {
        target: disk_target(d).unwrap_or_default(),
        device: Device::parse(d.attributes.get("device").map_or("disk", String::as_str)),
        kind,
        path: path.map(PathBuf::from),
        format: attr(d.get_child("driver"), "type"),
        readonly: d.get_child("readonly").is_some(),
        shareable: d.get_child("shareable").is_some(),
        own: false,
        backing: Vec::new(),
        rbd,
    };
    // A disk of a kind tpl handles, naming its file or image (an empty floppy names none).
    disk.own =
        disk.is_writable() && disk.kind.is_volume() && (disk.path.is_some() || disk.rbd.is_some());
    disk
}

/// An RBD disk's source (`<disk type='network'><source protocol='rbd' name='POOL/IMAGE'>`).
fn rbd_source(d: &Element) -> Option<RbdSource> {
    if d.attributes.get("type").map(String::as_str) != Some("network") {
        return None;
    }
    let src = d.get_child("source")?;
    if src.attributes.get("protocol").map(String::as_str) != Some("rbd") {
        return None;
    }
    let name = src.attributes.get("name")?;
    let parts: Vec<&str> = name.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [p, i] => (p.to_string(), String::new(), i.to_string()),
        [p, n, i] => (p.to_string(), n.to_string(), i.to_string()),
        _ => return None,
    };
    let hosts = children_named(src, "host")
        .filter_map(|h| {
            let name = h.attributes.get("name")?;
            Some(match h.attributes.get("port") {
                Some(p) => format!("{name}:{p}"),
                None => name.clone(),
            })
        })
        .collect();
    let auth = d.get_child("auth").or_else(|| src.get_child("auth"));
    Some(RbdSource {
        pool,
        namespace,
        image,
        snapshot: src
            .get_child("snapshot")
            .and_then(|s| s.attributes.get("name").cloned()),
        hosts,
        user: auth.and_then(|a| a.attributes.get("username").cloned()),
        secret: auth
            .and_then(|a| a.get_child("secret"))
            .and_then(|s| s.attributes.get("uuid").cloned()),
    })
}

impl Disk {
    /// A disk the domain writes to (not a CD-ROM, not read-only, not shareable): one of its
    /// own, which lock makes read-only and clone copies, or a refusal when it is not a file.
    pub fn is_writable(&self) -> bool {
        self.device != Device::Cdrom && !self.readonly && !self.shareable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu'>
  <name>VM</name>
  <os><type>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/VM_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/VM.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>
    <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdb'/><shareable/></disk>
  </devices>
</domain>"#;

    #[test]
    fn reads_disks_and_nvram() {
        let x = DomainXml::parse(XML).unwrap();
        assert_eq!(x.name().as_deref(), Some("VM"));
        let d = x.disks();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].path.as_deref(), Some(Path::new("/img/VM.qcow2")));
        assert_eq!(d[0].format.as_deref(), Some("qcow2"));
        assert!(d[0].is_writable());
        assert!(!d[1].is_writable() && d[1].readonly);
        assert_eq!(d[2].kind, DiskKind::Block);
        assert!(d[0].own && !d[1].own && !d[2].own);
        assert!(d[2].shareable && !d[2].is_writable());
        assert_eq!(
            x.nvram().unwrap(),
            Path::new("/var/lib/libvirt/qemu/nvram/VM_VARS.fd")
        );
    }

    #[test]
    fn rbd_disks_are_read_and_pointed_elsewhere() {
        let xml = XML.replace(
            "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdb'/><shareable/></disk>",
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
             <source protocol='rbd' name='tpl/Tpl'><host name='127.0.0.1' port='6789'/>\
             <snapshot name='tpl'/></source><auth username='admin'>\
             <secret type='ceph' uuid='11111111-2222-3333-4444-555555555555'/></auth>\
             <target dev='vdb' bus='virtio'/></disk>",
        );
        let mut x = DomainXml::parse(&xml).unwrap();
        let d = &x.disks()[2];
        assert_eq!(d.kind, DiskKind::Rbd);
        assert!(d.own && d.path.is_none());
        let r = d.rbd.clone().unwrap();
        assert_eq!((r.pool.as_str(), r.image.as_str()), ("tpl", "Tpl"));
        assert_eq!(r.snapshot.as_deref(), Some("tpl"));
        assert_eq!(r.hosts, ["127.0.0.1:6789"]);
        assert_eq!(r.user.as_deref(), Some("admin"));
        assert_eq!(r.to_string(), "rbd:tpl/Tpl@tpl");
        x.set_rbd_image("vdb", "web1", None).unwrap();
        let r = x.disks()[2].rbd.clone().unwrap();
        assert_eq!((r.image.as_str(), r.snapshot), ("web1", None));
        assert!(x.to_xml().contains("127.0.0.1"), "hosts and auth stay");
        assert!(x.set_rbd_image("vda", "x", None).is_err(), "a file disk");
    }

    #[test]
    fn edits_round_trip() {
        let mut x = DomainXml::parse(XML).unwrap();
        x.set_disk_path("vda", Path::new("/img/New.qcow2")).unwrap();
        x.set_nvram(Path::new("/nv/New_VARS.fd")).unwrap();
        let y = DomainXml::parse(&x.to_xml()).unwrap();
        assert_eq!(
            y.disks()[0].path.as_deref(),
            Some(Path::new("/img/New.qcow2"))
        );
        assert_eq!(y.nvram().unwrap(), Path::new("/nv/New_VARS.fd"));
        assert!(x.set_disk_path("vdz", Path::new("/x")).is_err());
    }

    #[test]
    fn nvram_in_the_source_form_is_read_and_edited_in_place() {
        let xml = XML.replace(
            "<nvram>/var/lib/libvirt/qemu/nvram/VM_VARS.fd</nvram>",
            "<nvram type='file' template='/usr/share/OVMF/OVMF_VARS.fd'>\
             <source file='/nv/VM_VARS.fd'/></nvram>",
        );
        let mut x = DomainXml::parse(&xml).unwrap();
        assert_eq!(x.nvram().unwrap(), Path::new("/nv/VM_VARS.fd"));
        x.set_nvram(Path::new("/nv/New_VARS.fd")).unwrap();
        let out = x.to_xml();
        assert!(
            out.contains("<source file=\"/nv/New_VARS.fd\"") && !out.contains("VM_VARS"),
            "{out}"
        );
        assert_eq!(
            DomainXml::parse(&out).unwrap().nvram().unwrap(),
            Path::new("/nv/New_VARS.fd")
        );
        assert_eq!(x.nvram_not_a_file(), None);
        let block = XML.replace(
            "<nvram>/var/lib/libvirt/qemu/nvram/VM_VARS.fd</nvram>",
            "<nvram type='block'><source dev='/dev/vg/vm-vars'/></nvram>",
        );
        let x = DomainXml::parse(&block).unwrap();
        assert_eq!(x.nvram(), None);
        assert_eq!(
            x.nvram_not_a_file().as_deref(),
            Some("its NVRAM is a block NVRAM, not a file")
        );
    }
}

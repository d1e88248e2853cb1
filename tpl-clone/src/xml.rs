//! The clone's definition: the template's XML with everything that must be unique per domain made the clone's own.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tpl_common::domxml::{children_named_mut, disk_target, DomainXml};
use tpl_common::error::{Error, Result};
use tpl_common::meta::{Meta, NS};
use tpl_common::ownfiles::{renamed_file, Naming};
use xmltree::{Element, XMLNode};

/// One cloned disk: which target, its new file, that file's format, and for a linked
/// clone the images under it (the template's image first, then its own backing files),
/// each with its format. An RBD disk has its new image (`POOL[/NS]/IMAGE`) instead.
#[derive(Debug, Clone)]
pub struct NewDisk {
    pub target: String,
    pub path: PathBuf,
    pub format: String,
    pub backing: Vec<(PathBuf, String)>,
    pub rbd: Option<String>,
}

/// Where a clone's first interface is connected instead of the template's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// A libvirt network.
    Network(String),
    /// A host bridge.
    Bridge(String),
}

/// What differs between the template and one clone.
#[derive(Debug)]
pub struct CloneSpec<'a> {
    pub name: &'a str,
    pub uuid: &'a str,
    pub template_name: &'a str,
    pub disks: &'a [NewDisk],
    pub nvram: Option<&'a Path>,
    /// The SMBIOS system serial, or None to leave `<sysinfo>` as it is (but for the UUID).
    pub serial: Option<String>,
    pub meta: &'a Meta,
    /// The first interface's MAC address, chosen before the definition (its seed and its
    /// DHCP reservation name it); the others get fresh ones.
    pub first_mac: Option<&'a str>,
    /// Where the first interface is connected, when not where the template's is.
    pub link: Option<&'a Link>,
    pub vcpus: Option<u32>,
    pub memory_kib: Option<u64>,
    /// The clone's seed: a read-only raw disk with this target and file.
    pub seed: Option<(&'a str, &'a Path)>,
    /// Disks of the template the clone does not get (the template's own seed, when it
    /// was itself a clone).
    pub drop_targets: &'a [String],
}

/// MAC addresses in use on the connection, and the new ones handed out.
#[derive(Debug, Default)]
pub struct Macs(HashSet<String>);

impl Macs {
    /// Note every `<mac address>` in a definition as taken.
    pub fn add_from(&mut self, x: &DomainXml) {
        if let Some(devs) = x.root.get_child("devices") {
            for c in devs.children.iter().filter_map(XMLNode::as_element) {
                if let Some(a) = c.get_child("mac").and_then(|m| m.attributes.get("address")) {
                    self.0.insert(a.to_ascii_lowercase());
                }
            }
        }
    }

    /// A new random locally administered address in QEMU/KVM's 52:54:00 range, unused so far.
    pub fn fresh(&mut self) -> String {
        loop {
            let b = uuid::Uuid::new_v4().into_bytes();
            let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]);
            if self.0.insert(mac.clone()) {
                return mac;
            }
        }
    }
}

/// The cloud-init NoCloud form of the SMBIOS serial: `ds=nocloud;h=HOST;i=INSTANCE`.
pub fn nocloud_serial(hostname: &str, instance: &str) -> String {
    format!("ds=nocloud;h={hostname};i={instance}")
}

/// A per-domain host file of the template (a serial log, a socket) made the clone's, by
/// the one naming rule.
pub fn own_path(path: &Path, template: &str, clone: &str) -> PathBuf {
    renamed_file(path, template, clone, Naming::Host)
}

/// The explicit backing chain of a linked clone's disk: the template's image and what is
/// under it, each marked for libvirt not to relabel (`<seclabel model='dac'
/// relabel='no'/>`). Without that, libvirt chowns the template's image to its qemu user
/// when the clone starts and does not give it back, and that user could then make the
/// template writable again; tpl-lock leaves the image readable by that user without it.
fn backing_store(chain: &[(PathBuf, String)]) -> Element {
    let mut bs = Element::new("backingStore");
    let Some(((path, format), rest)) = chain.split_first() else {
        return bs; // the end of the chain: <backingStore/>
    };
    bs.attributes.insert("type".into(), "file".into());
    let mut f = Element::new("format");
    f.attributes.insert("type".into(), format.clone());
    let mut src = Element::new("source");
    src.attributes
        .insert("file".into(), path.display().to_string());
    let mut label = Element::new("seclabel");
    label.attributes.insert("model".into(), "dac".into());
    label.attributes.insert("relabel".into(), "no".into());
    src.children.push(XMLNode::Element(label));
    bs.children.push(XMLNode::Element(f));
    bs.children.push(XMLNode::Element(src));
    bs.children.push(XMLNode::Element(backing_store(rest)));
    bs
}

fn set_text(e: &mut Element, text: &str) {
    e.children = vec![XMLNode::Text(text.to_string())];
}

fn child_mut<'a>(e: &'a mut Element, name: &str) -> &'a mut Element {
    if e.get_child(name).is_none() {
        e.children.push(XMLNode::Element(Element::new(name)));
    }
    e.get_mut_child(name).expect("just ensured")
}

/// The clone's definition from the template's.
pub fn clone_xml(tpl: &DomainXml, spec: &CloneSpec, macs: &mut Macs) -> Result<DomainXml> {
    let mut x = tpl.clone();
    let root = &mut x.root;
    set_text(child_mut(root, "name"), spec.name);
    set_text(child_mut(root, "uuid"), spec.uuid);
    // A VM generation ID copied would tell the guest it was not cloned; empty asks libvirt for a new one.
    if let Some(g) = root.get_mut_child("genid") {
        g.children.clear();
    }
    set_metadata(root, spec.meta)?;
    set_sysinfo(root, spec);
    // The template's title and description say what the template is (tpl-refresh puts its
    // version there); a clone listed under them would pass for the template (virt-clone
    // drops them too).
    root.children.retain(|c| {
        c.as_element()
            .is_none_or(|e| e.name != "title" && e.name != "description")
    });
    set_size(root, spec.vcpus, spec.memory_kib);
    let devices = child_mut(root, "devices");
    devices.children.retain(|c| {
        c.as_element().is_none_or(|e| {
            e.name != "disk" || disk_target(e).is_none_or(|t| !spec.drop_targets.contains(&t))
        })
    });
    set_disks(devices, spec.disks);
    if let Some((target, path)) = spec.seed {
        add_seed(devices, target, path);
    }
    set_interfaces(devices, macs, spec.first_mac, spec.link);
    set_graphics(devices);
    set_chardevs(devices, spec.template_name, spec.name);
    if let Some(nv) = spec.nvram {
        x.set_nvram(nv)?;
    }
    Ok(x)
}

/// Each cloned disk on its new file or image.
fn set_disks(devices: &mut Element, disks: &[NewDisk]) {
    for disk in children_named_mut(devices, "disk") {
        let Some(t) = disk_target(disk) else { continue };
        let Some(nd) = disks.iter().find(|d| d.target == t) else {
            continue;
        };
        let src = child_mut(disk, "source");
        if let Some(name) = &nd.rbd {
            // The same monitors and cephx secret as the template's; its own image, at its
            // head (a clone is written to).
            src.attributes.insert("name".into(), name.clone());
            src.children
                .retain(|c| c.as_element().is_none_or(|e| e.name != "snapshot"));
            continue;
        }
        src.attributes
            .insert("file".into(), nd.path.display().to_string());
        let drv = child_mut(disk, "driver");
        drv.attributes.entry("name".into()).or_insert("qemu".into());
        drv.attributes.insert("type".into(), nd.format.clone());
        // The template's chain is not the clone's: a full clone has none, a linked one
        // its own, given explicitly.
        disk.children
            .retain(|c| c.as_element().is_none_or(|e| e.name != "backingStore"));
        if !nd.backing.is_empty() {
            let at = disk
                .children
                .iter()
                .position(|c| c.as_element().is_some_and(|e| e.name == "source"))
                .map_or(disk.children.len(), |i| i + 1);
            disk.children
                .insert(at, XMLNode::Element(backing_store(&nd.backing)));
        }
    }
}

/// New MAC addresses (the first one `first` when given), and no host-side device name
/// (vnet3, tap-tpl): two domains cannot have the template's, and libvirt picks a free one
/// when none is given. The first interface goes to `link` when given.
fn set_interfaces(
    devices: &mut Element,
    macs: &mut Macs,
    first: Option<&str>,
    link: Option<&Link>,
) {
    for (i, iface) in children_named_mut(devices, "interface").enumerate() {
        let mac = match first {
            Some(m) if i == 0 => m.to_string(),
            _ => macs.fresh(),
        };
        child_mut(iface, "mac")
            .attributes
            .insert("address".into(), mac);
        iface
            .children
            .retain(|c| c.as_element().is_none_or(|e| e.name != "target"));
        if let (0, Some(link)) = (i, link) {
            let (kind, key, name) = match link {
                Link::Network(n) => ("network", "network", n),
                Link::Bridge(b) => ("bridge", "bridge", b),
            };
            iface.attributes.insert("type".into(), kind.into());
            let src = child_mut(iface, "source");
            src.attributes.clear();
            src.attributes.insert(key.into(), name.clone());
        }
    }
}

/// vCPUs and memory, when given. A CPU topology the template fixed would no longer add
/// up to the vCPUs: it goes, and libvirt gives the vCPUs as sockets.
fn set_size(root: &mut Element, vcpus: Option<u32>, memory_kib: Option<u64>) {
    if let Some(n) = vcpus {
        let v = child_mut(root, "vcpu");
        v.attributes.shift_remove("current");
        set_text(v, &n.to_string());
        if let Some(cpu) = root.get_mut_child("cpu") {
            cpu.children
                .retain(|c| c.as_element().is_none_or(|e| e.name != "topology"));
        }
    }
    if let Some(kib) = memory_kib {
        for name in ["memory", "currentMemory"] {
            if name == "memory" || root.get_child(name).is_some() {
                let m = child_mut(root, name);
                m.attributes.insert("unit".into(), "KiB".into());
                set_text(m, &kib.to_string());
            }
        }
    }
}

/// The clone's seed: a read-only raw virtio disk.
fn add_seed(devices: &mut Element, target: &str, path: &Path) {
    let mut disk = Element::new("disk");
    disk.attributes.insert("type".into(), "file".into());
    disk.attributes.insert("device".into(), "disk".into());
    let mut drv = Element::new("driver");
    drv.attributes.insert("name".into(), "qemu".into());
    drv.attributes.insert("type".into(), "raw".into());
    let mut src = Element::new("source");
    src.attributes
        .insert("file".into(), path.display().to_string());
    let mut tgt = Element::new("target");
    tgt.attributes.insert("dev".into(), target.into());
    tgt.attributes.insert("bus".into(), "virtio".into());
    for e in [drv, src, tgt, Element::new("readonly")] {
        disk.children.push(XMLNode::Element(e));
    }
    // After the last disk, where libvirt keeps disks.
    let at = devices
        .children
        .iter()
        .rposition(|c| c.as_element().is_some_and(|e| e.name == "disk"))
        .map_or(devices.children.len(), |i| i + 1);
    devices.children.insert(at, XMLNode::Element(disk));
}

/// Fixed ports and sockets would clash with the template's; libvirt picks new ones.
fn set_graphics(devices: &mut Element) {
    for g in children_named_mut(devices, "graphics") {
        if g.attributes.contains_key("port") || g.attributes.contains_key("tlsPort") {
            g.attributes.shift_remove("port");
            g.attributes.shift_remove("tlsPort");
            g.attributes.insert("autoport".into(), "yes".into());
        }
        if g.attributes.contains_key("websocket") {
            g.attributes.insert("websocket".into(), "-1".into());
        }
        g.attributes.shift_remove("socket");
        for l in children_named_mut(g, "listen") {
            l.attributes.shift_remove("socket");
        }
    }
}

/// The host files of serial ports, consoles and channels (logs, sockets qemu listens on)
/// become the clone's own, by the one naming rule.
fn set_chardevs(devices: &mut Element, template: &str, name: &str) {
    let own = |p: &mut String| {
        *p = own_path(Path::new(p.as_str()), template, name)
            .display()
            .to_string();
    };
    for kind in ["serial", "console", "parallel", "channel"] {
        for c in children_named_mut(devices, kind) {
            let ty = c.attributes.get("type").cloned().unwrap_or_default();
            if let Some(src) = c.get_mut_child("source") {
                // A socket QEMU connects to belongs to a program outside (a vhost-user
                // back end, say), and is where the clone must connect too; only one QEMU
                // listens on (binds) becomes the clone's.
                let connects = ty == "unix"
                    && src.attributes.get("mode").map(String::as_str) == Some("connect");
                if matches!(ty.as_str(), "file" | "unix" | "pipe") && !connects {
                    if let Some(p) = src.attributes.get_mut("path") {
                        own(p);
                    }
                }
            }
            if let Some(p) = c
                .get_mut_child("log")
                .and_then(|l| l.attributes.get_mut("file"))
            {
                own(p);
            }
        }
    }
}

/// Our metadata element replaced by the clone's; other programs' metadata stays.
fn set_metadata(root: &mut Element, meta: &Meta) -> Result<()> {
    let ours = Element::parse(meta.to_xml().as_bytes())
        .map_err(|e| Error::failed("cannot build the clone's metadata", e.to_string()))?;
    let md = child_mut(root, "metadata");
    md.children.retain(|c| {
        c.as_element()
            .is_none_or(|e| e.namespace.as_deref() != Some(NS))
    });
    md.children.push(XMLNode::Element(ours));
    Ok(())
}

/// `<sysinfo type='smbios'>`: the UUID entry follows the domain's, and the serial carries
/// the first-boot identity (which needs `<os><smbios mode='sysinfo'/>` to reach the guest).
fn set_sysinfo(root: &mut Element, spec: &CloneSpec) {
    let has_smbios = root.children.iter().any(|c| {
        c.as_element().is_some_and(|e| {
            e.name == "sysinfo" && e.attributes.get("type").map(String::as_str) == Some("smbios")
        })
    });
    if !has_smbios && spec.serial.is_none() {
        return;
    }
    if !has_smbios {
        let mut si = Element::new("sysinfo");
        si.attributes.insert("type".into(), "smbios".into());
        root.children.push(XMLNode::Element(si));
    }
    let si = children_named_mut(root, "sysinfo")
        .find(|e| e.attributes.get("type").map(String::as_str) == Some("smbios"))
        .expect("just ensured");
    let system = child_mut(si, "system");
    let mut set_entry = |name: &str, value: &str, add: bool| {
        let found = system.children.iter().position(|c| {
            c.as_element().is_some_and(|e| {
                e.name == "entry" && e.attributes.get("name").map(String::as_str) == Some(name)
            })
        });
        match found {
            Some(i) => {
                if let XMLNode::Element(e) = &mut system.children[i] {
                    set_text(e, value);
                }
            }
            None if add => {
                let mut e = Element::new("entry");
                e.attributes.insert("name".into(), name.into());
                set_text(&mut e, value);
                system.children.push(XMLNode::Element(e));
            }
            None => {}
        }
    };
    set_entry("uuid", spec.uuid, false);
    match &spec.serial {
        Some(serial) => {
            set_entry("serial", serial, true);
            let os = child_mut(root, "os");
            child_mut(os, "smbios")
                .attributes
                .insert("mode".into(), "sysinfo".into());
        }
        // A template that was itself a clone carries its own first-boot identity: copied,
        // every clone would take the same host name and instance id. Another serial is
        // the user's and stays.
        None => system.children.retain(|c| {
            c.as_element().is_none_or(|e| {
                !(e.name == "entry"
                    && e.attributes.get("name").map(String::as_str) == Some("serial")
                    && e.get_text()
                        .is_some_and(|t| t.trim_start().starts_with("ds=nocloud")))
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpl_common::record::CloneOrigin;

    const TPL: &str = r#"<domain type='qemu'>
  <name>Tpl</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <genid>aaaaaaaa-2222-3333-4444-555555555555</genid>
  <metadata>
    <tpl:template xmlns:tpl="urn:x-tpl:template:1"><tpl:locked at="x" immutable="no"/></tpl:template>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0"><libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo>
  </metadata>
  <sysinfo type='smbios'><system><entry name='uuid'>11111111-2222-3333-4444-555555555555</entry><entry name='manufacturer'>m</entry></system></sysinfo>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/c.fd</loader><nvram>/nv/Tpl_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/Tpl.img'/><backingStore/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>
    <interface type='user'/>
    <serial type='file'><source path='/log/Tpl.console.log'/><target port='0'/><log file='/log/serial.log'/></serial>
    <channel type='unix'><source mode='bind' path='/run/ga.sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc' port='5901' autoport='no' websocket='5701'><listen type='address' address='0.0.0.0'/></graphics>
  </devices>
</domain>"#;

    #[test]
    fn makes_every_unique_bit_the_clones() {
        let tpl = DomainXml::parse(TPL).unwrap();
        let mut macs = Macs::default();
        macs.add_from(&tpl);
        let meta = Meta {
            clone: Some(CloneOrigin {
                template_uuid: "11111111-2222-3333-4444-555555555555".into(),
                template_name: "Tpl".into(),
                mode: tpl_common::record::CloneMode::Full,
                at: "now".into(),
                seed: None,
                reserved: None,
            }),
            ..Default::default()
        };
        let disks = [NewDisk {
            target: "vda".into(),
            path: "/img/c1.img".into(),
            format: "raw".into(),
            backing: Vec::new(),
            rbd: None,
        }];
        let spec = CloneSpec {
            name: "c1",
            uuid: "99999999-2222-3333-4444-555555555555",
            template_name: "Tpl",
            disks: &disks,
            nvram: Some(Path::new("/nv/c1_VARS.fd")),
            serial: Some(nocloud_serial("c1", "iid")),
            meta: &meta,
            first_mac: None,
            link: None,
            vcpus: None,
            memory_kib: None,
            seed: None,
            drop_targets: &[],
        };
        let out = clone_xml(&tpl, &spec, &mut macs).unwrap().to_xml();
        let x = DomainXml::parse(&out).unwrap();
        assert_eq!(x.name().as_deref(), Some("c1"));
        assert!(out.contains("<uuid>99999999-2222-3333-4444-555555555555</uuid>"));
        assert!(
            !out.contains(">11111111-2222"),
            "only the origin names the template: {out}"
        );
        assert!(!out.contains("aaaaaaaa"), "genid cleared: {out}");
        let d = x.disks();
        assert_eq!(d[0].path.as_deref(), Some(Path::new("/img/c1.img")));
        assert!(!out.contains("backingStore"));
        assert_eq!(d[1].path.as_deref(), Some(Path::new("/iso/x.iso")));
        assert_eq!(x.nvram().unwrap(), Path::new("/nv/c1_VARS.fd"));
        assert!(
            out.contains("<entry name=\"serial\">ds=nocloud;h=c1;i=iid</entry>"),
            "{out}"
        );
        assert!(out.contains("<smbios mode=\"sysinfo\""), "{out}");
        assert!(out.contains("/log/c1.console.log") && out.contains("/log/c1-serial.log"));
        assert!(out.contains("/run/c1-ga.sock"));
        assert!(!out.contains("5901") && !out.contains("5701") && out.contains("autoport=\"yes\""));
        assert!(!out.contains("52:54:00:00:00:01"));
        assert_eq!(out.matches("<mac address=\"52:54:00:").count(), 2, "{out}");
        // Our metadata is the clone's now; the other program's stays.
        assert!(
            out.contains("libosinfo") && !out.contains("locked"),
            "{out}"
        );
        let md = x.root.get_child("metadata").unwrap();
        let ours = md
            .children
            .iter()
            .filter_map(XMLNode::as_element)
            .find(|e| e.namespace.as_deref() == Some(NS))
            .unwrap();
        let mut s = Vec::new();
        ours.write(&mut s).unwrap();
        let back = Meta::from_xml(std::str::from_utf8(&s).unwrap()).unwrap();
        assert_eq!(back.clone.unwrap().template_name, "Tpl");
    }

    #[test]
    fn without_identity_only_the_uuid_entry_changes() {
        let out = cloned_without_identity(TPL);
        assert!(!out.contains("serial\">ds="));
        assert!(out.contains(">99999999-0000-3333-4444-555555555555</entry>"));
    }

    /// The definition of clone "c3" of `tpl` made with --no-identity, as XML text.
    fn cloned_without_identity(tpl: &str) -> String {
        let meta = Meta::default();
        let spec = CloneSpec {
            name: "c3",
            uuid: "99999999-0000-3333-4444-555555555555",
            template_name: "Tpl",
            disks: &[],
            nvram: None,
            serial: None,
            meta: &meta,
            first_mac: None,
            link: None,
            vcpus: None,
            memory_kib: None,
            seed: None,
            drop_targets: &[],
        };
        let tpl = DomainXml::parse(tpl).unwrap();
        clone_xml(&tpl, &spec, &mut Macs::default())
            .unwrap()
            .to_xml()
    }

    #[test]
    fn without_identity_a_copied_nocloud_serial_goes_and_another_stays() {
        // A template that was itself a clone.
        let tpl = TPL.replace(
            "<entry name='manufacturer'>m</entry>",
            "<entry name='manufacturer'>m</entry><entry name='serial'>ds=nocloud;h=old;i=old-id</entry>",
        );
        let out = cloned_without_identity(&tpl);
        assert!(
            !out.contains("ds=nocloud") && !out.contains("old-id"),
            "{out}"
        );
        assert!(
            out.contains("<entry name=\"manufacturer\">m</entry>"),
            "{out}"
        );
        // A serial of the user's own is not ours to drop.
        let tpl = TPL.replace(
            "<entry name='manufacturer'>m</entry>",
            "<entry name='serial'>ASSET-0042</entry>",
        );
        let out = cloned_without_identity(&tpl);
        assert!(out.contains(">ASSET-0042</entry>"), "{out}");
    }

    #[test]
    fn only_sockets_qemu_listens_on_become_the_clones() {
        let tpl = TPL.replace(
            "<graphics ",
            "<channel type='unix'><source mode='connect' path='/run/vhost/Tpl.sock'/><target type='virtio' name='x.outside'/></channel>\
             <serial type='unix'><source path='/run/Tpl.serial.sock'/><target port='1'/></serial>\
             <graphics ",
        );
        let out = cloned_without_identity(&tpl);
        assert!(
            out.contains("path=\"/run/vhost/Tpl.sock\""),
            "connect kept: {out}"
        );
        assert!(
            out.contains("path=\"/run/c3-ga.sock\""),
            "bind made own: {out}"
        );
        assert!(
            out.contains("path=\"/run/c3.serial.sock\""),
            "no mode (bind) made own: {out}"
        );
    }

    #[test]
    fn host_paths() {
        assert_eq!(
            own_path(Path::new("/l/x.log"), "T", "c"),
            Path::new("/l/c-x.log")
        );
        assert_eq!(
            own_path(Path::new("/l/debug.log"), "deb", "c1"),
            Path::new("/l/c1-debug.log")
        );
    }

    #[test]
    fn title_description_and_interface_devices_are_not_the_clones() {
        let tpl = TPL
            .replace(
                "<genid>",
                "<title>Tpl-20261201-031700</title><description>the template</description><genid>",
            )
            .replace(
                "<interface type='user'/>",
                "<interface type='network'><source network='default'/><target dev='vnet7'/></interface>",
            );
        let out = cloned_without_identity(&tpl);
        assert!(
            !out.contains("<title>") && !out.contains("<description>"),
            "{out}"
        );
        assert!(!out.contains("vnet7"), "{out}");
    }

    #[test]
    fn a_linked_disk_names_its_chain_and_libvirt_leaves_it_alone() {
        let tpl = DomainXml::parse(TPL).unwrap();
        let meta = Meta::default();
        let disks = [NewDisk {
            target: "vda".into(),
            path: "/img/c1.qcow2".into(),
            format: "qcow2".into(),
            backing: vec![
                ("/img/Tpl.qcow2".into(), "qcow2".into()),
                ("/img/base.raw".into(), "raw".into()),
            ],
            rbd: None,
        }];
        let spec = CloneSpec {
            name: "c1",
            uuid: "99999999-2222-3333-4444-555555555555",
            template_name: "Tpl",
            disks: &disks,
            nvram: None,
            serial: None,
            meta: &meta,
            first_mac: None,
            link: None,
            vcpus: None,
            memory_kib: None,
            seed: None,
            drop_targets: &[],
        };
        let out = clone_xml(&tpl, &spec, &mut Macs::default())
            .unwrap()
            .to_xml();
        let flat: String = out.split_whitespace().collect();
        assert!(
            flat.contains(
                "<sourcefile=\"/img/c1.qcow2\"/><backingStoretype=\"file\"><formattype=\"qcow2\"/>\
                 <sourcefile=\"/img/Tpl.qcow2\"><seclabelmodel=\"dac\"relabel=\"no\"/></source>\
                 <backingStoretype=\"file\"><formattype=\"raw\"/><sourcefile=\"/img/base.raw\">\
                 <seclabelmodel=\"dac\"relabel=\"no\"/></source><backingStore/></backingStore>\
                 </backingStore>"
            ),
            "{out}"
        );
    }

    #[test]
    fn sizes_link_seed_and_dropped_disks_are_the_clones() {
        let tpl = DomainXml::parse(&TPL.replacen(
            "<devices>",
            "<vcpu>1</vcpu><cpu><topology sockets='1' cores='1' threads='1'/></cpu><devices>",
            1,
        ))
        .unwrap();
        let meta = Meta::default();
        let link = Link::Bridge("br0".into());
        let spec = CloneSpec {
            name: "c1",
            uuid: "99999999-2222-3333-4444-555555555555",
            template_name: "Tpl",
            disks: &[],
            nvram: None,
            serial: None,
            meta: &meta,
            first_mac: Some("52:54:00:aa:bb:cc"),
            link: Some(&link),
            vcpus: Some(4),
            memory_kib: Some(2 << 20),
            seed: Some(("vdb", Path::new("/img/c1-cidata.img"))),
            drop_targets: &["sda".to_string()],
        };
        let out = clone_xml(&tpl, &spec, &mut Macs::default())
            .unwrap()
            .to_xml();
        let x = DomainXml::parse(&out).unwrap();
        let flat: String = out.split_whitespace().collect();
        assert!(
            tpl.to_xml().contains("<topology"),
            "the template has a topology"
        );
        assert!(
            flat.contains(">4</vcpu>") && !flat.contains("<topology"),
            "{out}"
        );
        assert!(
            flat.contains("<memoryunit=\"KiB\">2097152</memory>"),
            "{out}"
        );
        // The first interface: its MAC chosen before, on the bridge; the second a fresh MAC.
        assert!(
            flat.contains("<interfacetype=\"bridge\"><macaddress=\"52:54:00:aa:bb:cc\"/><sourcebridge=\"br0\"/>"),
            "{out}"
        );
        let disks = x.disks();
        assert!(
            disks.iter().all(|d| d.target != "sda"),
            "the dropped disk goes"
        );
        let seed = disks
            .iter()
            .find(|d| d.target == "vdb")
            .expect("the seed disk");
        assert!(seed.readonly);
        assert_eq!(seed.path.as_deref(), Some(Path::new("/img/c1-cidata.img")));
        assert_eq!(seed.format.as_deref(), Some("raw"));
    }
}

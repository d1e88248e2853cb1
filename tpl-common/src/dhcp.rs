//! Where a clone's interface goes (a libvirt network, or a host bridge the hypervisor has), and a libvirt network's DHCP as tpl uses it: the network's subnet, whether an address is free for a clone (inside the subnet, not the host's, not reserved, not leased), and a clone's fixed address reserved for its MAC (a host entry, live and in the configuration) and released again.
//!
//! A reservation works for any guest OS: the guest asks for an address by DHCP as usual,
//! and dnsmasq hands it this one. It is a clone's own resource, like its files: journaled
//! before it is made, recorded in the clone's metadata, released when the clone is
//! removed or was never finished.

use std::ffi::CStr;
use std::net::Ipv4Addr;

use virt::connect::Connect;
use virt::network::Network;
use virt::sys;
use xmltree::Element;

use crate::domxml::children_named;
use crate::error::{Error, Result};
use crate::text::shown;

/// What a network's `<ip>` says, and who has an address in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    pub network: String,
    /// The host's own address in it (the guests' gateway and DNS server).
    pub host: Ipv4Addr,
    pub prefix: u8,
    /// Whether the network hands out addresses by DHCP (a `<dhcp>` element).
    pub dhcp: bool,
    /// Its DHCP host entries: (MAC, address).
    pub reserved: Vec<(String, Ipv4Addr)>,
    /// Its current leases: (MAC, address).
    pub leased: Vec<(String, Ipv4Addr)>,
}

/// The libvirt network `name` on `conn`; a network that does not exist is a usage error.
pub fn network(conn: &Connect, uri: &str, name: &str) -> Result<Network> {
    conn.lookup_network_by_name(name).map_err(|_| {
        Error::usage(
            format!(
                "there is no libvirt network '{}' on {}",
                shown(name),
                shown(uri)
            ),
            "see 'virsh net-list --all'; or give the host bridge with --bridge",
        )
    })
}

/// Whether the hypervisor behind `conn` has the host interface `name` (libvirt's interface
/// driver: `virsh iface-list --all`). A bridge that does not exist is a usage error, found
/// before anything is made; libvirt itself would accept the definition and fail only at
/// the clone's first start. `Ok(Some(why))`: the hypervisor cannot tell (no interface
/// driver), and the caller says so and goes on.
pub fn bridge(conn: &Connect, uri: &str, name: &str) -> Result<Option<String>> {
    match conn.lookup_interface_by_name(name) {
        Ok(_) => Ok(None),
        Err(e) if crate::session::is_code(&e, virt::error::ErrorNumber::NoInterface) => {
            Err(Error::usage(
                format!(
                    "there is no interface '{}' on {}, so no bridge of that name",
                    shown(name),
                    shown(uri)
                ),
                "see 'virsh iface-list --all' on the hypervisor; or give a libvirt network \
                 with --network",
            ))
        }
        Err(e) => Ok(Some(format!(
            "cannot check that bridge '{}' exists on {}: {}; a wrong name fails only when \
             the clone starts",
            shown(name),
            shown(uri),
            e.message()
        ))),
    }
}

impl Subnet {
    /// Read network `name`'s IPv4 subnet, host entries and leases.
    pub fn of(conn: &Connect, uri: &str, name: &str) -> Result<Subnet> {
        let net = network(conn, uri, name)?;
        let fail = |why: String| {
            Error::failed(
                format!("cannot read the libvirt network '{}'", shown(name)),
                why,
            )
        };
        let xml = net.xml_desc(0).map_err(|e| fail(e.to_string()))?;
        let root = Element::parse(xml.as_bytes()).map_err(|e| fail(e.to_string()))?;
        let ip = children_named(&root, "ip")
            .find(|e| e.attributes.get("family").is_none_or(|f| f == "ipv4"))
            .ok_or_else(|| {
                Error::usage(
                    format!(
                        "the libvirt network '{}' has no IPv4 subnet of its own",
                        shown(name)
                    ),
                    "a fixed address needs a network with <ip address=… prefix=…>, or a \
                     bridge (--bridge) and the address's prefix (ADDR/PREFIX)",
                )
            })?;
        let host: Ipv4Addr = ip
            .attributes
            .get("address")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| fail("its <ip> has no IPv4 address".into()))?;
        let prefix = match (ip.attributes.get("prefix"), ip.attributes.get("netmask")) {
            (Some(p), _) => p.parse().ok(),
            (None, Some(m)) => m
                .parse::<Ipv4Addr>()
                .ok()
                .map(|m| u32::from(m).count_ones() as u8),
            (None, None) => Some(24),
        }
        .filter(|p| *p <= 32)
        .ok_or_else(|| fail("its <ip> has no valid prefix or netmask".into()))?;
        let dhcp = ip.get_child("dhcp");
        let reserved = dhcp
            .map(|d| {
                children_named(d, "host")
                    .filter_map(|h| {
                        Some((
                            h.attributes.get("mac")?.to_ascii_lowercase(),
                            h.attributes.get("ip")?.parse().ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Subnet {
            network: name.to_string(),
            host,
            prefix,
            dhcp: dhcp.is_some(),
            reserved,
            leased: leases(&net).map_err(fail)?,
        })
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// Whether `ip` is an address a guest may have in this subnet (not the subnet's own
    /// address, not its broadcast address).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let (m, a, h) = (self.mask(), u32::from(ip), u32::from(self.host));
        a & m == h & m && a & !m != 0 && a & !m != !m
    }

    /// Why `ip` cannot be clone `mac`'s fixed address here, if it cannot.
    pub fn refuse(&self, ip: Ipv4Addr) -> Option<String> {
        let net = shown(&self.network);
        if !self.contains(ip) {
            return Some(format!(
                "{ip} is not a guest's address in the network '{net}' ({}/{})",
                Ipv4Addr::from(u32::from(self.host) & self.mask()),
                self.prefix
            ));
        }
        if ip == self.host {
            return Some(format!(
                "{ip} is the host's own address in the network '{net}'"
            ));
        }
        if let Some((mac, _)) = self.reserved.iter().find(|(_, a)| *a == ip) {
            return Some(format!(
                "{ip} is reserved already in the network '{net}' (for {mac})"
            ));
        }
        if let Some((mac, _)) = self.leased.iter().find(|(_, a)| *a == ip) {
            return Some(format!(
                "{ip} is leased already in the network '{net}' (to {mac})"
            ));
        }
        None
    }
}

/// The current DHCP leases of a network: (MAC, IPv4 address).
fn leases(net: &Network) -> std::result::Result<Vec<(String, Ipv4Addr)>, String> {
    let mut out = Vec::new();
    let mut arr: *mut sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
    // The virt crate has no binding of virNetworkGetDHCPLeases: called here, its array
    // read and freed as libvirt's documentation says.
    #[allow(unsafe_code)]
    // SAFETY: `net` is a live network; libvirt allocates `arr` with `n` leases, each freed
    // with virNetworkDHCPLeaseFree and the array with free(), as documented.
    unsafe {
        let n = sys::virNetworkGetDHCPLeases(net.as_ptr(), std::ptr::null(), &mut arr, 0);
        if n < 0 {
            return Err(virt::error::Error::last_error().to_string());
        }
        for i in 0..n as usize {
            let l = *arr.add(i);
            let s = |p: *mut std::os::raw::c_char| {
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
            };
            if let (Some(mac), Some(ip)) = (s((*l).mac), s((*l).ipaddr)) {
                if let Ok(ip) = ip.parse() {
                    out.push((mac.to_ascii_lowercase(), ip));
                }
            }
            sys::virNetworkDHCPLeaseFree(l);
        }
        if !arr.is_null() {
            libc::free(arr.cast());
        }
    }
    Ok(out)
}

/// The `<host>` element of a reservation.
fn host_xml(mac: &str, name: Option<&str>, ip: Ipv4Addr) -> String {
    let mut e = Element::new("host");
    e.attributes.insert("mac".into(), mac.to_string());
    if let Some(n) = name {
        e.attributes.insert("name".into(), n.to_string());
    }
    e.attributes.insert("ip".into(), ip.to_string());
    let mut out = Vec::new();
    let cfg = xmltree::EmitterConfig::new().write_document_declaration(false);
    e.write_with_config(&mut out, cfg)
        .expect("writing XML to memory cannot fail");
    String::from_utf8(out).expect("xmltree writes UTF-8")
}

/// Where an update goes: the running network and its configuration (whichever it has).
fn flags(net: &Network) -> sys::virNetworkUpdateFlags {
    let mut f = 0;
    if net.is_active().unwrap_or(false) {
        f |= sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
    }
    if net.is_persistent().unwrap_or(false) {
        f |= sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
    }
    f
}

/// One change of a network's DHCP host entries (`cmd`: add or delete `host`), live and
/// in its configuration; `what` names it for the error.
fn update_hosts(
    conn: &Connect,
    uri: &str,
    network: &str,
    cmd: sys::virNetworkUpdateCommand,
    host: &str,
    what: String,
) -> Result<()> {
    let net = self::network(conn, uri, network)?;
    net.update(
        cmd,
        sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
        -1,
        host,
        flags(&net),
    )
    .map_err(|e| Error::libvirt(format!("{what} in the network '{}'", shown(network)), e))
}

/// Reserve `ip` for `mac` (host name `name`) in network `network`.
pub fn reserve(
    conn: &Connect,
    uri: &str,
    network: &str,
    mac: &str,
    name: Option<&str>,
    ip: Ipv4Addr,
) -> Result<()> {
    update_hosts(
        conn,
        uri,
        network,
        sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        &host_xml(mac, name, ip),
        format!("cannot reserve {ip} for {mac}"),
    )
}

/// Release the reservation of `ip` for `mac` in network `network`; false when there is
/// none (released already, or the network is gone).
pub fn release(conn: &Connect, uri: &str, network: &str, mac: &str, ip: Ipv4Addr) -> Result<bool> {
    let Ok(sub) = Subnet::of(conn, uri, network) else {
        return Ok(false);
    };
    if !sub
        .reserved
        .iter()
        .any(|(m, a)| m.eq_ignore_ascii_case(mac) && *a == ip)
    {
        return Ok(false);
    }
    update_hosts(
        conn,
        uri,
        network,
        sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
        &host_xml(mac, None, ip),
        format!("cannot release {ip} of {mac}"),
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        Subnet {
            network: "n".into(),
            host: "192.168.123.1".parse().unwrap(),
            prefix: 24,
            dhcp: true,
            reserved: vec![(
                "52:54:00:00:00:01".into(),
                "192.168.123.50".parse().unwrap(),
            )],
            leased: vec![(
                "52:54:00:00:00:02".into(),
                "192.168.123.60".parse().unwrap(),
            )],
        }
    }

    #[test]
    fn an_address_is_refused_outside_the_subnet_and_when_taken() {
        let s = subnet();
        let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
        assert_eq!(s.refuse(ip("192.168.123.10")), None);
        for (a, why) in [
            ("192.168.124.10", "not a guest's address"),
            ("192.168.123.0", "not a guest's address"),
            ("192.168.123.255", "not a guest's address"),
            ("192.168.123.1", "host's own"),
            ("192.168.123.50", "reserved already"),
            ("192.168.123.60", "leased already"),
        ] {
            let r = s.refuse(ip(a)).unwrap_or_default();
            assert!(r.contains(why), "{a}: {r}");
        }
    }

    #[test]
    fn a_host_entry_is_well_formed_xml() {
        assert_eq!(
            host_xml(
                "52:54:00:aa:bb:cc",
                Some("web1"),
                "10.0.0.5".parse().unwrap()
            ),
            r#"<host mac="52:54:00:aa:bb:cc" name="web1" ip="10.0.0.5" />"#
        );
    }
}

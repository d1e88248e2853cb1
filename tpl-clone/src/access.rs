//! What makes a clone ready to work, all checked before anything is made: who logs in (a user, SSH keys, the user's own cloud-config), at which address (reserved in a libvirt network's DHCP, or static in the seed on a bridge), on which network, how big, and the seed each clone gets.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tpl_common::dhcp::{self, Subnet};
use tpl_common::domxml::{children_named, DomainXml};
use tpl_common::error::{Error, Result};
use tpl_common::record::Reserved;
use tpl_common::seed::{self, PublicKeyLine, SeedSpec, StaticNetwork};
use tpl_common::session::Session;
use tpl_common::text::{shown, shown_path};

use crate::xml::Link;
use crate::Args;

/// Where the fixed addresses are set.
#[derive(Debug)]
enum Fixed {
    /// Reserved for each clone's MAC in this libvirt network's DHCP.
    Reserve { network: String },
    /// Written into each clone's seed (a bridge: no DHCP tpl can speak to).
    Static {
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        dns: Vec<Ipv4Addr>,
    },
}

/// What each clone gets to be ready to work, beyond its identity.
#[derive(Debug)]
pub struct Access {
    user: Option<String>,
    keys: Vec<PublicKeyLine>,
    user_data: Option<String>,
    /// Each clone's fixed address, by clone name.
    ips: BTreeMap<String, Ipv4Addr>,
    fixed: Option<Fixed>,
    /// Where the first interface goes, when not where the template's is.
    pub link: Option<Link>,
    pub vcpus: Option<u32>,
    pub memory_kib: Option<u64>,
    /// The first disk's new virtual size, in bytes.
    pub disk_size: Option<u64>,
    /// Where the seeds go, and the seed disk's target; None when the clones need none.
    pub seed_at: Option<(PathBuf, String)>,
}

/// A size: bytes with an optional K, M, G or T suffix (powers of 1024, an optional `iB`
/// or `B` after it), or plain `unit`s when there is none.
pub fn parse_size(what: &str, s: &str, unit: u64) -> Result<u64> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, suffix) = t.split_at(digits);
    let mult = match suffix.trim().to_ascii_uppercase().as_str() {
        "" => unit,
        "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => 0,
    };
    n.parse::<u64>()
        .ok()
        .filter(|n| *n > 0 && mult > 0)
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            Error::usage(
                format!("{what} '{}' is not a size", shown(s)),
                "give a number with an optional K, M, G or T suffix (2G, 4096M)",
            )
        })
}

/// `ADDR` or `ADDR/PREFIX`.
fn parse_addr(s: &str) -> Result<(Ipv4Addr, Option<u8>)> {
    let bad = || {
        Error::usage(
            format!("--ip '{}' is not an IPv4 address", shown(s)),
            "give ADDR or ADDR/PREFIX (192.168.122.50/24), or NAME=ADDR for one clone",
        )
    };
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (
            a,
            Some(p.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(bad)?),
        ),
        None => (s, None),
    };
    Ok((a.parse().map_err(|_| bad())?, p))
}

/// The first interface of a definition: its kind and its network or bridge.
fn first_link(x: &DomainXml) -> Option<Link> {
    let devices = x.root.get_child("devices")?;
    let iface = children_named(devices, "interface").next()?;
    let src = iface.get_child("source")?;
    match iface.attributes.get("type").map(String::as_str) {
        Some("network") => Some(Link::Network(src.attributes.get("network")?.clone())),
        Some("bridge") => Some(Link::Bridge(src.attributes.get("bridge")?.clone())),
        _ => None,
    }
}

/// The first `vdX` target no disk of the definition has: the seed's.
fn free_target(x: &DomainXml) -> Result<String> {
    let used: Vec<String> = x.disks().into_iter().map(|d| d.target).collect();
    ('a'..='z')
        .map(|c| format!("vd{c}"))
        .find(|t| !used.contains(t))
        .ok_or_else(|| {
            Error::refused(
                "cannot give the clones a seed disk",
                "the template uses every virtio disk name from vda to vdz",
            )
        })
}

impl Access {
    /// Check what `args` ask for the clones `names` of the template defined as `x`, to be
    /// defined on `dest`. `dir` is where the clones' files go (None: the template has no
    /// file disk, and --dir was not given).
    pub fn new(
        args: &Args,
        names: &[String],
        x: &DomainXml,
        dest: &Session,
        dir: Option<&Path>,
        warn: impl Fn(String),
    ) -> Result<Access> {
        if let Some(u) = &args.user {
            seed::check_user_name(u)?;
        }
        let mut keys = Vec::new();
        for k in &args.ssh_keys {
            keys.extend(seed::read_public_keys(k)?);
        }
        if args.user.is_some() && keys.is_empty() {
            return Err(Error::usage(
                format!(
                    "--user {} without --ssh-key",
                    shown(args.user.as_deref().unwrap_or_default())
                ),
                "the user's password is locked: give the public key it logs in with",
            ));
        }
        let user_data = args
            .user_data
            .as_ref()
            .map(seed::read_user_data)
            .transpose()?;
        let link = match (&args.network, &args.bridge) {
            (Some(n), _) => {
                dhcp::network(&dest.conn, &dest.uri, n)?;
                Some(Link::Network(n.clone()))
            }
            (None, Some(b)) => {
                if let Some(why) = dhcp::bridge(&dest.conn, &dest.uri, b)? {
                    warn(why);
                }
                Some(Link::Bridge(b.clone()))
            }
            (None, None) => None,
        };
        let (ips, fixed) = Self::addresses(args, names, x, dest, link.as_ref())?;
        let vcpus = args.vcpus;
        let memory_kib = args
            .memory
            .as_deref()
            .map(|m| parse_size("--memory", m, 1 << 20).map(|b| b / 1024))
            .transpose()?;
        let disk_size = args
            .disk_size
            .as_deref()
            .map(|d| parse_size("--disk-size", d, 1 << 30))
            .transpose()?;
        let needs_seed = args.user.is_some()
            || !keys.is_empty()
            || user_data.is_some()
            || matches!(fixed, Some(Fixed::Static { .. }));
        let seed_at = if needs_seed {
            let dir = dir.ok_or_else(|| {
                Error::usage(
                    "no directory for the clones' seeds",
                    "the template has no file disk to put them beside: give --dir",
                )
            })?;
            Some((dir.to_path_buf(), free_target(x)?))
        } else {
            None
        };
        Ok(Access {
            user: args.user.clone(),
            keys,
            user_data,
            ips,
            fixed,
            link,
            vcpus,
            memory_kib,
            disk_size,
            seed_at,
        })
    }

    /// Each clone's fixed address (`--ip ADDR` counting up over the batch, or `--ip
    /// NAME=ADDR` each), checked where it goes: free in the libvirt network, or with a
    /// prefix for a bridge.
    fn addresses(
        args: &Args,
        names: &[String],
        x: &DomainXml,
        dest: &Session,
        link: Option<&Link>,
    ) -> Result<(BTreeMap<String, Ipv4Addr>, Option<Fixed>)> {
        if args.ip.is_empty() {
            return Ok((BTreeMap::new(), None));
        }
        let mut ips = BTreeMap::new();
        let mut prefix = None;
        let per_name = args.ip.iter().all(|i| i.contains('='));
        if per_name {
            for i in &args.ip {
                let (n, a) = i.split_once('=').unwrap_or_default();
                if !names.iter().any(|m| m == n) {
                    return Err(Error::usage(
                        format!("--ip {} names no clone of this run", shown(i)),
                        "give NAME=ADDR for a clone being made",
                    ));
                }
                let (a, p) = parse_addr(a)?;
                prefix = prefix.or(p);
                if ips.insert(n.to_string(), a).is_some() {
                    return Err(Error::usage(
                        format!("--ip gives clone '{}' two addresses", shown(n)),
                        "give one --ip NAME=ADDR per clone",
                    ));
                }
            }
        } else if let [one] = args.ip.as_slice() {
            let (start, p) = parse_addr(one)?;
            prefix = p;
            for (k, n) in names.iter().enumerate() {
                let a = u32::from(start)
                    .checked_add(k as u32)
                    .map(Ipv4Addr::from)
                    .ok_or_else(|| {
                        Error::usage(
                            format!("--ip {one} counts past 255.255.255.255"),
                            "start lower",
                        )
                    })?;
                ips.insert(n.clone(), a);
            }
        } else {
            return Err(Error::usage(
                "--ip is given several times",
                "give one start address (it counts up over the batch), or NAME=ADDR for \
                 each clone",
            ));
        }
        let mut seen = BTreeMap::new();
        for (n, a) in &ips {
            if let Some(other) = seen.insert(*a, n) {
                return Err(Error::usage(
                    format!(
                        "clones '{}' and '{}' would both get {a}",
                        shown(other),
                        shown(n)
                    ),
                    "give each clone its own address",
                ));
            }
        }
        let link = link.cloned().or_else(|| first_link(x)).ok_or_else(|| {
            Error::usage(
                "--ip needs a network interface",
                "the template's first interface is on no libvirt network or bridge: give \
                 --network or --bridge",
            )
        })?;
        let fixed = match link {
            Link::Network(network) => {
                if prefix.is_some() {
                    return Err(Error::usage(
                        "--ip ADDR/PREFIX on a libvirt network",
                        "the network's own prefix holds: give the address alone",
                    ));
                }
                let sub = Subnet::of(&dest.conn, &dest.uri, &network)?;
                if !sub.dhcp {
                    return Err(Error::usage(
                        format!(
                            "the libvirt network '{}' hands out no addresses (no <dhcp>)",
                            shown(&network)
                        ),
                        "a fixed address is a DHCP reservation there: add a DHCP range, or \
                         connect the clones to a bridge (--bridge) with ADDR/PREFIX",
                    ));
                }
                let taken: Vec<String> = ips.values().filter_map(|a| sub.refuse(*a)).collect();
                if !taken.is_empty() {
                    return Err(Error::refused(
                        "cannot give the clones their addresses",
                        format!(
                            "{}; pick free addresses ('virsh net-dumpxml {1}', 'virsh \
                             net-dhcp-leases {1}')",
                            tpl_common::text::list(&taken, "; "),
                            shown(&network)
                        ),
                    ));
                }
                Fixed::Reserve { network }
            }
            Link::Bridge(_) => {
                let prefix = prefix.ok_or_else(|| {
                    Error::usage(
                        "--ip on a bridge needs the prefix",
                        "give ADDR/PREFIX (192.168.1.50/24), and --gateway and --dns",
                    )
                })?;
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                for a in ips.values() {
                    let host = u32::from(*a) & !mask;
                    if prefix < 31 && (host == 0 || host == !mask) {
                        return Err(Error::usage(
                            format!("{a}/{prefix} is not a host's address"),
                            "it is the subnet's own or broadcast address",
                        ));
                    }
                    if let Some(g) = args.gateway {
                        if u32::from(g) & mask != u32::from(*a) & mask {
                            return Err(Error::usage(
                                format!("--gateway {g} is outside {a}/{prefix}"),
                                "give a gateway in the clones' subnet",
                            ));
                        }
                    }
                }
                Fixed::Static {
                    prefix,
                    gateway: args.gateway,
                    dns: args.dns.clone(),
                }
            }
        };
        Ok((ips, Some(fixed)))
    }

    /// Where clone `name`'s seed goes, and its target (None: the clones get none).
    pub fn seed_path(&self, name: &str) -> Option<(PathBuf, &str)> {
        self.seed_at
            .as_ref()
            .map(|(d, t)| (d.join(format!("{name}-cidata.img")), t.as_str()))
    }

    /// The seed image of clone `name` (host name `hostname`, instance id `uuid`, first MAC
    /// `mac`), when the clones get one.
    pub fn seed(
        &self,
        name: &str,
        hostname: &str,
        uuid: &str,
        mac: &str,
    ) -> Result<Option<Vec<u8>>> {
        if self.seed_at.is_none() {
            return Ok(None);
        }
        let network = match (&self.fixed, self.ips.get(name)) {
            (
                Some(Fixed::Static {
                    prefix,
                    gateway,
                    dns,
                }),
                Some(a),
            ) => Some(StaticNetwork {
                mac: mac.to_string(),
                address: *a,
                prefix: *prefix,
                gateway: *gateway,
                dns: dns.clone(),
            }),
            _ => None,
        };
        let spec = SeedSpec {
            hostname: hostname.to_string(),
            instance_id: uuid.to_string(),
            user: self.user.clone(),
            keys: self.keys.clone(),
            user_data: self.user_data.clone(),
            network,
        };
        Ok(Some(seed::build(&spec)?))
    }

    /// Clone `name`'s reservation in a libvirt network's DHCP for its MAC `mac`, if it has
    /// a fixed address there.
    pub fn reservation(&self, name: &str, mac: &str) -> Option<Reserved> {
        match (&self.fixed, self.ips.get(name)) {
            (Some(Fixed::Reserve { network }), Some(ip)) => Some(Reserved {
                network: network.clone(),
                mac: mac.to_string(),
                ip: *ip,
            }),
            _ => None,
        }
    }

    /// Whether the clones' first interface needs its MAC chosen before the definition.
    pub fn needs_mac(&self) -> bool {
        self.seed_at.is_some() || self.fixed.is_some()
    }

    /// The seeds' paths, for the messages.
    pub fn describe_seed(&self, name: &str) -> Option<String> {
        self.seed_path(name)
            .map(|(p, t)| format!("seed disk {t} '{}'", shown_path(&p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(parse_size("--disk-size", "10", 1 << 30).unwrap(), 10 << 30);
        assert_eq!(
            parse_size("--disk-size", "512M", 1 << 30).unwrap(),
            512 << 20
        );
        assert_eq!(parse_size("--memory", "2GiB", 1 << 20).unwrap(), 2 << 30);
        assert_eq!(parse_size("--memory", "1536", 1 << 20).unwrap(), 1536 << 20);
        for bad in ["", "0", "-1", "2X", "G", "1.5G", "99999999999999999999T"] {
            assert_eq!(
                parse_size("--memory", bad, 1).unwrap_err().exit_code(),
                2,
                "{bad}"
            );
        }
    }

    #[test]
    fn addresses_read_with_and_without_prefix() {
        assert_eq!(
            parse_addr("10.0.0.5/24").unwrap(),
            ("10.0.0.5".parse().unwrap(), Some(24))
        );
        assert_eq!(parse_addr("10.0.0.5").unwrap().1, None);
        for bad in ["10.0.0", "10.0.0.5/33", "web1", "10.0.0.5/x"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }
}

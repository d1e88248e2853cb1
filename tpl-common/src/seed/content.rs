//! The seed's files from a checked spec: cloud-init's meta-data, user-data (merged with the user's own) and network-config, and the plain `tpl-*` files for guests without cloud-init.

use std::net::Ipv4Addr;

use base64::Engine;
use serde::Serialize;

use super::input::{check_user_name, cloud_config};
use super::{SeedError, SeedSpec, StaticNetwork};
use crate::text::shown;

/// One file of the seed: its path in the file system (`/`-separated) and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFile {
    pub path: &'static str,
    pub data: Vec<u8>,
}

/// The longest instance id taken.
const MAX_INSTANCE_ID: usize = 128;

/// How cloud-init merges tpl's part of the user-data into the user's (see the module
/// documentation): their values stay, tpl's fill in, lists get tpl's entries appended.
const MERGE_TYPE: &str = "dict(no_replace,recurse_list)+list(append)+str()";

/// The MIME boundary of a merged user-data. Both parts are base64, whose alphabet has no
/// '-', so no line of a part can be `--` and the boundary.
const BOUNDARY: &str = "tpl-seed-part";

#[derive(Serialize)]
struct MetaData<'a> {
    #[serde(rename = "instance-id")]
    instance_id: &'a str,
    #[serde(rename = "local-hostname")]
    local_hostname: &'a str,
    #[serde(rename = "public-keys", skip_serializing_if = "Vec::is_empty")]
    public_keys: Vec<&'a str>,
}

#[derive(Serialize)]
struct CloudConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    users: Vec<User<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ssh_authorized_keys: Vec<&'a str>,
}

#[derive(Serialize)]
struct User<'a> {
    name: &'a str,
    sudo: &'static str,
    shell: &'static str,
    lock_passwd: bool,
    ssh_authorized_keys: Vec<&'a str>,
}

#[derive(Serialize)]
struct NetworkConfig<'a> {
    version: u8,
    ethernets: Ethernets<'a>,
}

#[derive(Serialize)]
struct Ethernets<'a> {
    // Only a name inside the config: cloud-init configures the interface the MAC finds
    // (network_state's handle_ethernets looks the name up by MAC when there is no set-name).
    tpl0: Ethernet<'a>,
}

#[derive(Serialize)]
struct Ethernet<'a> {
    #[serde(rename = "match")]
    match_: MacMatch<'a>,
    dhcp4: bool,
    addresses: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nameservers: Option<Nameservers>,
}

#[derive(Serialize)]
struct MacMatch<'a> {
    macaddress: &'a str,
}

#[derive(Serialize)]
struct Route {
    to: &'static str,
    via: Ipv4Addr,
}

#[derive(Serialize)]
struct Nameservers {
    addresses: Vec<Ipv4Addr>,
}

/// YAML for cloud-init, written as JSON (see the module documentation), newline-ended.
fn json(value: &impl Serialize) -> String {
    let mut s = serde_json::to_string_pretty(value).expect("plain structs serialize");
    s.push('\n');
    s
}

fn check_instance_id(id: &str) -> Result<(), SeedError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_INSTANCE_ID
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'));
    if ok {
        return Ok(());
    }
    Err(SeedError::invalid(
        format!("invalid instance id \"{}\"", shown(id)),
        "use 1 to 128 letters, digits, '.', '_', ':' and '-' (it also goes into the SMBIOS \
         serial's ;-separated fields)",
    ))
}

/// The MAC address in lower case, if `mac` is one a NIC can have.
fn normal_mac(mac: &str) -> Result<String, SeedError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let hex = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|c| c.is_ascii_hexdigit()));
    let why = if !hex {
        "write it as six ':'-separated pairs of hex digits, 52:54:00:12:34:56"
    } else if u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 1) {
        "it is a multicast address, which no interface has"
    } else {
        return Ok(mac.to_ascii_lowercase());
    };
    Err(SeedError::invalid(
        format!("invalid MAC address \"{}\"", shown(mac)),
        why,
    ))
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)))
}

/// A static address an interface can take: a prefix of 1 to 32, not the network's own
/// or broadcast address, a gateway inside the network other than the address.
fn check_network(net: &StaticNetwork) -> Result<(), SeedError> {
    let bad = |why: String| {
        Err(SeedError::invalid(
            format!("invalid static address {}/{}", net.address, net.prefix),
            why,
        ))
    };
    if !(1..=32).contains(&net.prefix) {
        return bad("the prefix length must be 1 to 32".into());
    }
    let mask = u32::from(netmask(net.prefix));
    let addr = u32::from(net.address);
    let host = addr & !mask;
    if net.prefix <= 30 && (host == 0 || host == !mask) {
        return bad(format!(
            "it is the network's own {} address",
            if host == 0 { "network" } else { "broadcast" }
        ));
    }
    if let Some(gw) = net.gateway {
        if gw == net.address {
            return bad("the gateway is the address itself".into());
        }
        if u32::from(gw) & mask != addr & mask {
            return bad(format!(
                "the gateway {gw} is outside the network {}/{}",
                Ipv4Addr::from(addr & mask),
                net.prefix
            ));
        }
    }
    Ok(())
}

/// Refuse what a merge would lose (see the module documentation): a `users` or
/// `ssh_authorized_keys` that is not a list (cloud-init's merge keeps an empty one and
/// drops tpl's list, or replaces a string with tpl's list), a `users` entry for tpl's user.
fn check_mergeable(theirs: &yaml_serde::Mapping, spec: &SeedSpec) -> Result<(), SeedError> {
    let list = |key: &str| -> Result<Option<&yaml_serde::Sequence>, SeedError> {
        match theirs.get(key) {
            None => Ok(None),
            Some(yaml_serde::Value::Sequence(s)) => Ok(Some(s)),
            Some(_) => Err(SeedError::invalid(
                format!("cannot add tpl's {key} to the user-data"),
                format!("its '{key}' is not a list; write it as one (`- ` items)"),
            )),
        }
    };
    match &spec.user {
        Some(user) => {
            for entry in list("users")?.into_iter().flatten() {
                let same = match entry {
                    // cloud-init reads a string item as comma-separated names.
                    yaml_serde::Value::String(names) => names.split(',').any(|n| n.trim() == user),
                    yaml_serde::Value::Mapping(m) => m
                        .get("name")
                        .and_then(yaml_serde::Value::as_str)
                        .is_some_and(|n| n == user),
                    _ => false,
                };
                if same {
                    return Err(SeedError::invalid(
                        format!("the user-data already has the user \"{}\"", shown(user)),
                        "cloud-init would keep that entry and drop the keys tpl gives the user; \
                         take it out of the user-data, or give the keys there and no user to tpl",
                    ));
                }
            }
        }
        None if !spec.keys.is_empty() => {
            list("ssh_authorized_keys")?;
        }
        None => {}
    }
    Ok(())
}

/// base64 in lines of 76 characters, as MIME wants.
fn base64_lines(data: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = String::with_capacity(b64.len() + b64.len() / 76 + 1);
    for chunk in b64.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out
}

/// The user's cloud-config, then tpl's with its merge rule, as one MIME multipart
/// user-data (what `cloud-init devel make-mime` writes: cloud-init detects it by its
/// `MIME-Version` header).
fn multipart(theirs: &str, ours: &str) -> String {
    let part = |filename: &str, merge: Option<&str>, body: &str| {
        let mut s = format!(
            "--{BOUNDARY}\nContent-Type: text/cloud-config; charset=\"utf-8\"\nMIME-Version: 1.0\n\
             Content-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"{filename}\"\n"
        );
        if let Some(m) = merge {
            s.push_str(&format!("Merge-Type: {m}\n"));
        }
        s.push('\n');
        s.push_str(&base64_lines(body.as_bytes()));
        s
    };
    format!(
        "Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\nMIME-Version: 1.0\n\n{}{}--{BOUNDARY}--\n",
        part("user-data", None, theirs),
        part("tpl-user-data", Some(MERGE_TYPE), ours),
    )
}

/// The `KEY=VALUE` lines of `tpl-network`.
fn tpl_network(net: &StaticNetwork, mac: &str) -> String {
    let mut s = format!(
        "MAC={mac}\nADDRESS={}\nPREFIX={}\nNETMASK={}\n",
        net.address,
        net.prefix,
        netmask(net.prefix)
    );
    if let Some(gw) = net.gateway {
        s.push_str(&format!("GATEWAY={gw}\n"));
    }
    if !net.dns.is_empty() {
        let dns: Vec<String> = net.dns.iter().map(Ipv4Addr::to_string).collect();
        s.push_str(&format!("DNS={}\n", dns.join(",")));
    }
    s
}

/// The seed's files for `spec`, checked: cloud-init's `meta-data`, `user-data` and
/// (static address only) `network-config`, then `tpl-hostname`, `tpl-instance-id`,
/// `tpl-user`, `tpl-authorized_keys` and `tpl-network` (each only when it has something
/// to say), in that order. The module documentation gives their format.
pub fn seed_files(spec: &SeedSpec) -> Result<Vec<SeedFile>, SeedError> {
    if let Some(why) = crate::hostname::hostname_problem(&spec.hostname) {
        return Err(SeedError::invalid(
            format!("invalid host name \"{}\"", shown(&spec.hostname)),
            format!("{why}; use letters, digits, '-' and '.'"),
        ));
    }
    check_instance_id(&spec.instance_id)?;
    if let Some(user) = &spec.user {
        check_user_name(user)?;
        if spec.keys.is_empty() {
            return Err(SeedError::invalid(
                format!("no public key for the user \"{}\"", shown(user)),
                "its password is locked, so nobody could log in to it: give a public key file",
            ));
        }
    }
    let (theirs, their_fqdn) = match &spec.user_data {
        Some(text) => {
            let mapping =
                cloud_config(text).map_err(|e| SeedError::invalid("invalid user-data", e.why))?;
            check_mergeable(&mapping, spec)?;
            (Some(text), mapping.contains_key("fqdn"))
        }
        None => (None, false),
    };
    let mac = match &spec.network {
        Some(net) => {
            check_network(net)?;
            Some(normal_mac(&net.mac)?)
        }
        None => None,
    };

    let keys: Vec<&str> = spec.keys.iter().map(|k| k.as_str()).collect();
    let meta = MetaData {
        instance_id: &spec.instance_id,
        local_hostname: &spec.hostname,
        public_keys: keys.clone(),
    };
    let ours = CloudConfig {
        // Their `fqdn` names the host, and cloud-init would take a `hostname` of tpl's
        // beside it as the short name: the two together would say two names.
        hostname: (!their_fqdn).then_some(spec.hostname.as_str()),
        users: spec
            .user
            .iter()
            .map(|name| User {
                name,
                sudo: "ALL=(ALL) NOPASSWD:ALL",
                shell: "/bin/bash",
                lock_passwd: true,
                ssh_authorized_keys: keys.clone(),
            })
            .collect(),
        ssh_authorized_keys: if spec.user.is_none() {
            keys.clone()
        } else {
            Vec::new()
        },
    };
    let ours = format!("#cloud-config\n{}", json(&ours));
    let user_data = match theirs {
        Some(theirs) => multipart(theirs, &ours),
        None => ours,
    };

    let mut files = vec![
        SeedFile {
            path: "meta-data",
            data: json(&meta).into_bytes(),
        },
        SeedFile {
            path: "user-data",
            data: user_data.into_bytes(),
        },
    ];
    if let (Some(net), Some(mac)) = (&spec.network, &mac) {
        let config = NetworkConfig {
            version: 2,
            ethernets: Ethernets {
                tpl0: Ethernet {
                    match_: MacMatch { macaddress: mac },
                    dhcp4: false,
                    addresses: vec![format!("{}/{}", net.address, net.prefix)],
                    routes: net
                        .gateway
                        .map(|via| Route {
                            to: "0.0.0.0/0",
                            via,
                        })
                        .into_iter()
                        .collect(),
                    nameservers: (!net.dns.is_empty()).then(|| Nameservers {
                        addresses: net.dns.clone(),
                    }),
                },
            },
        };
        files.push(SeedFile {
            path: "network-config",
            data: json(&config).into_bytes(),
        });
    }
    let line = |s: &str| format!("{s}\n").into_bytes();
    files.push(SeedFile {
        path: "tpl-hostname",
        data: line(&spec.hostname),
    });
    files.push(SeedFile {
        path: "tpl-instance-id",
        data: line(&spec.instance_id),
    });
    if let Some(user) = &spec.user {
        files.push(SeedFile {
            path: "tpl-user",
            data: line(user),
        });
    }
    if !keys.is_empty() {
        files.push(SeedFile {
            path: "tpl-authorized_keys",
            data: keys.iter().flat_map(|k| line(k)).collect(),
        });
    }
    if let (Some(net), Some(mac)) = (&spec.network, &mac) {
        files.push(SeedFile {
            path: "tpl-network",
            data: tpl_network(net, mac).into_bytes(),
        });
    }
    Ok(files)
}

//! `--ready`: the clones started, then waited for all at once until each has an address and, when asked, until its SSH server answers; what each presented goes into its record.
//!
//! Addresses are read from libvirt, never guessed: the network's DHCP lease of the
//! clone's MAC, else the guest agent, else the host's ARP table. The SSH server is asked
//! for its host keys with `ssh-keyscan` (OpenSSH's own tool, which speaks the key
//! exchange and trusts nothing); the keys go into the record with their fingerprints,
//! so that a user writes `known_hosts` without trusting a first connection. A clone that
//! presents a key another clone of the batch presents was not generalized (its template
//! kept its host keys): that is its error.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tpl_common::cli::Ctx;
use tpl_common::error::{Error, Result};
use tpl_common::record::{HostKey, Ready as Seen};
use tpl_common::seed::fingerprint_sha256;
use tpl_common::text::shown;
use virt::domain::Domain;
use virt::sys;

/// What `--ready` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ready {
    /// An IPv4 address.
    Address,
    /// An address, and an SSH server presenting its host keys.
    Ssh,
}

/// One clone to wait for.
#[derive(Debug)]
pub struct Waited {
    pub name: String,
    pub dom: Domain,
    /// What was seen so far.
    pub seen: Option<Seen>,
    /// Why it is not ready (a failed scan, a shared host key); None while it may still be.
    pub error: Option<Error>,
}

/// How often the clones are looked at. This is polling with a deadline (libvirt sends no
/// event when a lease is given, a guest has no way to say its SSH server is up), not a
/// sleep that hides a race.
const POLL: Duration = Duration::from_millis(500);

/// The clone's IPv4 addresses from one source, its first interface's first.
fn addresses(dom: &Domain, source: u32) -> Vec<Ipv4Addr> {
    let Ok(ifaces) = dom.interface_addresses(source, 0) else {
        return Vec::new();
    };
    ifaces
        .iter()
        .filter(|i| i.name != "lo")
        .flat_map(|i| i.addrs.iter())
        .filter_map(|a| a.addr.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_link_local())
        .collect()
}

/// Where the clone's addresses are known, and them.
fn find_address(dom: &Domain) -> Option<(Vec<Ipv4Addr>, &'static str)> {
    [
        (sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, "lease"),
        (sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, "agent"),
        (sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP, "arp"),
    ]
    .into_iter()
    .find_map(|(src, name)| {
        let a = addresses(dom, src);
        (!a.is_empty()).then_some((a, name))
    })
}

/// The host keys the SSH servers at `addrs` present, by address; an address whose server
/// does not answer yet is missing. One `ssh-keyscan` for all of them: it talks to its
/// hosts in parallel, so a round costs one timeout however many clones still boot.
fn scan(addrs: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, Vec<HostKey>>> {
    if addrs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let out = Command::new("ssh-keyscan")
        .args(["-T", "3", "-t", "ed25519,ecdsa,rsa"])
        .args(addrs.iter().map(|a| a.to_string()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| {
            Error::failed(
                "cannot run ssh-keyscan to read the clones' host keys",
                format!("{e}; install openssh-client, or wait for --ready=address"),
            )
        })?;
    parse_keyscan(&String::from_utf8_lossy(&out.stdout))
}

/// What `ssh-keyscan` printed, by address: each host's keys, sorted.
fn parse_keyscan(out: &str) -> Result<BTreeMap<Ipv4Addr, Vec<HostKey>>> {
    let mut found: BTreeMap<Ipv4Addr, Vec<HostKey>> = BTreeMap::new();
    for line in out.lines() {
        // `ADDR TYPE BASE64`; comments (`# ADDR:22 SSH-2.0-…`) are the banner.
        if line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(host), Some(kind), Some(b64)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(addr) = host.parse::<Ipv4Addr>() else {
            continue;
        };
        let key = format!("{kind} {b64}");
        let fingerprint = fingerprint_sha256(&key)?;
        found
            .entry(addr)
            .or_default()
            .push(HostKey { key, fingerprint });
    }
    for keys in found.values_mut() {
        keys.sort_by(|a, b| a.key.cmp(&b.key));
    }
    Ok(found)
}

/// Wait until every clone in `clones` is ready (`what`), or `timeout` passed, or a
/// signal came; each ends with what was seen, or why it is not ready.
pub fn wait_all(ctx: &Ctx, clones: &mut [Waited], what: Ready, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let total = clones.len();
    let mut last_up = usize::MAX;
    loop {
        ctx.intr.check()?;
        for c in clones.iter_mut().filter(|c| c.error.is_none()) {
            let ready_now = c
                .seen
                .as_ref()
                .is_some_and(|s| what == Ready::Address || !s.host_keys.is_empty());
            if ready_now {
                continue;
            }
            if c.seen.is_none() {
                if let Some((addresses, source)) = find_address(&c.dom) {
                    c.seen = Some(Seen {
                        addresses,
                        source: source.into(),
                        host_keys: Vec::new(),
                    });
                }
            }
        }
        if what == Ready::Ssh {
            let pending = |c: &Waited| {
                c.error.is_none() && c.seen.as_ref().is_some_and(|s| s.host_keys.is_empty())
            };
            let addrs: Vec<Ipv4Addr> = clones
                .iter()
                .filter(|c| pending(c))
                .filter_map(|c| c.seen.as_ref().map(|s| s.addresses[0]))
                .collect();
            let found = scan(&addrs);
            for c in clones.iter_mut().filter(|c| pending(c)) {
                match (&found, c.seen.as_mut()) {
                    (Ok(found), Some(s)) => {
                        if let Some(keys) = found.get(&s.addresses[0]) {
                            s.host_keys = keys.clone();
                        }
                    }
                    (Err(e), _) => {
                        c.error = Some(Error::failed(
                            format!("cannot read the host keys of clone '{}'", shown(&c.name)),
                            e.to_string(),
                        ))
                    }
                    (Ok(_), None) => {}
                }
            }
        }
        let up = clones
            .iter()
            .filter(|c| {
                c.seen
                    .as_ref()
                    .is_some_and(|s| what == Ready::Address || !s.host_keys.is_empty())
            })
            .count();
        let failed = clones.iter().filter(|c| c.error.is_some()).count();
        if ctx.show_progress() && up != last_up {
            eprint!("\r{up}/{total} up ");
            last_up = up;
        }
        if up + failed == total {
            break;
        }
        if start.elapsed() >= timeout {
            for c in clones.iter_mut().filter(|c| c.error.is_none()) {
                let ready = c
                    .seen
                    .as_ref()
                    .is_some_and(|s| what == Ready::Address || !s.host_keys.is_empty());
                if !ready {
                    c.error = Some(Error::failed(
                        format!("clone '{}' is not ready", shown(&c.name)),
                        match (&c.seen, what) {
                            (None, _) => format!(
                                "it has no address after {} s (no DHCP lease, no guest \
                                 agent, no ARP entry); see its console: virsh console {}",
                                timeout.as_secs(),
                                c.name
                            ),
                            (Some(s), _) => format!(
                                "its SSH server at {} did not answer within {} s",
                                s.addresses[0],
                                timeout.as_secs()
                            ),
                        },
                    ));
                }
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    if ctx.show_progress() {
        eprintln!();
    }
    refuse_shared_keys(clones);
    Ok(())
}

/// A host key two clones present was not made by either: their template kept its keys.
fn refuse_shared_keys(clones: &mut [Waited]) {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in clones.iter() {
        for k in c.seen.iter().flat_map(|s| &s.host_keys) {
            by_key
                .entry(k.fingerprint.clone())
                .or_default()
                .push(c.name.clone());
        }
    }
    for c in clones.iter_mut() {
        let shared: Vec<&String> = c
            .seen
            .iter()
            .flat_map(|s| &s.host_keys)
            .filter(|k| by_key.get(&k.fingerprint).is_some_and(|v| v.len() > 1))
            .map(|k| &k.fingerprint)
            .collect();
        if let Some(fp) = shared.first() {
            let others: Vec<&String> = by_key[*fp].iter().filter(|n| **n != c.name).collect();
            c.error = Some(Error::refused(
                format!("clone '{}' is not its own machine", shown(&c.name)),
                format!(
                    "its SSH host key {fp} is also {}'s: the template kept its host keys; \
                     generalize it (tpl-generalize) and make the clones again",
                    tpl_common::text::list(others.iter().map(|n| format!("'{}'", shown(n))), ", ")
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyscan_output_of_several_hosts_is_split_by_address() {
        // Two hosts' lines interleaved as a parallel scan prints them, banners included.
        let ed = "AAAAC3NzaC1lZDI1NTE5AAAAIAXQyxlcxMX1C0NYasOS5HqA816Q/7No1z+drxSYy0xu";
        let ed2 = "AAAAC3NzaC1lZDI1NTE5AAAAIHzJkX0ot4CR4giEPZVl89o63nosGv8jNsyPt1mQVPUQ";
        let out = format!(
            "# 192.168.123.7:22 SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\n\
             192.168.123.7 ssh-ed25519 {ed}\n\
             # 192.168.123.9:22 SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\n\
             192.168.123.9 ssh-ed25519 {ed2}\n\
             not-an-address ssh-ed25519 {ed}\n"
        );
        let found = parse_keyscan(&out).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        let a: Ipv4Addr = "192.168.123.7".parse().unwrap();
        let b: Ipv4Addr = "192.168.123.9".parse().unwrap();
        assert_eq!(found[&a].len(), 1);
        assert_eq!(found[&a][0].key, format!("ssh-ed25519 {ed}"));
        assert_eq!(found[&b][0].key, format!("ssh-ed25519 {ed2}"));
        assert_ne!(found[&a][0].fingerprint, found[&b][0].fingerprint);
        assert!(found[&a][0].fingerprint.starts_with("SHA256:"));
        assert!(parse_keyscan("# only a banner\n").unwrap().is_empty());
    }
}

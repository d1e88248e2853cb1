//! Clones ready to work on a real network (issue 20): a Debian 12 template on hvnet (a libvirtd in its own network namespace, with a NAT network and dnsmasq), clones with a user, a key and fixed addresses, started and waited for, and logged in to with ssh from inside that namespace only; DHCP reservations checked, released, and never orphaned by kill -9.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tpl_common::record::Record;
use tpl_tests::*;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A test's directory on a path hvnet sees as this host does (/var/tmp), and the domains
/// it defines on hvnet, removed at the end.
struct NetScratch {
    prefix: String,
    dir: PathBuf,
    uri: String,
}

impl NetScratch {
    fn new() -> NetScratch {
        let prefix = format!(
            "tplnet-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = PathBuf::from("/var/tmp").join(&prefix);
        fs::create_dir_all(&dir).unwrap();
        sh("chmod", &["0755", p(&dir)]);
        NetScratch {
            prefix,
            dir,
            uri: hvnet_uri(),
        }
    }

    fn name(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }

    /// A Debian template on hvnet, on its own copy of the image; `customize` (a
    /// virt-customize argument list) changes the copy first.
    fn debian(&self, tag: &str, customize: &[&str]) -> String {
        let (disk, kernel, initrd) = debian_image();
        let name = self.name(tag);
        let d = self.dir.join(format!("{name}.qcow2"));
        sh("cp", &["--sparse=always", p(disk), p(&d)]);
        let (k, i) = (
            self.dir.join(format!("{name}.vmlinuz")),
            self.dir.join(format!("{name}.initrd")),
        );
        sh("cp", &[p(kernel), p(&k)]);
        sh("cp", &[p(initrd), p(&i)]);
        if !customize.is_empty() {
            let mut c = Command::new("virt-customize");
            test_env(&mut c).args(["-q", "-a", p(&d)]).args(customize);
            succeed(&mut c);
        }
        let xml = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/debian-domain.xml"),
        )
        .unwrap()
        .replace("@NAME@", &name)
        .replace("@DISK@", p(&d))
        .replace("@KERNEL@", p(&k))
        .replace("@INITRD@", p(&i))
        .replace(
            "@CONSOLE@",
            p(&self.dir.join(format!("{name}.console.log"))),
        )
        .replace("@EXTRA@", "");
        let f = self.dir.join(format!("{name}.xml"));
        fs::write(&f, xml).unwrap();
        virsh_hvnet(&["define", p(&f)]);
        name
    }

    fn tool(&self, name: &str, args: &[&str]) -> Run {
        let mut a = vec!["-c", self.uri.as_str()];
        a.extend_from_slice(args);
        run(name, &a, None)
    }

    /// A generalized, locked Debian template.
    fn template(&self, tag: &str, customize: &[&str]) -> String {
        let t = self.debian(tag, customize);
        self.tool("tpl-generalize", &[&t]).ok(1);
        self.tool("tpl-lock", &[&t]).ok(1);
        t
    }

    /// The DHCP host entries of tplnet: (MAC, address).
    fn reservations(&self) -> Vec<(String, Ipv4Addr)> {
        let x = virsh_hvnet(&["net-dumpxml", "tplnet"]);
        let root = xmltree::Element::parse(x.as_bytes()).unwrap();
        let dhcp = root
            .get_child("ip")
            .and_then(|ip| ip.get_child("dhcp"))
            .expect("tplnet has DHCP");
        tpl_common::domxml::children_named(dhcp, "host")
            .filter_map(|h| {
                Some((
                    h.attributes.get("mac")?.to_ascii_lowercase(),
                    h.attributes.get("ip")?.parse().ok()?,
                ))
            })
            .collect()
    }

    fn domains(&self) -> Vec<String> {
        virsh_hvnet(&["list", "--all", "--name"])
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(String::from)
            .collect()
    }
}

impl Drop for NetScratch {
    /// Every domain of the test goes, with the reservations of its MACs in tplnet.
    fn drop(&mut self) {
        let uri = self.uri.clone();
        let virsh = |args: &[&str]| {
            Command::new("virsh")
                .arg("-c")
                .arg(&uri)
                .args(args)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for d in self.domains() {
            virsh(&["destroy", &d]);
            let macs: Vec<String> = virsh(&["domiflist", &d])
                .split_whitespace()
                .filter(|w| w.len() == 17 && w.matches(':').count() == 5)
                .map(str::to_ascii_lowercase)
                .collect();
            for (mac, ip) in self.reservations() {
                if macs.contains(&mac) {
                    let host = format!("<host mac='{mac}' ip='{ip}'/>");
                    virsh(&[
                        "net-update",
                        "tplnet",
                        "delete",
                        "ip-dhcp-host",
                        &host,
                        "--live",
                        "--config",
                    ]);
                }
            }
            virsh(&["undefine", "--nvram", &d]);
        }
        force_remove_dir(&self.dir);
    }
}

/// Fixed address `k` (0..=77) of this test run in tplnet (192.168.123.0/24): DHCP hands
/// out .100-.199, so .2-.99 are free for fixed addresses; a run starts at a place of its
/// own. The tests of this file run at once: each keeps to its own `k`s (the first test
/// 0-1, the second 3-4, the kill test 10-57).
fn fixed(k: u32) -> Ipv4Addr {
    assert!(k <= 77);
    Ipv4Addr::new(192, 168, 123, (2 + std::process::id() % 20 + k) as u8)
}

/// A fresh ed25519 key pair: (private, public).
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let k = dir.join(name);
    succeed(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", p(&k)]));
    (k.clone(), k.with_extension("pub"))
}

/// Log in to `rec`'s first address as `user` with `key`, trusting only the host keys its
/// record carries, and run `cmd`: from inside hvnet's network namespace.
fn ssh(dir: &Path, rec: &Record, user: &str, key: &Path, cmd: &str) -> String {
    let ready = rec
        .ready
        .as_ref()
        .expect("the record says what --ready saw");
    let addr = ready.addresses[0].to_string();
    let kh = dir.join(format!("{}.known_hosts", rec.name));
    let lines: String = ready
        .host_keys
        .iter()
        .map(|k| format!("{addr} {}\n", k.key))
        .collect();
    fs::write(&kh, lines).unwrap();
    let out = succeed(&mut in_hvnet(
        Path::new("ssh"),
        &[
            "-i",
            p(key),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("UserKnownHostsFile={}", p(&kh)),
            "-o",
            "ConnectTimeout=10",
            &format!("{user}@{addr}"),
            cmd,
        ],
    ));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Two clones of the Debian template with a user, a key, one fixed address and a bigger
/// disk, started and waited for: each logs the user in with the key at its address, says
/// its own host name, presents the host keys its record carries (ssh refuses any other),
/// and its root file system fills the bigger disk. Then the same on a template whose
/// cloud-init is disabled: tpl's first-boot action does it from the same seed.
#[test]
fn debian_clones_let_their_user_in_at_their_addresses() {
    let s = NetScratch::new();
    let (key, public) = keypair(&s.dir, "id_net");
    for (tag, customize) in [
        ("ci", &[][..]),
        ("noci", &["--touch", "/etc/cloud/cloud-init.disabled"][..]),
    ] {
        let t = s.template(tag, customize);
        let (a, b) = (s.name(&format!("{tag}-a")), s.name(&format!("{tag}-b")));
        let ip_b = fixed(if tag == "ci" { 0 } else { 1 });
        let r = run_in_hvnet(
            "tpl-clone",
            &[
                "-c",
                &s.uri,
                &t,
                &a,
                &b,
                "--user",
                "alice",
                "--ssh-key",
                p(&public),
                "--ip",
                &format!("{b}={ip_b}"),
                "--disk-size",
                "3G",
                "--ready=ssh",
                "--ready-timeout",
                "600",
            ],
        )
        .ok(2);
        for rec in &r.records {
            let ready = rec.ready.as_ref().expect("ready");
            assert!(!ready.host_keys.is_empty(), "{tag}: {rec:?}");
            let host = ssh(&s.dir, rec, "alice", &key, "hostname");
            assert_eq!(host, rec.name, "{tag}: the clone's own host name");
            let size: u64 = ssh(
                &s.dir,
                rec,
                "alice",
                &key,
                "df -B1 --output=size / | tail -n 1",
            )
            .trim()
            .parse()
            .unwrap();
            assert!(size > 2_500_000_000, "{tag}: / is {size} bytes, not grown");
            // sudo without a password, as the seed says.
            assert_eq!(ssh(&s.dir, rec, "alice", &key, "sudo -n id -u"), "0");
        }
        let rb = r.records.iter().find(|r| r.name == b).unwrap();
        assert_eq!(rb.ready.as_ref().unwrap().addresses[0], ip_b, "{tag}");
        assert!(
            s.reservations().iter().any(|(_, ip)| *ip == ip_b),
            "{tag}: the reservation is in tplnet"
        );
        // Two clones, two machines: no host key in common.
        let keys = |n: &str| -> Vec<String> {
            let rec = r.records.iter().find(|r| r.name == n).unwrap();
            rec.ready
                .as_ref()
                .unwrap()
                .host_keys
                .iter()
                .map(|k| k.fingerprint.clone())
                .collect()
        };
        assert!(keys(&a).iter().all(|k| !keys(&b).contains(k)), "{tag}");
        // Removed with its clone: the reservation goes.
        s.tool("tpl-rm", &["--force", &b]).ok(0);
        assert!(
            !s.reservations().iter().any(|(_, ip)| *ip == ip_b),
            "{tag}: tpl-rm releases the reservation"
        );
    }
}

/// An address reserved or leased in the network, or outside it, is refused (exit 3 or 2)
/// before anything is made; a reservation goes with its clone.
#[test]
fn taken_addresses_are_refused_before_anything_is_made() {
    let s = NetScratch::new();
    let (_, public) = keypair(&s.dir, "id_r");
    let t = s.template("tpl", &[]);
    let ip = fixed(4);
    let first = s.name("r1");
    s.tool("tpl-clone", &[&t, &first, "--ip", &ip.to_string()])
        .ok(1);
    assert!(s.reservations().iter().any(|(_, a)| *a == ip));
    let before = fs::read_dir(&s.dir).unwrap().count();
    let second = s.name("r2");
    for (args, code, says) in [
        (
            vec!["--ip".to_string(), ip.to_string()],
            3,
            "reserved already",
        ),
        (
            vec!["--ip".to_string(), "192.168.123.1".into()],
            3,
            "host's own",
        ),
        (
            vec!["--ip".to_string(), "10.9.8.7".into()],
            3,
            "not a guest's address",
        ),
        (
            vec!["--ip".to_string(), "192.168.123.10/24".into()],
            2,
            "prefix holds",
        ),
    ] {
        let mut a: Vec<&str> = vec![&t, &second, "--ssh-key", p(&public)];
        a.extend(args.iter().map(String::as_str));
        s.tool("tpl-clone", &a).fails(code).says(&[says]);
        assert_eq!(fs::read_dir(&s.dir).unwrap().count(), before, "{args:?}");
        assert!(!s.domains().contains(&second), "{args:?}");
    }
    // A batch counting up into an address that is taken is refused whole.
    let lower = Ipv4Addr::from(u32::from(ip) - 1);
    s.tool(
        "tpl-clone",
        &[&t, &second, &s.name("r3"), "--ip", &lower.to_string()],
    )
    .fails(3)
    .says(&[&ip.to_string(), "reserved already"]);
    assert_eq!(s.domains().len(), 2, "the template and the first clone");
    s.tool("tpl-rm", &[&first]).ok(0);
    assert!(!s.reservations().iter().any(|(_, a)| *a == ip));
}

/// kill -9 while a batch reserves addresses: after the next run of any tool, every
/// reservation the batch made belongs to a clone that exists.
#[test]
fn kill_9_leaves_no_reservation_without_its_clone() {
    let s = NetScratch::new();
    let t = s.template("tpl", &[]);
    let mut rng = Rng::seeded("kill_9_leaves_no_reservation_without_its_clone");
    let trials = 5;
    let mut landed = 0;
    for trial in 0..trials {
        let prefix = s.name(&format!("k{trial}-"));
        let start = fixed(10 + trial * 10);
        let mut c = tool_command("tpl-clone");
        let log = s.dir.join(format!("k{trial}.stderr"));
        c.args(["-c", &s.uri, &t, "--count", "8", "--prefix", &prefix])
            .args(["--ip", &start.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let mut child = c.spawn().unwrap();
        let pid = child.id();
        let ours = |s: &NetScratch| -> Vec<Ipv4Addr> {
            s.reservations()
                .into_iter()
                .map(|(_, a)| a)
                .filter(|a| (u32::from(start)..u32::from(start) + 8).contains(&u32::from(*a)))
                .collect()
        };
        let k = rng.range(1, 6) as usize;
        wait_until(120, "reservations being made", || {
            let exited = child.try_wait().unwrap().is_some();
            assert!(
                !exited || ours(&s).len() >= k,
                "trial {trial}: the run ended first: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            ours(&s).len() >= k
        });
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        if !journals_of(pid).is_empty() {
            landed += 1;
        }
        s.tool("tpl-list", &[]);
        assert!(journals_of(pid).is_empty(), "trial {trial}: journal kept");
        let defined = s.domains();
        let n_reserved = ours(&s).len();
        let n_clones = defined.iter().filter(|d| d.starts_with(&prefix)).count();
        assert_eq!(
            n_reserved, n_clones,
            "trial {trial}: {n_reserved} reservations for {n_clones} clones"
        );
    }
    assert!(
        landed >= trials / 2,
        "only {landed} of {trials} kills landed mid-run"
    );
}

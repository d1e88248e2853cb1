//! tpl-generalize against the real libvirtd and the real virt-sysprep: one pipeline seals a guest
//! (and fails on a disk without an OS), its image is read without booting, then clones of it boot.
//!
//! virt-sysprep costs about a minute per domain under TCG, so this file runs it twice in all
//! (one stream of two domains); every other test refuses, dry-runs before any appliance starts,
//! or runs a stand-in virt-sysprep.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tpl_common::meta::Meta;
use tpl_tests::*;

/// The first-boot script as the crate ships it; the guest must hold exactly this.
const FIRSTBOOT: &str = include_str!("../../tpl-generalize/src/firstboot.sh");

/// A raw copy of a qcow2 image (following its backing chain), for debugfs to read.
fn raw_copy(img: &Path, dir: &Path, tag: &str) -> PathBuf {
    let raw = dir.join(format!("{tag}.raw"));
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    raw
}

/// Read an ext4 image without mounting or booting it (e2fsprogs' debugfs, read-only).
struct Fs(PathBuf);

impl Fs {
    fn debugfs(&self, cmd: &str) -> String {
        sh("debugfs", &["-R", cmd, self.0.to_str().unwrap()])
    }

    fn exists(&self, path: &str) -> bool {
        self.debugfs(&format!("stat {path}")).contains("Inode:")
    }

    fn size(&self, path: &str) -> u64 {
        let out = self.debugfs(&format!("stat {path}"));
        let at = out
            .find("Size: ")
            .unwrap_or_else(|| panic!("{path} missing: {out}"));
        out[at + 6..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn cat(&self, path: &str) -> String {
        assert!(self.exists(path), "{path} is missing");
        self.debugfs(&format!("cat {path}"))
    }

    /// Names in a directory, without . and ..
    fn ls(&self, dir: &str) -> Vec<String> {
        assert!(self.exists(dir), "{dir} is missing");
        self.debugfs(&format!("ls -p {dir}"))
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(String::from))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect()
    }
}

/// Everything a generalized template must have lost; the pristine guest has it all.
const CLEANED: &[&str] = &[
    "/var/log/syslog",
    "/var/log/auth.log",
    "/var/log/dpkg.log",
    "/var/log/apt/history.log",
    "/root/.bash_history",
    "/home/user/.bash_history",
    "/var/lib/dhcp/dhclient.eth0.leases",
    "/tmp/junk.txt",
    "/var/tmp/junk.txt",
    "/var/lib/cloud/instance",
    "/var/lib/cloud/instances",
    "/var/lib/cloud/data",
];

fn host_keys(fs: &Fs) -> Vec<String> {
    fs.ls("/etc/ssh")
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_"))
        .collect()
}

/// The pipeline on a stream of two domains: one whose disk holds no OS (virt-sysprep
/// fails; the stream carries on) and a real guest, which ends generalized, locked and renamed.
/// Then its image is read without booting, and two linked clones of it boot once.
#[test]
fn pipeline_seals_a_template_whose_clones_boot_fresh() {
    let mut sc = Scratch::new();
    let vm = sc.guest("vm");
    let blank = sc.name("blank");
    let blank_disk = sc.dir.join(format!("{blank}.qcow2"));
    qemu_img_create(&blank_disk, "qcow2", "64M");
    sc.define(&guest_xml(
        &blank,
        &blank_disk,
        &sc.dir.join("blank.log"),
        "",
    ));
    let mut blank_meta = Meta::default();
    blank_meta.record_step("test", "metadata a failed run must leave alone");
    set_meta(&blank, &blank_meta);

    // The pristine guest carries everything the template must lose, so each check below can fail.
    let orig = Fs(raw_copy(guest_image(), &sc.dir, "orig"));
    for p in CLEANED {
        assert!(orig.exists(p), "the test guest should have {p}");
    }
    assert_eq!(orig.size("/etc/machine-id"), 33);
    assert_eq!(host_keys(&orig).len(), 6);
    assert_eq!(orig.cat("/etc/hostname").trim(), "original-vm");

    let tpl = sc.name("TplVM");
    let err = sc.dir.join("generalize.stderr");
    let rc = sc.dir.join("generalize.rc");
    let start = Instant::now();
    let run = pipeline(&format!(
        "{{ printf '%s\\n' '{{\"name\":\"{blank}\"}}' '{{\"name\":\"{vm}\"}}' | \
         tpl-generalize --hostname TplVM -- --write /etc/machine-id:0123456789abcdef0123456789abcdef \
         --write /etc/motd:sealed-by-tpl 2>{err}; echo $? >{rc}; }} | tpl-lock | tpl-rename {tpl}",
        vm = vm.name,
        err = err.display(),
        rc = rc.display(),
    ));
    let took = start.elapsed();
    let gen_err = std::fs::read_to_string(&err).unwrap();
    eprintln!("tpl-generalize ({took:?}):\n{gen_err}");
    let run = run.ok(1);

    // The failed record: exit 1, virt-sysprep's own error in the message, metadata as it was.
    assert_eq!(
        std::fs::read_to_string(&rc).unwrap().trim(),
        "1",
        "{gen_err}"
    );
    assert!(gen_err.contains(&format!(
        "tpl-generalize: error: virt-sysprep failed on domain '{blank}'"
    )));
    assert!(
        gen_err.contains("no operating systems were found"),
        "{gen_err}"
    );
    assert_eq!(read_meta(&blank), blank_meta);

    // One virt-sysprep (one appliance) per domain, progress streamed, trace kept off screen.
    assert_eq!(
        gen_err.matches("Examining the guest").count(),
        2,
        "{gen_err}"
    );
    assert!(gen_err.contains("Performing \"customize\""), "{gen_err}");
    assert!(gen_err.contains("Truncating: /etc/machine-id"), "{gen_err}");
    assert!(!gen_err.contains("libguestfs: trace:"), "{gen_err}");

    // The record after generalize | lock | rename, and the metadata behind it.
    let rec = only(&run);
    assert_eq!(rec.name, tpl);
    assert_eq!(rec.uuid, vm.uuid);
    assert!(rec.template.locked);
    let g = rec.template.generalized.as_ref().expect("generalized");
    assert_eq!(g.method.as_str(), "virt-sysprep");
    assert!(
        g.tool.as_deref().unwrap().starts_with("virt-sysprep 1."),
        "{g:?}"
    );
    assert_eq!(g.operations, ["defaults"]);
    assert_eq!(g.hostname.as_deref(), Some("TplVM"));
    let tools: Vec<&str> = rec.history.iter().map(|s| s.tool.as_str()).collect();
    assert_eq!(tools, ["tpl-generalize", "tpl-lock", "tpl-rename"]);
    assert_eq!(read_meta(&tpl).template.generalized.as_ref(), Some(g));

    // The image, read without booting it.
    let fs = Fs(raw_copy(&vm.disk, &sc.dir, "template"));
    assert!(
        fs.exists("/etc/machine-id"),
        "machine-id must exist (empty), not be deleted"
    );
    assert_eq!(
        fs.size("/etc/machine-id"),
        0,
        "even after the user's own --write of one"
    );
    assert_eq!(
        fs.cat("/etc/motd"),
        "sealed-by-tpl",
        "options after -- reach virt-sysprep"
    );
    assert_eq!(host_keys(&fs), Vec::<String>::new());
    assert!(
        fs.exists("/usr/bin/ssh-keygen"),
        "the guest keeps its tools"
    );
    for p in CLEANED {
        assert!(!fs.exists(p), "{p} survived generalization");
    }
    assert_eq!(fs.cat("/etc/hostname").trim(), "TplVM");
    let hosts = fs.cat("/etc/hosts");
    assert!(
        hosts.contains("TplVM") && !hosts.contains("original-vm"),
        "{hosts}"
    );
    // The first-boot action: virt-sysprep's runner, started at boot, and our script in its queue.
    let queued = fs.ls("/usr/lib/virt-sysprep/scripts");
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert!(queued[0].ends_with("-tpl-firstboot"), "{queued:?}");
    assert_eq!(
        fs.cat(&format!("/usr/lib/virt-sysprep/scripts/{}", queued[0])),
        FIRSTBOOT
    );
    assert!(fs.exists("/usr/lib/virt-sysprep/firstboot.sh"));
    assert!(fs.exists("/etc/rc2.d/S99guestfs-firstboot"));

    // Two linked clones of the locked template, each with the serial tpl-clone will write,
    // boot once side by side; each must come up with its own hostname and its own host keys.
    let clones: Vec<(String, PathBuf, PathBuf, String)> = ["clone1", "clone2"]
        .iter()
        .map(|tag| {
            let name = sc.name(tag);
            let overlay = sc.dir.join(format!("{tag}.qcow2"));
            qemu_img_overlay(&vm.disk, "qcow2", &overlay);
            let console = sc.dir.join(format!("{tag}.console.log"));
            let serial = format!("ds=nocloud;h={tag};i=iid-{tag}");
            let xml = guest_xml(&name, &overlay, &console, "").replace(
                "<entry name='manufacturer'>tpl tests</entry>",
                &format!(
                    "<entry name='manufacturer'>tpl tests</entry><entry name='serial'>{serial}</entry>"
                ),
            );
            assert!(xml.contains(&serial));
            sc.define(&xml);
            (tag.to_string(), overlay, console, serial)
        })
        .collect();
    let names: Vec<String> = clones.iter().map(|c| sc.name(&c.0)).collect();
    boot_until_off(&names, Duration::from_secs(300));
    let mut all_keys = Vec::new();
    let mut all_ids = Vec::new();
    for (tag, overlay, console, serial) in &clones {
        let log = std::fs::read_to_string(console).unwrap();
        eprintln!("{tag} console:\n{log}");
        assert_eq!(boot_values(&log, "firstboot"), ["run"], "{log}");
        assert_eq!(boot_values(&log, "serial"), [serial.as_str()]);
        assert_eq!(boot_values(&log, "hostname"), [tag.as_str()], "{log}");
        // Empty in the template, so the guest's init (like systemd) made a fresh one.
        assert_eq!(boot_values(&log, "machine-id-at-boot"), [""]);
        let mid = boot_values(&log, "machine-id");
        assert_eq!(mid.len(), 1, "{log}");
        assert!(
            mid[0].len() == 32 && mid[0].chars().all(|c| c.is_ascii_hexdigit()),
            "{log}"
        );
        assert_ne!(
            mid[0],
            orig.cat("/etc/machine-id").trim(),
            "the template's old id"
        );
        all_ids.push(mid[0].to_string());
        // The hostname first, then the keys: their comments carry the clone's name.
        let named = log.find(&format!("tpl-firstboot: setting the hostname to '{tag}'"));
        let keyed = log.find("tpl-firstboot: generating SSH host keys");
        assert!(named.is_some() && keyed.is_some() && named < keyed, "{log}");
        let keys = boot_values(&log, "hostkey");
        assert_eq!(keys.len(), 3, "fresh host keys expected: {log}");
        for k in &keys {
            let (sum, path) = k.split_once(' ').unwrap();
            let old = orig.cat(path);
            assert_ne!(sum, md5(old.as_bytes()), "{path} is the template's old key");
            all_keys.push(sum.to_string());
        }

        // What the first boot left in the clone's own disk: hostname files, the action done.
        let booted = Fs(raw_copy(overlay, &sc.dir, tag));
        assert_eq!(booted.cat("/etc/hostname").trim(), tag);
        let hosts = booted.cat("/etc/hosts");
        assert!(
            hosts.lines().any(|l| l == format!("127.0.1.1\t{tag}")),
            "{hosts}"
        );
        assert!(hosts.contains("127.0.0.1 localhost"), "{hosts}");
        assert_eq!(
            booted.ls("/usr/lib/virt-sysprep/scripts"),
            Vec::<String>::new()
        );
        assert_eq!(host_keys(&booted).len(), 6);
        let pubkey = booted.cat("/etc/ssh/ssh_host_ed25519_key.pub");
        assert!(
            pubkey.trim_end().ends_with(&format!(" root@{tag}")),
            "the key's comment names the template, not the clone: {pubkey}"
        );
    }
    let unique: std::collections::BTreeSet<&String> = all_keys.iter().collect();
    assert_eq!(unique.len(), 6, "the clones share host keys: {all_keys:?}");
    assert_ne!(all_ids[0], all_ids[1], "the clones share a machine-id");
    // The template itself is untouched by its clone's boot.
    assert_eq!(
        host_keys(&Fs(raw_copy(&vm.disk, &sc.dir, "template2"))).len(),
        0
    );
}

/// md5 as the guest's `md5sum | cut -c1-32` prints it, from the host's md5sum.
fn md5(data: &[u8]) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..32].to_string()
}

/// A running (here: paused) domain, a locked template and a Windows guest are refused with
/// exit 3 and what to do; none of them is touched. A Windows guest sealed from inside can be
/// recorded with --sealed-externally, and a stream carries on past a refusal.
#[test]
fn refuses_running_locked_and_windows_guests() {
    let mut sc = Scratch::new();

    let running = sc.guest("running");
    virsh(&["start", "--paused", &running.name]);
    let before = sha256(&running.disk);
    run("tpl-generalize", &[&running.name], None)
        .fails(3)
        .says(&[
            &format!("cannot generalize domain '{}'", running.name),
            "paused",
            "virsh shutdown",
        ]);
    assert_eq!(sha256(&running.disk), before);
    // Running for real: the guest needs well over ten seconds to boot and power off, the
    // refusal a fraction of one.
    virsh(&["resume", &running.name]);
    run("tpl-generalize", &[&running.name], None)
        .fails(3)
        .says(&["it is running", "virsh shutdown"]);
    let _ = virsh_try(&["destroy", &running.name]);
    assert_eq!(read_meta(&running.name), Meta::default());

    let locked = sc.guest("locked");
    let mut m = Meta::default();
    m.template.locked = true;
    set_meta(&locked.name, &m);
    let before = sha256(&locked.disk);
    run("tpl-generalize", &[&locked.name, "--hostname", "x"], None)
        .fails(3)
        .says(&[
            "locked template",
            &format!("tpl-lock --unlock {}", locked.name),
        ]);
    assert_eq!(sha256(&locked.disk), before);
    assert_eq!(read_meta(&locked.name), m);

    let win = sc.name("win");
    let win_disk = sc.disk("win.qcow2");
    let xml = guest_xml(&win, &win_disk, &sc.dir.join("win.log"), "").replacen(
        "</name>",
        "</name><metadata><libosinfo:libosinfo xmlns:libosinfo=\"http://libosinfo.org/xmlns/libvirt/domain/1.0\">\
         <libosinfo:os id=\"http://microsoft.com/win/10\"/></libosinfo:libosinfo></metadata>",
        1,
    );
    sc.define(&xml);
    let before = sha256(&win_disk);
    run("tpl-generalize", &[&win], None).fails(3).says(&[
        "libosinfo",
        "http://microsoft.com/win/10",
        "sysprep.exe /generalize /oobe /shutdown",
        &format!("tpl-generalize --sealed-externally {win}"),
    ]);
    assert_eq!(read_meta(&win), Meta::default());

    // A stream: the locked one is refused, the sealed Windows guest is recorded.
    let input = format!("{{\"name\":\"{}\"}}\n{{\"name\":\"{win}\"}}\n", locked.name);
    let r = run("tpl-generalize", &["--sealed-externally"], Some(&input))
        .fails(3)
        .says(&["locked template"]);
    let rec = only(&r);
    assert_eq!(rec.name, win);
    let g = rec.template.generalized.as_ref().unwrap();
    assert_eq!(g.method.as_str(), "external");
    assert!(g.operations.is_empty() && g.tool.is_none());
    assert_eq!(read_meta(&win).template.generalized.as_ref(), Some(g));
    assert_eq!(rec.history.last().unwrap().tool, "tpl-generalize");
    assert_eq!(
        sha256(&win_disk),
        before,
        "--sealed-externally must not touch the disk"
    );
    assert_eq!(read_meta(&locked.name), m);
}

/// --dry-run says what would run and changes neither the disk nor the metadata.
#[test]
fn dry_run_changes_nothing() {
    let mut sc = Scratch::new();
    let g = sc.guest("dry");
    let before = sha256(&g.disk);
    let r = run(
        "tpl-generalize",
        &[&g.name, "--dry-run", "--hostname", "TplVM", "--disable", "tmp-files,bash-history", "--", "--root-password", "password:x"],
        None,
    )
    .ok(1)
    .says(&[
        &format!("virt-sysprep -c qemu:///system -d {}", g.uuid),
        "--operations 'defaults,-tmp-files,-bash-history'",
        "--touch /etc/machine-id --root-password password:x --truncate /etc/machine-id --hostname TplVM --firstboot /",
        "/tpl-firstboot --delete",
        "--delete /var/lib/cloud/instances",
    ]);
    let rec = only(&r);
    assert_eq!(rec.uuid, g.uuid);
    assert!(rec.template.generalized.is_none());
    assert_eq!(sha256(&g.disk), before, "--dry-run changed the image");
    assert_eq!(read_meta(&g.name), Meta::default());
}

/// libguestfs's settings reach virt-sysprep from our environment (none are hard-coded):
/// a bogus backend makes it fail at once, the failure exits 1 with its error line, and the
/// metadata stays as it was.
#[test]
fn environment_reaches_virt_sysprep_and_its_failure_is_reported() {
    let mut sc = Scratch::new();
    let g = sc.guest("env");
    let out = tool_command("tpl-generalize")
        .arg(&g.name)
        .env("LIBGUESTFS_BACKEND", "tpl-no-such-backend")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains(&format!("virt-sysprep failed on domain '{}'", g.name))
            && stderr.contains("invalid backend: tpl-no-such-backend"),
        "{stderr}"
    );
    assert_eq!(read_meta(&g.name), Meta::default());
}

/// tpl-generalize holds the domain's lock for its whole run: a tpl-lock meanwhile waits
/// (saying for whom) or, with --wait 0, is refused (exit 3) and changes nothing. A lock
/// written by hand around the tools (virsh metadata) while virt-sysprep ran is still
/// caught: generalize fails (exit 1) and does not record it as generalized. A stand-in
/// virt-sysprep does both at the moment the real one would be writing (and skips the
/// appliance).
#[test]
fn a_domain_locked_while_virt_sysprep_runs_is_not_recorded_as_generalized() {
    let mut sc = Scratch::new();
    let g = sc.guest("raced");
    let real = sh("sh", &["-c", "command -v virt-sysprep"]);
    let dir = sc.dir.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("virt-sysprep");
    let lock_err = sc.dir.join("lock.err");
    let mut m = tpl_common::meta::Meta::default();
    m.template.locked = true;
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n\
             case $1 in --version|--list-operations) exec '{real}' \"$@\" ;; esac\n\
             '{lock}' --wait 0 --force '{uuid}' >/dev/null 2>'{err}'; echo \"exit $?\" >>'{err}'\n\
             virsh -q -c qemu:///system metadata '{uuid}' --uri {ns} --key {key} --set '{meta}' --config || exit 9\n\
             echo 'stand-in virt-sysprep: locked by hand meanwhile' >&2\n",
            real = real.trim(),
            lock = bin("tpl-lock").display(),
            uuid = g.uuid,
            err = lock_err.display(),
            ns = tpl_common::meta::NS,
            key = tpl_common::meta::PREFIX,
            meta = m.to_xml(),
        ),
    )
    .unwrap();
    sh("chmod", &["755", p(&fake)]);
    let before = std::fs::metadata(&g.disk).unwrap().permissions();
    let out = tool_command("tpl-generalize")
        .arg(&g.name)
        .env(
            "PATH",
            format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lock_said = std::fs::read_to_string(&lock_err).unwrap();
    assert!(
        lock_said.contains("busy")
            && lock_said.contains("tpl-generalize (pid")
            && lock_said.trim_end().ends_with("exit 3"),
        "{lock_said}"
    );
    assert_eq!(
        std::fs::metadata(&g.disk).unwrap().permissions(),
        before,
        "the refused tpl-lock changed nothing"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("locked by hand meanwhile"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "tpl-generalize: error: domain '{}' ({}) was locked while virt-sysprep ran",
            g.name, g.uuid
        )) && stderr.contains("half-written"),
        "{stderr}"
    );
    let m = read_meta(&g.name);
    assert!(m.template.locked, "the hand-made lock stays");
    assert!(m.template.generalized.is_none(), "{m:?}");
    assert!(
        m.history.iter().all(|h| h.tool != "tpl-generalize"),
        "{m:?}"
    );
}

/// Bad options are usage errors (exit 2) before any domain is touched.
#[test]
fn bad_options_are_usage_errors() {
    let mut sc = Scratch::new();
    let g = sc.guest("opts");
    let n = g.name.as_str();
    for (args, says) in [
        (
            vec![n, "--operations", "defaults,no-such-op"],
            "unknown virt-sysprep operation 'no-such-op'",
        ),
        (
            vec![n, "--disable", "customize"],
            "keep 'customize' enabled",
        ),
        (vec![n, "--enable", "tmp-files"], "keep 'customize' enabled"),
        (
            vec![n, "--hostname", "bad name"],
            "invalid host name \"bad name\"",
        ),
        (
            vec![n, "--operations", "defaults", "--enable", "customize"],
            "cannot be used with",
        ),
        (
            vec![n, "--sealed-externally", "--hostname", "x"],
            "cannot be used with",
        ),
        (
            vec![n, "--", "--install", "x", "-d", "other"],
            "option '-d' cannot be passed through",
        ),
        (
            vec![n, "--", "--hostname=x"],
            "use tpl-generalize --hostname",
        ),
        (
            vec![n, "--sealed-externally", "--", "--install", "x"],
            "cannot be used with",
        ),
        (
            vec!["tpltest-no-such-domain"],
            "domain 'tpltest-no-such-domain' not found",
        ),
    ] {
        run("tpl-generalize", &args, None).fails(2).says(&[says]);
    }
    assert_eq!(read_meta(n), Meta::default());
}

/// The smallest file that `file` (and so libguestfs's inspection) calls an x86-64 Windows
/// executable: an MZ stub pointing at a PE32+ header.
fn pe32_plus_stub() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..2].copy_from_slice(b"MZ");
    b[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
    b[0x40..0x44].copy_from_slice(b"PE\0\0");
    b[0x44..0x46].copy_from_slice(&0x8664u16.to_le_bytes()); // machine: x86-64
    b[0x54..0x56].copy_from_slice(&0xf0u16.to_le_bytes()); // size of optional header
    b[0x56..0x58].copy_from_slice(&0x22u16.to_le_bytes()); // executable, large-address-aware
    b[0x58..0x5a].copy_from_slice(&0x20bu16.to_le_bytes()); // PE32+
    b[0x9c..0x9e].copy_from_slice(&3u16.to_le_bytes()); // console subsystem
    b
}

/// A guest without libosinfo metadata that virt-sysprep's inspection finds to be Windows (a
/// disk with \Windows\System32\config and a PE cmd.exe is what libguestfs looks for) is
/// refused with exit 3 and the sysprep instructions, and virt-sysprep stops before any
/// customize action writes to it.
#[test]
fn windows_found_by_inspection_is_refused_untouched() {
    let mut sc = Scratch::new();
    let root = sc.dir.join("winroot");
    std::fs::create_dir_all(root.join("Windows/System32/config")).unwrap();
    std::fs::write(root.join("Windows/System32/cmd.exe"), pe32_plus_stub()).unwrap();
    let raw = sc.dir.join("win.raw");
    sh(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            root.to_str().unwrap(),
            raw.to_str().unwrap(),
            "32M",
        ],
    );
    let name = sc.name("win");
    let disk = sc.dir.join(format!("{name}.qcow2"));
    sh(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    sc.define(&guest_xml(&name, &disk, &sc.dir.join("win.log"), ""));
    let listing = |fs: &Fs| {
        let mut all = fs.ls("/");
        all.extend(fs.ls("/Windows/System32"));
        all.sort();
        all
    };
    let before = listing(&Fs(raw));

    run("tpl-generalize", &[&name, "--hostname", "win1"], None)
        .fails(3)
        .says(&[
            &format!("cannot generalize domain '{name}'"),
            "virt-sysprep's inspection found Windows",
            "sysprep.exe /generalize /oobe /shutdown",
            &format!("tpl-generalize --sealed-externally {name}"),
        ]);
    assert_eq!(read_meta(&name), Meta::default());
    // Nothing was added: no /etc/machine-id, no first-boot service, no hostname in a hive.
    let after = Fs(raw_copy(&disk, &sc.dir, "win-after"));
    assert_eq!(listing(&after), before);
    assert_eq!(before, ["Windows", "cmd.exe", "config", "lost+found"]);
}

//! tpl-clone against the real libvirtd and qemu-img: linked and full clones, their identity,
//! files and metadata, signals, kill -9, the race for one name, and every refusal.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tpl_common::domxml::DomainXml;
use tpl_tests::*;

const TOOL: &str = "tpl-clone";

fn clone(args: &[&str]) -> Run {
    run(TOOL, args, None)
}

fn macs(x: &DomainXml) -> Vec<String> {
    let devs = x.root.get_child("devices").unwrap();
    tpl_common::domxml::children_named(devs, "interface")
        .filter_map(|i| i.get_child("mac")?.attributes.get("address").cloned())
        .collect()
}

fn smbios_entry(x: &DomainXml, name: &str) -> Option<String> {
    let sys = x.root.get_child("sysinfo")?.get_child("system")?;
    tpl_common::domxml::children_named(sys, "entry")
        .find(|e| e.attributes.get("name").map(String::as_str) == Some(name))
        .and_then(|e| e.get_text().map(|t| t.into_owned()))
}

/// The `<source path>` of the first device of this kind (serial, channel, …).
fn chardev_path(x: &DomainXml, kind: &str) -> PathBuf {
    let devs = x.root.get_child("devices").unwrap();
    let c = tpl_common::domxml::children_named(devs, kind)
        .next()
        .unwrap();
    PathBuf::from(&c.get_child("source").unwrap().attributes["path"])
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Start tpl-clone in a session of its own whose controlling terminal is a new pty, with
/// stdin and stderr on it (as in an ssh session), stdout piped. Dropping the returned
/// master end hangs the terminal up: the kernel sends SIGHUP to the run, and its writes
/// to stderr fail from then on.
fn spawn_on_terminal(args: &[&str]) -> (Child, std::os::fd::OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use std::os::fd::AsRawFd;
    let pty = nix::pty::openpty(None, None).unwrap();
    // openpty leaves both ends inheritable: a master the run inherited would keep the
    // terminal from ever hanging up.
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    }
    let child = {
        let mut c = Command::new("setsid");
        test_env(&mut c)
            .arg("--ctty")
            .arg(bin(TOOL))
            .args(args)
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave))
            .stdout(Stdio::piped());
        c.spawn().unwrap()
    };
    (child, pty.master)
}

/// A libvirt dir pool, removed on drop.
#[test]
fn linked_clone_boots_with_its_own_identity() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let name = s.name("boot");
    let r = clone(&[&t.name, &name, "--start", "--hostname", "h-{name}"]).ok(1);
    let rec = only(&r);
    assert_eq!(rec.name, name);
    assert_ne!(rec.uuid, t.uuid);
    let origin = rec.clone.as_ref().expect("clone origin in the record");
    assert_eq!(
        (
            origin.mode.as_str(),
            origin.template_uuid.as_str(),
            origin.template_name.as_str()
        ),
        ("linked", t.uuid.as_str(), t.name.as_str())
    );
    let disk = &rec.disks[0];
    assert_eq!(
        disk.path.as_deref(),
        Some(s.dir.join(format!("{name}.qcow2")).as_path())
    );
    assert_eq!(disk.backing[0].path, t.disk);
    assert_eq!(disk.backing[0].format.as_deref(), Some("qcow2"));

    wait_until(150, "the clone to boot and power off", || {
        virsh(&["domstate", &name]).trim() == "shut off"
    });
    let x = dom_xml(&name);
    let console = chardev_path(&x, "serial");
    assert_ne!(console, t.console, "the clone writes its own console file");
    let log = fs::read_to_string(&console).unwrap();
    let want = format!("TPL-BOOT serial=ds=nocloud;h=h-{name};i={}", rec.uuid);
    assert!(log.contains(&want), "{want:?} not on the console:\n{log}");
    assert!(!t.console.exists(), "the template never ran");
}

#[test]
fn twenty_linked_clones_in_one_call() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let pooldir = s.dir.join("pool");
    fs::create_dir(&pooldir).unwrap();
    let pool = Pool(s.name("pool"));
    virsh(&["pool-define-as", &pool.0, "dir", "--target", p(&pooldir)]);
    virsh(&["pool-start", &pool.0]);

    let prefix = s.name("ci-");
    let r = clone(&[
        &t.name,
        "--count",
        "20",
        "--prefix",
        &prefix,
        "--dir",
        p(&pooldir),
    ])
    .ok(20);
    let names: Vec<String> = r.records.iter().map(|r| r.name.clone()).collect();
    let want: Vec<String> = (1..=20).map(|i| format!("{prefix}{i:02}")).collect();
    assert_eq!(names, want);

    let uuids: HashSet<&str> = r.records.iter().map(|r| r.uuid.as_str()).collect();
    assert_eq!(uuids.len(), 20);
    assert!(!uuids.contains(t.uuid.as_str()));
    let mut all_macs = macs(&dom_xml(&t.name));
    for rec in &r.records {
        let x = dom_xml(&rec.name);
        let m = macs(&x);
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with("52:54:00:"), "{m:?}");
        all_macs.extend(m);
        assert_eq!(
            smbios_entry(&x, "serial").unwrap(),
            format!("ds=nocloud;h={};i={}", rec.name, rec.uuid)
        );

        let file = pooldir.join(format!("{}.qcow2", rec.name));
        assert_eq!(rec.disks[0].path.as_deref(), Some(file.as_path()));
        let info = qemu_img_info(&file);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["backing-filename"], p(&t.disk), "{info}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
        assert_eq!(info["cluster-size"], 131072, "{info}");
        assert_eq!(
            info["format-specific"]["data"]["extended-l2"], true,
            "{info}"
        );
        assert_eq!(rec.clone.as_ref().unwrap().mode.as_str(), "linked");
    }
    let unique: HashSet<&String> = all_macs.iter().collect();
    assert_eq!(unique.len(), 21, "MACs must be unique: {all_macs:?}");

    // The pool was refreshed: libvirt lists the new volumes.
    let vols = virsh(&["vol-list", &pool.0]);
    for n in &names {
        assert!(
            vols.contains(&format!("{n}.qcow2")),
            "{n} missing from:\n{vols}"
        );
    }
    assert!(leftovers(&pooldir).is_empty());
    assert_eq!(mode(&t.disk) & 0o222, 0, "the template stays read-only");
}

#[test]
fn full_clone_of_a_domain_with_everything() {
    let mut s = Scratch::new();
    let name = s.name("rich");
    let disk = s.disk(&format!("{name}.qcow2"));
    let data = s.dir.join(format!("{name}-data.img"));
    qemu_img_create(&data, "raw", "1G");
    sh(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -P 0x6b 512M 4M",
            p(&data),
        ],
    );
    let iso = s.dir.join("shared.iso");
    fs::write(&iso, vec![7u8; 64 << 10]).unwrap();
    let nvram = s.dir.join(format!("{name}_VARS.fd"));
    let vars: Vec<u8> = (0..128 * 1024).map(|i| (i % 251) as u8).collect();
    fs::write(&nvram, &vars).unwrap();
    let sock = s.dir.join(format!("{name}.agent.sock"));
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>
         <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/><target dev='hdc' bus='ide'/><readonly/></disk>
         <graphics type='vnc' port='5987' autoport='no'/>
         <channel type='unix'><source mode='bind' path='{}'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        data.display(),
        iso.display(),
        sock.display()
    );
    let console = s.dir.join(format!("{name}.console.log"));
    let xml = guest_xml(&name, &disk, &console, &extra).replace(
        "<smbios mode='sysinfo'/>",
        &format!(
            "<smbios mode='sysinfo'/><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>{}</nvram>",
            nvram.display()
        ),
    );
    let tuuid = s.define(&xml);
    mark_generalized(&name);

    let c = s.name("full");
    // An unlocked template makes full clones by default.
    let r = clone(&[&name, &c]).ok(1);
    let rec = only(&r);
    assert_eq!(rec.clone.as_ref().unwrap().mode.as_str(), "full");
    assert_eq!(rec.clone.as_ref().unwrap().template_uuid, tuuid);
    let by = |t: &str| rec.disks.iter().find(|d| d.target == t).unwrap();
    let (vda, vdb, hdc) = (by("vda"), by("vdb"), by("hdc"));
    // Named as the template's files are, the clone's name in place of the template's.
    let cvda = s.dir.join(format!("{c}.qcow2"));
    let cvdb = s.dir.join(format!("{c}-data.img"));
    assert_eq!(vda.path.as_deref(), Some(cvda.as_path()));
    assert_eq!(vdb.path.as_deref(), Some(cvdb.as_path()));
    assert!(vda.backing.is_empty() && vdb.backing.is_empty());
    assert_eq!(vdb.format.as_deref(), Some("raw"));
    assert_eq!(
        hdc.path.as_deref(),
        Some(iso.as_path()),
        "the CD-ROM stays shared"
    );

    // Equal to the source, and as sparse as it.
    assert!(same_content(&disk, &cvda));
    assert!(same_content(&data, &cvdb));
    assert_eq!(fs::metadata(&cvdb).unwrap().len(), 1 << 30);
    assert!(
        allocated(&cvdb) <= allocated(&data) + (1 << 20),
        "clone allocates {} bytes, source {}",
        allocated(&cvdb),
        allocated(&data)
    );
    assert!(allocated(&cvdb) < 64 << 20);
    assert_eq!(mode(&cvda) & 0o200, 0o200, "a full clone is writable");

    // Its own NVRAM copy.
    let cnv = s.dir.join(format!("{c}_VARS.fd"));
    assert_eq!(rec.nvram.as_deref(), Some(cnv.as_path()));
    assert_eq!(fs::read(&cnv).unwrap(), vars);
    assert_eq!(fs::read(&nvram).unwrap(), vars);

    // Host-side unique bits are the clone's.
    let x = dom_xml(&c);
    let g = x
        .root
        .get_child("devices")
        .unwrap()
        .get_child("graphics")
        .unwrap();
    assert_eq!(
        g.attributes.get("autoport").map(String::as_str),
        Some("yes")
    );
    assert_ne!(g.attributes.get("port").map(String::as_str), Some("5987"));
    assert_eq!(
        chardev_path(&x, "channel"),
        s.dir.join(format!("{c}.agent.sock"))
    );
    assert_eq!(
        chardev_path(&x, "serial"),
        s.dir.join(format!("{c}.console.log"))
    );
    assert_eq!(
        smbios_entry(&x, "serial").unwrap(),
        format!("ds=nocloud;h={c};i={}", rec.uuid)
    );
    assert_eq!(
        smbios_entry(&x, "manufacturer").as_deref(),
        Some("tpl tests")
    );
    let tmacs = macs(&dom_xml(&name));
    let cmacs = macs(&x);
    assert_eq!(cmacs.len(), 1);
    assert!(!tmacs.contains(&cmacs[0]));
    // The template is untouched.
    assert_eq!(
        dom_xml(&name).disks()[0].path.as_deref(),
        Some(disk.as_path())
    );
    assert!(leftovers(&s.dir).is_empty());
}

#[test]
fn full_clone_on_a_reflink_file_system_shares_extents() {
    let mut s = Scratch::new();
    let mount = Mount::image(&s, "btrfs", "btrfs", "512M");
    let mnt = mount.mnt.clone();

    let name = s.name("tpl");
    let disk = mnt.join(format!("{name}.qcow2"));
    sh("cp", &[p(guest_image()), p(&disk)]);
    let console = s.dir.join(format!("{name}.console.log"));
    s.define(&guest_xml(&name, &disk, &console, ""));
    mark_generalized(&name);

    let c = s.name("ref");
    let r = clone(&[&name, &c, "--full"]).ok(1).says(&["reflinked"]);
    let file = mnt.join(format!("{c}.qcow2"));
    assert_eq!(only(&r).disks[0].path.as_deref(), Some(file.as_path()));
    assert!(same_content(&disk, &file));
    let frag = sh("filefrag", &["-v", p(&file)]);
    assert!(frag.contains("shared"), "no shared extents:\n{frag}");
}

#[test]
fn full_clone_of_a_template_with_a_backing_file_is_flattened() {
    let mut s = Scratch::new();
    let base = s.disk(&format!("{}-base.qcow2", s.prefix));
    let name = s.name("tpl");
    let top = s.dir.join(format!("{name}.qcow2"));
    qemu_img_overlay(&base, "qcow2", &top);
    sh("qemu-io", &["-c", "write -P 0x77 1M 1M", p(&top)]);
    let console = s.dir.join(format!("{name}.console.log"));
    s.define(&guest_xml(&name, &top, &console, ""));
    mark_generalized(&name);

    let c = s.name("flat");
    let r = clone(&[&name, &c, "--full"]).ok(1).says(&["flattened"]);
    let file = s.dir.join(format!("{c}.qcow2"));
    assert!(only(&r).disks[0].backing.is_empty());
    let info = qemu_img_info(&file);
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert!(same_content(&top, &file), "the clone holds both layers");
    assert!(
        !same_content(&base, &file),
        "the top layer's data is in the clone"
    );
}

#[test]
fn signals_and_kill_leave_nothing_behind() {
    let mut s = Scratch::new();
    let (name, _) = data_template(&mut s, "big", "2G", 1024);

    // SIGINT, SIGTERM and SIGHUP in the middle of the copy: the run removes what it made,
    // then dies by the same signal (so a shell loop or make stops too).
    for (tag, sig) in [
        ("int", Signal::SIGINT),
        ("term", Signal::SIGTERM),
        ("hup", Signal::SIGHUP),
    ] {
        let c = s.name(tag);
        let (pid, out) = signal_mid_copy(&s.dir, &name, &c, sig);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(sig as i32), "{stderr}");
        assert!(
            stderr.contains(&format!("interrupted by {sig}")),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
        assert_nothing_left(&s.dir, &c, pid);
    }

    // A dropped ssh session: the terminal the run writes to hangs up under it.
    let c = s.name("hangup");
    let (child, master) = spawn_on_terminal(&[&name, &c, "--full"]);
    let pid = child.id();
    let tmp = tmp_of(&s.dir, &format!("{c}.qcow2"), pid);
    wait_until(60, "the copy to start", || tmp.exists());
    drop(master);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGHUP),
        "exit status {:?}",
        out.status
    );
    assert!(out.stdout.is_empty());
    assert_nothing_left(&s.dir, &c, pid);

    // kill -9 leaves its temporary file and journal; the next run removes them.
    let c = s.name("killed");
    let child = spawn_clone(&[&name, &c, "--full"]);
    let pid = child.id();
    let tmp = tmp_of(&s.dir, &format!("{c}.qcow2"), pid);
    wait_until(60, "the copy to start", || tmp.exists());
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), None);
    assert!(
        tmp.exists() && !journals_of(pid).is_empty(),
        "kill -9 cannot clean up"
    );

    let small = generalized_template(&mut s, "small");
    clone(&[&small.name, &s.name("next")]).ok(1);
    assert!(
        !tmp.exists(),
        "the next run removes the killed run's temporary file"
    );
    assert!(journals_of(pid).is_empty());
    assert!(!s.dir.join(format!("{c}.qcow2")).exists());
    assert!(!domain_exists(&c));
    assert!(leftovers(&s.dir).is_empty());
}

#[test]
fn a_finished_clone_undefined_after_a_kill_keeps_its_image() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let prefix = s.name("k");
    let name = |i: u32| format!("{prefix}{i:03}");
    let file = |i: u32| s.dir.join(format!("{}.qcow2", name(i)));
    let mut child = spawn_clone(&[&t.name, "--count", "200", "--prefix", &prefix]);
    let pid = child.id();
    // The second clone's file is made after the first clone is defined and marked done.
    wait_until(60, "the second clone's file", || file(2).exists());
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(
        !journals_of(pid).is_empty(),
        "the run finished before the kill"
    );
    assert!(domain_exists(&name(1)));
    // The user removes the finished clone and keeps its image.
    virsh(&["undefine", &name(1)]);

    clone(&[&t.name, &s.name("next")]).ok(1);
    assert!(
        journals_of(pid).is_empty(),
        "the killed run's journal is cleaned"
    );
    assert!(
        file(1).exists(),
        "the next run deleted the image of a clone that was finished"
    );
    let defined: HashSet<String> = virsh(&["list", "--all", "--name"])
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    for i in 2..=200 {
        assert_eq!(file(i).exists(), defined.contains(&name(i)), "{}", name(i));
    }
    assert!(leftovers(&s.dir).is_empty());
}

#[test]
fn writable_disks_that_are_not_files_are_refused() {
    let mut s = Scratch::new();
    let volume = "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
                  <source pool='tpltest-nopool' volume='data.qcow2'/><target dev='vdb' bus='virtio'/></disk>";
    let network = "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
                   <source protocol='nbd' name='data'><host name='127.0.0.1' port='10809'/></source>\
                   <target dev='vdc' bus='virtio'/></disk>";
    let templates: Vec<(Guest, &str, &str)> = [
        ("vol", volume, "vdb", "volume"),
        ("net", network, "vdc", "network"),
    ]
    .into_iter()
    .map(|(tag, extra, target, kind)| {
        let g = s.guest_with(tag, extra);
        mark_generalized(&g.name);
        (g, target, kind)
    })
    .collect();
    let before = files_in(&s.dir);
    for (g, target, kind) in &templates {
        let c = format!("{}-c", g.name);
        clone(&[&g.name, &c, "--full"])
            .fails(3)
            .says(&[&g.name, &format!("disk {target} is a {kind} disk")]);
        mark_locked(&g.name, &g.disk);
        clone(&[&g.name, &c, "--linked"])
            .fails(3)
            .says(&[&g.name, target, kind]);
        assert!(!domain_exists(&c));
    }
    assert_eq!(files_in(&s.dir), before, "a refused run created files");

    // Shared ones are fine: a read-only network disk stays the template's, and an empty
    // drive has nothing to copy.
    let shared = "<disk type='network' device='cdrom'><driver name='qemu' type='raw'/>\
                  <source protocol='nbd' name='iso'><host name='127.0.0.1' port='10809'/></source>\
                  <target dev='hdc' bus='ide'/><readonly/></disk>\
                  <disk type='file' device='floppy'><target dev='fda' bus='fdc'/></disk>";
    let g = s.guest_with("shared", shared);
    mark_generalized(&g.name);
    let c = s.name("shared-c");
    let r = clone(&[&g.name, &c, "--full"]).ok(1);
    let vda = only(&r).disks.iter().find(|d| d.target == "vda").unwrap();
    assert_eq!(
        vda.path.as_deref(),
        Some(s.dir.join(format!("{c}.qcow2")).as_path())
    );
    let x = dom_xml(&c);
    let hdc = x.disks().into_iter().find(|d| d.target == "hdc").unwrap();
    assert_eq!(hdc.kind.as_str(), "network");
    let fda = x.disks().into_iter().find(|d| d.target == "fda").unwrap();
    assert_eq!(fda.path, None);
}

#[test]
fn two_runs_racing_for_one_name_one_wins() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    for (tag, how) in [
        ("r1", "--linked"),
        ("r2", "--full"),
        ("r3", "--linked"),
        ("r4", "--full"),
    ] {
        let c = s.name(tag);
        let a = spawn_clone(&[&t.name, &c, how]);
        let b = spawn_clone(&[&t.name, &c, how]);
        let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        let mut codes: Vec<i32> = outs.iter().map(|o| o.status.code().unwrap()).collect();
        codes.sort();
        let errs: Vec<_> = outs
            .iter()
            .map(|o| String::from_utf8_lossy(&o.stderr))
            .collect();
        assert_eq!(codes, [0, 3], "{how}: {errs:?}");
        let loser = outs.iter().find(|o| o.status.code() == Some(3)).unwrap();
        assert!(loser.stdout.is_empty());
        assert!(String::from_utf8_lossy(&loser.stderr).contains(&c));
        let winner = outs.iter().find(|o| o.status.success()).unwrap();
        let rec: Record = serde_json::from_slice(&winner.stdout).unwrap();
        assert_eq!(rec.name, c);
        assert_eq!(virsh(&["domuuid", &c]).trim(), rec.uuid);

        let file = s.dir.join(format!("{c}.qcow2"));
        sh("qemu-img", &["check", "-q", p(&file)]);
        let info = qemu_img_info(&file);
        if how == "--linked" {
            assert_eq!(info["backing-filename"], p(&t.disk));
        } else {
            assert!(same_content(&t.disk, &file));
        }
        assert!(leftovers(&s.dir).is_empty(), "{:?}", leftovers(&s.dir));
    }
}

#[test]
fn template_from_a_record_on_stdin() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let rec = format!("{{\"name\":\"{}\",\"uuid\":\"{}\"}}\n", t.name, t.uuid);
    let c = s.name("piped");
    let r = run(TOOL, &[&c, "--no-identity"], Some(&rec)).ok(1);
    assert_eq!(only(&r).clone.as_ref().unwrap().template_uuid, t.uuid);
    assert_eq!(
        only(&r).clone.as_ref().unwrap().mode.as_str(),
        "linked",
        "linked is the default when locked"
    );
    let x = dom_xml(&c);
    assert_eq!(
        smbios_entry(&x, "serial"),
        None,
        "--no-identity leaves the serial alone"
    );
    assert_eq!(read_meta(&c).clone.unwrap().template_name, t.name);

    let c2 = s.name("dash");
    let r = run(TOOL, &["-", &c2], Some(&rec)).ok(1);
    assert_eq!(only(&r).name, c2);

    // A relative --dir is taken from the current directory; libvirt gets an absolute path.
    fs::create_dir(s.dir.join("sub")).unwrap();
    let c3 = s.name("rel");
    succeed(
        tool_command(TOOL)
            .current_dir(&s.dir)
            .args([&t.name, &c3, "--dir", "sub"])
            .stdin(Stdio::null()),
    );
    let want = s.dir.join("sub").join(format!("{c3}.qcow2"));
    assert_eq!(
        dom_xml(&c3).disks()[0].path.as_deref(),
        Some(want.as_path())
    );
}

#[test]
fn refusals() {
    let mut s = Scratch::new();
    let plain = s.guest("plain");
    let gen = generalized_template(&mut s, "gen");
    let locked = locked_template(&mut s, "locked");
    let n = s.name("x");
    let before = files_in(&s.dir);

    clone(&[&s.name("nope"), &n]).fails(2).says(&["not found"]);
    clone(&[&plain.name, &n]).fails(3).says(&[
        "not a generalized template",
        "--force",
        &plain.name,
    ]);
    clone(&[&plain.name, &n, "--linked", "--force"])
        .fails(3)
        .says(&["locked template", "tpl-lock"]);
    clone(&[&gen.name, &n, "--linked"])
        .fails(3)
        .says(&["locked template", "tpl-lock"]);
    clone(&[&gen.name, "a/b"])
        .fails(2)
        .says(&["invalid clone name"]);
    clone(&[&gen.name, &n, &n]).fails(2).says(&["twice"]);
    clone(&[&gen.name, &n, "--hostname", "a;b"])
        .fails(2)
        .says(&["invalid host name"]);
    clone(&[&gen.name, &n, "--dir", "/nonexistent/tpl"])
        .fails(2)
        .says(&["not a directory"]);
    clone(&[&gen.name, &n, "--linked", "--full"]).fails(2);
    run(TOOL, &[&n], Some("{\"name\":\"a\"}\n{\"name\":\"b\"}\n"))
        .fails(2)
        .says(&["one template"]);

    // A taken name refuses the whole run, before anything is made.
    clone(&[&gen.name, &n, &plain.name])
        .fails(3)
        .says(&["already exists", &plain.name]);
    assert!(!domain_exists(&n));

    // An existing file is never overwritten.
    let f = s.dir.join(format!("{n}.qcow2"));
    fs::write(&f, "precious").unwrap();
    clone(&[&gen.name, &n])
        .fails(3)
        .says(&["already exists", p(&f)]);
    assert_eq!(fs::read_to_string(&f).unwrap(), "precious");
    fs::remove_file(&f).unwrap();

    // Marked locked but writable: linked clones would be corrupted.
    sh("chmod", &["u+w", p(&locked.disk)]);
    clone(&[&locked.name, &n])
        .fails(3)
        .says(&["writable", "tpl-lock"]);
    sh("chmod", &["a-w", p(&locked.disk)]);

    // A running template.
    virsh(&["start", &gen.name]);
    let r = clone(&[&gen.name, &n]);
    virsh_try(&["destroy", &gen.name]);
    r.fails(3).says(&["running", &gen.name]);

    assert!(!domain_exists(&n));
    let after = files_in(&s.dir);
    let new: Vec<_> = after.difference(&before).collect();
    // Only the running template's console log may have appeared.
    assert!(
        new.iter().all(|f| f.ends_with(".console.log")),
        "refused runs created {new:?}"
    );

    // --force lifts the generalized requirement for a full clone.
    let r = clone(&[&plain.name, &n, "--force"]).ok(1);
    assert_eq!(only(&r).clone.as_ref().unwrap().mode.as_str(), "full");
}

//! Tests for tpl-lock on the real libvirtd: locked templates do not start, their files are read-only (and immutable on a loop-mounted ext4), linked clones still boot, and `--unlock` refuses while anything backs onto the template.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tpl_tests::*;

/// A generalized guest that also has an NVRAM file (and a dummy loader: it is never started).
fn template_with_nvram(s: &mut Scratch, tag: &str) -> (Guest, PathBuf) {
    template_with_nvram_as(s, tag, "<nvram>@</nvram>")
}

/// As `template_with_nvram`, with the `<nvram>` element written as `form` (`@` is the path).
fn template_with_nvram_as(s: &mut Scratch, tag: &str, form: &str) -> (Guest, PathBuf) {
    let (g, nvram) = guest_with_nvram(s, tag, form);
    mark_generalized(&g.name);
    (g, nvram)
}

/// Whether `lsattr` shows the immutable attribute on a file.
fn immutable(p: &Path) -> bool {
    let out = sh("lsattr", &["-d", p.to_str().unwrap()]);
    let flags = out.split_whitespace().next().unwrap_or_default();
    flags.contains('i')
}

/// Wait, within a deadline, for a line in a guest's console log.
fn wait_for_console(console: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = fs::read_to_string(console).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {} within {limit:?}; it says:\n{text}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn autostart(name: &str) -> bool {
    virsh(&["dominfo", name])
        .lines()
        .any(|l| l.starts_with("Autostart:") && l.contains("enable"))
}

#[test]
fn locked_template_does_not_start_and_its_files_are_read_only() {
    let mut s = Scratch::new();
    let g = generalized_template(&mut s, "tpl");
    virsh(&["autostart", &g.name]);
    assert!(autostart(&g.name));
    assert_eq!(mode(&g.disk), 0o644);

    let run = run("tpl-lock", &[&g.name], None).ok(1);
    let rec = only(&run);
    assert_eq!(rec.uuid, g.uuid);
    assert!(rec.template.locked && rec.template.locked_at.is_some());
    assert!(!rec.template.immutable);
    assert_eq!(mode(&g.disk), 0o444);
    assert!(!autostart(&g.name), "autostart must be off after lock");
    let m = read_meta(&g.name);
    assert!(m.template.locked);
    assert_eq!(m.history.last().unwrap().tool, "tpl-lock");

    // The seed's behaviour: libvirt's qemu cannot open the image for writing.
    start_is_denied(&g.name, &g.disk);
    assert_eq!(virsh(&["domstate", &g.name]).trim(), "shut off");
    assert_eq!(mode(&g.disk), 0o444);

    // Locking it again is a success that changes nothing, history included.
    let again = run_lock(&[&g.name]).ok(1).says(&["already locked"]);
    assert!(only(&again).template.locked);
    let m2 = read_meta(&g.name);
    assert_eq!(m2, m, "a second lock must not change the metadata");
    assert_eq!(mode(&g.disk), 0o444);
}

fn run_lock(args: &[&str]) -> Run {
    run("tpl-lock", args, None)
}

#[test]
fn nvram_is_locked_with_the_disk_and_unlock_gives_the_owner_write_back() {
    let mut s = Scratch::new();
    let (g, nvram) = template_with_nvram(&mut s, "nv");
    let rec = run_lock(&[&g.name]).ok(1);
    assert_eq!(only(&rec).nvram.as_deref(), Some(nvram.as_path()));
    assert_eq!(mode(&g.disk), 0o444);
    assert_eq!(mode(&nvram), 0o444);

    let run = run_lock(&["--unlock", &g.name]).ok(1);
    assert!(!only(&run).template.locked);
    assert_eq!(mode(&g.disk), 0o644);
    assert_eq!(mode(&nvram), 0o644);
    let m = read_meta(&g.name);
    assert!(!m.template.locked && m.template.locked_at.is_none());
    let tools: Vec<_> = m.history.iter().map(|h| h.tool.as_str()).collect();
    assert_eq!(tools, ["tpl-lock", "tpl-lock"]);

    // Unlocking an unlocked domain changes nothing either.
    run_lock(&["--unlock", &g.name]).ok(1).says(&["not locked"]);
    assert_eq!(read_meta(&g.name), m);
}

#[test]
fn running_and_ungeneralized_domains_are_refused() {
    let mut s = Scratch::new();
    let plain = s.guest("plain");
    let r = run_lock(&[&plain.name]).fails(3).says(&[
        &format!("tpl-lock: error: cannot lock domain '{}'", plain.name),
        "not generalized",
        "--force",
    ]);
    assert!(r.records.is_empty());
    assert_eq!(mode(&plain.disk), 0o644);
    assert!(!read_meta(&plain.name).template.locked);

    // In a stream, the refused record is not passed on; the next one is locked.
    let tpl = generalized_template(&mut s, "tpl");
    let input = format!(
        "{{\"name\":\"{}\"}}\n{{\"uuid\":\"{}\"}}\n",
        plain.name, tpl.uuid
    );
    let r = run("tpl-lock", &[], Some(&input)).fails(3);
    assert_eq!(r.records.len(), 1, "{}", r.stdout);
    assert_eq!(r.records[0].name, tpl.name);
    assert!(r.records[0].template.locked);
    assert_eq!(mode(&plain.disk), 0o644);

    // --force locks it, with a warning.
    run_lock(&["--force", &plain.name])
        .ok(1)
        .says(&["warning", "not generalized"]);
    assert_eq!(mode(&plain.disk), 0o444);

    // A running (here: paused) domain is refused and left alone.
    let busy = generalized_template(&mut s, "busy");
    virsh(&["start", "--paused", &busy.name]);
    run_lock(&[&busy.name]).fails(3).says(&[
        "cannot lock domain",
        &busy.name,
        "paused",
        "shut it down",
    ]);
    assert_eq!(mode(&busy.disk), 0o644);
    assert!(!read_meta(&busy.name).template.locked);
    virsh(&["destroy", &busy.name]);
}

#[test]
fn symlinked_and_network_disks_are_refused_and_nothing_changes() {
    let mut s = Scratch::new();
    let name = s.name("link");
    let real = s.disk("real.qcow2");
    let link = s.dir.join(format!("{name}.qcow2"));
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let console = s.dir.join("link.console.log");
    s.define(&guest_xml(&name, &link, &console, ""));
    mark_generalized(&name);

    run_lock(&[&name]).fails(3).says(&[
        &format!("cannot lock domain '{name}'"),
        link.to_str().unwrap(),
        "symbolic link",
    ]);
    assert_eq!(mode(&real), 0o644, "the symlink's target must be untouched");
    assert!(!read_meta(&name).template.locked);

    // A network disk next to a good file disk: refused, naming it, and the file disk
    // stays writable (nothing changes for that domain).
    let nbd = "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
               <source protocol='nbd' name='x'><host name='127.0.0.1' port='10809'/></source>\
               <target dev='vdb' bus='virtio'/></disk>";
    let net = s.guest_with("net", nbd);
    mark_generalized(&net.name);
    run_lock(&[&net.name]).fails(3).says(&[
        "disk vdb is a network disk",
        "tpl handles only file and RBD disks",
    ]);
    assert_eq!(mode(&net.disk), 0o644);
    assert!(!read_meta(&net.name).template.locked);
}

#[test]
fn unlock_is_refused_while_an_overlay_no_domain_names_backs_onto_the_template() {
    let mut s = Scratch::new();
    let g = generalized_template(&mut s, "tpl");
    run_lock(&[&g.name]).ok(1);
    let sub = s.dir.join("orphans");
    fs::create_dir(&sub).unwrap();
    let overlay = sub.join("forgotten.qcow2");
    qemu_img_overlay(&g.disk, "qcow2", &overlay);

    let r = run_lock(&["--unlock", &g.name]).fails(3).says(&[
        &format!("cannot unlock domain '{}'", g.name),
        "1 linked clone depends on its images",
        overlay.to_str().unwrap(),
        "--force",
    ]);
    assert!(r.records.is_empty());
    assert_eq!(mode(&g.disk), 0o444);
    assert!(read_meta(&g.name).template.locked);

    fs::remove_file(&overlay).unwrap();
    run_lock(&["--unlock", &g.name]).ok(1);
    assert_eq!(mode(&g.disk), 0o644);

    // --force overrides, loudly.
    run_lock(&[&g.name]).ok(1);
    qemu_img_overlay(&g.disk, "qcow2", &overlay);
    run_lock(&["--unlock", "--force", &g.name])
        .ok(1)
        .says(&["warning", overlay.to_str().unwrap()]);
    assert_eq!(mode(&g.disk), 0o644);
}

#[test]
fn nvram_in_libvirt_source_form_is_locked_too() {
    let mut s = Scratch::new();
    let (g, nvram) = template_with_nvram_as(
        &mut s,
        "nvsrc",
        "<nvram type='file'><source file='@'/></nvram>",
    );
    assert!(virsh(&["dumpxml", "--inactive", &g.name]).contains("<source file"));
    let rec = run_lock(&[&g.name]).ok(1);
    assert_eq!(only(&rec).nvram.as_deref(), Some(nvram.as_path()));
    assert_eq!(mode(&nvram), 0o444);
    run_lock(&["--unlock", &g.name]).ok(1);
    assert_eq!(mode(&nvram), 0o644);
}

#[test]
fn an_nvram_that_is_not_a_file_is_refused_by_lock_clone_and_rename() {
    let mut s = Scratch::new();
    let (g, _) = template_with_nvram_as(
        &mut s,
        "nvblk",
        "<nvram type='block'><source dev='/dev/tpltest-no-such-vars'/></nvram>",
    );
    assert!(virsh(&["dumpxml", "--inactive", &g.name]).contains("tpltest-no-such-vars"));
    let before = virsh(&["dumpxml", "--inactive", &g.name]);
    run_lock(&[&g.name])
        .fails(3)
        .says(&[&g.name, "its NVRAM is a block NVRAM, not a file"]);
    assert_eq!(mode(&g.disk), 0o644);
    let c = s.name("c");
    run("tpl-clone", &[&g.name, &c, "--full"], None)
        .fails(3)
        .says(&[&g.name, "block NVRAM", "every clone would share"]);
    assert!(!domain_exists(&c));
    let new = s.name("new");
    run("tpl-rename", &["--disks", &g.name, &new], None)
        .fails(3)
        .says(&[&g.name, "block NVRAM", "rename the domain without --disks"]);
    assert!(!domain_exists(&new) && g.disk.is_file());
    assert_eq!(virsh(&["dumpxml", "--inactive", &g.name]), before);
}

#[test]
fn unlock_is_refused_while_a_file_next_to_the_template_cannot_be_checked() {
    let mut s = Scratch::new();
    let g = generalized_template(&mut s, "tpl");
    run_lock(&[&g.name]).ok(1);
    // A qcow2 whose backing file name is not UTF-8: qemu would follow it, tpl cannot
    // tell where it leads, so it may be a linked clone of the template.
    let odd = s.dir.join("odd.qcow2");
    let name = std::ffi::OsStr::from_bytes(b"/var/lib/libvirt/images/\xff.qcow2");
    succeed(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
            .arg(name)
            .args([p(&odd), "1M"]),
    );

    run_lock(&["--unlock", &g.name]).fails(3).says(&[
        &format!("'{}', which could not be checked", odd.display()),
        "not UTF-8",
    ]);
    assert_eq!(mode(&g.disk), 0o444);
    fs::remove_file(&odd).unwrap();
    run_lock(&["--unlock", &g.name]).ok(1);
    assert_eq!(mode(&g.disk), 0o644);
}

#[test]
fn unlock_is_refused_while_a_defined_domain_backs_onto_the_template() {
    let mut s = Scratch::new();
    let g = generalized_template(&mut s, "tpl");
    run_lock(&[&g.name]).ok(1);
    let clone = s.name("clone");
    let overlay = s.dir.join(format!("{clone}.qcow2"));
    qemu_img_overlay(&g.disk, "qcow2", &overlay);
    s.define(&guest_xml(
        &clone,
        &overlay,
        &s.dir.join("clone.console.log"),
        "",
    ));

    run_lock(&["--unlock", &g.name]).fails(3).says(&[
        "1 linked clone depends on its images",
        &format!("domain '{clone}' (disk vda: {})", overlay.display()),
    ]);
    assert_eq!(mode(&g.disk), 0o444);

    remove_domain(&clone);
    fs::remove_file(&overlay).unwrap();
    run_lock(&["--unlock", &g.name]).ok(1);
    assert_eq!(mode(&g.disk), 0o644);
}

#[test]
fn works_in_a_pipe_with_tpl_rename() {
    let mut s = Scratch::new();
    let a = generalized_template(&mut s, "a");
    let b = generalized_template(&mut s, "b");
    // The first tpl-rename stands where tpl-generalize is in the real pipe (that step costs
    // a sysprep run): tpl-lock gets full records whose names are already stale, and must
    // find each domain by UUID.
    let r = pipeline(&format!(
        "printf '{{\"name\":\"%s\"}}\\n' {} {} | tpl-rename '{{name}}-G' | tpl-lock | tpl-rename '{{name}}-T'",
        a.name, b.name
    ))
    .ok(2);
    for (rec, g) in r.records.iter().zip([&a, &b]) {
        assert_eq!(rec.uuid, g.uuid);
        assert_eq!(rec.name, format!("{}-G-T", g.name));
        assert!(rec.template.locked);
        assert_eq!(mode(&g.disk), 0o444);
        let tools: Vec<_> = rec.history.iter().map(|h| h.tool.as_str()).collect();
        assert_eq!(tools, ["tpl-rename", "tpl-lock", "tpl-rename"]);
    }
}

/// The pipe of the project's first page, with the real tpl-generalize (one virt-sysprep run).
#[test]
fn generalize_lock_rename_pipe() {
    let mut s = Scratch::new();
    let vm = s.guest("vm");
    let tpl = s.name("TplVM");
    let r = pipeline(&format!(
        "tpl-generalize {} | tpl-lock | tpl-rename {tpl}",
        vm.name
    ))
    .ok(1);
    let rec = only(&r);
    assert_eq!(
        (rec.uuid.as_str(), rec.name.as_str()),
        (vm.uuid.as_str(), tpl.as_str())
    );
    assert!(rec.template.generalized.is_some() && rec.template.locked);
    assert_eq!(mode(&vm.disk), 0o444);
    let tools: Vec<_> = rec.history.iter().map(|h| h.tool.as_str()).collect();
    assert_eq!(tools, ["tpl-generalize", "tpl-lock", "tpl-rename"]);
    start_is_denied(&tpl, &vm.disk);
}

#[test]
fn immutable_template_on_ext4_still_serves_a_linked_clone_that_boots() {
    let mut s = Scratch::new();
    let lfs = Mount::image(&s, "mnt-ext4", "ext4", "300M");
    let name = s.name("imm");
    let disk = lfs.mnt.join(format!("{name}.qcow2"));
    sh(
        "cp",
        &[
            "--sparse=always",
            guest_image().to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    s.define(&guest_xml(&name, &disk, &s.dir.join("imm.console.log"), ""));
    mark_generalized(&name);

    // Locked first without the attribute, then with it: the second run adds it.
    let r = run_lock(&[&name]).ok(1);
    assert!(only(&r).template.locked && !only(&r).template.immutable);
    assert!(!immutable(&disk));
    let r = run_lock(&["--immutable", &name])
        .ok(1)
        .says(&["immutable attribute set"]);
    assert!(only(&r).template.immutable);
    assert_eq!(
        only(&r).history.len(),
        2,
        "the added attribute is a step of its own"
    );
    assert!(immutable(&disk), "lsattr must show +i");
    assert_eq!(mode(&disk), 0o444);
    assert!(read_meta(&name).template.immutable);
    // Not even root can remove it now.
    assert!(fs::remove_file(&disk).is_err());
    // Locking again without --immutable keeps it immutable and changes nothing.
    run_lock(&[&name]).ok(1).says(&["already locked"]);
    assert!(immutable(&disk));

    // libvirt itself cannot open an immutable file for writing, so this one fails earlier.
    let (ok, text) = virsh_try(&["start", &name]);
    assert!(!ok, "an immutable template must not start: {text}");
    assert!(
        text.contains(&format!("{}: Operation not permitted", disk.display())),
        "{text}"
    );

    // A linked clone (outside the loop filesystem) boots from the immutable image.
    let clone = s.name("clone");
    let overlay = s.dir.join(format!("{clone}.qcow2"));
    let console = s.dir.join("clone.console.log");
    qemu_img_overlay(&disk, "qcow2", &overlay);
    s.define(&guest_xml(&clone, &overlay, &console, ""));
    virsh(&["start", &clone]);
    let log = wait_for_console(&console, "TPL-BOOT done", Duration::from_secs(150));
    assert!(log.contains("TPL-BOOT root=/dev/vda"), "{log}");
    let _ = virsh_try(&["destroy", &clone]);

    run_lock(&["--unlock", &name])
        .fails(3)
        .says(&[&format!("domain '{clone}'")]);
    assert!(immutable(&disk));

    remove_domain(&clone);
    fs::remove_file(&overlay).unwrap();
    let r = run_lock(&["--unlock", &name])
        .ok(1)
        .says(&["immutable attribute cleared"]);
    assert!(!only(&r).template.immutable && !only(&r).template.locked);
    assert!(!immutable(&disk));
    assert_eq!(mode(&disk) & 0o200, 0o200);
}

#[test]
fn immutable_on_a_filesystem_without_it_warns_and_still_locks() {
    // ramfs has no immutable attribute: FS_IOC_GETFLAGS answers ENOTTY there.
    let mut s = Scratch::new();
    let lfs = Mount::ramfs(&s, "mnt-ramfs");
    let name = s.name("fat");
    let disk = lfs.mnt.join("fat.qcow2");
    qemu_img_create(&disk, "qcow2", "16M");
    s.define(&guest_xml(&name, &disk, &s.dir.join("fat.console.log"), ""));
    mark_generalized(&name);
    let r = run_lock(&["--immutable", &name]).ok(1).says(&[
        "warning",
        disk.to_str().unwrap(),
        "does not support the immutable attribute",
    ]);
    let rec = only(&r);
    assert!(rec.template.locked && !rec.template.immutable);
    assert_eq!(mode(&disk) & 0o222, 0, "still read-only by its mode");
    run_lock(&["--unlock", &name]).ok(1);
    assert_eq!(mode(&disk) & 0o200, 0o200);
}

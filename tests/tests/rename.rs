//! tpl-rename through the real binary against the real libvirtd.

use std::fs;
use std::path::Path;
use std::process::Stdio;

use tpl_tests::*;

#[test]
fn renames_by_argument_and_prints_the_record() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    let new = s.name("Tpl");
    let r = run("tpl-rename", &[&g.name, &new], None).ok(1);
    let rec = only(&r);
    assert_eq!(rec.name, new);
    assert_eq!(rec.uuid, g.uuid);
    assert_eq!(rec.state.as_str(), "shut off");
    assert_eq!(rec.uri, URI);
    assert_eq!(rec.disks[0].path.as_deref(), Some(g.disk.as_path()));
    assert_eq!(rec.history.last().unwrap().tool, "tpl-rename");
    assert_eq!(virsh(&["domuuid", &new]).trim(), g.uuid);
    assert!(!domain_exists(&g.name));
    // The step is recorded in libvirt, not only in the pipe.
    assert!(read_meta(&new)
        .history
        .iter()
        .any(|h| h.detail.contains(&g.name)));
}

#[test]
fn renames_one_record_from_stdin_by_uuid() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    // The name in the record is stale on purpose: the UUID wins.
    let input = format!("{{\"uuid\":\"{}\",\"name\":\"stale\"}}\n", g.uuid);
    let new = s.name("renamed");
    let r = run("tpl-rename", &[&new], Some(&input)).ok(1);
    assert_eq!(only(&r).name, new);
    assert_eq!(virsh(&["domname", &g.uuid]).trim(), new);
}

#[test]
fn renames_a_stream_of_three_with_a_name_pattern() {
    let mut s = Scratch::new();
    let gs: Vec<Guest> = ["a", "b", "c"].iter().map(|t| s.guest(t)).collect();
    // Records as an earlier tool prints them.
    let input: String = gs
        .iter()
        .map(|g| run("tpl-rename", &[&g.name, &g.name], None).ok(1).stdout)
        .collect();
    let r = run("tpl-rename", &["Tpl-{name}"], Some(&input)).ok(3);
    for (g, rec) in gs.iter().zip(&r.records) {
        assert_eq!(rec.name, format!("Tpl-{}", g.name));
        assert_eq!(rec.uuid, g.uuid);
        assert!(domain_exists(&rec.name));
    }
}

#[test]
fn same_name_is_a_success_that_changes_nothing() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    let before = virsh(&["dumpxml", "--inactive", &g.name]);
    let r = run("tpl-rename", &[&g.name, &g.name], None).ok(1);
    assert_eq!(only(&r).name, g.name);
    assert_eq!(virsh(&["dumpxml", "--inactive", &g.name]), before);
}

#[test]
fn disks_renames_image_and_nvram_and_updates_the_definition() {
    let mut s = Scratch::new();
    let name = s.name("vm");
    let disk = s.disk(&format!("{name}.qcow2"));
    let data = s.dir.join("extra-data.img");
    qemu_img_create(&data, "raw", "1M");
    let loader = s.dir.join("loader.fd");
    fs::write(&loader, vec![0u8; 4096]).unwrap();
    let nvram = s.dir.join(format!("{name}_VARS.fd"));
    fs::write(&nvram, b"nvram").unwrap();
    let iso = s.dir.join("shared.iso");
    fs::write(&iso, b"iso").unwrap();
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>
         <disk type='file' device='cdrom'><source file='{}'/><target dev='sda' bus='sata'/><readonly/></disk>",
        data.display(),
        iso.display()
    );
    let console = s.dir.join("console.log");
    let xml = guest_xml(&name, &disk, &console, &extra).replace(
        "<smbios mode='sysinfo'/>",
        &format!(
            "<smbios mode='sysinfo'/><loader readonly='yes' type='pflash'>{}</loader><nvram>{}</nvram>",
            loader.display(),
            nvram.display()
        ),
    );
    let uuid = s.define(&xml);

    let new = s.name("Tpl");
    let r = run("tpl-rename", &["--disks", &name, &new], None).ok(1);
    let rec = only(&r);
    let new_disk = s.dir.join(format!("{new}.qcow2"));
    let new_data = s.dir.join(format!("{new}-vdb.img"));
    let new_nvram = s.dir.join(format!("{new}_VARS.fd"));
    assert_eq!(rec.uuid, uuid);
    assert_eq!(rec.disks[0].path.as_deref(), Some(new_disk.as_path()));
    assert_eq!(rec.disks[1].path.as_deref(), Some(new_data.as_path()));
    assert_eq!(
        rec.disks[2].path.as_deref(),
        Some(iso.as_path()),
        "the cdrom is shared, not renamed"
    );
    assert_eq!(rec.nvram.as_deref(), Some(new_nvram.as_path()));
    assert!(new_disk.is_file() && new_data.is_file() && iso.is_file());
    assert!(!disk.exists() && !data.exists() && !nvram.exists());
    assert_eq!(fs::read(&new_nvram).unwrap(), b"nvram");
    // libvirt's own view agrees, and the image is still the guest (qemu-img reads it).
    let xml = virsh(&["dumpxml", "--inactive", &new]);
    assert!(
        xml.contains(new_disk.to_str().unwrap()) && xml.contains(new_nvram.to_str().unwrap()),
        "{xml}"
    );
    assert!(sh("qemu-img", &["info", new_disk.to_str().unwrap()]).contains("qcow2"));
    // Describing again (as the next tool would) gives the same record.
    let again = run("tpl-rename", &[&new, &new], None).ok(1);
    assert_eq!(only(&again).disks, rec.disks);
}

/// Defines `name` with `disk` as vda and the raw file `data` as vdb; its definition.
fn define_with_data_disk(s: &mut Scratch, name: &str, disk: &Path, data: &Path) -> String {
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>",
        data.display()
    );
    let xml = guest_xml(name, disk, &s.dir.join("c.log"), &extra);
    s.define(&xml);
    virsh(&["dumpxml", "--inactive", name])
}

#[test]
fn disks_is_all_or_nothing_when_a_rename_fails_midway() {
    let mut s = Scratch::new();
    let name = s.name("vm");
    let disk = s.disk(&format!("{name}.qcow2"));
    // The second disk is a file nobody may rename, not even root: vda moves, vdb fails.
    let data = s.dir.join(format!("{name}-data.img"));
    qemu_img_create(&data, "raw", "1M");
    sh("chattr", &["+i", data.to_str().unwrap()]);
    let before = define_with_data_disk(&mut s, &name, &disk, &data);
    let disk_sum = sha256(&disk);

    let new = s.name("Tpl");
    let r = run("tpl-rename", &["--disks", &name, &new], None);
    sh("chattr", &["-i", data.to_str().unwrap()]);
    r.fails(1)
        .says(&["Operation not permitted", &data.display().to_string()]);
    assert!(domain_exists(&name) && !domain_exists(&new));
    assert!(disk.is_file() && data.is_file());
    assert_eq!(sha256(&disk), disk_sum, "vda came back as it was");
    assert!(!s.dir.join(format!("{new}.qcow2")).exists());
    assert!(!s.dir.join(format!("{new}-data.img")).exists());
    assert_eq!(virsh(&["dumpxml", "--inactive", &name]), before);
}

#[test]
fn disks_in_a_directory_this_machine_may_not_write_are_refused_before_anything_moves() {
    let mut s = Scratch::new();
    let name = s.name("vm");
    let disk = s.disk(&format!("{name}.qcow2"));
    // The second disk lives in a directory nobody may change, not even root.
    let locked_dir = s.dir.join("frozen");
    fs::create_dir(&locked_dir).unwrap();
    let data = locked_dir.join(format!("{name}-data.img"));
    qemu_img_create(&data, "raw", "1M");
    sh("chattr", &["+i", locked_dir.to_str().unwrap()]);
    let before = define_with_data_disk(&mut s, &name, &disk, &data);

    let new = s.name("Tpl");
    let r = run("tpl-rename", &["--disks", &name, &new], None);
    sh("chattr", &["-i", locked_dir.to_str().unwrap()]);
    let r = r.fails(2).says(&[
        "Operation not permitted",
        &locked_dir.display().to_string(),
        "make",
        "writable",
    ]);
    assert!(r.records.is_empty());
    assert!(domain_exists(&name) && !domain_exists(&new));
    assert!(disk.is_file() && data.is_file());
    assert!(!s.dir.join(format!("{new}.qcow2")).exists());
    assert_eq!(virsh(&["dumpxml", "--inactive", &name]), before);
    // the check left nothing of its own in the directory
    assert_eq!(fs::read_dir(&locked_dir).unwrap().count(), 1);
}

#[test]
fn refuses_a_running_domain() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    // Paused counts as not shut off, and stays that way for as long as the test needs.
    virsh(&["start", "--paused", &g.name]);
    let r = run("tpl-rename", &[&g.name, &s.name("new")], None)
        .fails(3)
        .says(&[&g.name, "it is paused", "virsh shutdown"]);
    assert!(r.records.is_empty());
    virsh(&["destroy", &g.name]);
    assert!(domain_exists(&g.name));
}

#[test]
fn refuses_a_taken_name() {
    let mut s = Scratch::new();
    let a = s.guest("a");
    let b = s.guest("b");
    run("tpl-rename", &[&a.name, &b.name], None)
        .fails(3)
        .says(&[&a.name, &b.name, "already exists"]);
    assert_eq!(virsh(&["domuuid", &a.name]).trim(), a.uuid);
}

#[test]
fn refuses_invalid_names() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    for (bad, why) in [
        ("a/b", "contains '/'"),
        ("../x", "starts with '.'"),
        ("-rf", "starts with '-'"),
        ("a\nb", "control character"),
        ("", "empty"),
    ] {
        run("tpl-rename", &["--", &g.name, bad], None)
            .fails(2)
            .says(&[
                &format!("cannot rename domain '{}'", g.name),
                "invalid new domain name",
                why,
            ]);
    }
    let long = "x".repeat(300);
    run("tpl-rename", &[&g.name, &long], None)
        .fails(2)
        .says(&["300 bytes"]);
    assert!(domain_exists(&g.name));
}

#[test]
fn refuses_an_unknown_domain_and_an_unknown_uuid() {
    let s = Scratch::new();
    let missing = s.name("missing");
    run("tpl-rename", &[&missing, "x"], None)
        .fails(2)
        .says(&[&missing, "not found"]);
    let rec = "{\"uuid\":\"00000000-1111-2222-3333-444444444444\",\"name\":\"gone\"}\n";
    run("tpl-rename", &["x"], Some(rec))
        .fails(2)
        .says(&["gone", "00000000-1111-2222-3333-444444444444"]);
}

#[test]
fn malformed_json_exits_2_naming_the_line_and_carries_on() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    let input = format!("{{oops\n{{\"name\":\"{}\"}}\n", g.name);
    let r = run("tpl-rename", &["Tpl-{name}"], Some(&input))
        .fails(2)
        .says(&["stdin line 1"]);
    // The good record after it was still renamed and passed on.
    assert_eq!(only(&r).name, format!("Tpl-{}", g.name));
}

#[test]
fn an_interactive_stdin_is_a_usage_error_not_a_hang() {
    let pty = nix::pty::openpty(None, None).unwrap();
    let out = tool_command("tpl-rename")
        .arg("NewName")
        .stdin(Stdio::from(pty.slave))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no domain given"));
    assert!(out.stdout.is_empty());
}

#[test]
fn disks_refused_while_an_overlay_uses_the_image() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    // A hand-made linked clone that no domain names.
    let overlay = s.dir.join("handmade-overlay.qcow2");
    qemu_img_overlay(&g.disk, "qcow2", &overlay);
    let new = s.name("Tpl");
    run("tpl-rename", &["--disks", &g.name, &new], None)
        .fails(3)
        .says(&[&g.name, overlay.to_str().unwrap()]);
    assert!(domain_exists(&g.name) && g.disk.is_file());
    // Without --disks the domain alone may be renamed: the overlay names a file, not a domain.
    run("tpl-rename", &[&g.name, &new], None).ok(1);
    assert!(g.disk.is_file());
}

#[test]
fn disks_refused_for_a_disk_that_is_not_a_file() {
    let mut s = Scratch::new();
    let name = s.name("vm");
    let disk = s.disk(&format!("{name}.qcow2"));
    // A network disk has no file to rename: --disks must say so, not skip it.
    let extra = "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
        <source protocol='nbd' name='data'><host name='192.0.2.1' port='10809'/></source>\
        <target dev='vdb' bus='virtio'/></disk>";
    s.define(&guest_xml(&name, &disk, &s.dir.join("c.log"), extra));
    let new = s.name("Tpl");
    run("tpl-rename", &["--disks", &name, &new], None)
        .fails(3)
        .says(&[
            &name,
            "disk vdb is a network disk",
            "rename the domain without --disks",
        ]);
    assert!(domain_exists(&name) && !domain_exists(&new) && disk.is_file());
}

#[test]
fn dry_run_changes_nothing() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    let new = s.name("Tpl");
    let r = run("tpl-rename", &["--dry-run", "--disks", &g.name, &new], None)
        .ok(1)
        .says(&["would rename domain", "would rename disk vda"]);
    assert_eq!(only(&r).name, g.name);
    assert!(domain_exists(&g.name) && !domain_exists(&new) && g.disk.is_file());
}

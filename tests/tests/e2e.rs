//! The whole job end to end on the real libvirtd: generalize | lock | rename, then a linked
//! and a full clone made by tpl-clone boot as machines of their own, while the template
//! stays sealed.

use std::collections::BTreeSet;
use std::time::Duration;

use tpl_tests::*;

#[test]
fn pipeline_then_linked_and_full_clones_boot_as_their_own_machines() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    let tpl = s.name("Tpl");
    let r = pipeline(&format!(
        "tpl-generalize {vm} --hostname TplE2E | tpl-lock | tpl-rename --disks {tpl}",
        vm = g.name
    ))
    .ok(1);
    let rec = only(&r);
    assert_eq!(rec.name, tpl);
    assert!(
        rec.template.locked && rec.template.generalized.is_some(),
        "{rec:?}"
    );
    let image = s.dir.join(format!("{tpl}.qcow2"));
    assert_eq!(rec.disks[0].path.as_deref(), Some(image.as_path()));
    assert_eq!(mode(&image) & 0o222, 0, "the template image is read-only");
    let before = sha256(&image);

    // Two clones, each named and shaped by tpl-clone.
    let linked = s.name("web1");
    let full = s.name("full1");
    let l = run("tpl-clone", &[&tpl, &linked, "--linked"], None).ok(1);
    let lrec = only(&l);
    assert_eq!(lrec.clone.as_ref().unwrap().mode.as_str(), "linked");
    assert_eq!(lrec.disks[0].backing[0].path, image);
    assert_eq!(lrec.disks[0].backing[0].format.as_deref(), Some("qcow2"));
    let f = run("tpl-clone", &[&tpl, &full, "--full"], None).ok(1);
    let frec = only(&f);
    assert_eq!(frec.clone.as_ref().unwrap().mode.as_str(), "full");
    assert!(
        frec.disks[0].backing.is_empty(),
        "a full clone stands alone"
    );
    let overlay = lrec.disks[0].path.clone().unwrap();
    let overlay_before = std::fs::metadata(&overlay).unwrap().len();

    let names = vec![linked.clone(), full.clone()];
    boot_until_off(&names, Duration::from_secs(300));

    let mut ids = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for name in &names {
        let log = std::fs::read_to_string(console_path(name)).unwrap();
        assert_eq!(boot_values(&log, "root"), ["/dev/vda"], "{name}: {log}");
        // The template's generalized content: its first-boot action ran, its machine-id was empty.
        assert_eq!(boot_values(&log, "firstboot"), ["run"], "{name}: {log}");
        assert_eq!(
            boot_values(&log, "machine-id-at-boot"),
            [""],
            "{name}: {log}"
        );
        // The identity tpl-clone gave it: hostname from the SMBIOS serial.
        assert_eq!(
            boot_values(&log, "hostname"),
            [name.as_str()],
            "{name}: {log}"
        );
        assert!(
            boot_values(&log, "serial")[0].starts_with(&format!("ds=nocloud;h={name};i=")),
            "{log}"
        );
        let mid = boot_values(&log, "machine-id");
        assert_eq!(mid.len(), 1);
        assert!(ids.insert(mid[0].to_string()), "{name} shares a machine-id");
        let hk = boot_values(&log, "hostkey");
        assert_eq!(hk.len(), 3, "{name}: fresh host keys expected: {log}");
        for k in hk {
            assert!(
                keys.insert(k.split(' ').next().unwrap().to_string()),
                "{name} shares a host key"
            );
        }
    }
    // The linked clone wrote into its own overlay; the template image is untouched.
    assert!(
        std::fs::metadata(&overlay).unwrap().len() > overlay_before,
        "the overlay took the writes"
    );
    assert_eq!(sha256(&image), before, "the template image changed");
    // And the template still refuses to start.
    start_is_denied(&tpl, &image);
    assert_eq!(virsh(&["domstate", &tpl]).trim(), "shut off");
}

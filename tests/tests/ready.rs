//! Clones ready to work (issue 20), on the busybox guest and the real libvirtd: the seed each clone gets (user, keys, cloud-config), its life with the clone (rename, list, rm, kill -9), sizes and networks in the definition, and every bad input refused before anything is made.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tpl_common::domxml::DomainXml;
use tpl_tests::*;

fn clone(args: &[&str]) -> Run {
    run("tpl-clone", args, None)
}

/// A fresh ed25519 key pair made by ssh-keygen in `dir`: (private, public).
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let k = dir.join(name);
    succeed(Command::new("ssh-keygen").args([
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        name,
        "-f",
        p(&k),
    ]));
    (k.clone(), k.with_extension("pub"))
}

/// A file out of a vfat image, read by mtools (a real reader, not ours).
fn mcat(image: &Path, file: &str) -> String {
    let out = succeed(Command::new("mtype").args(["-i", p(image), &format!("::{file}")]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The documents of a seed's user-data: itself when it is one, else its MIME parts
/// (base64-decoded).
fn user_data_documents(ud: &str) -> Vec<String> {
    use base64::Engine;
    if ud.starts_with("#cloud-config") {
        return vec![ud.to_string()];
    }
    ud.split("--tpl-seed-part")
        .filter_map(|part| {
            let (head, body) = part.split_once("\n\n")?;
            if !head.contains("Content-Type: text/cloud-config") {
                return None;
            }
            let body: String = body.lines().map(str::trim).collect();
            if head.contains("base64") {
                base64::engine::general_purpose::STANDARD
                    .decode(body.trim_end_matches("--"))
                    .ok()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            } else {
                Some(body)
            }
        })
        .collect()
}

/// The disks of a definition: (target, source file, read-only).
fn disks(x: &DomainXml) -> Vec<(String, Option<PathBuf>, bool)> {
    x.disks()
        .into_iter()
        .map(|d| (d.target, d.path, d.readonly))
        .collect()
}

#[test]
fn a_seed_carries_the_user_and_keys_and_lives_and_dies_with_its_clone() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let (_, public) = keypair(&s.dir, "id_alice");
    let userdata = s.dir.join("user-data.yaml");
    fs::write(&userdata, "#cloud-config\npackages: [htop]\n").unwrap();
    let name = s.name("web1");
    let r = clone(&[
        &t.name,
        &name,
        "--user",
        "alice",
        "--ssh-key",
        p(&public),
        "--user-data",
        p(&userdata),
    ])
    .ok(1);
    let rec = only(&r);
    let seed = s.dir.join(format!("{name}-cidata.img"));
    assert_eq!(
        rec.clone.as_ref().and_then(|c| c.seed.clone()).as_deref(),
        Some(seed.as_path()),
        "the record names the clone's seed"
    );
    // Readable by root and libvirt's qemu user only.
    let m = fs::metadata(&seed).unwrap();
    assert_eq!(m.mode() & 0o777, 0o640, "mode of the seed");
    assert_eq!(m.uid(), 0);
    let qemu_gid = nix::unistd::Group::from_name("libvirt-qemu")
        .unwrap()
        .or(nix::unistd::Group::from_name("kvm").unwrap())
        .expect("libvirt's qemu group")
        .gid
        .as_raw();
    assert_eq!(m.gid(), qemu_gid, "group of the seed");
    // What cloud-init finds: the label, the user, the key, the user's own config.
    let label = sh("blkid", &["-o", "value", "-s", "LABEL", p(&seed)]);
    assert_eq!(label.trim(), "cidata");
    let key = fs::read_to_string(&public).unwrap();
    let key_b64 = key.split_whitespace().nth(1).unwrap();
    let ud = mcat(&seed, "user-data");
    let docs = user_data_documents(&ud);
    assert_eq!(docs.len(), 2, "the user's document and tpl's: {ud}");
    assert_eq!(
        docs[0],
        fs::read_to_string(&userdata).unwrap(),
        "the user's own cloud-config, unchanged, first"
    );
    assert!(
        docs[1].starts_with("#cloud-config")
            && docs[1].contains("alice")
            && docs[1].contains(key_b64),
        "{}",
        docs[1]
    );
    assert!(mcat(&seed, "tpl-authorized_keys").contains(key_b64));
    assert!(mcat(&seed, "meta-data").contains(&rec.uuid));
    assert_eq!(mcat(&seed, "tpl-user").trim(), "alice");
    // Attached read-only, as a disk the template does not have.
    let x = dom_xml(&name);
    let seed_disk = disks(&x)
        .into_iter()
        .find(|(_, f, _)| f.as_deref() == Some(seed.as_path()))
        .expect("the seed is attached");
    assert!(seed_disk.2, "the seed disk is read-only");
    assert_eq!(seed_disk.0, "vdb");
    assert!(rec.disks.iter().any(|d| d.target == "vdb" && d.own));
    // Renamed with the clone's files, its metadata following it.
    let renamed = s.name("web2");
    run("tpl-rename", &[&name, &renamed, "--disks"], None).ok(1);
    let seed2 = s.dir.join(format!("{renamed}-cidata.img"));
    assert!(seed2.exists() && !seed.exists());
    let meta = read_meta(&renamed);
    assert_eq!(meta.clone.unwrap().seed.as_deref(), Some(seed2.as_path()));
    assert!(disks(&dom_xml(&renamed))
        .iter()
        .any(|(_, f, _)| f.as_deref() == Some(seed2.as_path())));
    // Listed as the clone's: its space counted.
    let list = run("tpl-list", &["--json"], None);
    assert!(list.stdout.contains(p(&seed2)), "{}", list.stdout);
    // Removed with it.
    run("tpl-rm", &[&renamed], None).ok(0);
    assert!(!seed2.exists(), "tpl-rm removes the clone's seed");
    assert!(leftovers(&s.dir).is_empty());
}

#[test]
fn sizes_and_networks_go_into_the_definition_and_the_disk() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let before = qemu_img_info(&t.disk)["virtual-size"].as_u64().unwrap();
    let name = s.name("big");
    let br = HostBridge::create();
    clone(&[
        &t.name,
        &name,
        "--vcpus",
        "2",
        "--memory",
        "768M",
        "--disk-size",
        "256M",
        "--bridge",
        &br.0,
    ])
    .ok(1);
    let x = dom_xml(&name);
    let text = x.to_xml();
    assert!(text.contains(">2</vcpu>"), "{text}");
    assert!(
        text.contains("<memory unit=\"KiB\">786432</memory>"),
        "{text}"
    );
    assert!(
        text.contains("<interface type=\"bridge\">")
            && text.contains(&format!("bridge=\"{}\"", br.0)),
        "{text}"
    );
    let overlay = s.dir.join(format!("{name}.qcow2"));
    let info = qemu_img_info(&overlay);
    assert_eq!(info["virtual-size"].as_u64(), Some(256 << 20));
    assert!(before < 256 << 20);
    // Still an overlay on the template's image, not a copy.
    assert_eq!(
        info["backing-filename"].as_str(),
        Some(p(&t.disk)),
        "{info}"
    );
    // A full clone grows its copy.
    let full = s.name("bigfull");
    clone(&[&t.name, &full, "--full", "--disk-size", "200M"]).ok(1);
    let info = qemu_img_info(&s.dir.join(format!("{full}.qcow2")));
    assert_eq!(info["virtual-size"].as_u64(), Some(200 << 20));
}

#[test]
fn bad_input_is_refused_before_anything_is_made() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let (private, public) = keypair(&s.dir, "id_bob");
    let garbage = s.dir.join("garbage.pub");
    fs::write(&garbage, "this is not a key\n").unwrap();
    let no_header = s.dir.join("no-header.yaml");
    fs::write(&no_header, "packages: [htop]\n").unwrap();
    let bad_yaml = s.dir.join("bad.yaml");
    fs::write(&bad_yaml, "#cloud-config\npackages: [htop\nusers:\n").unwrap();
    let a_list = s.dir.join("list.yaml");
    fs::write(&a_list, "#cloud-config\n- htop\n").unwrap();
    let before = files_in(&s.dir);
    let name = s.name("c");
    let br = HostBridge::create();
    let br0 = br.0.as_str();
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec!["--ssh-key", p(&private)],
            2,
            vec![p(&private), "private key", "never copied"],
        ),
        (
            vec!["--ssh-key", p(&garbage)],
            2,
            vec![p(&garbage), "not an OpenSSH public key"],
        ),
        (
            vec!["--ssh-key", p(&public), "--user-data", p(&no_header)],
            2,
            vec![p(&no_header), "#cloud-config"],
        ),
        (
            vec!["--ssh-key", p(&public), "--user-data", p(&bad_yaml)],
            2,
            vec![p(&bad_yaml), "line"],
        ),
        (
            vec!["--ssh-key", p(&public), "--user-data", p(&a_list)],
            2,
            vec![p(&a_list)],
        ),
        (vec!["--user", "alice"], 2, vec!["--ssh-key"]),
        (
            vec!["--user", "root", "--ssh-key", p(&public)],
            2,
            vec!["root"],
        ),
        (
            vec!["--disk-size", "1M"],
            2,
            vec!["smaller than the template"],
        ),
        (vec!["--memory", "lots"], 2, vec!["not a size"]),
        (
            vec!["--network", "tpl-no-such-net"],
            2,
            vec!["tpl-no-such-net"],
        ),
        (
            vec!["--bridge", "tplbr-no-such"],
            2,
            vec!["tplbr-no-such", "no interface", "virsh iface-list"],
        ),
        (vec!["--ip", "10.0.0.5"], 2, vec!["network interface"]),
        (vec!["--bridge", br0, "--ip", "10.0.0.5"], 2, vec!["prefix"]),
        (
            vec!["--bridge", br0, "--ip", "10.0.0.0/24"],
            2,
            vec!["not a host's address"],
        ),
        (
            vec![
                "--bridge",
                br0,
                "--ip",
                "10.0.0.5/24",
                "--gateway",
                "10.1.0.1",
            ],
            2,
            vec!["outside"],
        ),
        (vec!["--ip", "nobody=10.0.0.5"], 2, vec!["names no clone"]),
    ];
    for (extra, code, says) in cases {
        let mut args = vec![t.name.as_str(), name.as_str()];
        args.extend(extra.iter().copied());
        clone(&args).fails(code).says(&says);
        assert!(!domain_exists(&name), "{extra:?} made the clone");
        assert_eq!(files_in(&s.dir), before, "{extra:?} left files");
    }
    // Two clones counting up from the last address of a /30 run out of host addresses.
    clone(&[
        &t.name,
        &name,
        &s.name("d"),
        "--bridge",
        br0,
        "--ip",
        "10.0.0.2/30",
        "--ssh-key",
        p(&public),
    ])
    .fails(2)
    .says(&["10.0.0.3/30", "not a host's address"]);
    assert_eq!(files_in(&s.dir), before);
}

/// kill -9 at any point of a batch with seeds: after the next run, no seed is left without
/// its clone, and every finished clone has its seed.
#[test]
fn kill_9_leaves_no_seed_without_its_clone() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let (_, public) = keypair(&s.dir, "id_k");
    let mut rng = Rng::seeded("kill_9_leaves_no_seed_without_its_clone");
    let trials = 6;
    let mut killed_mid_run = 0;
    for trial in 0..trials {
        let prefix = s.name(&format!("k{trial}-"));
        let mut child = spawn_clone(&[
            &t.name,
            "--count",
            "8",
            "--prefix",
            &prefix,
            "--ssh-key",
            p(&public),
        ]);
        let pid = child.id();
        // Kill once some seeds are written: the k-th seed file (final or temporary).
        let k = rng.range(1, 6) as usize;
        wait_until(120, "seeds being written", || {
            fs::read_dir(&s.dir)
                .unwrap()
                .flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.contains(&prefix) && n.contains("-cidata.img")
                })
                .count()
                >= k
        });
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        if !journals_of(pid).is_empty() {
            killed_mid_run += 1;
        }
        // The next run of any tool recovers.
        run("tpl-list", &[], None);
        assert!(journals_of(pid).is_empty(), "trial {trial}: journal left");
        for e in fs::read_dir(&s.dir).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(clone) = n.strip_suffix("-cidata.img") {
                assert!(
                    domain_exists(clone),
                    "trial {trial}: seed {n} without its clone"
                );
            }
        }
        assert!(
            leftovers(&s.dir).is_empty(),
            "trial {trial}: temporary files"
        );
        let (_, names) = virsh_try(&["list", "--all", "--name"]);
        for n in names
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(&prefix))
        {
            assert!(
                s.dir.join(format!("{n}-cidata.img")).exists(),
                "trial {trial}: clone {n} without its seed"
            );
        }
    }
    assert!(
        killed_mid_run >= trials / 2,
        "only {killed_mid_run} of {trials} kills landed while the run worked"
    );
}

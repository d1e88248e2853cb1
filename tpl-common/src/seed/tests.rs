//! The seed against the real components: keys ssh-keygen made, fingerprints ssh-keygen prints, YAML errors PyYAML finds, the image as blkid, fsck.fat and mtools read it, and the files as cloud-init's own NoCloud datasource and user-data merge read them.
//!
//! A tool these tests need and do not find fails the test with how to install it.

use std::fs;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use super::*;

/// Where cloud-init's Python package is unpacked unless `TPL_CLOUD_INIT_PYTHONPATH` says.
const CLOUD_INIT_DIR: &str = "/var/tmp/tpl-cloud-init/root/usr/lib/python3/dist-packages";

/// Fail loudly, with the package to install, when a tool is missing.
fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh runs")
        .status
        .success();
    assert!(
        found,
        "{tool} is not installed: `apt-get install -y {package}` (these tests use the real one)"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// A new key pair made by ssh-keygen; returns the private key's path (`.pub` beside it).
fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    need("ssh-keygen", "openssh-client");
    let path = dir.join(name);
    run(Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-C", &format!("{name}@tpl-test"), "-f"])
        .arg(&path)
        .args(args));
    path
}

fn pub_of(private: &Path) -> PathBuf {
    let mut p = private.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// What `ssh-keygen -lf` says of a key file: its SHA-256 fingerprint.
fn keygen_fingerprint(path: &Path) -> String {
    let out = stdout(
        Command::new("ssh-keygen")
            .args(["-E", "sha256", "-lf"])
            .arg(path),
    );
    out.split_whitespace()
        .nth(1)
        .expect("bits, fingerprint, …")
        .to_string()
}

fn spec(dir: &Path) -> SeedSpec {
    let key = pub_of(&keygen(dir, "alice", &["-t", "ed25519"]));
    SeedSpec {
        hostname: "web1.example.com".into(),
        instance_id: "0b6e2d5c-2a4c-4b8e-9d0f-3c1b2a4d5e6f".into(),
        user: Some("alice".into()),
        keys: read_public_keys(&key).unwrap(),
        user_data: None,
        network: None,
    }
}

fn file<'a>(files: &'a [SeedFile], path: &str) -> Option<&'a [u8]> {
    files
        .iter()
        .find(|f| f.path == path)
        .map(|f| f.data.as_slice())
}

// --- public keys ------------------------------------------------------------------------

#[test]
fn keys_ssh_keygen_made_are_read_with_their_lines_and_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        ("ed", &["-t", "ed25519"][..]),
        ("rsa", &["-t", "rsa", "-b", "2048"][..]),
        ("ec256", &["-t", "ecdsa", "-b", "256"][..]),
        ("ec521", &["-t", "ecdsa", "-b", "521"][..]),
    ] {
        let public = pub_of(&keygen(dir.path(), name, args));
        let keys = read_public_keys(&public).unwrap();
        assert_eq!(keys.len(), 1, "{name}");
        let text = fs::read_to_string(&public).unwrap();
        assert_eq!(keys[0].as_str(), text.trim(), "{name}: the line as written");
        assert_eq!(keys[0].algorithm(), text.split(' ').next().unwrap());
        assert_eq!(keys[0].fingerprint(), keygen_fingerprint(&public), "{name}");
    }
}

#[test]
fn an_authorized_keys_file_gives_every_key_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = fs::read_to_string(pub_of(&keygen(dir.path(), "a", &["-t", "ed25519"]))).unwrap();
    let b = fs::read_to_string(pub_of(&keygen(dir.path(), "b", &["-t", "ecdsa"]))).unwrap();
    let path = dir.path().join("authorized_keys");
    fs::write(
        &path,
        format!("# my keys\n\n{a}   \r\n  # laptop\n{}\n", b.trim()),
    )
    .unwrap();
    let keys = read_public_keys(&path).unwrap();
    let lines: Vec<&str> = keys.iter().map(PublicKeyLine::as_str).collect();
    assert_eq!(lines, [a.trim(), b.trim()]);
}

#[test]
fn fingerprints_are_what_ssh_keygen_prints() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        ("host_ed25519", &["-t", "ed25519"][..]),
        ("host_rsa", &["-t", "rsa", "-b", "3072"][..]),
        ("host_ecdsa", &["-t", "ecdsa"][..]),
    ] {
        let public = pub_of(&keygen(dir.path(), name, args));
        let line = fs::read_to_string(&public).unwrap();
        let ours = fingerprint_sha256(&line).unwrap();
        assert_eq!(ours, keygen_fingerprint(&public), "{name}");
        assert!(ours.starts_with("SHA256:") && !ours.ends_with('='));
        // Without the comment, as ssh-keyscan's key part is.
        let bare: Vec<&str> = line.split_whitespace().take(2).collect();
        assert_eq!(fingerprint_sha256(&bare.join(" ")).unwrap(), ours);
    }
    let e = fingerprint_sha256("ssh-ed25519 not-base64").unwrap_err();
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn private_keys_are_refused_and_never_read_as_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        ("openssh", &["-t", "ed25519"][..]),
        ("pem_rsa", &["-t", "rsa", "-b", "2048", "-m", "PEM"][..]),
        ("pkcs8_rsa", &["-t", "rsa", "-b", "2048", "-m", "PKCS8"][..]),
        ("pem_ec", &["-t", "ecdsa", "-m", "PEM"][..]),
    ] {
        let private = keygen(dir.path(), name, args);
        let e = read_public_keys(&private).unwrap_err();
        assert!(matches!(e, SeedError::PrivateKey { .. }), "{name}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("a private key is never copied into a seed")
                && msg.contains(".pub")
                && msg.contains(&private.display().to_string()),
            "{name}: {msg}"
        );
        assert_eq!(e.exit_code(), 2);
    }
    // A private key pasted after a public one is still a private key in the file.
    let public = fs::read_to_string(pub_of(&dir.path().join("openssh"))).unwrap();
    let private = fs::read_to_string(dir.path().join("openssh")).unwrap();
    let both = dir.path().join("both");
    fs::write(&both, format!("{public}{private}")).unwrap();
    assert!(matches!(
        read_public_keys(&both),
        Err(SeedError::PrivateKey { .. })
    ));
}

#[test]
fn what_is_not_a_public_key_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let public = pub_of(&keygen(dir.path(), "k", &["-t", "ed25519"]));
    let good = fs::read_to_string(&public).unwrap();
    let cases: Vec<(&str, Vec<u8>, Option<usize>, &str)> = vec![
        ("words", b"hello world\n".to_vec(), Some(1), "line 1"),
        (
            "second",
            format!("{good}ssh-ed25519 AAAA-broken x\n").into_bytes(),
            Some(2),
            "line 2",
        ),
        ("binary", vec![0x30, 0x82, 0xff, 0xfe, 0x00], None, "binary"),
        ("empty", Vec::new(), None, "no key"),
        ("comments", b"# nothing\n\n".to_vec(), None, "no key"),
    ];
    for (name, content, line, says) in cases {
        let path = dir.path().join(name);
        fs::write(&path, content).unwrap();
        let e = read_public_keys(&path).unwrap_err();
        let msg = e.to_string();
        match &e {
            SeedError::NotPublicKey { line: l, .. } => assert_eq!(*l, line, "{name}: {msg}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(says),
            "{name}: {msg}"
        );
    }
    // The other public key formats, as ssh-keygen -e writes them: how to convert.
    let ec = pub_of(&keygen(dir.path(), "ec", &["-t", "ecdsa"]));
    for (name, format) in [("rfc4716", "RFC4716"), ("pkcs8", "PKCS8"), ("pem", "PEM")] {
        // PKCS8 and PEM: ssh-keygen exports RSA and ECDSA keys only.
        let out = run(Command::new("ssh-keygen")
            .args(["-e", "-m", format, "-f"])
            .arg(&ec))
        .stdout;
        let path = dir.path().join(name);
        fs::write(&path, out).unwrap();
        let msg = read_public_keys(&path).unwrap_err().to_string();
        assert!(msg.contains("ssh-keygen -i"), "{name}: {msg}");
    }
    let e = read_public_keys(dir.path().join("missing.pub")).unwrap_err();
    assert!(matches!(e, SeedError::Unreadable { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.pub"), "{e}");
}

// --- user-data ---------------------------------------------------------------------------

/// Where PyYAML, cloud-init's YAML, finds `text` wrong: its 1-based line, if it does.
fn pyyaml_error_line(text: &str) -> Option<usize> {
    need("/usr/bin/python3", "python3");
    let out = run(Command::new("/usr/bin/python3").args([
        "-c",
        "import sys, yaml\n\
             try:\n    yaml.safe_load(sys.argv[1])\n    print('ok')\n\
             except yaml.MarkedYAMLError as e:\n    print(e.problem_mark.line + 1)\n",
        text,
    ]));
    let said = String::from_utf8(out.stdout).unwrap();
    said.trim().parse().ok()
}

fn user_data_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("user-data.yaml");
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn user_data_must_start_with_cloud_config() {
    let dir = tempfile::tempdir().unwrap();
    for text in [
        "packages: [htop]\n",
        "#!/bin/sh\necho hi\n",
        "#cloud-config-archive\n- content: x\n",
        "\u{feff}#cloud-config\npackages: [htop]\n",
        " #cloud-config\npackages: [htop]\n",
        "",
    ] {
        let path = user_data_file(dir.path(), text);
        let e = read_user_data(&path).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, SeedError::UserData { line: Some(1), .. }),
            "{text:?}: {e:?}"
        );
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("#cloud-config"),
            "{msg}"
        );
    }
    let ok = "#cloud-config \r\npackages: [htop]\r\n";
    assert_eq!(read_user_data(user_data_file(dir.path(), ok)).unwrap(), ok);
}

#[test]
fn bad_yaml_is_refused_at_the_line_pyyaml_finds() {
    let dir = tempfile::tempdir().unwrap();
    for text in [
        "#cloud-config\npackages:\n  - htop\nruncmd: [echo, \"open\n",
        "#cloud-config\nusers:\n  - name: bob\n   groups: adm\n",
        "#cloud-config\npackages:\n\t- htop\n",
        "#cloud-config\na: 1\nb: [1, 2\nc: 3\n",
    ] {
        let want = pyyaml_error_line(text).unwrap_or_else(|| panic!("PyYAML takes {text:?}"));
        let path = user_data_file(dir.path(), text);
        let e = read_user_data(&path).unwrap_err();
        let SeedError::UserData { line, .. } = &e else {
            panic!("{text:?}: {e:?}")
        };
        assert_eq!(*line, Some(want), "{text:?}: {e}");
        assert!(e.to_string().contains(&format!("line {want}")), "{e}");
    }
}

#[test]
fn user_data_must_be_a_mapping() {
    let dir = tempfile::tempdir().unwrap();
    for (text, says) in [
        ("#cloud-config\n- htop\n- vim\n", "a list"),
        ("#cloud-config\njust words\n", "a string"),
        ("#cloud-config\n", "no settings"),
        ("#cloud-config\n# only comments\n", "no settings"),
    ] {
        let e = read_user_data(user_data_file(dir.path(), text)).unwrap_err();
        assert!(
            matches!(e, SeedError::UserData { .. }) && e.to_string().contains(says),
            "{text:?}: {e}"
        );
    }
    let e = read_user_data(user_data_file(
        dir.path(),
        "#cloud-config\na: 1\n---\nb: 2\n",
    ))
    .unwrap_err();
    assert!(e.to_string().contains("more than one YAML document"), "{e}");
    let text = "#cloud-config\nusers:\n  - name: bob\n    shell: /bin/sh\n    shell: /bin/zsh\n";
    let e = read_user_data(user_data_file(dir.path(), text)).unwrap_err();
    assert!(
        e.to_string()
            .contains("mapping users[0] starting on line 3 has the key \"shell\" twice"),
        "{e}"
    );
    let e = read_user_data(dir.path().join("nope.yaml")).unwrap_err();
    assert!(matches!(e, SeedError::Unreadable { .. }), "{e:?}");
}

// --- user names and the spec -------------------------------------------------------------

#[test]
fn user_names_follow_useradd_and_are_never_root_or_default() {
    for ok in ["alice", "_svc", "a-b_9", &"a".repeat(32)] {
        check_user_name(ok).unwrap();
    }
    for (bad, says) in [
        ("", "empty"),
        ("Alice", "lower-case"),
        ("1abc", "start"),
        ("-x", "start"),
        ("a b", "lower-case letters, digits"),
        ("al$", "lower-case letters, digits"),
        (&"a".repeat(33), "32 bytes"),
        ("root", "sudo"),
        ("default", "default user"),
    ] {
        let e = check_user_name(bad).unwrap_err();
        assert!(e.to_string().contains(says), "{bad:?}: {e}");
        assert_eq!(e.exit_code(), 2);
    }
}

#[test]
fn a_bad_spec_is_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let good = spec(dir.path());
    let net = StaticNetwork {
        mac: "52:54:00:AB:cd:01".into(),
        address: Ipv4Addr::new(10, 0, 0, 5),
        prefix: 24,
        gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
        dns: vec![],
    };
    let with = |f: &dyn Fn(&mut SeedSpec)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let with_net = |f: &dyn Fn(&mut StaticNetwork)| {
        let mut n = net.clone();
        f(&mut n);
        with(&|s| s.network = Some(n.clone()))
    };
    let cases = [
        (with(&|s| s.hostname = "web_1".into()), "host name"),
        (with(&|s| s.instance_id = "a;b".into()), "instance id"),
        (with(&|s| s.instance_id = String::new()), "instance id"),
        (with(&|s| s.user = Some("root".into())), "user name"),
        (with(&|s| s.keys.clear()), "no public key"),
        (
            with(&|s| s.user_data = Some("packages: [x]\n".into())),
            "user-data",
        ),
        (with_net(&|n| n.mac = "52:54:00:ab:cd".into()), "MAC"),
        (
            with_net(&|n| n.mac = "01:00:5e:00:00:01".into()),
            "multicast",
        ),
        (with_net(&|n| n.prefix = 0), "prefix"),
        (with_net(&|n| n.prefix = 33), "prefix"),
        (
            with_net(&|n| n.gateway = Some(Ipv4Addr::new(10, 0, 1, 1))),
            "outside",
        ),
        (
            with_net(&|n| n.gateway = Some(Ipv4Addr::new(10, 0, 0, 5))),
            "address itself",
        ),
        (
            with_net(&|n| n.address = Ipv4Addr::new(10, 0, 0, 255)),
            "broadcast",
        ),
        (
            with_net(&|n| n.address = Ipv4Addr::new(10, 0, 0, 0)),
            "network address",
        ),
    ];
    for (s, says) in cases {
        let e = build(&s).unwrap_err();
        assert!(e.to_string().contains(says), "{says}: {e}");
        assert_eq!(e.exit_code(), 2, "{e}");
    }
    // A /32 on its own and a gateway-less network are fine.
    build(&with_net(&|n| {
        n.prefix = 32;
        n.gateway = None;
    }))
    .unwrap();
}

#[test]
fn a_merge_that_would_lose_tpls_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = spec(dir.path());
    for (user_data, says) in [
        ("#cloud-config\nusers: bob, carol\n", "not a list"),
        ("#cloud-config\nusers:\npackages: [htop]\n", "not a list"),
        (
            "#cloud-config\nusers:\n  - name: alice\n    groups: adm\n",
            "already has the user",
        ),
        (
            "#cloud-config\nusers:\n  - default\n  - bob, alice\n",
            "already has the user",
        ),
    ] {
        let s = SeedSpec {
            user_data: Some(user_data.into()),
            ..good.clone()
        };
        let e = build(&s).unwrap_err();
        assert!(e.to_string().contains(says), "{user_data:?}: {e}");
    }
    let s = SeedSpec {
        user: None,
        user_data: Some("#cloud-config\nssh_authorized_keys: one\n".into()),
        ..good.clone()
    };
    assert!(build(&s).unwrap_err().to_string().contains("not a list"));
}

// --- the files ---------------------------------------------------------------------------

#[test]
fn tpl_files_say_the_facts_in_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path());
    let second = read_public_keys(pub_of(&keygen(dir.path(), "b", &["-t", "rsa"]))).unwrap();
    s.keys.extend(second);
    s.network = Some(StaticNetwork {
        mac: "52:54:00:AB:CD:01".into(),
        address: Ipv4Addr::new(192, 0, 2, 10),
        prefix: 26,
        gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        dns: vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(198, 51, 100, 53)],
    });
    let files = seed_files(&s).unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f.path).collect();
    assert_eq!(
        paths,
        [
            "meta-data",
            "user-data",
            "network-config",
            "tpl-hostname",
            "tpl-instance-id",
            "tpl-user",
            "tpl-authorized_keys",
            "tpl-network"
        ]
    );
    assert_eq!(file(&files, "tpl-hostname").unwrap(), b"web1.example.com\n");
    assert_eq!(
        file(&files, "tpl-instance-id").unwrap(),
        format!("{}\n", s.instance_id).as_bytes()
    );
    assert_eq!(file(&files, "tpl-user").unwrap(), b"alice\n");
    assert_eq!(
        file(&files, "tpl-authorized_keys").unwrap(),
        format!("{}\n{}\n", s.keys[0], s.keys[1]).as_bytes()
    );
    assert_eq!(
        file(&files, "tpl-network").unwrap(),
        b"MAC=52:54:00:ab:cd:01\nADDRESS=192.0.2.10\nPREFIX=26\nNETMASK=255.255.255.192\n\
          GATEWAY=192.0.2.1\nDNS=192.0.2.1,198.51.100.53\n"
    );

    // What a POSIX shell makes of tpl-network, sourced as the module documentation allows.
    need("sh", "dash");
    let net = dir.path().join("network");
    fs::write(&net, file(&files, "tpl-network").unwrap()).unwrap();
    let said = stdout(Command::new("sh").arg("-c").arg(format!(
        ". '{}' && echo \"$MAC $ADDRESS/$PREFIX $NETMASK via $GATEWAY dns $DNS\"",
        net.display()
    )));
    assert_eq!(
        said,
        "52:54:00:ab:cd:01 192.0.2.10/26 255.255.255.192 via 192.0.2.1 dns 192.0.2.1,198.51.100.53\n"
    );

    // DHCP, no user, no keys: only what was asked for.
    let bare = SeedSpec {
        user: None,
        keys: vec![],
        network: None,
        ..s
    };
    let files = seed_files(&bare).unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f.path).collect();
    assert_eq!(
        paths,
        ["meta-data", "user-data", "tpl-hostname", "tpl-instance-id"]
    );
}

// --- the image ---------------------------------------------------------------------------

fn read_back(image: &[u8]) -> (String, String, Vec<(String, Vec<u8>)>) {
    let fs = fatfs::FileSystem::new(
        std::io::Cursor::new(image.to_vec()),
        fatfs::FsOptions::new(),
    )
    .unwrap();
    let boot_label = fs.volume_label();
    let root_label = fs.read_volume_label_from_root_dir().unwrap().unwrap();
    let mut files = Vec::new();
    fn walk<T: fatfs::ReadWriteSeek>(
        dir: fatfs::Dir<T>,
        prefix: &str,
        out: &mut Vec<(String, Vec<u8>)>,
    ) {
        for e in dir.iter() {
            let e = e.unwrap();
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}{name}");
            if e.is_dir() {
                walk(e.to_dir(), &format!("{path}/"), out);
            } else {
                let mut data = Vec::new();
                e.to_file().read_to_end(&mut data).unwrap();
                out.push((path, data));
            }
        }
    }
    walk(fs.root_dir(), "", &mut files);
    (boot_label, root_label, files)
}

#[test]
fn the_image_holds_the_files_under_the_label_fatfs_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path());
    let image = build(&s).unwrap();
    assert_eq!(image.len() % 512, 0);
    assert!(image.len() <= 128 << 10, "{} bytes", image.len());
    let (boot, root, files) = read_back(&image);
    assert_eq!(boot.trim_end(), LABEL);
    assert_eq!(root.trim_end(), LABEL);
    let want: Vec<(String, Vec<u8>)> = seed_files(&s)
        .unwrap()
        .into_iter()
        .map(|f| (f.path.to_string(), f.data))
        .collect();
    let mut got = files;
    got.sort();
    let mut want_sorted = want;
    want_sorted.sort();
    assert_eq!(got, want_sorted);
}

#[test]
fn the_same_spec_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path());
    let a = build(&s).unwrap();
    assert_eq!(a, build(&s).unwrap());
    let other = build(&SeedSpec {
        instance_id: "another".into(),
        ..s
    })
    .unwrap();
    // The boot sector's volume serial (offset 39 on FAT12/16) follows the instance id.
    assert_ne!(a[39..43], other[39..43]);
}

#[test]
fn blkid_fsck_fat_and_mtools_read_the_image() {
    need("blkid", "util-linux");
    need("fsck.fat", "dosfstools");
    need("mtype", "mtools");
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path());
    s.user_data = Some("#cloud-config\npackages: [htop]\n".into());
    s.network = Some(StaticNetwork {
        mac: "52:54:00:12:34:56".into(),
        address: Ipv4Addr::new(192, 0, 2, 10),
        prefix: 24,
        gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        dns: vec![Ipv4Addr::new(192, 0, 2, 1)],
    });
    // And one seed big enough for FAT16 (more than FAT12's 4084 clusters of 512 bytes).
    let big = SeedSpec {
        user_data: Some(format!(
            "#cloud-config\nwrite_files:\n  - path: /big\n    content: {}\n",
            "x".repeat(3 << 20)
        )),
        ..s.clone()
    };
    for (name, s) in [("small", s), ("big", big)] {
        let image = build(&s).unwrap();
        let path = dir.path().join(format!("{name}.img"));
        fs::write(&path, &image).unwrap();

        let label = stdout(
            Command::new("blkid")
                .args(["-p", "-o", "value", "-s", "LABEL"])
                .arg(&path),
        );
        assert_eq!(label, format!("{LABEL}\n"), "{name}");
        let label = stdout(
            Command::new("blkid")
                .args(["-o", "value", "-s", "LABEL"])
                .arg(&path),
        );
        assert_eq!(label, format!("{LABEL}\n"), "{name}");
        let kind = stdout(
            Command::new("blkid")
                .args(["-p", "-o", "value", "-s", "TYPE"])
                .arg(&path),
        );
        assert_eq!(kind, "vfat\n", "{name}");

        // -n: check only; exit 0 is a clean file system.
        let fsck = run(Command::new("fsck.fat").arg("-n").arg(&path));
        let said = String::from_utf8_lossy(&fsck.stdout);
        assert!(
            !said.contains("differ") && !said.contains("rror"),
            "{name}: {said}"
        );

        for f in seed_files(&s).unwrap() {
            let out = run(Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&path)
                .arg(format!("::/{}", f.path)))
            .stdout;
            assert!(
                out == f.data,
                "{name}: {} differs as mtype reads it",
                f.path
            );
        }
    }
}

// --- what cloud-init reads ----------------------------------------------------------------

/// cloud-init's Python package: `TPL_CLOUD_INIT_PYTHONPATH`, else the unpacked one in
/// [`CLOUD_INIT_DIR`], else an installed one; none: the test fails saying how to get it.
fn cloud_init_pythonpath() -> String {
    need("/usr/bin/python3", "python3");
    if let Ok(p) = std::env::var("TPL_CLOUD_INIT_PYTHONPATH") {
        return p;
    }
    if Path::new(CLOUD_INIT_DIR).join("cloudinit").is_dir() {
        return CLOUD_INIT_DIR.to_string();
    }
    let installed = Command::new("/usr/bin/python3")
        .args(["-c", "import cloudinit"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "cloud-init's Python code is needed to check what it reads of a seed and is not here: \
         unpack Debian's package without installing it (no services) with \
         `mkdir -p /var/tmp/tpl-cloud-init && cd /var/tmp/tpl-cloud-init && apt-get download cloud-init && dpkg-deb -x cloud-init_*.deb root` \
         and `apt-get install -y python3-yaml python3-configobj python3-jinja2 python3-jsonschema \
         python3-jsonpatch python3-requests python3-netifaces python3-oauthlib python3-serial`, \
         or set TPL_CLOUD_INIT_PYTHONPATH"
    );
    String::new()
}

/// Runs cloud-init's NoCloud datasource on a seed directory (its seed-dir path reads the
/// same files with the same code as a mounted `cidata` disk: util.pathprefix2dict), then
/// its user-data processor and cloud-config part handler (the merge) on the user-data.
const CLOUD_INIT_READS: &str = r#"
import json, sys, tempfile
from cloudinit import handlers, helpers
from cloudinit.handlers.cloud_config import CloudConfigPartHandler
from cloudinit.sources import DataSourceNoCloud

work = tempfile.mkdtemp()
paths = helpers.Paths({"cloud_dir": work + "/cloud", "run_dir": work + "/run"})
# fs_label None: look at no block device of this machine, only at the seed directory.
ds = DataSourceNoCloud.DataSourceNoCloud(
    {"datasource": {"NoCloud": {"fs_label": None}}}, None, paths)
ds.seed_dirs = [sys.argv[1]]
assert ds._get_data(), "NoCloud did not take the seed"

handler = CloudConfigPartHandler(paths)
handler.cloud_fn = None
data = {"handlers": {t: handler for t in handler.list_types()}, "handlerdir": work,
        "data": None, "frequency": "always", "handlercount": 0, "excluded": []}
handler.handle_part(None, handlers.CONTENT_START, None, None, None, None)
handlers.walk(ds.get_userdata(), handlers.walker_callback, data)

print(json.dumps({
    "instance-id": ds.get_instance_id(),
    "hostname": ds.metadata.get("local-hostname"),
    "public-keys": ds.get_public_ssh_keys(),
    "network-config": ds.network_config,
    "cloud-config": handler.cloud_buf,
}))
"#;

/// What cloud-init reads of `image`, copied out of it by mtools (another reader than ours).
fn cloud_init_reads(image: &[u8]) -> Value {
    need("mcopy", "mtools");
    let pythonpath = cloud_init_pythonpath();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("seed.img");
    fs::write(&img, image).unwrap();
    let seed = dir.path().join("seed");
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-i"])
        .arg(&img)
        .arg("::/")
        .arg(&seed));
    let out = stdout(
        Command::new("/usr/bin/python3")
            .env("PYTHONPATH", pythonpath)
            .args(["-c", CLOUD_INIT_READS])
            .arg(&seed),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn cloud_init_reads_the_seed_and_creates_tpls_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path());
    s.keys
        .extend(read_public_keys(pub_of(&keygen(dir.path(), "r", &["-t", "rsa"]))).unwrap());
    s.network = Some(StaticNetwork {
        mac: "52:54:00:AB:CD:EF".into(),
        address: Ipv4Addr::new(192, 0, 2, 10),
        prefix: 24,
        gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
    });
    let keys: Vec<String> = s.keys.iter().map(PublicKeyLine::to_string).collect();
    let got = cloud_init_reads(&build(&s).unwrap());
    assert_eq!(got["instance-id"], json!(s.instance_id));
    assert_eq!(got["hostname"], json!("web1.example.com"));
    assert_eq!(got["public-keys"], json!(keys));
    assert_eq!(
        got["network-config"],
        json!({"version": 2, "ethernets": {"tpl0": {
            "match": {"macaddress": "52:54:00:ab:cd:ef"},
            "dhcp4": false,
            "addresses": ["192.0.2.10/24"],
            "routes": [{"to": "0.0.0.0/0", "via": "192.0.2.1"}],
            "nameservers": {"addresses": ["192.0.2.53"]},
        }}})
    );
    assert_eq!(
        got["cloud-config"],
        json!({
            "hostname": "web1.example.com",
            "users": [{
                "name": "alice",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": true,
                "ssh_authorized_keys": keys,
            }],
        })
    );

    // No user: the keys go to the default user; DHCP: no network-config.
    let s = SeedSpec {
        user: None,
        network: None,
        ..s
    };
    let got = cloud_init_reads(&build(&s).unwrap());
    assert_eq!(got["network-config"], Value::Null);
    assert_eq!(
        got["cloud-config"],
        json!({"hostname": "web1.example.com", "ssh_authorized_keys": keys})
    );
}

#[test]
fn cloud_init_merges_the_users_cloud_config_with_tpls_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let theirs_key =
        fs::read_to_string(pub_of(&keygen(dir.path(), "t", &["-t", "ed25519"]))).unwrap();
    let theirs_key = theirs_key.trim();
    // YAML 1.1 values (yes, 0644) and a comment: cloud-init reads their document itself.
    let text = format!(
        "#cloud-config\n\
         # theirs\n\
         hostname: their-name\n\
         package_update: yes\n\
         packages:\n  - htop\n  - vim\n\
         users:\n  - default\n  - name: bob\n    groups: adm\n    ssh_authorized_keys: [\"{theirs_key}\"]\n\
         ssh_authorized_keys:\n  - {theirs_key}\n\
         write_files:\n  - path: /etc/motd\n    permissions: 0644\n    content: hello\n\
         runcmd:\n  - [touch, /run/theirs]\n"
    );
    let path = user_data_file(dir.path(), &text);
    let mut s = spec(dir.path());
    s.user_data = Some(read_user_data(&path).unwrap());
    let keys: Vec<String> = s.keys.iter().map(PublicKeyLine::to_string).collect();

    let got = cloud_init_reads(&build(&s).unwrap());
    let cc = &got["cloud-config"];
    // Theirs, all of it, as PyYAML reads it.
    assert_eq!(cc["hostname"], json!("their-name"));
    assert_eq!(cc["package_update"], json!(true));
    assert_eq!(cc["packages"], json!(["htop", "vim"]));
    assert_eq!(cc["ssh_authorized_keys"], json!([theirs_key]));
    assert_eq!(
        cc["write_files"],
        json!([{"path": "/etc/motd", "permissions": 420, "content": "hello"}])
    );
    assert_eq!(cc["runcmd"], json!([["touch", "/run/theirs"]]));
    // Their users, then tpl's.
    assert_eq!(
        cc["users"],
        json!([
            "default",
            {"name": "bob", "groups": "adm", "ssh_authorized_keys": [theirs_key]},
            {
                "name": "alice",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": true,
                "ssh_authorized_keys": keys,
            }
        ])
    );
    let mut names: Vec<&str> = cc.as_object().unwrap().keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "hostname",
            "package_update",
            "packages",
            "runcmd",
            "ssh_authorized_keys",
            "users",
            "write_files"
        ]
    );

    // Their fqdn names the host alone.
    let fqdn = SeedSpec {
        user_data: Some("#cloud-config\nfqdn: db.example.org\n".into()),
        ..s.clone()
    };
    let got = cloud_init_reads(&build(&fqdn).unwrap());
    assert_eq!(got["cloud-config"]["fqdn"], json!("db.example.org"));
    assert_eq!(got["cloud-config"].get("hostname"), None);
    assert_eq!(got["cloud-config"]["users"][0]["name"], json!("alice"));

    // Without a user, tpl's keys join theirs for the default user.
    let s = SeedSpec { user: None, ..s };
    let got = cloud_init_reads(&build(&s).unwrap());
    let mut want = vec![theirs_key.to_string()];
    want.extend(keys);
    assert_eq!(got["cloud-config"]["ssh_authorized_keys"], json!(want));
    assert_eq!(got["cloud-config"]["users"][1]["name"], json!("bob"));
    assert_eq!(got["cloud-config"]["users"].as_array().unwrap().len(), 2);
}

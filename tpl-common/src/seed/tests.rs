//! The seed's input checks against the real components: keys ssh-keygen made, fingerprints ssh-keygen prints, YAML errors PyYAML finds.
//!
//! A tool these tests need and do not find fails the test with how to install it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::*;

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

// --- user names ----------------------------------------------------------------------------

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

//! The Debian package (`make deb`, which `make test` runs first): installed with dpkg on
//! this machine, its tools run against a template from /usr/bin, then purged, leaving
//! none of its files.

use std::path::{Path, PathBuf};
use std::process::Command;

use tpl_tests::*;

/// The package `make deb` built; a test that cannot find it fails.
fn package() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}: build the package first (make deb)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one package in {}: {debs:?}", dir.display());
    debs.into_iter().next().unwrap()
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "tpl"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Purges the package even when the test fails half-way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "tpl"]).output();
    }
}

#[test]
fn the_package_installs_runs_and_purges_cleanly() {
    let deb = package();
    assert!(
        !installed(),
        "the tpl package is already installed here; purge it first"
    );
    let _purge = Purge;
    sh("dpkg", &["-i", p(&deb)]);
    assert!(installed());
    let files: Vec<PathBuf> = sh("dpkg", &["-L", "tpl"])
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    let has = |f: &str| files.iter().any(|p| p == Path::new(f));
    for tool in [
        "tpl-generalize",
        "tpl-lock",
        "tpl-rename",
        "tpl-clone",
        "tpl-list",
        "tpl-rm",
    ] {
        assert!(has(&format!("/usr/bin/{tool}")), "{tool}: {files:?}");
        assert!(
            has(&format!("/usr/share/man/man1/{tool}.1.gz")),
            "{tool}'s man page"
        );
        assert!(has(&format!(
            "/usr/share/bash-completion/completions/{tool}"
        )));
        assert!(has(&format!("/usr/share/zsh/vendor-completions/_{tool}")));
        assert!(has(&format!(
            "/usr/share/fish/vendor_completions.d/{tool}.fish"
        )));
    }
    for f in [
        "/usr/bin/tpl-refresh",
        "/usr/share/tpl/tpl-record.schema.json",
        "/usr/share/doc/tpl/copyright",
        "/lib/systemd/system/tpl-refresh@.service",
        "/lib/systemd/system/tpl-refresh@.timer",
    ] {
        assert!(has(f), "{f}: {files:?}");
    }
    let unit = std::fs::read_to_string("/lib/systemd/system/tpl-refresh@.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/tpl-refresh "), "{unit}");
    let man = sh("man", &["-P", "cat", "/usr/share/man/man1/tpl-clone.1.gz"]);
    assert!(man.contains("tpl-clone"), "{man}");

    // The installed tools, not the build tree's, against a template.
    // SAFETY of the process-wide change: this binary holds this one test only.
    std::env::set_var("TPL_BIN_DIR", "/usr/bin");
    assert_eq!(bin("tpl-clone"), Path::new("/usr/bin/tpl-clone"));
    let mut s = Scratch::new();
    let g = s.guest("tpl");
    mark_generalized(&g.name);
    run("tpl-lock", &[&g.name], None).ok(1);
    let c = s.name("c");
    let r = run("tpl-clone", &[&g.name, &c, "--linked"], None).ok(1);
    assert_eq!(only(&r).name, c);
    let listed = run("tpl-list", &["--clones-of", &g.name], None).ok(1);
    assert_eq!(only(&listed).name, c);
    run("tpl-rm", &[&c], None).ok(0);
    assert!(!domain_exists(&c));

    // Purged: not one of its files is left.
    sh("dpkg", &["--purge", "tpl"]);
    assert!(!installed());
    let left: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left after the purge: {left:?}");
}

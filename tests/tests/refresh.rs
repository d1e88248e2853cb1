//! `tpl-refresh` (the cron recipe) on the real libvirtd: versions, the stable name, pruning
//! of unused versions only, and the lock against overlapping runs.

use std::process::{Command, Stdio};

use tpl_tests::*;

fn refresh(state: &std::path::Path, args: &[&str]) -> Run {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tpl-refresh");
    let dir = bin("tpl-clone").parent().unwrap().to_path_buf();
    let mut c = Command::new(script);
    test_env(&mut c)
        .args(args)
        .env("TPL_STATE_DIR", state)
        .env(
            "PATH",
            format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
        )
        .stdin(Stdio::null());
    let out = c.output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let records = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Run {
        code: out.status.code().unwrap_or(-1),
        records,
        stdout,
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn versions(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect();
    v.sort();
    v
}

fn title(name: &str) -> String {
    virsh(&["desc", name, "--title", "--config"])
        .trim()
        .to_string()
}

#[test]
fn refreshes_keep_used_versions_and_remove_unused_ones() {
    let mut s = Scratch::new();
    let src = s.guest("src");
    let src_sum = sh("sha256sum", &[src.disk.to_str().unwrap()]);
    let tpl = s.name("Tpl");
    let state = s.dir.join("state");

    // A second run while one holds the lock says so and exits 3.
    std::fs::create_dir_all(&state).unwrap();
    let lockfile = std::fs::File::create(state.join(format!("refresh-{tpl}.lock"))).unwrap();
    let held =
        nix::fcntl::Flock::lock(lockfile, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    refresh(&state, &[&src.name, &tpl])
        .fails(3)
        .says(&["another refresh", &tpl]);
    drop(held);
    assert_eq!(
        versions(&tpl),
        Vec::<String>::new(),
        "the refused run made nothing"
    );

    // First refresh: the template under its stable name, its version as its title.
    let r1 = refresh(&state, &[&src.name, &tpl]).ok(1);
    assert_eq!(only(&r1).name, tpl);
    assert!(only(&r1).template.locked);
    let v1 = title(&tpl);
    assert!(v1.starts_with(&format!("{tpl}-")), "{v1}");

    // Second: the stable name moves; the first goes back to its version name.
    let r2 = refresh(&state, &[&src.name, &tpl]).ok(1);
    let v2 = title(&tpl);
    assert_ne!(v1, v2);
    assert_eq!(only(&r2).name, tpl);
    assert!(
        domain_exists(&v1),
        "the previous version is kept by default (--keep 1)"
    );

    // A linked clone of the first version.
    let clone = s.name("web1");
    run("tpl-clone", &[&v1, &clone, "--linked"], None).ok(1);

    // Third, keeping no unused older version: v1 stays (used), v2 goes (unused).
    let r3 = refresh(&state, &["--keep", "0", &src.name, &tpl])
        .ok(1)
        .says(&["keeping", "linked clones use it", "removing unused version"]);
    let v3 = title(&tpl);
    assert!(
        domain_exists(&v1) && !domain_exists(&v2),
        "{:?}",
        versions(&tpl)
    );
    assert_eq!(only(&r3).name, tpl);
    assert_ne!(v3, v2);
    let v2_files: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&v2))
        .collect();
    assert!(
        v2_files.is_empty(),
        "the removed version's files are gone: {v2_files:?}"
    );
    assert_eq!(versions(&tpl), vec![tpl.clone(), v1.clone()]);
    // The source was only read.
    assert_eq!(sh("sha256sum", &[src.disk.to_str().unwrap()]), src_sum);
    assert!(read_meta(&src.name).template.generalized.is_none());
}

//! What a local user or a careless pipe controls (issue 22), one test a row, against the
//! real binaries, the real libvirtd and real files: journals the tools did not write, the
//! state directory's modes whatever the umask, another user's /tmp, the locks, tpl-rm's
//! input, tpl-list's completeness, a domain that goes while a tool waits, and the default
//! connection of a user who is not root. Each test fails on the tools as they were before
//! issue 22 (the behaviour the issue measured).

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tpl_common::journal::clone::Entry;
use tpl_common::journal::remove::{Doomed, Intent as RmIntent};
use tpl_common::journal::rename::{Intent as RenameIntent, Move};
use tpl_common::ownfiles::Role;
use tpl_common::volume::{Identity, Vol};
use tpl_tests::*;

/// A pid no process has: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// Write a journal of `kind` for the dead run `pid` in this test's state directory, as
/// root, mode 0600: the journal is the tools' own user's, only its content is planted.
fn plant(sub: &str, kind: &str, pid: u32, lines: &[String]) -> PathBuf {
    let dir = state_dir().join(sub);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{kind}-{pid}-0badf00d.journal"));
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn dev_ino(p: &Path) -> (u64, u64) {
    let m = fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

fn victim(dir: &Path, name: &str) -> PathBuf {
    let v = dir.join(name);
    fs::write(&v, "precious").unwrap();
    v
}

const UNKNOWN: &str = "0b0b0b0b-1111-2222-3333-444455556666";

/// Row 1: recovery obeyed any journal. A read-only `tpl-list --templates` deleted the file
/// of a clone-journal `tmp` entry and of a `file` entry, unlinked a file through a remove
/// journal's `hidden` entry, moved a file out of its directory through a rename journal of
/// an unknown UUID, and through one with an existing domain's UUID pointed that domain's
/// disk outside its directory. Now each journal is kept and reported, nothing acted on.
#[test]
fn journals_tpl_did_not_write_are_reported_and_never_obeyed() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    let pid = dead_pid();
    let (v1, v2, v3, v4) = (
        victim(&s.dir, "v1.img"),
        victim(&s.dir, "v2.img"),
        victim(&s.dir, "v3.img"),
        victim(&s.dir, "v4.img"),
    );
    let elsewhere = s.dir.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();

    let clone = Entry::Clone {
        name: "c".into(),
        uuid: UNKNOWN.into(),
        uri: URI.into(),
    };
    let (d2, i2) = dev_ino(&v2);
    let cj = plant(
        "clone-journal",
        "tpl-clone",
        pid,
        &[
            json(&clone),
            json(&Entry::Tmp {
                uuid: UNKNOWN.into(),
                vol: Vol::File(v1.clone()),
                client: None,
            }),
            json(&Entry::Made {
                uuid: UNKNOWN.into(),
                vol: Vol::File(v2.clone()),
                id: Identity::Inode { dev: d2, ino: i2 },
                client: None,
            }),
        ],
    );
    let hidden = s.dir.join("v3-hidden.img");
    fs::rename(&v3, &hidden).unwrap();
    let (d3, i3) = dev_ino(&hidden);
    let rm = RmIntent {
        uri: URI.into(),
        uuid: UNKNOWN.into(),
        name: "gone".into(),
        volumes: vec![Doomed {
            role: Role::Disk {
                target: "vda".into(),
            },
            vol: Vol::File(v3.clone()),
            hidden: Some(hidden.clone()),
            id: Identity::Inode { dev: d3, ino: i3 },
            immutable: false,
            snapshot: None,
        }],
        template_uuid: None,
        reserved: None,
    };
    let rj = plant("remove-journal", "tpl-rm", pid, &[json(&rm)]);
    let (d4, i4) = dev_ino(&v4);
    let mv = |from: &Path, to: &Path, (dev, ino): (u64, u64)| Move {
        role: Role::Disk {
            target: "vda".into(),
        },
        from: Vol::File(from.to_path_buf()),
        to: Vol::File(to.to_path_buf()),
        id: Identity::Inode { dev, ino },
        absent: false,
    };
    let unknown = RenameIntent {
        uri: URI.into(),
        uuid: UNKNOWN.into(),
        old: "a".into(),
        new: "b".into(),
        moves: vec![mv(&elsewhere.join("v4.img"), &v4, (d4, i4))],
    };
    let nj1 = plant("rename-journal", "tpl-rename", pid, &[json(&unknown)]);
    // The guest's own disk, "renamed" from a place outside its directory: a roll-back
    // would move it there and point the definition at it.
    let outside = elsewhere.join("shadow");
    let existing = RenameIntent {
        uri: URI.into(),
        uuid: g.uuid.clone(),
        old: g.name.clone(),
        new: format!("{}-new", g.name),
        moves: vec![mv(&outside, &g.disk, dev_ino(&g.disk))],
    };
    let nj2 = plant(
        "rename-journal",
        "tpl-rename",
        pid + 100_000,
        &[json(&existing)],
    );

    let r = run("tpl-list", &["--templates"], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for v in [&v1, &v2, &hidden, &v4, &g.disk] {
        assert!(v.exists(), "{} is gone: {}", v.display(), r.stderr);
    }
    assert!(!outside.exists() && !elsewhere.join("v4.img").exists());
    assert_eq!(
        dom_xml(&g.name).disks()[0].path.as_deref(),
        Some(g.disk.as_path()),
        "the guest's disk was redefined"
    );
    for j in [&cj, &rj, &nj1, &nj2] {
        assert!(j.exists(), "journal {} removed", j.display());
    }
    let said = r.stderr.matches("nothing").count();
    assert!(said >= 4, "each journal is reported: {}", r.stderr);
    assert!(r.stderr.contains("leaves the directory"), "{}", r.stderr);
}

/// A journal line for [`plant`].
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

/// Row 2: under `umask 000` the tools made the state directories 0777 and journals and
/// lock files 0666, so any local user could plant a journal that root's next run obeys,
/// or hold a lock. Now directories are 0700 and files 0600 whatever the umask.
#[test]
fn state_is_private_whatever_the_umask() {
    let mut s = Scratch::new();
    let g = generalized_template(&mut s, "tpl");
    // The state directory as a default /var/lib/tpl is: 0755.
    fs::set_permissions(state_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let (t, _) = data_template(&mut s, "big", "2G", 512);
    // A full clone killed in its copy leaves its journal for the next run to read.
    let c = s.name("c");
    let (child, pid) = full_clone_through_sh("umask 000", &s.dir, &t, &c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait_with_output();
    let journals = journals_of(pid);
    assert_eq!(journals.len(), 1, "{journals:?}");
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&journals[0]), 0o600, "the journal");
    assert_eq!(mode(&journals_dir()), 0o700, "the journal directory");
    // A lock taken under umask 000.
    let r = pipeline(&format!("umask 000; tpl-lock '{}'", g.name));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let locks = state_dir().join("locks");
    assert_eq!(mode(&locks), 0o700, "the lock directory");
    let lock = locks.join(format!("{}.lock", g.uuid));
    assert_eq!(mode(&lock), 0o600, "the lock file");
    // Another user can neither take the lock nor plant a journal.
    let nobody = |script: &str| {
        Command::new("runuser")
            .args(["-u", "nobody", "--", "sh", "-c", script])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        !nobody(&format!("flock -n '{}' true", lock.display())),
        "another user took the domain's lock"
    );
    assert!(
        !nobody(&format!("touch '{}/x.journal'", journals_dir().display())),
        "another user wrote in the journal directory"
    );
    // The next run recovers the killed clone as ever.
    run("tpl-list", &[], None);
    assert!(journals_of(pid).is_empty());
}

/// Row 3: a user without XDG_STATE_HOME and HOME had the state directory /tmp/tpl, where
/// another user planted a journal, and that user's tpl-list deleted a file of the first
/// user's. Now such a user's state is under the home the user database gives
/// (~/.local/state/tpl), never a shared directory.
#[test]
fn a_user_without_home_never_reads_a_journal_in_tmp() {
    let _s = Scratch::new();
    let shared = Path::new("/tmp/tpl");
    let planted_dir = shared.join("clone-journal");
    fs::create_dir_all(&planted_dir).unwrap();
    fs::set_permissions(shared, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(&planted_dir, fs::Permissions::from_mode(0o777)).unwrap();
    // nobody's own file, which nobody may delete.
    let own = PathBuf::from(format!("/tmp/tpltest-{}-own", std::process::id()));
    fs::create_dir_all(&own).unwrap();
    let v = victim(&own, "thesis.txt");
    sh("chown", &["-R", "nobody", own.to_str().unwrap()]);
    let pid = dead_pid();
    let jpath = planted_dir.join(format!("tpl-clone-{pid}-0badf00d.journal"));
    let lines = [
        serde_json::json!({"op":"clone","name":"x","uuid":UNKNOWN,"uri":"test:///default"}),
        serde_json::json!({"op":"tmp","uuid":UNKNOWN,"path":v}),
    ];
    fs::write(
        &jpath,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    sh("chown", &["-R", "nobody", shared.to_str().unwrap()]);
    let out = Command::new("runuser")
        .args([
            "-u",
            "nobody",
            "--",
            "env",
            "-u",
            "HOME",
            "-u",
            "XDG_STATE_HOME",
        ])
        .args(["-u", "TPL_STATE_DIR"])
        .arg(bin("tpl-list"))
        .args(["-c", "test:///default", "--all"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let kept = v.exists();
    let _ = fs::remove_dir_all(&own);
    let _ = fs::remove_dir_all(shared);
    assert!(kept, "nobody's file was deleted through /tmp/tpl: {stderr}");
    assert!(!stderr.contains("thesis"), "{stderr}");
}

/// The lock file of a domain, made by a run of tpl-lock (which writes its name and pid
/// into it), and a `flock -o` holding it, once it does: flock itself holds the lock, not
/// the command it runs, so killing it lets go.
fn hold_lock(name: &str, uuid: &str) -> (PathBuf, std::process::Child) {
    run("tpl-lock", &["--dry-run", name], None).ok(1);
    let lock = state_dir().join(format!("locks/{uuid}.lock"));
    let holder = Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Command::new("flock")
        .args(["-n", p(&lock), "true"])
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "flock never took the lock");
    }
    (lock, holder)
}

/// Row 4: the waiter named the lock's holder from the file, so a user's `flock` on it was
/// blamed on a tpl tool long dead. Now the kernel's holder is named (/proc/locks), with
/// "not a tpl tool" for another program.
#[test]
fn the_waiter_names_the_real_holder_of_a_lock() {
    let mut s = Scratch::new();
    let g = generalized_template(&mut s, "tpl");
    let (lock, mut holder) = hold_lock(&g.name, &g.uuid);
    // A tpl tool held the lock once: its name and pid stay in the file.
    assert!(fs::read_to_string(&lock).unwrap().contains("tpl-lock (pid"));
    let r = run("tpl-lock", &["--wait", "1", &g.name], None);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let r = r
        .fails(3)
        .says(&[&format!("flock (pid {})", holder.id()), "not a tpl tool"]);
    assert!(!r.stderr.contains("tpl-lock (pid"), "{}", r.stderr);
}

/// Row 5: tpl-rm removed whatever a pipe named: an ordinary VM with its disk, every domain
/// of `tpl-list --all | grep`, the UUID's domain of a record whose name was another's, the
/// renamed domain of a record from before the rename. Now an ordinary VM is refused (exit
/// 3) unless --plain; a record that contradicts itself stops the run (exit 2) before
/// anything is removed; a domain named twice is removed once.
#[test]
fn tpl_rm_removes_templates_and_clones_and_nothing_a_pipe_gets_wrong() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let plain = s.guest("plain");
    let clone = |n: &str, extra: &[&str]| {
        let c = s.name(n);
        let mut a = vec![t.name.as_str(), c.as_str()];
        a.extend_from_slice(extra);
        run("tpl-clone", &a, None).ok(1).records.remove(0)
    };
    let rec = |name: &str, uuid: &str| format!("{{\"name\":\"{name}\",\"uuid\":\"{uuid}\"}}\n");

    // An ordinary VM, named by a record: refused, kept with its disk.
    let r = run(
        "tpl-rm",
        &[],
        Some(&format!("{{\"name\":\"{}\"}}\n", plain.name)),
    );
    r.fails(3)
        .says(&["neither a template nor a clone", "--plain"]);
    assert!(domain_exists(&plain.name) && plain.disk.exists());

    // A pipe of everything: the clones go, the ordinary VM stays.
    let (l1, f1) = (clone("l1", &[]), clone("f1", &["--full"]));
    let input = rec(&plain.name, &plain.uuid) + &rec(&l1.name, &l1.uuid) + &rec(&f1.name, &f1.uuid);
    run("tpl-rm", &[], Some(&input)).fails(3);
    assert!(!domain_exists(&l1.name) && !domain_exists(&f1.name));
    assert!(domain_exists(&plain.name) && plain.disk.exists());

    // A record whose UUID is one clone's and name another's: nothing removed.
    let (a, b) = (clone("a", &[]), clone("b", &[]));
    let input = rec(&b.name, &b.uuid) + &rec(&a.name, &b.uuid);
    run("tpl-rm", &[], Some(&input))
        .fails(2)
        .says(&["nothing removed", &format!("is domain '{}'", b.name)]);
    assert!(domain_exists(&a.name) && domain_exists(&b.name));

    // A record from before a rename names the renamed domain: refused, nothing removed.
    let renamed = s.name("a2");
    run("tpl-rename", &[&a.name, &renamed], None).ok(1);
    run("tpl-rm", &[], Some(&rec(&a.name, &a.uuid))).fails(2);
    assert!(domain_exists(&renamed));

    // Named twice: one removal, no error.
    let input = rec(&renamed, &a.uuid) + &rec(&renamed, &a.uuid) + &rec(&b.name, &b.uuid);
    run("tpl-rm", &[], Some(&input)).ok(0);
    assert!(!domain_exists(&renamed) && !domain_exists(&b.name));

    // Asked for explicitly, the ordinary VM goes with its disk.
    run("tpl-rm", &["--plain", &plain.name], None).ok(0);
    assert!(!domain_exists(&plain.name) && !plain.disk.exists());
}

/// Row 6: `tpl-list --all` printed fewer records than domains: a full clone of a domain
/// that is not a template was listed only in its source's `clones`. Now every domain asked
/// for is listed once, and such a clone stands under its source.
#[test]
fn tpl_list_all_lists_every_domain_once() {
    let mut s = Scratch::new();
    let plain = s.guest("plain");
    let f = s.name("f");
    run("tpl-clone", &[&plain.name, &f, "--full", "--force"], None).ok(1);
    let t = locked_template(&mut s, "tpl");
    let l = s.name("l");
    run("tpl-clone", &[&t.name, &l], None).ok(1);
    let r = run("tpl-list", &["--all", "--json"], None);
    let mine: Vec<&Record> = r
        .records
        .iter()
        .filter(|x| x.name.starts_with(&s.prefix))
        .collect();
    let names: Vec<&str> = mine.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(mine.len(), 4, "{names:?}");
    for n in [&plain.name, &f, &t.name, &l] {
        assert_eq!(
            names.iter().filter(|x| **x == n.as_str()).count(),
            1,
            "{n}: {names:?}"
        );
    }
    // No domain of the connection twice (other tests' domains come and go meanwhile).
    let mut uuids: Vec<&str> = r.records.iter().map(|x| x.uuid.as_str()).collect();
    uuids.sort_unstable();
    let n = uuids.len();
    uuids.dedup();
    assert_eq!(uuids.len(), n, "a domain listed twice");
    // Without --all, the clone of the ordinary VM still shows (its source does not).
    let r = run("tpl-list", &["--json"], None);
    assert!(r.records.iter().any(|x| x.name == f));
    assert!(!r.records.iter().any(|x| x.name == plain.name));
}

/// Row 7: a template removed while tpl-clone waited for its lock gave "cannot read state
/// of domain … (libvirt reported unknown state 4294967295)". Now it says the domain is
/// gone (exit 2, like any domain that is not there).
#[test]
fn a_template_removed_while_a_tool_waits_is_gone() {
    let mut s = Scratch::new();
    let t = locked_template(&mut s, "tpl");
    let (_, mut holder) = hold_lock(&t.name, &t.uuid);
    let mut c = tool_command("tpl-clone")
        .args([&t.name, &s.name("c"), "--wait", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(c.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.contains("is busy"), "{first}");
    virsh(&["undefine", &t.name]);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = c.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{first}{rest}");
    assert!(rest.contains("is gone"), "{rest}");
    assert!(!rest.contains("unknown state"), "{rest}");
}

/// Row 8: as a user other than root the tools connected to qemu:///system (virsh connects
/// to qemu:///session), and the error blamed a libvirtd that runs. Now they connect where
/// virsh does, and say so.
#[test]
fn a_user_other_than_root_gets_virshs_default_connection() {
    let _s = Scratch::new();
    let home = PathBuf::from(format!("/tmp/tpltest-{}-home", std::process::id()));
    fs::create_dir_all(&home).unwrap();
    sh("chown", &["nobody", home.to_str().unwrap()]);
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "env", "-u", "LIBVIRT_DEFAULT_URI"])
        .arg(format!("HOME={}", home.display()))
        // no session daemon started on demand: the test looks at where it connects
        .arg("LIBVIRT_AUTOSTART=0")
        .arg(bin("tpl-list"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&home);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'qemu:///session'"), "{stderr}");
    assert!(!stderr.contains("qemu:///system"), "{stderr}");
    let mut help = tool_command("tpl-list");
    let help = help.arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("qemu:///session"), "{help}");
}

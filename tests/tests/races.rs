//! One writer per template (issue 10), tried as make -j, cron and two admins would: the
//! tools racing each other on one template, a `tpl-rename --disks` killed at random
//! points and at the step right after its file moves, a clone made elsewhere and then
//! forgotten by libvirt, files shared between domains, a template on a writable base,
//! and who owns the template's image after a linked clone ran. Every random choice prints
//! its seed; `TPL_FAULT_SEED=N` replays a run.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tpl_tests::*;

/// A generalized guest locked by the real tpl-lock.
fn locked_by_tpl_lock(s: &mut Scratch, tag: &str) -> Guest {
    let g = s.guest(tag);
    mark_generalized(&g.name);
    run("tpl-lock", &[&g.name], None).ok(1);
    g
}

/// Wait for a spawned tool: (exit code, stderr).
fn finish(c: Child) -> (i32, String) {
    let out = c.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A domain's first disk path, from libvirt.
fn disk_of(name: &str) -> PathBuf {
    let x = tpl_common::domxml::DomainXml::parse(&virsh(&["dumpxml", "--inactive", name])).unwrap();
    x.disks()[0].path.clone().unwrap()
}

/// Undefine a clone and remove its overlay.
fn remove_clone(name: &str) {
    if domain_exists(name) {
        let disk = disk_of(name);
        remove_domain(name);
        let _ = fs::remove_file(disk);
    }
}

/// The rename journals a run of `pid` left.
fn rename_journals(pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(state_dir().join("rename-journal")) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("tpl-rename-{pid}-"))
        })
        .collect()
}

/// The first row: a linked clone racing an unlock of its template, 30 trials at
/// random offsets. Never both: either the clone exists on a template that is still locked
/// and read-only (the unlock was refused), or the template is unlocked and no clone was
/// made (the clone was refused).
#[test]
fn a_linked_clone_racing_an_unlock_never_leaves_a_clone_on_a_writable_template() {
    let mut s = Scratch::new();
    let t = locked_by_tpl_lock(&mut s, "tpl");
    let mut rng = Rng::seeded("clone vs unlock");
    let (mut clone_won, mut unlock_won) = (0, 0);
    for trial in 0..30 {
        let c = s.name(&format!("c{trial}"));
        let offset = Duration::from_millis(rng.range(0, 80));
        let clone_first = rng.next_u64() % 2 == 0;
        let (clone, unlock) = if clone_first {
            let c1 = spawn_tool("tpl-clone", &[&t.name, &c, "--linked", "--no-identity"]);
            std::thread::sleep(offset);
            (c1, spawn_tool("tpl-lock", &["--unlock", &t.name]))
        } else {
            let u = spawn_tool("tpl-lock", &["--unlock", &t.name]);
            std::thread::sleep(offset);
            (
                spawn_tool("tpl-clone", &[&t.name, &c, "--linked", "--no-identity"]),
                u,
            )
        };
        let (cc, cerr) = finish(clone);
        let (uc, uerr) = finish(unlock);
        let made = domain_exists(&c);
        let locked = read_meta(&t.name).template.locked;
        let writable = mode(&t.disk) & 0o222 != 0;
        let what = format!(
            "trial {trial} (offset {offset:?}, clone first {clone_first}): clone exit {cc} \
             ({cerr}), unlock exit {uc} ({uerr})"
        );
        assert!(!(cc == 0 && uc == 0), "both succeeded: {what}");
        if made {
            assert_eq!(cc, 0, "{what}");
            assert!(
                locked && !writable,
                "a linked clone on an unlocked template: {what}"
            );
            assert_eq!(uc, 3, "{what}");
            assert!(uerr.contains(&c), "the refusal names the clone: {what}");
            clone_won += 1;
        } else {
            assert_eq!(uc, 0, "{what}");
            assert!(!locked && writable, "{what}");
            assert_eq!(cc, 3, "{what}");
            assert!(cerr.contains("needs a locked template"), "{what}");
            unlock_won += 1;
        }
        remove_clone(&c);
        if !locked {
            run("tpl-lock", &[&t.name], None).ok(1);
        }
    }
    eprintln!("clone vs unlock: 30 trials, the clone won {clone_won}, the unlock {unlock_won}");
    // A template that linked clones stand on is never generalized (nor unlocked) without
    // --force: after an unlock forced past one, generalize refuses before virt-sysprep.
    let c = s.name("kept");
    run(
        "tpl-clone",
        &[&t.name, &c, "--linked", "--no-identity"],
        None,
    )
    .ok(1);
    run("tpl-lock", &["--unlock", "--force", &t.name], None).ok(1);
    let before = sha256(&t.disk);
    run("tpl-generalize", &[&t.name], None).fails(3).says(&[
        "1 linked clone depends on its images",
        &c,
        "--force",
    ]);
    assert_eq!(
        sha256(&t.disk),
        before,
        "the template's image was not touched"
    );
}

/// The second row: a batch of 5 linked clones racing `tpl-rename --disks` of their
/// template, 15 trials. Whatever wins, every clone stands on the template's image as it
/// is now (its backing file exists, and is the template's current disk), and the
/// template's files are under one name only.
#[test]
fn a_batch_racing_a_rename_with_disks_never_leaves_clones_on_a_missing_file() {
    let mut s = Scratch::new();
    let t = locked_by_tpl_lock(&mut s, "tpl");
    let renamed = s.name("tpl2");
    let mut rng = Rng::seeded("clone batch vs rename --disks");
    let (mut clones_first, mut rename_first) = (0, 0);
    for trial in 0..15 {
        let prefix = format!("{}-b{trial}-", s.prefix);
        let offset = Duration::from_millis(rng.range(0, 60));
        let rename_starts = rng.next_u64() % 2 == 0;
        let batch = [
            t.uuid.as_str(),
            "--count",
            "5",
            "--prefix",
            prefix.as_str(),
            "--linked",
            "--no-identity",
        ];
        let rename_args = ["--disks", t.uuid.as_str(), renamed.as_str()];
        let (clone, rename) = if rename_starts {
            let r = spawn_tool("tpl-rename", &rename_args);
            std::thread::sleep(offset);
            (spawn_tool("tpl-clone", &batch), r)
        } else {
            let c = spawn_tool("tpl-clone", &batch);
            std::thread::sleep(offset);
            (c, spawn_tool("tpl-rename", &rename_args))
        };
        let (cc, cerr) = finish(clone);
        let (rc, rerr) = finish(rename);
        let what = format!(
            "trial {trial} (offset {offset:?}, rename started first {rename_starts}): clone exit \
             {cc} ({cerr}), rename exit {rc} ({rerr})"
        );
        let name_now = virsh(&["domname", &t.uuid]).trim().to_string();
        let tdisk = disk_of(&t.uuid);
        assert!(tdisk.exists(), "the template's disk is missing: {what}");
        let old_disk = s.dir.join(format!("{}.qcow2", t.name));
        let new_disk = s.dir.join(format!("{renamed}.qcow2"));
        if name_now == renamed {
            assert_eq!(tdisk, new_disk, "{what}");
            assert!(!old_disk.exists(), "files under the old name too: {what}");
        } else {
            assert_eq!(name_now, t.name, "{what}");
            assert_eq!(tdisk, old_disk, "{what}");
            assert!(!new_disk.exists(), "files under the new name too: {what}");
        }
        let clones: Vec<String> = (1..=5).map(|i| format!("{prefix}{i}")).collect();
        let made: Vec<&String> = clones.iter().filter(|c| domain_exists(c)).collect();
        for c in &made {
            let chain = tpl_common::image::backing_chain(&disk_of(c)).unwrap();
            assert_eq!(chain[0].path, tdisk, "{c} stands on another file: {what}");
            assert!(chain[0].path.exists(), "{c}'s backing file is gone: {what}");
        }
        match (cc, rc) {
            // The batch first: the rename is refused while its images are in use.
            (0, 3) => {
                assert_eq!(made.len(), 5, "{what}");
                assert_eq!(name_now, t.name, "{what}");
                assert!(rerr.contains("in use"), "{what}");
                clones_first += 1;
            }
            // The rename first: the batch, waiting for the lock, clones the renamed
            // template from its new files.
            (0, 0) => {
                assert_eq!(made.len(), 5, "{what}");
                assert_eq!(name_now, renamed, "{what}");
                rename_first += 1;
            }
            _ => panic!("unexpected outcome: {what}"),
        }
        for c in &clones {
            remove_clone(c);
        }
        if name_now == renamed {
            run("tpl-rename", &["--disks", &renamed, &t.name], None).ok(1);
        }
    }
    eprintln!(
        "clone batch vs rename --disks: 15 trials, the batch first {clones_first}, the rename first {rename_first}"
    );
}

/// What a killed rename must leave once the next tool has run: the domain whole under
/// its old name or its new one (every file it names exists, none is left under the other
/// name) and no journal.
fn assert_whole(uuid: &str, old: &str, new: &str, dir: &Path, pid: u32, what: &str) -> bool {
    let name = virsh(&["domname", uuid]).trim().to_string();
    let (now, other) = if name == new {
        (new, old)
    } else {
        assert_eq!(name, old, "{what}");
        (old, new)
    };
    let x = tpl_common::domxml::DomainXml::parse(&virsh(&["dumpxml", "--inactive", uuid])).unwrap();
    let disk = x.disks()[0].path.clone().unwrap();
    let nvram = x.nvram().unwrap();
    assert_eq!(disk, dir.join(format!("{now}.qcow2")), "{what}");
    assert_eq!(nvram, dir.join(format!("{now}_VARS.fd")), "{what}");
    assert!(
        disk.exists() && nvram.exists(),
        "a file it names is missing: {what}"
    );
    for f in [format!("{other}.qcow2"), format!("{other}_VARS.fd")] {
        assert!(
            !dir.join(&f).exists(),
            "{f} left under the other name: {what}"
        );
    }
    assert!(rename_journals(pid).is_empty(), "journal left: {what}");
    name == new
}

/// A domain with a disk and an NVRAM file in the scratch directory.
fn domain_with_nvram(s: &mut Scratch, tag: &str) -> Guest {
    let name = s.name(tag);
    let disk = s.disk(&format!("{name}.qcow2"));
    let console = s.dir.join(format!("{tag}.console.log"));
    let loader = s.dir.join("loader.fd");
    let nvram = s.dir.join(format!("{name}_VARS.fd"));
    fs::write(&loader, vec![0u8; 64 * 1024]).unwrap();
    fs::write(&nvram, vec![1u8; 64 * 1024]).unwrap();
    let xml = guest_xml(&name, &disk, &console, "").replacen(
        "<kernel>",
        &format!(
            "<loader readonly='yes' type='pflash'>{}</loader><nvram>{}</nvram><kernel>",
            loader.display(),
            nvram.display()
        ),
        1,
    );
    let uuid = s.define(&xml);
    Guest {
        name,
        uuid,
        disk,
        console,
    }
}

/// `tpl-rename --disks` under strace, its file renames and syncs slowed down so that a
/// kill lands inside the change; returns strace's child and the pid of tpl-rename itself.
/// tpl-rename's stderr goes to `log`.
// The child is the caller's to wait for once it has been killed.
#[allow(clippy::zombie_processes)]
fn spawn_slowed_rename(args: &[&str], inject: &[&str], log: &Path) -> (Child, u32) {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-o", "/dev/null"]);
    for i in inject {
        c.args(["-e", i]);
    }
    c.arg("--").arg(bin("tpl-rename")).args(args);
    test_env(&mut c)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap());
    let mut child = c.spawn().expect("strace (make deps installs it)");
    // The tool's own pid: the process running tpl-rename with exactly these arguments
    // (strace's children list can show a short-lived helper of its own first).
    let want: Vec<String> = std::iter::once(bin("tpl-rename").display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<String> = cmd
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if argv == want {
                return (child, pid);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("strace never started tpl-rename");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The third row: `tpl-rename --disks` killed with -9 at random points (its renames and
/// syncs slowed by strace so the kills spread over the whole change), then any other tool
/// run: the domain is whole under one of its two names every time.
#[test]
fn a_rename_with_disks_killed_at_random_points_heals_on_the_next_run() {
    let mut s = Scratch::new();
    let g = domain_with_nvram(&mut s, "vm");
    let other = s.name("vm2");
    let mut rng = Rng::seeded("kill -9 of rename --disks");
    let (mut done, mut undone) = (0, 0);
    for trial in 0..25 {
        let (old, new) = match virsh(&["domname", &g.uuid]).trim() {
            n if n == g.name => (g.name.clone(), other.clone()),
            _ => (other.clone(), g.name.clone()),
        };
        let (mut st, pid) = spawn_slowed_rename(
            &["--disks", &g.uuid, &new],
            &[
                "inject=renameat2:delay_enter=40ms",
                "inject=fsync:delay_enter=40ms",
            ],
            &s.dir.join("rename.log"),
        );
        let after = Duration::from_millis(rng.range(0, 400));
        std::thread::sleep(after);
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = st.wait();
        // Any tool that touches the domain finishes or undoes the rename first.
        let r = run("tpl-lock", &["--dry-run", "--force", &g.uuid], None);
        let what = format!("trial {trial}, kill after {after:?}: {}", r.stderr);
        assert_eq!(r.code, 0, "{what}");
        if assert_whole(&g.uuid, &old, &new, &s.dir, pid, &what) {
            done += 1;
        } else {
            undone += 1;
        }
    }
    eprintln!(
        "kill -9 of rename --disks: 25 trials, {done} ended renamed, {undone} under the old name"
    );
}

/// The third row again, at the exact step: killed right after its files moved (their
/// directory's sync held for seconds), before the definition names them. The next run of
/// tpl-rename itself rolls it back and says so, then renames as asked.
#[test]
fn a_rename_killed_right_after_its_file_moves_is_rolled_back_and_said() {
    let mut s = Scratch::new();
    let g = domain_with_nvram(&mut s, "vm");
    let new = s.name("vm2");
    let new_disk = s.dir.join(format!("{new}.qcow2"));
    let (old_nvram, new_nvram) = (
        s.dir.join(format!("{}_VARS.fd", g.name)),
        s.dir.join(format!("{new}_VARS.fd")),
    );
    // Every directory sync takes 5 s: the one of the journal's directory first, then the
    // one right after the moves, during which the kill comes. (Counting syncs would not
    // do: the tool may first finish a rename another killed run left.)
    let log = s.dir.join("rename.log");
    let (mut st, pid) = spawn_slowed_rename(
        &["--disks", &g.name, &new],
        &["inject=fsync:delay_enter=5s"],
        &log,
    );
    let moved =
        || new_disk.exists() && new_nvram.exists() && !g.disk.exists() && !old_nvram.exists();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !moved() {
        assert!(Instant::now() < deadline, "the files never moved");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The files are under the new name; libvirt still has the old name and paths.
    assert_eq!(virsh(&["domname", &g.uuid]).trim(), g.name);
    assert_eq!(disk_of(&g.uuid), g.disk);
    let killed = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let status = st.wait().unwrap();
    assert!(
        killed.is_ok(),
        "tpl-rename had ended ({status}, {killed:?}): {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!rename_journals(pid).is_empty(), "kill -9 cannot clean up");
    let r = run("tpl-rename", &["--disks", &g.name, &new], None).ok(1);
    // Any tool that connects while the domain's lock is free rolls it back, and the other
    // tests of this file run tools all the time: whoever did, said so on its stderr.
    if r.stderr.contains("rolled back the rename") {
        r.says(&[&format!(
            "rolled back the rename of domain '{}' to '{new}' (tpl-rename, pid {pid}, was killed)",
            g.name
        )]);
    } else {
        eprintln!("another test's tool rolled back the killed rename first");
    }
    assert!(assert_whole(
        &g.uuid,
        &g.name,
        &new,
        &s.dir,
        pid,
        "after the next run"
    ));
}

/// The fourth row: a linked clone made in another directory and then undefined with
/// virsh (its image kept) still holds the template: unlock refuses, naming the overlay
/// tpl-clone registered, and says where it looked.
#[test]
fn unlock_finds_a_clone_made_elsewhere_after_libvirt_forgot_it() {
    let mut s = Scratch::new();
    let t = locked_by_tpl_lock(&mut s, "tpl");
    // Outside the template's directory and outside every storage pool.
    let other = PathBuf::from(format!("/var/tmp/{}-other", s.prefix));
    fs::create_dir_all(&other).unwrap();
    let c = s.name("far");
    run(
        "tpl-clone",
        &[&t.name, &c, "--dir", p(&other), "--no-identity"],
        None,
    )
    .ok(1);
    let overlay = other.join(format!("{c}.qcow2"));
    assert!(overlay.exists());
    virsh(&["undefine", &c]);
    let r = run("tpl-lock", &["--unlock", &t.name], None)
        .fails(3)
        .says(&[p(&overlay), "registered by tpl-clone", "looked at"]);
    assert_eq!(mode(&t.disk) & 0o222, 0, "still read-only: {}", r.stderr);
    assert!(read_meta(&t.name).template.locked);
    fs::remove_file(&overlay).unwrap();
    run("tpl-lock", &["--unlock", &t.name], None).ok(1);
    assert!(
        read_meta(&t.name).overlays.is_empty(),
        "the stale registration is dropped"
    );
    fs::remove_dir_all(&other).unwrap();
}

/// The fifth row: two domains naming one NVRAM file. Neither renaming the files of one
/// nor locking it touches the file the other uses: both are refused, naming the other.
#[test]
fn a_file_two_domains_use_is_neither_renamed_nor_locked() {
    let mut s = Scratch::new();
    let a = domain_with_nvram(&mut s, "a");
    let nvram = s.dir.join(format!("{}_VARS.fd", a.name));
    let b = s.name("b");
    let bdisk = s.disk(&format!("{b}.qcow2"));
    let xml = guest_xml(&b, &bdisk, &s.dir.join("b.console.log"), "").replacen(
        "<kernel>",
        &format!(
            "<loader readonly='yes' type='pflash'>{}</loader><nvram>{}</nvram><kernel>",
            s.dir.join("loader.fd").display(),
            nvram.display()
        ),
        1,
    );
    s.define(&xml);
    mark_generalized(&a.name);
    let before = (mode(&nvram), sha256(&nvram));
    run("tpl-rename", &["--disks", &a.name, &s.name("a2")], None)
        .fails(3)
        .says(&["NVRAM", &format!("domain '{b}'")]);
    assert!(nvram.exists() && domain_exists(&a.name));
    run("tpl-lock", &[&a.name], None)
        .fails(3)
        .says(&["NVRAM", &format!("domain '{b}'")]);
    assert_eq!((mode(&nvram), sha256(&nvram)), before);
    assert_eq!(mode(&a.disk) & 0o222, 0o200, "nothing of A changed either");
    // A disk image two domains use, likewise, and a clone would copy it as its own.
    let c = s.name("c");
    let xml = guest_xml(&c, &a.disk, &s.dir.join("c.console.log"), "");
    s.define(&xml);
    run("tpl-clone", &[&a.name, &s.name("x"), "--full"], None)
        .fails(3)
        .says(&[&format!("domain '{c}'")]);
}

/// The sixth row: a template whose disk is an overlay on a writable base is refused (the
/// base would stay changeable under every linked clone), saying how to flatten it; on a
/// read-only base (another locked template's image) it locks, and its linked clones name
/// the whole chain.
#[test]
fn a_template_on_a_writable_base_is_refused_and_on_a_read_only_one_locks() {
    let mut s = Scratch::new();
    let base = s.disk("base.qcow2");
    let name = s.name("top");
    let top = s.dir.join(format!("{name}.qcow2"));
    qemu_img_overlay(&base, "qcow2", &top);
    s.define(&guest_xml(&name, &top, &s.dir.join("top.console.log"), ""));
    mark_generalized(&name);
    run("tpl-lock", &[&name], None).fails(3).says(&[
        p(&base),
        "which is writable",
        "qemu-img rebase",
    ]);
    assert_eq!(mode(&top) & 0o222, 0o200, "nothing changed");
    assert!(!read_meta(&name).template.locked);
    fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    run("tpl-lock", &[&name], None).ok(1);
    let c = s.name("c");
    run("tpl-clone", &[&name, &c, "--no-identity"], None).ok(1);
    let xml = virsh(&["dumpxml", "--inactive", &c]);
    let flat: String = xml.split_whitespace().collect();
    for f in [&top, &base] {
        assert!(
            flat.contains(&format!(
                "<sourcefile='{}'><seclabelmodel='dac'relabel='no'/>",
                f.display()
            )),
            "{xml}"
        );
    }
}

/// The seventh row: after a linked clone has run, libvirt's qemu user still cannot write
/// the template's image (it never became its owner), and a template image that such a
/// user owns (a clone made before, without tpl's backing chain) is given back to root by
/// locking again.
#[test]
fn after_a_linked_clone_ran_the_qemu_user_cannot_write_the_template() {
    let mut s = Scratch::new();
    let t = locked_by_tpl_lock(&mut s, "tpl");
    let c = s.name("c");
    run("tpl-clone", &[&t.name, &c], None).ok(1);
    boot_until_off(std::slice::from_ref(&c), Duration::from_secs(150));
    let console = fs::read_to_string(console_path(&c)).unwrap();
    assert!(console.contains("TPL-BOOT done"), "{console}");
    let m = fs::metadata(&t.disk).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o222),
        (0, 0),
        "owned by root, read-only"
    );
    let try_write = |path: &Path| {
        Command::new("runuser")
            .args(["-u", "libvirt-qemu", "--", "sh", "-c"])
            .arg(format!(
                "chmod u+w '{0}' 2>/dev/null; exec 3>>'{0}'",
                path.display()
            ))
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        !try_write(&t.disk),
        "libvirt-qemu could open the template for writing"
    );
    assert_eq!(mode(&t.disk) & 0o222, 0);
    // As libvirt leaves it when a clone without the explicit chain has run.
    sh("chown", &["libvirt-qemu:libvirt-qemu", p(&t.disk)]);
    run("tpl-lock", &[&t.name], None).ok(1).says(&["owner uid"]);
    assert_eq!(fs::metadata(&t.disk).unwrap().uid(), 0);
    assert!(!try_write(&t.disk));
}

/// A tool that finds a domain busy waits for the holder, saying who it is, and gives up
/// with exit 3 after --wait; a script holding the lock passes it on with TPL_HELD_LOCKS.
#[test]
fn a_busy_domain_is_waited_for_and_a_held_lock_is_shared() {
    let mut s = Scratch::new();
    let g = s.guest("vm");
    mark_generalized(&g.name);
    let locks = state_dir().join("locks");
    fs::create_dir_all(&locks).unwrap();
    let lockfile = p(&locks.join(format!("{}.lock", g.uuid))).to_string();
    // Another holder for 3 s: flock(1), named as the kernel knows it.
    let mut holder = Command::new("flock")
        .args([&lockfile, "sleep", "3"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let free = || {
        Command::new("flock")
            .args(["-n", &lockfile, "true"])
            .status()
            .unwrap()
            .success()
    };
    while free() {
        assert!(Instant::now() < deadline, "flock never took the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    run("tpl-lock", &["--wait", "1", &g.name], None)
        .fails(3)
        .says(&["busy", "flock (pid", "which is not a tpl tool", "--wait"]);
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(mode(&g.disk) & 0o222, 0o200, "nothing changed");
    // With the default bound it waits, says so, and goes on once the holder is done.
    run("tpl-lock", &[&g.name], None)
        .ok(1)
        .says(&["is busy", "waiting up to 300 s"]);
    holder.wait().unwrap();
    // A script that holds the lock runs a tool under it without waiting for itself.
    let script = format!(
        "exec 8>>'{lockfile}' && flock 8 && TPL_HELD_LOCKS=8 tpl-lock --unlock --wait 0 '{}'",
        g.name
    );
    let r = pipeline(&script);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!read_meta(&g.name).template.locked);
}

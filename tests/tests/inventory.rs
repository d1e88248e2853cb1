//! tpl-list and tpl-rm on the real libvirtd: the inventory (a tree on a terminal, records in a pipe, orphans with exit 1, --templates, --clones-of, --all, versions), removals of clones and templates (files, NVRAM, registrations, refusals, --with-clones, --force, --dry-run, records on stdin), kill -9 at random points of removals (seeded, strace widening the windows), and removals racing linked clones of the same template.
//!
//! Every test lists the whole connection, which other tests share: assertions look only
//! at this test's domains (named after its Scratch), and an exit status is asserted
//! only where this test's own state decides it.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tpl_tests::*;

const LIST: &str = "tpl-list";
const RM: &str = "tpl-rm";

/// A small deterministic generator (xorshift64*), seeded from TPL_FAULT_SEED when set, so
/// that a failing run can be replayed from the seed it prints (as in faults.rs).
struct Rng(u64);

impl Rng {
    fn seeded(what: &str) -> Rng {
        let seed = std::env::var("TPL_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: seed {seed} (replay with TPL_FAULT_SEED={seed})");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A guest made a locked template by the real tpl-lock (after the rig marks it
/// generalized, as tpl-generalize would), with `extra` options (`--immutable`).
fn locked(s: &mut Scratch, tag: &str, extra: &[&str]) -> Guest {
    let g = s.guest(tag);
    mark_generalized(&g.name);
    let mut args = vec![g.name.as_str()];
    args.extend_from_slice(extra);
    run("tpl-lock", &args, None).ok(1);
    g
}

/// A locked template that also has an NVRAM file (and a dummy firmware: it is never
/// started), so that its clones get NVRAM copies. Its NVRAM path.
fn locked_with_nvram(s: &mut Scratch, tag: &str, extra: &[&str]) -> (Guest, PathBuf) {
    let name = s.name(tag);
    let disk = s.disk(&format!("{name}.qcow2"));
    let console = s.dir.join(format!("{name}.console.log"));
    let loader = s.dir.join("loader.fd");
    let nvram = s.dir.join(format!("{name}_VARS.fd"));
    fs::write(&loader, vec![0u8; 64 * 1024]).unwrap();
    fs::write(&nvram, vec![0x5au8; 64 * 1024]).unwrap();
    let xml = guest_xml(&name, &disk, &console, "").replacen(
        "<kernel>",
        &format!(
            "<loader readonly='yes' type='pflash'>{}</loader>\n    <nvram>{}</nvram>\n    <kernel>",
            loader.display(),
            nvram.display()
        ),
        1,
    );
    let uuid = s.define(&xml);
    mark_generalized(&name);
    let mut args = vec![name.as_str()];
    args.extend_from_slice(extra);
    run("tpl-lock", &args, None).ok(1);
    (
        Guest {
            name,
            uuid,
            disk,
            console,
        },
        nvram,
    )
}

/// The JSON records of a run, each as a value (with the inventory's fields).
fn values(r: &Run) -> Vec<Value> {
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The records of this test's domains, in the order printed.
fn ours(r: &Run, prefix: &str) -> Vec<Value> {
    values(r)
        .into_iter()
        .filter(|v| v["name"].as_str().unwrap().starts_with(prefix))
        .collect()
}

fn named<'a>(v: &'a [Value], name: &str) -> &'a Value {
    v.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no record of {name} among {v:#?}"))
}

fn names(v: &[Value]) -> Vec<&str> {
    v.iter().map(|r| r["name"].as_str().unwrap()).collect()
}

/// The SHA-256 of a file, from sha256sum.
fn digest(p: &Path) -> String {
    sh("sha256sum", &[p.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The names in a directory.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn blocks(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().blocks() * 512
}

/// Run tpl-list with stdout on a new pseudo-terminal (a person at it), stderr piped:
/// (exit code, what the terminal showed, stderr).
fn list_on_terminal(args: &[&str]) -> (i32, String, String) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use std::os::fd::AsRawFd;
    let pty = nix::pty::openpty(None, None).unwrap();
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    }
    let child = tool_command(LIST)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(pty.slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut master = fs::File::from(pty.master);
    let mut shown = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => shown.extend_from_slice(&buf[..n]),
            // Every writer closed the terminal: the run is over.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the terminal: {e}"),
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(shown).unwrap().replace("\r\n", "\n"),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Files in `dir` under a tpl-rm hidden name (`.FILE.tpl-rm-RANDOM`).
fn hidden_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tpl-rm-"))
        .collect()
}

fn lock_file(uuid: &str) -> PathBuf {
    // the tools' state directory is this test's own (the rig's TPL_STATE_DIR), not the
    // one tpl_common would resolve in this process
    state_dir().join("locks").join(format!("{uuid}.lock"))
}

/// tpl-rm's journals of the run with this pid.
fn rm_journals(pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(state_dir().join("remove-journal")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("tpl-rm-{pid}-"))
        })
        .map(|e| e.path())
        .collect()
}

fn immutable(p: &Path) -> bool {
    let f = fs::File::open(p).unwrap();
    tpl_common::fsutil::is_immutable(&f).unwrap_or(false)
}

/// A directory outside the test's own, removed (with what is in it) on drop.
struct Elsewhere(PathBuf);

impl Drop for Elsewhere {
    fn drop(&mut self) {
        force_remove_dir(&self.0);
    }
}

#[test]
fn inventory_tree_records_orphans_and_filters() {
    let mut s = Scratch::new();
    let elsewhere = Elsewhere(PathBuf::from(format!("{}-elsewhere", s.dir.display())));
    fs::create_dir_all(&elsewhere.0).unwrap();
    let t = locked(&mut s, "tpl", &[]);
    let (c1, c2, c3, f1) = (s.name("c1"), s.name("c2"), s.name("c3"), s.name("f1"));
    run("tpl-clone", &[&t.name, &c1, &c3, "--linked"], None).ok(2);
    run(
        "tpl-clone",
        &[&t.name, &c2, "--linked", "--dir", p(&elsewhere.0)],
        None,
    )
    .ok(1);
    run("tpl-clone", &[&t.name, &f1, "--full"], None).ok(1);
    let plain = s.guest("plain");
    // An orphan: a clone undefined the way virsh does it, keeping its disk.
    let c3_disk = s.dir.join(format!("{c3}.qcow2"));
    virsh(&["undefine", &c3]);
    assert!(c3_disk.exists());
    // tpl-refresh's versions: the stable name titled with its version, and an older one.
    let older = locked(&mut s, "tpl-20200101-000000", &[]);
    virsh(&[
        "desc",
        &older.name,
        "--config",
        "--title",
        "--new-desc",
        &older.name,
    ]);
    let current = format!("{}-20240101-000000", t.name);
    virsh(&[
        "desc",
        &t.name,
        "--config",
        "--title",
        "--new-desc",
        &current,
    ]);

    // Records in a pipe: exit 1 because of the orphan, which stderr names.
    let r = run(LIST, &[], None).fails(1).says(&[
        "orphaned overlay",
        p(&c3_disk),
        &format!("for clone '{c3}'"),
    ]);
    let recs = ours(&r, &s.prefix);
    // The tree's order: the template, its clones, then its older version.
    assert_eq!(
        names(&recs),
        [&*t.name, &c1, &c2, &f1, &older.name],
        "no plain domain without --all"
    );
    let tr = named(&recs, &t.name);
    assert_eq!(tr["role"], "template");
    assert_eq!(tr["uuid"], t.uuid.as_str());
    assert!(tr["template"]["locked"].as_bool().unwrap());
    assert_eq!(tr["allocated"], blocks(&t.disk));
    assert_eq!(tr["version"], current.as_str());
    assert_eq!(tr["version_of"], Value::Null);
    let versions: Vec<(&str, bool)> = tr["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["current"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        versions,
        [(t.name.as_str(), true), (older.name.as_str(), false)]
    );
    let clones: Vec<(&str, &str)> = tr["clones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        clones,
        [
            (c1.as_str(), "linked"),
            (c2.as_str(), "linked"),
            (f1.as_str(), "full")
        ]
    );
    // What would break without it: the linked clones and the orphaned overlay.
    let deps = tr["dependents"].as_array().unwrap();
    let dep = |kind: &str, key: &str, val: &str| {
        deps.iter()
            .find(|d| d["kind"] == kind && d[key] == val)
            .unwrap_or_else(|| panic!("no {kind} {val} among {deps:#?}"))
    };
    dep("domain", "name", &c1);
    dep("domain", "name", &c2);
    let orphan = dep("overlay", "path", p(&c3_disk));
    assert_eq!(orphan["registered"], true);
    assert_eq!(orphan["clone_name"], c3.as_str());
    assert_eq!(deps.len(), 3, "{deps:#?}");
    let c2_disk = elsewhere.0.join(format!("{c2}.qcow2"));
    let linked = blocks(&s.dir.join(format!("{c1}.qcow2"))) + blocks(&c2_disk) + blocks(&c3_disk);
    assert_eq!(tr["linked_allocated"], linked);

    let r1 = named(&recs, &c1);
    assert_eq!(r1["role"], "clone");
    assert_eq!(r1["state"], "shut off");
    assert_eq!(r1["stands_on"]["name"], t.name.as_str());
    assert_eq!(r1["clone"]["mode"], "linked");
    assert_eq!(r1["allocated"], blocks(&s.dir.join(format!("{c1}.qcow2"))));
    assert_eq!(r1["problems"], serde_json::json!([]));
    let r2 = named(&recs, &c2);
    assert_eq!(r2["disks"][0]["path"], p(&c2_disk));
    assert_eq!(r2["stands_on"]["uuid"], t.uuid.as_str());
    let rf = named(&recs, &f1);
    assert_eq!(rf["clone"]["mode"], "full");
    assert_eq!(rf["stands_on"]["name"], t.name.as_str());
    assert_eq!(rf["disks"][0]["backing"], serde_json::json!([]));
    let ro = named(&recs, &older.name);
    assert_eq!(ro["role"], "template");
    assert_eq!(ro["version"], older.name.as_str());
    assert_eq!(ro["version_of"], t.name.as_str());
    // Every line is also the record every tool reads (the rig parsed each as one).
    assert!(r.records.iter().any(|rec| rec.uuid == t.uuid));

    // --all adds the plain domain; --templates lists only templates.
    let all = run(LIST, &["--all"], None);
    assert_eq!(named(&ours(&all, &s.prefix), &plain.name)["role"], "plain");
    let tpls = ours(&run(LIST, &["--templates"], None), &s.prefix);
    assert_eq!(names(&tpls), [&*t.name, &older.name]);
    assert!(tpls.iter().all(|v| v["role"] == "template"));

    // --clones-of: the clones' records only, by name or UUID; the orphan is in its scope.
    for key in [&t.name, &t.uuid] {
        let r = run(LIST, &["--clones-of", key], None)
            .fails(1)
            .says(&[p(&c3_disk)]);
        assert_eq!(names(&values(&r)), [&*c1, &c2, &f1]);
    }
    run(LIST, &["--clones-of", &s.name("nope")], None)
        .fails(2)
        .says(&["not found"]);

    // The tree on a terminal, then the same with --json there.
    let (code, tree, err) = list_on_terminal(&["--clones-of", &t.name]);
    // Shown with --nocapture: what a user sees.
    eprintln!("$ tpl-list --clones-of {}\n{tree}{err}", t.name);
    assert_eq!(code, 1, "{tree}{err}");
    let lines: Vec<&str> = tree.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("ALLOCATED"),
        "{tree}"
    );
    assert!(
        lines[1].starts_with(&t.name)
            && lines[1].contains("template")
            && lines[1].contains("locked")
            && lines[1].contains(&format!("version {current}"))
            && lines[1].contains("1 older one kept"),
        "{tree}"
    );
    for (line, name) in lines[2..5].iter().zip([&c1, &c2, &f1]) {
        assert!(line.starts_with(&format!("├─ {name} ")), "{tree}");
    }
    assert!(
        lines[3].contains(&format!("in {}", elsewhere.0.display())),
        "{tree}"
    );
    assert!(lines[4].contains("full"), "{tree}");
    assert!(
        lines[5].starts_with("└─ (no domain)")
            && lines[5].contains("ORPHANED")
            && lines[5].contains(p(&c3_disk)),
        "{tree}"
    );
    assert!(lines
        .iter()
        .any(|l| l.contains(" KiB") || l.contains(" MiB")));
    assert!(
        lines[6].starts_with("1 template, 3 clones (2 linked, 1 full), 1 orphaned overlay;")
            && lines[6].ends_with("allocated"),
        "{tree}"
    );
    assert_eq!(lines.len(), 7, "{tree}");
    assert!(err.contains("orphaned overlay"), "{err}");
    let (_, whole, _) = list_on_terminal(&[]);
    assert!(
        whole
            .lines()
            .any(|l| l.starts_with(&older.name)
                && l.contains(&format!("older version of '{}'", t.name))),
        "{whole}"
    );
    let (_, json, _) = list_on_terminal(&["--json", "--clones-of", &t.name]);
    assert_eq!(json.lines().count(), 3);
    assert!(
        json.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{json}"
    );

    // tpl-rm never takes a file no domain owns: the orphan stops --with-clones up front.
    run(RM, &["--with-clones", &t.name], None)
        .fails(3)
        .says(&["no domain uses", p(&c3_disk)]);
    assert!(domain_exists(&c1) && domain_exists(&t.name));

    // Without the orphan, this template's inventory is clean.
    fs::remove_file(&c3_disk).unwrap();
    let r = run(LIST, &["--clones-of", &t.name], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("error"), "{}", r.stderr);

    // A linked clone whose template was undefined with virsh: orphaned, then broken.
    let t2 = locked(&mut s, "tpl2", &[]);
    let d1 = s.name("d1");
    run("tpl-clone", &[&t2.name, &d1], None).ok(1);
    virsh(&["undefine", &t2.name]);
    let r = run(LIST, &[], None).fails(1).says(&[&d1, "is gone"]);
    let rd = named(&ours(&r, &s.prefix), &d1).clone();
    assert_eq!(rd["role"], "clone");
    assert_eq!(rd["stands_on"], Value::Null);
    assert!(rd["problems"][0].as_str().unwrap().contains(&t2.uuid));
    fs::remove_file(&t2.disk).unwrap();
    run(LIST, &[], None).fails(1).says(&[
        &d1,
        &format!("backs onto '{}', which is missing", t2.disk.display()),
    ]);
}

#[test]
fn a_removed_clone_takes_its_files_and_its_registration() {
    let mut s = Scratch::new();
    let (t, t_nvram) = locked_with_nvram(&mut s, "tpl", &[]);
    let before = digest(&t.disk);
    let (c1, c2) = (s.name("c1"), s.name("c2"));
    let made = run("tpl-clone", &[&t.name, &c1, &c2, "--linked"], None).ok(2);
    let rec1 = made.records[0].clone();
    let (disk1, nvram1) = (
        rec1.disks[0].path.clone().unwrap(),
        rec1.nvram.clone().unwrap(),
    );
    assert!(disk1.exists() && nvram1.exists() && nvram1 != t_nvram);
    let registered = |uuid: &str| {
        read_meta(&t.name)
            .overlays
            .iter()
            .any(|o| o.clone_uuid == uuid)
    };
    assert!(registered(&rec1.uuid));

    // Like rm: nothing on stdout, and on stderr nothing of it (a recovery of what other
    // tests' killed runs left may be said there).
    let r = run(RM, &[&c1], None);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    assert!(!r.stderr.contains(&c1), "{}", r.stderr);
    assert!(!domain_exists(&c1));
    assert!(!disk1.exists() && !nvram1.exists());
    assert_eq!(hidden_in(&s.dir), Vec::<String>::new());
    assert!(!registered(&rec1.uuid), "its registration went with it");
    assert!(registered(&made.records[1].uuid), "the other clone's stays");
    assert!(!lock_file(&rec1.uuid).exists(), "its lock file went too");
    // The template is untouched: image, NVRAM, lock.
    assert_eq!(digest(&t.disk), before);
    assert_eq!(mode(&t.disk) & 0o222, 0);
    assert!(t_nvram.exists());

    // -v says what went; an unknown domain is bad input; the template is refused while
    // the other clone stands on it, then goes once it is gone.
    run(RM, &["-v", &c2], None).ok(0).says(&[
        "removed domain",
        &c2,
        "NVRAM",
        "registration in template",
    ]);
    run(RM, &[&s.name("nope")], None).fails(2);
    run(RM, &[&t.name], None).ok(0);
    assert!(!domain_exists(&t.name) && !t.disk.exists() && !t_nvram.exists());
    assert!(
        s.dir.join("loader.fd").exists(),
        "a shared read-only file stays"
    );
}

#[test]
fn a_template_is_refused_while_clones_use_it_and_goes_with_them() {
    let mut s = Scratch::new();
    let (t, t_nvram) = locked_with_nvram(&mut s, "tpl", &["--immutable"]);
    assert!(immutable(&t.disk), "ext4 here has the immutable attribute");
    let prefix = s.name("l");
    run(
        "tpl-clone",
        &[&t.name, "--count", "12", "--prefix", &prefix],
        None,
    )
    .ok(12);
    let full = s.name("full");
    run("tpl-clone", &[&t.name, &full, "--full"], None).ok(1);
    let full_disk = s.dir.join(format!("{full}.qcow2"));
    let meta = read_meta(&t.name);

    // Refused, naming the clones: ten of them and a count.
    let r = run(RM, &[&t.name], None).fails(3).says(&[
        &format!("cannot remove domain '{}'", t.name),
        "12 linked clones depend on its images",
        "and 2 more",
        "--with-clones",
    ]);
    let listed = (1..=12)
        .filter(|i| r.stderr.contains(&format!("domain '{prefix}{i:02}'")))
        .count();
    assert_eq!(listed, 10, "ten named, the rest counted: {}", r.stderr);
    // --dry-run says what would go and changes nothing.
    let before: Vec<String> = virsh(&["list", "--all", "--name"])
        .lines()
        .filter(|n| n.starts_with(&s.prefix))
        .map(String::from)
        .collect();
    let files = entries(&s.dir);
    let dry = run(RM, &["--dry-run", "--with-clones", &t.name], None).ok(0);
    assert_eq!(
        dry.stderr.matches("would remove domain").count(),
        13,
        "{}",
        dry.stderr
    );
    let after: Vec<String> = virsh(&["list", "--all", "--name"])
        .lines()
        .filter(|n| n.starts_with(&s.prefix))
        .map(String::from)
        .collect();
    assert_eq!(after, before);
    assert_eq!(entries(&s.dir), files);
    assert_eq!(read_meta(&t.name), meta);
    assert!(immutable(&t.disk));

    // --with-clones: the linked clones, then the template with its locked image and NVRAM.
    run(RM, &["--with-clones", &t.name], None).ok(0);
    for i in 1..=12 {
        let c = format!("{prefix}{i:02}");
        assert!(!domain_exists(&c));
        assert!(!s.dir.join(format!("{c}.qcow2")).exists());
    }
    assert!(!domain_exists(&t.name) && !t.disk.exists() && !t_nvram.exists());
    assert_eq!(hidden_in(&s.dir), Vec::<String>::new());
    // The full clone stays, whole and standalone.
    assert!(domain_exists(&full));
    let info = qemu_img_info(&full_disk);
    assert!(info.get("backing-filename").is_none(), "{info}");
    sh("qemu-img", &["check", "-q", p(&full_disk)]);
    // ... and is no orphan: it stands alone.
    let r = run(LIST, &[], None);
    let rf = named(&ours(&r, &s.prefix), &full).clone();
    assert_eq!(rf["stands_on"], Value::Null);
    assert_eq!(rf["problems"], serde_json::json!([]));
    assert!(!r.stderr.contains(&full), "{}", r.stderr);
}

#[test]
fn a_running_domain_is_refused_without_force_and_clones_on_stdin_go() {
    let mut s = Scratch::new();
    let t = locked(&mut s, "tpl", &[]);
    let (c, d, e) = (s.name("c"), s.name("d"), s.name("e"));
    run("tpl-clone", &[&t.name, &c, &d, &e], None).ok(3);
    virsh(&["start", &c]);
    run(RM, &[&c], None)
        .fails(3)
        .says(&["it is running", "--force"]);
    assert_eq!(virsh(&["domstate", &c]).trim(), "running");
    run(RM, &["--with-clones", &t.name], None)
        .fails(3)
        .says(&[&format!("its linked clone '{c}' is running")]);
    assert!(domain_exists(&d), "refused before anything went");
    run(RM, &["--force", "-v", &c], None)
        .ok(0)
        .says(&["stopped domain", "removed domain"]);
    assert!(!domain_exists(&c) && !s.dir.join(format!("{c}.qcow2")).exists());

    // The clones' records from tpl-list, into tpl-rm; then the template has none left.
    let r = pipeline(&format!("tpl-list --clones-of {} | tpl-rm", t.name));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!domain_exists(&d) && !domain_exists(&e));
    run(RM, &[&t.name], None).ok(0);
    assert!(!t.disk.exists());
}

/// What a domain is before a removal starts: its files (with inode and immutable
/// attribute) and whether its template registers it.
#[derive(Debug, Clone)]
struct Whole {
    name: String,
    uuid: String,
    files: Vec<(PathBuf, u64, bool)>,
    template: Option<String>,
}

impl Whole {
    fn of(name: &str, files: &[PathBuf], template: Option<&str>) -> Whole {
        Whole {
            name: name.into(),
            uuid: virsh(&["domuuid", name]).trim().to_string(),
            files: files
                .iter()
                .map(|f| (f.clone(), fs::metadata(f).unwrap().ino(), immutable(f)))
                .collect(),
            template: template.map(String::from),
        }
    }

    fn registered(&self) -> Option<bool> {
        let t = self.template.as_ref()?;
        Some(
            read_meta(t)
                .overlays
                .iter()
                .any(|o| o.clone_uuid == self.uuid),
        )
    }

    /// Whole again: defined, every file at its name, the very file, immutable as before,
    /// still registered.
    fn is_whole(&self) -> Result<(), String> {
        if !domain_exists(&self.name) {
            return Err("not defined".into());
        }
        for (f, ino, imm) in &self.files {
            match fs::metadata(f) {
                Ok(m) if m.ino() == *ino => {}
                other => return Err(format!("{} is not the file it was: {other:?}", f.display())),
            }
            if immutable(f) != *imm {
                return Err(format!("{} lost its immutable attribute", f.display()));
            }
        }
        if self.registered() == Some(false) {
            return Err("its registration is gone".into());
        }
        Ok(())
    }

    /// Fully gone: no definition, no file, no registration, no lock file.
    fn is_gone(&self) -> Result<(), String> {
        if domain_exists(&self.name) {
            return Err("still defined".into());
        }
        let left: Vec<_> = self.files.iter().filter(|(f, ..)| f.exists()).collect();
        if !left.is_empty() {
            return Err(format!("files left: {left:?}"));
        }
        if self.registered() == Some(true) {
            return Err("still registered".into());
        }
        if lock_file(&self.uuid).exists() {
            return Err("its lock file is left".into());
        }
        Ok(())
    }
}

/// Start a tool under strace, which delays each rename, unlink and sync by `delay_ms`: the
/// windows between the steps of a removal become wide enough to be hit by a kill. The
/// strace process and the tool's pid. Without strace the tool runs as it is (the windows
/// are narrow, the kills still land somewhere), and the test says so.
fn spawn_slowed(tool: &str, args: &[&str], delay_ms: u64) -> (Child, u32) {
    if !strace_works() {
        let c = spawn_tool_here(tool, args);
        let pid = c.id();
        return (c, pid);
    }
    let syscalls = "renameat2,rename,unlink,unlinkat,fsync,fdatasync";
    let mut c = Command::new("strace");
    test_env(&mut c)
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={syscalls}"))
        .arg("-e")
        .arg(format!("inject={syscalls}:delay_enter={delay_ms}ms"))
        .arg(bin(tool))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let exe = bin(tool);
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = descendant_running(child.id(), &exe) {
            break pid;
        }
        assert!(Instant::now() < deadline, "strace started no {tool}");
        std::thread::sleep(Duration::from_millis(1));
    };
    (child, pid)
}

/// The process below `root` (strace puts a helper between itself and the tool) that runs
/// `exe`, once it does.
fn descendant_running(root: u32, exe: &Path) -> Option<u32> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`: the name may hold spaces and parentheses.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let argv0 = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = argv0.split(|&b| b == 0).next().unwrap_or_default();
        if argv0 != exe.as_os_str().as_encoded_bytes() {
            continue;
        }
        let mut up = pid;
        for _ in 0..4 {
            match parent(up) {
                Some(p) if p == root => return Some(pid),
                Some(p) => up = p,
                None => break,
            }
        }
    }
    None
}

fn spawn_tool_here(tool: &str, args: &[&str]) -> Child {
    tool_command(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn strace_works() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let ok = Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("strace is missing (apt-get install strace): kills land in narrower windows");
        }
        ok
    })
}

/// Poll `f` until it holds or `child` exits: false when it exited first.
fn reached(child: &mut Child, secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return f();
        }
        assert!(Instant::now() < deadline, "no progress after {secs} s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn kill_9_at_random_points_of_a_removal_leaves_it_whole_or_gone() {
    let started = Instant::now();
    let mut rng = Rng::seeded("tpl-rm kill -9 trials");
    let mut s = Scratch::new();
    let (t, _) = locked_with_nvram(&mut s, "tpl", &[]);
    let trials = 14;
    let (mut killed, mut whole, mut gone) = (0, 0, 0);
    for i in 0..trials {
        // Even trials remove a linked clone (overlay, NVRAM copy, registration); odd ones
        // a template locked --immutable (image and NVRAM read-only and immutable).
        let w = if i % 2 == 0 {
            let c = s.name(&format!("k{i}"));
            let r = run("tpl-clone", &[&t.name, &c], None).ok(1);
            let rec = &r.records[0];
            let files = [
                rec.disks[0].path.clone().unwrap(),
                rec.nvram.clone().unwrap(),
            ];
            Whole::of(&c, &files, Some(&t.name))
        } else {
            let (g, nv) = locked_with_nvram(&mut s, &format!("t{i}"), &["--immutable"]);
            Whole::of(&g.name, &[g.disk.clone(), nv], None)
        };
        let delay = rng.range(60, 250);
        let (mut strace, pid) = spawn_slowed(RM, &[&w.name], delay);
        let stage = rng.range(0, 3);
        let hit = match stage {
            0 => true,
            1 => reached(&mut strace, 60, || {
                rm_journals(pid)
                    .iter()
                    .any(|j| j.extension().is_some_and(|e| e == "journal"))
            }),
            2 => reached(&mut strace, 60, || !hidden_in(&s.dir).is_empty()),
            _ => reached(&mut strace, 60, || !domain_exists(&w.name)),
        };
        // After the undefine come five delayed steps (two unlinks, a sync, the lock file,
        // the journal): the kill may land in any of them.
        let extra = rng.range(
            0,
            match stage {
                0 => 1500,
                3 => 5 * delay,
                _ => 2 * delay,
            },
        );
        std::thread::sleep(Duration::from_millis(extra));
        let running = strace.try_wait().unwrap().is_none();
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let out = strace.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "trial {i}: {stderr}");
        killed += usize::from(running);
        // The next run of any tool finishes or undoes it: here a listing, or a removal
        // of something else that only says what it would do.
        let next = if i % 4 < 2 {
            run(LIST, &["--templates"], None)
        } else {
            run(RM, &["--dry-run", &t.name], None)
        };
        assert!(!next.stderr.contains("panicked"), "{}", next.stderr);
        let outcome = match (w.is_whole(), w.is_gone()) {
            (Ok(()), _) => "whole",
            (_, Ok(())) => "gone",
            (Err(a), Err(b)) => panic!(
                "trial {i}: {} neither whole ({a}) nor gone ({b}) after the next run\n\
                 next run said: {}",
                w.name, next.stderr
            ),
        };
        assert_eq!(hidden_in(&s.dir), Vec::<String>::new(), "trial {i}");
        assert_eq!(rm_journals(pid), Vec::<PathBuf>::new(), "trial {i}");
        eprintln!(
            "{:5.1} s: trial {i}: {} with {delay} ms per step, kill at stage {stage} \
             (reached: {hit}) + {extra} ms: {} -> {outcome}",
            started.elapsed().as_secs_f64(),
            w.name,
            if running { "killed" } else { "had finished" },
        );
        if outcome == "whole" {
            whole += 1;
            // Whole means removable as any other: the removal goes through now.
            run(RM, &[&w.name], None).ok(0);
            w.is_gone().unwrap();
        } else {
            gone += 1;
        }
    }
    eprintln!(
        "{trials} trials in {:.1} s: {killed} killed while running; {whole} left whole \
         (rolled back), {gone} gone",
        started.elapsed().as_secs_f64()
    );
    assert!(killed >= trials / 2, "too few kills hit a running removal");
}

/// `tpl-rm --with-clones` drops the registrations of the clones it removed from the
/// template 64 at a time, each clone's journal open until its registration is gone. A
/// kill -9 anywhere in the batch leaves every clone whole (defined, its files, still
/// registered) or gone (no definition, no file, no registration), after the next run of
/// any tool, and the template registers exactly the clones still defined.
#[test]
fn kill_9_in_a_removal_with_clones_leaves_no_clone_half_gone_nor_registered_when_gone() {
    let started = Instant::now();
    let mut rng = Rng::seeded("tpl-rm --with-clones kill -9 trials");
    let mut s = Scratch::new();
    let (trials, count) = (6, 80);
    let (mut killed, mut gone_total) = (0, 0);
    for i in 0..trials {
        let (t, nv) = locked_with_nvram(&mut s, &format!("wt{i}"), &[]);
        let prefix = format!("{}-w{i}-", s.prefix);
        let n = count.to_string();
        let r = run(
            "tpl-clone",
            &[&t.name, "--count", &n, "--prefix", &prefix, "--no-identity"],
            None,
        )
        .ok(count);
        let clones: Vec<Whole> = r
            .records
            .iter()
            .map(|rec| {
                let files = [
                    rec.disks[0].path.clone().unwrap(),
                    rec.nvram.clone().unwrap(),
                ];
                Whole::of(&rec.name, &files, Some(&t.name))
            })
            .collect();
        let tw = Whole::of(&t.name, &[t.disk.clone(), nv], None);
        // The kill comes when a chosen number of the clones' overlays are gone (all of
        // them: while the template goes), whatever the machine's speed.
        let target = rng.range(0, count as u64) as usize;
        let overlays: Vec<PathBuf> = clones.iter().map(|c| c.files[0].0.clone()).collect();
        let mut child = spawn_tool_here(RM, &["--with-clones", &t.name]);
        let spawned = Instant::now();
        reached(&mut child, 120, || {
            overlays.iter().filter(|p| !p.exists()).count() >= target
        });
        let extra = rng.range(0, 40);
        std::thread::sleep(Duration::from_millis(extra));
        let after = spawned.elapsed().as_millis();
        let running = child.try_wait().unwrap().is_none();
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let _ = child.wait();
        assert!(!err.contains("panicked"), "trial {i}: {err}");
        killed += usize::from(running);

        let next = run(LIST, &["--templates"], None);
        assert!(!next.stderr.contains("panicked"), "{}", next.stderr);
        let mut gone = 0;
        for c in &clones {
            match (c.is_whole(), c.is_gone()) {
                (Ok(()), _) => {}
                (_, Ok(())) => gone += 1,
                (Err(a), Err(b)) => panic!(
                    "trial {i}: clone {} neither whole ({a}) nor gone ({b}) after the next \
                     run; the killed run said: {err}\nthe next run said: {}",
                    c.name, next.stderr
                ),
            }
        }
        if domain_exists(&t.name) {
            tw.is_whole()
                .unwrap_or_else(|e| panic!("trial {i}: template: {e}"));
            let registered: BTreeSet<String> = read_meta(&t.name)
                .overlays
                .iter()
                .map(|o| o.clone_uuid.clone())
                .collect();
            let defined: BTreeSet<String> = clones
                .iter()
                .filter(|c| domain_exists(&c.name))
                .map(|c| c.uuid.clone())
                .collect();
            assert_eq!(registered, defined, "trial {i}: registrations");
            run(RM, &["--with-clones", &t.name], None).ok(0);
        } else {
            tw.is_gone()
                .unwrap_or_else(|e| panic!("trial {i}: template: {e}"));
            assert_eq!(
                gone, count,
                "trial {i}: the template went before its clones"
            );
        }
        gone_total += gone;
        eprintln!(
            "{:5.1} s: trial {i}: {} after {after} ms ({target} overlays gone + {extra} ms): \
             {gone} of {count} clones gone",
            started.elapsed().as_secs_f64(),
            if running { "killed" } else { "had finished" },
        );
    }
    eprintln!(
        "{trials} trials of tpl-rm --with-clones on {count} clones in {:.1} s: {killed} killed \
         while running, {gone_total} clones gone in all",
        started.elapsed().as_secs_f64()
    );
    assert!(killed >= trials / 2, "too few kills hit a running removal");
}

#[test]
fn a_removal_racing_a_linked_clone_never_orphans_it() {
    let started = Instant::now();
    let mut rng = Rng::seeded("tpl-rm vs tpl-clone races");
    let mut s = Scratch::new();
    let trials = 16;
    let (mut refused, mut removed, mut waited) = (0, 0, 0);
    for i in 0..trials {
        let t = locked(&mut s, &format!("t{i}"), &[]);
        let c = s.name(&format!("c{i}"));
        let overlay = s.dir.join(format!("{c}.qcow2"));
        // Either may start first; either may be slowed down at its renames and syncs.
        let gap = rng.range(0, 120);
        let rm_first = rng.range(0, 1) == 1;
        let slow = rng.range(0, 2);
        let spawn_rm = |slowed: bool| {
            if slowed {
                spawn_slowed(RM, &[&t.name], 40).0
            } else {
                spawn_tool_here(RM, &[&t.name])
            }
        };
        let spawn_clone = |slowed: bool| {
            let args = [t.name.as_str(), c.as_str(), "--linked"];
            if slowed {
                spawn_slowed("tpl-clone", &args, 40).0
            } else {
                spawn_tool_here("tpl-clone", &args)
            }
        };
        let (rm, clone) = if rm_first {
            let a = spawn_rm(slow == 1);
            std::thread::sleep(Duration::from_millis(gap));
            (a, spawn_clone(slow == 2))
        } else {
            let b = spawn_clone(slow == 2);
            std::thread::sleep(Duration::from_millis(gap));
            (spawn_rm(slow == 1), b)
        };
        let (rm, clone) = (
            rm.wait_with_output().unwrap(),
            clone.wait_with_output().unwrap(),
        );
        let (rc, cc) = (rm.status.code(), clone.status.code());
        // Whether one of them had to wait for the other's lock on the template.
        let wait = [&rm.stderr, &clone.stderr]
            .iter()
            .any(|e| String::from_utf8_lossy(e).contains("is busy"));
        waited += usize::from(wait);
        let said = format!(
            "tpl-rm {rc:?}: {}\ntpl-clone {cc:?}: {}",
            String::from_utf8_lossy(&rm.stderr),
            String::from_utf8_lossy(&clone.stderr)
        );
        let outcome = match (rc, cc) {
            // The removal won: no clone, no overlay, no template.
            (Some(0), Some(c_code)) => {
                assert_ne!(c_code, 0, "trial {i}: both succeeded\n{said}");
                assert!(!domain_exists(&c) && !overlay.exists(), "trial {i}\n{said}");
                assert!(
                    !domain_exists(&t.name) && !t.disk.exists(),
                    "trial {i}\n{said}"
                );
                removed += 1;
                "removed, clone refused"
            }
            // The clone won: the removal was refused, the template and clone stand.
            (Some(3), Some(0)) => {
                assert!(
                    String::from_utf8_lossy(&rm.stderr)
                        .contains("1 linked clone depends on its images"),
                    "{said}"
                );
                assert!(
                    domain_exists(&t.name) && t.disk.exists(),
                    "trial {i}\n{said}"
                );
                let info = qemu_img_info(&overlay);
                assert_eq!(info["backing-filename"], p(&t.disk), "trial {i}");
                refused += 1;
                run(RM, &["--with-clones", &t.name], None).ok(0);
                "clone made, removal refused"
            }
            _ => panic!("trial {i}: unexpected outcome\n{said}"),
        };
        // Nothing of this trial is left on a missing template.
        assert!(!domain_exists(&c) && !overlay.exists() && !domain_exists(&t.name));
        eprintln!(
            "{:5.1} s: trial {i}: {} first, {gap} ms apart, slowed: {}: {outcome} \
             (tpl-clone exit {}{})",
            started.elapsed().as_secs_f64(),
            if rm_first { "tpl-rm" } else { "tpl-clone" },
            ["none", "tpl-rm", "tpl-clone"][slow as usize],
            cc.unwrap_or(-1),
            if wait {
                ", after waiting for the lock"
            } else {
                ""
            },
        );
    }
    eprintln!(
        "{trials} races in {:.1} s: {removed} removals won, {refused} clones won, \
         {waited} waited for the other's lock",
        started.elapsed().as_secs_f64()
    );
}

//! Templates on Ceph RBD (issue 12), against the real test cluster (scripts/ceph-up.sh,
//! started by `make test`), the real libvirtd and real guests booting under TCG: the
//! pipeline on an RBD-backed guest, a locked template that refuses to start, linked and
//! full clones that boot as machines of their own, unlock refused while a clone exists,
//! kill -9 at random points of a 20-clone batch, a signal in a 40-clone batch made ahead,
//! a clone racing an unlock, and a domain with a file disk and an RBD disk. Every random
//! choice prints its seed; `TPL_FAULT_SEED=N cargo test -p tpl-tests --test rbd` replays a
//! run.
//!
//! Each test process has its own pool (`tplt-<pid>`), each test its own images, named
//! after its Scratch prefix and removed when it ends (see the rig's RBD section).

use std::collections::BTreeSet;
use std::fs;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tpl_common::journal::clone::Entry;
use tpl_common::volume::Vol;
use tpl_tests::*;

/// The snapshot tpl-lock protects (tpl_common::rbd::TEMPLATE_SNAPSHOT).
const SNAP: &str = "tpl";

/// Wait for a spawned tool: (exit code, stderr).
fn finish(c: Child) -> (i32, String) {
    let out = c.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The images (`POOL/IMAGE`) the journals of tpl-clone's run `pid` name.
fn journal_images(pid: u32) -> BTreeSet<String> {
    journals_of(pid)
        .iter()
        .flat_map(|j| {
            fs::read_to_string(j)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
                .filter_map(|e| match e {
                    Entry::Tmp {
                        vol: Vol::Rbd(i), ..
                    }
                    | Entry::Made {
                        vol: Vol::Rbd(i), ..
                    } => Some(i),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What Ceph says of images, for failure messages: whether each opens, and its watchers.
fn describe_images(pool: &str, images: &[String]) -> String {
    images
        .iter()
        .map(|i| {
            let spec = rbd_spec(pool, i);
            let info = with_ceph(|c| c.info(&spec))
                .map(|i| {
                    format!(
                        "id {}, parent {:?}",
                        i.id,
                        i.parent.map(|p| p.spec.to_string())
                    )
                })
                .unwrap_or_else(|e| format!("cannot be opened: {e}"));
            let watchers = with_ceph(|c| c.watchers(&spec))
                .map(|w| {
                    format!(
                        "{} watchers {:?}",
                        w.len(),
                        w.iter().map(|w| &w.addr).collect::<Vec<_>>()
                    )
                })
                .unwrap_or_else(|e| format!("watchers unknown: {e}"));
            format!("{i}: {info}; {watchers}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// An RBD guest marked generalized and locked by the real tpl-lock.
fn locked_rbd_template(s: &mut RbdScratch, tag: &str) -> RbdGuest {
    let g = s.rbd_guest(tag);
    mark_generalized(&g.name);
    run("tpl-lock", &[&g.name], None).ok(1);
    assert_eq!(rbd_snapshots(&g.pool, &g.image), [(SNAP.into(), true)]);
    g
}

/// `POOL/IMAGE@tpl`, the snapshot linked clones of a template stand on.
fn at_snap(pool: &str, image: &str) -> String {
    format!("{pool}/{image}@{SNAP}")
}

/// What the template's disk `target` is now, in libvirt and in Ceph: (the snapshot the
/// definition points at, the template snapshot's protection if it exists).
fn template_state(domain: &str, target: &str) -> (Option<String>, Option<bool>) {
    let src = rbd_source_of(domain, target);
    let snap = rbd_snapshots(&src.pool, &src.image)
        .into_iter()
        .find(|(n, _)| n == SNAP)
        .map(|(_, p)| p);
    (src.snapshot, snap)
}

/// The images the domains `doms` name (disk vda), checked: each is in `images` (the pool
/// as listed), each is a clone of the template snapshot, and together they are exactly
/// Ceph's clones of that snapshot.
fn clones_of_snapshot(
    t: &RbdGuest,
    doms: &[String],
    images: &BTreeSet<String>,
    what: &str,
) -> BTreeSet<String> {
    let parent = at_snap(&t.pool, &t.image);
    let mut named = BTreeSet::new();
    for d in doms {
        let image = rbd_source_of(d, "vda").image;
        assert!(images.contains(&image), "{d} names a missing image: {what}");
        assert_eq!(
            rbd_parent(&t.pool, &image).as_deref(),
            Some(parent.as_str()),
            "{what}"
        );
        named.insert(image);
    }
    assert_eq!(
        rbd_children(&t.pool, &t.image, SNAP),
        named
            .iter()
            .map(|i| format!("{}/{i}", t.pool))
            .collect::<BTreeSet<_>>(),
        "Ceph's clones of the template snapshot are the domains' images: {what}"
    );
    named
}

/// The arguments of a linked batch of `count` clones of `t` named PREFIX1…
fn batch_args(t: &RbdGuest, count: usize, prefix: &str) -> Vec<String> {
    vec![
        t.name.clone(),
        "--count".into(),
        count.to_string(),
        "--prefix".into(),
        prefix.to_string(),
        "--linked".into(),
        "--no-identity".into(),
    ]
}

/// How long a batch of `count` linked clones of `t` takes when nothing stops it (the span
/// that stops are spread over); its clones are removed again.
fn unstopped_batch(s: &mut RbdScratch, t: &RbdGuest, count: usize) -> Duration {
    let base = format!("{}-base{count}-", s.prefix);
    let args = batch_args(t, count, &base);
    let t0 = Instant::now();
    run(
        "tpl-clone",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .ok(count);
    let span = t0.elapsed();
    assert_eq!(rbd_children(&t.pool, &t.image, SNAP).len(), count);
    for n in domains_with_prefix(&base) {
        s.remove_clone(&n);
    }
    assert_eq!(s.images(), BTreeSet::from([t.image.clone()]));
    span
}

/// The whole job on an RBD-backed guest: the pipeline form (records on stdin) of
/// generalize | lock | rename --disks renames the image in Ceph and points the domain at
/// `POOL/NEW@tpl`; the locked template refuses to start; two linked clones (rbd clones of
/// the template snapshot) and a full clone (a copy, no parent) boot as machines of their
/// own (distinct machine-id, hostname and SSH host keys, from their consoles) and leave the
/// template's image as it was; unlock is refused while a linked clone exists, naming them,
/// and not because of the full clone; once they are removed it removes the snapshot and
/// points the disk back at the image's head, which then starts.
#[test]
fn pipeline_on_rbd_then_linked_and_full_clones_boot_and_unlock_waits_for_them() {
    let mut s = RbdScratch::new();
    let g = s.rbd_guest("vm");
    let pool = g.pool.clone();
    let tpl = s.name("Tpl");
    let t0 = Instant::now();
    let r = pipeline(&format!(
        "tpl-generalize {vm} --hostname TplRbd | tpl-lock | tpl-rename --disks {tpl}",
        vm = g.name
    ))
    .ok(1);
    eprintln!(
        "generalize | lock | rename --disks on RBD: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let rec = only(&r);
    assert_eq!(
        (rec.name.as_str(), rec.uuid.as_str()),
        (tpl.as_str(), g.uuid.as_str())
    );
    assert!(
        rec.template.locked && rec.template.generalized.is_some(),
        "{rec:?}"
    );
    assert_eq!(rec.template.snapshot.as_deref(), Some(SNAP), "{rec:?}");
    let d = &rec.disks[0];
    assert_eq!(d.kind.as_str(), "rbd", "{d:?}");
    let src = d.rbd.as_ref().expect("the record's rbd object");
    assert_eq!(
        (
            src.pool.as_str(),
            src.image.as_str(),
            src.snapshot.as_deref()
        ),
        (pool.as_str(), tpl.as_str(), Some(SNAP)),
        "{src:?}"
    );
    assert_eq!(src.user.as_deref(), Some("admin"));
    assert_eq!(src.secret.as_deref(), Some(ceph_secret().as_str()));
    // In Ceph: the image renamed, with its protected snapshot; in libvirt: the disk reads it.
    assert!(rbd_exists(&pool, &tpl) && !rbd_exists(&pool, &g.image));
    assert_eq!(rbd_snapshots(&pool, &tpl), [(SNAP.into(), true)]);
    let live = rbd_source_of(&tpl, "vda");
    assert_eq!(
        (live.image.as_str(), live.snapshot.as_deref()),
        (tpl.as_str(), Some(SNAP))
    );
    assert!(
        !dom_xml(&tpl).disks()[0].readonly,
        "no <readonly/>: qemu refuses to open the snapshot for writing"
    );
    assert_eq!(read_meta(&tpl).template.snapshot.as_deref(), Some(SNAP));

    // The locked template refuses to start, and stays shut off.
    let said = start_is_read_only(&tpl);
    eprintln!("virsh start {tpl}: {}", said.trim());
    assert_eq!(virsh(&["domstate", &tpl]).trim(), "shut off");
    let head_before = rbd_sha256(&pool, &tpl);
    assert_eq!(
        rbd_sha256(&pool, &format!("{tpl}@{SNAP}")),
        head_before,
        "the snapshot is the generalized image"
    );

    // Two linked clones and one full clone.
    let (w1, w2, f1) = (s.name("web1"), s.name("web2"), s.name("full1"));
    let l = run("tpl-clone", &[&tpl, &w1, &w2, "--linked"], None).ok(2);
    let f = run("tpl-clone", &[&tpl, &f1, "--full"], None).ok(1);
    let parent = at_snap(&pool, &tpl);
    for (rec, mode) in l
        .records
        .iter()
        .map(|r| (r, "linked"))
        .chain(f.records.iter().map(|r| (r, "full")))
    {
        let what = format!("{} ({mode}): {rec:?}", rec.name);
        assert_eq!(rec.clone.as_ref().unwrap().mode.as_str(), mode, "{what}");
        let d = &rec.disks[0];
        let r = d
            .rbd
            .as_ref()
            .unwrap_or_else(|| panic!("not on RBD: {what}"));
        // Named after the clone as a file would be, in the template's pool, with the
        // template's monitors, cephx user and libvirt secret.
        assert_eq!(
            (r.pool.as_str(), r.image.as_str(), r.snapshot.as_deref()),
            (pool.as_str(), rec.name.as_str(), None),
            "{what}"
        );
        assert_eq!(
            (&r.hosts, &r.user, &r.secret),
            (&src.hosts, &src.user, &src.secret),
            "{what}"
        );
        let backing: Vec<String> = d
            .backing
            .iter()
            .map(|b| b.path.display().to_string())
            .collect();
        let ceph_parent = rbd_parent(&pool, &rec.name);
        if mode == "linked" {
            assert_eq!(backing, [format!("rbd:{parent}")], "{what}");
            assert_eq!(ceph_parent.as_deref(), Some(parent.as_str()), "{what}");
        } else {
            assert!(backing.is_empty(), "{what}");
            assert_eq!(ceph_parent, None, "a full clone stands alone: {what}");
        }
    }
    let kids = rbd_children(&pool, &tpl, SNAP);
    let want: BTreeSet<String> = [&w1, &w2].iter().map(|n| format!("{pool}/{n}")).collect();
    assert_eq!(kids, want, "rbd children of the template snapshot");

    // Each boots once, as a machine of its own.
    let names = vec![w1.clone(), w2.clone(), f1.clone()];
    let t0 = Instant::now();
    boot_until_off(&names, Duration::from_secs(600));
    eprintln!(
        "3 clones on RBD booted and powered off in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    let (mut ids, mut hosts, mut keys) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for name in &names {
        let log = fs::read_to_string(console_path(name)).unwrap();
        assert_eq!(boot_values(&log, "root"), ["/dev/vda"], "{name}: {log}");
        assert_eq!(boot_values(&log, "firstboot"), ["run"], "{name}: {log}");
        assert_eq!(
            boot_values(&log, "machine-id-at-boot"),
            [""],
            "{name}: {log}"
        );
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
        assert_eq!(mid.len(), 1, "{name}: {log}");
        assert_eq!(mid[0].len(), 32, "{name}: {log}");
        assert!(
            ids.insert(mid[0].to_string()),
            "{name} shares a machine-id: {log}"
        );
        assert!(hosts.insert(boot_values(&log, "hostname")[0].to_string()));
        let hk = boot_values(&log, "hostkey");
        assert_eq!(hk.len(), 3, "{name}: fresh host keys expected: {log}");
        for k in hk {
            assert!(
                keys.insert(k.split(' ').next().unwrap().to_string()),
                "{name} shares a host key: {log}"
            );
        }
    }
    eprintln!(
        "identities: {} machine-ids, {} hostnames, {} SSH host keys, all distinct",
        ids.len(),
        hosts.len(),
        keys.len()
    );
    // The clones wrote into their own images; the template's is as it was.
    assert_eq!(
        rbd_sha256(&pool, &tpl),
        head_before,
        "the template image changed"
    );
    assert_eq!(rbd_sha256(&pool, &format!("{tpl}@{SNAP}")), head_before);
    for n in &names {
        assert_ne!(
            rbd_sha256(&pool, n),
            head_before,
            "{n} never wrote to its image"
        );
    }

    // Unlock is refused while the linked clones exist, naming them (and not the full one).
    let u = run("tpl-lock", &["--unlock", &tpl], None).fails(3);
    let u = u.says(&[&format!("{pool}/{w1}"), &format!("{pool}/{w2}")]);
    assert!(
        !u.stderr.contains(&f1),
        "the full clone is no dependent: {}",
        u.stderr
    );
    assert!(read_meta(&tpl).template.locked);
    assert_eq!(
        template_state(&tpl, "vda"),
        (Some(SNAP.into()), Some(true)),
        "nothing changed"
    );
    // Removed (undefine + rbd rm), they no longer hold it; the full clone stays.
    for n in [&w1, &w2] {
        s.remove_clone(n);
    }
    assert!(rbd_children(&pool, &tpl, SNAP).is_empty());
    let u = run("tpl-lock", &["--unlock", &tpl], None).ok(1);
    let rec = only(&u);
    assert!(
        !rec.template.locked && rec.template.snapshot.is_none(),
        "{rec:?}"
    );
    assert_eq!(rec.disks[0].rbd.as_ref().unwrap().snapshot, None, "{rec:?}");
    assert_eq!(
        template_state(&tpl, "vda"),
        (None, None),
        "snapshot gone, disk at its head"
    );
    assert!(rbd_snapshots(&pool, &tpl).is_empty());
    assert!(domain_exists(&f1) && rbd_exists(&pool, &f1));
    // A template pointed back at its image starts again.
    virsh(&["start", &tpl]);
    virsh(&["destroy", &tpl]);
}

/// kill -9 at random points of a batch of 20 linked clones on RBD, 12 trials spread
/// uniformly over the time an unkilled batch takes. Every image the kill left that no
/// defined domain accounts for is named by the killed run's journal; and the next run of
/// a tool alone (which cleans what dead runs left, from their journals) has removed it,
/// within Ceph's watch timeout and a margin (under 60 s), without keeping the journal: every image in the pool is the template's or is named by a
/// defined domain, no temporary image is left, the journal is gone, Ceph's list of the
/// template snapshot's clones is exactly the domains' images, each of them on the snapshot.
#[test]
fn kill_9_at_random_points_of_a_20_clone_rbd_batch_leaves_nothing_unaccounted() {
    let mut s = RbdScratch::new();
    let t = locked_rbd_template(&mut s, "tpl");
    let pool = t.pool.clone();
    let batch = |prefix: &str| batch_args(&t, 20, prefix);
    // What an unkilled batch takes: the span the kills are spread over.
    let span = unstopped_batch(&mut s, &t, 20);

    let mut rng = Rng::seeded("kill -9 of a 20-clone RBD batch");
    let trials = 12;
    let (mut defined, mut cleaned, mut left_by_kill, mut untouched) = (0, 0, 0, 0);
    let (mut slow_next, mut blocklisted) = (0, 0);
    let mut ghost_kept = false;
    for trial in 0..trials {
        let prefix = format!("{}-k{trial}-", s.prefix);
        let after = Duration::from_micros(rng.range(0, span.as_micros() as u64));
        let args = batch(&prefix);
        let child = spawn_tool(
            "tpl-clone",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let pid = child.id();
        std::thread::sleep(after);
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let (code, err) = finish(child);
        // What the kill left that no domain accounts for: temporary images, and final ones
        // whose domain was never defined.
        let unnamed = |images: &BTreeSet<String>| -> Vec<String> {
            let named: BTreeSet<String> = domains_with_prefix(&prefix)
                .iter()
                .map(|d| rbd_source_of(d, "vda").image)
                .collect();
            images
                .iter()
                .filter(|i| **i != t.image && !named.contains(*i))
                .cloned()
                .collect()
        };
        let left0 = unnamed(&s.images());
        if !left0.is_empty() {
            left_by_kill += 1;
        }
        // Each of them is named by the killed run's journal...
        let journaled = journal_images(pid);
        let lost: Vec<&String> = left0
            .iter()
            .filter(|i| !journaled.contains(&format!("{pool}/{i}")))
            .collect();
        assert!(
            lost.is_empty(),
            "trial {trial}: images that no domain and no journal accounts for: {lost:?} ({})",
            describe_images(&pool, &left0)
        );
        // ...and the next run of any tool removes them, within Ceph's watch
        // timeout and a margin (45 s): no later run is needed, and no other test's tool
        // (each test has its own state directory) is there to help.
        let t_next = Instant::now();
        let next = run("tpl-lock", &["--dry-run", &t.name], None);
        let took = t_next.elapsed();
        let what = format!(
            "trial {trial}: killed after {after:?} of {span:?} (exit {code}: {}); the kill left \
             {left0:?}; the next run took {took:?} and said: {}",
            err.trim(),
            next.stderr.trim()
        );
        assert_eq!(next.code, 0, "{what}");
        no_panic("tpl-lock", &next.stderr);
        if ghost_watch_kept(&next.stderr) {
            // The OSD kept a watch of the killed run's own connection although the next
            // run blocklisted its address (seen in about 1 of 40 runs; docs/ENVIRONMENT.md):
            // librbd removes no watched image, so the next run names the watch and keeps
            // the journal. What is left must still be the killed run's, in its journal;
            // later trials would only wait on the same journal, so the trials end here.
            let left = unnamed(&s.images());
            let unjournaled: Vec<&String> = left
                .iter()
                .filter(|i| !journaled.contains(&format!("{pool}/{i}")))
                .collect();
            assert!(!left.is_empty() && unjournaled.is_empty(), "{what}");
            eprintln!("{what}\ntrial {trial}: a watch the OSD kept ends the trials");
            ghost_kept = true;
            break;
        }
        assert!(!next.stderr.contains("kept the journal"), "{what}");
        assert!(took < Duration::from_secs(60), "{what}");
        if took > Duration::from_secs(5) {
            slow_next += 1;
        }
        if next.stderr.contains("blocklisted") {
            blocklisted += 1;
        }
        if took > Duration::from_secs(5) || next.stderr.contains("blocklisted") {
            eprintln!("{what}");
        }
        let images = s.images();
        let left = unnamed(&images);
        assert!(
            left.is_empty(),
            "the next run did not remove what the killed run left: {left:?} ({}); {what}",
            describe_images(&pool, &left)
        );
        assert!(
            journals_of(pid).is_empty(),
            "the killed run's journal is left: {what}"
        );
        assert!(
            !images.iter().any(|i| i.contains(".tpl-tmp-")),
            "temporary images left: {images:?}; {what}"
        );
        let doms = domains_with_prefix(&prefix);
        clones_of_snapshot(&t, &doms, &images, &what);
        assert_eq!(
            template_state(&t.name, "vda"),
            (Some(SNAP.into()), Some(true)),
            "{what}"
        );
        eprintln!(
            "trial {trial}: killed after {:.0} ms: {} clones defined, {} images left by the \
             kill ({left0:?}), all removed by the next run",
            after.as_secs_f64() * 1000.0,
            doms.len(),
            left0.len(),
        );
        if doms.is_empty() && left0.is_empty() {
            untouched += 1;
        }
        defined += doms.len();
        cleaned += left0.len();
        for d in &doms {
            s.remove_clone(d);
        }
    }
    eprintln!(
        "kill -9 of a 20-clone RBD batch: {trials} trials over {:.0} ms (the unkilled batch): \
         {defined} clones finished and kept, {cleaned} leftover images in {left_by_kill} trials \
         removed by the next run ({slow_next} next runs took over 5 s, waiting for a watch; \
         {blocklisted} ended a watch of the killed run by blocklisting its client), \
         {untouched} trials killed before anything was made{}",
        span.as_secs_f64() * 1000.0,
        if ghost_kept {
            "; the last trial's image kept a watch of the killed run that Ceph did not drop"
        } else {
            ""
        }
    );
}

/// A stopping signal (SIGTERM, SIGINT and SIGHUP in turn) at a random point of a 40-clone
/// linked batch on RBD, whose images are made ahead in parallel, group by group (so the
/// signal lands while threads make or rename the images of clones not defined yet): the
/// tool dies by that signal, and before it does it removes all it made but the clones it
/// defined. Checked with no other run in between: every image of the batch in the pool is
/// a defined clone's, on the template snapshot, and Ceph's clones of the snapshot are
/// exactly those; no temporary image and no journal of the run is left. 9 trials, seeded.
#[test]
fn a_signal_in_an_rbd_batch_made_ahead_leaves_only_the_clones_it_defined() {
    use std::os::unix::process::ExitStatusExt;
    let mut s = RbdScratch::new();
    let t = locked_rbd_template(&mut s, "sig");
    let pool = t.pool.clone();
    let batch = |prefix: &str| batch_args(&t, 40, prefix);
    let span = unstopped_batch(&mut s, &t, 40);

    let mut rng = Rng::seeded("a signal in an RBD batch made ahead");
    let signals = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];
    let (mut stopped, mut kept) = (0, 0);
    for trial in 0..9 {
        let sig = signals[trial % signals.len()];
        let prefix = format!("{}-s{trial}-", s.prefix);
        let after = Duration::from_micros(rng.range(0, span.as_micros() as u64));
        let args = batch(&prefix);
        let child = spawn_tool(
            "tpl-clone",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let pid = child.id();
        std::thread::sleep(after);
        let _ = kill(Pid::from_raw(pid as i32), sig);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        no_panic("tpl-clone", &err);
        let doms = domains_with_prefix(&prefix);
        let what = format!(
            "trial {trial}: {sig:?} after {after:?} of {span:?}: {:?}, {} clones defined; \
             stderr: {}",
            out.status,
            doms.len(),
            err.trim()
        );
        if out.status.code() == Some(0) {
            // It finished before the signal came.
            assert_eq!(doms.len(), 40, "{what}");
        } else {
            assert_eq!(out.status.signal(), Some(sig as i32), "{what}");
            stopped += 1;
        }
        let mut images = s.images();
        let named = clones_of_snapshot(&t, &doms, &images, &what);
        images.remove(&t.image);
        assert_eq!(
            images,
            named,
            "the images of the batch are the defined clones' ({}): {what}",
            describe_images(
                &pool,
                &images.difference(&named).cloned().collect::<Vec<_>>()
            )
        );
        assert!(
            journals_of(pid).is_empty(),
            "the run's journal is left: {what}"
        );
        eprintln!("{what}");
        kept += doms.len();
        for d in &doms {
            s.remove_clone(d);
        }
    }
    eprintln!(
        "a signal in a 40-clone RBD batch: 9 trials over {:.0} ms, {stopped} stopped by the \
         signal, {kept} clones defined before it kept, nothing else left",
        span.as_secs_f64() * 1000.0
    );
}

/// The file case's first race on RBD, 24 trials at random offsets and in both orders: a
/// linked clone racing `tpl-lock --unlock` of its template never ends as a clone of an
/// unlocked template. Either the clone exists and the template is locked as before (its
/// disk at the protected snapshot, which is the clone's parent; the unlock refused naming
/// it), or the template is unlocked (no snapshot, disk at its head) and no image of the
/// clone exists (the clone refused).
#[test]
fn an_rbd_linked_clone_racing_an_unlock_never_stands_on_an_unlocked_template() {
    let mut s = RbdScratch::new();
    let t = locked_rbd_template(&mut s, "tpl");
    let pool = t.pool.clone();
    let parent = at_snap(&pool, &t.image);
    let mut rng = Rng::seeded("RBD clone vs unlock");
    let trials = 24;
    let (mut clone_won, mut unlock_won) = (0, 0);
    for trial in 0..trials {
        let c = s.name(&format!("c{trial}"));
        let offset = Duration::from_millis(rng.range(0, 150));
        let clone_first = rng.next_u64() % 2 == 0;
        let clone_args = [t.name.as_str(), c.as_str(), "--linked", "--no-identity"];
        let unlock_args = ["--unlock", t.name.as_str()];
        let (clone, unlock) = if clone_first {
            let c1 = spawn_tool("tpl-clone", &clone_args);
            std::thread::sleep(offset);
            (c1, spawn_tool("tpl-lock", &unlock_args))
        } else {
            let u = spawn_tool("tpl-lock", &unlock_args);
            std::thread::sleep(offset);
            (spawn_tool("tpl-clone", &clone_args), u)
        };
        let (cc, cerr) = finish(clone);
        let (uc, uerr) = finish(unlock);
        no_panic("tpl-clone", &cerr);
        no_panic("tpl-lock", &uerr);
        let made = domain_exists(&c);
        let locked = read_meta(&t.name).template.locked;
        let (points_at, snap) = template_state(&t.name, "vda");
        let what = format!(
            "trial {trial} (offset {offset:?}, clone first {clone_first}): clone exit {cc} \
             ({}), unlock exit {uc} ({}); locked {locked}, disk at {points_at:?}, snapshot {snap:?}",
            cerr.trim(),
            uerr.trim()
        );
        assert!(!(cc == 0 && uc == 0), "both succeeded: {what}");
        if made {
            assert_eq!(cc, 0, "{what}");
            assert!(
                locked && points_at.as_deref() == Some(SNAP) && snap == Some(true),
                "a linked clone of an unlocked template: {what}"
            );
            assert_eq!(
                rbd_parent(&pool, &c).as_deref(),
                Some(parent.as_str()),
                "{what}"
            );
            assert_eq!(uc, 3, "{what}");
            assert!(uerr.contains(&c), "the refusal names the clone: {what}");
            clone_won += 1;
        } else {
            assert_eq!(uc, 0, "{what}");
            assert!(!locked && points_at.is_none() && snap.is_none(), "{what}");
            assert_eq!(cc, 3, "{what}");
            assert!(cerr.contains("needs a locked template"), "{what}");
            let mine: Vec<String> = s
                .images()
                .into_iter()
                .filter(|i| i.trim_start_matches('.').starts_with(&c))
                .collect();
            assert!(
                mine.is_empty(),
                "the refused clone left images {mine:?}: {what}"
            );
            unlock_won += 1;
        }
        s.remove_clone(&c);
        if !locked {
            run("tpl-lock", &[&t.name], None).ok(1);
        }
    }
    eprintln!(
        "RBD clone vs unlock: {trials} trials, the clone won {clone_won}, the unlock {unlock_won}"
    );
}

/// A domain with a qcow2 file disk (vda) and an RBD data disk (vdb): tpl-lock locks each
/// as its kind wants (the file a-w, the image at a protected snapshot); a linked clone
/// gets a qcow2 overlay and an rbd clone, a full clone a copy of each; unlock and
/// rename --disks are refused while the linked clone exists (nothing of either disk
/// changes); once it is gone, rename --disks renames the file and the image, and the
/// template keeps working under its new name; unlock then makes both writable again.
#[test]
fn a_domain_with_a_file_disk_and_an_rbd_disk_works_disk_by_disk() {
    let mut s = RbdScratch::new();
    let name = s.name("mix");
    let pool = s.pool.clone();
    let data = s.rbd_image("mix-data", 16);
    assert_eq!(data, format!("{name}-data"));
    let disk = s.disk(&format!("{name}.qcow2"));
    let console = s.dir.join(format!("{name}.console.log"));
    let xml = guest_xml(&name, &disk, &console, &rbd_disk_xml(&pool, &data, "vdb"));
    let uuid = s.define(&xml);
    mark_generalized(&name);

    let r = run("tpl-lock", &[&name], None).ok(1);
    let rec = only(&r);
    let kinds: Vec<&str> = rec.disks.iter().map(|d| d.kind.as_str()).collect();
    assert_eq!(kinds, ["file", "rbd"], "{rec:?}");
    assert_eq!(mode(&disk) & 0o222, 0, "the file is read-only");
    assert_eq!(rbd_snapshots(&pool, &data), [(SNAP.into(), true)]);
    assert_eq!(
        template_state(&name, "vdb"),
        (Some(SNAP.into()), Some(true))
    );
    let (ok, text) = virsh_try(&["start", &name]);
    assert!(!ok, "the locked template started: {text}");

    // A linked clone: a qcow2 overlay on the file and an rbd clone of the snapshot.
    let lc = s.name("lc");
    let r = run(
        "tpl-clone",
        &[&name, &lc, "--linked", "--no-identity"],
        None,
    )
    .ok(1);
    let rec = only(&r);
    let overlay = s.dir.join(format!("{lc}.qcow2"));
    assert_eq!(
        rec.disks[0].path.as_deref(),
        Some(overlay.as_path()),
        "{rec:?}"
    );
    assert_eq!(rec.disks[0].backing[0].path, disk, "{rec:?}");
    let lc_data = format!("{lc}-data");
    assert_eq!(rec.disks[1].rbd.as_ref().unwrap().image, lc_data, "{rec:?}");
    let parent = at_snap(&pool, &data);
    assert_eq!(
        rbd_parent(&pool, &lc_data).as_deref(),
        Some(parent.as_str())
    );
    // A full clone: a copy of each.
    let fc = s.name("fc");
    let r = run("tpl-clone", &[&name, &fc, "--full", "--no-identity"], None).ok(1);
    let rec = only(&r);
    assert!(rec.disks.iter().all(|d| d.backing.is_empty()), "{rec:?}");
    assert!(same_content(&disk, &s.dir.join(format!("{fc}.qcow2"))));
    assert_eq!(rbd_parent(&pool, &format!("{fc}-data")), None);

    // While the linked clone exists: unlock and rename --disks are refused, nothing moves.
    let before = (mode(&disk), s.images());
    run("tpl-lock", &["--unlock", &name], None)
        .fails(3)
        .says(&[&format!("{pool}/{lc_data}"), p(&overlay)]);
    let renamed = s.name("Mix2");
    let r = run("tpl-rename", &["--disks", &name, &renamed], None).fails(3);
    no_panic("tpl-rename", &r.stderr);
    assert_eq!((mode(&disk), s.images()), before, "{}", r.stderr);
    assert_eq!(virsh(&["domname", &uuid]).trim(), name);
    assert!(read_meta(&name).template.locked);
    assert_eq!(
        template_state(&name, "vdb"),
        (Some(SNAP.into()), Some(true))
    );

    // Once it is gone: both renamed, the image with its protected snapshot.
    s.remove_clone(&lc);
    let r = run("tpl-rename", &["--disks", &name, &renamed], None).ok(1);
    let rec = only(&r);
    let new_disk = s.dir.join(format!("{renamed}.qcow2"));
    let new_data = format!("{renamed}-data");
    assert_eq!(
        rec.disks[0].path.as_deref(),
        Some(new_disk.as_path()),
        "{rec:?}"
    );
    assert_eq!(
        rec.disks[1].rbd.as_ref().unwrap().image,
        new_data,
        "{rec:?}"
    );
    assert!(new_disk.exists() && !disk.exists());
    assert!(rbd_exists(&pool, &new_data) && !rbd_exists(&pool, &data));
    assert_eq!(rbd_snapshots(&pool, &new_data), [(SNAP.into(), true)]);
    assert_eq!(
        template_state(&renamed, "vdb"),
        (Some(SNAP.into()), Some(true))
    );
    assert_eq!(mode(&new_disk) & 0o222, 0, "still locked");
    // The renamed template clones from its new names.
    let lc2 = s.name("lc2");
    run("tpl-clone", &[&renamed, &lc2, "--no-identity"], None).ok(1);
    assert_eq!(
        rbd_parent(&pool, &format!("{lc2}-data")),
        Some(at_snap(&pool, &new_data))
    );
    run("tpl-lock", &["--unlock", &renamed], None)
        .fails(3)
        .says(&[&format!("{pool}/{lc2}-data")]);
    s.remove_clone(&lc2);
    // Unlocked: the file writable, the snapshot gone, the disk at the image's head.
    run("tpl-lock", &["--unlock", &renamed], None).ok(1);
    assert_eq!(mode(&new_disk) & 0o200, 0o200);
    assert_eq!(template_state(&renamed, "vdb"), (None, None));
    assert!(rbd_snapshots(&pool, &new_data).is_empty());
}

/// A host without Ceph's client libraries, made here by a mount namespace that binds
/// /dev/null over librbd.so.1 (what the dynamic loader would find of it): the tools load
/// librbd only when a disk is on RBD, so work on file disks goes on; a run that meets an
/// RBD disk says what is missing and what to install, and makes nothing.
#[test]
fn without_librbd_file_disks_work_and_an_rbd_disk_names_the_missing_library() {
    let lib = ldconfig_path("librbd.so.1");
    let real = fs::canonicalize(&lib).unwrap();
    let mut s = RbdScratch::new();
    let rbd = locked_rbd_template(&mut s, "norbd");
    let file = s.s.guest("file");
    mark_generalized(&file.name);
    run("tpl-lock", &[&file.name], None).ok(1);

    let masked_sh = |script: &str| {
        let inner = format!(
            "mount --bind /dev/null {} && {script}",
            shlex::try_quote(real.to_str().unwrap()).unwrap()
        );
        format!(
            "exec unshare -m --propagation private sh -c {}",
            shlex::try_quote(&inner).unwrap()
        )
    };
    let masked = |script: &str| pipeline(&masked_sh(script));
    // The mask holds: librbd does not load in there.
    let probe = shell(
        "sh",
        &masked_sh(&format!(
            "python3 -c 'import ctypes; ctypes.CDLL(\"{}\")'",
            lib.display()
        )),
    )
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&probe.stderr);
    assert!(
        !probe.status.success() && said.contains("librbd.so.1"),
        "librbd.so.1 is not masked: {probe:?}"
    );

    let fc = s.s.name("fc");
    let lc = s.s.name("lc");
    let r = masked(&format!(
        "tpl-clone {0} {fc} --full --no-identity && tpl-clone {0} {lc} --linked \
         --no-identity && tpl-list --clones-of {0} --json",
        file.name
    ));
    assert_eq!(r.code, 0, "file clones without librbd: {}", r.stderr);
    let listed: Vec<&str> = r.records.iter().map(|c| c.name.as_str()).collect();
    assert!(listed.contains(&lc.as_str()), "{listed:?} {}", r.stderr);
    assert!(domain_exists(&fc) && domain_exists(&lc));

    let rc = s.s.name("rc");
    let r = masked(&format!("tpl-clone {} {rc} --no-identity", rbd.name));
    assert_ne!(r.code, 0, "an RBD clone without librbd: {}", r.stdout);
    assert!(r.records.is_empty(), "{}", r.stdout);
    let disk = format!("for the RBD disk '{}/{}'", rbd.pool, rbd.image);
    for part in ["librbd.so.1", "apt install librbd1", &disk] {
        assert!(r.stderr.contains(part), "lacks {part:?}: {}", r.stderr);
    }
    no_panic("tpl-clone", &r.stderr);
    assert!(!domain_exists(&rc), "a clone was defined: {}", r.stderr);
    assert!(
        !s.images().iter().any(|i| i.starts_with(&rc)),
        "an image was made: {:?}",
        s.images()
    );
    for c in [&fc, &lc] {
        run("tpl-rm", &[c], None).ok(0);
    }
}

/// Where the dynamic loader finds `soname` (`ldconfig -p`).
fn ldconfig_path(soname: &str) -> std::path::PathBuf {
    let out = sh("ldconfig", &["-p"]);
    out.lines()
        .filter(|l| l.trim_start().starts_with(&format!("{soname} ")))
        .filter(|l| l.contains("x86-64"))
        .find_map(|l| l.split(" => ").nth(1))
        .map(|p| p.trim().into())
        .unwrap_or_else(|| panic!("ldconfig -p does not list {soname}:\n{out}"))
}

/// An image open elsewhere (here a handle this test holds, as a VM or an `rbd map`
/// would) is changed by no tool: lock, rename --disks and rm refuse with exit 3, naming
/// the watcher; once it is closed, each goes through.
#[test]
fn an_image_open_elsewhere_is_locked_renamed_and_removed_by_no_tool() {
    let mut s = RbdScratch::new();
    let g = s.rbd_guest("busy");
    mark_generalized(&g.name);
    let spec = rbd_spec(&g.pool, &g.image);
    let renamed = s.s.name("busy2");
    let who = with_ceph(|c| {
        let _open = c.open(&spec).unwrap();
        let who = format!("client.{}", c.client_id());
        for (tool, args) in [
            ("tpl-lock", vec![g.name.as_str()]),
            ("tpl-rename", vec!["--disks", &g.name, &renamed]),
            ("tpl-rm", vec![g.name.as_str()]),
        ] {
            let r = run(tool, &args, None).fails(3);
            for part in ["is open elsewhere (1 watcher", &who, &g.image] {
                assert!(
                    r.stderr.contains(part),
                    "{tool} lacks {part:?}: {}",
                    r.stderr
                );
            }
            assert!(domain_exists(&g.name), "{tool}: {}", r.stderr);
            assert!(rbd_exists(&g.pool, &g.image), "{tool}: {}", r.stderr);
            assert_eq!(rbd_snapshots(&g.pool, &g.image), Vec::new(), "{tool}");
        }
        who
    });
    // closed: the same steps go through
    run("tpl-lock", &[&g.name], None).ok(1);
    let r = run("tpl-rename", &["--disks", &g.name, &renamed], None).ok(1);
    assert!(!r.stderr.contains(&who), "{}", r.stderr);
    run("tpl-rm", &[&renamed], None).ok(0);
    assert!(!domain_exists(&renamed));
}

/// The one reason a kept journal is taken for the OSD's: the warning of a run in CI.
#[test]
fn a_kept_journal_is_the_osds_only_when_every_warning_names_a_watch_it_kept() {
    let ghost = "tpl-lock: warning: kept the journal /var/lib/tpl-test/t/clone-journal/\
        tpl-clone-28284-6f603898.journal of a killed tpl-clone for a later run: cannot remove \
        temporary RBD image 'p/.c-02.tpl-tmp-vm-28284' of unfinished clone 'c-02' yet: remove \
        p/.c-02.tpl-tmp-vm-28284: busy (EBUSY: Device or resource busy): the image is open \
        elsewhere (it has watchers, e.g. a running VM) (still, after 45s; still watched by the \
        killed run's connection client.4912 at 127.0.0.1:0/2158329640 (cookie \
        139624891625664) although that address is blocklisted: the OSD has not dropped the \
        watch)";
    let other = "tpl-lock: warning: kept the journal /x.journal of a killed tpl-clone for a \
        later run: cannot remove temporary RBD image 'p/i' yet: busy (still, after 45s; \
        watched by client.9 at 127.0.0.1:0/1 (not the killed run's connection))";
    assert!(ghost_watch_kept(ghost));
    assert!(ghost_watch_kept(&format!(
        "{ghost}\n{ghost}\ntpl-lock: nothing to do"
    )));
    assert!(!ghost_watch_kept(other));
    assert!(!ghost_watch_kept(&format!("{ghost}\n{other}")));
    assert!(!ghost_watch_kept(
        "tpl-lock: domain 'x' is already locked; nothing to do"
    ));
}

/// Issue 20 on RBD: a linked clone (one alone, and a batch made ahead) with --disk-size
/// is an rbd clone of the snapshot grown to the size, and its seed, which has no file disk
/// to go beside, goes to --dir.
#[test]
fn rbd_clones_grow_to_the_disk_size_and_keep_their_seed_in_dir() {
    let mut s = RbdScratch::new();
    let t = locked_rbd_template(&mut s, "tpl");
    let size = |image: &str| {
        with_ceph(|c| c.info(&rbd_spec(&s.pool, image)))
            .unwrap_or_else(|e| panic!("{e}"))
            .size
    };
    let before = size(&t.image);
    let key = s.s.dir.join("id.pub");
    succeed(Command::new("ssh-keygen").args([
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        p(&s.s.dir.join("id")),
    ]));
    // Without --dir the seed has nowhere to go.
    let one = s.s.name("big1");
    run("tpl-clone", &[&t.name, &one, "--ssh-key", p(&key)], None)
        .fails(2)
        .says(&["--dir"]);
    let grown = before + (64 << 20);
    let g = format!("{}M", grown >> 20);
    let r = run(
        "tpl-clone",
        &[
            &t.name,
            &one,
            "--disk-size",
            &g,
            "--ssh-key",
            p(&key),
            "--dir",
            p(&s.s.dir),
        ],
        None,
    )
    .ok(1);
    let img = rbd_source_of(&one, "vda").image;
    assert_eq!(size(&img), grown, "the clone's image grew");
    assert_eq!(size(&t.image), before, "the template's did not");
    assert_eq!(rbd_parent(&s.pool, &img), Some(at_snap(&s.pool, &t.image)));
    let seed = s.s.dir.join(format!("{one}-cidata.img"));
    assert_eq!(
        only(&r)
            .clone
            .as_ref()
            .and_then(|c| c.seed.clone())
            .as_deref(),
        Some(seed.as_path())
    );
    // A batch, whose images are made ahead by threads, grows each.
    let prefix = s.s.name("bb");
    run(
        "tpl-clone",
        &[
            &t.name,
            "--count",
            "10",
            "--prefix",
            &prefix,
            "--disk-size",
            &g,
        ],
        None,
    )
    .ok(10);
    for i in 1..=10 {
        let img = rbd_source_of(&format!("{prefix}{i:02}"), "vda").image;
        assert_eq!(size(&img), grown, "{img}");
    }
    // Smaller than the template's: refused before anything is made.
    run(
        "tpl-clone",
        &[&t.name, &s.s.name("small"), "--disk-size", "1M"],
        None,
    )
    .fails(2)
    .says(&["smaller than the template's"]);
}

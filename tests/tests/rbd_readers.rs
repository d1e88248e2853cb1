//! Tools reading linked RBD clones under CPU load (issue 12), against the real test
//! cluster: a librbd 16.2.15 abort that tpl works around. A file of its own, so that its
//! busy threads load nothing but its own runs (test files run one after another).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tpl_tests::*;

/// librbd 16.2.15 can abort a tool that opens and closes a linked clone read-only early
/// in its run ("terminate called after throwing an instance of 'std::system_error'"):
/// the close runs on one of librados' two io_context threads while the handler that
/// completed the open still runs on the other. It showed with long image names under
/// CPU load, in 5 to 11 of 200 runs of `tpl-rm --dry-run` on a clone, and took down a
/// `tpl-rm` in `make test`. tpl's read-only looks go through a connection with one
/// librados io_context thread (see tpl_ceph::Cluster::reader); this is the tool-level
/// proof, under busy threads.
#[test]
fn tools_reading_linked_rbd_clones_under_load_never_abort() {
    let mut s = RbdScratch::new();
    let t = s.rbd_guest("tpl");
    mark_generalized(&t.name);
    run("tpl-lock", &[&t.name], None).ok(1);
    let prefix = format!("{}-reader-", s.s.prefix);
    let args = [
        &t.name,
        "--count",
        "5",
        "--prefix",
        &prefix,
        "--linked",
        "--no-identity",
    ];
    let clones: Vec<String> = run("tpl-clone", &args, None)
        .ok(5)
        .records
        .into_iter()
        .map(|r| r.name)
        .collect();
    let stop = AtomicBool::new(false);
    let load = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let runs = 200;
    let t0 = Instant::now();
    let failed: Vec<String> = std::thread::scope(|sc| {
        for _ in 0..load {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        // The busy threads stop however this ends, a panic included.
        let _stop = StopOnDrop(&stop);
        (0..runs)
            .filter_map(|i| {
                let n = &clones[i % clones.len()];
                let r = run("tpl-rm", &["--dry-run", n], None);
                (r.code != 0).then(|| format!("run {i} on {n}: exit {}: {}", r.code, r.stderr))
            })
            .collect()
    });
    eprintln!(
        "tpl-rm --dry-run on linked RBD clones under {load} busy threads: {} of {runs} runs \
         failed ({:?})",
        failed.len(),
        t0.elapsed()
    );
    assert!(failed.is_empty(), "{failed:#?}");
    for n in &clones {
        run("tpl-rm", &[n], None).ok(0);
    }
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

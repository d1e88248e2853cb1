//! Shared by the integration tests: the test cluster, one pool per test.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use tpl_ceph::{Cluster, ConnectOptions, ImageSpec, NewImageOptions};

pub const HOW_TO_START: &str = "start the test cluster and point CEPH_CONF at it:\n\
    \x20   sudo scripts/ceph-up.sh            # from the repository root, as root; installs ceph if missing\n\
    \x20   export CEPH_CONF=/var/lib/tpl-ceph/ceph.conf";

/// The test cluster, or a loud failure saying how to start it.
pub fn connect() -> Cluster {
    connect_timed().0
}

/// The cluster and how long connecting took.
pub fn connect_timed() -> (Cluster, Duration) {
    let conf = match std::env::var("CEPH_CONF") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            panic!("CEPH_CONF is not set: these tests need a running Ceph cluster; {HOW_TO_START}")
        }
    };
    let t0 = Instant::now();
    match Cluster::connect(&ConnectOptions::default().timeout(Duration::from_secs(10))) {
        Ok(c) => (c, t0.elapsed()),
        Err(e) => panic!("cannot reach the test cluster of CEPH_CONF={conf}: {e}\n{HOW_TO_START}"),
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

/// A pool of this test's own, `tplt-<pid>-<n>`, deleted on drop (pass or
/// fail: drop runs while a failed assertion unwinds).
pub struct TestPool<'c> {
    cluster: &'c Cluster,
    pub name: String,
}

impl<'c> TestPool<'c> {
    pub fn new(cluster: &'c Cluster) -> TestPool<'c> {
        SWEEP.call_once(|| sweep_stale_pools(cluster));
        let name = format!(
            "tplt-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        cluster
            .pool_create(&name, 8)
            .unwrap_or_else(|e| panic!("cannot create test pool: {e}"));
        TestPool { cluster, name }
    }

    pub fn spec(&self, image: &str) -> ImageSpec {
        ImageSpec::new(&self.name, image)
    }

    /// A new image of `size` bytes with the default features.
    pub fn image(&self, name: &str, size: u64) -> ImageSpec {
        let spec = self.spec(name);
        self.cluster
            .create(&spec, size, &NewImageOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        spec
    }
}

impl Drop for TestPool<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cluster.pool_delete(&self.name) {
            // never panic in drop (it may run during a failed test's unwind)
            eprintln!("WARNING: test pool {} not deleted: {e}", self.name);
        }
    }
}

/// Pools `tplt-<pid>-*` of test processes that no longer run (killed
/// before their pools' drop ran).
fn sweep_stale_pools(cluster: &Cluster) {
    let Ok(pools) = cluster.pools() else { return };
    for p in pools {
        let Some(pid) = p.strip_prefix("tplt-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match cluster.pool_delete(&p) {
                Ok(()) => eprintln!("deleted stale test pool {p}"),
                Err(e) => eprintln!("WARNING: stale test pool {p} not deleted: {e}"),
            }
        }
    }
}

/// Deterministic bytes, different for each seed.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed).wrapping_mul(0x0101_0101);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

pub fn read(cluster: &Cluster, spec: &ImageSpec, offset: u64, len: usize) -> Vec<u8> {
    let img = cluster
        .open_read_only(spec)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = vec![0u8; len];
    let n = img
        .read_at(offset, &mut buf)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, len, "short read of {spec}");
    buf
}

pub fn write(cluster: &Cluster, spec: &ImageSpec, offset: u64, data: &[u8]) {
    let img = cluster.open(spec).unwrap_or_else(|e| panic!("{e}"));
    img.write_at(offset, data).unwrap_or_else(|e| panic!("{e}"));
    img.flush().unwrap_or_else(|e| panic!("{e}"));
}

pub const MIB: u64 = 1 << 20;

/// The clones of snapshot `snap`, as specs, in the collection the caller wants.
pub fn child_specs<C: FromIterator<ImageSpec>>(cluster: &Cluster, snap: &ImageSpec) -> C {
    cluster
        .children(snap)
        .unwrap()
        .into_iter()
        .map(|k| k.spec)
        .collect()
}

//! Measures what the README reports, against the cluster of `CEPH_CONF`,
//! in a pool of its own (`tplb-<pid>`, deleted at the end):
//!
//! * connect time;
//! * 100 linked clones over one connection (`Cluster::clone_many`) vs a
//!   shell-style loop of `rbd clone` processes (20 of them);
//! * full clones of a template snapshot — a 10 GiB image holding 1 GiB of
//!   data — by `Cluster::deep_copy`, clone + `Cluster::flatten`,
//!   `Cluster::copy` (rbd_copy), and by the `rbd deep cp`, `rbd cp` and
//!   `qemu-img convert` (rbd -> rbd) commands.
//!
//! ```sh
//! CEPH_CONF=/var/lib/tpl-ceph/ceph.conf cargo run --release --example rbd-bench [-- SIZE_GIB DATA_GIB ROUNDS]
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use tpl_ceph::{Cluster, ConnectOptions, ImageSpec, NewImageOptions};

const MIB: u64 = 1 << 20;

type BoxResult<T = ()> = Result<T, Box<dyn std::error::Error>>;
type Method<'a> = (&'static str, Box<dyn Fn(&ImageSpec) -> BoxResult + 'a>);

fn main() -> BoxResult {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let size_gib = args.first().copied().unwrap_or(10);
    let data_gib = args.get(1).copied().unwrap_or(1);
    let rounds = args.get(2).copied().unwrap_or(2);
    let conf = std::env::var("CEPH_CONF").map_err(|_| "set CEPH_CONF (see scripts/ceph-up.sh)")?;

    let t0 = Instant::now();
    let c = Cluster::connect(&ConnectOptions::default())?;
    println!(
        "connect: {:?} ({})",
        t0.elapsed(),
        tpl_ceph::library_versions()?
    );

    let pool = format!("tplb-{}", std::process::id());
    c.pool_create(&pool, 32)?;
    let r = run(&c, &pool, &conf, size_gib, data_gib, rounds);
    c.pool_delete(&pool)?;
    r
}

fn time<T>(label: &str, f: impl FnOnce() -> T) -> (T, Duration) {
    let t0 = Instant::now();
    let r = f();
    let d = t0.elapsed();
    println!("  {label:<44} {:>8.2} s", d.as_secs_f64());
    (r, d)
}

fn sh(cmd: &mut Command) {
    let st = cmd.status().expect("spawn");
    assert!(st.success(), "{cmd:?} failed");
}

fn run(
    c: &Cluster,
    pool: &str,
    conf: &str,
    size_gib: u64,
    data_gib: u64,
    rounds: u64,
) -> BoxResult {
    let base = ImageSpec::new(pool, "base");
    let size = size_gib << 30;
    c.create(&base, size, &NewImageOptions::default())?;
    // data_gib GiB in whole 4 MiB objects, spread evenly over the image
    let objects = size / (4 * MIB);
    let data_objects = (data_gib << 30) / (4 * MIB);
    let step = objects / data_objects.max(1);
    let img = c.open(&base)?;
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let t0 = Instant::now();
    for i in 0..data_objects {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = (j as u64 ^ (i * 2_654_435_761)).wrapping_mul(0x9e37_79b9) as u8 | 1;
        }
        img.write_at(i * step * 4 * MIB, &buf)?;
    }
    img.flush()?;
    drop(img);
    println!(
        "wrote {data_gib} GiB into a {size_gib} GiB image in {:?}",
        t0.elapsed()
    );
    let snap = base.at("tpl");
    c.snap_create(&snap)?;
    c.snap_protect(&snap)?;
    println!(
        "template {snap}: {} MiB allocated",
        c.allocated_bytes(&snap)? >> 20
    );

    // ---- linked clones
    let kids: Vec<ImageSpec> = (0..100).map(|i| base.sibling(format!("vm{i}"))).collect();
    let (res, d) = time("100 clones, clone_many, one connection", || {
        c.clone_many(&snap, &kids, &NewImageOptions::default())
    });
    for r in res {
        r?;
    }
    println!("    = {:.1} ms/clone", d.as_secs_f64() * 10.0);
    for _ in 0..2 {
        let (n, _) = time("children() of 100", || c.children(&snap).map(|k| k.len()));
        assert_eq!(n?, 100);
        time("`rbd children` of 100 (CLI)", || {
            sh(Command::new("rbd")
                .args(["-c", conf, "children", &snap.to_string()])
                .stdout(std::process::Stdio::null()))
        });
    }
    for k in &kids {
        c.remove(k)?;
    }
    let (_, d) = time("20 clones, `rbd clone` processes", || {
        for i in 0..20 {
            sh(Command::new("rbd").args([
                "-c",
                conf,
                "clone",
                &snap.to_string(),
                &base.sibling(format!("cli{i}")).to_string(),
            ]));
        }
    });
    println!("    = {:.1} ms/clone", d.as_secs_f64() * 1000.0 / 20.0);
    for i in 0..20 {
        c.remove(&base.sibling(format!("cli{i}")))?;
    }

    // ---- full clones: every method writes its own destination (a delete
    // right before a copy slows it down: the OSD is still freeing space), the
    // order rotates each round, and the OSD is compacted between rounds.
    let rbd_spec = |s: &ImageSpec| format!("rbd:{}/{}:conf={conf}:id=admin", s.pool, s.image);
    let src_rbd = format!("rbd:{}/{}@tpl:conf={conf}:id=admin", snap.pool, snap.image);
    let snap_s = snap.to_string();
    let methods: Vec<Method> = vec![
        (
            "Cluster::deep_copy (rbd_deep_copy)",
            Box::new(|d: &ImageSpec| Ok(c.deep_copy(&snap, d, &NewImageOptions::default())?)),
        ),
        (
            "Cluster::clone_image + flatten",
            Box::new(|d: &ImageSpec| {
                c.clone_image(&snap, d, &NewImageOptions::default())?;
                Ok(c.flatten(d)?)
            }),
        ),
        (
            "Cluster::copy (rbd_copy, sparse 4 KiB)",
            Box::new(|d: &ImageSpec| Ok(c.copy(&snap, d, &NewImageOptions::default())?)),
        ),
        (
            "`rbd deep cp` (CLI)",
            Box::new(|d: &ImageSpec| {
                sh(Command::new("rbd").args([
                    "-c",
                    conf,
                    "deep",
                    "cp",
                    "--no-progress",
                    &snap_s,
                    &d.to_string(),
                ]));
                Ok(())
            }),
        ),
        (
            "`rbd cp` (CLI)",
            Box::new(|d: &ImageSpec| {
                sh(Command::new("rbd").args([
                    "-c",
                    conf,
                    "cp",
                    "--no-progress",
                    &snap_s,
                    &d.to_string(),
                ]));
                Ok(())
            }),
        ),
        (
            "`qemu-img convert` rbd -> rbd",
            Box::new(|d: &ImageSpec| {
                sh(Command::new("qemu-img").args([
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &src_rbd,
                    &rbd_spec(d),
                ]));
                Ok(())
            }),
        ),
        (
            "`qemu-img convert -W -m 16` rbd -> rbd",
            Box::new(|d: &ImageSpec| {
                sh(Command::new("qemu-img").args([
                    "convert",
                    "-W",
                    "-m",
                    "16",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &src_rbd,
                    &rbd_spec(d),
                ]));
                Ok(())
            }),
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
    for round in 0..rounds as usize {
        println!("full clone of {snap}, round {}:", round + 1);
        let mut dsts = Vec::new();
        for k in 0..methods.len() {
            let m = (k + round) % methods.len();
            let (label, f) = &methods[m];
            let dst = base.sibling(format!("full{m}"));
            let (r, d) = time(label, || f(&dst));
            r?;
            times[m].push(d.as_secs_f64());
            if round == 0 {
                let info = c.info(&dst)?;
                println!(
                    "      -> parent {}, {} snapshot(s), {} MiB allocated, features {:?}",
                    info.parent.map_or("none".into(), |p| p.spec.to_string()),
                    c.snapshots(&dst)?.len(),
                    c.allocated_bytes(&dst)? >> 20,
                    info.features
                );
            }
            dsts.push(dst);
        }
        for dst in dsts {
            for s in c.snapshots(&dst)? {
                let spec = dst.at(&s.name);
                if s.protected {
                    c.snap_unprotect(&spec)?;
                }
                c.snap_remove(&spec)?;
            }
            c.remove(&dst)?;
        }
        let _ = Command::new("ceph")
            .args(["-c", conf, "tell", "osd.0", "compact"])
            .stdout(std::process::Stdio::null())
            .status();
    }
    println!(
        "\nfull clone of a {size_gib} GiB image holding {data_gib} GiB, {rounds} rounds (seconds):"
    );
    println!(
        "  {:<44} {:>6} {:>6} {:>6}",
        "method", "min", "median", "max"
    );
    for ((label, _), mut t) in methods.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        println!(
            "  {label:<44} {:>6.2} {:>6.2} {:>6.2}",
            t[0],
            t[t.len() / 2],
            t[t.len() - 1]
        );
    }
    c.snap_unprotect(&snap)?;
    c.snap_remove(&snap)?;
    c.remove(&base)?;
    Ok(())
}

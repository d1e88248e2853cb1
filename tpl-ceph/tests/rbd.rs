//! tpl-ceph against a real cluster (CEPH_CONF): every test makes its own
//! pool and deletes it at the end.

mod common;

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::time::Instant;

use common::{child_specs, connect, connect_timed, pattern, read, write, TestPool, MIB};
use tpl_ceph::{Error, Features, ImageSpec, NewImageOptions};

fn defaults() -> NewImageOptions {
    NewImageOptions::default()
}

#[test]
fn connect_reports_fsid_and_monitors_of_the_conf() {
    let (c, took) = connect_timed();
    println!(
        "connect: {took:?} ({})",
        tpl_ceph::library_versions().unwrap()
    );
    let conf = std::fs::read_to_string(std::env::var("CEPH_CONF").unwrap()).unwrap();
    let value = |key: &str| {
        conf.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    assert_eq!(Some(c.fsid().unwrap()), value("fsid"));
    let mons = c.mon_addrs().unwrap();
    assert!(!mons.is_empty());
    // every monmap address appears in the conf's mon_host
    let mon_host = value("mon_host").expect("mon_host in CEPH_CONF");
    for m in &mons {
        assert!(
            mon_host.contains(&format!("{}:{}", m.protocol, m.addr)),
            "{m:?} not in mon_host {mon_host}"
        );
    }
    assert!(mons.iter().any(|m| m.protocol == "v1"), "{mons:?}");
    assert_eq!(c.user(), "admin");
    // librados' two io_context threads on the main connection: with one, librbd
    // deadlocks in rbd_snap_unprotect (see Cluster::reader)
    assert_eq!(c.conf_get("librados_thread_count").unwrap(), "2");
}

#[test]
fn pools_are_created_listed_and_deleted() {
    let c = connect();
    let name;
    {
        let pool = TestPool::new(&c);
        name = pool.name.clone();
        assert!(c.pool_exists(&name).unwrap());
        assert!(c.pools().unwrap().contains(&name));
        let e = c.pool_create(&name, 8).unwrap_err();
        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
        assert!(c.list(&name).unwrap().is_empty());
    }
    assert!(
        !c.pool_exists(&name).unwrap(),
        "TestPool drop deletes {name}"
    );
    let e = c.list(&name).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

#[test]
fn create_list_exists_info() {
    let c = connect();
    let pool = TestPool::new(&c);
    let a = pool.image("a", 64 * MIB);
    pool.image("b", 8 * MIB);
    assert_eq!(c.list(&pool.name).unwrap(), ["a", "b"]);
    assert!(c.exists(&a).unwrap());
    assert!(!c.exists(&pool.spec("nope")).unwrap());
    assert!(!c.exists(&a.at("nosnap")).unwrap());
    let missing_pool = ImageSpec::new(format!("{}-gone", pool.name), "a");
    let e = c.exists(&missing_pool).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("no such pool"), "{e}");

    let info = c.info(&a).unwrap();
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.object_size, 4 * MIB);
    assert_eq!(info.num_objects, 16);
    assert!(
        info.features.contains(Features::LAYERING),
        "{:?}",
        info.features
    );
    assert!(info.parent.is_none());
    assert!(!info.id.is_empty());

    let e = c.create(&a, MIB, &defaults()).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    let e = c.info(&pool.spec("nope")).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{}/nope", pool.name)) && msg.contains("ENOENT"),
        "{msg}"
    );
}

#[test]
fn snapshot_protect_clone_children() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 64 * MIB);
    let data = pattern(1, 3 * MIB as usize);
    write(&c, &base, 5 * MIB, &data);
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    let e = c.snap_create(&snap).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");

    let snaps = c.snapshots(&base).unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!((snaps[0].name.as_str(), snaps[0].protected), ("tpl", false));
    assert_eq!(snaps[0].size, 64 * MIB);

    // clone format 1 (this cluster's min client is luminous): protect first
    let e = c
        .clone_image(&snap, &pool.spec("early"), &defaults())
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert!(e.to_string().contains("protected"), "{e}");

    c.snap_protect(&snap).unwrap();
    assert!(c.snapshots(&base).unwrap()[0].protected);
    let e = c.snap_protect(&snap).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");

    let web1 = pool.spec("web1");
    let web2 = pool.spec("web2");
    c.clone_image(&snap, &web1, &defaults()).unwrap();
    c.clone_image(&snap, &web2, &defaults()).unwrap();
    let e = c.clone_image(&snap, &web1, &defaults()).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");

    let kids: BTreeSet<ImageSpec> = c
        .children(&snap)
        .unwrap()
        .into_iter()
        .inspect(|k| assert!(!k.in_trash))
        .map(|k| k.spec)
        .collect();
    assert_eq!(kids, BTreeSet::from([web1.clone(), web2.clone()]));
    let e = c.children(&base).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    let info = c.info(&web1).unwrap();
    let parent = info.parent.expect("a clone has a parent");
    assert_eq!(parent.spec, snap);
    assert!(!parent.in_trash);
    assert!(info.features.contains(Features::LAYERING));
    assert_eq!(info.size, 64 * MIB);
    // a linked clone reads the parent's data and owns none of it
    assert_eq!(read(&c, &web1, 5 * MIB, data.len()), data);
    assert_eq!(c.allocated_bytes(&web1).unwrap(), 0);

    // writing to the clone does not change the template
    write(&c, &web2, 5 * MIB, &pattern(2, 4096));
    assert_eq!(read(&c, &snap, 5 * MIB, data.len()), data);
    assert_eq!(read(&c, &base, 5 * MIB, data.len()), data);
}

#[test]
fn unprotect_is_refused_while_clones_exist() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 16 * MIB);
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    let kid = pool.spec("kid");
    c.clone_image(&snap, &kid, &defaults()).unwrap();

    let e = c.snap_unprotect(&snap).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::EBUSY));
    let msg = e.to_string();
    assert!(
        msg.contains(&snap.to_string()) && msg.contains("EBUSY") && msg.contains("linked clones"),
        "{msg}"
    );
    println!("unprotect with a child: {msg}");

    let e = c.snap_remove(&snap).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
    assert!(e.to_string().contains("protected"), "{e}");
    assert!(c.snapshots(&base).unwrap()[0].protected);

    c.remove(&kid).unwrap();
    assert!(c.children(&snap).unwrap().is_empty());
    c.snap_unprotect(&snap).unwrap();
    let e = c.snap_unprotect(&snap).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    c.snap_remove(&snap).unwrap();
    assert!(c.snapshots(&base).unwrap().is_empty());
}

#[test]
fn rename_never_overwrites() {
    let c = connect();
    let pool = TestPool::new(&c);
    let a = pool.image("a", 8 * MIB);
    let b = pool.image("b", 8 * MIB);
    write(&c, &a, 0, &pattern(10, 4096));
    write(&c, &b, 0, &pattern(11, 4096));

    let e = c.rename(&a, "b").unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e:?}");
    assert!(e.to_string().contains("nothing was renamed"), "{e}");
    assert_eq!(read(&c, &a, 0, 4096), pattern(10, 4096));
    assert_eq!(read(&c, &b, 0, 4096), pattern(11, 4096));
    assert_eq!(c.list(&pool.name).unwrap(), ["a", "b"]);

    let moved = c.rename(&a, "c").unwrap();
    assert_eq!(moved, pool.spec("c"));
    assert!(!c.exists(&a).unwrap());
    assert_eq!(read(&c, &moved, 0, 4096), pattern(10, 4096));
    assert_eq!(c.list(&pool.name).unwrap(), ["b", "c"]);

    let e = c.rename(&a, "d").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = c.rename(&b, "x/y").unwrap_err();
    assert!(matches!(e, Error::InvalidName { .. }), "{e}");
    let e = c.rename(&b.at("s"), "z").unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    // a clone keeps its parent link across a rename, and the parent's
    // children list follows the new name
    let snap = b.at("s");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    c.clone_image(&snap, &pool.spec("k"), &defaults()).unwrap();
    let k2 = c.rename(&pool.spec("k"), "k2").unwrap();
    let kids: Vec<ImageSpec> = child_specs(&c, &snap);
    assert_eq!(kids, std::slice::from_ref(&k2));
    assert_eq!(c.info(&k2).unwrap().parent.unwrap().spec, snap);
}

#[test]
fn remove_is_refused_while_snapshots_exist() {
    let c = connect();
    let pool = TestPool::new(&c);
    let img = pool.image("img", 8 * MIB);
    c.snap_create(&img.at("s1")).unwrap();
    let e = c.remove(&img).unwrap_err();
    assert!(matches!(e, Error::NotEmpty { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&img.to_string()) && msg.contains("snapshots"),
        "{msg}"
    );
    println!("remove with a snapshot: {msg}");
    assert!(c.exists(&img).unwrap());

    c.snap_remove(&img.at("s1")).unwrap();
    c.remove(&img).unwrap();
    assert!(!c.exists(&img).unwrap());
    let e = c.remove(&img).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

#[test]
fn flatten_makes_a_clone_independent() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 64 * MIB);
    let data = pattern(3, 2 * MIB as usize);
    write(&c, &base, 0, &data);
    write(&c, &base, 40 * MIB, &data);
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    let kid = pool.spec("kid");
    c.clone_image(&snap, &kid, &defaults()).unwrap();
    assert_eq!(c.allocated_bytes(&kid).unwrap(), 0);

    let mut calls = Vec::new();
    c.flatten_with_progress(&kid, |done, total| {
        calls.push((done, total));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(!calls.is_empty(), "no progress reported");
    assert!(calls.iter().all(|&(d, t)| t == 16 && d < t), "{calls:?}");

    assert!(c.children(&snap).unwrap().is_empty());
    assert!(c.info(&kid).unwrap().parent.is_none());
    // the flattened clone owns the two objects ranges that hold data
    assert_eq!(c.allocated_bytes(&kid).unwrap(), 8 * MIB);
    // the template can now go away entirely; the clone keeps its data
    c.snap_unprotect(&snap).unwrap();
    c.snap_remove(&snap).unwrap();
    c.remove(&base).unwrap();
    assert_eq!(read(&c, &kid, 0, data.len()), data);
    assert_eq!(read(&c, &kid, 40 * MIB, data.len()), data);
    assert_eq!(read(&c, &kid, 20 * MIB, 4096), vec![0u8; 4096]);

    let e = c.flatten(&kid).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert!(e.to_string().contains("not a clone"), "{e}");
}

#[test]
fn flatten_can_be_cancelled_and_resumed() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 256 * MIB);
    let data = pattern(4, 64 * 1024);
    for i in 0..64 {
        write(&c, &base, i * 4 * MIB, &data);
    }
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    let kid = pool.spec("kid");
    c.clone_image(&snap, &kid, &defaults()).unwrap();

    let mut calls = 0;
    let e = c
        .flatten_with_progress(&kid, |_, _| {
            calls += 1;
            ControlFlow::Break(())
        })
        .unwrap_err();
    assert!(matches!(e, Error::Cancelled { .. }), "{e:?}");
    assert_eq!(
        calls, 1,
        "the callback is not asked again once it said stop"
    );
    // still a clone, still listed as a child
    assert!(c.info(&kid).unwrap().parent.is_some());
    assert_eq!(c.children(&snap).unwrap().len(), 1);
    let partial = c.allocated_bytes(&kid).unwrap();
    assert!(
        partial < 64 * 4 * MIB,
        "cancelled flatten copied everything"
    );

    c.flatten(&kid).unwrap();
    assert!(c.info(&kid).unwrap().parent.is_none());
    assert!(c.children(&snap).unwrap().is_empty());
    assert_eq!(read(&c, &kid, 63 * 4 * MIB, data.len()), data);
}

#[test]
fn a_panicking_progress_callback_cancels_and_propagates() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 32 * MIB);
    write(&c, &base, 0, &pattern(5, 4096));
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    let kid = pool.spec("kid");
    c.clone_image(&snap, &kid, &defaults()).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.flatten_with_progress(&kid, |_, _| panic!("boom in progress"))
    }));
    let payload = r.expect_err("the callback's panic reaches the caller");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in progress"));
    // the connection is still usable
    assert!(c.info(&kid).unwrap().parent.is_some());
}

#[test]
fn deep_copy_keeps_snapshots_copy_does_not() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 32 * MIB);
    let v1 = pattern(6, MIB as usize);
    let v2 = pattern(7, MIB as usize);
    write(&c, &base, 0, &v1);
    c.snap_create(&base.at("s1")).unwrap();
    write(&c, &base, 0, &v2);

    let dc = pool.spec("dc");
    let mut progress_calls = 0u32;
    c.deep_copy_with_progress(&base, &dc, &defaults(), |_, _| {
        progress_calls += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    println!("deep copy progress calls: {progress_calls}");
    let snaps: Vec<String> = c
        .snapshots(&dc)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(snaps, ["s1"]);
    assert_eq!(read(&c, &dc, 0, v2.len()), v2);
    assert_eq!(read(&c, &dc.at("s1"), 0, v1.len()), v1);
    assert_eq!(
        c.info(&dc).unwrap().features,
        c.info(&base).unwrap().features
    );

    // copy of a snapshot: that snapshot's data, no snapshots, no parent
    let cp = pool.spec("cp");
    c.copy(&base.at("s1"), &cp, &defaults()).unwrap();
    assert!(c.snapshots(&cp).unwrap().is_empty());
    assert!(c.info(&cp).unwrap().parent.is_none());
    assert_eq!(read(&c, &cp, 0, v1.len()), v1);
    // sparse: only the written object exists in the copy
    assert_eq!(c.allocated_bytes(&cp).unwrap(), 4 * MIB);

    // copy of a clone takes the parent's data in: a full clone
    let snap = base.at("s1");
    c.snap_protect(&snap).unwrap();
    let kid = pool.spec("kid");
    c.clone_image(&snap, &kid, &defaults()).unwrap();
    let full = pool.spec("full");
    c.copy(&kid, &full, &defaults()).unwrap();
    assert!(c.info(&full).unwrap().parent.is_none());
    assert_eq!(read(&c, &full, 0, v1.len()), v1);
    let kids: Vec<ImageSpec> = child_specs(&c, &snap);
    assert_eq!(
        kids,
        std::slice::from_ref(&kid),
        "a copy of a clone is not a child"
    );

    let e = c.copy(&base, &cp, &defaults()).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    let e = c.deep_copy(&base, &dc, &defaults()).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
}

#[test]
fn metadata_round_trip() {
    let c = connect();
    let pool = TestPool::new(&c);
    let img = pool.image("img", 8 * MIB);
    assert_eq!(c.metadata_get(&img, "tpl.made-by").unwrap(), None);
    c.metadata_set(&img, "tpl.made-by", "tpl-clone 0.1")
        .unwrap();
    c.metadata_set(&img, "tpl/template", "tpl/base@tpl — ünïcode")
        .unwrap();
    c.metadata_set(&img, "tpl.empty", "").unwrap();
    assert_eq!(
        c.metadata_get(&img, "tpl.made-by").unwrap().as_deref(),
        Some("tpl-clone 0.1")
    );
    assert_eq!(
        c.metadata_list(&img).unwrap(),
        [
            ("tpl.empty".to_string(), String::new()),
            ("tpl.made-by".to_string(), "tpl-clone 0.1".to_string()),
            (
                "tpl/template".to_string(),
                "tpl/base@tpl — ünïcode".to_string()
            ),
        ]
    );
    let long = "x".repeat(10_000);
    c.metadata_set(&img, "tpl.long", &long).unwrap();
    assert_eq!(c.metadata_get(&img, "tpl.long").unwrap(), Some(long));
    assert!(c.metadata_remove(&img, "tpl.made-by").unwrap());
    assert!(!c.metadata_remove(&img, "tpl.made-by").unwrap());
    assert_eq!(c.metadata_get(&img, "tpl.made-by").unwrap(), None);
    let e = c.metadata_get(&pool.spec("nope"), "k").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");

    // more keys than librbd fetches per round trip (128) all come back
    let img_h = c.open(&img).unwrap();
    for i in 0..150 {
        img_h
            .metadata_set(&format!("tpl.k{i:03}"), &i.to_string())
            .unwrap();
    }
    let all = img_h.metadata_list().unwrap();
    assert_eq!(all.len(), 150 + 3, "{}", all.len());
    assert!(all.contains(&("tpl.k149".to_string(), "149".to_string())));
    drop(img_h);

    // a handle at a snapshot is read-only
    c.snap_create(&img.at("s")).unwrap();
    let at_snap = c.open(&img.at("s")).unwrap();
    assert!(at_snap.is_read_only());
    let e = at_snap.metadata_set("k", "v").unwrap_err();
    assert_eq!(e.errno(), Some(libc::EROFS), "{e}");
    let e = at_snap.write_at(0, b"x").unwrap_err();
    assert_eq!(e.errno(), Some(libc::EROFS), "{e}");
}

/// The owner of an image's exclusive lock shows as a locker, by its client id (the one
/// `client_id` gives and watchers carry), and another connection can break that lock.
#[test]
fn lockers_name_the_exclusive_lock_owner_and_a_lock_can_be_broken() {
    let c = connect();
    let pool = TestPool::new(&c);
    let img = pool.image("img", 8 * MIB);
    assert!(c.lockers(&img).unwrap().is_empty());
    let other = connect();
    let held = other.open(&img).unwrap();
    held.write_at(0, b"x").unwrap(); // a write takes the exclusive lock
    let l = c.lockers(&img).unwrap();
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(
        l[0].client,
        format!("client.{}", other.client_id()),
        "{l:?}"
    );
    assert!(l[0].cookie.starts_with("auto "), "{l:?}");
    assert_eq!(c.watchers(&img).unwrap()[0].id as u64, other.client_id());
    c.break_lock(&img, &l[0]).unwrap();
    assert!(c.lockers(&img).unwrap().is_empty());
    drop(held);
    c.remove(&img).unwrap();
}

#[test]
fn watchers_show_who_has_an_image_open() {
    let c = connect();
    let pool = TestPool::new(&c);
    let img = pool.image("img", 8 * MIB);
    assert!(c.watchers(&img).unwrap().is_empty());

    // a read-only open does not watch
    let ro = c.open_read_only(&img).unwrap();
    assert!(c.watchers(&img).unwrap().is_empty());
    drop(ro);

    // a second connection holds it open read-write, like a running qemu
    let other = connect();
    let held = other.open(&img).unwrap();
    let w = c.watchers(&img).unwrap();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].addr.starts_with("127.0.0.1:"), "{w:?}");
    // seen from the holder's own read-write handle it counts too
    assert_eq!(held.watchers().unwrap().len(), 1);

    let e = c.remove(&img).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
    assert!(e.to_string().contains("watchers"), "{e}");
    println!("remove while open elsewhere: {e}");

    drop(held);
    assert!(c.watchers(&img).unwrap().is_empty());
    c.remove(&img).unwrap();
}

#[test]
fn allocated_bytes_counts_written_objects() {
    let c = connect();
    let pool = TestPool::new(&c);
    let img = pool.image("img", 64 * MIB);
    assert_eq!(c.allocated_bytes(&img).unwrap(), 0);
    write(&c, &img, 0, b"x");
    write(&c, &img, 20 * MIB, b"y");
    write(&c, &img, 20 * MIB + 4096, b"z");
    assert_eq!(c.allocated_bytes(&img).unwrap(), 8 * MIB);
    c.snap_create(&img.at("s")).unwrap();
    write(&c, &img, 60 * MIB, b"w");
    assert_eq!(c.allocated_bytes(&img).unwrap(), 12 * MIB);
    assert_eq!(c.allocated_bytes(&img.at("s")).unwrap(), 8 * MIB);
}

#[test]
fn errors_name_the_image_and_the_errno() {
    let c = connect();
    let pool = TestPool::new(&c);
    let nope = pool.spec("nope");
    let e = c.open(&nope).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "open {}/nope: not found (ENOENT: No such file or directory): no such image",
            pool.name
        )
    );
    let e = c.snap_protect(&nope.at("s")).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "protect snapshot {}/nope@s: not found (ENOENT: No such file or directory): no such image",
            pool.name
        )
    );
    let e = c.snap_protect(&nope).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("needs a snapshot"), "{e}");
    let e = c
        .open(&ImageSpec::new("no-such-pool-tplt", "x"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "open no-such-pool-tplt/x: not found (ENOENT: No such file or directory): no such pool"
    );
    let e = c.clone_image(&pool.spec("nope").at("s"), &pool.spec("k"), &defaults());
    let e = e.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("clone {0}/nope@s -> {0}/k", pool.name)),
        "{e}"
    );
}

/// The protected snapshot `@tpl` of a base image of `size` bytes (its first MiB written
/// with pattern `seed`), and the names of 100 clones to make of it (`vm000`…).
fn snapshot_and_100_kids(
    c: &tpl_ceph::Cluster,
    pool: &TestPool,
    size: u64,
    seed: u8,
) -> (ImageSpec, Vec<ImageSpec>) {
    let base = pool.image("base", size);
    write(c, &base, 0, &pattern(seed, MIB as usize));
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    let kids = (0..100).map(|i| pool.spec(&format!("vm{i:03}"))).collect();
    (snap, kids)
}

#[test]
fn batch_of_100_clones_over_one_connection() {
    let c = connect();
    let pool = TestPool::new(&c);
    let (snap, kids) = snapshot_and_100_kids(&c, &pool, 1024 * MIB, 8);
    let t0 = Instant::now();
    let results = c.clone_many(&snap, &kids, &defaults());
    let took = t0.elapsed();
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    println!(
        "100 clones over one connection: {took:?} ({:.1} ms/clone)",
        took.as_secs_f64() * 1000.0 / 100.0
    );
    let t0 = Instant::now();
    let listed: BTreeSet<ImageSpec> = child_specs(&c, &snap);
    println!("children of a snapshot with 100 clones: {:?}", t0.elapsed());
    assert_eq!(listed, kids.iter().cloned().collect());

    // again: every one fails, each with its own name, none overwritten
    let again = c.clone_many(&snap, &kids[..3], &defaults());
    for (r, k) in again.iter().zip(&kids) {
        let e = r.as_ref().unwrap_err();
        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
        assert!(e.to_string().contains(&k.to_string()), "{e}");
    }

    let t0 = Instant::now();
    for k in &kids {
        c.remove(k).unwrap();
    }
    let took = t0.elapsed();
    println!(
        "100 removes: {took:?} ({:.1} ms/remove)",
        took.as_secs_f64() * 1000.0 / 100.0
    );
    assert!(c.children(&snap).unwrap().is_empty());
}

/// One connection shared by 8 threads (the handle is `Sync`): 100 clones made at once,
/// each exactly once, what Ceph lists as the snapshot's children; then each thread renames
/// and removes its share, and none of it is lost or doubled.
#[test]
fn one_connection_serves_several_threads_at_once() {
    let c = connect();
    let pool = TestPool::new(&c);
    let (snap, kids) = snapshot_and_100_kids(&c, &pool, 64 * MIB, 9);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    let made: Vec<Vec<usize>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(k) = kids.get(i) else { break mine };
                        c.clone_image(&snap, k, &defaults()).unwrap();
                        assert_eq!(c.info(k).unwrap().parent.unwrap().spec, snap);
                        mine.push(i);
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let took = t0.elapsed();
    println!(
        "100 clones by 8 threads over one connection: {took:?} ({:.1} ms/clone)",
        took.as_secs_f64() * 1000.0 / 100.0
    );
    let mut all: Vec<usize> = made.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert!(
        made.iter().filter(|m| !m.is_empty()).count() > 1,
        "{made:?}"
    );
    let listed: BTreeSet<ImageSpec> = child_specs(&c, &snap);
    assert_eq!(listed, kids.iter().cloned().collect());

    let renamed: Vec<ImageSpec> = kids
        .iter()
        .map(|k| k.sibling(format!("{}-r", k.image)))
        .collect();
    std::thread::scope(|s| {
        for share in made.iter() {
            let (c, kids, renamed) = (&c, &kids, &renamed);
            s.spawn(move || {
                for &i in share {
                    c.rename(&kids[i], &renamed[i].image).unwrap();
                    c.remove(&renamed[i]).unwrap();
                }
            });
        }
    });
    assert!(c.children(&snap).unwrap().is_empty());
    assert_eq!(c.list(&pool.name).unwrap(), vec![snap.head().image]);
}

#[test]
fn a_clone_in_the_trash_is_still_a_child() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 16 * MIB);
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    let kid = pool.spec("kid");
    c.clone_image(&snap, &kid, &defaults()).unwrap();
    // the rbd CLI (ceph-common, installed with the test cluster) moves it
    let conf = std::env::var("CEPH_CONF").unwrap();
    let st = std::process::Command::new("rbd")
        .args(["-c", &conf, "trash", "mv", &kid.to_string()])
        .status()
        .expect("run rbd");
    assert!(st.success(), "rbd trash mv {kid}");
    assert!(!c.list(&pool.name).unwrap().contains(&"kid".to_string()));

    let kids = c.children(&snap).unwrap();
    assert_eq!(kids.len(), 1, "{kids:?}");
    assert!(kids[0].in_trash, "{kids:?}");
    assert_eq!(kids[0].spec, kid);
    let e = c.snap_unprotect(&snap).unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e}");
}

/// Without fast-diff (no object map), librbd finds the allocated objects by asking the
/// OSD of each object, and `allocated_bytes` adds up what its callbacks report (an
/// atomic sum: librbd does not promise which thread calls back).
#[test]
fn allocated_bytes_without_fast_diff_counts_every_written_object() {
    let c = connect();
    let pool = TestPool::new(&c);
    let img = pool.spec("plain");
    let opts = NewImageOptions {
        features: Some(Features::LAYERING),
        order: Some(22),
    };
    c.create(&img, 256 * MIB, &opts).unwrap();
    assert_eq!(c.info(&img).unwrap().features, Features(Features::LAYERING));
    assert_eq!(c.allocated_bytes(&img).unwrap(), 0);
    // a byte every 6 MiB: 40 writes over 59 of the 64 objects of 4 MiB
    for i in 0..40u64 {
        write(&c, &img, i * 6 * MIB, &[1]);
    }
    let objects: BTreeSet<u64> = (0..40u64).map(|i| i * 6 / 4).collect();
    assert_eq!(
        c.allocated_bytes(&img).unwrap(),
        objects.len() as u64 * 4 * MIB
    );
}

#[test]
fn a_clone_grows_and_its_parent_does_not() {
    let c = connect();
    let pool = TestPool::new(&c);
    let base = pool.image("base", 8 * MIB);
    let snap = base.at("tpl");
    c.snap_create(&snap).unwrap();
    c.snap_protect(&snap).unwrap();
    let kid = pool.spec("kid");
    c.clone_image(&snap, &kid, &defaults()).unwrap();
    c.resize(&kid, 24 * MIB).unwrap();
    assert_eq!(c.info(&kid).unwrap().size, 24 * MIB);
    assert_eq!(c.info(&base).unwrap().size, 8 * MIB);
    // A snapshot is never resized.
    assert!(c.resize(&snap, 32 * MIB).is_err());
    assert!(c.resize(&pool.spec("nobody"), MIB).is_err());
}

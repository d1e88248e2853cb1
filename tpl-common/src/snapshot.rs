//! Freezing and thawing RBD volumes (tpl-lock's lock and unlock of a template's RBD disks): a protected snapshot of each image, and the disk pointed at it without `<readonly/>`, so that starting the template fails ("Block node is read-only") while its clones read the snapshot.
//!
//! No journal is needed: every step is idempotent and a later run completes it. A lock
//! killed halfway leaves a protected snapshot the next lock reuses, or the next unlock
//! removes; a definition pointed at the snapshot with the metadata not saying "locked"
//! is taken as it is by the next lock, and pointed back by the next unlock.

use tpl_ceph::{Cluster, ImageSpec};

use crate::cli::Ctx;
use crate::dom::Dom;
use crate::error::{Error, Result};
use crate::ownfiles::OwnRbd;
use crate::rbd::{ceph_error, open_elsewhere, spec_of, TEMPLATE_SNAPSHOT};
use crate::text::shown;

/// What locking or unlocking one RBD disk takes.
#[derive(Debug)]
pub struct RbdChange<'c> {
    pub target: String,
    cluster: &'c Cluster,
    /// The image at the template snapshot.
    snap: ImageSpec,
    create: bool,
    protect: bool,
    /// Point the disk at the snapshot (lock) or back at the head (unlock).
    point: bool,
    /// Unlock: remove the snapshot (it has no clones).
    remove: bool,
}

impl RbdChange<'_> {
    pub fn changes_anything(&self) -> bool {
        self.create || self.protect || self.point || self.remove
    }

    /// What it does, in words.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        let d = format!("disk {} '{}'", self.target, self.snap);
        if self.create {
            out.push(format!("{d}: snapshot created"));
        }
        if self.protect {
            out.push(format!("{d}: snapshot protected"));
        }
        if self.point && !self.remove {
            out.push(format!("{d}: the disk now reads the snapshot"));
        }
        if self.remove {
            if self.point {
                out.push(format!("{d}: the disk reads its image again"));
            }
            out.push(format!("{d}: snapshot unprotected and removed"));
        }
        out
    }
}

/// The snapshot state of one disk's image.
fn state(cluster: &Cluster, spec: &ImageSpec) -> Result<Option<bool>> {
    let snaps = cluster
        .snapshots(spec)
        .map_err(|e| ceph_error(&format!("list the snapshots of '{spec}'"), e))?;
    Ok(snaps
        .iter()
        .find(|s| s.name == TEMPLATE_SNAPSHOT)
        .map(|s| s.protected))
}

/// What locking each RBD disk takes; a disk pointed at another snapshot, or an image in
/// use (watched: a running VM, say), is refused.
pub fn plan_lock<'c>(dom: &'c Dom, rbd: &[OwnRbd]) -> Result<Vec<RbdChange<'c>>> {
    rbd.iter()
        .map(|r| {
            let cluster = dom.session.ceph.cluster_for(&r.source)?;
            let spec = spec_of(&r.source);
            let refuse = |why: String| {
                Error::refused(format!("cannot lock domain '{}'", shown(&dom.name)), why)
            };
            if let Some(other) = r
                .source
                .snapshot
                .as_deref()
                .filter(|s| *s != TEMPLATE_SNAPSHOT)
            {
                return Err(refuse(format!(
                    "its {r} is pointed at the snapshot '{other}', which tpl did not make; \
                     point it at the image itself (virsh edit) and lock it again"
                )));
            }
            if r.source.snapshot.is_none() {
                if let Some(why) = open_elsewhere(cluster, &spec, &format!("its {r}"))? {
                    return Err(refuse(format!(
                        "{why}; a snapshot taken now would not be the image it will be"
                    )));
                }
            }
            let st = state(cluster, &spec)?;
            Ok(RbdChange {
                target: r.target.clone(),
                cluster,
                snap: spec.at(TEMPLATE_SNAPSHOT),
                create: st.is_none(),
                protect: st != Some(true),
                point: r.source.snapshot.is_none(),
                remove: false,
            })
        })
        .collect()
}

/// What unlocking each RBD disk takes. With clones of the snapshot (`--force`), the
/// snapshot stays, protected: the clones read it, and it cannot change.
pub fn plan_unlock<'c>(dom: &'c Dom, rbd: &[OwnRbd]) -> Result<Vec<RbdChange<'c>>> {
    rbd.iter()
        .map(|r| {
            let cluster = dom.session.ceph.cluster_for(&r.source)?;
            let spec = spec_of(&r.source);
            let snap = spec.at(TEMPLATE_SNAPSHOT);
            let st = state(cluster, &spec)?;
            let children = match st {
                Some(_) => cluster
                    .children(&snap)
                    .map_err(|e| ceph_error(&format!("list the clones of '{snap}'"), e))?
                    .len(),
                None => 0,
            };
            Ok(RbdChange {
                target: r.target.clone(),
                cluster,
                point: r.source.snapshot.as_deref() == Some(TEMPLATE_SNAPSHOT),
                remove: st.is_some() && children == 0,
                snap,
                create: false,
                protect: false,
            })
        })
        .collect()
}

/// Lock: snapshots made and protected, then the definition pointed at them (one
/// redefinition). On a failure what was done is undone.
pub fn apply_lock(ctx: &Ctx, dom: &Dom, changes: &[RbdChange]) -> Result<()> {
    let mut made: Vec<&RbdChange> = Vec::new();
    let res = (|| {
        for c in changes {
            if c.create {
                c.cluster
                    .snap_create(&c.snap)
                    .map_err(|e| ceph_error(&format!("snapshot '{}'", c.snap), e))?;
                made.push(c);
            }
            if c.protect {
                c.cluster
                    .snap_protect(&c.snap)
                    .map_err(|e| ceph_error(&format!("protect '{}'", c.snap), e))?;
            }
        }
        point(dom, changes, true)
    })();
    if let Err(e) = res {
        for c in made.iter().rev() {
            // It may not have got as far as protected: unprotect is allowed to fail.
            let _ = c.cluster.snap_unprotect(&c.snap);
            if let Err(u) = c.cluster.snap_remove(&c.snap) {
                ctx.warn(format!(
                    "while undoing the lock: cannot remove '{}': {u}",
                    c.snap
                ));
            }
        }
        return Err(e);
    }
    for c in changes {
        for line in c.describe() {
            ctx.info(line);
        }
    }
    Ok(())
}

/// Unlock: the definition pointed back at the images first (so that nothing reads a
/// snapshot about to go), then the snapshots without clones unprotected and removed.
pub fn apply_unlock(ctx: &Ctx, dom: &Dom, changes: &[RbdChange]) -> Result<()> {
    point(dom, changes, false)?;
    for c in changes.iter().filter(|c| c.remove) {
        c.cluster
            .snap_unprotect(&c.snap)
            .map_err(|e| ceph_error(&format!("unprotect '{}'", c.snap), e))?;
        c.cluster
            .snap_remove(&c.snap)
            .map_err(|e| ceph_error(&format!("remove '{}'", c.snap), e))?;
    }
    for c in changes {
        for line in c.describe() {
            ctx.info(line);
        }
    }
    Ok(())
}

/// Point the disks that need it at the template snapshot (`lock`) or at their heads.
fn point(dom: &Dom, changes: &[RbdChange], lock: bool) -> Result<()> {
    if !changes.iter().any(|c| c.point) {
        return Ok(());
    }
    let mut x = dom.xml()?;
    for c in changes.iter().filter(|c| c.point) {
        x.set_rbd_image(&c.target, &c.snap.image, lock.then_some(TEMPLATE_SNAPSHOT))?;
    }
    dom.redefine(&x)
}

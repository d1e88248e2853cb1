//! RBD images: what tpl maps templates and clones onto.
//!
//! | tpl | RBD |
//! |---|---|
//! | template locked | protected snapshot of its image ([`Cluster::snap_create`], [`Cluster::snap_protect`]) |
//! | linked clone | [`Cluster::clone_image`] / [`Cluster::clone_many`] of that snapshot |
//! | dependents | [`Cluster::children`] of the snapshot |
//! | full clone | [`Cluster::copy`], [`Cluster::deep_copy`], or clone + [`Cluster::flatten`] |
//! | `tpl-rename --disks` | [`Cluster::rename`] (never overwrites) |
//! | in use by a VM | [`Cluster::watchers`] not empty |

use std::collections::HashMap;
use std::fmt;
use std::ops::ControlFlow;

use crate::cluster::Cluster;
use crate::error::{Error, Hint, Op, Result};
use crate::spec::{c_name, ImageSpec};
use crate::sys;

/// RBD feature bits (`rbd/features.h`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u64);

impl Features {
    pub const LAYERING: u64 = 1 << 0;
    pub const STRIPINGV2: u64 = 1 << 1;
    pub const EXCLUSIVE_LOCK: u64 = 1 << 2;
    pub const OBJECT_MAP: u64 = 1 << 3;
    pub const FAST_DIFF: u64 = 1 << 4;
    pub const DEEP_FLATTEN: u64 = 1 << 5;
    pub const JOURNALING: u64 = 1 << 6;
    pub const DATA_POOL: u64 = 1 << 7;
    pub const OPERATIONS: u64 = 1 << 8;
    pub const MIGRATING: u64 = 1 << 9;
    pub const NON_PRIMARY: u64 = 1 << 10;
    pub const DIRTY_CACHE: u64 = 1 << 11;
    /// librbd's default set (`rbd_default_features` = 61): layering,
    /// exclusive-lock, object-map, fast-diff, deep-flatten.
    pub const DEFAULT: u64 = Self::LAYERING
        | Self::EXCLUSIVE_LOCK
        | Self::OBJECT_MAP
        | Self::FAST_DIFF
        | Self::DEEP_FLATTEN;

    const NAMES: [(u64, &'static str); 12] = [
        (Self::LAYERING, "layering"),
        (Self::STRIPINGV2, "striping"),
        (Self::EXCLUSIVE_LOCK, "exclusive-lock"),
        (Self::OBJECT_MAP, "object-map"),
        (Self::FAST_DIFF, "fast-diff"),
        (Self::DEEP_FLATTEN, "deep-flatten"),
        (Self::JOURNALING, "journaling"),
        (Self::DATA_POOL, "data-pool"),
        (Self::OPERATIONS, "operations"),
        (Self::MIGRATING, "migrating"),
        (Self::NON_PRIMARY, "non-primary"),
        (Self::DIRTY_CACHE, "dirty-cache"),
    ];

    pub fn contains(self, bits: u64) -> bool {
        self.0 & bits == bits
    }

    /// Names as `rbd info` prints them; unknown bits as hex.
    pub fn names(self) -> Vec<String> {
        let mut left = self.0;
        let mut v: Vec<String> = Vec::new();
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                v.push(name.to_string());
                left &= !bit;
            }
        }
        if left != 0 {
            v.push(format!("{left:#x}"));
        }
        v
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({:#x}: {})", self.0, self.names().join(", "))
    }
}

/// The parent of a clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// `pool[/ns]/image@snap`.
    pub spec: ImageSpec,
    pub pool_id: i64,
    pub image_id: String,
    pub snap_id: u64,
    /// The parent image was moved to the RBD trash.
    pub in_trash: bool,
}

/// `rbd info`, roughly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Size in bytes (at the snapshot, when opened at one).
    pub size: u64,
    pub object_size: u64,
    pub num_objects: u64,
    pub order: i32,
    pub features: Features,
    pub id: String,
    pub block_name_prefix: String,
    /// `Some` for a clone that has not been flattened.
    pub parent: Option<Parent>,
}

/// One user snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub protected: bool,
}

/// One clone of a snapshot (`rbd children`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// The clone (no snapshot part).
    pub spec: ImageSpec,
    pub pool_id: i64,
    pub image_id: String,
    /// The clone is in the RBD trash (it still depends on the snapshot).
    pub in_trash: bool,
}

/// A lock holder of an image (`rbd lock ls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// The client entity (`client.<id>`).
    pub client: String,
    pub cookie: String,
    /// `IP:port/nonce` of the client.
    pub addr: String,
}

/// A client watching an image: every client that has it open read-write
/// (a running qemu, `rbd map`, an open [`Image`]); read-only opens do not
/// watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    /// `IP:port/nonce` of the client.
    pub addr: String,
    /// Client id (`client.<id>`).
    pub id: i64,
    pub cookie: u64,
}

/// Options for an image that an operation creates (create, clone, copy).
/// `None` = what the `rbd` CLI would use (librbd's defaults; for a copy,
/// the source's features).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewImageOptions {
    /// Feature bits ([`Features`]); `layering` is added for clones.
    pub features: Option<u64>,
    /// Object size as a power of two (22 = 4 MiB).
    pub order: Option<u8>,
}

/// Sparse size `rbd cp` uses: runs of zeros this long are not written.
pub const COPY_SPARSE_SIZE: usize = 4096;

/// An open image. Borrows its [`Cluster`]; closed on drop.
pub struct Image<'c> {
    inner: sys::Image<'c>,
    spec: ImageSpec,
    read_only: bool,
}

impl fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("spec", &self.spec)
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn err(errno: i32, op: &str, hint: Hint) -> Error {
    Error::from_errno(errno, op, hint)
}

/// Progress callback type: `(done, total)` in librbd's units (objects or
/// bytes); return `ControlFlow::Break(())` to stop the operation, which then
/// fails with [`Error::Cancelled`]. May be called from librbd's threads.
pub trait Progress: FnMut(u64, u64) -> ControlFlow<()> + Send {}
impl<F: FnMut(u64, u64) -> ControlFlow<()> + Send> Progress for F {}

fn no_progress(_: u64, _: u64) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

impl<'c> Image<'c> {
    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn op(&self, verb: &str) -> String {
        format!("{verb} {}", self.spec)
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64> {
        Ok(self
            .inner
            .stat()
            .map_err(|e| err(e, &self.op("stat"), None))?
            .size)
    }

    /// Size, features, id and parent.
    pub fn info(&self) -> Result<ImageInfo> {
        let op = self.op("get info of");
        let st = self.inner.stat().map_err(|e| err(e, &op, None))?;
        let features = Features(self.inner.features().map_err(|e| err(e, &op, None))?);
        let id = self.inner.id().map_err(|e| err(e, &op, None))?;
        let parent =
            self.inner
                .parent()
                .map_err(|e| err(e, &op, None))?
                .map(|(p, snap_id, snap)| Parent {
                    spec: ImageSpec {
                        pool: p.pool_name,
                        namespace: p.pool_namespace,
                        image: p.image_name,
                        snap: Some(snap),
                    },
                    image_id: p.image_id,
                    pool_id: p.pool_id,
                    snap_id,
                    in_trash: p.trash,
                });
        Ok(ImageInfo {
            size: st.size,
            object_size: st.obj_size,
            num_objects: st.num_objs,
            order: st.order,
            features,
            id,
            block_name_prefix: st.block_name_prefix,
            parent,
        })
    }

    /// User snapshots, oldest first, with their protection.
    pub fn snapshots(&self) -> Result<Vec<SnapInfo>> {
        let op = self.op("list snapshots of");
        let snaps = self.inner.snaps().map_err(|e| err(e, &op, None))?;
        snaps
            .into_iter()
            .map(|s| {
                // an existing name, taken as it is (no separator rules)
                let c = sys::cstring(&s.name).unwrap_or_default();
                let protected = self
                    .inner
                    .snap_is_protected(&c)
                    .map_err(|e| err(e, &op, None))?;
                Ok(SnapInfo {
                    id: s.id,
                    name: s.name,
                    size: s.size,
                    protected,
                })
            })
            .collect()
    }

    /// The clones of the snapshot this image was opened at, in any pool,
    /// including clones in the trash (marked).
    pub fn children(&self) -> Result<Vec<Child>> {
        let op = self.op("list children of");
        self.spec.require_snap("list children of")?;
        let kids = self.inner.children().map_err(|e| err(e, &op, None))?;
        Ok(kids
            .into_iter()
            .map(|k| Child {
                spec: ImageSpec {
                    pool: k.pool_name,
                    namespace: k.pool_namespace,
                    image: k.image_name,
                    snap: None,
                },
                image_id: k.image_id,
                pool_id: k.pool_id,
                in_trash: k.trash,
            })
            .collect())
    }

    /// Clients watching the image (a read-only handle does not count
    /// itself; a read-write one does).
    pub fn watchers(&self) -> Result<Vec<Watcher>> {
        let op = self.op("list watchers of");
        Ok(self
            .inner
            .watchers()
            .map_err(|e| err(e, &op, None))?
            .into_iter()
            .map(|w| Watcher {
                addr: w.addr,
                id: w.id,
                cookie: w.cookie,
            })
            .collect())
    }

    /// Who holds locks on the image (`rbd lock ls`; the owner of the exclusive lock is
    /// one, with a cookie `auto N`).
    pub fn lockers(&self) -> Result<Vec<Locker>> {
        let op = self.op("list lockers of");
        Ok(self
            .inner
            .lockers()
            .map_err(|e| err(e, &op, None))?
            .into_iter()
            .map(|(client, cookie, addr)| Locker {
                client,
                cookie,
                addr,
            })
            .collect())
    }

    /// Image metadata value of `key` (`rbd image-meta get`); `None` if unset.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>> {
        let c = metadata_key(key)?;
        match self.inner.metadata_get(&c) {
            Ok(v) => Ok(Some(v)),
            Err(libc::ENOENT) => Ok(None),
            Err(e) => Err(err(
                e,
                &format!("get metadata {key:?} of {}", self.spec),
                None,
            )),
        }
    }

    /// Sets image metadata `key` = `value`.
    pub fn metadata_set(&self, key: &str, value: &str) -> Result<()> {
        let op = format!("set metadata {key:?} of {}", self.spec);
        let k = metadata_key(key)?;
        let v = sys::cstring(value).ok_or_else(|| Error::InvalidArgument {
            op: Op(op.clone()),
            why: "value contains a NUL byte".into(),
        })?;
        self.inner
            .metadata_set(&k, &v)
            .map_err(|e| err(e, &op, read_only_hint(e)))
    }

    /// Removes `key`; `false` if it was not set.
    pub fn metadata_remove(&self, key: &str) -> Result<bool> {
        let k = metadata_key(key)?;
        match self.inner.metadata_remove(&k) {
            Ok(()) => Ok(true),
            Err(libc::ENOENT) => Ok(false),
            Err(e) => Err(err(
                e,
                &format!("remove metadata {key:?} of {}", self.spec),
                read_only_hint(e),
            )),
        }
    }

    /// All metadata pairs, sorted by key. librbd keeps its own
    /// configuration overrides here too, under `conf_`.
    pub fn metadata_list(&self) -> Result<Vec<(String, String)>> {
        let op = self.op("list metadata of");
        let mut v = self.inner.metadata_list().map_err(|e| err(e, &op, None))?;
        v.sort();
        Ok(v)
    }

    /// Bytes in objects that exist in this image (at the snapshot it was
    /// opened at), not counting what a clone still reads from its parent:
    /// the USED column of `rbd du` for an image without snapshots. Fast
    /// with the fast-diff feature (object map), else it lists objects.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let op = self.op("compute allocated bytes of");
        let size = self.size()?;
        self.inner
            .allocated_bytes(size)
            .map_err(|e| err(e, &op, None))
    }

    /// Reads `buf.len()` bytes at `offset` (fewer only at the end of the
    /// image); returns the count read.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let end = buf.len().min(done + (64 << 20));
            let n = self
                .inner
                .read_at(offset + done as u64, &mut buf[done..end])
                .map_err(|e| {
                    err(
                        e,
                        &format!("read {} bytes at {offset} of {}", buf.len(), self.spec),
                        None,
                    )
                })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// Writes all of `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0;
        while done < data.len() {
            let end = data.len().min(done + (64 << 20));
            let n = self
                .inner
                .write_at(offset + done as u64, &data[done..end])
                .map_err(|e| {
                    err(
                        e,
                        &format!("write {} bytes at {offset} of {}", data.len(), self.spec),
                        read_only_hint(e),
                    )
                })?;
            if n == 0 {
                return Err(err(
                    libc::EIO,
                    &format!("write at {offset} of {}", self.spec),
                    Some("short write"),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Waits until written data is on the OSDs.
    pub fn flush(&self) -> Result<()> {
        self.inner
            .flush()
            .map_err(|e| err(e, &self.op("flush"), None))
    }
}

fn metadata_key(key: &str) -> Result<std::ffi::CString> {
    if key.is_empty() {
        return Err(Error::InvalidName {
            kind: "metadata key",
            name: key.into(),
            why: "empty",
        });
    }
    sys::cstring(key).ok_or(Error::InvalidName {
        kind: "metadata key",
        name: key.into(),
        why: "contains a NUL byte",
    })
}

fn read_only_hint(errno: i32) -> Hint {
    (errno == libc::EROFS).then_some("the image is open read-only or at a snapshot")
}

fn ioctx_in<'r>(rados: &'r sys::Rados, spec: &ImageSpec, op: &str) -> Result<sys::IoCtx<'r>> {
    let pool = spec.c_pool()?;
    let ns = spec.c_namespace()?;
    rados.ioctx(&pool, ns.as_deref()).map_err(|e| {
        let hint = (e == libc::ENOENT).then_some("no such pool");
        err(e, op, hint)
    })
}

fn open_in<'r>(
    io: sys::IoCtx<'r>,
    spec: &ImageSpec,
    read_only: bool,
    op: &str,
) -> Result<Image<'r>> {
    spec.validate()?;
    let name = spec.c_image()?;
    let snap = spec.c_snap()?;
    let inner = sys::Image::open(io, &name, snap.as_deref(), read_only).map_err(|e| {
        let hint = match (e, &spec.snap) {
            (libc::ENOENT, Some(_)) => Some("no such image or snapshot"),
            (libc::ENOENT, None) => Some("no such image"),
            _ => None,
        };
        err(e, op, hint)
    })?;
    Ok(Image {
        inner,
        spec: spec.clone(),
        read_only: read_only || spec.snap.is_some(),
    })
}

impl Cluster {
    fn ioctx_as(&self, spec: &ImageSpec, op: &str) -> Result<sys::IoCtx<'_>> {
        ioctx_in(&self.rados, spec, op)
    }

    fn open_as(&self, spec: &ImageSpec, read_only: bool, op: &str) -> Result<Image<'_>> {
        let io = self.ioctx_as(spec, op)?;
        open_in(io, spec, read_only, op)
    }

    /// Opens an image read-only through the [`Cluster::reader`] connection: for
    /// operations that only look at it.
    fn look_as(&self, spec: &ImageSpec, op: &str) -> Result<Image<'_>> {
        let io = ioctx_in(self.reader()?, spec, op)?;
        open_in(io, spec, true, op)
    }

    /// Opens an image read-write (read-only when `spec` names a snapshot).
    /// A read-write handle watches the image while it is open.
    pub fn open(&self, spec: &ImageSpec) -> Result<Image<'_>> {
        self.open_as(spec, false, &format!("open {spec}"))
    }

    /// Opens an image read-only (no watch, no lock): for reading, listing
    /// and as a copy source.
    pub fn open_read_only(&self, spec: &ImageSpec) -> Result<Image<'_>> {
        self.look_as(spec, &format!("open {spec} read-only"))
    }

    /// Image names in `pool` (default namespace).
    pub fn list(&self, pool: &str) -> Result<Vec<String>> {
        self.list_in(pool, "")
    }

    /// Image names in `pool`/`namespace`, sorted.
    pub fn list_in(&self, pool: &str, namespace: &str) -> Result<Vec<String>> {
        let io = self.ioctx(pool, namespace)?;
        let what = if namespace.is_empty() {
            pool.to_string()
        } else {
            format!("{pool}/{namespace}")
        };
        let mut v: Vec<String> = io
            .list()
            .map_err(|e| err(e, &format!("list images in {what}"), None))?
            .into_iter()
            .collect();
        v.sort();
        Ok(v)
    }

    /// Whether the image (and the snapshot, when `spec` names one) exists.
    /// A missing pool is an error, not `false`.
    pub fn exists(&self, spec: &ImageSpec) -> Result<bool> {
        match self.look_as(spec, &format!("check whether {spec} exists")) {
            Ok(_) => Ok(true),
            Err(Error::NotFound {
                hint: Some("no such pool"),
                op,
            }) => Err(Error::NotFound {
                hint: Some("no such pool"),
                op,
            }),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates an image of `size` bytes (format 2).
    pub fn create(&self, spec: &ImageSpec, size: u64, opts: &NewImageOptions) -> Result<()> {
        let op = format!("create {spec}");
        no_snap(spec, &op)?;
        let io = self.ioctx_as(spec, &op)?;
        let name = spec.c_image()?;
        io.create(&name, size, opts.features, opts.order)
            .map_err(|e| {
                err(
                    e,
                    &op,
                    (e == libc::EEXIST).then_some("an image of that name exists"),
                )
            })
    }

    /// [`Image::info`] of `spec` (at its snapshot if it names one).
    pub fn info(&self, spec: &ImageSpec) -> Result<ImageInfo> {
        self.look_as(spec, &format!("get info of {spec}"))?.info()
    }

    /// [`Image::snapshots`] of `spec`'s image.
    pub fn snapshots(&self, spec: &ImageSpec) -> Result<Vec<SnapInfo>> {
        self.look_as(&spec.head(), &format!("list snapshots of {}", spec.head()))?
            .snapshots()
    }

    /// Creates snapshot `spec.snap`.
    pub fn snap_create(&self, spec: &ImageSpec) -> Result<()> {
        let op = format!("create snapshot {spec}");
        let snap = c_name("snapshot", spec.require_snap("create snapshot")?)?;
        let img = self.open_as(&spec.head(), false, &op)?;
        img.inner
            .snap_create(&snap)
            .map_err(|e| err(e, &op, (e == libc::EEXIST).then_some("the snapshot exists")))
    }

    /// Protects snapshot `spec.snap` (needed before cloning it; a
    /// protected snapshot cannot be removed).
    pub fn snap_protect(&self, spec: &ImageSpec) -> Result<()> {
        let op = format!("protect snapshot {spec}");
        let snap = c_name("snapshot", spec.require_snap("protect snapshot")?)?;
        let img = self.open_as(&spec.head(), false, &op)?;
        img.inner.snap_protect(&snap).map_err(|e| {
            err(
                e,
                &op,
                (e == libc::EBUSY).then_some("the snapshot is already protected"),
            )
        })
    }

    /// Unprotects snapshot `spec.snap`. [`Error::Busy`] while it has
    /// clones (children), even clones in the trash.
    pub fn snap_unprotect(&self, spec: &ImageSpec) -> Result<()> {
        let op = format!("unprotect snapshot {spec}");
        let snap = c_name("snapshot", spec.require_snap("unprotect snapshot")?)?;
        let img = self.open_as(&spec.head(), false, &op)?;
        img.inner.snap_unprotect(&snap).map_err(|e| {
            let hint = match e {
                libc::EBUSY => {
                    Some("the snapshot has linked clones (children): flatten or remove them first")
                }
                libc::EINVAL => Some("the snapshot is not protected"),
                _ => None,
            };
            err(e, &op, hint)
        })
    }

    /// Removes snapshot `spec.snap`. [`Error::Busy`] if it is protected.
    pub fn snap_remove(&self, spec: &ImageSpec) -> Result<()> {
        let op = format!("remove snapshot {spec}");
        let snap = c_name("snapshot", spec.require_snap("remove snapshot")?)?;
        let img = self.open_as(&spec.head(), false, &op)?;
        img.inner.snap_remove(&snap).map_err(|e| {
            err(
                e,
                &op,
                (e == libc::EBUSY).then_some("the snapshot is protected: unprotect it first"),
            )
        })
    }

    /// The clones of snapshot `spec.snap` (the authoritative list from the
    /// cluster, all pools), including clones in the trash (marked).
    pub fn children(&self, spec: &ImageSpec) -> Result<Vec<Child>> {
        spec.require_snap("list children of")?;
        self.look_as(spec, &format!("list children of {spec}"))?
            .children()
    }

    /// Clones snapshot `parent.snap` to `child` (a linked clone). The
    /// snapshot must be protected (clone format 1, which clusters whose
    /// min client is older than mimic use).
    pub fn clone_image(
        &self,
        parent: &ImageSpec,
        child: &ImageSpec,
        opts: &NewImageOptions,
    ) -> Result<()> {
        let pio = self.ioctx_as(parent, &format!("clone {parent} -> {child}"))?;
        let cio = if same_pool(parent, child) {
            None
        } else {
            Some(self.ioctx_as(child, &format!("clone {parent} -> {child}"))?)
        };
        clone_with(&pio, cio.as_ref().unwrap_or(&pio), parent, child, opts)
    }

    /// Clones snapshot `parent.snap` to each of `children` over this one
    /// connection (pool handles opened once); one result per child, in
    /// order. A failure does not stop the others; the caller decides what
    /// to undo.
    pub fn clone_many(
        &self,
        parent: &ImageSpec,
        children: &[ImageSpec],
        opts: &NewImageOptions,
    ) -> Vec<Result<()>> {
        let pio = match self.ioctx_as(parent, &format!("clone {parent}")) {
            Ok(io) => io,
            Err(e) => {
                let msg = e.to_string();
                return children
                    .iter()
                    .map(|c| {
                        Err(Error::from_errno(
                            e.errno().unwrap_or(libc::EIO),
                            format!("clone {parent} -> {c} [{msg}]"),
                            None,
                        ))
                    })
                    .collect();
            }
        };
        let mut ios: HashMap<(String, String), sys::IoCtx<'_>> = HashMap::new();
        children
            .iter()
            .map(|child| {
                if same_pool(parent, child) {
                    return clone_with(&pio, &pio, parent, child, opts);
                }
                let key = (child.pool.clone(), child.namespace.clone());
                if !ios.contains_key(&key) {
                    let io = self.ioctx_as(child, &format!("clone {parent} -> {child}"))?;
                    ios.insert(key.clone(), io);
                }
                clone_with(&pio, &ios[&key], parent, child, opts)
            })
            .collect()
    }

    /// Renames an image within its pool and namespace to `new_name`;
    /// returns the new spec. Never overwrites: [`Error::AlreadyExists`] if
    /// `new_name` is taken. It does not check watchers: callers refuse to
    /// rename an image in use first ([`Cluster::watchers`]).
    pub fn rename(&self, from: &ImageSpec, new_name: &str) -> Result<ImageSpec> {
        let to = from.sibling(new_name);
        let op = format!("rename {from} -> {to}");
        no_snap(from, &op)?;
        let (f, t) = (from.c_image()?, to.c_image()?);
        let io = self.ioctx_as(from, &op)?;
        io.rename(&f, &t).map_err(|e| {
            let hint = match e {
                libc::EEXIST => Some("the new name is taken; nothing was renamed"),
                libc::ENOENT => Some("no such image"),
                _ => None,
            };
            err(e, &op, hint)
        })?;
        Ok(to)
    }

    /// Removes an image. Refused with [`Error::NotEmpty`] while it has
    /// snapshots and [`Error::Busy`] while it is open elsewhere (watched,
    /// e.g. by a running VM).
    pub fn remove(&self, spec: &ImageSpec) -> Result<()> {
        let op = format!("remove {spec}");
        no_snap(spec, &op)?;
        let io = self.ioctx_as(spec, &op)?;
        let name = spec.c_image()?;
        io.remove(&name).map_err(|e| {
            let hint = match e {
                libc::ENOTEMPTY => Some("the image has snapshots: remove them first (a protected one needs unprotecting, which needs no clones)"),
                libc::EBUSY => match self.watchers(spec) {
                    Ok(w) if !w.is_empty() => Some("the image is open elsewhere (it has watchers, e.g. a running VM)"),
                    _ => Some("the image is in use (clones, or an operation in progress)"),
                },
                libc::ENOENT => Some("no such image"),
                _ => None,
            };
            err(e, &op, hint)
        })
    }

    /// Grows (or shrinks) an image to `size` bytes (`rbd resize`).
    pub fn resize(&self, spec: &ImageSpec, size: u64) -> Result<()> {
        let op = format!("resize {spec} to {size} bytes");
        no_snap(spec, &op)?;
        let img = self.open_as(spec, false, &op)?;
        img.inner.resize(size).map_err(|e| err(e, &op, None))
    }

    /// Flattens a clone: copies what it still reads from its parent so it
    /// no longer depends on it (it leaves the parent snapshot's children).
    pub fn flatten(&self, spec: &ImageSpec) -> Result<()> {
        self.flatten_with_progress(spec, no_progress)
    }

    /// [`Cluster::flatten`] reporting `(objects done, objects)`; return
    /// `Break` to stop ([`Error::Cancelled`]; the image stays a valid,
    /// partly flattened clone, and flattening again finishes it).
    pub fn flatten_with_progress(
        &self,
        spec: &ImageSpec,
        mut progress: impl Progress,
    ) -> Result<()> {
        let op = format!("flatten {spec}");
        no_snap(spec, &op)?;
        let img = self.open_as(spec, false, &op)?;
        img.inner.flatten(&mut progress).map_err(|e| {
            err(
                e,
                &op,
                (e == libc::EINVAL).then_some("the image is not a clone (it has no parent)"),
            )
        })
    }

    /// Deep copy (`rbd deep cp`): the image with its snapshots (up to
    /// `src.snap` when given), same features unless `opts` says otherwise.
    /// A clone stays a clone of the same parent.
    pub fn deep_copy(
        &self,
        src: &ImageSpec,
        dst: &ImageSpec,
        opts: &NewImageOptions,
    ) -> Result<()> {
        self.deep_copy_with_progress(src, dst, opts, no_progress)
    }

    /// [`Cluster::deep_copy`] with progress / cancellation.
    pub fn deep_copy_with_progress(
        &self,
        src: &ImageSpec,
        dst: &ImageSpec,
        opts: &NewImageOptions,
        mut progress: impl Progress,
    ) -> Result<()> {
        let op = format!("deep copy {src} -> {dst}");
        no_snap(dst, &op)?;
        let img = self.open_as(src, true, &op)?;
        let dio = self.ioctx_as(dst, &op)?;
        let name = dst.c_image()?;
        img.inner
            .deep_copy(&dio, &name, opts.features, &mut progress)
            .map_err(|e| {
                err(
                    e,
                    &op,
                    (e == libc::EEXIST).then_some("the destination exists"),
                )
            })
    }

    /// Copy (`rbd cp`): the data of `src` (at `src.snap` when given) into a
    /// new independent image, without snapshots and without a parent (a
    /// clone's parent data is copied in). Zero runs are not written.
    pub fn copy(&self, src: &ImageSpec, dst: &ImageSpec, opts: &NewImageOptions) -> Result<()> {
        self.copy_with_progress(src, dst, opts, no_progress)
    }

    /// [`Cluster::copy`] with progress `(bytes done, bytes)` / cancellation.
    pub fn copy_with_progress(
        &self,
        src: &ImageSpec,
        dst: &ImageSpec,
        opts: &NewImageOptions,
        mut progress: impl Progress,
    ) -> Result<()> {
        let op = format!("copy {src} -> {dst}");
        no_snap(dst, &op)?;
        let img = self.open_as(src, true, &op)?;
        let dio = self.ioctx_as(dst, &op)?;
        let name = dst.c_image()?;
        img.inner
            .copy(&dio, &name, opts.features, COPY_SPARSE_SIZE, &mut progress)
            .map_err(|e| {
                err(
                    e,
                    &op,
                    (e == libc::EEXIST).then_some("the destination exists"),
                )
            })
    }

    /// Clients that have the image open read-write: a running qemu shows up
    /// here. Empty = nobody uses it (at this instant).
    pub fn watchers(&self, spec: &ImageSpec) -> Result<Vec<Watcher>> {
        self.look_as(&spec.head(), &format!("list watchers of {}", spec.head()))?
            .watchers()
    }

    /// [`Image::lockers`].
    pub fn lockers(&self, spec: &ImageSpec) -> Result<Vec<Locker>> {
        self.look_as(&spec.head(), &format!("list lockers of {}", spec.head()))?
            .lockers()
    }

    /// Break a lock on the image (`rbd lock rm IMAGE COOKIE CLIENT`), as one does for a
    /// client known to be dead.
    pub fn break_lock(&self, spec: &ImageSpec, locker: &Locker) -> Result<()> {
        let what = format!("break the lock of {} on {}", locker.client, spec.head());
        let img = self.open_as(&spec.head(), false, &what)?;
        let client = c_name("lock client", &locker.client)?;
        let cookie = c_name("lock cookie", &locker.cookie)?;
        img.inner
            .break_lock(&client, &cookie)
            .map_err(|e| err(e, &what, None))
    }

    /// [`Image::metadata_get`].
    pub fn metadata_get(&self, spec: &ImageSpec, key: &str) -> Result<Option<String>> {
        self.look_as(
            &spec.head(),
            &format!("get metadata {key:?} of {}", spec.head()),
        )?
        .metadata_get(key)
    }

    /// [`Image::metadata_set`].
    pub fn metadata_set(&self, spec: &ImageSpec, key: &str, value: &str) -> Result<()> {
        self.open_as(
            &spec.head(),
            false,
            &format!("set metadata {key:?} of {}", spec.head()),
        )?
        .metadata_set(key, value)
    }

    /// [`Image::metadata_remove`].
    pub fn metadata_remove(&self, spec: &ImageSpec, key: &str) -> Result<bool> {
        self.open_as(
            &spec.head(),
            false,
            &format!("remove metadata {key:?} of {}", spec.head()),
        )?
        .metadata_remove(key)
    }

    /// [`Image::metadata_list`].
    pub fn metadata_list(&self, spec: &ImageSpec) -> Result<Vec<(String, String)>> {
        self.look_as(&spec.head(), &format!("list metadata of {}", spec.head()))?
            .metadata_list()
    }

    /// [`Image::allocated_bytes`] of `spec` (at its snapshot if given).
    pub fn allocated_bytes(&self, spec: &ImageSpec) -> Result<u64> {
        self.look_as(spec, &format!("compute allocated bytes of {spec}"))?
            .allocated_bytes()
    }
}

fn same_pool(a: &ImageSpec, b: &ImageSpec) -> bool {
    a.pool == b.pool && a.namespace == b.namespace
}

fn no_snap(spec: &ImageSpec, op: &str) -> Result<()> {
    match &spec.snap {
        None => Ok(()),
        Some(_) => Err(Error::InvalidArgument {
            op: Op(op.to_string()),
            why: format!("{spec} names a snapshot; this needs an image (pool/image)"),
        }),
    }
}

fn clone_with(
    pio: &sys::IoCtx<'_>,
    cio: &sys::IoCtx<'_>,
    parent: &ImageSpec,
    child: &ImageSpec,
    opts: &NewImageOptions,
) -> Result<()> {
    let op = format!("clone {parent} -> {child}");
    parent.validate()?;
    child.validate()?;
    no_snap(child, &op)?;
    let snap = c_name("snapshot", parent.require_snap("clone")?)?;
    let (pname, cname) = (parent.c_image()?, child.c_image()?);
    let features = opts.features.map(|f| f | Features::LAYERING);
    pio.clone_image(&pname, &snap, cio, &cname, features, opts.order).map_err(|e| {
        let hint = match e {
            libc::EINVAL => Some("the parent snapshot must be protected (clone format 1) and the parent must have the layering feature"),
            libc::EEXIST => Some("an image of the child's name exists"),
            libc::ENOENT => Some("no such parent image or snapshot"),
            libc::ENOSYS | libc::EOPNOTSUPP => Some("the parent does not support layering"),
            _ => None,
        };
        err(e, &op, hint)
    })
}

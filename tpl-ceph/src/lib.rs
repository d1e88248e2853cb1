//! tpl-ceph: the one place tpl talks to Ceph.
//!
//! A safe API over librados and librbd (linked directly, through a small
//! hand-written FFI in the private `sys` module, the only code here allowed
//! `unsafe`) for what tpl does with RBD images: protected snapshots as
//! locked templates, clones as linked clones, children as dependents, copy /
//! deep copy / flatten as full clones, rename, watchers (in use by a VM),
//! image metadata and allocated bytes.
//!
//! ```no_run
//! use tpl_ceph::{Cluster, ConnectOptions, ImageSpec, NewImageOptions};
//! let cluster = Cluster::connect(&ConnectOptions::default())?; // $CEPH_CONF, client.admin
//! let base: ImageSpec = "tpl/TplUbuntu@tpl".parse()?;
//! cluster.snap_create(&base)?;
//! cluster.snap_protect(&base)?;
//! for r in cluster.clone_many(&base, &[base.sibling("web1"), base.sibling("web2")], &NewImageOptions::default()) {
//!     r?;
//! }
//! assert_eq!(cluster.children(&base)?.len(), 2);
//! # Ok::<(), tpl_ceph::Error>(())
//! ```
//!
//! Every call is synchronous. A [`Cluster`] may be shared between threads
//! (each works through its own I/O contexts); an [`Image`] stays with the
//! thread that opened it. Both are closed on drop.

mod cluster;
mod error;
mod image;
mod spec;
mod sys;

pub use cluster::{library_versions, Cluster, ConnectOptions, MonAddr};
pub use error::{errno_name, errno_text, Error, Hint, Op, Result};
pub use image::{
    Child, Features, Image, ImageInfo, Locker, NewImageOptions, Parent, Progress, SnapInfo,
    Watcher, COPY_SPARSE_SIZE,
};
pub use spec::{check_name, ImageSpec};

//! A clone's RBD images: an `rbd clone` of the locked template's protected snapshot (linked) or a copy of it (full), made under a temporary name in the same cluster and renamed into place, as files are.
//!
//! Every image is made under this run's temporary name (`.NAME.tpl-tmp-HOST-PID`, as the
//! clone's files are) and journaled before it is made, its id journaled before the rename
//! to its final name, which never replaces an image: a kill -9 at any point leaves only
//! what the next run of any tool removes, and an image of the same name made by another
//! run is never taken for this run's (its id differs).

use std::ops::ControlFlow;
use std::path::Path;

use tpl_ceph::{Cluster, ImageSpec, NewImageOptions};
use tpl_common::cli::Ctx;
use tpl_common::dom::Dom;
use tpl_common::error::{Error, Result};
use tpl_common::journal::clone::{self as cj, Entry};
use tpl_common::journal::Journal;
use tpl_common::ownfiles::{renamed_file, Naming, OwnRbd};
use tpl_common::rbd::{ceph_error, spec_of, TEMPLATE_SNAPSHOT};
use tpl_common::record::{CloneMode, RbdSource};
use tpl_common::text::shown;
use tpl_common::volume::{Identity, Vol};

/// One RBD disk of the template to clone.
#[derive(Debug)]
pub struct SrcRbd {
    pub target: String,
    pub source: RbdSource,
    /// What the clones are made from: the protected snapshot of a locked template, else
    /// the image itself.
    pub from: ImageSpec,
    /// Where the clones' images go: the template's pool, or --pool.
    pub pool: String,
}

/// One image a clone gets.
#[derive(Debug)]
pub struct NewImage<'p> {
    pub src: &'p SrcRbd,
    pub dest: ImageSpec,
}

impl NewImage<'_> {
    /// `POOL[/NS]/IMAGE`, as the clone's disk names it.
    pub fn name(&self) -> String {
        self.dest.to_string()
    }
}

/// Check one RBD disk of the template: a linked clone needs the template's protected
/// snapshot (tpl-lock made it), which the disk points at.
pub fn src_rbd(
    tpl: &Dom,
    r: &OwnRbd,
    mode: CloneMode,
    pool: Option<&str>,
    refuse: &dyn Fn(String) -> Error,
) -> Result<SrcRbd> {
    let cluster = tpl.session.ceph.cluster_for(&r.source)?;
    let head = spec_of(&r.source);
    let protected = cluster
        .snapshots(&head)
        .map_err(|e| ceph_error(&format!("list the snapshots of '{head}'"), e))?
        .iter()
        .any(|s| s.name == TEMPLATE_SNAPSHOT && s.protected);
    let locked = r.source.snapshot.as_deref() == Some(TEMPLATE_SNAPSHOT) && protected;
    if mode == CloneMode::Linked && !locked {
        return Err(refuse(format!(
            "its {r} is not at a protected snapshot '{TEMPLATE_SNAPSHOT}' (tpl-lock makes it), \
             so there is nothing a linked clone can stand on that cannot change; run 'tpl-lock' \
             on it again"
        )));
    }
    if let Some(p) = pool {
        let ok = cluster
            .pool_exists(p)
            .map_err(|e| ceph_error(&format!("look up the pool '{p}'"), e))?;
        if !ok {
            return Err(Error::usage(
                format!("--pool '{}' does not exist", shown(p)),
                "create it first (ceph osd pool create, rbd pool init), or leave --pool out",
            ));
        }
    }
    Ok(SrcRbd {
        target: r.target.clone(),
        from: if locked {
            head.at(TEMPLATE_SNAPSHOT)
        } else {
            head.clone()
        },
        pool: pool.map_or_else(|| head.pool.clone(), String::from),
        source: r.source.clone(),
    })
}

/// The image clone `name` gets for `src`: named after it as its files are.
pub fn new_image<'p>(src: &'p SrcRbd, template: &str, name: &str, several: bool) -> NewImage<'p> {
    let naming = Naming::Disk {
        target: &src.target,
        several,
        ext: None,
    };
    let file = renamed_file(Path::new(&src.source.image), template, name, naming);
    let image = file
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string());
    NewImage {
        src,
        dest: ImageSpec::new(&src.pool, image).in_namespace(&src.source.namespace),
    }
}

/// Whether the image exists already (a clone's name must be free).
pub fn exists(cluster: &Cluster, spec: &ImageSpec) -> Result<bool> {
    cluster
        .exists(spec)
        .map_err(|e| ceph_error(&format!("look up '{spec}'"), e))
}

/// This run's temporary name for an image.
pub fn tmp_spec(dest: &ImageSpec) -> ImageSpec {
    let tmp = cj::tmp_name(Path::new(&dest.image));
    dest.sibling(tmp.to_string_lossy().into_owned())
}

/// Make one image under its temporary name; returns the temporary image.
pub fn make(
    ctx: &Ctx,
    cluster: &Cluster,
    jrnl: &mut Journal,
    uuid: &str,
    mode: CloneMode,
    img: &NewImage,
) -> Result<ImageSpec> {
    let tmp = tmp_spec(&img.dest);
    // An image under our own temporary name can only be a dead run's (pids are reused).
    let _ = cluster.remove(&tmp);
    jrnl.log(&Entry::Tmp {
        uuid: uuid.into(),
        vol: Vol::Rbd(tmp.to_string()),
        client: Some(cluster.client_id()),
    })?;
    let opts = NewImageOptions::default();
    match mode {
        CloneMode::Linked => cluster
            .clone_image(&img.src.from, &tmp, &opts)
            .map_err(|e| ceph_error(&format!("clone '{}' to '{tmp}'", img.src.from), e))?,
        CloneMode::Full => {
            let intr = ctx.intr.clone();
            cluster
                .copy_with_progress(&img.src.from, &tmp, &opts, move |_, _| {
                    // A stopping signal cancels the copy; the unfinished image is removed.
                    if intr.signal().is_some() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
                .map_err(|e| {
                    if ctx.intr.signal().is_some() {
                        Error::Interrupted {
                            signal: ctx.intr.signal().unwrap_or(0),
                        }
                    } else {
                        ceph_error(&format!("copy '{}' to '{tmp}'", img.src.from), e)
                    }
                })?
        }
    }
    Ok(tmp)
}

/// Rename a finished image to its final name (never over another), its id (`id`, else
/// read here) journaled first.
pub fn commit(
    cluster: &Cluster,
    jrnl: &mut Journal,
    uuid: &str,
    tmp: &ImageSpec,
    id: Option<String>,
    img: &NewImage,
) -> Result<()> {
    let id = match id {
        Some(id) => id,
        None => {
            cluster
                .info(tmp)
                .map_err(|e| ceph_error(&format!("read '{tmp}'"), e))?
                .id
        }
    };
    jrnl.log(&Entry::Made {
        uuid: uuid.into(),
        vol: Vol::Rbd(img.dest.to_string()),
        id: Identity::Rbd { id },
        client: Some(cluster.client_id()),
    })?;
    cluster
        .rename(tmp, &img.dest.image)
        .map_err(|e| rename_error(tmp, &img.dest, e))?;
    Ok(())
}

/// What a failed rename of a finished image to its final name is in tpl's terms.
pub fn rename_error(tmp: &ImageSpec, dest: &ImageSpec, e: tpl_ceph::Error) -> Error {
    match e {
        tpl_ceph::Error::AlreadyExists { .. } => Error::refused(
            format!("cannot rename '{tmp}' to '{dest}'"),
            "an image of that name appeared meanwhile, made by another run; nothing is ever \
             overwritten",
        ),
        e => ceph_error(&format!("rename '{tmp}' to '{dest}'"), e),
    }
}

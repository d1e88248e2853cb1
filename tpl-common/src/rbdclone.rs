//! The RBD arm of making a clone's volumes (tpl-clone): an `rbd clone` of the locked template's protected snapshot (linked) or a copy of it (full), made under a temporary name in the same cluster and renamed into place, as files are.
//!
//! Every image is made under this run's temporary name (`.NAME.tpl-tmp-HOST-PID`, as the
//! clone's files are) and journaled before it is made, its id journaled before the rename
//! to its final name, which never replaces an image: a kill -9 at any point leaves only
//! what the next run of any tool removes, and an image of the same name made by another
//! run is never taken for this run's (its id differs).

use std::ops::ControlFlow;
use std::path::Path;

use tpl_ceph::{Cluster, ImageSpec, NewImageOptions};

use crate::cli::Ctx;
use crate::dom::Dom;
use crate::error::{Error, Result};
use crate::journal::clone::{self as cj, Entry};
use crate::journal::Journal;
use crate::ownfiles::{renamed_file, Naming, OwnRbd};
use crate::rbd::{ceph_error, spec_of, TEMPLATE_SNAPSHOT};
use crate::record::{CloneMode, RbdSource};
use crate::session::Session;
use crate::text::shown;
use crate::volume::{Identity, Vol};

/// One RBD disk of the template to clone.
#[derive(Debug)]
pub struct SrcRbd {
    pub target: String,
    pub source: RbdSource,
    /// What the clones are made from: the protected snapshot of a locked template, else
    /// the image itself.
    from: ImageSpec,
    /// Where the clones' images go: the template's pool, or --pool.
    pool: String,
    /// The template image's virtual size.
    pub size: u64,
}

/// One image a clone gets.
#[derive(Debug)]
pub struct NewImage<'p> {
    pub src: &'p SrcRbd,
    dest: ImageSpec,
    /// Its new virtual size, when it is to be bigger than the template's (--disk-size).
    pub grow: Option<u64>,
}

impl SrcRbd {
    /// What the clones are made from (`POOL[/NS]/IMAGE[@SNAP]`), in words.
    pub fn from(&self) -> String {
        self.from.to_string()
    }
}

impl NewImage<'_> {
    /// `POOL[/NS]/IMAGE`, as the clone's disk names it.
    pub fn name(&self) -> String {
        self.dest.to_string()
    }

    /// The image under its final name.
    pub fn vol(&self) -> Vol {
        Vol::Rbd(self.dest.to_string())
    }

    /// The image under this run's temporary name.
    pub fn tmp(&self) -> Vol {
        Vol::Rbd(tmp_spec(&self.dest).to_string())
    }

    /// Whether an image of its final name exists already (a clone's name must be free).
    pub fn exists(&self, s: &Session) -> Result<bool> {
        s.ceph
            .cluster_for(&self.src.source)?
            .exists(&self.dest)
            .map_err(|e| ceph_error(&format!("look up '{}'", self.dest), e))
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
    let size = cluster
        .info(&head)
        .map_err(|e| ceph_error(&format!("read '{head}'"), e))?
        .size;
    Ok(SrcRbd {
        size,
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
        grow: None,
    }
}

/// This run's temporary name for an image.
fn tmp_spec(dest: &ImageSpec) -> ImageSpec {
    let tmp = cj::tmp_name(Path::new(&dest.image));
    dest.sibling(tmp.to_string_lossy().into_owned())
}

/// Make one image under its temporary name (journaled first); returns the temporary image.
pub fn make(
    ctx: &Ctx,
    s: &Session,
    jrnl: &mut Journal,
    uuid: &str,
    mode: CloneMode,
    img: &NewImage,
) -> Result<Vol> {
    let cluster = s.ceph.cluster_for(&img.src.source)?;
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
    if let Some(size) = img.grow {
        cluster
            .resize(&tmp, size)
            .map_err(|e| ceph_error(&format!("grow '{tmp}'"), e))?;
    }
    Ok(Vol::Rbd(tmp.to_string()))
}

/// Rename a finished image to its final name (never over another), its id (`id`, else
/// read here) journaled first.
pub fn commit(
    s: &Session,
    jrnl: &mut Journal,
    uuid: &str,
    tmp: &Vol,
    id: Option<String>,
    img: &NewImage,
) -> Result<()> {
    let cluster = s.ceph.cluster_for(&img.src.source)?;
    let tmp = &tmp.spec()?;
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
fn rename_error(tmp: &ImageSpec, dest: &ImageSpec, e: tpl_ceph::Error) -> Error {
    match e {
        tpl_ceph::Error::AlreadyExists { .. } => Error::refused(
            format!("cannot rename '{tmp}' to '{dest}'"),
            "an image of that name appeared meanwhile, made by another run; nothing is ever \
             overwritten",
        ),
        e => ceph_error(&format!("rename '{tmp}' to '{dest}'"), e),
    }
}

/// One image of a linked batch to make ahead, by a thread of [`Maker`], for clone `uuid`.
#[derive(Debug, Clone)]
pub struct Todo {
    pub uuid: String,
    from: ImageSpec,
    tmp: ImageSpec,
    dest: ImageSpec,
    grow: Option<u64>,
}

impl Todo {
    /// The image under this run's temporary name.
    pub fn tmp(&self) -> Vol {
        Vol::Rbd(self.tmp.to_string())
    }

    /// The image under its final name.
    pub fn dest(&self) -> Vol {
        Vol::Rbd(self.dest.to_string())
    }
}

/// The run's one connection to the cluster a linked batch's images are made in, shared
/// by the threads that make them ahead (an `rbd clone` and an `rbd rename` are each a
/// dozen round trips and no data: threads overlap them). What is journaled stays the
/// caller's, in order, on its own thread.
#[derive(Debug, Clone, Copy)]
pub struct Maker<'c> {
    cluster: &'c Cluster,
}

impl<'c> Maker<'c> {
    /// The connection for `img`'s cluster.
    pub fn of(s: &'c Session, img: &NewImage) -> Result<Maker<'c>> {
        Ok(Maker {
            cluster: s.ceph.cluster_for(&img.src.source)?,
        })
    }

    /// What to make for clone `uuid`'s `img`, and its journal entry (to log before it is made).
    pub fn todo(&self, uuid: &str, img: &NewImage) -> (Entry, Todo) {
        let tmp = tmp_spec(&img.dest);
        let entry = Entry::Tmp {
            uuid: uuid.into(),
            vol: Vol::Rbd(tmp.to_string()),
            client: Some(self.cluster.client_id()),
        };
        let todo = Todo {
            uuid: uuid.into(),
            from: img.src.from.clone(),
            tmp,
            dest: img.dest.clone(),
            grow: img.grow,
        };
        (entry, todo)
    }

    /// Make it under its temporary name: an `rbd clone` of the template's snapshot.
    /// Returns its id.
    pub fn make_linked(&self, t: &Todo) -> Result<String> {
        // An image under our own temporary name can only be a dead run's (pids are reused).
        let _ = self.cluster.remove(&t.tmp);
        self.cluster
            .clone_image(&t.from, &t.tmp, &NewImageOptions::default())
            .and_then(|()| match t.grow {
                Some(size) => self.cluster.resize(&t.tmp, size),
                None => Ok(()),
            })
            .and_then(|()| self.cluster.info(&t.tmp))
            .map(|info| info.id)
            .map_err(|e| ceph_error(&format!("clone '{}' to '{}'", t.from, t.tmp), e))
    }

    /// The journal entry of a made image, `id`, about to take its final name.
    pub fn made(&self, t: &Todo, id: &str) -> Entry {
        Entry::Made {
            uuid: t.uuid.clone(),
            vol: Vol::Rbd(t.dest.to_string()),
            id: Identity::Rbd { id: id.into() },
            client: Some(self.cluster.client_id()),
        }
    }

    /// Rename a made image to its final name, never over another.
    pub fn commit(&self, t: &Todo) -> Result<()> {
        self.cluster
            .rename(&t.tmp, &t.dest.image)
            .map(drop)
            .map_err(|e| rename_error(&t.tmp, &t.dest, e))
    }
}

//! What a batch of clones will be, all of it checked before anything is made: the mode, the template's own files, and each clone's files and their names.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tpl_common::cli::Ctx;
use tpl_common::dom::Dom;
use tpl_common::domxml::DomainXml;
use tpl_common::error::{Error, Result};
use tpl_common::image::{backing_chain, is_qcow2, qcow2_backing, writable_backing};
use tpl_common::ownfiles::{renamed_file, Naming, Role};
use tpl_common::rbdclone::{self, NewImage, SrcRbd};
use tpl_common::record::CloneMode;
use tpl_common::session::Session;
use tpl_common::text::{shown, shown_path};

use crate::images;
use crate::Args;

/// One template disk to clone.
#[derive(Debug)]
pub struct SrcDisk {
    pub target: String,
    pub path: PathBuf,
    pub format: String,
    /// The image has a backing chain: a full clone flattens it.
    pub chained: bool,
    /// Where the clones' files for it go.
    pub dir: PathBuf,
    /// The extension of the clones' files.
    pub ext: String,
    dev: u64,
    ino: u64,
    /// For linked clones: the template's image and the images under it, with formats.
    pub chain: Vec<(PathBuf, String)>,
}

impl SrcDisk {
    /// After a linked clone's overlay is written: it must stand on the template's image as
    /// it was checked (the same file, still read-only), or the clone would read something
    /// that changes, or nothing at all.
    pub fn check_still_the_template(&self, overlay: &Path) -> Result<()> {
        let fail = |why: String| {
            Error::failed(
                format!("cannot make the overlay '{}'", shown_path(overlay)),
                why,
            )
        };
        let m = fs::symlink_metadata(&self.path).map_err(|e| {
            fail(format!(
                "the template's image '{}' is gone: {e}",
                shown_path(&self.path)
            ))
        })?;
        if m.dev() != self.dev || m.ino() != self.ino {
            return Err(fail(format!(
                "'{}' is no longer the template's image that was checked; something replaced \
                 it meanwhile",
                shown_path(&self.path)
            )));
        }
        if m.permissions().mode() & 0o222 != 0 {
            return Err(Error::refused(
                format!("cannot make the overlay '{}'", shown_path(overlay)),
                format!(
                    "the template's image '{}' became writable meanwhile",
                    shown_path(&self.path)
                ),
            ));
        }
        match qcow2_backing(overlay)? {
            Some(b)
                if Path::new(&b.name) == self.path && b.format.as_deref() == Some(&self.format) =>
            {
                Ok(())
            }
            other => Err(fail(format!(
                "it names {other:?} as its backing file, not '{}' ({})",
                shown_path(&self.path),
                self.format
            ))),
        }
    }
}

/// Everything checked before anything is created.
#[derive(Debug)]
pub struct Plan {
    pub mode: CloneMode,
    pub xml: DomainXml,
    pub disks: Vec<SrcDisk>,
    /// The template's RBD disks.
    pub rbd: Vec<SrcRbd>,
    /// The template's NVRAM file, when it has one that exists.
    pub nvram: Option<PathBuf>,
    /// The NVRAM file the template's definition names but that does not exist yet:
    /// nothing to copy, but each clone's definition names its own (libvirt makes it at the
    /// first start), never the template's, which every clone would then share.
    pub missing_nvram: Option<PathBuf>,
    pub start: bool,
    pub progress: bool,
    /// The template's own seed disks (a template made from a clone): no clone gets them.
    pub drop_targets: Vec<String>,
    /// The first disk's virtual size, when the clones' is to be bigger (--disk-size).
    pub disk_size: Option<u64>,
    /// The overlays made so far, which the next linked clones copy.
    pub overlays: images::Overlays,
}

/// One file a clone gets: where it goes, and how it is made.
#[derive(Debug)]
pub struct NewFile<'p> {
    pub role: Role,
    pub dest: PathBuf,
    pub make: Make<'p>,
}

#[derive(Debug)]
pub enum Make<'p> {
    Overlay {
        disk: &'p SrcDisk,
    },
    Copy {
        src: PathBuf,
    },
    Flatten {
        src: PathBuf,
        format: String,
    },
    /// The clone's NoCloud seed image, these bytes.
    Seed(Vec<u8>),
}

impl Plan {
    /// Check everything for clones of `tpl` named `names`, to be defined on `dest` (the
    /// template's connection, or --to's).
    pub fn new(
        ctx: &Ctx,
        args: &Args,
        tpl: &Dom,
        names: &[String],
        dest: &Session,
    ) -> Result<Plan> {
        let t = shown(&tpl.name);
        tpl.require_shut_off("clone")?;
        let meta = tpl.meta()?;
        let xml = tpl.xml()?;
        let locked = meta.template.locked;
        let mode = if args.linked || (!args.full && locked) {
            CloneMode::Linked
        } else {
            CloneMode::Full
        };
        let refuse = |why: String| Error::refused(format!("cannot clone domain '{t}'"), why);
        if meta.template.generalized.is_none() && !args.force {
            return Err(refuse(format!(
                "it is not a generalized template, so its clones would share its machine-id, \
                 SSH host keys and other identity; run 'tpl-generalize {t}' first, or clone \
                 it anyway with --force"
            )));
        }
        if mode == CloneMode::Linked && !locked {
            return Err(refuse(format!(
                "a linked clone needs a locked template, since a writable backing file \
                 silently corrupts its clones, and --force does not change that; run \
                 'tpl-lock {t}' first, or make a --full clone"
            )));
        }
        let dir = target_dir(args.dir.as_deref())?;
        let own = tpl.own_files("clone")?;
        if let Some(note) = own.missing_nvram_note(&tpl.name) {
            ctx.info(note);
        }
        let others = tpl.others()?;
        own.check_not_shared(&tpl.name, "clone", others.iter().map(|o| &o.files))?;
        let disks = own
            .disks()
            .map(|f| src_disk(f, mode, dir.as_deref(), &refuse))
            .collect::<Result<Vec<_>>>()?;
        if !std::ptr::eq(tpl.session, dest) {
            // The clones' files are written here and read there: the template's images (a
            // linked clone's backing files), the clones' directories and the NVRAM must be
            // the same files for the hypervisor at --to.
            for d in &disks {
                dest.require_same_files(
                    &d.path,
                    &format!(
                        "the template's disk {} image '{}'",
                        d.target,
                        shown_path(&d.path)
                    ),
                )?;
                dest.require_same_files(
                    &d.dir.join("x"),
                    &format!("the clones' directory '{}'", shown_path(&d.dir)),
                )?;
            }
            for nv in own.files.iter().filter(|f| f.role == Role::Nvram) {
                dest.require_same_files(
                    &nv.path,
                    &format!("the template's NVRAM '{}'", shown_path(&nv.path)),
                )?;
            }
        }
        let rbd = own
            .rbd
            .iter()
            .map(|r| rbdclone::src_rbd(tpl, r, mode, args.pool.as_deref(), &refuse))
            .collect::<Result<Vec<_>>>()?;
        let plan = Plan {
            mode,
            nvram: own
                .files
                .iter()
                .find(|f| f.role == Role::Nvram)
                .map(|f| f.path.clone()),
            missing_nvram: own.missing_nvram.clone(),
            xml,
            disks,
            rbd,
            start: args.start || args.ready.is_some(),
            progress: !args.common.quiet,
            drop_targets: own
                .files
                .iter()
                .filter_map(|f| match &f.role {
                    Role::Seed { target } => Some(target.clone()),
                    _ => None,
                })
                .collect(),
            disk_size: None,
            overlays: Default::default(),
        };
        plan.check_names_free(tpl, names, dest)?;
        Ok(plan)
    }

    /// Every clone's name (on `dest`) and files must be free before the first one is made.
    fn check_names_free(&self, tpl: &Dom, names: &[String], dest: &Session) -> Result<()> {
        for n in names {
            let refuse =
                |why: String| Error::refused(format!("cannot create clone '{}'", shown(n)), why);
            if dest.name_taken(n)? {
                return Err(refuse(format!(
                    "a domain named '{}' already exists on {}",
                    shown(n),
                    shown(&dest.uri)
                )));
            }
            for img in self.images(&tpl.name, n) {
                if img.exists(tpl.session)? {
                    return Err(refuse(format!(
                        "its disk {} image '{}' already exists; nothing is ever overwritten",
                        img.src.target,
                        shown(&img.name())
                    )));
                }
            }
            let files = self.files(&tpl.name, n);
            if let Some(nv) = self.clone_nvram(&files, &tpl.name, n) {
                if nv.symlink_metadata().is_ok() {
                    return Err(refuse(format!(
                        "its NVRAM file '{}' already exists; nothing is ever overwritten",
                        shown_path(&nv)
                    )));
                }
            }
            for (i, f) in files.iter().enumerate() {
                if f.dest.symlink_metadata().is_ok() {
                    return Err(refuse(format!(
                        "its {} file '{}' already exists; nothing is ever overwritten",
                        f.role,
                        shown_path(&f.dest)
                    )));
                }
                if files[..i].iter().any(|o| o.dest == f.dest) {
                    return Err(refuse(format!(
                        "two of its files would both be '{}' (the template's images have the \
                         same name in different directories); give them different names, or \
                         leave out --dir",
                        shown_path(&f.dest)
                    )));
                }
            }
        }
        Ok(())
    }

    /// The directories this run writes files to.
    pub fn dirs(&self) -> BTreeSet<PathBuf> {
        let mut d: BTreeSet<PathBuf> = self.disks.iter().map(|d| d.dir.clone()).collect();
        d.extend(
            self.nvram
                .as_ref()
                .and_then(|n| n.parent())
                .map(Path::to_path_buf),
        );
        d
    }

    /// The files clone `name` gets, in the order they are renamed into place (by path, so
    /// that two runs racing for one name contend for the same file first).
    pub fn files(&self, template: &str, name: &str) -> Vec<NewFile<'_>> {
        let several = self.several();
        let mut out: Vec<NewFile> = self
            .disks
            .iter()
            .map(|d| {
                let naming = Naming::Disk {
                    target: &d.target,
                    several,
                    ext: Some(&d.ext),
                };
                let file = renamed_file(&d.path, template, name, naming);
                let make = match (self.mode, d.chained) {
                    (CloneMode::Linked, _) => Make::Overlay { disk: d },
                    (CloneMode::Full, false) => Make::Copy {
                        src: d.path.clone(),
                    },
                    (CloneMode::Full, true) => Make::Flatten {
                        src: d.path.clone(),
                        format: d.format.clone(),
                    },
                };
                NewFile {
                    role: Role::Disk {
                        target: d.target.clone(),
                    },
                    dest: d.dir.join(file.file_name().unwrap_or_default()),
                    make,
                }
            })
            .collect();
        if let Some(nv) = &self.nvram {
            out.push(NewFile {
                role: Role::Nvram,
                dest: renamed_file(nv, template, name, Naming::Nvram),
                make: Make::Copy { src: nv.clone() },
            });
        }
        out.sort_by(|a, b| a.dest.cmp(&b.dest));
        out
    }

    /// Whether the template has several disks (then a file or image not named after it is
    /// named after its target).
    fn several(&self) -> bool {
        self.disks.len() + self.rbd.len() > 1
    }

    /// The RBD images clone `name` gets.
    pub fn images(&self, template: &str, name: &str) -> Vec<NewImage<'_>> {
        self.rbd
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut img = rbdclone::new_image(r, template, name, self.several());
                if i == 0 && self.disks.is_empty() {
                    img.grow = self.disk_size;
                }
                img
            })
            .collect()
    }

    /// The NVRAM path clone `name`'s definition names: its copy of the template's, or the
    /// path libvirt is to make it at when the template has none yet.
    pub fn clone_nvram(&self, files: &[NewFile], template: &str, name: &str) -> Option<PathBuf> {
        files
            .iter()
            .find(|f| f.role == Role::Nvram)
            .map(|f| f.dest.clone())
            .or_else(|| {
                self.missing_nvram
                    .as_ref()
                    .map(|nv| renamed_file(nv, template, name, Naming::Nvram))
            })
    }

    /// The format of a template disk's image.
    /// The new size of the file with role `role`, when it is the first disk and grows.
    pub fn size_of(&self, role: &Role) -> Option<u64> {
        // On a template without file disks the first RBD disk grows (see images()).
        match (role, self.disks.first()) {
            (Role::Disk { target }, Some(first)) if *target == first.target => self.disk_size,
            _ => None,
        }
    }

    /// The clones' first disk to be `size` bytes: never smaller than the template's. The
    /// first disk is the first file disk, or on a template without one its first RBD disk.
    pub fn set_disk_size(&mut self, size: u64) -> Result<()> {
        let (target, now) = match (self.disks.first(), self.rbd.first()) {
            (Some(d), _) => (d.target.clone(), tpl_common::image::virtual_size(&d.path)?),
            (None, Some(r)) => (r.target.clone(), r.size),
            (None, None) => {
                return Err(Error::usage(
                    "--disk-size needs a template with a disk",
                    "the template has no disk of its own to grow",
                ))
            }
        };
        if size < now {
            return Err(Error::usage(
                format!(
                    "--disk-size {} is smaller than the template's disk {target} ({})",
                    images::human(size),
                    images::human(now)
                ),
                "a clone's disk can only grow: give at least the template's size",
            ));
        }
        self.disk_size = (size > now).then_some(size);
        Ok(())
    }

    pub fn format_of(&self, src: &Path) -> String {
        self.disks
            .iter()
            .find(|d| d.path == src)
            .map(|d| d.format.clone())
            .unwrap_or_else(|| "raw".into())
    }

    /// `--dry-run`: what would be made, and how.
    pub fn describe(&self, ctx: &Ctx, tpl: &Dom, names: &[String]) {
        for n in names {
            ctx.info(format!(
                "would make {} clone '{}' of '{}'",
                self.mode.as_str(),
                shown(n),
                shown(&tpl.name)
            ));
            for f in self.files(&tpl.name, n) {
                let how = match &f.make {
                    Make::Overlay { disk } => format!(
                        "an overlay on '{}' ({})",
                        shown_path(&disk.path),
                        disk.format
                    ),
                    Make::Copy { src } => format!("a copy of '{}'", shown_path(src)),
                    Make::Flatten { src, .. } => {
                        format!("a flattened copy of '{}'", shown_path(src))
                    }
                    Make::Seed(_) => "its NoCloud seed".into(),
                };
                ctx.info(format!("  {} '{}': {how}", f.role, shown_path(&f.dest)));
            }
        }
    }

    /// Let the storage pools over the clones' directories list the new files. Once per
    /// run: a refresh reads every image in the pool, and one per clone made 100 clones
    /// in a pool directory quadratic (make bench).
    pub fn refresh_pools(&self, s: &Session) {
        for d in self.dirs() {
            s.refresh_pools_for(&d);
        }
    }
}

/// `--dir`, absolute (libvirt needs absolute disk paths whatever our cwd is).
fn target_dir(dir: Option<&Path>) -> Result<Option<PathBuf>> {
    match dir {
        Some(d) if d.is_dir() => Ok(Some(
            fs::canonicalize(d).map_err(|e| Error::io("cannot resolve --dir", d, e))?,
        )),
        Some(d) => Err(Error::usage(
            format!("--dir '{}' is not a directory", shown_path(d)),
            "create it first, or leave --dir out to put the clones next to the template",
        )),
        None => Ok(None),
    }
}

/// The image's format: as the definition says, else what qemu would probe.
fn format_of(path: &Path, given: Option<&str>) -> Result<String> {
    Ok(match given {
        Some(f) => f.to_string(),
        None if is_qcow2(path)? => "qcow2".into(),
        None => "raw".into(),
    })
}

fn src_disk(
    f: &tpl_common::ownfiles::OwnFile,
    mode: CloneMode,
    dir: Option<&Path>,
    refuse: &dyn Fn(String) -> Error,
) -> Result<SrcDisk> {
    let Role::Disk { target } = &f.role else {
        unreachable!("disks() gives disks")
    };
    let m = fs::metadata(&f.path).map_err(|e| Error::io("cannot read", &f.path, e))?;
    if mode == CloneMode::Linked {
        if m.permissions().mode() & 0o222 != 0 {
            return Err(refuse(format!(
                "its {f} is writable although the template is marked locked, so linked \
                 clones would be corrupted by a write; run 'tpl-lock' on it again"
            )));
        }
        if let Some(base) = writable_backing(&f.path)? {
            return Err(refuse(format!(
                "its {f} backs onto '{}', which is writable, so linked clones would be \
                 corrupted by a write to it; lock that image's own domain",
                shown_path(&base)
            )));
        }
    }
    let format = format_of(&f.path, f.format.as_deref())?;
    let links = backing_chain(&f.path)?;
    let mut chain = vec![(f.path.clone(), format.clone())];
    for l in &links {
        chain.push((l.path.clone(), format_of(&l.path, l.format.as_deref())?));
    }
    let ext = match mode {
        CloneMode::Linked => "qcow2".to_string(),
        CloneMode::Full => f
            .path
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| format.clone()),
    };
    Ok(SrcDisk {
        target: target.clone(),
        dir: match dir {
            Some(d) => d.to_path_buf(),
            None => f.path.parent().unwrap_or(Path::new("/")).to_path_buf(),
        },
        path: f.path.clone(),
        format,
        chained: !links.is_empty(),
        ext,
        dev: m.dev(),
        ino: m.ino(),
        chain,
    })
}

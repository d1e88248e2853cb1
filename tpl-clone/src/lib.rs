//! tpl-clone: make linked or full clones of a shut-off template, each with its own name, UUID, MACs, disks, NVRAM and first-boot identity, all or nothing.

mod images;
mod interrupt;
mod journal;
mod xml;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::domxml::DomainXml;
use tpl_common::error::{Error, Result};
use tpl_common::fsutil::{fsync_dir, rename_noreplace};
use tpl_common::image::{backing_chain, is_qcow2};
use tpl_common::meta::Meta;
use tpl_common::names::validate_name;
use tpl_common::record::{CloneOrigin, DomainRef};
use tpl_common::session::{Dom, Session};
use virt::domain::Domain;

use crate::images::Method;
use crate::interrupt::{signal_name, Interrupt};
use crate::journal::{Entry, Journal};
use crate::xml::{CloneSpec, Macs, NewDisk};

const TOOL: &str = "tpl-clone";

/// Make clones of a shut-off libvirt template: linked (a qcow2 overlay on the template's
/// image) or full (an independent copy), one record per clone on stdout.
///
///     tpl-clone TplUbuntu web1 web2 web3
///     tpl-clone TplUbuntu --count 20 --prefix ci- --start     # ci-01 … ci-20
///     tpl-lock TplUbuntu | tpl-clone web1                     # template from stdin
///
/// With a single NAME (or with --count and no name at all) the template comes as a record
/// on stdin; TEMPLATE `-` also reads it from stdin.
///
/// Linked is the default for a locked template (tpl-lock), full otherwise; a linked clone
/// always needs a locked template, since a writable backing file silently corrupts its
/// clones. Each clone gets a new name, UUID and MAC addresses, its own disk files
/// (NAME.qcow2, or NAME-TARGET.EXT when the template has several disks) in the template
/// image's directory or --dir, its own NVRAM copy, and its first-boot identity in the
/// SMBIOS serial in cloud-init's NoCloud form `ds=nocloud;h=HOSTNAME;i=INSTANCE-ID`
/// (the instance id is the clone's UUID). CD-ROMs, read-only and shareable disks stay
/// shared.
///
/// Files are written under temporary names and renamed into place when complete; the
/// domain is defined last. On an error, SIGINT, SIGTERM or SIGHUP the unfinished clone's
/// files and domain are removed, and what a killed run left is removed by the next run
/// (from the journal each run keeps in $TPL_STATE_DIR, default /var/lib/tpl for root,
/// under clone-journal/). Exit status: 0, 1 failed, 2 bad usage, 3 refused, 128+N for
/// signal N.
#[derive(Parser, Debug)]
#[command(name = TOOL, version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// The template (name or UUID) and the names of the clones
    #[arg(value_name = "[TEMPLATE] NAME")]
    names: Vec<String>,

    /// Make linked clones: qcow2 overlays backed by the (locked) template's images
    #[arg(long, conflicts_with = "full")]
    linked: bool,

    /// Make full clones: standalone copies (reflink where the file system can)
    #[arg(long)]
    full: bool,

    /// Make N clones named PREFIX1 … PREFIXN, the number zero-padded to the width of N
    /// (--count 20 --prefix ci- gives ci-01 … ci-20)
    #[arg(long, value_name = "N", requires = "prefix",
          value_parser = clap::value_parser!(u32).range(1..=10000))]
    count: Option<u32>,

    /// The name prefix for --count
    #[arg(long, value_name = "PREFIX", requires = "count")]
    prefix: Option<String>,

    /// Put the clones' disk files in DIR instead of next to the template's images
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Start each clone once it is defined
    #[arg(long)]
    start: bool,

    /// The guest host name of each clone; `{name}` stands for the clone's name
    /// [default: the clone's name]
    #[arg(long, value_name = "PATTERN")]
    hostname: Option<String>,

    /// Do not put the first-boot identity (host name, instance id) in the SMBIOS serial
    #[arg(long, conflicts_with = "hostname")]
    no_identity: bool,

    /// Clone a domain that is not a generalized template (never lifts the lock
    /// requirement of linked clones)
    #[arg(long)]
    force: bool,

    #[command(flatten)]
    common: Common,
}

pub fn main() -> ExitCode {
    cli::run::<Args>(TOOL, |a| &a.common, run)
}

fn run(args: &Args, ctx: &mut Ctx) -> Result<()> {
    let intr = Interrupt::install()?;
    let (template, names) = split_args(args)?;
    let hostnames = hostnames(args, &names)?;
    let r = match template {
        Some(t) => DomainRef::by_arg(&t),
        None => {
            let mut recs: Vec<DomainRef> = ctx.inputs(None)?.collect::<Result<_>>()?;
            match recs.len() {
                1 => recs.remove(0),
                0 => {
                    return Err(Error::usage(
                        "no template given",
                        "name it before the clone names, or pipe its record in",
                    ))
                }
                n => {
                    return Err(Error::usage(
                        format!("{n} records on stdin"),
                        "tpl-clone clones one template per run; pipe in one record",
                    ))
                }
            }
        }
    };
    let s = ctx.session(&r)?;
    let tpl = Dom::lookup(&s, &r)?;
    // Whatever killed runs left goes first: a final file of a clone they never defined
    // would otherwise make this run refuse the name.
    let jdir = journal::journal_dir();
    let mut removed = journal::clean_dead(&jdir, |uri, uuid| domain_exists(&s, uri, uuid));
    let plan = Plan::new(args, &tpl, &names);
    if let Ok(plan) = &plan {
        removed.extend(
            plan.dirs()
                .iter()
                .flat_map(|d| journal::sweep_tmp(d, &jdir)),
        );
    }
    for what in &removed {
        ctx.info(format!("removed {what}, left by a killed run"));
    }
    let plan = plan?;
    let mut jrnl = Journal::create(&jdir)?;

    let mut macs = Macs::default();
    for d in s.all_domains()? {
        if let Ok(x) = Dom::new(&s, d).and_then(|d| d.xml()) {
            macs.add_from(&x);
        }
    }
    let mut made_any = false;
    for (name, host) in names.iter().zip(&hostnames) {
        if intr.signal().is_some() {
            break;
        }
        let res = plan.make(
            ctx,
            &s,
            &tpl,
            name,
            host.as_deref(),
            &mut macs,
            &mut jrnl,
            &intr,
        );
        made_any |= res.is_ok();
        match res.and_then(|dom| Dom::new(&s, dom)?.describe()) {
            Ok(rec) => {
                if let Err(e) = ctx.emit(&rec) {
                    plan.refresh_pools(&s);
                    return Err(e);
                }
            }
            Err(e) => ctx.fail(&e),
        }
    }
    jrnl.close();
    if made_any {
        plan.refresh_pools(&s);
    }
    if let Some(sig) = intr.signal() {
        // Not eprintln!: after SIGHUP the terminal is gone, and it would panic on that.
        tpl_common::cli::say(format_args!(
            "{TOOL}: stopped by {}; the clones finished before it stay",
            signal_name(sig)
        ));
        std::process::exit(128 + sig);
    }
    Ok(())
}

/// Whether the domain with this UUID exists at `uri` (None: libvirt cannot tell).
fn domain_exists(s: &Session, uri: &str, uuid: &str) -> Option<bool> {
    let other;
    let s = if uri == s.uri {
        s
    } else {
        other = Session::open(uri).ok()?;
        &other
    };
    match s.conn.lookup_domain_by_uuid_string(uuid) {
        Ok(_) => Some(true),
        Err(e)
            if matches!(
                e.code(),
                virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
            ) =>
        {
            Some(false)
        }
        Err(_) => None,
    }
}

/// The template argument (None: from stdin) and the clone names.
fn split_args(args: &Args) -> Result<(Option<String>, Vec<String>)> {
    let pos = &args.names;
    let (template, mut names) =
        match (args.count, pos.len()) {
            (Some(_), 0) => (None, Vec::new()),
            (Some(_), 1) => (Some(pos[0].clone()), Vec::new()),
            (Some(_), _) => {
                return Err(Error::usage(
                    "too many arguments with --count",
                    "give at most the template; the names come from --prefix",
                ))
            }
            (None, 0) => return Err(Error::usage(
                "no clone name given",
                "usage: tpl-clone [TEMPLATE] NAME... or tpl-clone [TEMPLATE] --count N --prefix P",
            )),
            (None, 1) => (None, pos.clone()),
            (None, _) => (Some(pos[0].clone()), pos[1..].to_vec()),
        };
    if let (Some(n), Some(p)) = (args.count, &args.prefix) {
        let width = n.to_string().len();
        names = (1..=n).map(|i| format!("{p}{i:0width$}")).collect();
    }
    let template = template.filter(|t| t != "-");
    let mut seen = BTreeSet::new();
    for n in &names {
        validate_name("clone name", n)?;
        if !seen.insert(n) {
            return Err(Error::usage(
                format!("clone name '{n}' is given twice"),
                "each clone needs its own name",
            ));
        }
    }
    Ok((template, names))
}

/// The guest host name for each clone (None with --no-identity).
fn hostnames(args: &Args, names: &[String]) -> Result<Vec<Option<String>>> {
    names
        .iter()
        .map(|n| {
            if args.no_identity {
                return Ok(None);
            }
            let h = match &args.hostname {
                Some(p) => p.replace("{name}", n),
                // A domain name may hold what a host name cannot; the default makes do.
                None => {
                    let h: String = n
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                                c
                            } else {
                                '-'
                            }
                        })
                        .collect();
                    let h = h.trim_matches(['-', '.']).to_string();
                    if h.is_empty() {
                        "clone".into()
                    } else {
                        h
                    }
                }
            };
            xml::validate_hostname(&h)?;
            Ok(Some(h))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Linked,
    Full,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Linked => "linked",
            Mode::Full => "full",
        }
    }
}

/// One template disk to clone.
#[derive(Debug)]
struct SrcDisk {
    target: String,
    path: PathBuf,
    format: String,
    /// The image has a backing chain: a full clone flattens it.
    chained: bool,
    dir: PathBuf,
    ext: String,
}

/// Everything checked before anything is created.
#[derive(Debug)]
struct Plan {
    mode: Mode,
    xml: DomainXml,
    disks: Vec<SrcDisk>,
    nvram: Option<PathBuf>,
    start: bool,
    progress: bool,
    /// The overlays made so far, which the next linked clones copy.
    overlays: images::Overlays,
}

/// One file a clone gets: where it goes, and how it is made.
#[derive(Debug)]
struct NewFile {
    what: String,
    dest: PathBuf,
    make: Make,
}

#[derive(Debug)]
enum Make {
    Overlay { backing: PathBuf, format: String },
    Copy { src: PathBuf },
    Flatten { src: PathBuf, format: String },
}

impl Plan {
    fn new(args: &Args, tpl: &Dom, names: &[String]) -> Result<Plan> {
        let t = &tpl.name;
        tpl.require_shut_off("clone")?;
        let meta = tpl.meta()?;
        let xml = tpl.xml()?;
        let locked = meta.template.locked;
        let mode = if args.linked {
            Mode::Linked
        } else if args.full {
            Mode::Full
        } else if locked {
            Mode::Linked
        } else {
            Mode::Full
        };
        let refuse = |why: String| Error::refused(format!("cannot clone domain '{t}'"), why);
        if meta.template.generalized.is_none() && !args.force {
            return Err(refuse(format!(
                "it is not a generalized template, so its clones would share its machine-id, \
                 SSH host keys and other identity; run 'tpl-generalize {t}' first, or clone \
                 it anyway with --force"
            )));
        }
        if mode == Mode::Linked && !locked {
            return Err(refuse(format!(
                "a linked clone needs a locked template, since a writable backing file \
                 silently corrupts its clones, and --force does not change that; run \
                 'tpl-lock {t}' first, or make a --full clone"
            )));
        }
        // Absolute, because libvirt needs absolute disk paths whatever our cwd is.
        let dir_opt =
            match &args.dir {
                Some(d) if d.is_dir() => {
                    Some(fs::canonicalize(d).map_err(|e| Error::io("cannot resolve --dir", d, e))?)
                }
                Some(d) => return Err(Error::usage(
                    format!("--dir '{}' is not a directory", d.display()),
                    "create it first, or leave --dir out to put the clones next to the template",
                )),
                None => None,
            };
        // Shared by every clone as it stands: the template's own firmware variables.
        if let Some(why) = xml.nvram_not_a_file() {
            return Err(refuse(format!(
                "{why}, which every clone would share and write to; tpl-clone copies only an \
                 NVRAM file"
            )));
        }
        let mut disks = Vec::new();
        let writable: Vec<_> = xml
            .disks()
            .into_iter()
            .filter(|d| d.is_writable())
            .collect();
        for d in &writable {
            // The kind first: a volume, network, nvme or vhostuser disk has no path, and
            // skipping it would leave the template's disk in every clone's definition, so
            // that each clone wrote into the template.
            if d.kind != "file" {
                return Err(refuse(format!(
                    "its disk {} is a '{}' disk, which every clone would share and write \
                     to; tpl-clone clones file disks only (make it <readonly/> or \
                     <shareable/> to share it, or detach it)",
                    d.target, d.kind
                )));
            }
            // An empty drive (a floppy without a medium, say): nothing to copy.
            let Some(path) = d.path.clone() else { continue };
            // Never through a symbolic link, as tpl-lock: the clone's files would be
            // named and placed after the link while its contents came from elsewhere.
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(refuse(format!(
                    "its disk {} image '{}' is a symbolic link, and tpl-clone never follows \
                     one; point the domain at the real file with 'virsh edit {t}'",
                    d.target,
                    path.display()
                )));
            }
            // Not a refusal: nothing unsafe was asked, the template is broken (exit 1).
            let m = fs::metadata(&path).map_err(|e| {
                Error::failed(
                    format!("cannot clone domain '{t}'"),
                    format!(
                        "its disk {} image '{}' cannot be read: {e}",
                        d.target,
                        path.display()
                    ),
                )
            })?;
            if mode == Mode::Linked
                && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o222 != 0
            {
                return Err(refuse(format!(
                    "its disk {} image '{}' is writable although the template is marked \
                     locked, so linked clones would be corrupted by a write; run \
                     'tpl-lock {t}' again",
                    d.target,
                    path.display()
                )));
            }
            let format = match &d.format {
                Some(f) => f.clone(),
                None if is_qcow2(&path)? => "qcow2".into(),
                None => "raw".into(),
            };
            let chained = !backing_chain(&path)?.is_empty();
            let dir = match &dir_opt {
                Some(d) => d.clone(),
                None => path.parent().unwrap_or(Path::new("/")).to_path_buf(),
            };
            let ext = match mode {
                Mode::Linked => "qcow2".to_string(),
                Mode::Full => path
                    .extension()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format.clone()),
            };
            disks.push(SrcDisk {
                target: d.target.clone(),
                path,
                format,
                chained,
                dir,
                ext,
            });
        }
        let plan = Plan {
            mode,
            nvram: xml.nvram(),
            xml,
            disks,
            start: args.start,
            progress: !args.common.quiet,
            overlays: Default::default(),
        };
        // Every clone's name and files must be free before the first one is made.
        for n in names {
            if tpl.session.name_taken(n)? {
                return Err(Error::refused(
                    format!("cannot create clone '{n}'"),
                    format!("a domain named '{n}' already exists"),
                ));
            }
            for f in plan.files(t, n) {
                if f.dest.symlink_metadata().is_ok() {
                    return Err(Error::refused(
                        format!("cannot create clone '{n}'"),
                        format!(
                            "its {} file '{}' already exists; nothing is ever overwritten",
                            f.what,
                            f.dest.display()
                        ),
                    ));
                }
            }
        }
        Ok(plan)
    }

    /// The directories this run writes files to.
    fn dirs(&self) -> BTreeSet<PathBuf> {
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
    fn files(&self, template: &str, name: &str) -> Vec<NewFile> {
        let several = self.disks.len() > 1;
        let mut out: Vec<NewFile> = self
            .disks
            .iter()
            .map(|d| {
                let file = if several {
                    format!("{name}-{}.{}", d.target, d.ext)
                } else {
                    format!("{name}.{}", d.ext)
                };
                let make = match (self.mode, d.chained) {
                    (Mode::Linked, _) => Make::Overlay {
                        backing: d.path.clone(),
                        format: d.format.clone(),
                    },
                    (Mode::Full, false) => Make::Copy {
                        src: d.path.clone(),
                    },
                    (Mode::Full, true) => Make::Flatten {
                        src: d.path.clone(),
                        format: d.format.clone(),
                    },
                };
                NewFile {
                    what: format!("disk {}", d.target),
                    dest: d.dir.join(file),
                    make,
                }
            })
            .collect();
        if let Some(nv) = &self.nvram {
            out.push(NewFile {
                what: "NVRAM".into(),
                dest: xml::own_path(nv, template, name),
                make: Make::Copy { src: nv.clone() },
            });
        }
        out.sort_by(|a, b| a.dest.cmp(&b.dest));
        out
    }

    /// Make one clone. On any error the files and domain made for it are removed.
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        ctx: &Ctx,
        s: &Session,
        tpl: &Dom,
        name: &str,
        hostname: Option<&str>,
        macs: &mut Macs,
        jrnl: &mut Journal,
        intr: &Interrupt,
    ) -> Result<Domain> {
        let uuid = uuid::Uuid::new_v4().to_string();
        jrnl.log(&Entry::Clone {
            name: name.into(),
            uuid: uuid.clone(),
            uri: s.uri.clone(),
        })?;
        let mut made = Made::default();
        let res = self.build(
            ctx, s, tpl, name, &uuid, hostname, macs, jrnl, intr, &mut made,
        );
        if res.is_err() {
            // A defined clone is the run's to remove again: say so before it goes, or a
            // kill in the middle would leave its files to nobody.
            if made.domain.is_some() {
                if let Err(e) = jrnl.log(&Entry::Undone { uuid: uuid.clone() }) {
                    ctx.warn(format!("while removing the unfinished clone '{name}': {e}"));
                }
            }
            for p in made.undo() {
                ctx.warn(format!("while removing the unfinished clone '{name}': {p}"));
            }
        }
        res
    }

    /// Let the storage pools over the clones' directories list the new files. Once per
    /// run: a refresh reads every image in the pool, and one per clone made 100 clones
    /// in a pool directory quadratic (make bench).
    fn refresh_pools(&self, s: &Session) {
        for d in self.dirs() {
            s.refresh_pools_for(&d);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        ctx: &Ctx,
        s: &Session,
        tpl: &Dom,
        name: &str,
        uuid: &str,
        hostname: Option<&str>,
        macs: &mut Macs,
        jrnl: &mut Journal,
        intr: &Interrupt,
        made: &mut Made,
    ) -> Result<Domain> {
        let files = self.files(&tpl.name, name);
        let nvram_exists = self.nvram.as_ref().is_some_and(|n| n.exists());
        let mut ready = Vec::new();
        for f in &files {
            intr.check()?;
            if f.what == "NVRAM" && !nvram_exists {
                // libvirt makes the NVRAM from its template on the first start.
                continue;
            }
            let tmp = journal::tmp_name(&f.dest);
            // A file under our own pid can only be a dead run's (pids are reused).
            let _ = fs::remove_file(&tmp);
            jrnl.log(&Entry::Tmp {
                uuid: uuid.into(),
                path: tmp.clone(),
            })?;
            made.tmps.push(tmp.clone());
            let label = format!("{TOOL}: {name}: {}", f.what);
            let progress = (self.progress && f.what != "NVRAM").then_some(label.as_str());
            match &f.make {
                Make::Overlay { backing, format } => {
                    images::create_overlay(backing, format, &tmp, &self.overlays, intr)?;
                    ctx.info(format!(
                        "{name}: {} is an overlay on '{}' ({format})",
                        f.what,
                        backing.display()
                    ));
                }
                Make::Copy { src } => {
                    let m = images::copy_file(src, &tmp, progress, intr)?;
                    ctx.info(format!(
                        "{name}: {} {} from '{}'",
                        f.what,
                        m.describe(),
                        src.display()
                    ));
                }
                Make::Flatten { src, format } => {
                    let m: Method = images::flatten(
                        src,
                        format,
                        &tmp,
                        progress.is_some() && ctx.show_progress(),
                        intr,
                    )?;
                    ctx.info(format!(
                        "{name}: {} {} from '{}'",
                        f.what,
                        m.describe(),
                        src.display()
                    ));
                }
            }
            ready.push((tmp, f));
        }
        intr.check()?;
        // The commit of the files: each rename fails rather than replace, so a run that
        // lost a race for this name stops here and removes only its own files.
        for (tmp, f) in &ready {
            jrnl.log_file(uuid, tmp, &f.dest)?;
            rename_noreplace(tmp, &f.dest).map_err(|e| match e {
                Error::Refused { .. } => Error::refused(
                    format!("cannot create clone '{name}'"),
                    format!(
                        "its {} file '{}' appeared meanwhile, made by another run; \
                         nothing is ever overwritten",
                        f.what,
                        f.dest.display()
                    ),
                ),
                e => e,
            })?;
            made.tmps.retain(|t| t != tmp);
            made.finals.push(f.dest.clone());
        }
        for d in ready
            .iter()
            .filter_map(|(_, f)| f.dest.parent())
            .collect::<BTreeSet<_>>()
        {
            fsync_dir(d)?;
        }
        intr.check()?;

        let new_disks: Vec<NewDisk> = files
            .iter()
            .filter_map(|f| {
                let target = f.what.strip_prefix("disk ")?;
                let format = match &f.make {
                    Make::Overlay { .. } => "qcow2".to_string(),
                    Make::Copy { src } => self
                        .disks
                        .iter()
                        .find(|d| &d.path == src)
                        .map(|d| d.format.clone())
                        .unwrap_or_else(|| "raw".into()),
                    Make::Flatten { format, .. } => format.clone(),
                };
                Some(NewDisk {
                    target: target.into(),
                    path: f.dest.clone(),
                    format,
                })
            })
            .collect();
        let nvram = files
            .iter()
            .find(|f| f.what == "NVRAM")
            .map(|f| f.dest.clone());
        let mut meta = Meta {
            clone: Some(CloneOrigin {
                template_uuid: tpl.uuid.clone(),
                template_name: tpl.name.clone(),
                mode: self.mode.as_str().into(),
                at: tpl_common::now_rfc3339(),
            }),
            ..Default::default()
        };
        meta.record_step(
            TOOL,
            format!(
                "{} clone of '{}' ({})",
                self.mode.as_str(),
                tpl.name,
                tpl.uuid
            ),
        );
        let spec = CloneSpec {
            name,
            uuid,
            template_name: &tpl.name,
            disks: &new_disks,
            nvram: nvram.as_deref(),
            serial: hostname.map(|h| xml::nocloud_serial(h, uuid)),
            meta: &meta,
        };
        let x = xml::clone_xml(&self.xml, &spec, macs)?;
        // The commit of the clone: libvirt refuses a second domain of one name.
        let dom = s.conn.define_domain_xml(&x.to_xml()).map_err(|e| {
            if s.name_taken(name).unwrap_or(false) {
                Error::refused(
                    format!("cannot create clone '{name}'"),
                    format!("a domain named '{name}' appeared meanwhile, made by another run"),
                )
            } else {
                Error::libvirt(format!("cannot define clone '{name}'"), e)
            }
        })?;
        made.domain = Some(dom.clone());
        jrnl.log(&Entry::Done { uuid: uuid.into() })?;
        ctx.info(format!(
            "defined {} clone '{name}' of '{}'",
            self.mode.as_str(),
            tpl.name
        ));
        if self.start {
            intr.check()?;
            dom.create()
                .map_err(|e| Error::libvirt(format!("cannot start clone '{name}'"), e))?;
            ctx.info(format!("started '{name}'"));
        }
        Ok(dom)
    }
}

/// What a clone in the making has created so far.
#[derive(Debug, Default)]
struct Made {
    tmps: Vec<PathBuf>,
    finals: Vec<PathBuf>,
    domain: Option<Domain>,
}

impl Made {
    /// Remove it all, the domain first so it never points at a missing file. Returns
    /// what could not be removed.
    fn undo(&mut self) -> Vec<String> {
        let undefined = match self.domain.take() {
            None => Ok(()),
            Some(d) => {
                if d.is_active().unwrap_or(false) {
                    let _ = d.destroy();
                }
                // Our NVRAM copy is in `finals` and removed with the files.
                d.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        };
        self.remove_files(undefined)
    }

    /// Remove the files, but the final ones only when no domain is left to use them: a
    /// domain on deleted files is worse than files left over.
    fn remove_files(&mut self, undefined: std::result::Result<(), String>) -> Vec<String> {
        let mut problems = Vec::new();
        let finals = std::mem::take(&mut self.finals);
        let remove = match undefined {
            Ok(()) => finals,
            Err(e) => {
                let kept: Vec<String> = finals
                    .iter()
                    .map(|p| format!("'{}'", p.display()))
                    .collect();
                problems.push(if kept.is_empty() {
                    format!("cannot undefine the domain: {e}")
                } else {
                    format!(
                        "cannot undefine the domain ({e}), so its files {} are kept; \
                         remove the domain and them by hand",
                        kept.join(", ")
                    )
                });
                Vec::new()
            }
        };
        for p in remove.into_iter().chain(self.tmps.drain(..)) {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("cannot remove '{}': {e}", p.display())),
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        let mut a = vec![TOOL];
        a.extend_from_slice(v);
        Args::try_parse_from(a).unwrap()
    }

    #[test]
    fn names_from_arguments_and_count() {
        let (t, n) = split_args(&args(&["T", "a", "b"])).unwrap();
        assert_eq!((t.as_deref(), n), (Some("T"), vec!["a".into(), "b".into()]));
        let (t, n) = split_args(&args(&["a"])).unwrap();
        assert_eq!((t, n), (None, vec!["a".to_string()]));
        let (t, n) = split_args(&args(&["-", "a", "b"])).unwrap();
        assert_eq!((t, n.len()), (None, 2));
        let (t, n) = split_args(&args(&["T", "--count", "20", "--prefix", "ci-"])).unwrap();
        assert_eq!(t.as_deref(), Some("T"));
        assert_eq!(
            (n[0].as_str(), n[19].as_str(), n.len()),
            ("ci-01", "ci-20", 20)
        );
        let (_, n) = split_args(&args(&["--count", "3", "--prefix", "w"])).unwrap();
        assert_eq!(n, ["w1", "w2", "w3"]);
        for bad in [
            &["T", "a", "a"][..],
            &["T", "a/b"],
            &["T", "x", "--count", "2", "--prefix", "p"],
        ] {
            assert_eq!(
                split_args(&args(bad)).unwrap_err().exit_code(),
                2,
                "{bad:?}"
            );
        }
        assert!(Args::try_parse_from([TOOL, "T", "a", "--linked", "--full"]).is_err());
        assert!(Args::try_parse_from([TOOL, "T", "--count", "2"]).is_err());
    }

    #[test]
    fn default_host_names_are_valid() {
        let h = hostnames(&args(&["T", "x"]), &["web_1".into(), "_".into()]).unwrap();
        assert_eq!(h, [Some("web-1".into()), Some("clone".into())]);
        let a = args(&["T", "x", "--hostname", "{name}.lan"]);
        assert_eq!(
            hostnames(&a, &["a".into()]).unwrap(),
            [Some("a.lan".into())]
        );
        let a = args(&["T", "x", "--hostname", "a;b"]);
        assert_eq!(hostnames(&a, &["a".into()]).unwrap_err().exit_code(), 2);
        let a = args(&["T", "x", "--no-identity"]);
        assert_eq!(hostnames(&a, &["a".into()]).unwrap(), [None]);
    }

    #[test]
    fn undo_keeps_the_files_of_a_domain_it_cannot_undefine() {
        let d = tempfile::tempdir().unwrap();
        let (fin, tmp) = (d.path().join("c.qcow2"), d.path().join(".c.tmp"));
        let made = || {
            fs::write(&fin, "x").unwrap();
            fs::write(&tmp, "x").unwrap();
            Made {
                tmps: vec![tmp.clone()],
                finals: vec![fin.clone()],
                domain: None,
            }
        };
        let problems = made().remove_files(Err("no way".into()));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("no way") && problems[0].contains(&*fin.to_string_lossy()),
            "{problems:?}"
        );
        assert!(fin.exists(), "the domain still uses it");
        assert!(!tmp.exists(), "no domain uses a temporary file");
        assert!(made().remove_files(Ok(())).is_empty());
        assert!(!fin.exists() && !tmp.exists());
    }
}

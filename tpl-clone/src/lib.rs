//! tpl-clone: make linked or full clones of a shut-off template, each with its own name, UUID, MACs, disks, NVRAM and first-boot identity, all or nothing.

mod access;
mod ahead;
mod images;
mod plan;
mod remote;
mod wait;
mod xml;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::dhcp;
use tpl_common::dom::Dom;
use tpl_common::error::{Error, Result};
use tpl_common::fsutil::{fsync_dir, rename_noreplace};
use tpl_common::hostname::{hostname_for, validate_hostname};
use tpl_common::journal::clone::{self as cj, Entry};
use tpl_common::journal::Journal;
use tpl_common::meta::{Meta, Registered};
use tpl_common::names::validate_name;
use tpl_common::ownfiles::Role;
use tpl_common::rbdclone::{self, NewImage};
use tpl_common::record::{CloneMode, CloneOrigin, DomainRef, Reserved};
use tpl_common::session::Session;
use tpl_common::state;
use tpl_common::text::{shown, shown_path};
use tpl_common::volume::Vol;
use virt::domain::Domain;

use crate::access::Access;
use crate::ahead::Ahead;
use crate::images::Method;
use crate::plan::{Make, NewFile, Plan};
use crate::wait::Waited;
use crate::xml::{CloneSpec, Macs, NewDisk};

const TOOL: &str = "tpl-clone";

/// Make clones of a shut-off libvirt template: linked (a qcow2 overlay on the template's
/// image) or full (an independent copy), one record per clone on stdout.
///
///     tpl-clone TplUbuntu web1 web2 web3
///     tpl-clone TplUbuntu --count 20 --prefix ci- --start     # ci-01 … ci-20
///     tpl-lock TplUbuntu | tpl-clone web1                     # template from stdin
///     tpl-clone TplUbuntu web1 web2 --user me --ssh-key ~/.ssh/id_ed25519.pub \
///         --ip 192.168.122.50 --disk-size 20G --ready           # ready to log in to
///
/// With a single NAME (or with --count and no name at all) the template comes as a record
/// on stdin; TEMPLATE `-` also reads it from stdin.
///
/// Linked is the default for a locked template (tpl-lock), full otherwise; a linked clone
/// always needs a locked template, since a writable backing file silently corrupts its
/// clones. Each clone gets a new name, UUID and MAC addresses, its own disk files (named
/// as the template's are, with the clone's name in place of the template's: TPL.qcow2 ->
/// NAME.qcow2; NAME.EXT or NAME-TARGET.EXT for files named otherwise) in the template
/// image's directory or --dir, its own NVRAM copy, and its first-boot identity in the
/// SMBIOS serial in cloud-init's NoCloud form `ds=nocloud;h=HOSTNAME;i=INSTANCE-ID` (the
/// instance id is the clone's UUID). CD-ROMs, read-only and shareable disks stay shared.
/// Each linked clone's overlay is registered in the template's metadata, so that
/// `tpl-lock --unlock` finds it wherever it is, even once no domain uses it.
///
/// The template is locked against other tpl tools from the first check to the last
/// definition (see --wait). Files are written under temporary names and renamed into
/// place when complete; the domain is defined last. On an error, SIGINT, SIGTERM or
/// SIGHUP the unfinished clone's files and domain are removed (and the tool then dies by
/// the signal), and what a killed run left is removed by the next run of any tpl tool
/// (from the journal each run keeps in $TPL_STATE_DIR, default /var/lib/tpl for root,
/// under clone-journal/). Exit status: 0, 1 failed, 2 bad usage, 3 refused.
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

    /// Put the clones' RBD images in POOL instead of the template's pool
    #[arg(long, value_name = "POOL")]
    pool: Option<String>,

    /// Define the clones on the hypervisor at URI instead of the template's (-c): always
    /// for RBD disks (the libvirt secret they use is made there if missing, never
    /// overwritten); for files only where that hypervisor sees them as this machine does
    /// (shared storage)
    #[arg(long, value_name = "URI")]
    to: Option<String>,

    /// Start each clone once it is defined
    #[arg(long)]
    start: bool,

    /// The guest host name of each clone; `{name}` stands for the clone's name
    /// [default: the clone's name when it is a valid host name, else one made from it]
    #[arg(long, value_name = "PATTERN")]
    hostname: Option<String>,

    /// Do not put the first-boot identity (host name, instance id) in the SMBIOS serial
    #[arg(long, conflicts_with = "hostname")]
    no_identity: bool,

    /// Create this log-in user in each clone at its first boot (sudo without a password,
    /// password locked), who logs in with the --ssh-key keys [default: the keys go to the
    /// image's default user]
    #[arg(long, value_name = "NAME", help_heading = "Ready to work")]
    user: Option<String>,

    /// An OpenSSH public key file whose keys may log in to each clone, as `ssh-copy-id -i`
    /// takes (repeatable). A private key is refused: it is never copied into a seed
    #[arg(long = "ssh-key", value_name = "FILE", help_heading = "Ready to work")]
    ssh_keys: Vec<PathBuf>,

    /// Your own cloud-config (a `#cloud-config` YAML document) for each clone's first
    /// boot; tpl adds the user, the keys and the host name to it, and keeps all of yours
    #[arg(long, value_name = "FILE", help_heading = "Ready to work")]
    user_data: Option<PathBuf>,

    /// A fixed IPv4 address: ADDR for the first clone, counting up over the batch, or
    /// NAME=ADDR for one clone (repeatable). On a libvirt network with DHCP it is reserved
    /// for the clone's MAC there (any guest OS gets it), and must be free; on a bridge it
    /// is written into the clone's seed as ADDR/PREFIX, with --gateway and --dns
    /// [default: DHCP]
    #[arg(long, value_name = "ADDR|NAME=ADDR", help_heading = "Ready to work")]
    ip: Vec<String>,

    /// The gateway of --ip on a bridge
    #[arg(
        long,
        value_name = "ADDR",
        requires = "ip",
        help_heading = "Ready to work"
    )]
    gateway: Option<std::net::Ipv4Addr>,

    /// A name server of --ip on a bridge (repeatable)
    #[arg(
        long,
        value_name = "ADDR",
        requires = "ip",
        help_heading = "Ready to work"
    )]
    dns: Vec<std::net::Ipv4Addr>,

    /// Connect each clone's first interface to the libvirt network NAME
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "bridge",
        help_heading = "Ready to work"
    )]
    network: Option<String>,

    /// Connect each clone's first interface to the host bridge NAME
    #[arg(long, value_name = "NAME", help_heading = "Ready to work")]
    bridge: Option<String>,

    /// vCPUs of each clone [default: the template's]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096),
          help_heading = "Ready to work")]
    vcpus: Option<u32>,

    /// Memory of each clone: MiB, or a size with K, M, G (2G) [default: the template's]
    #[arg(long, value_name = "SIZE", help_heading = "Ready to work")]
    memory: Option<String>,

    /// The virtual size of each clone's first disk (its first file disk, or on an RBD
    /// template its first image): GiB, or a size with M, G, T (20G); never smaller than
    /// the template's. The guest grows its root file system into it at the first boot
    /// (cloud-init's growpart, or tpl's first-boot action)
    #[arg(long, value_name = "SIZE", help_heading = "Ready to work")]
    disk_size: Option<String>,

    /// Start the clones, then wait for all of them at once until each is ready:
    /// `address` (it has an IPv4 address: libvirt's DHCP lease, the guest agent, or ARP)
    /// or `ssh` (its SSH server answers with the clone's own host key). Each clone's
    /// record then carries its addresses and, for `ssh`, its host key fingerprints, for
    /// known_hosts. Progress on stderr when it is a terminal
    #[arg(long, value_name = "WHAT", num_args = 0..=1, default_missing_value = "ssh",
          help_heading = "Ready to work")]
    ready: Option<wait::Ready>,

    /// How long --ready waits for all the clones, in seconds
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 600,
        requires = "ready",
        help_heading = "Ready to work"
    )]
    ready_timeout: u64,

    /// Clone a domain that is not a generalized template (never lifts the lock
    /// requirement of linked clones)
    #[arg(long)]
    force: bool,

    /// Say what would be made (names, files, how), and make nothing
    #[arg(short = 'n', long)]
    dry_run: bool,

    #[command(flatten)]
    common: Common,
}

pub fn main() -> ExitCode {
    cli::run::<Args>(TOOL, |a| &a.common, run)
}

/// One clone to make: its name, its UUID (chosen up front so its overlays can be
/// registered before they exist) and its host name.
#[derive(Debug)]
struct NewClone {
    name: String,
    uuid: String,
    hostname: Option<String>,
}

fn run(args: &Args, ctx: &mut Ctx) -> Result<()> {
    let (template, names) = split_args(args)?;
    let hostnames = hostnames(args, &names)?;
    let r = match template {
        Some(t) => DomainRef::by_arg(&t),
        None => template_from_stdin(ctx)?,
    };
    let s = ctx.session()?;
    r.check_uri(&s.uri)?;
    let mut tpl = Dom::lookup(&s, &r)?;
    // From the first look at the template to the last definition: no unlock, rename or
    // generalize can come between.
    let _held = ctx.lock(&mut tpl)?;
    let dest = match &args.to {
        Some(uri) if *uri != s.uri => ctx.open_other(uri)?,
        _ => s.clone(),
    };
    let plan = Plan::new(ctx, args, &tpl, &names, &dest);
    // Whatever killed runs left in the clones' directories goes first: a final file of a
    // clone they never defined would otherwise make this run refuse the name.
    if let Ok(plan) = &plan {
        let jdir = state::clone_journal_dir();
        for d in plan.dirs() {
            for what in cj::sweep_tmp(&d, &jdir) {
                ctx.info(format!("removed {what}, left by a killed run"));
            }
        }
    }
    let mut plan = plan?;
    let seed_dir = args
        .dir
        .clone()
        .or_else(|| plan.disks.first().map(|d| d.dir.clone()))
        .or_else(|| {
            plan.nvram
                .as_ref()
                .and_then(|n| n.parent())
                .map(PathBuf::from)
        });
    let access = Access::new(args, &names, &plan.xml, &dest, seed_dir.as_deref(), |w| {
        ctx.warn(w)
    })?;
    if let Some(size) = access.disk_size {
        plan.set_disk_size(size)?;
    }
    for n in &names {
        if let Some((p, _)) = access.seed_path(n) {
            if p.symlink_metadata().is_ok() {
                return Err(Error::refused(
                    format!("cannot create clone '{}'", shown(n)),
                    format!(
                        "its seed file '{}' already exists; nothing is ever overwritten",
                        shown_path(&p)
                    ),
                ));
            }
        }
    }
    let clones: Vec<NewClone> = names
        .into_iter()
        .zip(hostnames)
        .map(|(name, hostname)| NewClone {
            name,
            uuid: uuid::Uuid::new_v4().to_string(),
            hostname,
        })
        .collect();
    if args.dry_run {
        plan.describe(
            ctx,
            &tpl,
            &clones.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
        );
        for c in &clones {
            if let Some(seed) = access.describe_seed(&c.name) {
                ctx.info(format!("would give clone '{}' its {seed}", shown(&c.name)));
            }
            if let Some(r) = access.reservation(&c.name, "its MAC") {
                ctx.info(format!(
                    "would reserve {} for clone '{}' in the network '{}'",
                    r.ip,
                    shown(&c.name),
                    shown(&r.network)
                ));
            }
        }
        return Ok(());
    }
    if plan.mode == CloneMode::Linked {
        register_overlays(&tpl, &plan, &clones)?;
    }
    if !Rc::ptr_eq(&s, &dest) {
        for r in &plan.rbd {
            remote::ensure_secret(&s, &dest, &r.source)?;
        }
    }
    let seed_gid = dest
        .qemu_ids(
            plan.xml
                .root
                .attributes
                .get("type")
                .map_or("kvm", String::as_str),
        )
        .map(|(_, gid)| gid);
    let mut job = Job {
        ctx,
        s: &dest,
        tpl: &tpl,
        plan: &plan,
        access: &access,
        seed_gid,
        ready: args.ready.is_some(),
        up: Vec::new(),
        macs: Macs::default(),
        jrnl: Journal::create(&state::clone_journal_dir(), cj::KIND)?,
        ahead: BTreeMap::new(),
        logged: BTreeSet::new(),
        leftovers: false,
    };
    for d in dest.all_domains()? {
        if let Ok(x) = Dom::new(&dest, d).and_then(|d| d.xml()) {
            job.macs.add_from(&x);
        }
    }
    let mut res = job.make_all(&clones);
    if let Some(what) = args.ready {
        res = match res {
            Ok(()) => job.wait_ready(what, std::time::Duration::from_secs(args.ready_timeout)),
            // Stopped: the clones made stay, and their records say so, unwaited for.
            Err(e) => {
                job.emit_unwaited();
                Err(e)
            }
        };
    }
    let Job {
        ctx,
        jrnl,
        leftovers,
        ..
    } = job;
    if leftovers {
        jrnl.keep();
    } else {
        jrnl.close();
    }
    plan.refresh_pools(&dest);
    if ctx.intr.signal().is_some() {
        ctx.info("stopped; the clones finished before the signal stay");
    }
    res
}

/// The template's record, when it comes on stdin: exactly one.
fn template_from_stdin(ctx: &Ctx) -> Result<DomainRef> {
    let mut recs: Vec<DomainRef> = ctx.inputs(None)?.collect::<Result<_>>()?;
    match recs.len() {
        1 => Ok(recs.remove(0)),
        0 => Err(Error::usage(
            "no template given",
            "name it before the clone names, or pipe its record in",
        )),
        n => Err(Error::usage(
            format!("{n} records on stdin"),
            "tpl-clone clones one template per run; pipe in one record",
        )),
    }
}

/// Register the overlays of this batch in the template's metadata before any exists, and
/// drop registrations whose files are gone: `--unlock` then finds every overlay tpl-clone
/// made, wherever it is, whether or not a domain still uses it. A registration whose
/// overlay never got made (the run failed) is as good as gone, and is dropped next time.
fn register_overlays(tpl: &Dom, plan: &Plan, clones: &[NewClone]) -> Result<()> {
    let mut meta = tpl.meta()?;
    meta.overlays.retain(|o| o.path.exists());
    let at = tpl_common::now_rfc3339();
    for c in clones {
        for f in plan.files(&tpl.name, &c.name) {
            if matches!(f.make, Make::Overlay { .. }) {
                meta.overlays.push(Registered {
                    path: f.dest,
                    clone_uuid: c.uuid.clone(),
                    clone_name: c.name.clone(),
                    at: at.clone(),
                });
            }
        }
    }
    tpl.set_meta(&meta)
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
                format!("clone name '{}' is given twice", shown(n)),
                "each clone needs its own name",
            ));
        }
    }
    Ok((template, names))
}

/// The guest host name for each clone (None with --no-identity): the --hostname pattern,
/// else one made from the name ([`hostname_for`]). Two clones of one run never get the
/// same host name (compared as DNS does, without case).
fn hostnames(args: &Args, names: &[String]) -> Result<Vec<Option<String>>> {
    if args.no_identity {
        return Ok(vec![None; names.len()]);
    }
    let mut seen: std::collections::HashMap<String, &str> = Default::default();
    names
        .iter()
        .map(|n| {
            let h = match &args.hostname {
                Some(p) => p.replace("{name}", n),
                None => hostname_for(n),
            };
            validate_hostname(&h)?;
            if let Some(other) = seen.insert(h.to_ascii_lowercase(), n) {
                return Err(Error::usage(
                    format!(
                        "clones '{}' and '{}' would get the same host name '{h}'",
                        shown(other),
                        shown(n)
                    ),
                    "give a --hostname pattern with {name} in it, or other names",
                ));
            }
            Ok(Some(h))
        })
        .collect()
}

/// A batch of clones in the making: the run's connection, template, plan, the MAC
/// addresses taken so far and the journal.
struct Job<'a> {
    ctx: &'a mut Ctx,
    s: &'a Session,
    tpl: &'a Dom<'a>,
    plan: &'a Plan,
    access: &'a Access,
    /// The group of libvirt's qemu user, who reads the seeds.
    seed_gid: Option<u32>,
    /// --ready: the clones' records wait until they are up.
    ready: bool,
    /// With --ready: the clones made, whose records wait for them to be up.
    up: Vec<Waited>,
    macs: Macs,
    jrnl: Journal,
    /// RBD images made ahead for the clones of the current group, by temporary name.
    ahead: BTreeMap<Vol, Ahead>,
    /// The clones whose `clone` entry the journal has already.
    logged: BTreeSet<String>,
    /// Something the run made could not be removed again: the journal stays for the next
    /// run to finish the job.
    leftovers: bool,
}

impl<'a> Job<'a> {
    /// Make every clone, emitting each one's record; a failing clone is reported and the
    /// next one made. A stopping signal or a closed stdout ends the batch.
    fn make_all(&mut self, clones: &[NewClone]) -> Result<()> {
        let ahead =
            self.plan.mode == CloneMode::Linked && !self.plan.rbd.is_empty() && clones.len() > 1;
        let res = if ahead {
            self.make_groups(clones)
        } else {
            clones.iter().try_for_each(|c| self.make_one(c))
        };
        self.drop_ahead();
        res
    }

    /// `--ready`: wait for the clones made (started with them), then emit each one's
    /// record with what was seen; a clone that is not ready is reported (exit 1), and its
    /// record still emitted, without what it did not show.
    fn wait_ready(&mut self, what: wait::Ready, timeout: std::time::Duration) -> Result<()> {
        let mut up = std::mem::take(&mut self.up);
        if up.is_empty() {
            return Ok(());
        }
        self.ctx.info(format!(
            "waiting for {} clone{} to be ready ({}, up to {} s)",
            up.len(),
            if up.len() == 1 { "" } else { "s" },
            match what {
                wait::Ready::Address => "an address",
                wait::Ready::Ssh => "an SSH server",
            },
            timeout.as_secs()
        ));
        wait::wait_all(self.ctx, &mut up, what, timeout)?;
        for c in up {
            if let Some(e) = &c.error {
                self.ctx.fail(e);
            }
            let mut rec = Dom::new(self.s, c.dom)?.describe()?;
            rec.ready = c.seen;
            self.ctx.emit(&rec)?;
        }
        Ok(())
    }

    /// The records of the clones made for `--ready`, when the batch stopped before the wait.
    fn emit_unwaited(&mut self) {
        for c in std::mem::take(&mut self.up) {
            let rec = Dom::new(self.s, c.dom).and_then(|d| d.describe());
            if let Ok(rec) = rec {
                if self.ctx.emit(&rec).is_err() {
                    return;
                }
            }
        }
    }

    /// Make one clone and emit its record. Only a stopping signal or a closed stdout is
    /// an error here: a failing clone is reported, and the batch goes on.
    fn make_one(&mut self, c: &NewClone) -> Result<()> {
        self.ctx.intr.check()?;
        let res = self.make(c).and_then(|dom| {
            if self.plan.start && self.ready {
                self.up.push(Waited {
                    name: c.name.clone(),
                    dom,
                    seen: None,
                    error: None,
                });
                return Ok(());
            }
            let rec = Dom::new(self.s, dom)?.describe()?;
            self.ctx.emit(&rec)
        });
        match res {
            Ok(()) => Ok(()),
            // Reported once, by cli::run, which then ends the tool as it must.
            Err(e @ (Error::StdoutClosed | Error::Interrupted { .. })) => Err(e),
            Err(e) => {
                self.ctx.fail(&e);
                Ok(())
            }
        }
    }

    /// Make one clone. On any error the files and domain made for it are removed.
    fn make(&mut self, c: &NewClone) -> Result<Domain> {
        if !self.logged.contains(&c.uuid) {
            self.jrnl.log(&Entry::Clone {
                name: c.name.clone(),
                uuid: c.uuid.clone(),
                uri: self.s.uri.clone(),
            })?;
        }
        let mut made = Made::default();
        let res = self.build(c, &mut made);
        if res.is_err() {
            // A defined clone is the run's to remove again: say so before it goes, or a
            // kill in the middle would leave its files to nobody.
            if made.domain.is_some() {
                if let Err(e) = self.jrnl.log(&Entry::Undone {
                    uuid: c.uuid.clone(),
                }) {
                    self.ctx.warn(format!(
                        "while removing the unfinished clone '{}': {e}",
                        shown(&c.name)
                    ));
                }
            }
            for p in made.undo(self.s) {
                self.leftovers = true;
                self.ctx.warn(format!(
                    "while removing the unfinished clone '{}': {p}",
                    shown(&c.name)
                ));
            }
        }
        res
    }

    fn build(&mut self, c: &NewClone, made: &mut Made) -> Result<Domain> {
        let mut files = self.plan.files(&self.tpl.name, &c.name);
        // The first interface's MAC, chosen now: the seed and the reservation name it.
        let mac = self.access.needs_mac().then(|| self.macs.fresh());
        if let (Some((dest, target)), Some(mac)) = (self.access.seed_path(&c.name), &mac) {
            let host = c.hostname.clone().unwrap_or_else(|| hostname_for(&c.name));
            if let Some(bytes) = self.access.seed(&c.name, &host, &c.uuid, mac)? {
                files.push(NewFile {
                    role: Role::Seed {
                        target: target.to_string(),
                    },
                    dest,
                    make: Make::Seed(bytes),
                });
            }
        }
        let images = self.plan.images(&self.tpl.name, &c.name);
        // Its images made ahead are its own from here: removed with it if it fails.
        let mut ahead = BTreeMap::new();
        for img in &images {
            let tmp = img.tmp();
            if let Some(a) = self.ahead.remove(&tmp) {
                made.images.push(match &a {
                    Ahead::Final(dest) => dest.clone(),
                    Ahead::Made(_) | Ahead::Failed(_) => tmp.clone(),
                });
                ahead.insert(tmp, a);
            }
        }
        let ready = self.write_files(c, &files, made)?;
        let tmp_images = self.write_images(c, &images, made, ahead)?;
        self.commit_files(c, &ready, made)?;
        self.commit_images(c, &images, &tmp_images, made)?;
        self.ctx.intr.check()?;
        let reserved = match &mac {
            Some(mac) => self.access.reservation(&c.name, mac),
            None => None,
        };
        if let Some(r) = &reserved {
            self.jrnl.log(&Entry::Reserved {
                uuid: c.uuid.clone(),
                network: r.network.clone(),
                mac: r.mac.clone(),
                ip: r.ip,
            })?;
            made.reserved = Some(r.clone());
            dhcp::reserve(
                &self.s.conn,
                &self.s.uri,
                &r.network,
                &r.mac,
                c.hostname.as_deref(),
                r.ip,
            )?;
            self.ctx.info(format!(
                "{}: {} reserved in the network '{}'",
                shown(&c.name),
                r.ip,
                shown(&r.network)
            ));
        }
        let dom = self.define(c, &files, &images, mac.as_deref(), reserved, made)?;
        if self.plan.start {
            self.ctx.intr.check()?;
            dom.create().map_err(|e| {
                Error::libvirt(format!("cannot start clone '{}'", shown(&c.name)), e)
            })?;
            self.ctx.info(format!("started '{}'", shown(&c.name)));
        }
        Ok(dom)
    }

    /// Write each file under its temporary name; returns (temporary, file) pairs.
    fn write_files<'f, 'p>(
        &mut self,
        c: &NewClone,
        files: &'f [NewFile<'p>],
        made: &mut Made,
    ) -> Result<Vec<(PathBuf, &'f NewFile<'p>)>> {
        let intr = &self.ctx.intr;
        let mut ready = Vec::new();
        for f in files {
            intr.check()?;
            let tmp = cj::tmp_name(&f.dest);
            // A file under our own pid can only be a dead run's (pids are reused).
            let _ = fs::remove_file(&tmp);
            self.jrnl.log(&Entry::Tmp {
                uuid: c.uuid.clone(),
                vol: Vol::File(tmp.clone()),
                client: None,
            })?;
            made.tmps.push(tmp.clone());
            let label = format!("{TOOL}: {}: {}", c.name, f.role);
            let progress = (self.plan.progress && f.role != Role::Nvram).then_some(label.as_str());
            let how = match &f.make {
                Make::Overlay { disk } => {
                    images::create_overlay(
                        &disk.path,
                        &disk.format,
                        &tmp,
                        self.plan.size_of(&f.role),
                        &self.plan.overlays,
                        intr,
                    )?;
                    // Whatever wrote it (qemu-img, or the first overlay's bytes), it must
                    // stand on the template's image as checked, still read-only.
                    disk.check_still_the_template(&tmp)?;
                    format!(
                        "is an overlay on '{}' ({})",
                        shown_path(&disk.path),
                        disk.format
                    )
                }
                Make::Copy { src } => {
                    let m = images::copy_file(src, &tmp, progress, intr)?;
                    if let Some(size) = self.plan.size_of(&f.role) {
                        images::grow(&tmp, &self.plan.format_of(src), size, intr)?;
                    }
                    format!("{} from '{}'", m.describe(), shown_path(src))
                }
                Make::Seed(bytes) => {
                    write_seed(&tmp, bytes, self.seed_gid)?;
                    format!("is its NoCloud seed ({} bytes, vfat 'cidata')", bytes.len())
                }
                Make::Flatten { src, format } => {
                    let m: Method = images::flatten(
                        src,
                        format,
                        &tmp,
                        progress.is_some() && self.ctx.show_progress(),
                        intr,
                    )?;
                    if let Some(size) = self.plan.size_of(&f.role) {
                        images::grow(&tmp, format, size, intr)?;
                    }
                    format!("{} from '{}'", m.describe(), shown_path(src))
                }
            };
            self.ctx
                .info(format!("{}: {} {how}", shown(&c.name), f.role));
            ready.push((tmp, f));
        }
        Ok(ready)
    }

    /// Make each RBD image under its temporary name, or take the one made ahead; returns
    /// each temporary image to rename, with its id when it is known already (None: made
    /// ahead and renamed into place already).
    #[allow(clippy::type_complexity)]
    fn write_images(
        &mut self,
        c: &NewClone,
        images: &[NewImage],
        made: &mut Made,
        mut ahead: BTreeMap<Vol, Ahead>,
    ) -> Result<Vec<Option<(Vol, Option<String>)>>> {
        let mut out = Vec::new();
        for img in images {
            self.ctx.intr.check()?;
            let tmp = img.tmp();
            let todo = match ahead.remove(&tmp) {
                Some(Ahead::Failed(e)) => return Err(e),
                Some(Ahead::Made(id)) => Some((tmp, Some(id))),
                Some(Ahead::Final(_)) => None,
                None => {
                    // Noted before the attempt: a failure after librbd made the image
                    // still leaves it to be removed.
                    made.images.push(tmp);
                    let tmp = rbdclone::make(
                        self.ctx,
                        self.s,
                        &mut self.jrnl,
                        &c.uuid,
                        self.plan.mode,
                        img,
                    )?;
                    Some((tmp, None))
                }
            };
            self.ctx.info(format!(
                "{}: disk {} is {} '{}'",
                shown(&c.name),
                img.src.target,
                match self.plan.mode {
                    CloneMode::Linked => "an rbd clone of",
                    CloneMode::Full => "a copy of",
                },
                img.src.from()
            ));
            out.push(todo);
        }
        Ok(out)
    }

    /// The commit of the RBD images: renamed to their final names, never over another.
    fn commit_images(
        &mut self,
        c: &NewClone,
        images: &[NewImage],
        tmps: &[Option<(Vol, Option<String>)>],
        made: &mut Made,
    ) -> Result<()> {
        for (img, todo) in images.iter().zip(tmps) {
            let Some((tmp, id)) = todo else {
                continue; // renamed into place ahead
            };
            rbdclone::commit(self.s, &mut self.jrnl, &c.uuid, tmp, id.clone(), img)?;
            made.images.retain(|i| i != tmp);
            made.images.push(img.vol());
        }
        Ok(())
    }

    /// The commit of the files: each rename fails rather than replace, so a run that lost
    /// a race for this name stops here and removes only its own files.
    fn commit_files(
        &mut self,
        c: &NewClone,
        ready: &[(PathBuf, &NewFile)],
        made: &mut Made,
    ) -> Result<()> {
        self.ctx.intr.check()?;
        for (tmp, f) in ready {
            cj::log_file(&mut self.jrnl, &c.uuid, tmp, &f.dest)?;
            rename_noreplace(tmp, &f.dest).map_err(|e| match e {
                Error::Refused { .. } => Error::refused(
                    format!("cannot create clone '{}'", shown(&c.name)),
                    format!(
                        "its {} file '{}' appeared meanwhile, made by another run; nothing is \
                         ever overwritten",
                        f.role,
                        shown_path(&f.dest)
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
        Ok(())
    }

    /// Define the clone: the commit point (libvirt refuses a second domain of one name).
    fn define(
        &mut self,
        c: &NewClone,
        files: &[NewFile],
        images: &[NewImage],
        mac: Option<&str>,
        reserved: Option<Reserved>,
        made: &mut Made,
    ) -> Result<Domain> {
        let (tpl, plan) = (self.tpl, self.plan);
        let mut new_disks: Vec<NewDisk> = files
            .iter()
            .filter_map(|f| {
                let Role::Disk { target } = &f.role else {
                    return None;
                };
                let (format, backing) = match &f.make {
                    Make::Overlay { disk } => ("qcow2".to_string(), disk.chain.clone()),
                    Make::Copy { src } => (plan.format_of(src), Vec::new()),
                    Make::Flatten { format, .. } => (format.clone(), Vec::new()),
                    Make::Seed(_) => return None,
                };
                Some(NewDisk {
                    target: target.clone(),
                    path: f.dest.clone(),
                    format,
                    backing,
                    rbd: None,
                })
            })
            .collect();
        new_disks.extend(images.iter().map(|img| NewDisk {
            target: img.src.target.clone(),
            path: PathBuf::new(),
            format: "raw".into(),
            backing: Vec::new(),
            rbd: Some(img.name()),
        }));
        let nvram = plan.clone_nvram(files, &tpl.name, &c.name);
        let seed = files.iter().find_map(|f| match &f.role {
            Role::Seed { target } => Some((target.as_str(), f.dest.as_path())),
            _ => None,
        });
        let mut meta = Meta {
            clone: Some(CloneOrigin {
                template_uuid: tpl.uuid.clone(),
                template_name: tpl.name.clone(),
                mode: plan.mode,
                at: tpl_common::now_rfc3339(),
                seed: seed.map(|(_, p)| p.to_path_buf()),
                reserved,
            }),
            ..Default::default()
        };
        meta.record_step(
            TOOL,
            format!(
                "{} clone of '{}' ({})",
                plan.mode.as_str(),
                tpl.name,
                tpl.uuid
            ),
        );
        let spec = CloneSpec {
            name: &c.name,
            uuid: &c.uuid,
            template_name: &tpl.name,
            disks: &new_disks,
            nvram: nvram.as_deref(),
            serial: c
                .hostname
                .as_deref()
                .map(|h| xml::nocloud_serial(h, &c.uuid)),
            meta: &meta,
            first_mac: mac,
            link: self.access.link.as_ref(),
            vcpus: self.access.vcpus,
            memory_kib: self.access.memory_kib,
            seed,
            drop_targets: &plan.drop_targets,
        };
        let x = xml::clone_xml(&plan.xml, &spec, &mut self.macs)?;
        let s = self.s;
        let dom = s.conn.define_domain_xml(&x.to_xml()).map_err(|e| {
            if s.name_taken(&c.name).unwrap_or(false) {
                Error::refused(
                    format!("cannot create clone '{}'", shown(&c.name)),
                    format!(
                        "a domain named '{}' appeared meanwhile, made by another run",
                        shown(&c.name)
                    ),
                )
            } else {
                Error::libvirt(format!("cannot define clone '{}'", shown(&c.name)), e)
            }
        })?;
        made.domain = Some(dom.clone());
        self.jrnl.log(&Entry::Done {
            uuid: c.uuid.clone(),
        })?;
        self.ctx.info(format!(
            "defined {} clone '{}' of '{}'",
            plan.mode.as_str(),
            shown(&c.name),
            shown(&tpl.name)
        ));
        Ok(dom)
    }
}

/// Write a seed image at `tmp`, readable by root and libvirt's qemu user (group `gid`)
/// only: it may hold the user's cloud-config.
fn write_seed(tmp: &std::path::Path, bytes: &[u8], gid: Option<u32>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| Error::io("cannot create", tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("cannot write", tmp, e))?;
    if let Some(g) = gid {
        std::os::unix::fs::fchown(&f, Some(0), Some(g))
            .map_err(|e| Error::io("cannot change the owner of", tmp, e))?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o640))
            .map_err(|e| Error::io("cannot change the mode of", tmp, e))?;
    }
    Ok(())
}

/// What a clone in the making has created so far.
#[derive(Debug, Default)]
struct Made {
    tmps: Vec<PathBuf>,
    finals: Vec<PathBuf>,
    /// Its RBD images, under their temporary or final names.
    images: Vec<Vol>,
    /// Its fixed address, reserved in a libvirt network's DHCP.
    reserved: Option<Reserved>,
    domain: Option<Domain>,
}

impl Made {
    /// Remove it all, the domain first so it never points at a missing file. Returns
    /// what could not be removed.
    fn undo(&mut self, s: &Session) -> Vec<String> {
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
        let mut problems = Vec::new();
        if undefined.is_ok() {
            for img in self.images.drain(..) {
                if let Err(e) = img.remove(s) {
                    problems.push(format!(
                        "cannot remove the {} '{}': {e}",
                        img.kind(),
                        img.shown()
                    ));
                }
            }
            if let Some(r) = self.reserved.take() {
                if let Err(e) = dhcp::release(&s.conn, &s.uri, &r.network, &r.mac, r.ip) {
                    problems.push(e.to_string());
                }
            }
        }
        problems.extend(self.remove_files(undefined));
        problems
    }

    /// Remove the files, but the final ones only when no domain is left to use them: a
    /// domain on deleted files is worse than files left over.
    fn remove_files(&mut self, undefined: std::result::Result<(), String>) -> Vec<String> {
        let mut problems = Vec::new();
        let finals = std::mem::take(&mut self.finals);
        let remove = match undefined {
            Ok(()) => finals,
            Err(e) => {
                problems.push(if finals.is_empty() {
                    format!("cannot undefine the domain: {e}")
                } else {
                    format!(
                        "cannot undefine the domain ({e}), so its files {} are kept; remove \
                         the domain and them by hand",
                        tpl_common::text::list(
                            finals.iter().map(|p| format!("'{}'", shown_path(p))),
                            ", "
                        )
                    )
                });
                Vec::new()
            }
        };
        for p in remove.into_iter().chain(self.tmps.drain(..)) {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("cannot remove '{}': {e}", shown_path(&p))),
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
            &["T", "rt-\u{200b}tpl"],
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
    fn host_names_are_valid_and_distinct() {
        let long = "x".repeat(64);
        let h = hostnames(
            &args(&["T", "x"]),
            &["web_1".into(), "web-1".into(), "_".into(), long.clone()],
        )
        .unwrap();
        let h: Vec<String> = h.into_iter().map(Option::unwrap).collect();
        assert!(h[0].starts_with("web-1-") && h[1] == "web-1", "{h:?}");
        assert!(h[2].starts_with("clone-"));
        assert!(h[3].len() <= 63, "{h:?}");
        let a = args(&["T", "x", "--hostname", "{name}.lan"]);
        assert_eq!(
            hostnames(&a, &["a".into()]).unwrap(),
            [Some("a.lan".into())]
        );
        let a = args(&["T", "x", "--hostname", "a;b"]);
        assert_eq!(hostnames(&a, &["a".into()]).unwrap_err().exit_code(), 2);
        // One pattern without {name} for two clones: the same host twice is refused.
        let a = args(&["T", "x", "--hostname", "same"]);
        let e = hostnames(&a, &["a".into(), "b".into()]).unwrap_err();
        assert!(e.to_string().contains("same host name"), "{e}");
        // Names that differ only in case would be one host name to DNS.
        let e = hostnames(&args(&["T", "x"]), &["Web1".into(), "web1".into()]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
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
                images: Vec::new(),
                reserved: None,
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

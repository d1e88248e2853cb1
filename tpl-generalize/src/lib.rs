//! tpl-generalize: seal a shut-off domain with one virt-sysprep run, plus the fixes a template needs that virt-sysprep alone does not make.

pub mod ops;
pub mod sysprep;

use std::process::ExitCode;

use clap::Parser;
use tpl_common::cli::{self, Common, Ctx};
use tpl_common::dom::Dom;
use tpl_common::domxml::DomainXml;
use tpl_common::error::{Error, IoContext, Result};
use tpl_common::hostname::{kernel_hostname, validate_hostname};
use tpl_common::record::{DomainRef, Generalized, Method, Record};
use tpl_common::session::Session;
use tpl_common::text::{list, shown};

use crate::ops::{Plan, Request};

const TOOL: &str = "tpl-generalize";

/// Generalize (seal) a shut-off libvirt domain so it can serve as a template.
///
/// Runs virt-sysprep once against the domain's disks (through the same libvirt URI),
/// with virt-sysprep's default operations or the ones chosen here, and leaves the guest
/// the way clones need it:
///
///   - /etc/machine-id empty (each clone makes its own at first boot);
///   - no SSH host keys, and a first-boot action that sets the hostname from the SMBIOS
///     serial when it reads `ds=nocloud;h=NAME;...` (tpl-clone writes it; cloud-init
///     reads it itself), then makes fresh keys;
///   - cloud-init's instance state removed, so cloud-init runs again in every clone;
///   - logs, shell histories, DHCP leases, /tmp and the rest cleaned by virt-sysprep.
///
/// Then records in the domain's metadata when, how and with what it was generalized,
/// and prints the domain's record on stdout. Other tpl tools wait while it runs (it holds
/// the domain's lock). A domain that linked clones depend on is refused: generalizing
/// rewrites the image they read. Without DOMAIN, the domains come as records on stdin:
///
///     tpl-generalize VM --hostname TplVM | tpl-lock | tpl-rename TplVM
///
/// Windows guests cannot be generalized from outside: run
/// `sysprep /generalize /oobe /shutdown` inside the guest, then record it with
/// `--sealed-externally`.
///
/// libguestfs reads its settings from the environment (e.g. LIBGUESTFS_BACKEND=direct);
/// they pass through to virt-sysprep unchanged.
#[derive(Parser, Debug)]
#[command(name = TOOL, version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// The domain (name or UUID); without it, records are read from stdin
    #[arg(value_name = "DOMAIN")]
    domain: Option<String>,

    /// Set the template's hostname (virt-sysprep --hostname; a name longer than the
    /// kernel's 64 characters gives it its first label); clones get their own from the
    /// SMBIOS serial at first boot
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,

    /// The virt-sysprep operations, in its own syntax: `defaults,-tmp-files,firewall-rules`
    /// (see virt-sysprep --list-operations)
    #[arg(long, value_name = "LIST", conflicts_with_all = ["enable", "disable"])]
    operations: Option<String>,

    /// Run only these virt-sysprep operations (as virt-sysprep --enable); 'customize'
    /// must be among them
    #[arg(long, value_name = "LIST")]
    enable: Option<String>,

    /// Leave out these operations from the defaults (or from --enable)
    #[arg(long, value_name = "LIST")]
    disable: Option<String>,

    /// Record the domain as generalized without touching its disk, for a guest sealed from
    /// inside (Windows: sysprep /generalize /oobe /shutdown)
    #[arg(
        long,
        conflicts_with_all = ["hostname", "operations", "enable", "disable", "sysprep_options"]
    )]
    sealed_externally: bool,

    /// Say what would run and be recorded, and change nothing
    #[arg(short = 'n', long)]
    dry_run: bool,

    /// Generalize a domain although linked clones depend on its images (they break:
    /// their backing image changes under them), with a warning instead of a refusal
    #[arg(long)]
    force: bool,

    /// More virt-sysprep options, after `--`: customize actions such as --root-password,
    /// --ssh-inject, --install, --run-command, --firstboot. They run before the machine-id
    /// is emptied, so nothing they do leaves one behind. Paths are the caller's.
    #[arg(last = true, value_name = "VIRT-SYSPREP OPTIONS")]
    sysprep_options: Vec<String>,

    /// Also show virt-sysprep's libguestfs call trace
    #[arg(short, long)]
    verbose: bool,

    #[command(flatten)]
    common: Common,
}

/// What the whole run needs once: the checked operations and virt-sysprep's version.
#[derive(Debug)]
struct Setup {
    plan: Plan,
    version: String,
}

pub fn main() -> ExitCode {
    cli::run::<Args>(
        TOOL,
        |a| &a.common,
        |args, ctx| {
            if let Some(h) = &args.hostname {
                validate_hostname(h)?;
            }
            sysprep::check_extra(&args.sysprep_options)?;
            // Bad options fail before any domain is looked at or stdin is read.
            let setup = if args.sealed_externally {
                None
            } else {
                let req = Request {
                    operations: args.operations.clone(),
                    enable: args.enable.clone(),
                    disable: args.disable.clone(),
                };
                let plan = ops::plan(&req, &sysprep::catalog()?)?;
                Some(Setup {
                    plan,
                    version: sysprep::version()?,
                })
            };
            ctx.for_each_input(args.domain.as_deref(), |ctx, s, r| {
                generalize_one(ctx, s, r, args, setup.as_ref())
            })
        },
    )
}

/// libosinfo's namespace in a domain's `<metadata>` (virt-install and virt-manager write it).
pub const LIBOSINFO_NS: &str = "http://libosinfo.org/xmlns/libvirt/domain/1.0";

/// The libosinfo OS id in the domain's metadata, e.g. `http://microsoft.com/win/10`.
pub fn libosinfo_os(x: &DomainXml) -> Option<String> {
    let md = x.root.get_child("metadata")?;
    md.children
        .iter()
        .filter_map(|n| n.as_element())
        .filter(|e| e.name == "libosinfo" && e.namespace.as_deref() == Some(LIBOSINFO_NS))
        .filter_map(|e| e.get_child("os"))
        .find_map(|os| os.attributes.get("id").cloned())
}

/// Whether a libosinfo OS id names a Windows release (`http://microsoft.com/win/…`).
pub fn is_windows_os_id(id: &str) -> bool {
    id.starts_with("http://microsoft.com/win")
}

fn windows_refusal(name: &str, evidence: &str) -> Error {
    let name = shown(name);
    Error::refused(
        format!("cannot generalize domain '{name}'"),
        format!(
            "{evidence}: virt-sysprep cannot generalize Windows; seal it from inside: start it, \
             run 'C:\\Windows\\System32\\Sysprep\\sysprep.exe /generalize /oobe /shutdown' as \
             Administrator, and once it has shut down record it with: \
             {TOOL} --sealed-externally {name}"
        ),
    )
}

fn generalize_one(
    ctx: &mut Ctx,
    s: &Session,
    r: &DomainRef,
    args: &Args,
    setup: Option<&Setup>,
) -> Result<Record> {
    let mut dom = Dom::lookup(s, r)?;
    // For the whole run: a clone, lock or rename meanwhile would see a half-written image.
    let _held = ctx.lock(&mut dom)?;
    check_fit(ctx, &dom, args)?;
    let Some(setup) = setup else {
        return record_external(ctx, &dom, args.dry_run);
    };
    if let Some(id) = libosinfo_os(&dom.xml()?).filter(|id| is_windows_os_id(id)) {
        return Err(windows_refusal(
            &dom.name,
            &format!("its libosinfo metadata says it is Windows ({id})"),
        ));
    }
    let out = run_sysprep(ctx, s, &dom, args, setup)?;
    let Some(out) = out else {
        return dom.describe(); // --dry-run
    };
    record_generalized(ctx, &dom, args, setup, &out)
}

/// The domain must be shut off, not a locked template, and without linked clones.
fn check_fit(ctx: &Ctx, dom: &Dom, args: &Args) -> Result<()> {
    let name = shown(&dom.name);
    dom.require_shut_off("generalize")?;
    let meta = dom.meta()?;
    if meta.template.locked {
        return Err(Error::refused(
            format!("cannot generalize domain '{name}'"),
            format!("it is a locked template; unlock first: tpl-lock --unlock {name}"),
        ));
    }
    // An unlock forced past linked clones leaves them on this image: rewriting it
    // changes what they read.
    let own = dom.own_files("generalize")?;
    let deps = dom.dependents_of(&own, &dom.others()?, &meta.overlays)?;
    if !deps.list.is_empty() {
        let names = list(deps.list.iter(), "; ");
        if !args.force {
            return Err(Error::refused(
                format!("cannot generalize domain '{name}'"),
                format!(
                    "{} on its images, and generalizing rewrites what \
                     they read: {names}; remove them first, or pass --force ({})",
                    deps.depend(),
                    deps.looked
                ),
            ));
        }
        ctx.warn(format!(
            "generalizing domain '{name}' although {} on its images \
             (--force); they will read a changed image: {names}",
            deps.depend()
        ));
    }
    if let Some(g) = &meta.template.generalized {
        ctx.info(format!(
            "domain '{name}' was already generalized ({}, {}); doing it again",
            g.method.as_str(),
            g.at
        ));
    }
    Ok(())
}

/// Run virt-sysprep on the domain (None with --dry-run, after saying what would run).
fn run_sysprep(
    ctx: &Ctx,
    s: &Session,
    dom: &Dom,
    args: &Args,
    setup: &Setup,
) -> Result<Option<sysprep::Outcome>> {
    let name = shown(&dom.name);
    let hostname = args.hostname.as_deref().map(kernel_hostname);
    // The first-boot script goes in from a private directory, removed when we are done.
    let tmp = if args.dry_run {
        None
    } else {
        Some(
            tempfile::Builder::new()
                .prefix("tpl-generalize.")
                .tempdir()
                .map_err(|e| {
                    Error::io(
                        "cannot create a temporary directory in",
                        std::env::temp_dir(),
                        e,
                    )
                })?,
        )
    };
    let script = match &tmp {
        Some(t) => t.path().join(sysprep::FIRSTBOOT_NAME),
        None => {
            std::env::temp_dir().join(format!("tpl-generalize.XXXXXX/{}", sysprep::FIRSTBOOT_NAME))
        }
    };
    // By UUID: the name may change meanwhile, the UUID does not.
    let sysprep_args = sysprep::command_line(
        &s.uri,
        &dom.uuid,
        &setup.plan,
        hostname,
        &script.to_string_lossy(),
        &args.sysprep_options,
        ctx.common.quiet,
    );
    let shown_cmd = sysprep::shell_words(sysprep::PROGRAM, &sysprep_args);
    if args.dry_run {
        ctx.info(format!(
            "would generalize domain '{name}' ({}): {shown_cmd}",
            dom.uuid
        ));
        ctx.info(format!(
            "  ('{}' is tpl's first-boot script; operations: {})",
            sysprep::FIRSTBOOT_NAME,
            setup
                .plan
                .resolved
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(",")
        ));
        ctx.info(format!(
            "would record it as generalized by {} with operations {}",
            setup.version,
            setup.plan.expression.join(",")
        ));
        return Ok(None);
    }
    std::fs::write(&script, sysprep::FIRSTBOOT).ctx("cannot write", &script)?;
    ctx.info(format!(
        "generalizing domain '{name}' with {} (one appliance run; about a minute without KVM)",
        setup.version
    ));
    ctx.info(format!("running: {shown_cmd}"));
    let out = sysprep::run(&sysprep_args, args.verbose, &ctx.intr)?;
    drop(tmp);
    if let Some(p) = &out.product {
        ctx.info(format!("virt-sysprep found: {p}"));
    }
    if out.os_type.as_deref() == Some("windows") {
        return Err(windows_refusal(
            &dom.name,
            &format!(
                "virt-sysprep's inspection found Windows ({}; it stopped with {})",
                out.product.as_deref().unwrap_or("unknown version"),
                out.status_text()
            ),
        ));
    }
    if !out.success() {
        return Err(Error::failed(
            format!("virt-sysprep failed on domain '{name}'"),
            format!(
                "{}: {}; tpl's metadata on the domain is unchanged; see virt-sysprep's \
                 output above, fix the cause and run {TOOL} again",
                out.status_text(),
                out.errors()
            ),
        ));
    }
    ctx.info(format!(
        "virt-sysprep finished in {} s",
        out.elapsed.as_secs()
    ));
    Ok(Some(out))
}

/// Record in the domain's metadata what was done, when and with what.
fn record_generalized(
    ctx: &Ctx,
    dom: &Dom,
    args: &Args,
    setup: &Setup,
    _out: &sysprep::Outcome,
) -> Result<Record> {
    // Re-read: the run took a while and the metadata is the source of truth.
    let mut meta = dom.meta()?;
    // The lock kept the tools out, but not virsh: a template locked by hand while
    // virt-sysprep wrote is not fit to use, and recording it as generalized would hide that.
    if meta.template.locked {
        return Err(Error::failed(
            format!(
                "domain '{}' ({}) was locked while virt-sysprep ran",
                shown(&dom.name),
                dom.uuid
            ),
            "linked clones made meanwhile may hold a half-written image; not recording it \
             as generalized: remove such clones, tpl-lock --unlock it and generalize it again",
        ));
    }
    let hostname = args.hostname.as_deref();
    let g = Generalized {
        at: tpl_common::now_rfc3339(),
        method: Method::VirtSysprep,
        tool: Some(setup.version.clone()),
        operations: setup.plan.expression.clone(),
        hostname: hostname.map(String::from),
    };
    let mut detail = format!(
        "generalized with {} (operations {}",
        setup.version,
        g.operations.join(",")
    );
    if let Some(h) = hostname {
        detail.push_str(&format!(", hostname {h}"));
    }
    detail.push_str(
        "); empty machine-id, first-boot SSH host keys and hostname, cloud-init state reset",
    );
    meta.template.generalized = Some(g);
    meta.record_step(TOOL, detail);
    dom.set_meta(&meta)?;
    ctx.info(format!("generalized domain '{}'", shown(&dom.name)));
    dom.describe()
}

/// `--sealed-externally`: record what the user did inside the guest; the disk is not opened.
fn record_external(ctx: &Ctx, dom: &Dom, dry_run: bool) -> Result<Record> {
    if dry_run {
        ctx.info(format!(
            "would record domain '{}' as sealed externally, without touching its disk",
            shown(&dom.name)
        ));
        return dom.describe();
    }
    let mut meta = dom.meta()?;
    meta.template.generalized = Some(Generalized {
        at: tpl_common::now_rfc3339(),
        method: Method::External,
        tool: None,
        operations: Vec::new(),
        hostname: None,
    });
    meta.record_step(
        TOOL,
        "recorded as sealed externally (inside the guest); disk not touched",
    );
    dom.set_meta(&meta)?;
    ctx.info(format!(
        "recorded domain '{}' as generalized (sealed externally)",
        shown(&dom.name)
    ));
    dom.describe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_windows_in_libosinfo_metadata() {
        let xml = |md: &str| {
            DomainXml::parse(&format!(
                "<domain type='kvm'><name>w</name><metadata>{md}</metadata></domain>"
            ))
            .unwrap()
        };
        let win = xml(&format!(
            "<tpl:template xmlns:tpl='urn:x-tpl:template:1'/>\
             <libosinfo:libosinfo xmlns:libosinfo='{LIBOSINFO_NS}'>\
             <libosinfo:os id='http://microsoft.com/win/10'/></libosinfo:libosinfo>"
        ));
        let id = libosinfo_os(&win).unwrap();
        assert_eq!(id, "http://microsoft.com/win/10");
        assert!(is_windows_os_id(&id));
        let deb = xml(&format!(
            "<libosinfo:libosinfo xmlns:libosinfo='{LIBOSINFO_NS}'>\
             <libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo>"
        ));
        assert!(!is_windows_os_id(&libosinfo_os(&deb).unwrap()));
        // Same local names in another namespace are not libosinfo's.
        let other = xml("<x:libosinfo xmlns:x='urn:other'><x:os id='http://microsoft.com/win/10'/></x:libosinfo>");
        assert_eq!(libosinfo_os(&other), None);
        assert_eq!(
            libosinfo_os(&DomainXml::parse("<domain><name>n</name></domain>").unwrap()),
            None
        );
    }
}

//! Running virt-sysprep: its version and operations, the one command line that seals a guest with tpl's fixes, and its output streamed to stderr.

use std::collections::VecDeque;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tpl_common::child::{self, Stream};
use tpl_common::error::{Error, Result};
use tpl_common::signals::Interrupt;

use crate::ops::{Catalog, Plan};

pub const PROGRAM: &str = "virt-sysprep";

/// The first-boot script every clone runs once (hostname from the SMBIOS serial, then
/// fresh SSH host keys). virt-sysprep names it in the guest after its host path, ending in
/// `-tpl-firstboot`, under /usr/lib/virt-sysprep/scripts/.
pub const FIRSTBOOT: &str = include_str!("firstboot.sh");
pub const FIRSTBOOT_NAME: &str = "tpl-firstboot";

/// cloud-init's per-instance state, what `cloud-init clean --logs` removes, so that
/// cloud-init runs again in every clone. /var/lib/cloud/seed (a NoCloud seed the admin
/// put there) and /var/lib/cloud/scripts (admin's per-boot scripts) stay.
pub const CLOUD_INIT_STATE: &[&str] = &[
    "/var/lib/cloud/instance",
    "/var/lib/cloud/instances",
    "/var/lib/cloud/data",
    "/var/lib/cloud/sem",
    "/var/lib/cloud/handlers",
    "/var/log/cloud-init.log",
    "/var/log/cloud-init-output.log",
];

fn not_installed(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::failed(
            format!("cannot run {PROGRAM}"),
            "it is not installed; install libguestfs-tools (make deps)",
        )
    } else {
        Error::io("cannot run", PROGRAM, e)
    }
}

/// Run a quick virt-sysprep query (no appliance) and return its stdout.
fn query(arg: &str) -> Result<String> {
    let out = Command::new(PROGRAM)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .map_err(not_installed)?;
    if !out.status.success() {
        return Err(Error::failed(
            format!("'{PROGRAM} {arg}' failed"),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `virt-sysprep 1.48.2`, as the metadata records it.
pub fn version() -> Result<String> {
    Ok(query("--version")?.trim().to_string())
}

pub fn catalog() -> Result<Catalog> {
    let c = Catalog::parse(&query("--list-operations")?);
    if c.all.is_empty() {
        return Err(Error::failed(
            format!("cannot read the operations of {PROGRAM}"),
            "'virt-sysprep --list-operations' listed none",
        ));
    }
    Ok(c)
}

/// Options of virt-sysprep that tpl-generalize sets itself, or that would make it do
/// something other than seal the guest (and so must not be passed after `--`).
const RESERVED: &[(&str, &str)] = &[
    ("-a", "the disks are the domain's"),
    ("--add", "the disks are the domain's"),
    ("-d", "the domain is tpl-generalize's DOMAIN"),
    ("--domain", "the domain is tpl-generalize's DOMAIN"),
    ("-c", "use tpl-generalize -c"),
    ("--connect", "use tpl-generalize -c"),
    ("-n", "use tpl-generalize --dry-run"),
    ("--dry-run", "use tpl-generalize --dry-run"),
    ("--operations", "use tpl-generalize --operations"),
    ("--operation", "use tpl-generalize --operations"),
    ("--enable", "use tpl-generalize --enable"),
    (
        "--hostname",
        "use tpl-generalize --hostname, which the metadata records",
    ),
    ("-q", "use tpl-generalize -q"),
    ("--quiet", "use tpl-generalize -q"),
    ("-x", "use tpl-generalize -v"),
    ("--list-operations", "it would list and seal nothing"),
    ("--help", "it would seal nothing"),
    ("-V", "it would seal nothing"),
    ("--version", "it would seal nothing"),
    (
        "--machine-readable",
        "tpl-generalize reads virt-sysprep's normal output",
    ),
];

/// Check the extra virt-sysprep options given after `--`.
pub fn check_extra(extra: &[String]) -> Result<()> {
    for a in extra {
        let opt = a.split('=').next().unwrap_or(a);
        if let Some((o, why)) = RESERVED.iter().find(|(o, _)| *o == opt) {
            return Err(Error::usage(
                format!("virt-sysprep option '{o}' cannot be passed through"),
                (*why).to_string(),
            ));
        }
    }
    Ok(())
}

/// The arguments of the one virt-sysprep run that seals `domain`; `firstboot` is the path
/// of tpl's first-boot script on the host, `extra` the user's own virt-sysprep options.
///
/// The customize actions run in command-line order, after customize's own step that
/// writes a random /etc/machine-id into an empty one:
/// 1. `--touch /etc/machine-id`: customize only rewrites a machine-id that exists; and on
///    a Windows guest (no /etc) this fails before any customize action touches it.
/// 2. The user's own options (`--root-password`, `--install`, `--run-command` …).
/// 3. `--truncate /etc/machine-id`: after anything that might have written one, so the
///    template ends with an empty machine-id and each clone makes its own at first boot.
/// 4. `--hostname`, when asked for.
/// 5. `--firstboot`: the script that makes SSH host keys and sets the hostname from the
///    SMBIOS serial in every clone.
/// 6. `--delete` cloud-init's instance state.
///
/// `-x` traces libguestfs calls on stderr: that is where inspection's verdict on the guest
/// (`inspect_get_type = "windows"`) shows; `run` keeps those lines off the screen.
pub fn command_line(
    uri: &str,
    domain: &str,
    plan: &Plan,
    hostname: Option<&str>,
    firstboot: &str,
    extra: &[String],
    quiet: bool,
) -> Vec<String> {
    let mut a: Vec<String> = vec!["-c".into(), uri.into(), "-d".into(), domain.into()];
    if quiet {
        a.push("--quiet".into());
    }
    a.push("-x".into());
    a.push("--operations".into());
    a.push(plan.expression.join(","));
    a.push("--touch".into());
    a.push("/etc/machine-id".into());
    a.extend(extra.iter().cloned());
    a.push("--truncate".into());
    a.push("/etc/machine-id".into());
    if let Some(h) = hostname {
        a.push("--hostname".into());
        a.push(h.into());
    }
    a.push("--firstboot".into());
    a.push(firstboot.into());
    for p in CLOUD_INIT_STATE {
        a.push("--delete".into());
        a.push((*p).into());
    }
    a
}

/// A command line as a shell would need it typed, for messages and `--dry-run`.
pub fn shell_words(prog: &str, args: &[String]) -> String {
    std::iter::once(prog)
        .chain(args.iter().map(String::as_str))
        .map(|a| {
            shlex::try_quote(a)
                .map(|q| q.into_owned())
                // Only a NUL cannot be quoted, and no argument holds one.
                .unwrap_or_else(|_| a.replace('\0', "\\0"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a finished virt-sysprep run told us.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: Option<ExitStatus>,
    /// What inspection found: `linux`, `windows`, … (from the `-x` trace).
    pub os_type: Option<String>,
    pub product: Option<String>,
    /// The last lines it wrote on stderr that are not trace lines.
    pub tail: Vec<String>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The error lines for a message: those that say "error", else the last lines.
    pub fn errors(&self) -> String {
        let errs: Vec<&str> = self
            .tail
            .iter()
            .map(String::as_str)
            .filter(|l| l.to_ascii_lowercase().contains("error"))
            .collect();
        let lines = if errs.is_empty() {
            let n = self.tail.len();
            self.tail[n.saturating_sub(3)..]
                .iter()
                .map(String::as_str)
                .collect()
        } else {
            errs
        };
        if lines.is_empty() {
            "it printed no error".into()
        } else {
            lines.join(" / ")
        }
    }

    pub fn status_text(&self) -> String {
        match self.status {
            Some(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => s.to_string(),
            },
            None => "did not finish".into(),
        }
    }
}

const TRACE: &str = "libguestfs: trace: ";
const TAIL_LINES: usize = 12;

/// What a trace line says about the inspected guest, if anything.
pub fn inspected(line: &str) -> Option<(&'static str, String)> {
    let call = line.strip_prefix(TRACE)?;
    for (key, field) in [
        ("inspect_get_type = \"", "type"),
        ("inspect_get_product_name = \"", "product"),
    ] {
        if let Some(v) = call.strip_prefix(key) {
            return Some((field, v.strip_suffix('"').unwrap_or(v).to_string()));
        }
    }
    None
}

/// Run virt-sysprep with `args`, streaming its progress and messages to our stderr as they
/// come (trace lines only with `verbose`). It inherits our environment, so
/// LIBGUESTFS_BACKEND and friends reach libguestfs. Its stdin is /dev/null: ours may be
/// the record stream of a pipe. A stopping signal ends it as [`child`] says.
pub fn run(args: &[String], verbose: bool, intr: &Interrupt) -> Result<Outcome> {
    let start = Instant::now();
    let mut out = Outcome::default();
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut cmd = Command::new(PROGRAM);
    cmd.args(args).stdin(Stdio::null());
    let finished = child::run(
        &mut cmd,
        "generalize with virt-sysprep",
        "install libguestfs-tools (make deps)",
        intr,
        true,
        |stream, line| {
            if let Some((field, v)) = inspected(line) {
                match field {
                    "type" => out.os_type = Some(v),
                    _ => out.product = Some(v),
                }
            }
            let trace = line.starts_with(TRACE);
            if !trace || verbose {
                tpl_common::cli::say(format_args!("{line}"));
            }
            if stream == Stream::Stderr && !trace && !line.trim().is_empty() {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_string());
            }
        },
    )?;
    out.status = Some(finished.status);
    out.tail = tail.into();
    out.elapsed = start.elapsed();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn machine_id_is_emptied_after_everything_else_customizes() {
        let plan = Plan {
            expression: vec!["defaults".into(), "-tmp-files".into()],
            resolved: BTreeSet::new(),
        };
        let extra = vec!["--install".to_string(), "vim".to_string()];
        let a = command_line(
            "qemu:///system",
            "u-u-i-d",
            &plan,
            Some("Tpl"),
            "/t/tpl-firstboot",
            &extra,
            false,
        );
        let pos = |s: &str| a.iter().position(|x| x == s).unwrap();
        assert_eq!(&a[..4], ["-c", "qemu:///system", "-d", "u-u-i-d"]);
        assert_eq!(a[pos("--operations") + 1], "defaults,-tmp-files");
        assert!(pos("--touch") < pos("--install"));
        assert!(pos("--install") < pos("--truncate"));
        assert!(pos("--truncate") < pos("--hostname"));
        assert!(pos("--hostname") < pos("--firstboot"));
        assert_eq!(a[pos("--firstboot") + 1], "/t/tpl-firstboot");
        assert!(a.contains(&"/var/lib/cloud/instances".to_string()));
        assert!(!a.contains(&"--quiet".to_string()));
        let q = command_line("u", "d", &plan, None, "f", &[], true);
        assert!(q.contains(&"--quiet".to_string()) && !q.contains(&"--hostname".to_string()));
    }

    #[test]
    fn extra_options_may_not_take_over() {
        let ok: Vec<String> = ["--root-password", "password:x", "--install", "a,b", "-v"]
            .map(String::from)
            .to_vec();
        assert!(check_extra(&ok).is_ok());
        for bad in [
            "-a",
            "--domain=x",
            "--hostname",
            "--list-operations",
            "-n",
            "--enable",
        ] {
            let e = check_extra(&["--install".into(), "x".into(), bad.into()]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn quotes_for_the_shell() {
        let args = vec!["-d".into(), "my vm".into(), "it's".into(), "".into()];
        let line = shell_words("virt-sysprep", &args);
        // What a shell makes of it again is the arguments themselves.
        let back = shlex::split(&line).unwrap();
        assert_eq!(back[0], "virt-sysprep");
        assert_eq!(back[1..], args[..]);
    }

    #[test]
    fn reads_inspection_from_the_trace() {
        assert_eq!(
            inspected("libguestfs: trace: inspect_get_type = \"windows\""),
            Some(("type", "windows".into()))
        );
        assert_eq!(
            inspected("libguestfs: trace: inspect_get_product_name = \"Debian GNU/Linux 12\""),
            Some(("product", "Debian GNU/Linux 12".into()))
        );
        assert_eq!(
            inspected("libguestfs: trace: inspect_get_type \"/dev/sda\""),
            None
        );
        assert_eq!(inspected("inspect_get_type = \"linux\""), None);
    }

    #[test]
    fn error_lines_win_over_the_last_lines() {
        let o = Outcome {
            tail: vec![
                "virt-sysprep: warning: x".into(),
                "virt-sysprep: error: no operating systems were found".into(),
                "If reporting bugs, run virt-sysprep with debugging enabled".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            o.errors(),
            "virt-sysprep: error: no operating systems were found"
        );
        let o = Outcome {
            tail: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            ..Default::default()
        };
        assert_eq!(o.errors(), "b / c / d");
        assert_eq!(Outcome::default().errors(), "it printed no error");
    }

    /// The script runs under the host's sh and busybox sh; the hostname parser is the part
    /// that can be checked without a guest (tests/tests/generalize.rs boots one for the rest).
    #[test]
    fn firstboot_script_reads_nocloud_serials() {
        let cases = [
            ("ds=nocloud;h=clone1;i=iid-1", "clone1"),
            ("ds=nocloud;i=iid-1;h=web.example.com", "web.example.com"),
            ("ds=nocloud;s=http://10.0.0.1:8000/;h=ci-3", "ci-3"),
            ("ds=nocloud-net;local-hostname=db1", "db1"),
            ("ds=nocloud;i=only-an-id", ""),
            ("ds=nocloudy;h=no", ""),
            ("h=no", ""),
            ("VMware-56 4d 3a", ""),
            ("ds=nocloud;h=*;i=x", "*"),
            ("", ""),
        ];
        // busybox-static is a build dependency (make deps): the test guest's shell.
        for sh in ["sh", "busybox"] {
            for (serial, want) in cases {
                let mut c = Command::new(sh);
                if sh == "busybox" {
                    c.arg("sh");
                }
                let out = c
                    .args(["-c", FIRSTBOOT, FIRSTBOOT_NAME, "--hostname-from", serial])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{sh} {serial:?}");
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim_end(),
                    want,
                    "{sh}: {serial:?}"
                );
            }
        }
    }

    #[test]
    fn firstboot_script_checks_hostnames() {
        let script = |opt: &str, name: &str| {
            let out = Command::new("sh")
                .args(["-c", FIRSTBOOT, FIRSTBOOT_NAME, opt, name])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
            (out.status.success(), stdout)
        };
        let valid = |name: &str| script("--valid-hostname", name).0;
        assert!(valid("clone1"));
        assert!(valid("web-1.example.com"));
        assert!(valid(&"a".repeat(64)), "the kernel's limit");
        for bad in ["", "-x", ".x", "a b", "a;rm -rf /", "x/y", &"a".repeat(65)] {
            assert!(!valid(bad), "{bad:?}");
        }
        // What is set: the name when it fits in 64 characters, else a longer FQDN's first
        // label (as cloud-init sets it); nothing for a name that has neither.
        let fqdn64 = format!("web-1.{}.org", "d".repeat(54));
        let fqdn65 = format!("web-1.{}.org", "d".repeat(55));
        let cases = [
            ("clone1", Some("clone1")),
            ("web-1.example.com", Some("web-1.example.com")),
            (fqdn64.as_str(), Some(fqdn64.as_str())),
            (fqdn65.as_str(), Some("web-1")),
            (&"a".repeat(65), None),
            (&format!("{}.example.com", "a".repeat(65)), None),
            (&format!("a.{}", "b".repeat(252)), None),
            ("a b.example.com", None),
            ("", None),
        ];
        for (name, want) in cases {
            let (ok, out) = script("--hostname-for", name);
            assert_eq!(ok.then_some(out.as_str()), want, "{name:?}");
        }
    }
}

//! The test rig: a tiny guest disk built once per run, uniquely named domains on a real
//! libvirtd that are removed even when a test fails, and helpers that run the real binaries.
//!
//! Nothing here fakes libvirt or qemu-img: a test that cannot reach them fails loudly.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tpl_common::domxml::DomainXml;
pub use tpl_common::record::Record;

/// The libvirt the tests use: the real system daemon.
pub const URI: &str = "qemu:///system";
/// Prefix of every domain and directory a test creates, followed by the test process id.
pub const PREFIX: &str = "tpltest";
/// Where test images live: a directory libvirt's qemu user can reach.
pub const IMAGES: &str = "/var/lib/libvirt/images";

const GUEST_SCRIPT: &str = include_str!("../guest/build-guest.sh");
const GUEST_INIT: &str = include_str!("../guest/init.sh");
/// The tiny guest's domain definition, shared with the demo (scripts/demo.sh).
const GUEST_DOMAIN: &str = include_str!("../guest/domain.xml");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a built tpl binary. The Makefile builds them before the tests run; a missing
/// one is a loud failure, never a skip.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("TPL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug"));
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the tools first (cargo build --workspace, or make test)",
        p.display()
    );
    p
}

/// A finished run of a tool: exit code, stdout lines parsed as records, stderr.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub records: Vec<Record>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(what: &str, out: Output) -> Run {
        let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
        let stderr = String::from_utf8(out.stderr).expect("stderr is UTF-8");
        // Strict: every stdout line must be a complete record.
        let records = stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<Record>(l).unwrap_or_else(|e| {
                    panic!("{what}: stdout line is not a record ({e}): {l:?}\nstderr: {stderr}")
                })
            })
            .collect();
        Run {
            code: out.status.code().unwrap_or(-1),
            records,
            stdout,
            stderr,
        }
    }

    /// Assert success and exactly `n` records.
    pub fn ok(self, n: usize) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success, got {}: {}",
            self.code, self.stderr
        );
        assert_eq!(
            self.records.len(),
            n,
            "expected {n} records: {}",
            self.stdout
        );
        self
    }

    /// Assert a failure with this exit code and no record on stdout.
    pub fn fails(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}; stderr: {}\nstdout: {}",
            self.stderr, self.stdout
        );
        self
    }

    /// Assert that stderr holds all these fragments.
    pub fn says(self, parts: &[&str]) -> Run {
        for p in parts {
            assert!(
                self.stderr.contains(p),
                "stderr lacks {p:?}: {}",
                self.stderr
            );
        }
        self
    }
}

/// Where the tests' state directories live: one per test (see [`state_dir`]).
pub const STATE_ROOT: &str = "/var/lib/tpl-test";

/// The state directory of the test running on this thread, made on first use and removed
/// when the test's thread ends.
struct TestState {
    dir: PathBuf,
}

impl Drop for TestState {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

thread_local! {
    static STATE: OnceLock<TestState> = const { OnceLock::new() };
}

/// This test's own `TPL_STATE_DIR` (`/var/lib/tpl-test/tpltest-PID-sN`): every tool a test
/// runs keeps its locks and journals there, so that the tools of two tests running at once
/// never recover, wait for or lock each other's work. Tools that one test runs share it,
/// as the tools on a host share /var/lib/tpl: that sharing is what the race tests test.
/// Libtest runs each test on a thread of its own; none of the tests' helper threads runs a
/// tool.
pub fn state_dir() -> PathBuf {
    STATE.with(|s| {
        s.get_or_init(|| {
            let dir = Path::new(STATE_ROOT).join(format!(
                "{PREFIX}-{}-s{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ));
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            TestState { dir }
        })
        .dir
        .clone()
    })
}

/// Give every signal that stops a tool its default disposition in a child, whatever the
/// test run inherited: a `cargo test` started in the background by a script has SIGINT
/// ignored, which its children inherit, and a tool or a shell then (rightly) leaves it
/// ignored. The tests send these signals as a terminal or `kill` would to a foreground job.
fn default_signals(c: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec only signal(2), which is async-signal-safe, runs.
    unsafe {
        c.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        })
    }
}

/// The environment every tool runs with in tests: the system libvirt, this test's own
/// state directory, the stopping signals at their defaults, and libguestfs in TCG mode
/// (this machine's KVM cannot run `-cpu host`; see docs/ENVIRONMENT.md).
pub fn test_env(c: &mut Command) -> &mut Command {
    let keep = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.into());
    default_signals(c)
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env("TPL_STATE_DIR", state_dir())
        .env("LIBGUESTFS_BACKEND", keep("LIBGUESTFS_BACKEND", "direct"))
        .env(
            "LIBGUESTFS_BACKEND_SETTINGS",
            keep("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"),
        )
}

/// A command for a built tool, in the test environment.
pub fn tool_command(name: &str) -> Command {
    let mut c = Command::new(bin(name));
    test_env(&mut c);
    c
}

/// Run a tool with arguments and optional stdin (None: stdin is /dev/null).
pub fn run(name: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut c = tool_command(name);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        // A tool that refuses early may close stdin first; that is its right.
        let _ = w.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    Run::from_output(name, out)
}

/// Run a shell pipeline (`sh -c`) with the tools' directory first on PATH.
pub fn pipeline(script: &str) -> Run {
    Run::from_output(script, shell("sh", script).output().unwrap())
}

/// `SHELL -c SCRIPT` in the test environment with the tools' directory first on PATH and
/// stdin /dev/null, to run or spawn.
pub fn shell(shell: &str, script: &str) -> Command {
    let dir = bin("tpl-rename").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new(shell);
    test_env(&mut c)
        .arg("-c")
        .arg(script)
        .env("PATH", path)
        .stdin(Stdio::null());
    c
}

/// Run a helper command and return stdout; panics with its stderr on failure.
pub fn sh(prog: &str, args: &[&str]) -> String {
    String::from_utf8(succeed(Command::new(prog).args(args)).stdout).unwrap()
}

/// Run a command that must succeed and return its output; panics with the command, its
/// stderr and its stdout when it cannot be run or fails.
pub fn succeed(c: &mut Command) -> Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// `virsh -c qemu:///system ARGS`, which must succeed.
pub fn virsh(args: &[&str]) -> String {
    let mut a = vec!["-c", URI];
    a.extend_from_slice(args);
    sh("virsh", &a)
}

/// A libvirt storage pool of a test, stopped and undefined when dropped.
pub struct Pool(pub String);

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = virsh_try(&["pool-destroy", &self.0]);
        let _ = virsh_try(&["pool-undefine", &self.0]);
    }
}

/// `virsh` that may fail: (success, stdout + stderr).
pub fn virsh_try(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("virsh must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The guest disk every test starts from, built once per run (per content of the build
/// script) under a file lock so concurrent test processes share it.
pub fn guest_image() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let mut h = DefaultHasher::new();
        (GUEST_SCRIPT, GUEST_INIT).hash(&mut h);
        let dir = workspace().join("target/tpl-test");
        fs::create_dir_all(&dir).unwrap();
        let img = dir.join(format!("guest-{:016x}.qcow2", h.finish()));
        let lock = fs::File::create(dir.join("guest.lock")).unwrap();
        let _guard =
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
        if !img.exists() {
            let script = workspace().join("tests/guest/build-guest.sh");
            sh("sh", &[script.to_str().unwrap(), img.to_str().unwrap()]);
        }
        sweep_stale();
        img
    })
}

/// Remove what killed test processes left: domains and directories named after a pid that
/// no longer runs.
fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            return false;
        };
        let pid: i32 = match rest.split('-').next().and_then(|p| p.parse().ok()) {
            Some(p) => p,
            None => return false,
        };
        !Path::new(&format!("/proc/{pid}")).exists()
    };
    let (_, names) = virsh_try(&["list", "--all", "--name"]);
    for n in names.lines().map(str::trim).filter(|n| dead(n)) {
        remove_domain(n);
    }
    for dir in [IMAGES, STATE_ROOT] {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if dead(&e.file_name().to_string_lossy()) {
                force_remove_dir(&e.path());
            }
        }
    }
}

/// Stop and undefine a domain with its NVRAM, ignoring "not there".
pub fn remove_domain(name_or_uuid: &str) {
    let _ = virsh_try(&["destroy", name_or_uuid]);
    let _ = virsh_try(&["undefine", "--nvram", name_or_uuid]);
    let _ = virsh_try(&["undefine", name_or_uuid]);
}

/// Remove a directory tree even when tests made files read-only or immutable in it.
pub fn force_remove_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = Command::new("chattr")
        .args(["-R", "-i"])
        .arg(dir)
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(dir).status();
    let _ = fs::remove_dir_all(dir);
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A Linux bridge of the test's own on this host, for clones defined on it (`--bridge`):
/// tpl-clone refuses a bridge the hypervisor does not have. It has no address and no
/// port, is never brought up and carries no traffic; dropping it deletes it.
#[derive(Debug)]
pub struct HostBridge(pub String);

impl HostBridge {
    pub fn create() -> HostBridge {
        // A kernel interface name is at most 15 bytes.
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "tplbr{}",
            (std::process::id() as usize * 64 + n) % 10_000_000_000
        );
        sh("ip", &["link", "add", &name, "type", "bridge"]);
        HostBridge(name)
    }
}

impl Drop for HostBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// One test's own corner of the host: a directory under the libvirt images directory
/// and a name prefix. Dropping it (even while a test panics) removes every domain whose
/// name carries the prefix or whose UUID it tracked, and the directory.
#[derive(Debug)]
pub struct Scratch {
    pub prefix: String,
    pub dir: PathBuf,
    uuids: Vec<String>,
}

/// A test domain made from the guest disk.
#[derive(Debug, Clone)]
pub struct Guest {
    pub name: String,
    pub uuid: String,
    pub disk: PathBuf,
    pub console: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        guest_image();
        let prefix = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = Path::new(IMAGES).join(&prefix);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch {
            prefix,
            dir,
            uuids: Vec::new(),
        }
    }

    /// A unique domain name for this test.
    pub fn name(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }

    /// Remove this domain on drop whatever it is called by then.
    pub fn track(&mut self, uuid: &str) {
        self.uuids.push(uuid.to_string());
    }

    /// Copy the guest disk to `<dir>/<name>.qcow2` (or `file` when given).
    pub fn disk(&self, file: &str) -> PathBuf {
        let p = self.dir.join(file);
        sh(
            "cp",
            &[
                "--sparse=always",
                guest_image().to_str().unwrap(),
                p.to_str().unwrap(),
            ],
        );
        p
    }

    /// Define a shut-off guest domain named `<prefix>-<tag>` on its own copy of the disk.
    pub fn guest(&mut self, tag: &str) -> Guest {
        self.guest_with(tag, "")
    }

    /// Like `guest`, with extra XML inserted in `<devices>`.
    pub fn guest_with(&mut self, tag: &str, extra_devices: &str) -> Guest {
        let name = self.name(tag);
        let disk = self.disk(&format!("{name}.qcow2"));
        let console = self.dir.join(format!("{name}.console.log"));
        let xml = guest_xml(&name, &disk, &console, extra_devices);
        self.define(&xml);
        let uuid = virsh(&["domuuid", &name]).trim().to_string();
        Guest {
            name,
            uuid,
            disk,
            console,
        }
    }

    /// Define a domain from XML and track it.
    pub fn define(&mut self, xml: &str) -> String {
        let f = self.dir.join(format!(
            "def-{}.xml",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        fs::write(&f, xml).unwrap();
        virsh(&["define", f.to_str().unwrap()]);
        let name = tpl_common::domxml::DomainXml::parse(xml)
            .unwrap()
            .name()
            .unwrap();
        let uuid = virsh(&["domuuid", &name]).trim().to_string();
        self.track(&uuid);
        uuid
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for u in &self.uuids {
            remove_domain(u);
        }
        let (_, names) = virsh_try(&["list", "--all", "--name"]);
        for n in names
            .lines()
            .map(str::trim)
            // The prefix and a '-': tpltest-PID-1 must not take tpltest-PID-12's domains.
            .filter(|n| {
                n.strip_prefix(&self.prefix)
                    .is_some_and(|r| r.starts_with('-'))
            })
        {
            remove_domain(n);
        }
        force_remove_dir(&self.dir);
    }
}

/// The host kernel and initrd the guests boot directly (TCG; see docs/ENVIRONMENT.md).
pub fn host_kernel() -> (PathBuf, PathBuf) {
    let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
        .expect("/boot must exist (make deps installs linux-image-amd64)")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .collect();
    kernels.sort();
    let k = kernels
        .pop()
        .expect("no /boot/vmlinuz-*: make deps installs linux-image-amd64");
    let ver = k
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    (k, PathBuf::from(format!("/boot/initrd.img-{ver}")))
}

/// A small TCG domain that boots the guest disk with the host kernel and writes its serial
/// console to a file. It powers itself off when its init is done.
pub fn guest_xml(name: &str, disk: &Path, console: &Path, extra_devices: &str) -> String {
    let (kernel, initrd) = host_kernel();
    GUEST_DOMAIN
        .trim_end()
        .replace("@NAME@", name)
        .replace("@KERNEL@", p(&kernel))
        .replace("@INITRD@", p(&initrd))
        .replace("@DISK@", p(disk))
        .replace("@CONSOLE@", p(console))
        .replace("@EXTRA@", extra_devices)
}

/// The one record a run printed.
pub fn only(run: &Run) -> &Record {
    assert_eq!(run.records.len(), 1, "expected one record: {}", run.stdout);
    &run.records[0]
}

/// The file mode bits of a path (without following a symlink).
pub fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Whether a domain with this name is defined.
pub fn domain_exists(name: &str) -> bool {
    virsh_try(&["domuuid", name]).0
}

/// Write tpl's metadata on a domain straight through libvirt (`virsh metadata`), for tests
/// that need a state an earlier step would have left (e.g. generalized) without paying
/// for that step again.
pub fn set_meta(domain: &str, m: &tpl_common::meta::Meta) {
    virsh(&[
        "metadata",
        domain,
        "--uri",
        tpl_common::meta::NS,
        "--key",
        tpl_common::meta::PREFIX,
        "--set",
        &m.to_xml(),
        "--config",
    ]);
}

/// Mark a domain generalized in its metadata, as `tpl-generalize` would have.
pub fn mark_generalized(domain: &str) {
    let mut m = read_meta(domain);
    m.template.generalized = Some(tpl_common::record::Generalized {
        at: tpl_common::now_rfc3339(),
        method: tpl_common::record::Method::VirtSysprep,
        tool: Some("test rig".into()),
        operations: vec!["defaults".into()],
        hostname: None,
    });
    set_meta(domain, &m);
}

/// tpl's metadata on a domain as libvirt has it now.
pub fn read_meta(domain: &str) -> tpl_common::meta::Meta {
    let (ok, xml) = virsh_try(&[
        "metadata",
        domain,
        "--uri",
        tpl_common::meta::NS,
        "--config",
    ]);
    if ok && !xml.trim().is_empty() {
        tpl_common::meta::Meta::from_xml(xml.trim()).unwrap()
    } else {
        Default::default()
    }
}

/// Start domains and wait (bounded) until each has powered itself off: the test guest's
/// init reports on its console and powers off by itself.
pub fn boot_until_off(names: &[String], limit: std::time::Duration) {
    for n in names {
        virsh(&["start", n]);
    }
    let deadline = std::time::Instant::now() + limit;
    for name in names {
        loop {
            let state = virsh(&["domstate", name]);
            if state.trim() == "shut off" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} still '{}' after {limit:?}",
                state.trim()
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

/// The values of the guest's `TPL-BOOT key=value` console lines for one key.
pub fn boot_values<'a>(console: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("TPL-BOOT {key}=");
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
        .collect()
}

/// The file a domain's serial console is written to, from its definition.
pub fn console_path(domain: &str) -> PathBuf {
    let x =
        tpl_common::domxml::DomainXml::parse(&virsh(&["dumpxml", "--inactive", domain])).unwrap();
    let serial = x
        .root
        .get_child("devices")
        .and_then(|d| d.get_child("serial"))
        .and_then(|s| s.get_child("source"))
        .and_then(|s| s.attributes.get("path").cloned())
        .unwrap_or_else(|| panic!("{domain} has no file serial console"));
    PathBuf::from(serial)
}

/// Start a domain that must not start because qemu cannot open `disk` for writing, and
/// return what virsh said. libvirt copies qemu's error from the domain's log into its
/// message, but under load it can read the log before virtlogd has written qemu's line;
/// the log itself is then the proof, polled within a deadline.
pub fn start_is_denied(name: &str, disk: &Path) -> String {
    let log = PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log"));
    let before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
    let (ok, text) = virsh_try(&["start", name]);
    assert!(!ok, "a locked template must not start: {text}");
    let needle = format!("Could not open '{}': Permission denied", disk.display());
    if text.contains(&needle) {
        return text;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let all = fs::read(&log).unwrap_or_default();
        let new = String::from_utf8_lossy(all.get(before..).unwrap_or_default());
        if new.contains(&needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "start failed, but not because {needle:?}:\nvirsh: {text}\nlog: {new}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A path as the `&str` an argument list wants (test paths are always UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Make a qcow2 overlay of `base` (whose format is `base_fmt`), as a linked clone is
/// made by hand: `qemu-img create -f qcow2 -b BASE -F FMT OVERLAY`.
pub fn qemu_img_overlay(base: &Path, base_fmt: &str, overlay: &Path) {
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(base),
            "-F",
            base_fmt,
            p(overlay),
        ],
    );
}

/// `qemu-img info --output=json` of an image.
pub fn qemu_img_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&sh("qemu-img", &["info", "--output=json", p(path)])).unwrap()
}

/// `qemu-img compare` of two images: whether their guest-visible contents are equal.
pub fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", p(a), p(b)])
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {a:?} {b:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Where tpl-clone keeps its journals: in this test's state directory.
pub fn journals_dir() -> PathBuf {
    state_dir().join("clone-journal")
}

/// tpl-clone's journal files of a run that exist now: `tpl-clone-<pid>-<random>.journal`,
/// or `.journal-new` while it is being created.
pub fn journals_of(pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(journals_dir()) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("tpl-clone-{pid}-"))
        })
        .map(|e| e.path())
        .collect()
}

/// The temporary name under which run `pid` of tpl-clone writes `dir/file`:
/// `.FILE.tpl-tmp-HOST-PID`.
pub fn tmp_of(dir: &Path, file: &str, pid: u32) -> PathBuf {
    dir.join(format!(".{file}{}", tmp_suffix(pid)))
}

/// The pid of the tpl-clone run that is writing `dir/file` under its temporary name now
/// (see [`tmp_of`]), if one is: how a test finds a run that a shell started.
pub fn pid_writing(dir: &Path, file: &str) -> Option<u32> {
    let suffix = tmp_suffix(0);
    let start = format!(".{file}{}", suffix.strip_suffix('0').unwrap());
    files_in(dir)
        .iter()
        .find_map(|f| f.strip_prefix(&start)?.parse().ok())
}

/// Assert that nothing is left of clone `name`, which run `pid` of tpl-clone was making
/// in `dir` when it was stopped: no temporary file, no image, no domain, no journal.
pub fn assert_nothing_left(dir: &Path, name: &str, pid: u32) {
    let tmp = tmp_of(dir, &format!("{name}.qcow2"), pid);
    assert!(!tmp.exists(), "temporary file {tmp:?} left");
    assert!(
        !dir.join(format!("{name}.qcow2")).exists(),
        "{name}'s image left"
    );
    assert!(!domain_exists(name), "domain {name} left");
    assert!(journals_of(pid).is_empty(), "the journal of run {pid} left");
}

/// The write end of a pipe whose read end is closed already: what a tool's stderr is in
/// `(tool 2>&1 >/dev/null) | true` once `true` has exited. A write to it fails with EPIPE,
/// or kills a process that does not ignore SIGPIPE.
pub fn closed_pipe() -> std::os::fd::OwnedFd {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    write
}

/// How the temporary names of run `pid` of tpl-clone end: `.tpl-tmp-HOST-PID`. tpl-clone
/// replaces odd characters in the host name; the test machines' names have none, and one
/// that had would fail here, loudly.
pub fn tmp_suffix(pid: u32) -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    assert!(
        !host.is_empty()
            && host.len() <= 64
            && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
        "host name {host:?} is one tpl-clone would rewrite in temporary names; this rig assumes a plain one"
    );
    format!(".tpl-tmp-{host}-{pid}")
}

/// The SHA-256 of a file's bytes, in hex (`sha256sum`).
pub fn sha256(path: &Path) -> String {
    sh("sha256sum", &[p(path)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `qemu-img create -q -f FORMAT PATH SIZE`: a new empty image.
pub fn qemu_img_create(path: &Path, format: &str, size: &str) {
    sh("qemu-img", &["create", "-q", "-f", format, p(path), size]);
}

/// A domain's inactive definition as libvirt has it now, parsed.
pub fn dom_xml(name: &str) -> DomainXml {
    DomainXml::parse(&virsh(&["dumpxml", "--inactive", name])).unwrap()
}

/// The names of the entries of a directory (not below it).
pub fn files_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Files a run left in `dir` under a temporary name (`.FILE.tpl-tmp-HOST-PID`).
pub fn leftovers(dir: &Path) -> Vec<String> {
    files_in(dir)
        .into_iter()
        .filter(|n| n.contains(".tpl-tmp-"))
        .collect()
}

/// Poll `f` until it holds, failing the test after `secs` with `what` it waited for.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Start a tool in the background: stdin /dev/null, stdout and stderr piped.
pub fn spawn_tool(name: &str, args: &[&str]) -> Child {
    tool_command(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// Start tpl-clone in the background (see [`spawn_tool`]).
pub fn spawn_clone(args: &[&str]) -> Child {
    spawn_tool("tpl-clone", args)
}

/// Start a full clone of `template` named `name` with its image in `dir`, wait until it is
/// copying (its temporary file exists), send it `sig`, and return its pid and its output.
pub fn signal_mid_copy(
    dir: &Path,
    template: &str,
    name: &str,
    sig: nix::sys::signal::Signal,
) -> (u32, Output) {
    let child = spawn_clone(&[template, name, "--full"]);
    let pid = child.id();
    let tmp = tmp_of(dir, &format!("{name}.qcow2"), pid);
    wait_until(60, "the copy to start", || tmp.exists());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    (pid, child.wait_with_output().unwrap())
}

/// Start `sh -c 'SETUP; exec tpl-clone TEMPLATE NAME --full'` (stdout and stderr piped)
/// and wait until the tool copies into `dir`; the shell's child and the tool's pid.
pub fn full_clone_through_sh(setup: &str, dir: &Path, template: &str, name: &str) -> (Child, u32) {
    let child = shell(
        "sh",
        &format!("{setup}; exec tpl-clone '{template}' '{name}' --full"),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let file = format!("{name}.qcow2");
    wait_until(60, "the clone to copy", || {
        pid_writing(dir, &file).is_some()
    });
    let pid = pid_writing(dir, &file).unwrap();
    (child, pid)
}

/// A test guest `<prefix>-<tag>` with a UEFI loader (a dummy: it is never started) and an
/// NVRAM file `<dir>/<name>_VARS.fd` of 64 KiB, mode 0644, named by the `<nvram>` element
/// written as `form` (`@` stands for the path). The guest and its NVRAM file.
pub fn guest_with_nvram(s: &mut Scratch, tag: &str, form: &str) -> (Guest, PathBuf) {
    let name = s.name(tag);
    let disk = s.disk(&format!("{name}.qcow2"));
    let console = s.dir.join(format!("{name}.console.log"));
    let loader = s.dir.join("loader.fd");
    let nvram = s.dir.join(format!("{name}_VARS.fd"));
    fs::write(&loader, vec![0u8; 64 * 1024]).unwrap();
    fs::write(&nvram, vec![0u8; 64 * 1024]).unwrap();
    fs::set_permissions(&nvram, fs::Permissions::from_mode(0o644)).unwrap();
    let xml = guest_xml(&name, &disk, &console, "").replacen(
        "<kernel>",
        &format!(
            "<loader readonly='yes' type='pflash'>{}</loader>\n    {}\n    <kernel>",
            loader.display(),
            form.replace('@', p(&nvram))
        ),
        1,
    );
    let uuid = s.define(&xml);
    (
        Guest {
            name,
            uuid,
            disk,
            console,
        },
        nvram,
    )
}

/// Make a domain a locked template as tpl-lock does, without running it: generalized and
/// `locked` in the metadata, its image `disk` without write bits.
pub fn mark_locked(domain: &str, disk: &Path) {
    mark_generalized(domain);
    let mut m = read_meta(domain);
    m.template.locked = true;
    m.template.locked_at = Some(tpl_common::now_rfc3339());
    set_meta(domain, &m);
    sh("chmod", &["a-w", p(disk)]);
}

/// A test guest marked generalized (see [`mark_generalized`]), ready to lock or clone.
pub fn generalized_template(s: &mut Scratch, tag: &str) -> Guest {
    let g = s.guest(tag);
    mark_generalized(&g.name);
    g
}

/// A test guest made a locked template (see [`mark_locked`]), ready for linked clones.
pub fn locked_template(s: &mut Scratch, tag: &str) -> Guest {
    let g = s.guest(tag);
    mark_locked(&g.name, &g.disk);
    g
}

/// A generalized template domain `<prefix>-<tag>` on its own qcow2 image of virtual size
/// `size` holding `mib` MiB of data at its start (not bootable; nothing boots it): big
/// enough that copying it takes a while. Its name and image.
pub fn data_template(s: &mut Scratch, tag: &str, size: &str, mib: u64) -> (String, PathBuf) {
    let name = s.name(tag);
    let disk = s.dir.join(format!("{name}.qcow2"));
    qemu_img_create(&disk, "qcow2", size);
    sh(
        "qemu-io",
        &["-c", &format!("write -P 0xab 0 {mib}M"), p(&disk)],
    );
    let console = s.dir.join(format!("{name}.console.log"));
    s.define(&guest_xml(&name, &disk, &console, ""));
    mark_generalized(&name);
    (name, disk)
}

/// A file system of its own mounted at `<scratch dir>/<name>` (mode 0755, so libvirt's
/// qemu can reach it). Dropped before the Scratch removes its directory, it clears the
/// immutable attribute of everything on it and unmounts it (lazily when it is still busy,
/// e.g. after a test panicked with a guest running). Mounting needs root, as everything
/// here does.
#[derive(Debug)]
pub struct Mount {
    pub mnt: PathBuf,
}

impl Mount {
    /// `fstype` (ext4 or btrfs) made in a file `<name>.img` of `size` next to the mount
    /// point, loop-mounted.
    pub fn image(s: &Scratch, name: &str, fstype: &str, size: &str) -> Mount {
        let img = s.dir.join(format!("{name}.img"));
        sh("truncate", &["-s", size, p(&img)]);
        match fstype {
            "ext4" => sh("mkfs.ext4", &["-q", "-F", p(&img)]),
            "btrfs" => sh("mkfs.btrfs", &["-q", p(&img)]),
            other => panic!("no recipe for a {other} file system"),
        };
        Mount::new(s, name, &["-o", "loop", p(&img)])
    }

    /// A ramfs: a file system without the immutable attribute (and without a size limit).
    pub fn ramfs(s: &Scratch, name: &str) -> Mount {
        Mount::new(s, name, &["-t", "ramfs", "tpltest"])
    }

    fn new(s: &Scratch, name: &str, how: &[&str]) -> Mount {
        let mnt = s.dir.join(name);
        fs::create_dir(&mnt).unwrap();
        let mut args = how.to_vec();
        args.push(p(&mnt));
        sh("mount", &args);
        // From here on, drop unmounts it even if the rest panics.
        let m = Mount { mnt };
        fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).unwrap();
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .arg("-R")
            .arg("-i")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A small deterministic generator (xorshift64*) for the tests' random choices, seeded
/// from `TPL_FAULT_SEED` or the clock; it prints its seed, so a failing run can be replayed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `what`, whose seed is printed on stderr with how to replay it.
    pub fn seeded(what: &str) -> Rng {
        let seed = std::env::var("TPL_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: seed {seed} (replay with TPL_FAULT_SEED={seed})");
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// One of the items, uniformly.
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.range(0, v.len() as u64 - 1) as usize]
    }
}

/// The defined domains whose names start with `prefix`.
pub fn domains_with_prefix(prefix: &str) -> Vec<String> {
    virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect()
}

/// Assert that a tool did not panic, from its stderr.
pub fn no_panic(tool: &str, stderr: &str) {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{tool} panicked: {stderr}"
    );
}

// RBD
//
// The RBD tests' corner of the test cluster (scripts/ceph-up.sh; `make test` starts it and
// exports CEPH_CONF): one pool per test process, `tplt-<pid>` (8 PGs), made at the first
// need and deleted when the process ends, however it ends (a reaper process waits for the
// end of a pipe only this process holds); what a reaper could not delete (the cluster was
// down) is deleted by the next run, as the pools of any test process that no longer runs
// (tpl-ceph's own tests name theirs `tplt-<pid>-<n>` and sweep the same way). Each test
// names its images after its Scratch prefix, and removes them when it ends, pass or fail.

/// How to get a test cluster, for the loud failures.
pub const CEPH_HOW_TO: &str = "start the test cluster and point CEPH_CONF at it (make test does both):\n\
    \x20   TPL_CEPH_LIBVIRT_URI=qemu:///system scripts/ceph-up.sh   # as root, from the repository root\n\
    \x20   export CEPH_CONF=/var/lib/tpl-ceph/ceph.conf";

/// The test cluster's ceph.conf: `$CEPH_CONF`, which the tools read too. Unset is a loud
/// failure, never a skip.
pub fn ceph_conf() -> PathBuf {
    match std::env::var_os("CEPH_CONF") {
        Some(c) if !c.is_empty() && Path::new(&c).is_file() => PathBuf::from(c),
        Some(c) if !c.is_empty() => panic!(
            "CEPH_CONF={} does not exist: the RBD tests need a running Ceph cluster; {CEPH_HOW_TO}",
            Path::new(&c).display()
        ),
        _ => {
            panic!("CEPH_CONF is not set: the RBD tests need a running Ceph cluster; {CEPH_HOW_TO}")
        }
    }
}

/// ceph-up.sh's state directory (`$TPL_CEPH_DIR`, default /var/lib/tpl-ceph).
pub fn ceph_dir() -> PathBuf {
    std::env::var_os("TPL_CEPH_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/lib/tpl-ceph"), PathBuf::from)
}

thread_local! {
    /// One connection per test thread (a `Cluster` is not `Send`).
    static CEPH: std::cell::OnceCell<tpl_ceph::Cluster> = const { std::cell::OnceCell::new() };
}

/// Run `f` with this thread's connection to the test cluster (client.admin, `$CEPH_CONF`).
pub fn with_ceph<R>(f: impl FnOnce(&tpl_ceph::Cluster) -> R) -> R {
    CEPH.with(|c| {
        f(c.get_or_init(|| {
            let conf = ceph_conf();
            let opts = tpl_ceph::ConnectOptions::default().timeout(Duration::from_secs(20));
            tpl_ceph::Cluster::connect(&opts).unwrap_or_else(|e| {
                panic!(
                    "cannot reach the test cluster of CEPH_CONF={}: {e}\n{CEPH_HOW_TO}",
                    conf.display()
                )
            })
        }))
    })
}

/// `POOL/IMAGE` as a spec.
pub fn rbd_spec(pool: &str, image: &str) -> tpl_ceph::ImageSpec {
    tpl_ceph::ImageSpec::new(pool, image)
}

/// This test process's pool, `tplt-<pid>`: made (8 PGs, no autoscaling, so no PG split
/// stalls a test) at the first call, after the pools of dead test processes are deleted.
pub fn rbd_pool() -> &'static str {
    static POOL: OnceLock<String> = OnceLock::new();
    POOL.get_or_init(|| {
        // The domains of dead test processes first: they may name images in their pools.
        guest_image();
        sweep_stale_pools();
        let pool = format!("tplt-{}", std::process::id());
        with_ceph(|c| {
            if !c.pool_exists(&pool).unwrap() {
                c.pool_create(&pool, 8)
                    .unwrap_or_else(|e| panic!("cannot create the test pool: {e}"));
            }
            c.mon_command(&serde_json::json!({
                "prefix": "osd pool set", "pool": pool, "var": "pg_autoscale_mode", "val": "off",
            }))
            .unwrap_or_else(|e| panic!("cannot turn off autoscaling of {pool}: {e}"));
        });
        reap_pool_at_exit(&pool);
        pool
    })
}

/// A process in a session of its own (so a Ctrl-C of the tests does not take it along)
/// that deletes `pool` once this process has ended: it waits for the end of a pipe whose
/// write end only this process holds (close-on-exec, never passed on), which the kernel
/// closes however the process ends, kill -9 included.
fn reap_pool_at_exit(pool: &str) {
    static WRITE_END: OnceLock<std::os::fd::OwnedFd> = OnceLock::new();
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let script = format!(
        "cat >/dev/null; exec timeout 60 ceph --connect-timeout 20 -c '{}' osd pool rm {pool} {pool} \
         --yes-i-really-really-mean-it",
        ceph_conf().display()
    );
    // setsid -f: the reaper runs on in a session of its own, setsid itself returns.
    succeed(
        Command::new("setsid")
            .args(["-f", "sh", "-c", &script])
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let _ = WRITE_END.set(write);
}

/// Delete the pools `tplt-<pid>` (and tpl-ceph's `tplt-<pid>-<n>`) of test processes that
/// no longer run.
fn sweep_stale_pools() {
    with_ceph(|c| {
        for p in c.pools().unwrap_or_default() {
            let Some(pid) = p
                .strip_prefix("tplt-")
                .and_then(|r| r.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                match c.pool_delete(&p) {
                    Ok(()) => eprintln!("deleted the stale test pool {p}"),
                    Err(e) => eprintln!("WARNING: stale test pool {p} not deleted: {e}"),
                }
            }
        }
    });
}

/// The images in a pool, by name.
pub fn rbd_images(pool: &str) -> BTreeSet<String> {
    with_ceph(|c| c.list(pool))
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect()
}

/// Whether an image (or `IMAGE@SNAP`) exists.
pub fn rbd_exists(pool: &str, image: &str) -> bool {
    let spec: tpl_ceph::ImageSpec = format!("{pool}/{image}").parse().unwrap();
    with_ceph(|c| c.exists(&spec)).unwrap_or_else(|e| panic!("{e}"))
}

/// The parent of an image, `POOL/IMAGE@SNAP` (`rbd info`'s parent), or None.
pub fn rbd_parent(pool: &str, image: &str) -> Option<String> {
    with_ceph(|c| c.info(&rbd_spec(pool, image)))
        .unwrap_or_else(|e| panic!("{e}"))
        .parent
        .map(|p| p.spec.to_string())
}

/// The snapshots of an image: (name, protected).
pub fn rbd_snapshots(pool: &str, image: &str) -> Vec<(String, bool)> {
    with_ceph(|c| c.snapshots(&rbd_spec(pool, image)))
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|s| (s.name, s.protected))
        .collect()
}

/// The clones of `POOL/IMAGE@SNAP` (`rbd children`), as `POOL/IMAGE`.
pub fn rbd_children(pool: &str, image: &str, snap: &str) -> BTreeSet<String> {
    with_ceph(|c| c.children(&rbd_spec(pool, image).at(snap)))
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|ch| ch.spec.to_string())
        .collect()
}

/// An image as qemu-img names it: `rbd:POOL/IMAGE[@SNAP]:conf=CEPH_CONF:id=admin`.
pub fn qemu_rbd(pool: &str, image: &str) -> String {
    format!("rbd:{pool}/{image}:conf={}:id=admin", ceph_conf().display())
}

/// The SHA-256 of an image's (or a snapshot's) guest-visible bytes.
pub fn rbd_sha256(pool: &str, image: &str) -> String {
    let out = succeed(Command::new("sh").arg("-c").arg(format!(
        "rbd -c '{}' export --no-progress '{pool}/{image}' - | sha256sum",
        ceph_conf().display()
    )));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The uuid of the libvirt secret that holds client.admin's key, which ceph-up.sh defines
/// when run with TPL_CEPH_LIBVIRT_URI (make test and make ceph do).
pub fn ceph_secret() -> String {
    static SECRET: OnceLock<String> = OnceLock::new();
    SECRET
        .get_or_init(|| {
            let f = ceph_dir().join("libvirt-secret.uuid");
            let uuid = fs::read_to_string(&f)
                .unwrap_or_else(|e| {
                    panic!(
                        "no libvirt ceph secret ({}: {e}): run ceph-up.sh with \
                         TPL_CEPH_LIBVIRT_URI=qemu:///system (make ceph does)",
                        f.display()
                    )
                })
                .trim()
                .to_string();
            let (ok, text) = virsh_try(&["secret-dumpxml", &uuid]);
            assert!(
                ok,
                "the libvirt secret {uuid} named in {} is not defined: {text}; run ceph-up.sh \
                 with TPL_CEPH_LIBVIRT_URI=qemu:///system again (make ceph does)",
                f.display()
            );
            uuid
        })
        .clone()
}

/// The monitor address libvirt's `<host>` names: the cluster's msgr-v1 address, which
/// qemu's librbd reaches (from the monmap).
pub fn ceph_mon() -> (String, u16) {
    let mons = with_ceph(|c| c.mon_addrs()).unwrap_or_else(|e| panic!("{e}"));
    let m = mons
        .iter()
        .find(|m| m.protocol == "v1")
        .or_else(|| mons.first())
        .unwrap_or_else(|| panic!("the test cluster has no monitor address: {mons:?}"));
    (m.addr.ip().to_string(), m.addr.port())
}

/// A `<disk>` element for `POOL/IMAGE` as the guest's `target` (virtio), with the
/// monitor and the cephx user and secret: the disk the issue describes.
pub fn rbd_disk_xml(pool: &str, image: &str, target: &str) -> String {
    let (host, port) = ceph_mon();
    format!(
        "<disk type='network' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
         <source protocol='rbd' name='{pool}/{image}'><host name='{host}' port='{port}'/></source>\n      \
         <auth username='admin'><secret type='ceph' uuid='{}'/></auth>\n      \
         <target dev='{target}' bus='virtio'/>\n    </disk>",
        ceph_secret()
    )
}

/// The tiny guest's domain (tests/guest/domain.xml) with its vda on `POOL/IMAGE` instead of
/// a file.
pub fn rbd_guest_xml(name: &str, pool: &str, image: &str, console: &Path, extra: &str) -> String {
    let xml = guest_xml(name, Path::new("/nonexistent.qcow2"), console, extra);
    let start = xml
        .find("<disk type='file'")
        .expect("tests/guest/domain.xml has a file disk");
    let end = start
        + xml[start..]
            .find("</disk>")
            .expect("tests/guest/domain.xml: </disk>")
        + "</disk>".len();
    format!(
        "{}{}{}",
        &xml[..start],
        rbd_disk_xml(pool, image, "vda"),
        &xml[end..]
    )
}

/// Copy the guest disk into `POOL/IMAGE` as a raw image (qemu-img convert, as an
/// administrator moves a VM onto Ceph).
pub fn rbd_import_guest(pool: &str, image: &str) {
    sh(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p(guest_image()),
            &qemu_rbd(pool, image),
        ],
    );
}

/// Remove an image, its snapshots first (unprotected), retrying while it is busy: qemu's
/// watcher outlives `virsh destroy` for a few seconds. Panics after `secs`.
pub fn rbd_remove(pool: &str, image: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match try_remove_image(pool, image) {
            Ok(()) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "cannot remove {pool}/{image} within {secs} s: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One attempt: the image's snapshots (unprotected), then the image. An image that cannot
/// be opened (ENOENT: the remnant of a creation killed halfway, which `rbd ls` still
/// lists) is removed all the same: rbd_remove clears such remnants.
fn try_remove_image(pool: &str, image: &str) -> Result<(), String> {
    with_ceph(|c| {
        let spec = rbd_spec(pool, image);
        match c.snapshots(&spec) {
            Ok(snaps) => {
                for s in snaps {
                    let at = spec.at(&s.name);
                    if s.protected {
                        c.snap_unprotect(&at).map_err(|e| e.to_string())?;
                    }
                    c.snap_remove(&at).map_err(|e| e.to_string())?;
                }
            }
            Err(tpl_ceph::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        match c.remove(&spec) {
            Ok(()) | Err(tpl_ceph::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// Whether an image has snapshots (None: it cannot be opened).
fn has_snapshots(pool: &str, image: &str) -> Option<bool> {
    with_ceph(|c| c.snapshots(&rbd_spec(pool, image)))
        .ok()
        .map(|s| !s.is_empty())
}

/// Remove every image of `pool` that `mine` picks, retrying busy ones until `secs` have
/// passed; returns what could not be removed (never panics: it runs in drops). Images with
/// snapshots (templates) go last, once nothing else is left: a clone, even one whose
/// creation was killed halfway and that Ceph does not list among the children, must never
/// lose its parent (librbd then cannot open it, and retries).
pub fn rbd_purge(pool: &str, secs: u64, mine: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left: Vec<String> = match with_ceph(|c| c.list(pool)) {
            Ok(l) => l.into_iter().filter(|i| mine(i)).collect(),
            Err(e) => return vec![e.to_string()],
        };
        if left.is_empty() {
            return Vec::new();
        }
        let (parents, leaves): (Vec<&String>, Vec<&String>) = left
            .iter()
            .partition(|i| has_snapshots(pool, i) == Some(true));
        let now = if leaves.is_empty() { parents } else { leaves };
        let errors: Vec<String> = now
            .iter()
            .filter_map(|i| try_remove_image(pool, i).err().map(|e| format!("{i}: {e}")))
            .collect();
        if Instant::now() > deadline {
            return if errors.is_empty() { left } else { errors };
        }
        // Busy (a watcher), or removed and still listed for a moment: look again soon.
        std::thread::sleep(Duration::from_millis(if errors.is_empty() {
            20
        } else {
            200
        }));
    }
}

/// A test domain on an RBD image.
#[derive(Debug, Clone)]
pub struct RbdGuest {
    pub name: String,
    pub uuid: String,
    pub pool: String,
    pub image: String,
    pub console: PathBuf,
}

/// A [`Scratch`] whose test also uses this process's pool: on drop (pass or fail) its
/// domains are stopped, then every image named after its prefix (temporary names of
/// tpl-clone included) is removed, then the Scratch removes the domains and directory.
#[derive(Debug)]
pub struct RbdScratch {
    pub s: Scratch,
    pub pool: String,
}

impl RbdScratch {
    pub fn new() -> RbdScratch {
        let pool = rbd_pool().to_string();
        RbdScratch {
            s: Scratch::new(),
            pool,
        }
    }

    /// Whether an image name is this test's: named after its prefix, or tpl-clone's
    /// temporary name for such an image (`.NAME.tpl-tmp-HOST-PID`).
    pub fn owns(&self, image: &str) -> bool {
        image
            .strip_prefix('.')
            .unwrap_or(image)
            .strip_prefix(&self.s.prefix)
            .is_some_and(|r| r.starts_with('-'))
    }

    /// This test's images in the pool.
    pub fn images(&self) -> BTreeSet<String> {
        rbd_images(&self.pool)
            .into_iter()
            .filter(|i| self.owns(i))
            .collect()
    }

    /// A shut-off guest domain `<prefix>-<tag>` whose vda is its own copy of the guest disk
    /// in RBD, `POOL/<prefix>-<tag>`.
    pub fn rbd_guest(&mut self, tag: &str) -> RbdGuest {
        self.rbd_guest_with(tag, "")
    }

    /// Like `rbd_guest`, with extra XML in `<devices>`.
    pub fn rbd_guest_with(&mut self, tag: &str, extra_devices: &str) -> RbdGuest {
        let name = self.s.name(tag);
        rbd_import_guest(&self.pool, &name);
        let console = self.s.dir.join(format!("{name}.console.log"));
        let xml = rbd_guest_xml(&name, &self.pool, &name, &console, extra_devices);
        let uuid = self.s.define(&xml);
        RbdGuest {
            name: name.clone(),
            uuid,
            pool: self.pool.clone(),
            image: name,
            console,
        }
    }

    /// An empty image `POOL/<prefix>-<tag>` of `mib` MiB; its name.
    pub fn rbd_image(&self, tag: &str, mib: u64) -> String {
        let name = self.s.name(tag);
        with_ceph(|c| {
            c.create(
                &rbd_spec(&self.pool, &name),
                mib << 20,
                &tpl_ceph::NewImageOptions::default(),
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
        name
    }

    /// Undefine a clone and remove its RBD images (and its files), waiting out qemu's
    /// watcher.
    pub fn remove_clone(&self, name: &str) {
        if !domain_exists(name) {
            return;
        }
        let x = dom_xml(name);
        remove_domain(name);
        for d in x.disks() {
            if let Some(r) = &d.rbd {
                rbd_remove(&r.pool, &r.image, 60);
            } else if let Some(f) = &d.path {
                let _ = fs::remove_file(f);
            }
        }
    }
}

impl Default for RbdScratch {
    fn default() -> Self {
        RbdScratch::new()
    }
}

impl std::ops::Deref for RbdScratch {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        &self.s
    }
}

impl std::ops::DerefMut for RbdScratch {
    fn deref_mut(&mut self) -> &mut Scratch {
        &mut self.s
    }
}

impl Drop for RbdScratch {
    fn drop(&mut self) {
        // Stopped first, so no qemu holds an image; the Scratch undefines them after.
        for n in domains_with_prefix(&format!("{}-", self.s.prefix)) {
            let _ = virsh_try(&["destroy", &n]);
        }
        let left = rbd_purge(&self.pool, 45, |i| self.owns(i));
        if !left.is_empty() {
            // Never panic in drop; the pool goes with the process anyway.
            eprintln!(
                "WARNING: images of {} left in {}: {left:?}",
                self.s.prefix, self.pool
            );
        }
    }
}

/// A domain's disk `target` as an RBD source (its pool, image and snapshot), from libvirt.
pub fn rbd_source_of(domain: &str, target: &str) -> tpl_common::record::RbdSource {
    dom_xml(domain)
        .disks()
        .into_iter()
        .find(|d| d.target == target)
        .and_then(|d| d.rbd)
        .unwrap_or_else(|| panic!("{domain} has no RBD disk {target}"))
}

/// Start a domain that must not start because its RBD disk is a snapshot (read-only to
/// qemu): "Block node is read-only", from virsh or (when libvirt read the log too early)
/// from the domain's log, within a deadline.
pub fn start_is_read_only(name: &str) -> String {
    let log = PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log"));
    let before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
    let (ok, text) = virsh_try(&["start", name]);
    assert!(!ok, "a locked template must not start: {text}");
    let needle = "Block node is read-only";
    if text.contains(needle) {
        return text;
    }
    wait_until(10, &format!("{needle:?} in {}", log.display()), || {
        let all = fs::read(&log).unwrap_or_default();
        String::from_utf8_lossy(all.get(before..).unwrap_or_default()).contains(needle)
    });
    text
}

/// Whether every journal a tool's run kept (its "kept the journal" warnings) was kept for
/// one reason only: an RBD image still watched by the killed run's own Ceph connection
/// although the run blocklisted that address, a watch the OSD did not drop (a client
/// killed while its watch request was in flight; see docs/ENVIRONMENT.md). False when no
/// journal was kept, or one was kept for any other reason.
pub fn ghost_watch_kept(stderr: &str) -> bool {
    let kept: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("kept the journal"))
        .collect();
    !kept.is_empty()
        && kept.iter().all(|l| {
            l.contains("still watched by the killed run's connection")
                && l.contains(
                    "although that address is blocklisted: the OSD has not dropped the watch",
                )
        })
}

// ------------------------------------------------------------ the network rig (issue 20)

/// hvnet's state directory (scripts/hvnet-up.sh).
pub fn hvnet_dir() -> PathBuf {
    std::env::var_os("TPL_HVNET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/tpl-hvnet"))
}

/// The URI of hvnet, the hypervisor in its own network namespace whose NAT network
/// `tplnet` the network tests use. Its guests are reached only inside that namespace.
pub fn hvnet_uri() -> String {
    let sock = hvnet_dir().join("run/libvirt/libvirt-sock");
    assert!(
        sock.exists(),
        "hvnet is not running ({} is missing): make hvnet, or make test",
        sock.display()
    );
    format!("qemu+unix:///system?socket={}", sock.display())
}

/// `CMD ARGS` inside hvnet's network namespace (scripts/hvnet-exec.sh): the only way a
/// test talks to a guest's address.
pub fn in_hvnet(prog: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(workspace().join("scripts/hvnet-exec.sh"));
    test_env(&mut c).arg(prog).args(args);
    c
}

/// Run a tpl tool inside hvnet's network namespace (it then reaches the guests, as
/// `--ready=ssh` must), stdin /dev/null.
pub fn run_in_hvnet(name: &str, args: &[&str]) -> Run {
    let out = in_hvnet(&bin(name), args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name} in hvnet: {e}"));
    Run::from_output(name, out)
}

/// `virsh -c hvnet ARGS`, which must succeed.
pub fn virsh_hvnet(args: &[&str]) -> String {
    let uri = hvnet_uri();
    let mut a = vec!["-c", uri.as_str()];
    a.extend_from_slice(args);
    sh("virsh", &a)
}

/// The cached Debian 12 test guest (tests/guest/build-debian.sh): disk, kernel, initrd.
pub fn debian_image() -> &'static (PathBuf, PathBuf, PathBuf) {
    static IMAGE: std::sync::OnceLock<(PathBuf, PathBuf, PathBuf)> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let out =
            succeed(Command::new(workspace().join("tests/guest/build-debian.sh")).arg("--cached"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let paths: Vec<PathBuf> = text.split_whitespace().map(PathBuf::from).collect();
        assert_eq!(paths.len(), 3, "build-debian.sh --cached printed {text:?}");
        (paths[0].clone(), paths[1].clone(), paths[2].clone())
    })
}

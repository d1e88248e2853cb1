//! The JSON Lines record every tool reads and writes, and the bounded reader of records on stdin.
//!
//! # Wire format
//!
//! Each tool writes on stdout one line per domain it worked on, a JSON object describing
//! the domain *as it is after the step*, re-read from libvirt:
//!
//! ```json
//! {"schema":1,"uri":"qemu:///system","name":"TplVM","uuid":"3d06ec5d-…","state":"shut off",
//!  "disks":[{"target":"vda","device":"disk","kind":"file","path":"/var/lib/libvirt/images/TplVM.qcow2",
//!            "format":"qcow2","readonly":false,"shareable":false,"own":true,"backing":[]}],
//!  "nvram":null,
//!  "template":{"generalized":{"at":"2026-11-25T10:41:35Z","method":"virt-sysprep",
//!              "tool":"virt-sysprep 1.48.2","operations":["defaults"],"hostname":"TplVM"},
//!              "locked":true,"locked_at":"…","immutable":false},
//!  "clone":null,
//!  "history":[{"tool":"tpl-rename","at":"…","detail":"renamed 'VM' to 'TplVM'"}]}
//! ```
//!
//! - `schema` is [`SCHEMA`]; it changes only when a field changes meaning. New fields may
//!   appear in any version: readers ignore what they do not know.
//! - Closed sets are fixed strings: `state` (virsh's words), `device`, `kind`, `method`,
//!   `mode`; see the enums below. Times are RFC 3339 in UTC, to the second.
//! - `uri` is the connection the tool used. A reader compares it with its own and refuses
//!   a record of another connection; it never connects to it.
//! - As input, a tool needs only `{"uuid": …}` or `{"name": …}` (UUID first, since names
//!   change along a pipe), at most [`MAX_LINE`] bytes per line.
//!
//! `cargo run -p xtask -- docs DIR` writes the JSON Schema of a record (generated from
//! these types) next to the man pages.

use std::io::BufRead;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the record shape; bumped when a field changes meaning.
pub const SCHEMA: u32 = 1;

/// The longest input line a tool reads; a longer one is refused without being read into
/// memory.
pub const MAX_LINE: usize = 1 << 20;

/// A domain as it is after a step, re-read from libvirt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Record {
    pub schema: u32,
    /// The libvirt connection the tool used.
    pub uri: String,
    pub name: String,
    pub uuid: String,
    pub state: State,
    pub disks: Vec<Disk>,
    /// The NVRAM file (UEFI variables), when the domain has one as a file.
    pub nvram: Option<PathBuf>,
    pub template: TemplateState,
    pub clone: Option<CloneOrigin>,
    /// The steps tpl tools applied, oldest first; the last [`crate::meta::MAX_HISTORY`].
    pub history: Vec<Step>,
    /// What `tpl-clone --ready` saw of a started clone: its addresses and the host keys
    /// its SSH server presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<Ready>,
}

/// A started clone as `tpl-clone --ready` found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ready {
    /// Its IPv4 addresses, the first interface's first.
    pub addresses: Vec<std::net::Ipv4Addr>,
    /// Where they were read: `lease` (libvirt's DHCP), `agent` (the guest agent), `arp`.
    pub source: String,
    /// Its SSH host keys, as `ssh-keyscan` printed them (`TYPE BASE64`), with their
    /// SHA-256 fingerprints: a `known_hosts` line is an address and the key.
    pub host_keys: Vec<HostKey>,
}

/// One SSH host key a clone presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostKey {
    pub key: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// libvirt's run state of a domain, in virsh's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum State {
    #[serde(rename = "no state")]
    NoState,
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "idle")]
    Idle,
    #[serde(rename = "paused")]
    Paused,
    #[serde(rename = "in shutdown")]
    InShutdown,
    #[serde(rename = "shut off")]
    ShutOff,
    #[serde(rename = "crashed")]
    Crashed,
    #[serde(rename = "pmsuspended")]
    PmSuspended,
}

impl State {
    /// virsh's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::NoState => "no state",
            State::Running => "running",
            State::Idle => "idle",
            State::Paused => "paused",
            State::InShutdown => "in shutdown",
            State::ShutOff => "shut off",
            State::Crashed => "crashed",
            State::PmSuspended => "pmsuspended",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `<disk>` of the domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Disk {
    pub target: String,
    pub device: Device,
    /// The source type.
    pub kind: DiskKind,
    pub path: Option<PathBuf>,
    pub format: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    /// The domain's own file: a writable file disk (not a CD-ROM, not read-only, not
    /// shareable), or a clone's seed. What tpl-lock locks, tpl-clone copies (not a seed:
    /// each clone gets its own), `tpl-rename --disks` renames and tpl-rm removes.
    #[serde(default)]
    pub own: bool,
    /// The images under `path`, nearest first, read from the qcow2 headers; for an RBD
    /// disk its parent chain (`rbd:POOL/IMAGE@SNAP`, qemu's notation).
    pub backing: Vec<BackingImage>,
    /// Where an RBD disk's image is (`kind` is `rbd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdSource>,
}

/// An RBD disk's source: `<source protocol='rbd' name='POOL/IMAGE'>` with its monitors
/// and cephx user and secret, and the snapshot it is pointed at (a locked template).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RbdSource {
    pub pool: String,
    /// The RADOS namespace (`POOL/NS/IMAGE`); empty for the pool's default one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub image: String,
    pub snapshot: Option<String>,
    /// The monitors as `HOST:PORT` (`HOST` alone when no port is given).
    pub hosts: Vec<String>,
    /// The cephx user (`<auth username=…>`).
    pub user: Option<String>,
    /// The UUID of the libvirt secret holding the user's key.
    pub secret: Option<String>,
}

impl RbdSource {
    /// `POOL/IMAGE` or `POOL/NS/IMAGE`, as libvirt's `name` has it.
    pub fn name(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}/{}", self.pool, self.image)
        } else {
            format!("{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }
}

impl std::fmt::Display for RbdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rbd:{}", self.name())?;
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// What a disk is to the guest (`<disk device=…>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Disk,
    Cdrom,
    Floppy,
    Lun,
}

/// Where a disk's data is (`<disk type=…>`; `rbd` for a network disk on Ceph RBD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    File,
    Block,
    Dir,
    /// A network disk of another protocol than RBD (nbd, iscsi, …).
    Network,
    /// An RBD image (`<disk type='network'>` with `<source protocol='rbd'>`).
    Rbd,
    Volume,
    Nvme,
    Vhostuser,
    Vhostvdpa,
    /// A type this version does not know.
    #[serde(other)]
    Other,
}

impl DiskKind {
    /// Whether a disk of this kind lives in a volume tpl can treat as a domain's own (see
    /// [`crate::volume`]): the one rule every tool applies. A new backend adds its kind
    /// here and a variant there.
    pub fn is_volume(self) -> bool {
        matches!(self, DiskKind::File | DiskKind::Rbd)
    }

    pub fn parse(s: &str) -> DiskKind {
        match s {
            "file" => DiskKind::File,
            "block" => DiskKind::Block,
            "dir" => DiskKind::Dir,
            "network" => DiskKind::Network,
            "rbd" => DiskKind::Rbd,
            "volume" => DiskKind::Volume,
            "nvme" => DiskKind::Nvme,
            "vhostuser" => DiskKind::Vhostuser,
            "vhostvdpa" => DiskKind::Vhostvdpa,
            _ => DiskKind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskKind::File => "file",
            DiskKind::Block => "block",
            DiskKind::Dir => "dir",
            DiskKind::Network => "network",
            DiskKind::Rbd => "rbd",
            DiskKind::Volume => "volume",
            DiskKind::Nvme => "nvme",
            DiskKind::Vhostuser => "vhostuser",
            DiskKind::Vhostvdpa => "vhostvdpa",
            DiskKind::Other => "other",
        }
    }
}

impl Device {
    pub fn parse(s: &str) -> Device {
        match s {
            "cdrom" => Device::Cdrom,
            "floppy" => Device::Floppy,
            "lun" => Device::Lun,
            _ => Device::Disk,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackingImage {
    pub path: PathBuf,
    /// The format the overlay names for it; `None` when the overlay leaves it to probing.
    pub format: Option<String>,
}

/// What tpl knows of the domain as a template (from our metadata).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TemplateState {
    pub generalized: Option<Generalized>,
    pub locked: bool,
    pub locked_at: Option<String>,
    pub immutable: bool,
    /// The protected snapshot a locked template's RBD disks point at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Generalized {
    pub at: String,
    pub method: Method,
    /// The tool and version that did it, e.g. `virt-sysprep 1.48.2`.
    pub tool: Option<String>,
    pub operations: Vec<String>,
    pub hostname: Option<String>,
}

/// How a domain was generalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Method {
    /// By tpl-generalize, with virt-sysprep.
    #[serde(rename = "virt-sysprep")]
    VirtSysprep,
    /// By the user inside the guest (Windows: sysprep), recorded with --sealed-externally.
    #[serde(rename = "external")]
    External,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::VirtSysprep => "virt-sysprep",
            Method::External => "external",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "virt-sysprep" => Some(Method::VirtSysprep),
            "external" => Some(Method::External),
            _ => None,
        }
    }
}

/// Where a clone came from (from our metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloneOrigin {
    pub template_uuid: String,
    pub template_name: String,
    pub mode: CloneMode,
    pub at: String,
    /// The clone's NoCloud seed (a small read-only vfat disk labelled `cidata`): its own
    /// file, removed and renamed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<PathBuf>,
    /// Its fixed address, reserved for its MAC in a libvirt network's DHCP: its own,
    /// released when it is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<Reserved>,
}

/// A host entry tpl-clone made in a libvirt network's DHCP for a clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reserved {
    pub network: String,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
}

/// A linked clone (overlays on the template's images) or a full one (its own copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    Linked,
    Full,
}

impl CloneMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneMode::Linked => "linked",
            CloneMode::Full => "full",
        }
    }

    pub fn parse(s: &str) -> Option<CloneMode> {
        match s {
            "linked" => Some(CloneMode::Linked),
            "full" => Some(CloneMode::Full),
            _ => None,
        }
    }
}

/// One step a tool applied to the domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    pub tool: String,
    pub at: String,
    pub detail: String,
}

/// What a tool needs of an input record to find its domain: a record on stdin may be a
/// full [`Record`] from an earlier step or something as small as `{"name":"VM"}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DomainRef {
    pub uuid: Option<String>,
    pub name: Option<String>,
    /// The connection the record came from: compared with the tool's, never used.
    pub uri: Option<String>,
    /// The input line it came from (0 for a command-line argument), for messages.
    #[serde(skip)]
    pub line: usize,
}

impl DomainRef {
    pub fn by_arg(arg: &str) -> Self {
        DomainRef {
            name: Some(arg.to_string()),
            ..Default::default()
        }
    }

    /// How messages name the domain before it has been looked up.
    pub fn label(&self) -> String {
        crate::text::shown(
            self.name
                .as_deref()
                .or(self.uuid.as_deref())
                .unwrap_or_default(),
        )
    }

    /// Refuse a record that came from another connection than `uri` (exit 2): acting on
    /// it here could touch another domain of the same name, and connecting to it would let
    /// the input choose what runs (a `qemu+ext://` URI runs a command).
    pub fn check_uri(&self, uri: &str) -> Result<()> {
        match self.uri.as_deref().filter(|u| !u.is_empty()) {
            Some(u) if u != uri => Err(Error::usage(
                format!(
                    "record on stdin line {} is for connection '{}'",
                    self.line,
                    crate::text::shown(u)
                ),
                format!(
                    "this run uses '{}' (-c, else LIBVIRT_DEFAULT_URI, else {}); a record \
                     never chooses the connection: run the tool with -c for that one",
                    crate::text::shown(uri),
                    crate::uri::DEFAULT_URI
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Parse one line of stdin as a record. `lineno` (1-based) goes into the message.
pub fn parse_line(line: &str, lineno: usize) -> Result<DomainRef> {
    let bad = |why: String| Error::usage(format!("invalid record on stdin line {lineno}"), why);
    let mut r: DomainRef = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
    let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
    if empty(&r.uuid) && empty(&r.name) {
        return Err(bad("it has neither \"uuid\" nor \"name\"".into()));
    }
    // No libvirt name, UUID or URI holds a NUL, and libvirt's C API cannot even be asked.
    for (key, v) in [("uuid", &r.uuid), ("name", &r.name), ("uri", &r.uri)] {
        if v.as_deref().is_some_and(|v| v.contains('\0')) {
            return Err(bad(format!("its \"{key}\" contains a NUL character")));
        }
    }
    r.line = lineno;
    Ok(r)
}

/// One line of input: its text, or why it cannot be used.
enum Line {
    Text(Vec<u8>),
    TooLong(usize),
}

/// Read one line of at most `max` bytes from `input` (without its newline). A longer line
/// is consumed up to its newline without being kept, and reported with its length.
/// None at the end of the input.
fn read_line(input: &mut impl BufRead, max: usize) -> std::io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let mut total = 0usize;
    let mut any = false;
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (used, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let data = &chunk[..if done { used - 1 } else { used }];
        total += data.len();
        if total <= max {
            buf.extend_from_slice(data);
        } else {
            buf = Vec::new();
        }
        input.consume(used);
        if done {
            break;
        }
    }
    Ok(match (any, total > max) {
        (false, _) => None,
        (true, true) => Some(Line::TooLong(total)),
        (true, false) => Some(Line::Text(buf)),
    })
}

/// The records on a reader, one per non-blank line, each parsed or its error. A line that
/// is not UTF-8 or longer than [`MAX_LINE`] is reported and reading goes on; any other
/// read error (stdin a directory, EIO) is reported once and ends the input, since reading
/// again fails again.
pub fn read_records(input: impl BufRead) -> impl Iterator<Item = Result<DomainRef>> {
    read_records_max(input, MAX_LINE)
}

fn read_records_max(
    mut input: impl BufRead,
    max: usize,
) -> impl Iterator<Item = Result<DomainRef>> {
    let mut lineno = 0usize;
    let mut broken = false;
    std::iter::from_fn(move || loop {
        if broken {
            return None;
        }
        lineno += 1;
        let line = match read_line(&mut input, max) {
            Ok(None) => return None,
            Ok(Some(l)) => l,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                lineno -= 1;
                continue;
            }
            Err(e) => {
                broken = true;
                return Some(Err(Error::usage(
                    format!("cannot read stdin line {lineno}"),
                    e.to_string(),
                )));
            }
        };
        let text = match line {
            Line::TooLong(n) => {
                return Some(Err(Error::usage(
                    format!("invalid record on stdin line {lineno}"),
                    format!("it is {n} bytes long; a record is at most {max} bytes"),
                )))
            }
            Line::Text(t) => t,
        };
        let Ok(text) = String::from_utf8(text) else {
            return Some(Err(Error::usage(
                format!("invalid record on stdin line {lineno}"),
                "it is not UTF-8",
            )));
        };
        if text.trim().is_empty() {
            continue;
        }
        return Some(parse_line(&text, lineno));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_minimal_and_full_records() {
        let input = "{\"name\":\"VM\"}\n\n{\"uuid\":\"u\",\"name\":\"x\",\"extra\":[1]}\n";
        let got: Vec<_> = read_records(input.as_bytes())
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(got[0].name.as_deref(), Some("VM"));
        assert_eq!(got[1].uuid.as_deref(), Some("u"));
        assert_eq!((got[0].line, got[1].line), (1, 3));
        assert_eq!(got.len(), 2);
        // The last line needs no newline.
        let got: Vec<_> = read_records("{\"name\":\"a\"}".as_bytes()).collect();
        assert!(got.len() == 1 && got[0].is_ok());
    }

    #[test]
    fn malformed_line_names_its_number() {
        let input = "{\"name\":\"VM\"}\n{not json\n";
        let got: Vec<_> = read_records(input.as_bytes()).collect();
        let err = got[1].as_ref().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("stdin line 2"), "{err}");
    }

    #[test]
    fn record_without_identity_is_refused() {
        for line in [
            "{}",
            "{\"name\":\"\"}",
            "[1]",
            "\"VM\"",
            "{\"name\":5}",
            "{\"name\":\"a\\u0000b\"}",
            "{\"name\":\"a\",\"uri\":\"\\u0000\"}",
        ] {
            let err = parse_line(line, 7).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{line}");
            assert!(err.to_string().contains("line 7"));
        }
    }

    #[test]
    fn a_read_error_that_repeats_is_reported_once() {
        // What `tpl-lock < /` reads: EISDIR, every time.
        let dir = std::fs::File::open("/").unwrap();
        let got: Vec<_> = read_records(std::io::BufReader::new(dir)).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap_err().exit_code(), 2);
        // A line that is not UTF-8 is one bad line among good ones.
        let input: &[u8] = b"\xff\xfe\n{\"name\":\"VM\"}\n";
        let got: Vec<_> = read_records(input).collect();
        assert!(got[0].is_err() && got[1].is_ok());
    }

    #[test]
    fn an_overlong_line_is_refused_and_the_next_one_read() {
        let mut input = format!("{{\"name\":\"{}\"}}\n", "x".repeat(5000)).into_bytes();
        input.extend_from_slice(b"{\"name\":\"ok\"}\n");
        // A small buffer: the long line arrives in many pieces, as from a pipe.
        let r = std::io::BufReader::with_capacity(64, &input[..]);
        let got: Vec<_> = read_records_max(r, 1000).collect();
        assert_eq!(got.len(), 2);
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("5011 bytes long"), "{e}");
        assert_eq!(got[1].as_ref().unwrap().name.as_deref(), Some("ok"));
    }

    #[test]
    fn a_record_of_another_connection_is_refused_not_followed() {
        let r = parse_line(
            "{\"name\":\"X\",\"uri\":\"qemu+ext:///system?command=/tmp/x.sh\"}",
            4,
        )
        .unwrap();
        let e = r.check_uri("qemu:///system").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let m = e.to_string();
        assert!(m.contains("line 4") && m.contains("qemu+ext") && m.contains("qemu:///system"));
        let same = parse_line("{\"name\":\"X\",\"uri\":\"qemu:///system\"}", 1).unwrap();
        assert!(same.check_uri("qemu:///system").is_ok());
        assert!(DomainRef::by_arg("X").check_uri("test:///default").is_ok());
    }

    #[test]
    fn closed_sets_are_fixed_strings() {
        let j = |v: &dyn erased::Ser| v.json();
        assert_eq!(j(&State::ShutOff), "\"shut off\"");
        assert_eq!(j(&CloneMode::Linked), "\"linked\"");
        assert_eq!(j(&Method::VirtSysprep), "\"virt-sysprep\"");
        assert_eq!(j(&Device::Cdrom), "\"cdrom\"");
        assert_eq!(j(&DiskKind::Network), "\"network\"");
        let k: DiskKind = serde_json::from_str("\"something-new\"").unwrap();
        assert_eq!(k, DiskKind::Other);
    }

    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap()
            }
        }
    }
}

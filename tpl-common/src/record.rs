//! The JSON Lines record every tool reads and writes, and the reader of records on stdin.

use std::io::BufRead;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the record shape; bumped when a field changes meaning.
pub const SCHEMA: u32 = 1;

/// A domain as it is after a step, re-read from libvirt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub schema: u32,
    pub uri: String,
    pub name: String,
    pub uuid: String,
    /// libvirt's state in virsh's words: "shut off", "running", "paused", …
    pub state: String,
    pub disks: Vec<Disk>,
    pub nvram: Option<PathBuf>,
    pub template: TemplateState,
    pub clone: Option<CloneOrigin>,
    pub history: Vec<Step>,
}

/// One `<disk>` of the domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub target: String,
    /// `disk`, `cdrom`, `floppy` or `lun`.
    pub device: String,
    /// The source type: `file`, `block`, `network`, `volume`, …
    pub kind: String,
    pub path: Option<PathBuf>,
    pub format: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    /// The images under `path`, nearest first, read from the qcow2 headers.
    pub backing: Vec<BackingImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackingImage {
    pub path: PathBuf,
    /// The format the overlay names for it; `None` when the overlay leaves it to probing.
    pub format: Option<String>,
}

/// What tpl knows of the domain as a template (from our metadata).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplateState {
    pub generalized: Option<Generalized>,
    pub locked: bool,
    pub locked_at: Option<String>,
    pub immutable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generalized {
    pub at: String,
    /// `virt-sysprep`, or `external` when the user sealed the guest themselves (Windows).
    pub method: String,
    /// The tool and version that did it, e.g. `virt-sysprep 1.48.2`.
    pub tool: Option<String>,
    pub operations: Vec<String>,
    pub hostname: Option<String>,
}

/// Where a clone came from (from our metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneOrigin {
    pub template_uuid: String,
    pub template_name: String,
    /// `linked` or `full`.
    pub mode: String,
    pub at: String,
}

/// One step a tool applied to the domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub uri: Option<String>,
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
        self.name
            .clone()
            .or_else(|| self.uuid.clone())
            .unwrap_or_default()
    }
}

/// Parse one line of stdin as a record. `lineno` (1-based) goes into the message.
pub fn parse_line(line: &str, lineno: usize) -> Result<DomainRef> {
    let bad = |why: String| Error::usage(format!("invalid record on stdin line {lineno}"), why);
    let r: DomainRef = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
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
    Ok(r)
}

/// The records on a reader, one per non-blank line, each parsed or its error.
/// A line that is not UTF-8 is reported and reading goes on; any other read error (stdin
/// a directory, EIO) is reported once and ends the input, since reading again fails again.
pub fn read_records(input: impl BufRead) -> impl Iterator<Item = Result<DomainRef>> {
    let mut broken = false;
    input
        .lines()
        .enumerate()
        .map_while(move |(i, l)| {
            if broken {
                return None;
            }
            broken = l
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::InvalidData);
            Some((i, l))
        })
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(i, l)| match l {
            Ok(l) => parse_line(&l, i + 1),
            Err(e) => Err(Error::usage(
                format!("cannot read stdin line {}", i + 1),
                e.to_string(),
            )),
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
        assert_eq!(got.len(), 2);
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
}

//! The user's input to a seed, checked: public key files, their own cloud-config, a user name; and the SHA-256 fingerprint of a public key.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use ssh_key::authorized_keys::Entry;
use ssh_key::HashAlg;

use super::SeedError;
use crate::text::shown;

/// The largest public key file read (an `authorized_keys` of a few hundred keys fits).
pub const MAX_KEY_FILE: u64 = 1 << 20;
/// The largest user-data file read: cloud-init sets no limit on NoCloud, but a larger
/// file is a disk image or a log named by mistake, not a cloud-config.
pub const MAX_USER_DATA: u64 = 16 << 20;
/// The longest user name (useradd's limit).
pub const MAX_USER_NAME: usize = 32;

/// One OpenSSH public key line, checked, as the user wrote it: `TYPE BASE64 [COMMENT]`,
/// possibly after `authorized_keys` options. The seed carries the line itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyLine {
    line: String,
    algorithm: String,
    fingerprint: String,
}

impl PublicKeyLine {
    /// The line, trimmed.
    pub fn as_str(&self) -> &str {
        &self.line
    }

    /// The key's algorithm as OpenSSH names it (`ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-nistp256`…).
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// The key's fingerprint as `ssh-keygen -l` shows it: `SHA256:` and unpadded base64.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The key on `line` (trimmed), or why it is not one.
    fn parse(line: &str) -> Result<Self, String> {
        if let Some(c) = line.chars().find(|c| c.is_control() && *c != '\t') {
            return Err(format!("it holds the control character {c:?}"));
        }
        let entry: Entry = line.parse().map_err(|e: ssh_key::Error| {
            format!("it is not TYPE BASE64 [COMMENT] as a .pub file holds ({e})")
        })?;
        let key = entry.public_key();
        Ok(PublicKeyLine {
            line: line.to_string(),
            algorithm: key.algorithm().as_str().to_string(),
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        })
    }
}

impl FromStr for PublicKeyLine {
    type Err = SeedError;

    /// A public key line given as a value rather than in a file.
    fn from_str(line: &str) -> Result<Self, SeedError> {
        PublicKeyLine::parse(line.trim()).map_err(|why| {
            SeedError::invalid(format!("invalid public key \"{}\"", shown(line)), why)
        })
    }
}

impl fmt::Display for PublicKeyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

/// The OpenSSH-style SHA-256 fingerprint (`SHA256:` and unpadded base64, as `ssh-keygen
/// -lf` prints it) of a public key line: `TYPE BASE64 [COMMENT]`, as in a `.pub` file or
/// a host key file, optionally after `authorized_keys` options.
pub fn fingerprint_sha256(public_key_line: &str) -> Result<String, SeedError> {
    Ok(public_key_line.parse::<PublicKeyLine>()?.fingerprint)
}

/// Up to `limit` bytes of a file; `None` when it holds more. Read, not stat'ed, so that a
/// pipe (`--ssh-key <(…)`) works too.
fn read_limited(path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    File::open(path)?.take(limit + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= limit).then_some(buf))
}

/// Refuse a key file whose PEM-style markers show another kind of key: any private key
/// ([`SeedError::PrivateKey`]), or a public key in a format other than OpenSSH's, with the
/// command that converts it.
fn refuse_other_key_formats(path: &Path, text: &str) -> Result<(), SeedError> {
    for line in text.lines().map(str::trim) {
        let private = (line.starts_with("-----BEGIN ") && line.contains("PRIVATE KEY"))
            || line.starts_with("PuTTY-User-Key-File-");
        if private {
            return Err(SeedError::PrivateKey {
                path: path.to_path_buf(),
            });
        }
        let other = match line {
            "---- BEGIN SSH2 PUBLIC KEY ----" => Some(("an RFC 4716 (SSH2) public key", "")),
            "-----BEGIN PUBLIC KEY-----" => Some(("a PKCS#8 PEM public key", " -m PKCS8")),
            "-----BEGIN RSA PUBLIC KEY-----" => Some(("a PEM RSA public key", " -m PEM")),
            _ => None,
        };
        if let Some((kind, format)) = other {
            return Err(SeedError::NotPublicKey {
                path: path.to_path_buf(),
                line: None,
                why: format!(
                    "it is {kind}; `ssh-keygen -i{format} -f FILE` prints it in OpenSSH's format"
                ),
            });
        }
    }
    Ok(())
}

/// The public keys in an OpenSSH public key file (`ssh-keygen`'s `.pub`, or an
/// `authorized_keys`: one key a line, blank lines and `#` comments allowed). A private
/// key is refused, and said to be; so is anything else, naming the file and the line.
pub fn read_public_keys(path: impl AsRef<Path>) -> Result<Vec<PublicKeyLine>, SeedError> {
    let path = path.as_ref();
    let not_key = |line: Option<usize>, why: String| SeedError::NotPublicKey {
        path: path.to_path_buf(),
        line,
        why,
    };
    let bytes = read_limited(path, MAX_KEY_FILE)
        .map_err(|source| SeedError::Unreadable {
            what: "public key file",
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| not_key(None, format!("it is larger than {MAX_KEY_FILE} bytes")))?;
    // A binary file is refused without a look inside: a DER private key is one.
    let text = String::from_utf8(bytes)
        .map_err(|_| not_key(None, "it is binary, and a public key file is text".into()))?;
    refuse_other_key_formats(path, &text)?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = PublicKeyLine::parse(line)
            .map_err(|why| not_key(Some(i + 1), format!("line {}: {why}", i + 1)))?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(not_key(
            None,
            "it holds no key, only blank lines and comments".into(),
        ));
    }
    Ok(keys)
}

/// Where and why a text is not a cloud-config.
#[derive(Debug)]
pub(super) struct NotCloudConfig {
    pub line: Option<usize>,
    pub why: String,
}

/// What cloud-init needs of a user's cloud-config: UTF-8 text whose first line is
/// `#cloud-config` (cloud-init picks the part's handler by that start; trailing blanks
/// and a CR are tolerated), then one YAML document that is a mapping (cloud-init refuses
/// an empty one). Returns the mapping.
pub(super) fn cloud_config(text: &str) -> Result<yaml_serde::Mapping, NotCloudConfig> {
    let at = |line: Option<usize>, why: String| NotCloudConfig { line, why };
    if text.starts_with('\u{feff}') {
        return Err(at(
            Some(1),
            "it starts with a byte order mark; cloud-init wants #cloud-config as its first \
             bytes: save it without one"
                .into(),
        ));
    }
    let first = text.split('\n').next().unwrap_or("");
    if first.trim_end_matches([' ', '\t', '\r']) != "#cloud-config" {
        let why = if text.is_empty() {
            "it is empty; its first line must be #cloud-config".to_string()
        } else {
            format!(
                "its first line must be exactly #cloud-config, as cloud-init requires, and it \
                 is \"{}\"",
                shown(first)
            )
        };
        return Err(at(Some(1), why));
    }
    let yaml_error = |e: yaml_serde::Error| match e.location() {
        Some(l) => {
            // The message names the place too: once is enough.
            let msg = e.to_string().replacen(
                &format!(" at line {} column {}", l.line(), l.column()),
                "",
                1,
            );
            // PyYAML would keep the last of a duplicate key; YAML says keys are unique,
            // and a setting the user wrote would silently not count.
            let why = match msg.split_once("duplicate entry with key ") {
                Some((place, key)) => format!(
                    "the mapping {}starting on line {} has the key {key} twice",
                    match place.trim_end_matches([':', ' ']) {
                        "" => String::new(),
                        place => format!("{place} "),
                    },
                    l.line()
                ),
                None => format!("line {}, column {}: {msg}", l.line(), l.column()),
            };
            at(Some(l.line()), why)
        }
        None => at(None, e.to_string()),
    };
    let mut documents = yaml_serde::Deserializer::from_str(text);
    let value = match documents.next() {
        Some(first) => yaml_serde::Value::deserialize(first).map_err(yaml_error)?,
        None => yaml_serde::Value::Null,
    };
    if documents.next().is_some() {
        return Err(at(
            None,
            "it holds more than one YAML document (a `---` line after the first); cloud-init \
             reads one"
                .into(),
        ));
    }
    let kind = match value {
        yaml_serde::Value::Mapping(m) => return Ok(m),
        yaml_serde::Value::Null => {
            return Err(at(
                None,
                "it holds no settings after #cloud-config; cloud-init refuses an empty one".into(),
            ))
        }
        yaml_serde::Value::Sequence(_) => "a list",
        yaml_serde::Value::String(_) => "a string",
        yaml_serde::Value::Number(_) => "a number",
        yaml_serde::Value::Bool(_) => "a boolean",
        yaml_serde::Value::Tagged(_) => "a tagged value",
    };
    Err(at(
        None,
        format!(
            "its YAML is {kind}, and a cloud-config is a mapping of settings (`key: value` lines)"
        ),
    ))
}

/// The user's own cloud-config: UTF-8 text whose first line is `#cloud-config` (trailing
/// blanks and a CR tolerated), then one YAML document that is a mapping, as cloud-init
/// needs. Anything else is refused naming the file, with the line (and column) of a YAML
/// error.
pub fn read_user_data(path: impl AsRef<Path>) -> Result<String, SeedError> {
    let path = path.as_ref();
    let refuse = |line: Option<usize>, why: String| SeedError::UserData {
        path: path.to_path_buf(),
        line,
        why,
    };
    let bytes = read_limited(path, MAX_USER_DATA)
        .map_err(|source| SeedError::Unreadable {
            what: "user-data file",
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| refuse(None, format!("it is larger than {MAX_USER_DATA} bytes")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        refuse(
            Some(line),
            format!("line {line} is not UTF-8, as cloud-init reads it"),
        )
    })?;
    cloud_config(&text).map_err(|e| refuse(e.line, e.why))?;
    Ok(text)
}

/// Check the name of the user a seed creates: useradd's portable rule (`[a-z_][a-z0-9_-]*`,
/// at most 32 bytes), and neither `root` (tpl would lock its password, and cloud-init's
/// `disable_root`, on by default, puts a command refusing the login before root's keys:
/// log in as a user and use sudo) nor `default` (cloud-init's name for the distribution's
/// default user: leave the user out to give it the keys).
pub fn check_user_name(name: &str) -> Result<(), SeedError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_USER_NAME {
        Some("it is longer than 32 bytes, useradd's limit")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        Some("it must start with a lower-case letter or '_'")
    } else if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
    {
        Some("use lower-case letters, digits, '_' and '-'")
    } else if name == "root" {
        Some(
            "a seed does not set up root: tpl would lock its password, and cloud-init makes \
             root's keys print 'log in as another user'; name your own user, which gets sudo",
        )
    } else if name == "default" {
        Some(
            "cloud-init reads 'default' as the distribution's default user; leave the user \
             out to give the keys to that one",
        )
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(SeedError::invalid(
            format!("invalid user name \"{}\"", shown(name)),
            why,
        )),
    }
}

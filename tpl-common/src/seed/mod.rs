//! A clone's first-boot seed: the user, SSH keys, user-data and address the user asked for, as a small vfat image that cloud-init's NoCloud datasource and tpl's own first-boot action both read.
//!
//! # The image
//!
//! A vfat (FAT12, FAT16 when the user-data is large) file system labelled `cidata`, built
//! in memory by [`build`]: no mkfs, genisoimage or xorriso. vfat rather than ISO 9660
//! because it attaches as a plain read-only virtio disk on any machine type (an ISO wants
//! a CD-ROM drive on an IDE, SATA or SCSI bus) and because `fatfs` writes it in-process;
//! the same spec always gives the same bytes (timestamps are 1980-01-01, the volume
//! serial comes from the instance id).
//!
//! The label is lower case. cloud-init looks for a vfat or iso9660 file system labelled
//! `cidata`: before 19.1 only that exact string (`find_devs_with("LABEL=cidata")`), since
//! then also `CIDATA` and a boot-sector label (`DataSourceNoCloud._get_devices`, commit
//! b76714c "Change DataSourceNoCloud to ignore file system label's case"); its
//! ds-identify, which decides whether cloud-init runs at all, accepts `cidata` and
//! `CIDATA` (`dscheck_NoCloud`, `fslabel="cidata CIDATA"`). `cidata` is the one every
//! version takes.
//!
//! # Files for cloud-init
//!
//! NoCloud requires `meta-data` and `user-data` and reads `network-config` when present
//! (`pp2d_kwargs` in `DataSourceNoCloud._get_data`). tpl writes their YAML as JSON, which
//! is YAML whose every string is quoted: PyYAML, which cloud-init uses, follows YAML 1.1,
//! where an unquoted MAC address such as `52:54:00:12:34:56` is a base-60 integer and
//! `no` is false.
//!
//! - `meta-data`: `instance-id`, `local-hostname`, and the keys under `public-keys`
//!   (cloud-init's ssh module gives those to the distribution's default user when there
//!   is one, and to root behind `disable_root`'s "log in as …" command). The
//!   SMBIOS serial tpl-clone writes (`ds=nocloud;h=…;i=…`) carries the same two values
//!   and wins where they differ (`_merge_new_seed` merges the seed under what came
//!   first), so the caller gives both the same.
//! - `user-data`: a `#cloud-config` that sets `hostname` (unless the user's own sets
//!   `fqdn`) and, with a user, creates it
//!   (`users`: name, the keys as `ssh_authorized_keys`, `sudo: ALL=(ALL) NOPASSWD:ALL`,
//!   `shell: /bin/bash`, `lock_passwd: true`); without one, the keys go to the default
//!   user through the top-level `ssh_authorized_keys`. tpl does not add cloud-init's
//!   `default` entry to `users`: a user who asked for their own account gets that one
//!   (their own user-data can list `default` and it is kept).
//!
//!   When the user gave their own cloud-config, `user-data` is a MIME multipart: their
//!   document unchanged first (so cloud-init's own YAML reads it: nothing is lost or
//!   reinterpreted, comments and YAML 1.1 values included), then tpl's with
//!   `Merge-Type: dict(no_replace,recurse_list)+list(append)+str()` (cloud-init's
//!   "merging user-data sections"; `CloudConfigPartHandler._extract_mergers`). So every
//!   setting of theirs stays as they wrote it, tpl's settings fill in what they did not
//!   set, and lists both have (`users`, `ssh_authorized_keys`) get tpl's entries after
//!   theirs. Two cases could not keep both and are refused: a `users` (or, without a
//!   user, `ssh_authorized_keys`) that is not a list, an empty one included, and a
//!   `users` entry for the same user name (cloud-init would keep theirs and drop tpl's
//!   keys).
//! - `network-config`, only for a static address (DHCP: no file, cloud-init's default):
//!   version 2, one ethernet matched by its MAC address, `dhcp4: false`, the
//!   address/prefix, a route `0.0.0.0/0` via the gateway, the name servers.
//!
//! # Files for tpl's first-boot action (`tpl-*`)
//!
//! A guest without cloud-init gets the same facts from files a POSIX shell reads with
//! `mount`, `cat` and `read`, no YAML, in the root directory beside cloud-init's (the seed
//! has no directories: see `vfat.rs`). Each is text ending in a newline, and absent when
//! its fact was not asked for:
//!
//! - `tpl-hostname`: the host name.
//! - `tpl-instance-id`: the instance id (the same as the SMBIOS serial's `i=`).
//! - `tpl-user`: the user to create (with sudo, its home, the keys), absent without one.
//! - `tpl-authorized_keys`: the public key lines, as `~/.ssh/authorized_keys` takes them.
//! - `tpl-network`: a static address as `KEY=VALUE` lines, absent for DHCP: `MAC`
//!   (lower case, `:`-separated), `ADDRESS`, `PREFIX`, `NETMASK`, `GATEWAY` (absent
//!   without one), `DNS` (comma-separated, absent without any). No value holds a space,
//!   a quote or a shell metacharacter, so the file can be read by
//!   `while IFS='=' read -r key value` or sourced with `.`.
//!
//! The first-boot action finds the seed with `blkid -t LABEL=cidata -o device` (or
//! `findfs LABEL=cidata`) and mounts it read-only with `-t vfat`.

mod content;
mod input;
mod vfat;

#[cfg(test)]
mod tests;

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::text::shown_path;

pub use content::{seed_files, SeedFile};
pub use input::{
    check_user_name, fingerprint_sha256, read_public_keys, read_user_data, PublicKeyLine,
    MAX_KEY_FILE, MAX_USER_DATA, MAX_USER_NAME,
};

/// The seed's file system label (see the module documentation for why lower case).
pub const LABEL: &str = "cidata";

/// What goes into one clone's seed. Build it from checked input ([`read_public_keys`],
/// [`read_user_data`]); [`build`] checks the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    /// The clone's host name (a DNS name, as [`crate::hostname`] checks).
    pub hostname: String,
    /// cloud-init's instance id: tpl-clone gives the clone's UUID.
    pub instance_id: String,
    /// A user to create with the keys and sudo; `None`: the keys go to the default user.
    pub user: Option<String>,
    /// Public keys that may log in.
    pub keys: Vec<PublicKeyLine>,
    /// The user's own `#cloud-config`, merged with tpl's.
    pub user_data: Option<String>,
    /// A static address; `None`: DHCP.
    pub network: Option<StaticNetwork>,
}

/// A static IPv4 address for the interface with this MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNetwork {
    /// The interface's MAC address, `52:54:00:12:34:56` (either case).
    pub mac: String,
    pub address: Ipv4Addr,
    /// The network's prefix length, 1 to 32.
    pub prefix: u8,
    /// The default route's gateway, inside the network.
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

/// Why a seed cannot be made. `what (why)` as docs/DESIGN.md's messages read; every
/// variant but [`SeedError::Image`] is bad input (exit 2, see [`SeedError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// A file the user named cannot be read: missing, not readable, a directory.
    #[error("cannot read the {what} '{}' ({source})", shown_path(path))]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The key file holds a private key.
    #[error(
        "'{}' is a private key (a private key is never copied into a seed: pass the public \
         key, the .pub file ssh-keygen wrote beside it)",
        shown_path(path)
    )]
    PrivateKey { path: PathBuf },
    /// The key file is not OpenSSH public keys; `line` is the first bad line, if one is.
    #[error("'{}' is not an OpenSSH public key file ({why})", shown_path(path))]
    NotPublicKey {
        path: PathBuf,
        line: Option<usize>,
        why: String,
    },
    /// The user-data file is not a `#cloud-config` YAML mapping; `line` (1-based, the
    /// `#cloud-config` line being line 1) where YAML says what is wrong.
    #[error("'{}' is not a cloud-config user-data file ({why})", shown_path(path))]
    UserData {
        path: PathBuf,
        line: Option<usize>,
        why: String,
    },
    /// A value of the spec (or a public key line, a user name) is not acceptable.
    #[error("{what} ({why})")]
    Invalid { what: String, why: String },
    /// Writing the image in memory failed: a bug, not the input.
    #[error("cannot make the seed image ({0})")]
    Image(#[source] io::Error),
}

impl SeedError {
    fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        SeedError::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }

    /// The exit code of docs/DESIGN.md: 2 for bad input, 1 for [`SeedError::Image`].
    pub fn exit_code(&self) -> u8 {
        match self {
            SeedError::Image(_) => 1,
            _ => 2,
        }
    }
}

/// The seed image of `spec`: a vfat file system labelled [`LABEL`] holding
/// [`seed_files`], as the bytes of a raw disk image (a multiple of 512 bytes, as small as
/// its files allow). The same spec gives the same bytes.
pub fn build(spec: &SeedSpec) -> Result<Vec<u8>, SeedError> {
    let files = seed_files(spec)?;
    vfat::image(&files, vfat::volume_id(&spec.instance_id)).map_err(SeedError::Image)
}

impl From<SeedError> for crate::error::Error {
    /// Bad input is a usage error (exit 2), with the file and what to do; an image that
    /// cannot be written in memory is a failure (exit 1).
    fn from(e: SeedError) -> Self {
        use crate::error::Error;
        match e {
            SeedError::Unreadable { what, path, source } => Error::usage(
                format!("cannot read the {what} '{}'", shown_path(&path)),
                source.to_string(),
            ),
            SeedError::PrivateKey { path } => Error::usage(
                format!("'{}' is a private key", shown_path(&path)),
                "a private key is never copied into a seed: pass the public key, the .pub \
                 file ssh-keygen wrote beside it",
            ),
            SeedError::NotPublicKey { path, line, why } => Error::usage(
                format!(
                    "'{}'{} is not an OpenSSH public key",
                    shown_path(&path),
                    line.map(|l| format!(" line {l}")).unwrap_or_default()
                ),
                why,
            ),
            SeedError::UserData { path, line, why } => Error::usage(
                format!(
                    "'{}'{} is not cloud-config user-data",
                    shown_path(&path),
                    line.map(|l| format!(" line {l}")).unwrap_or_default()
                ),
                why,
            ),
            SeedError::Invalid { what, why } => Error::usage(what, why),
            SeedError::Image(e) => Error::failed("cannot make the seed image", e.to_string()),
        }
    }
}

//! A clone's first-boot seed: the user, SSH keys, user-data and address the user asked for, as a small vfat image that cloud-init's NoCloud datasource and tpl's own first-boot action both read.
//!
//! This far: the user's input, checked. Public key files ([`read_public_keys`]: a private
//! key is refused and said to be), their own cloud-config ([`read_user_data`]: a
//! `#cloud-config` YAML mapping, refused with the line of a YAML error), the name of the
//! user to create ([`check_user_name`]), and the SHA-256 fingerprint of a public key
//! ([`fingerprint_sha256`]), as `ssh-keygen -l` prints it.

mod input;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

use crate::text::shown_path;

pub use input::{
    check_user_name, fingerprint_sha256, read_public_keys, read_user_data, PublicKeyLine,
    MAX_KEY_FILE, MAX_USER_DATA, MAX_USER_NAME,
};

/// Why a seed cannot be made. `what (why)` as docs/DESIGN.md's messages read; every
/// variant is bad input (exit 2, see [`SeedError::exit_code`]).
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
    /// A value (a public key line, a user name) is not acceptable.
    #[error("{what} ({why})")]
    Invalid { what: String, why: String },
}

impl SeedError {
    fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        SeedError::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }

    /// The exit code of docs/DESIGN.md: 2, bad input.
    pub fn exit_code(&self) -> u8 {
        2
    }
}

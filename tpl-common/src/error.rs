//! The one error type of the tools, and how each kind maps to the exit codes of docs/DESIGN.md.

use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure a tool reports. The variant decides the exit code; the text is
/// `<what> (<why>)` so that `tpl-x: error: <text>` reads as docs/DESIGN.md asks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or bad input: exit 2.
    #[error("{what} ({why})")]
    Usage { what: String, why: String },
    /// A safety check refused the operation: exit 3.
    #[error("{what} ({why})")]
    Refused { what: String, why: String },
    /// The operation itself failed: exit 1.
    #[error("{what} ({why})")]
    Failed { what: String, why: String },
    /// libvirt said no: exit 1 (lookups that find nothing become `Usage`).
    #[error("{what} ({source})")]
    Libvirt {
        what: String,
        #[source]
        source: virt::error::Error,
    },
    /// A file operation failed: exit 1.
    #[error("{what} '{}' ({source})", crate::text::shown_path(path))]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// SIGINT, SIGTERM or SIGHUP asked the run to stop; the tool cleans up and then dies by
    /// the signal (see [`crate::signals`], which depends on this module, not the reverse).
    #[error("interrupted by {} (stopping; what was unfinished is undone)", signal_name(*signal))]
    Interrupted { signal: i32 },
    /// stdout was closed by its reader: the tool stops quietly and dies by SIGPIPE.
    #[error("stdout was closed")]
    StdoutClosed,
}

impl Error {
    pub fn usage(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Usage {
            what: what.into(),
            why: why.into(),
        }
    }
    pub fn refused(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Refused {
            what: what.into(),
            why: why.into(),
        }
    }
    pub fn failed(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Failed {
            what: what.into(),
            why: why.into(),
        }
    }
    pub fn libvirt(what: impl Into<String>, source: virt::error::Error) -> Self {
        Error::Libvirt {
            what: what.into(),
            source,
        }
    }
    pub fn io(what: impl Into<String>, path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// The process exit code for this error (docs/DESIGN.md: 1 failed, 2 usage/bad input, 3 refused).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage { .. } => 2,
            Error::Refused { .. } => 3,
            Error::Failed { .. } | Error::Libvirt { .. } | Error::Io { .. } => 1,
            // What a shell reports for a process killed by the signal, in case the tool
            // cannot die by it.
            Error::Interrupted { signal } => 128u8.saturating_add(*signal as u8),
            Error::StdoutClosed => 128 + libc::SIGPIPE as u8,
        }
    }
}

/// Shorthand for wrapping `io::Result`s with what was being done and to which path.
pub trait IoContext<T> {
    fn ctx(self, what: &str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(what, path, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, what: &str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(what, path, io::Error::from(e)))
    }
}

/// A signal's name for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_design() {
        assert_eq!(Error::usage("a", "b").exit_code(), 2);
        assert_eq!(Error::refused("a", "b").exit_code(), 3);
        assert_eq!(Error::failed("a", "b").exit_code(), 1);
        let e = Error::io(
            "cannot open",
            "/x",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().starts_with("cannot open '/x' ("), "{e}");
    }
}

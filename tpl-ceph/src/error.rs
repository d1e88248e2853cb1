//! Errors: one variant per errno that callers act on, each carrying what was
//! being done (with the image spec) and the exact errno.

use std::fmt;

/// What was being done when librados/librbd failed, e.g.
/// `unprotect snapshot tpl/base@tpl`. Shown first in every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op(pub String);

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an operation failed, in the caller's terms (what to do about it).
/// `None` when the errno says it all.
pub type Hint = Option<&'static str>;

/// Every error of this crate. Errno-based variants carry the errno
/// (`Error::errno`) and name the operation and image; messages read
/// `clone tpl/base@tpl -> tpl/web1: already exists (EEXIST: File exists)`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// ENOENT: the pool, image, snapshot or key does not exist.
    #[error("{op}: not found ({}){}", errno_text(libc::ENOENT), hint_text(.hint))]
    NotFound { op: Op, hint: Hint },

    /// EEXIST: the target name is taken (nothing was overwritten).
    #[error("{op}: already exists ({}){}", errno_text(libc::EEXIST), hint_text(.hint))]
    AlreadyExists { op: Op, hint: Hint },

    /// EBUSY: the snapshot has children, the snapshot is protected, or the
    /// image is open (watched) elsewhere.
    #[error("{op}: busy ({}){}", errno_text(libc::EBUSY), hint_text(.hint))]
    Busy { op: Op, hint: Hint },

    /// ENOTEMPTY: the image still has snapshots.
    #[error("{op}: not empty ({}){}", errno_text(libc::ENOTEMPTY), hint_text(.hint))]
    NotEmpty { op: Op, hint: Hint },

    /// EPERM / EACCES: cephx refused (caps, wrong key), or the operation is
    /// not allowed in this state.
    #[error("{op}: permission denied ({}){}", errno_text(*errno), hint_text(.hint))]
    PermissionDenied { op: Op, errno: i32, hint: Hint },

    /// ETIMEDOUT: the cluster did not answer in time.
    #[error("{op}: timed out ({}){}", errno_text(libc::ETIMEDOUT), hint_text(.hint))]
    TimedOut { op: Op, hint: Hint },

    /// The progress callback asked to stop (or panicked); the operation
    /// ended early (a flatten can be run again to finish).
    #[error("{op}: cancelled")]
    Cancelled { op: Op },

    /// Any other errno.
    #[error("{op}: {}{}", errno_text(*errno), hint_text(.hint))]
    Os { op: Op, errno: i32, hint: Hint },

    /// A name that cannot be passed to Ceph (empty, NUL, `/` or `@` where
    /// they are separators). Nothing was sent to the cluster.
    #[error("invalid {kind} name {name:?}: {why}")]
    InvalidName {
        kind: &'static str,
        name: String,
        why: &'static str,
    },

    /// An argument that does not fit the operation (e.g. a spec without
    /// the snapshot the operation needs). Nothing was sent to the cluster.
    #[error("{op}: {why}")]
    InvalidArgument { op: Op, why: String },

    /// A reply from the cluster that could not be understood.
    #[error("{op}: unexpected reply from the cluster: {why}")]
    BadReply { op: Op, why: String },

    /// librbd (and the librados it needs) cannot be loaded on this host.
    #[error(
        "Ceph's client libraries cannot be loaded ({why}): RBD disks need librbd1 and \
         librados2 on this host (Debian: apt install librbd1)"
    )]
    Unavailable { why: String },
}

impl Error {
    /// Builds the variant for `errno` (positive).
    pub(crate) fn from_errno(errno: i32, op: impl Into<String>, hint: Hint) -> Error {
        let op = Op(op.into());
        match errno {
            libc::ENOENT => Error::NotFound { op, hint },
            libc::EEXIST => Error::AlreadyExists { op, hint },
            libc::EBUSY => Error::Busy { op, hint },
            libc::ENOTEMPTY => Error::NotEmpty { op, hint },
            libc::EPERM | libc::EACCES => Error::PermissionDenied { op, errno, hint },
            libc::ETIMEDOUT => Error::TimedOut { op, hint },
            libc::ECANCELED => Error::Cancelled { op },
            _ => Error::Os { op, errno, hint },
        }
    }

    /// The errno, for errors that came from librados/librbd.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::NotFound { .. } => Some(libc::ENOENT),
            Error::AlreadyExists { .. } => Some(libc::EEXIST),
            Error::Busy { .. } => Some(libc::EBUSY),
            Error::NotEmpty { .. } => Some(libc::ENOTEMPTY),
            Error::PermissionDenied { errno, .. } | Error::Os { errno, .. } => Some(*errno),
            Error::TimedOut { .. } => Some(libc::ETIMEDOUT),
            Error::Cancelled { .. } => Some(libc::ECANCELED),
            Error::InvalidName { .. }
            | Error::InvalidArgument { .. }
            | Error::BadReply { .. }
            | Error::Unavailable { .. } => None,
        }
    }

    /// The operation (with the image spec) that failed, if any.
    pub fn op(&self) -> Option<&str> {
        match self {
            Error::NotFound { op, .. }
            | Error::AlreadyExists { op, .. }
            | Error::Busy { op, .. }
            | Error::NotEmpty { op, .. }
            | Error::PermissionDenied { op, .. }
            | Error::TimedOut { op, .. }
            | Error::Cancelled { op }
            | Error::Os { op, .. }
            | Error::InvalidArgument { op, .. }
            | Error::BadReply { op, .. } => Some(&op.0),
            Error::InvalidName { .. } | Error::Unavailable { .. } => None,
        }
    }
}

/// `EBUSY: Device or resource busy`
pub fn errno_text(errno: i32) -> String {
    let msg = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; the symbolic name says more
    let msg = msg.split(" (os error").next().unwrap_or(&msg).to_string();
    match errno_name(errno) {
        Some(name) => format!("{name}: {msg}"),
        None => format!("errno {errno}: {msg}"),
    }
}

fn hint_text(hint: &Hint) -> String {
    hint.map(|h| format!(": {h}")).unwrap_or_default()
}

/// Symbolic names of the errnos librados/librbd return in practice.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::EDEADLK => "EDEADLK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::ENOLINK => "ENOLINK",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EDQUOT => "EDQUOT",
        libc::ECANCELED => "ECANCELED",
        libc::ERESTART => "ERESTART",
        libc::EILSEQ => "EILSEQ",
        _ => return None,
    })
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_message_names_op_errno_and_hint() {
        let e = Error::from_errno(
            libc::EBUSY,
            "unprotect snapshot tpl/base@tpl",
            Some("the snapshot has children (linked clones)"),
        );
        assert!(matches!(e, Error::Busy { .. }));
        assert_eq!(e.errno(), Some(libc::EBUSY));
        assert_eq!(
            e.to_string(),
            "unprotect snapshot tpl/base@tpl: busy (EBUSY: Device or resource busy): \
             the snapshot has children (linked clones)"
        );
    }

    #[test]
    fn unknown_errno_keeps_the_number() {
        let e = Error::from_errno(libc::EXDEV, "clone a/b@s -> c/d", None);
        assert_eq!(e.errno(), Some(libc::EXDEV));
        assert_eq!(
            e.to_string(),
            "clone a/b@s -> c/d: EXDEV: Invalid cross-device link"
        );
        let e = Error::from_errno(4095, "x", None);
        assert!(e.to_string().starts_with("x: errno 4095: "), "{e}");
    }

    #[test]
    fn every_errno_variant_round_trips() {
        for errno in [
            libc::ENOENT,
            libc::EEXIST,
            libc::EBUSY,
            libc::ENOTEMPTY,
            libc::EPERM,
            libc::EACCES,
            libc::ETIMEDOUT,
            libc::ECANCELED,
            libc::EINVAL,
        ] {
            let e = Error::from_errno(errno, "op", None);
            assert_eq!(e.errno(), Some(errno), "{e:?}");
            assert_eq!(e.op(), Some("op"));
        }
    }
}

//! File operations with the guarantees the tools promise: renames that never overwrite, durable directories, the immutable attribute and reflinks.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::IFlags;

use nix::fcntl::{renameat2, RenameFlags};

use crate::error::{Error, IoContext, Result};

/// Rename `from` to `to`, failing (exit 3) instead of replacing an existing `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Err(Error::refused(
            format!("cannot rename '{}' to '{}'", from.display(), to.display()),
            "the target file already exists; nothing is ever overwritten",
        )),
        Err(e) => Err(e).ctx(&format!("cannot rename '{}' to", from.display()), to),
    }
}

/// fsync a directory so renames and new entries in it survive a crash.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("cannot sync directory", dir)
}

/// Whether an error means "this file system has no such attribute" rather than a failure.
/// File systems without the ioctl answer ENOTTY; some answer EOPNOTSUPP or EINVAL.
pub fn attr_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
    )
}

/// Whether the file has the immutable attribute (`chattr +i`: no write, rename, unlink or
/// chmod, even by root).
pub fn is_immutable(f: &File) -> io::Result<bool> {
    Ok(rustix::fs::ioctl_getflags(f)?.contains(IFlags::IMMUTABLE))
}

/// Set or clear the immutable attribute; returns whether it changed anything. Setting it
/// needs CAP_LINUX_IMMUTABLE (root).
pub fn set_immutable(f: &File, on: bool) -> io::Result<bool> {
    let flags = rustix::fs::ioctl_getflags(f)?;
    let new = if on {
        flags | IFlags::IMMUTABLE
    } else {
        flags - IFlags::IMMUTABLE
    };
    if new == flags {
        return Ok(false);
    }
    rustix::fs::ioctl_setflags(f, new)?;
    Ok(true)
}

/// FICLONE: make `dst` share all of `src`'s extents (btrfs, xfs with reflink, …).
pub fn reflink(dst: &File, src: &File) -> io::Result<()> {
    Ok(rustix::fs::ioctl_ficlone(dst, src)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert_eq!(std::fs::read(&b).unwrap(), b"b");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"a");
        fsync_dir(d.path()).unwrap();
    }

    #[test]
    fn immutable_is_read_or_unsupported() {
        // tmpfs has no immutable attribute; ext4 (the root here) has it. Either way the
        // answer is a clean yes/no or an error the callers know as "unsupported".
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "x").unwrap();
        let f = File::open(&p).unwrap();
        match is_immutable(&f) {
            Ok(on) => assert!(!on),
            Err(e) => assert!(attr_unsupported(&e), "{e}"),
        }
        // No reflink between a file and itself on ext4; the error is an io::Error.
        let g = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let _ = reflink(&g, &f);
    }
}

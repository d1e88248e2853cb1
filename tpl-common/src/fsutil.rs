//! File operations with the guarantees the tools promise: renames that never overwrite, and durable directories.

use std::fs::File;
use std::path::Path;

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
}

//! Where tpl keeps what is not a domain's: locks and the journals of unfinished changes, private to the user the tools run as.
//!
//! Every tool on a host must agree on the directory: the locks and journals in it are
//! how they coordinate, and a journal in it is obeyed by the next run of any tool (it
//! removes and moves files). So it is the user's own: directories are made 0700 and
//! files 0600 whatever the umask, a journal is obeyed only when it is a regular file
//! owned by this user that nobody else may write ([`trusted`]), and there is no shared
//! fallback such as /tmp, where another user could plant one.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// `$TPL_STATE_DIR`, else /var/lib/tpl for root, else `$XDG_STATE_HOME/tpl`, else
/// `~/.local/state/tpl` (the home from `$HOME`, else from the user database). None when
/// none of them can be told.
fn resolve() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("TPL_STATE_DIR") {
        return Some(d);
    }
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return Some(PathBuf::from("/var/lib/tpl"));
    }
    // The XDG base directory rules ignore a relative path.
    if let Some(d) = var("XDG_STATE_HOME").filter(|d| d.is_absolute()) {
        return Some(d.join("tpl"));
    }
    var("HOME")
        .filter(|h| h.is_absolute())
        .or_else(|| {
            nix::unistd::User::from_uid(euid)
                .ok()
                .flatten()
                .map(|u| u.dir)
                .filter(|h| h.is_absolute() && h != Path::new("/"))
        })
        .map(|h| h.join(".local/state/tpl"))
}

fn resolved() -> &'static Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(resolve)
}

/// Refuse a run that cannot tell where its state lives (called before a tool does
/// anything that uses it).
pub fn require() -> Result<()> {
    match resolved() {
        Some(_) => Ok(()),
        None => Err(Error::usage(
            "cannot tell where to keep tpl's locks and journals",
            "neither TPL_STATE_DIR, XDG_STATE_HOME nor HOME is set, and this user has no \
             home directory; set one of them (tpl never falls back to a directory other \
             users can write, such as /tmp)",
        )),
    }
}

/// The state directory (see [`resolve`]). A run that cannot tell it was refused by
/// [`require`] before it got here; the path returned then cannot be created.
pub fn state_dir() -> PathBuf {
    resolved()
        .clone()
        .unwrap_or_else(|| PathBuf::from("/nonexistent/tpl-state"))
}

/// Make `dir` and its missing parents, each 0700 (the umask can only take bits away).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Why a file in the state directory is not to be obeyed: not a regular file (a link,
/// a directory), owned by another user, or writable by others than its owner. None when
/// it is this user's own.
pub fn untrusted(path: &Path) -> Option<String> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot stat it: {e}")),
    };
    let euid = nix::unistd::geteuid().as_raw();
    if !m.file_type().is_file() {
        Some("it is not a regular file".into())
    } else if m.uid() != euid {
        Some(format!(
            "it is owned by uid {}, not by the user the tools run as (uid {euid})",
            m.uid()
        ))
    } else if m.mode() & 0o022 != 0 {
        Some(format!(
            "others may write it (mode {:04o})",
            m.mode() & 0o7777
        ))
    } else {
        None
    }
}

/// The per-domain lock files (`<uuid>.lock`).
pub fn lock_dir() -> PathBuf {
    state_dir().join("locks")
}

/// tpl-clone's journals.
pub fn clone_journal_dir() -> PathBuf {
    state_dir().join("clone-journal")
}

/// The journals of `tpl-rename --disks`.
pub fn rename_journal_dir() -> PathBuf {
    state_dir().join("rename-journal")
}

/// The journals of tpl-rm.
pub fn remove_journal_dir() -> PathBuf {
    state_dir().join("remove-journal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_dirs_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let p = d.path().join("a/b");
        let r = create_private_dir(&p);
        nix::sys::stat::umask(old);
        r.unwrap();
        for q in [d.path().join("a"), p] {
            assert_eq!(fs::metadata(&q).unwrap().mode() & 0o777, 0o700, "{q:?}");
        }
    }

    #[test]
    fn only_own_files_nobody_else_writes_are_trusted() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("j");
        fs::write(&f, "").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(untrusted(&f), None);
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(untrusted(&f).unwrap().contains("others may write"));
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(untrusted(&l).unwrap().contains("not a regular file"));
        assert!(untrusted(&d.path().join("none")).is_some());
    }
}

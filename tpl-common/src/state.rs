//! Where tpl keeps what is not a domain's: locks and the journals of unfinished changes.

use std::path::{Path, PathBuf};

/// `$TPL_STATE_DIR`, else /var/lib/tpl for root, else `$XDG_STATE_HOME/tpl` (or
/// ~/.local/state/tpl). Every tool on a host must agree on it: the locks and journals in it
/// are how they coordinate.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TPL_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/tpl");
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("tpl")
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

//! Which hypervisor a run connects to when the user does not say: virsh's rule.

/// What virsh connects to when neither `-c` nor `LIBVIRT_DEFAULT_URI` says: the system
/// daemon for root, the user's own session daemon for anyone else.
pub const DEFAULT_URI: &str = "qemu:///system (root), else qemu:///session";

/// The URI to connect to: the option, else `LIBVIRT_DEFAULT_URI`, else virsh's default
/// (qemu:///system for root, qemu:///session for other users).
pub fn resolve_uri(opt: Option<&str>) -> String {
    opt.map(String::from)
        .or_else(|| {
            std::env::var("LIBVIRT_DEFAULT_URI")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| {
            if nix::unistd::geteuid().is_root() {
                "qemu:///system".into()
            } else {
                "qemu:///session".into()
            }
        })
}

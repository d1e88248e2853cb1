//! This host and its processes, as the names of what a run leaves behind carry them.

use std::path::Path;
use std::sync::OnceLock;

/// This host's name as it goes into the names of what a run leaves behind (temporary
/// files and images, locality probes): the characters a file name and their parsing are
/// safe with, at most 64 of them. With the pid, it tells a dead run of this host.
pub fn host_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let h = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        sanitize_host(&h)
    })
}

fn sanitize_host(h: &str) -> String {
    let t: String = h
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if t.is_empty() {
        "localhost".into()
    } else {
        t
    }
}

/// Whether a process with this pid exists at all (unsure means alive).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_as_they_go_into_file_names() {
        assert_eq!(sanitize_host("a b/c-d.e"), "a_b_c-d.e");
        assert_eq!(sanitize_host(""), "localhost");
    }
}

//! The one host name rule of the tools, and the host name a clone gets from its domain name.
//!
//! A host name here is a DNS name: dot-separated labels of ASCII letters, digits and '-',
//! none empty, none starting or ending with '-', at most 63 characters each and 253 in all.
//! The kernel (and systemd) take at most 64: a longer one gives the kernel its first
//! label, as cloud-init does from the same SMBIOS serial (see [`kernel_hostname`]; the
//! first-boot script does the same in the guest).

use crate::error::{Error, Result};
use crate::text;

/// The longest host name (a fully qualified DNS name).
pub const MAX_HOSTNAME: usize = 253;
/// The longest label of a host name.
pub const MAX_LABEL: usize = 63;
/// The longest host name the kernel takes.
pub const MAX_KERNEL_HOSTNAME: usize = 64;

/// Why `h` is not a host name, if it is not.
pub fn hostname_problem(h: &str) -> Option<&'static str> {
    if h.is_empty() || h.len() > MAX_HOSTNAME {
        return Some("it must be 1 to 253 characters long");
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL {
            return Some("each dot-separated part must be 1 to 63 characters long");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a part starts or ends with '-'");
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return Some("it holds a character other than letters, digits, '-' and '.'");
        }
    }
    None
}

/// Check a host name the user gave.
pub fn validate_hostname(h: &str) -> Result<()> {
    match hostname_problem(h) {
        None => Ok(()),
        Some(why) => Err(Error::usage(
            format!("invalid host name \"{}\"", text::shown(h)),
            format!("{why}; use letters, digits, '-' and '.'"),
        )),
    }
}

/// What the kernel gets of a valid host name: the name when it fits, else its first label.
pub fn kernel_hostname(h: &str) -> &str {
    if h.len() <= MAX_KERNEL_HOSTNAME {
        h
    } else {
        h.split('.').next().unwrap_or(h)
    }
}

/// The host name a clone gets by default from its (valid) domain name. A name that is a
/// host name already is kept; any other is made one (lower case, other characters as '-')
/// with a short hash of the whole name appended, so `web_1` and `web-1` do not become
/// the same host. Always a valid host name.
pub fn hostname_for(name: &str) -> String {
    if hostname_problem(name).is_none() {
        return name.to_string();
    }
    let suffix = format!("-{:06x}", fnv1a(name.as_bytes()) & 0xff_ffff);
    let mapped: String = name
        .chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() => c.to_ascii_lowercase(),
            '.' => '.',
            _ => '-',
        })
        .collect();
    let mut labels: Vec<String> = mapped
        .split('.')
        .map(|l| l.trim_matches('-'))
        .filter(|l| !l.is_empty())
        .map(|l| l.chars().take(MAX_LABEL).collect::<String>())
        .collect();
    if labels.is_empty() {
        labels.push("clone".into());
    }
    // The hash goes on the first label, the one the kernel keeps.
    let first = &mut labels[0];
    first.truncate(MAX_LABEL - suffix.len());
    let trimmed = first.trim_end_matches('-').len();
    first.truncate(trimmed);
    if first.is_empty() {
        first.push_str("clone");
    }
    first.push_str(&suffix);
    labels.join(".")
}

/// FNV-1a, 64 bits: a stable hash (the same name gives the same host name on every run).
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let long_fqdn = format!("{}.example.org", "a".repeat(53));
        for ok in [
            "TplVM",
            "web-1",
            "a.b.example.com",
            &"a".repeat(63),
            &long_fqdn,
        ] {
            assert!(validate_hostname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a b",
            "a_b",
            "ä",
            "a;b",
            &"a".repeat(64),
            &format!("a.{}", "b".repeat(252)),
        ] {
            assert_eq!(validate_hostname(bad).unwrap_err().exit_code(), 2, "{bad}");
        }
        assert_eq!(kernel_hostname("web-1.example.org"), "web-1.example.org");
        let fqdn65 = format!("web-1.{}.org", "d".repeat(55));
        assert_eq!(kernel_hostname(&fqdn65), "web-1");
    }

    #[test]
    fn names_become_distinct_valid_host_names() {
        assert_eq!(hostname_for("web-1"), "web-1");
        assert_eq!(hostname_for("db1.example.org"), "db1.example.org");
        let a = hostname_for("web_1");
        assert!(a.starts_with("web-1-") && a.len() == 12, "{a}");
        assert_ne!(a, hostname_for("web-1"));
        assert_ne!(a, hostname_for("web 1"));
        let long = hostname_for(&"x".repeat(64));
        assert!(
            hostname_problem(&long).is_none() && long.len() == 63,
            "{long}"
        );
        assert!(hostname_for("_").starts_with("clone-"));
        assert!(hostname_for("日本").starts_with("clone-"));
        assert_eq!(hostname_for("web_1"), a, "stable");
    }
}

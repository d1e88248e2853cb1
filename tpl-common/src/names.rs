//! Validation of every name a tool creates (domains, and the files named after them).

use crate::error::{Error, Result};

/// The longest name accepted, in bytes: long enough for any sane domain name,
/// short enough to stay a valid file name with a suffix appended.
pub const MAX_NAME_BYTES: usize = 64;

/// Check a name the user wants a tool to create. `what` says what the name is
/// for ("new domain name", "clone name") so the message can say it.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let rule = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!(
            "it is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        ))
    } else if name.starts_with('.') {
        Some("it starts with '.'".to_string())
    } else if name.starts_with('-') {
        Some("it starts with '-'".to_string())
    } else if name.contains('/') {
        Some("it contains '/'".to_string())
    } else {
        name.chars()
            .find(|c| c.is_control())
            .map(|c| format!("it contains the control character {c:?}"))
    };
    match rule {
        Some(why) => Err(Error::usage(format!("invalid {what} {name:?}"), why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(name: &str) -> String {
        match validate_name("name", name) {
            Err(Error::Usage { why, .. }) => why,
            other => panic!("{name:?} accepted: {other:?}"),
        }
    }

    #[test]
    fn accepts_ordinary_names() {
        for n in ["VM", "TplUbuntu", "web-01", "a.b_c", "ü", &"x".repeat(64)] {
            validate_name("name", n).unwrap();
        }
    }

    #[test]
    fn each_rule_says_which() {
        assert_eq!(why(""), "it is empty");
        assert!(why(&"x".repeat(65)).contains("65 bytes"));
        assert_eq!(why("a/b"), "it contains '/'");
        assert_eq!(why("../x"), "it starts with '.'");
        assert_eq!(why(".hidden"), "it starts with '.'");
        assert_eq!(why("-rf"), "it starts with '-'");
        assert!(why("a\nb").contains("control character"));
        assert!(why("a\0b").contains("control character"));
    }
}

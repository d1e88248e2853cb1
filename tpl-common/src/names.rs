//! Validation of every name a tool creates (domains, and the files named after them).

use crate::error::{Error, Result};
use crate::text;

/// The longest name accepted, in bytes: long enough for any sane domain name,
/// short enough to stay a valid file name with a suffix appended.
pub const MAX_NAME_BYTES: usize = 64;

/// Why a name cannot be created, if it cannot: the first rule it breaks.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!(
            "it is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Some("it starts with '.'".into());
    }
    if name.starts_with('-') {
        return Some("it starts with '-'".into());
    }
    if name.contains('/') {
        return Some("it contains '/'".into());
    }
    // A name that looks like another on the screen (`rt-\u{200b}tpl` and `rt-tpl`), or that
    // turns the text after it around (U+202E), is refused outright, by its code point.
    name.chars().find_map(|c| {
        text::hidden_kind(c).map(|kind| format!("it contains U+{:04X}, {kind}", c as u32))
    })
}

/// Check a name the user wants a tool to create. `what` says what the name is
/// for ("new domain name", "clone name") so the message can say it.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    match name_problem(name) {
        Some(why) => Err(Error::usage(
            format!("invalid {what} \"{}\"", text::shown(name)),
            why,
        )),
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
        for n in [
            "VM",
            "TplUbuntu",
            "web-01",
            "a.b_c",
            "ü",
            "my vm",
            &"x".repeat(64),
        ] {
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
        assert!(why("a\nb").contains("U+000A, a control character"));
        assert!(why("a\0b").contains("control character"));
        assert!(why("rt-\u{200b}tpl").contains("U+200B, an invisible Unicode format"));
        assert!(why("x\u{202e}y").contains("U+202E"));
        assert!(why("a\u{2028}b").contains("U+2028, a Unicode line or paragraph separator"));
        assert!(why("a\u{a0}b").contains("U+00A0, a Unicode space other than"));
    }
}

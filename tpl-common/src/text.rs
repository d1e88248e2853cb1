//! The one way text from outside (names, paths, UUIDs, a child's output) reaches a person: invisible and control characters escaped, long values and long lists cut with a count.
//!
//! [`crate::cli::say`] passes every line it writes through [`escape`], so no message can
//! carry a newline, a terminal escape or a bidi override to the screen whatever it quotes;
//! [`shown`], [`shown_path`] and [`list`] also keep a hostile value or a list of 500
//! dependents from turning one message into a page.

use std::borrow::Cow;
use std::fmt::{Display, Write};
use std::path::Path;

use unicode_general_category::{get_general_category, GeneralCategory};

/// How many characters of a name or other input value a message shows.
pub const MAX_SHOWN: usize = 100;
/// How many characters of a path a message shows (paths are long legitimately).
pub const MAX_SHOWN_PATH: usize = 1024;
/// How many items of a list a message shows before "and N more".
pub const MAX_LISTED: usize = 10;

/// Why a character must not reach a terminal as it is, if it must not: control characters
/// (C0, C1, DEL), Unicode format characters (bidi overrides and isolates, zero-width
/// characters, soft hyphen, BOM), line and paragraph separators, and spaces other than
/// the plain space (no-break and other lookalike spaces).
pub fn hidden_kind(c: char) -> Option<&'static str> {
    if c.is_control() {
        return Some("a control character");
    }
    match get_general_category(c) {
        GeneralCategory::Format => Some("an invisible Unicode format character"),
        GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => {
            Some("a Unicode line or paragraph separator")
        }
        GeneralCategory::SpaceSeparator if c != ' ' => {
            Some("a Unicode space other than the plain space")
        }
        _ => None,
    }
}

/// Whether `c` is escaped on its way to a person.
pub fn is_hidden(c: char) -> bool {
    hidden_kind(c).is_some()
}

/// `s` with every hidden character written as an escape (`\n`, `\t`, `\u{202e}`); a string
/// without one is returned as it is.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_hidden(c) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// At most `max` characters of `s`, escaped, with the length in bytes when it was cut.
fn cut(s: &str, max: usize) -> String {
    let mut out: String = escape(&s.chars().take(max).collect::<String>()).into_owned();
    if s.chars().nth(max).is_some() {
        let _ = write!(out, "… ({} bytes)", s.len());
    }
    out
}

/// A name, UUID or other value from the input as a message shows it: escaped, and cut
/// at [`MAX_SHOWN`] characters.
pub fn shown(s: &str) -> String {
    cut(s, MAX_SHOWN)
}

/// A path as a message shows it: escaped (a file name found while scanning a directory is
/// anyone's), not UTF-8 bytes replaced, and cut at [`MAX_SHOWN_PATH`] characters.
pub fn shown_path(p: &Path) -> String {
    cut(&p.to_string_lossy(), MAX_SHOWN_PATH)
}

/// Items joined with `sep`, at most [`MAX_LISTED`] of them, then "and N more".
pub fn list<T: Display>(items: impl IntoIterator<Item = T>, sep: &str) -> String {
    let mut out = String::new();
    let mut n = 0usize;
    for item in items {
        if n < MAX_LISTED {
            if n > 0 {
                out.push_str(sep);
            }
            let _ = write!(out, "{item}");
        }
        n += 1;
    }
    if n > MAX_LISTED {
        let _ = write!(out, "{sep}and {} more", n - MAX_LISTED);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_act_on() {
        assert_eq!(escape("web-1 ü'x"), "web-1 ü'x");
        assert_eq!(escape("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(escape("rt-\u{200b}tpl"), "rt-\\u{200b}tpl");
        assert_eq!(escape("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
        assert_eq!(escape("a\u{2028}b\u{a0}c"), "a\\u{2028}b\\u{a0}c");
        assert_eq!(escape("\u{85}\u{7f}\t"), "\\u{85}\\u{7f}\\t");
    }

    #[test]
    fn long_values_and_lists_are_cut_with_a_count() {
        let long = shown(&"x".repeat(300));
        assert!(long.starts_with(&"x".repeat(100)) && long.ends_with("… (300 bytes)"));
        assert_eq!(shown("short"), "short");
        let l = list((1..=500).map(|i| format!("c{i}")), "; ");
        assert!(
            l.starts_with("c1; c2;") && l.ends_with("c10; and 490 more"),
            "{l}"
        );
        assert_eq!(list(["a", "b"], ", "), "a, b");
        assert_eq!(list(Vec::<String>::new(), ", "), "");
        assert_eq!(
            shown_path(Path::new("/a/\u{1b}]0;x\u{7}.qcow2")),
            "/a/\\u{1b}]0;x\\u{7}.qcow2"
        );
    }
}

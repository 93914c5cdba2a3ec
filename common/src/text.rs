//! Text a peer chose (a Hub's revocation reason, a close reason), made safe to print.
//!
//! Audit records are JSON, escaped by their writer; stderr and a text log are not. A peer's
//! text printed there as it came could start a new line that looks like the Client's own
//! output (a forged audit line, for a collector that reads stderr with stdout), move the
//! cursor, or reorder what a reader sees (Unicode bidi controls). [`printable`] escapes every
//! such character as `\u{…}` (and a backslash as `\\`, so that no escape can be forged), and
//! [`from_peer`] bounds the length too.

use std::borrow::Cow;
use std::fmt::Write;

/// The most characters of a peer's text kept by [`from_peer`].
pub const PEER_TEXT_MAX: usize = 512;

/// Whether `c` must not reach a terminal or a line-oriented log as it is: control
/// characters (line breaks included), the Unicode line and paragraph separators, and the
/// bidirectional formatting characters.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with every character that could break or disguise a line escaped as `\u{…}`, and a
/// backslash as `\\`: otherwise a peer's literal `\u{a}` would read as an escaped line break.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || unsafe_char(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if unsafe_char(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A peer's bytes as text fit to print: UTF-8 (invalid sequences replaced), at most
/// [`PEER_TEXT_MAX`] characters (then `…`), and [`printable`].
pub fn from_peer(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let cut = match text.char_indices().nth(PEER_TEXT_MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.into_owned(),
    };
    printable(&cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_kept_as_it_is() {
        assert!(matches!(
            printable("stopped by the customer"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            from_peer("contract ended — é".as_bytes()),
            "contract ended — é"
        );
    }

    #[test]
    fn a_line_break_cannot_start_a_forged_line() {
        let forged = "x\n{\"side\":\"client\",\"event\":\"query\"}\r\u{1b}[2K";
        let out = from_peer(forged.as_bytes());
        assert!(!out.contains('\n') && !out.contains('\r') && !out.contains('\u{1b}'));
        assert_eq!(
            out,
            "x\\u{a}{\"side\":\"client\",\"event\":\"query\"}\\u{d}\\u{1b}[2K"
        );
    }

    #[test]
    fn a_backslash_is_escaped_so_that_no_escape_can_be_forged() {
        // A peer's literal `\u{a}` and an escaped line break read differently.
        assert_eq!(printable("a\\u{a}b"), "a\\\\u{a}b");
        assert_eq!(printable("a\nb"), "a\\u{a}b");
        assert_eq!(from_peer(b"C:\\dir"), "C:\\\\dir");
    }

    #[test]
    fn bidi_controls_and_separators_are_escaped() {
        assert_eq!(
            printable("a\u{202E}b\u{2028}c\u{2067}"),
            "a\\u{202e}b\\u{2028}c\\u{2067}"
        );
    }

    #[test]
    fn long_or_invalid_text_is_bounded_and_decoded() {
        let out = from_peer(&[b'a'; 10_000]);
        assert_eq!(out.chars().count(), PEER_TEXT_MAX + 1);
        assert!(out.ends_with('…'));
        assert_eq!(from_peer(&[0x66, 0xff, 0x6f]), "f\u{fffd}o");
    }
}

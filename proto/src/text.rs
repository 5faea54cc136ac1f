//! Node-supplied text on an operator's terminal. A plugin value, a stderr tail or an agent
//! version can hold escape sequences that move the cursor, rewrite lines or change the
//! window title; human-readable output passes every such string through [`printable`].
//! JSON output needs nothing: it is exact, and its escaping is the reader's business.

use std::borrow::Cow;

/// Whether a character can change what a terminal shows beyond printing itself: C0 and C1
/// controls, DEL, and the bidirectional overrides and isolates that reorder a line.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character written as an escape (`\u{1b}`); tabs and newlines
/// too, since one node's text must not break a table's rows. Borrowed when nothing changes.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`printable`], keeping newlines: for multi-line blocks (a stderr tail, a pretty value).
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && is_unsafe(c)) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(printable).collect::<Vec<_>>().join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_obeyed() {
        assert!(matches!(printable("web01 ok"), Cow::Borrowed(_)));
        assert_eq!(printable("\x1b]0;pwned\x07"), "\\u{1b}]0;pwned\\u{7}");
        assert_eq!(printable("a\rb\nc\td"), "a\\u{d}b\\u{a}c\\u{9}d");
        assert_eq!(printable("\u{9b}2J"), "\\u{9b}2J", "C1 CSI");
        assert_eq!(printable("x\u{202E}cod.exe"), "x\\u{202e}cod.exe");
        assert_eq!(printable("\u{7f}"), "\\u{7f}");
        assert_eq!(printable("naïve ✓"), "naïve ✓", "printable Unicode stays");
        assert_eq!(printable_lines("one\ntwo\x1b[2K"), "one\ntwo\\u{1b}[2K");
    }
}

//! Text from the guest (or from an image) made safe for the operator's terminal.
//!
//! A guest controls what its console and its commands print. Written raw to a terminal,
//! escape sequences in it can move the cursor, rewrite earlier lines (hiding what the
//! guest did), set the window title or, on some terminals, answer back as if typed. The
//! host prints such text through [`escape_controls`]: every control character but tab and
//! newline becomes a visible escape, and all other text, any UTF-8 included, is kept.

use std::borrow::Cow;
use std::fmt::Write as _;

/// True for the characters [`escape_controls`] rewrites: C0 controls but `\t` and `\n`,
/// DEL, and the C1 controls (U+0080 to U+009F; U+009B is a one-character CSI).
fn needs_escape(c: char) -> bool {
    c.is_control() && c != '\t' && c != '\n'
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `text` with its control characters, but `\t` and `\n`, written as visible escapes:
/// `\x1b` (ESC), `\r`, `\x7f` (DEL), `\u{9b}` (a C1 control). Borrowed when there is
/// nothing to escape. Text printed line by line keeps its lines; one that must stay on
/// one line has to be split first.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`escape_controls`] for bytes that may not be UTF-8: valid UTF-8 is kept (its controls
/// escaped), and each byte that is not part of it becomes `\xNN`.
pub fn escape_controls_bytes(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return escape_controls(text);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape_controls(chunk.valid()));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_become_visible_and_text_stays() {
        // Colour, cursor up and erase line, a title change ended by BEL, a C1 CSI.
        let hostile = "ok \x1b[31mred\x1b[0m\x1b[1A\x1b[2K\x1b]0;pwned\x07 \u{9b}31m";
        assert_eq!(
            escape_controls(hostile),
            "ok \\x1b[31mred\\x1b[0m\\x1b[1A\\x1b[2K\\x1b]0;pwned\\x07 \\u{9b}31m"
        );
        assert_eq!(
            escape_controls("back\rspace\x08\x7f"),
            "back\\rspace\\x08\\x7f"
        );
        // Tabs, newlines and UTF-8 text are kept, and cost no copy.
        let fine = "naïve\tcafé — 日本語 ✓\nline two";
        assert!(matches!(escape_controls(fine), Cow::Borrowed(s) if s == fine));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_escaped_too() {
        assert_eq!(
            escape_controls_bytes(b"a\xff\xfe\x1b[2Jz\xc3\xa9"),
            "a\\xff\\xfe\\x1b[2Jzé"
        );
        assert_eq!(escape_controls_bytes(b"plain\n"), "plain\n");
    }
}

//! Printing names that came from a layer so that they cannot forge output.
//!
//! # The scheme
//!
//! A name made only of bytes that print as themselves is written **raw**, unchanged. A name is
//! written **quoted** when it holds any of:
//!
//! * an ASCII control byte (`0x00`–`0x1f`) or DEL (`0x7f`);
//! * a byte that is not part of valid UTF-8;
//! * a C1 control character (U+0080–U+009F), a line or paragraph separator (U+2028, U+2029),
//!   a byte order mark (U+FEFF) or a bidirectional formatting character (U+061C, U+200E, U+200F,
//!   U+202A–U+202E, U+2066–U+2069), which terminals may act on or which reorder what is shown;
//! * a double quote as its first byte (so that a raw name never looks like a quoted one).
//!
//! A quoted name is a double-quoted string in the syntax of Go's `strconv.Quote` (and Rust's
//! string literals, except `\xNN` above 0x7f): `\a \b \t \n \v \f \r` for those controls,
//! `\\` and `\"` for backslash and quote, `\xNN` for every other control byte and for each
//! byte of invalid UTF-8, `\uNNNN` for the characters listed above, everything else as itself.
//! Go's `strconv.Unquote` (and [`unquote`]) turns it back into the exact bytes.
//!
//! So a reader tells the two apart by the first byte: `"` starts a quoted name, anything else is
//! raw. Paths printed by `graphctl changes` start with `/` when raw.

use std::borrow::Cow;
use std::fmt::Write as _;

/// True for the characters that are escaped as `\uNNNN` (see the module documentation).
fn is_hidden_char(c: char) -> bool {
    matches!(c,
        '\u{80}'..='\u{9f}'
        | '\u{061c}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{2028}'
        | '\u{2029}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}'
        | '\u{feff}')
}

/// True if `name` would be written quoted by [`quote_name`].
pub fn needs_quoting(name: &[u8]) -> bool {
    if name.first() == Some(&b'"') {
        return true;
    }
    match std::str::from_utf8(name) {
        Err(_) => true,
        Ok(s) => s.chars().any(|c| c.is_ascii_control() || is_hidden_char(c)),
    }
}

/// `name` as it is safe to print: unchanged (borrowed) when no byte needs escaping, else a
/// double-quoted, escaped string that [`unquote`] (or Go's `strconv.Unquote`) turns back into
/// exactly `name`. The result never holds a control character.
pub fn quote_name(name: &[u8]) -> Cow<'_, str> {
    if !needs_quoting(name) {
        // needs_quoting returned false, so this is valid UTF-8.
        if let Ok(s) = std::str::from_utf8(name) {
            return Cow::Borrowed(s);
        }
    }
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\x07' => out.push_str("\\a"),
                '\x08' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\x0b' => out.push_str("\\v"),
                '\x0c' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                c if c.is_ascii_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if is_hidden_char(c) => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out.push('"');
    Cow::Owned(out)
}

/// The bytes a name printed by [`quote_name`] stands for: a raw name is itself; a quoted one
/// is unescaped. `None` when `text` starts with `"` but is not a well-formed quoted string.
pub fn unquote(text: &str) -> Option<Vec<u8>> {
    let Some(body) = text.strip_prefix('"') else {
        return Some(text.as_bytes().to_vec());
    };
    let body = body.strip_suffix('"')?;
    let mut out = Vec::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {}
            '"' => return None,
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
        }
        let byte = match chars.next()? {
            'a' => 0x07,
            'b' => 0x08,
            't' => b'\t',
            'n' => b'\n',
            'v' => 0x0b,
            'f' => 0x0c,
            'r' => b'\r',
            '\\' => b'\\',
            '"' => b'"',
            'x' => {
                let hex: String = [chars.next()?, chars.next()?].iter().collect();
                u8::from_str_radix(&hex, 16).ok()?
            }
            'u' => {
                let hex: String = (0..4).map(|_| chars.next()).collect::<Option<_>>()?;
                let c = char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            _ => return None,
        };
        out.push(byte);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_are_unchanged() {
        for name in [
            "/etc/passwd",
            "/a b/c",
            "/ünïcödé/日本",
            "/back\\slash",
            "/a\"b",
            "/",
        ] {
            assert_eq!(quote_name(name.as_bytes()), name);
            assert!(matches!(quote_name(name.as_bytes()), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn controls_and_invalid_utf8_are_escaped() {
        let cases: &[(&[u8], &str)] = &[
            (b"/x\nD /etc/passwd", r#""/x\nD /etc/passwd""#),
            (b"/t\tab", r#""/t\tab""#),
            (b"/\x1b[31mred", r#""/\x1b[31mred""#),
            (b"/del\x7f", r#""/del\x7f""#),
            (b"/nul\x00", r#""/nul\x00""#),
            (b"/bad\xff\xfe", r#""/bad\xff\xfe""#),
            (b"/q\"\\\n", r#""/q\"\\\n""#),
            (b"\"quoted\"", r#""\"quoted\"""#),
            ("/rtl\u{202e}txt".as_bytes(), r#""/rtl\u202etxt""#),
            ("/c1\u{9b}".as_bytes(), r#""/c1\u009b""#),
        ];
        for (name, want) in cases {
            let got = quote_name(name);
            assert_eq!(got, *want, "{name:?}");
            assert!(!got.chars().any(|c| c.is_control()), "{got}");
            assert_eq!(unquote(&got).as_deref(), Some(*name));
        }
    }

    #[test]
    fn malformed_quoted_text_is_refused() {
        for text in [r#""abc"#, r#""a\q""#, r#""a\x1""#, r#""a"b""#, r#""\u12""#] {
            assert_eq!(unquote(text), None, "{text}");
        }
    }

    proptest! {
        #[test]
        fn round_trips_and_never_prints_a_control(name in proptest::collection::vec(any::<u8>(), 0..40)) {
            let q = quote_name(&name);
            prop_assert!(!q.chars().any(|c| c.is_control() || is_hidden_char(c)));
            prop_assert_eq!(unquote(&q), Some(name.clone()));
        }
    }
}

//! Names people read: which characters a name may hold, and how to show a
//! string that came from outside (a request, a token) without letting it
//! move the cursor, recolour a terminal or reorder a listing.

use std::borrow::Cow;
use std::fmt::Write;

/// Characters that draw nothing or change how their neighbours are drawn:
/// controls (C0, DEL, C1), every whitespace, the format characters
/// (Unicode category Cf: bidi embeddings, overrides and isolates,
/// zero-width spaces and joiners, the BOM, invisible operators, tags),
/// variation selectors, line and paragraph separators, and
/// noncharacters/private use that render as nothing useful.
pub fn is_invisible(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(c as u32,
            0x00AD                      // soft hyphen
            | 0x034F                    // combining grapheme joiner
            | 0x0600..=0x0605
            | 0x061C                    // arabic letter mark
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x115F..=0x1160           // hangul fillers
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F           // mongolian selectors and vowel separator
            | 0x200B..=0x200F           // zero-width space/non-joiner/joiner, LRM, RLM
            | 0x2028..=0x202E           // separators; bidi embeddings and overrides
            | 0x2060..=0x206F           // word joiner, invisible operators, bidi isolates
            | 0x3164                    // hangul filler
            | 0xFE00..=0xFE0F           // variation selectors
            | 0xFEFF                    // zero-width no-break space (BOM)
            | 0xFFA0
            | 0xFFF0..=0xFFFB           // interlinear annotation
            | 0x110BD | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF         // tags, variation selectors supplement
            | 0xE000..=0xF8FF           // private use
            | 0xF0000..=0x10FFFF
            | 0xFFFE..=0xFFFF)
}

/// Refuses a name that holds anything but visible characters, or is longer
/// than `max` bytes. The error shows the name escaped.
pub fn validate_visible(what: &str, name: &str, max: usize) -> Result<(), crate::error::Error> {
    if name.is_empty() {
        return Err(crate::error::Error::invalid(format!(
            "{what} must not be empty"
        )));
    }
    if name.len() > max {
        return Err(crate::error::Error::invalid(format!(
            "{what} '{}…' is {} bytes long: at most {max} are allowed",
            escaped(&name.chars().take(32).collect::<String>()),
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| is_invisible(*c)) {
        return Err(crate::error::Error::invalid(format!(
            "{what} '{}' contains {}: names may hold only visible characters \
             (no spaces, control, bidi or zero-width characters)",
            escaped(name),
            escape_char(c)
        )));
    }
    Ok(())
}

fn escape_char(c: char) -> String {
    match c {
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        ' ' => "' '".into(),
        c if (c as u32) < 0x100 => format!("\\x{:02x}", c as u32),
        c => format!("\\u{{{:x}}}", c as u32),
    }
}

/// `s` with every invisible character (see [`is_invisible`]) but the plain
/// space written as an escape (`\n`, `\x1b`, `\u{202e}`) and backslashes
/// doubled, so what a terminal shows is exactly what was sent.
pub fn escaped(s: &str) -> Cow<'_, str> {
    if !s
        .chars()
        .any(|c| c == '\\' || (c != ' ' && is_invisible(c)))
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c != ' ' && is_invisible(c) {
            let _ = write!(out, "{}", escape_char(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// For a message that may quote outside input but has its own line breaks:
/// like [`escaped`], keeping newlines and tabs, and leaving backslashes alone.
pub fn escaped_message(s: &str) -> Cow<'_, str> {
    let bad = |c: char| !matches!(c, ' ' | '\n' | '\t') && is_invisible(c);
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.push_str(&escape_char(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A Prometheus text-format label value: backslash, double quote and line
/// feed escaped, as the exposition format requires.
pub fn prometheus_label_value(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_characters_are_refused_and_shown_escaped() {
        for bad in [
            "a\nb",
            "a\u{1b}[31m",
            "a\u{202e}b",
            "a\u{2066}b",
            "a\u{200b}b",
            "a\u{feff}",
            "a b",
            "a\u{85}b",
            "a\u{2028}b",
            "a\u{7f}",
        ] {
            let e = validate_visible("image name", bad, 250).unwrap_err();
            assert!(
                !e.message.chars().any(|c| c != ' ' && is_invisible(c)),
                "{e:?}"
            );
        }
        assert!(validate_visible("image name", "k\"z", 250).is_ok());
        assert!(validate_visible("image name", "a\\b", 250).is_ok());
        assert!(validate_visible("image name", "über-δ_名前", 250).is_ok());
        assert!(validate_visible("site name", &"x".repeat(65), 64).is_err());
        assert_eq!(
            escaped("a\u{1b}[0m\n\u{202e}\\"),
            "a\\x1b[0m\\n\\u{202e}\\\\"
        );
        assert_eq!(escaped_message("x\ny\u{7}"), "x\ny\\x07");
        assert_eq!(prometheus_label_value("k\"z\\\n"), "k\\\"z\\\\\\n");
    }
}

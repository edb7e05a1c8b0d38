//! Key names end up in terminals (`keyfence keys list`), logs and audit rows,
//! so a name must not be able to move the cursor, recolour the screen, split a
//! line or reorder the text around it. This module holds the one rule
//! (refused on input by the API and the config loader) and the escaping the
//! CLI applies on output, for names stored before the rule existed.

use std::{borrow::Cow, fmt::Write as _};

/// Format controls (Unicode general category Cf, Unicode 15.1), as ranges.
/// Among them the bidirectional embeddings and overrides U+202A–U+202E and
/// isolates U+2066–U+2069 ("Trojan Source"), zero-width characters, the BOM
/// and the tag characters. Written out because `char` only knows Cc.
const FORMAT_CONTROLS: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// A character a name may not hold: a control character (Cc: C0, DEL, C1,
/// which covers ESC, CR, LF, TAB and NUL), a format control (Cf), or the line
/// and paragraph separators U+2028/U+2029 (they break lines like LF).
#[must_use]
pub fn is_forbidden(c: char) -> bool {
    let u = u32::from(c);
    c.is_control()
        || u == 0x2028
        || u == 0x2029
        || FORMAT_CONTROLS
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&u))
}

/// A name holding a forbidden character: which one, and where (1-based, in
/// characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "name must not contain control or formatting characters \
     (U+{code:04X} at character {position})",
    code = u32::from(*.character)
)]
pub struct ForbiddenCharacter {
    pub character: char,
    pub position: usize,
}

/// Refuse a name with a forbidden character (the first one is named).
pub fn check(name: &str) -> Result<(), ForbiddenCharacter> {
    match name.chars().enumerate().find(|(_, c)| is_forbidden(*c)) {
        Some((i, character)) => Err(ForbiddenCharacter {
            character,
            position: i + 1,
        }),
        None => Ok(()),
    }
}

/// `s` with every forbidden character written as `\u{…}`, for printing text
/// that came from elsewhere into a terminal. Backslashes stay as they are:
/// text that merely looks like an escape is harmless, and names such as
/// `corp\ci` keep reading as written.
#[must_use]
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_forbidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_forbidden(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_control_is_refused() {
        for (name, code, position) in [
            ("red\u{1b}[31m", 0x1b, 4),
            ("two\nlines", 0x0a, 4),
            ("cr\rhere", 0x0d, 3),
            ("nul\0", 0x00, 4),
            ("tab\there", 0x09, 4),
            ("del\u{7f}", 0x7f, 4),
            ("c1\u{85}next", 0x85, 3),
            ("c1 csi \u{9b}31m", 0x9b, 8),
            ("\u{202e}txt.exe", 0x202e, 1),
            ("a\u{202a}b", 0x202a, 2),
            ("a\u{2066}b\u{2069}", 0x2066, 2),
            ("zero\u{200b}width", 0x200b, 5),
            ("mark\u{200f}", 0x200f, 5),
            ("bom\u{feff}", 0xfeff, 4),
            ("arabic\u{61c}mark", 0x061c, 7),
            ("soft\u{ad}hyphen", 0x00ad, 5),
            ("line\u{2028}sep", 0x2028, 5),
            ("tag\u{e0041}", 0xe0041, 4),
        ] {
            let err = check(name).unwrap_err();
            assert_eq!(u32::from(err.character), code, "{name:?}");
            assert_eq!(err.position, position, "{name:?}");
            assert!(err.to_string().contains(&format!("U+{code:04X}")), "{err}");
        }
    }

    #[test]
    fn ordinary_names_pass() {
        for name in [
            "CI runners",
            "Büro Zürich – Ω",
            "東京オフィス",
            "emoji 🚀 ok",
            "quote \" and 'apostrophe' \\ backslash",
        ] {
            assert_eq!(check(name), Ok(()), "{name:?}");
        }
        // The zero-width joiner is a format control too.
        assert!(check("👨\u{200d}👩").is_err());
    }

    #[test]
    fn escaping_makes_controls_visible() {
        assert!(matches!(escape("CI runners"), Cow::Borrowed(_)));
        assert_eq!(escape("red\u{1b}[31m!"), "red\\u{1b}[31m!");
        assert_eq!(escape("a\nb\0"), "a\\u{a}b\\u{0}");
        assert_eq!(escape("\u{202e}exe.txt"), "\\u{202e}exe.txt");
        assert_eq!(escape("c1\u{9b}"), "c1\\u{9b}");
        assert!(matches!(escape("corp\\ci"), Cow::Borrowed("corp\\ci")));
        for s in ["x\u{1b}y", "\u{2066}\u{2069}", "\r\n", "\u{e007f}"] {
            assert!(!escape(s).chars().any(is_forbidden), "{s:?}");
        }
    }
}

//! The rules a key's fields must meet, applied by every entry point (the
//! config loader and the API) before a [`Key`](super::Key) is built.
//!
//! Key names end up in terminals (`keyfence keys list`), logs and audit rows,
//! so a name must not be able to move the cursor, recolour the screen, split a
//! line or reorder the text around it: [`name`] refuses such characters on
//! input, and [`escape`] is what the CLI applies on output, for names stored
//! before the rule existed.

use std::{borrow::Cow, fmt::Write as _};

use super::{ADMIN_SCOPE, API_SCOPE, DEFAULT_TENANT, Scopes};

/// Longest key name accepted, in bytes.
pub const MAX_NAME: usize = 200;
/// Longest tenant accepted.
pub const MAX_TENANT: usize = 64;

/// A field that breaks its rule; the message is what the API answers (422)
/// and the config loader reports at the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("name must be 1 to {MAX_NAME} characters")]
    NameLength,
    #[error(transparent)]
    NameCharacter(#[from] ForbiddenCharacter),
    #[error("tenant must be 1 to {MAX_TENANT} letters, digits, '-' or '_'")]
    Tenant,
    #[error("unknown scope {0:?}; scopes are {API_SCOPE:?} and {ADMIN_SCOPE:?}")]
    Scope(String),
    #[error("{0:?} is not a key id (1-64 of A-Z a-z 0-9 _ . -)")]
    KeyId(String),
}

/// A key's name, trimmed: 1 to [`MAX_NAME`] bytes, no control or formatting
/// characters (see [`is_forbidden`]).
pub fn name(raw: &str) -> Result<String, Invalid> {
    let name = raw.trim();
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Invalid::NameLength);
    }
    check(name)?;
    Ok(name.to_owned())
}

/// A key's tenant ([`DEFAULT_TENANT`] when absent): 1 to [`MAX_TENANT`] ASCII
/// letters, digits, `-` or `_`.
pub fn tenant(raw: Option<&str>) -> Result<String, Invalid> {
    let tenant = raw.unwrap_or(DEFAULT_TENANT);
    let ok = !tenant.is_empty()
        && tenant.len() <= MAX_TENANT
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(tenant.to_owned())
    } else {
        Err(Invalid::Tenant)
    }
}

/// A key's scopes (`[api]` when absent), sorted and distinct; each one
/// [`API_SCOPE`] or [`ADMIN_SCOPE`].
pub fn scopes(raw: Option<Vec<String>>) -> Result<Scopes, Invalid> {
    match raw {
        None => Ok(Scopes::API),
        Some(names) => Scopes::from_names(&names).map_err(Invalid::Scope),
    }
}

/// A static key's id: 1 to 64 of `A-Z a-z 0-9 _ . -` (generated ids are
/// `key_` and base62, so they always pass).
pub fn key_id(id: &str) -> Result<(), Invalid> {
    let ok = (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Invalid::KeyId(id.to_owned()))
    }
}

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
    fn field_rules() {
        assert_eq!(name("  CI runners "), Ok("CI runners".into()));
        assert_eq!(name("   "), Err(Invalid::NameLength));
        assert_eq!(name(&"x".repeat(MAX_NAME + 1)), Err(Invalid::NameLength));
        assert!(matches!(name("a\u{1b}b"), Err(Invalid::NameCharacter(_))));
        assert_eq!(tenant(None), Ok("default".into()));
        assert_eq!(tenant(Some("acme-1_x")), Ok("acme-1_x".into()));
        for bad in ["", "a b", "ü", &"t".repeat(65)] {
            assert_eq!(tenant(Some(bad)), Err(Invalid::Tenant), "{bad:?}");
        }
        assert_eq!(scopes(None), Ok(Scopes::API));
        assert_eq!(
            scopes(Some(vec!["api".into(), "admin".into(), "api".into()])),
            Ok(Scopes::API.with(Scopes::ADMIN))
        );
        let err = scopes(Some(vec!["read".into()])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unknown scope "read"; scopes are "api" and "admin""#
        );
        assert!(key_id("prod-1.a_b").is_ok());
        assert!(key_id("a b").is_err());
        assert!(key_id("").is_err());
    }

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

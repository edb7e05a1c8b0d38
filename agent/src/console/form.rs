//! `application/x-www-form-urlencoded` bodies and query strings, with
//! repeated names kept in order (the list editor posts one row per entry).

use std::fmt::Write as _;

/// Decoded `name=value` pairs, in the order sent.
#[derive(Debug, Default)]
pub struct Form(Vec<(String, String)>);

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `+` is a space, `%XX` a byte; a malformed escape stays as written.
/// Bytes that are not UTF-8 become U+FFFD.
fn decode(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high << 4) | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Form {
    #[must_use]
    pub fn parse(body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        Self(
            text.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (n, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(n), decode(v))
                })
                .collect(),
        )
    }

    /// The first value of `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name`, or empty.
    #[must_use]
    pub fn text(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }

    /// Every value of `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `%`-encode a value for a URL's query or path.
#[must_use]
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_keeps_repeats() {
        let f = Form::parse(b"a=1&b=x+y%2Fz&a=2&c&d=%zz%4&e=%C3%A9");
        assert_eq!(f.get("a"), Some("1"));
        assert_eq!(f.all("a").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(f.text("b"), "x y/z");
        assert_eq!(f.get("c"), Some(""));
        assert_eq!(f.text("d"), "%zz%4");
        assert_eq!(f.text("e"), "é");
        assert_eq!(f.get("missing"), None);
        assert_eq!(encode("a b/é"), "a%20b%2F%C3%A9");
        assert_eq!(decode(&encode("10.0.0.0/8 ü")), "10.0.0.0/8 ü");
    }
}

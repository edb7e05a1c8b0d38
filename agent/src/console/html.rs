//! HTML output: escaping and the one page layout (`templates/layout.html`,
//! embedded in the binary). Every value from a key, a request or the store
//! goes through [`esc`] before it is written into a page.

use std::fmt::Write as _;

const LAYOUT: &str = include_str!("templates/layout.html");
pub const LOGIN: &str = include_str!("templates/login.html");

/// Escape for text and for quoted attribute values.
#[must_use]
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `template` with each `{{name}}` replaced by its value, in one pass (a value
/// that contains `{{…}}` is never expanded again). Unknown names stay empty.
#[must_use]
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &after[..end];
        if let Some((_, v)) = values.iter().find(|(n, _)| *n == name) {
            out.push_str(v);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Who is signed in, for the navigation bar.
pub struct Nav<'a> {
    pub principal: &'a str,
    pub address: &'a str,
    pub csrf: &'a str,
}

/// A whole page: `main` is already HTML.
#[must_use]
pub fn page(title: &str, nav: Option<&Nav<'_>>, main: &str) -> String {
    let mut links = String::new();
    let csrf = nav.map_or("", |n| n.csrf);
    if let Some(n) = nav {
        let _ = write!(
            links,
            r#"<a href="/keys">Keys</a> <a href="/keys/new">Create key</a> <a href="/audit">Audit</a>
<span class="who">{} from <span id="nav-address">{}</span></span>
<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{}"><button type="submit" id="sign-out">Sign out</button></form>"#,
            esc(n.principal),
            esc(n.address),
            esc(n.csrf),
        );
    }
    fill(
        LAYOUT,
        &[
            ("title", &esc(title)),
            ("csrf", &esc(csrf)),
            ("nav", &links),
            ("main", main),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_fills_once() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(
            fill("a{{x}}b{{y}}c{{z", &[("x", "{{y}}"), ("y", "2")]),
            "a{{y}}b2c{{z"
        );
        let p = page("<t>", None, "<p>body</p>");
        assert!(p.contains("<title>&lt;t&gt; · keyfence</title>"));
        assert!(p.contains("<p>body</p>"));
        assert!(!p.contains("<script>"), "no inline script");
    }
}

//! `keyfence keys …`: the management API from the command line. Readable
//! tables by default, the API's JSON with `--json`. The answer's status decides
//! the exit code: 0 for 2xx, 1 otherwise (the API's error is printed).

use std::{fmt::Write as _, net::ToSocketAddrs as _, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::cli::{KeysArgs, KeysCommand};

/// Connect and I/O timeout for one API call. Writes wait for enforcement,
/// which with a million prefixes takes seconds.
const TIMEOUT: Duration = Duration::from_mins(1);

/// An answer from the API.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// `http://HOST:PORT` split into the address to connect to and the `Host`
/// header.
fn endpoint(api: &str) -> anyhow::Result<String> {
    let rest = api.strip_prefix("http://").ok_or_else(|| {
        anyhow!("--api {api:?}: expected http://HOST:PORT (the management API speaks plain HTTP on loopback)")
    })?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        bail!("--api {api:?}: expected http://HOST:PORT without a path");
    }
    Ok(host.to_owned())
}

/// One HTTP/1.1 exchange (`Connection: close`) through hyper. Blocking: it
/// runs its own single-threaded runtime, so call it from plain threads (the
/// CLI, tests), never from async code.
pub fn call(
    api: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    confirm: Option<&str>,
) -> anyhow::Result<Answer> {
    let host = endpoint(api)?;
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} has no address"))?;
    let request = request(&host, token, method, path, body, confirm)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP client")?;
    runtime.block_on(async {
        let stream = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("no connection within {TIMEOUT:?}"))
            .and_then(|connected| connected.map_err(anyhow::Error::from))
            .with_context(|| format!("connecting to the management API at {api}"))?;
        tokio::time::timeout(TIMEOUT, exchange(stream, request))
            .await
            .map_err(|_| anyhow!("no answer within {TIMEOUT:?}"))
            .and_then(|answered| answered)
            .with_context(|| format!("reading the answer from {api}"))
    })
}

/// The request for one call; the token and a confirmation code must be valid
/// header values.
fn request(
    host: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    confirm: Option<&str>,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let payload = body.map(Value::to_string).unwrap_or_default();
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host)
        .header(header::AUTHORIZATION, bearer(token)?)
        .header(header::ACCEPT, "application/json")
        .header(header::CONNECTION, "close")
        .header(header::CONTENT_LENGTH, payload.len());
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(code) = confirm {
        let code = HeaderValue::from_str(code)
            .map_err(|_| anyhow!("the confirmation code is not a valid header value"))?;
        request = request.header("x-keyfence-confirm", code);
    }
    request
        .body(Full::new(Bytes::from(payload)))
        .with_context(|| format!("{method} {path}: not a valid request"))
}

fn bearer(token: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| anyhow!("KEYFENCE_TOKEN is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Send `request` on `stream` and read the whole answer (hyper decodes
/// `Content-Length` and chunked bodies).
async fn exchange(
    stream: tokio::net::TcpStream,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<Answer> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    drop(sender);
    // The server closes (`Connection: close`); an error after a whole answer
    // changes nothing.
    let _ = conn.await;
    Ok(answer(status, &body))
}

/// An answer's body as JSON, as text when it is not JSON, `null` when empty.
fn answer(status: u16, body: &[u8]) -> Answer {
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    };
    Answer { status, body }
}

/// `--allow "a, b"` as the API's list (one string: the server splits and
/// validates it, reporting every bad entry).
fn allow_value(allow: &str) -> Value {
    Value::String(allow.to_owned())
}

/// Run one `keyfence keys` command; returns the process's exit code.
pub fn run(args: &KeysArgs) -> anyhow::Result<u8> {
    let token = std::env::var("KEYFENCE_TOKEN").map_err(|_| {
        anyhow!("KEYFENCE_TOKEN is not set: export the management token (a config admin's token or an admin-scoped key)")
    })?;
    let api = args.api.as_str();
    let confirm = args.confirm.as_deref();
    let call = |method: &str, path: &str, body: Option<&Value>| {
        call(api, &token, method, path, body, confirm)
    };
    let (answer, shape) = match &args.command {
        KeysCommand::Create {
            name,
            tenant,
            scopes,
            allow,
            report_only,
        } => {
            let mut body = json!({ "name": name });
            if let Some(t) = tenant {
                body["tenant"] = json!(t);
            }
            if !scopes.is_empty() {
                body["scopes"] = json!(scopes);
            }
            if let Some(a) = allow {
                body["ip_allow_list"] = allow_value(a);
            }
            if *report_only {
                body["report_only"] = json!(true);
            }
            (call("POST", "/v1/keys", Some(&body))?, Shape::Key)
        }
        KeysCommand::List => (call("GET", "/v1/keys", None)?, Shape::List),
        KeysCommand::Show { id } => (call("GET", &key_path(id, ""), None)?, Shape::Key),
        KeysCommand::Update {
            id,
            name,
            allow,
            report_only,
        } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(a) = allow {
                body["ip_allow_list"] = allow_value(a);
            }
            if let Some(r) = report_only {
                body["report_only"] = json!(r);
            }
            if body.as_object().is_some_and(serde_json::Map::is_empty) {
                bail!("nothing to change: give --name, --allow or --report-only");
            }
            (call("PATCH", &key_path(id, ""), Some(&body))?, Shape::Key)
        }
        KeysCommand::Revoke { id } => (call("DELETE", &key_path(id, ""), None)?, Shape::Key),
        KeysCommand::Rotate { id } => (call("POST", &key_path(id, "/rotate"), None)?, Shape::Key),
        KeysCommand::Sources { id } => (
            call("GET", &key_path(id, "/sources"), None)?,
            Shape::Sources,
        ),
        KeysCommand::Audit { key, limit, after } => {
            let mut path = format!("/v1/audit?limit={limit}&after={after}");
            if let Some(k) = key {
                let _ = write!(path, "&key_id={}", encode(k));
            }
            (call("GET", &path, None)?, Shape::Audit)
        }
    };
    if !(200..300).contains(&answer.status) {
        eprint!("{}", render_error(&answer));
        return Ok(1);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer.body)?);
    } else {
        print!("{}", shape.render(&answer.body));
    }
    Ok(0)
}

/// Percent-encode an id for a path segment (ids are `key_` + base62, but a
/// static key's id is whatever the config says).
fn encode(s: &str) -> String {
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

fn key_path(id: &str, suffix: &str) -> String {
    format!("/v1/keys/{}{suffix}", encode(id))
}

/// The API's error, with every bad entry of a 422 on its own line.
#[must_use]
pub fn render_error(answer: &Answer) -> String {
    let message = answer.body["error"]
        .as_str()
        .map_or_else(|| answer.body.to_string(), str::to_owned);
    let message = crate::keys::validate::escape(&message);
    let mut out = format!("keyfence keys: {} {message}\n", answer.status);
    if let Some(entries) = answer.body["entries"].as_array() {
        for e in entries {
            let _ = writeln!(
                out,
                "  entry {}: {:?}: {}",
                e["position"],
                e["entry"].as_str().unwrap_or(""),
                crate::keys::validate::escape(e["reason"].as_str().unwrap_or(""))
            );
        }
    }
    if answer.status == 401 && message == "confirmation required" {
        out.push_str("  (pass the current TOTP code with --confirm or KEYFENCE_CONFIRM)\n");
    }
    out
}

#[derive(Clone, Copy)]
enum Shape {
    Key,
    List,
    Sources,
    Audit,
}

/// A field for a table or a `show`: control and formatting characters the
/// API sent (names stored before they were refused, notes) are escaped, so
/// the text cannot drive the terminal or split a row.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => crate::keys::validate::escape(s).into_owned(),
        other => other.to_string(),
    }
}

fn entry_text(e: &Value) -> String {
    match e {
        Value::Object(o) => {
            let mut s = text(&o.get("cidr").cloned().unwrap_or(Value::Null));
            if let Some(n) = o.get("note").and_then(Value::as_str) {
                let _ = write!(s, "  # {}", crate::keys::validate::escape(n));
            }
            if let Some(t) = o.get("expires_at").and_then(Value::as_str) {
                let _ = write!(s, "  (expires {t})");
            }
            s
        }
        other => text(other),
    }
}

fn status_of(key: &Value) -> &'static str {
    if !key["revoked_at"].is_null() {
        "revoked"
    } else if key["report_only"] == json!(true) {
        "report-only"
    } else {
        "active"
    }
}

fn allow_summary(key: &Value) -> String {
    let entries = key["ip_allow_list"].as_array().cloned().unwrap_or_default();
    match entries.len() {
        0 => "any address".into(),
        1..=3 => entries
            .iter()
            .map(|e| entry_text(e).split("  ").next().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
            .join(", "),
        n => format!("{n} entries"),
    }
}

/// Rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

impl Shape {
    fn render(self, body: &Value) -> String {
        match self {
            Shape::Key => render_key(body),
            Shape::List => {
                let keys = body["keys"].as_array().cloned().unwrap_or_default();
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            text(&k["id"]),
                            text(&k["name"]),
                            text(&k["tenant"]),
                            k["scopes"]
                                .as_array()
                                .map(|s| s.iter().map(text).collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                            text(&k["source"]),
                            status_of(k).into(),
                            text(&k["last_used_at"]),
                            allow_summary(k),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "NAME",
                        "TENANT",
                        "SCOPES",
                        "SOURCE",
                        "STATUS",
                        "LAST USED",
                        "ALLOW",
                    ],
                    &rows,
                )
            }
            Shape::Sources => sources_table(body),
            Shape::Audit => {
                let rows: Vec<Vec<String>> = body["entries"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|e| {
                        vec![
                            text(&e["seq"]),
                            text(&e["at"]),
                            text(&e["principal"]),
                            text(&e["address"]),
                            text(&e["action"]),
                            text(&e["key_id"]),
                            audit_change(e),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "SEQ",
                        "AT",
                        "PRINCIPAL",
                        "ADDRESS",
                        "ACTION",
                        "KEY",
                        "CHANGE",
                    ],
                    &rows,
                )
            }
        }
    }
}

/// What an audit row changed, in a few words.
fn audit_change(e: &Value) -> String {
    let (before, after) = (&e["before"], &e["after"]);
    if e["action"] == "lockout" {
        // Not a key change: who was locked out, why, for how long.
        return format!(
            "{} {} locked out for {}s ({})",
            text(&after["scope"]),
            text(&after["subject"]),
            text(&after["seconds"]),
            text(&after["reason"])
        );
    }
    if before.is_null() {
        return format!("allow: {}", allow_summary(after));
    }
    let mut parts = Vec::new();
    for field in ["name", "ip_allow_list", "report_only", "revoked_at"] {
        if before[field] != after[field] {
            parts.push(match field {
                "ip_allow_list" => format!(
                    "allow: {} -> {}",
                    allow_summary(before),
                    allow_summary(after)
                ),
                f => format!("{f}: {} -> {}", text(&before[f]), text(&after[f])),
            });
        }
    }
    if parts.is_empty() && e["action"] == "rotate" {
        parts.push("new secret".into());
    }
    parts.join("; ")
}

/// The sources of a key; in a fleet with the hosts that saw each address.
fn sources_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["sources"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            vec![
                text(&s["ip"]),
                text(&s["allowed"]),
                text(&s["refused"]),
                text(&s["last_seen"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        return format!("no requests seen for {} yet\n", text(&body["key_id"]));
    }
    // Fleet mode: which hosts saw each address.
    let hosts: Vec<String> = body["sources"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|s| s["hosts"].as_array())
                .map(|hs| {
                    hs.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect()
        })
        .unwrap_or_default();
    if hosts.len() == rows.len() {
        let rows: Vec<Vec<String>> = rows
            .into_iter()
            .zip(hosts)
            .map(|(mut r, h)| {
                r.push(h);
                r
            })
            .collect();
        return table(
            &["ADDRESS", "ALLOWED", "REFUSED", "LAST SEEN", "HOSTS"],
            &rows,
        );
    }
    table(&["ADDRESS", "ALLOWED", "REFUSED", "LAST SEEN"], &rows)
}

fn render_key(k: &Value) -> String {
    let mut out = String::new();
    for (label, field) in [
        ("id", "id"),
        ("name", "name"),
        ("tenant", "tenant"),
        ("source", "source"),
        ("created", "created_at"),
        ("updated", "updated_at"),
        ("last used", "last_used_at"),
        ("revoked", "revoked_at"),
    ] {
        let _ = writeln!(out, "{label:<10} {}", text(&k[field]));
    }
    let scopes = k["scopes"]
        .as_array()
        .map(|s| s.iter().map(text).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let _ = writeln!(out, "{:<10} {scopes}", "scopes");
    let _ = writeln!(out, "{:<10} {}", "status", status_of(k));
    let entries = k["ip_allow_list"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        let _ = writeln!(out, "{:<10} any address (the list is empty)", "allow");
    } else {
        let _ = writeln!(out, "{:<10} {} entries", "allow", entries.len());
        for e in &entries {
            let _ = writeln!(out, "  {}", entry_text(e));
        }
    }
    if let Some(secret) = k["secret"].as_str() {
        let _ = writeln!(out, "\nsecret     {secret}");
        out.push_str("           (shown this once: keyfence stores only its SHA-256)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serve `raw` as the answer to one request on loopback; the request's
    /// head comes back through the handle.
    fn canned(raw: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(raw);
            String::from_utf8_lossy(&head).into_owned()
        });
        (api, server)
    }

    #[test]
    fn answers_plain_and_chunked() {
        let (api, server) = canned(
            b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"id\":\"k\"}",
        );
        let body = json!({"name": "n"});
        let a = call(&api, "t0k", "POST", "/v1/keys", Some(&body), Some("123456")).unwrap();
        assert_eq!(a.status, 201);
        assert_eq!(a.body["id"], "k");
        let head = server.join().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("post /v1/keys http/1.1\r\n"), "{head}");
        for line in [
            "authorization: bearer t0k",
            "content-type: application/json",
            "content-length: 12",
            "x-keyfence-confirm: 123456",
            "connection: close",
        ] {
            assert!(head.contains(line), "{line}: {head}");
        }

        let (api, server) = canned(
            b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"err\r\n8\r\nor\":\"x\"}\r\n0\r\n\r\n",
        );
        let a = call(&api, "t", "GET", "/v1/keys", None, None).unwrap();
        assert_eq!(a.status, 409);
        assert_eq!(a.body["error"], "x");
        let head = server.join().unwrap().to_ascii_lowercase();
        assert!(!head.contains("content-type"), "{head}");

        let (api, server) = canned(b"garbage");
        assert!(call(&api, "t", "GET", "/v1/keys", None, None).is_err());
        server.join().unwrap();
        let (api, server) =
            canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab");
        assert!(call(&api, "t", "GET", "/v1/keys", None, None).is_err());
        server.join().unwrap();
    }

    #[test]
    fn bodies_that_are_not_json_are_text() {
        assert_eq!(answer(204, b"").body, Value::Null);
        assert_eq!(answer(502, b"bad gateway").body, json!("bad gateway"));
    }

    #[test]
    fn api_urls() {
        assert_eq!(endpoint("http://127.0.0.1:9900").unwrap(), "127.0.0.1:9900");
        assert_eq!(endpoint("http://[::1]:9900/").unwrap(), "[::1]:9900");
        assert!(endpoint("https://127.0.0.1:9900").is_err());
        assert!(endpoint("http://127.0.0.1:9900/v1").is_err());
        assert!(endpoint("127.0.0.1:9900").is_err());
    }

    #[test]
    fn ids_are_encoded() {
        assert_eq!(
            key_path("key_AbC09", "/rotate"),
            "/v1/keys/key_AbC09/rotate"
        );
        assert_eq!(key_path("a b/c", ""), "/v1/keys/a%20b%2Fc");
    }

    #[test]
    fn errors_list_every_entry() {
        let a = Answer {
            status: 422,
            body: json!({"error":"invalid allow list","entries":[
                {"position":1,"entry":"10.0.0.1/33","reason":"prefix length 33 out of range (0-32)"},
                {"position":3,"entry":"nope","reason":"not an IP address or CIDR"}]}),
        };
        let text = render_error(&a);
        assert!(
            text.starts_with("keyfence keys: 422 invalid allow list\n"),
            "{text}"
        );
        assert!(text.contains("entry 1: \"10.0.0.1/33\""), "{text}");
        assert!(text.contains("entry 3: \"nope\""), "{text}");
    }

    #[test]
    fn control_characters_are_escaped_in_tables_and_show() {
        // A name stored before such names were refused, and a note.
        let key = json!({
            "id": "key_1", "name": "evil\u{1b}[2J\u{1b}[31mname\nfake row\u{202e}txt",
            "tenant": "default", "scopes": ["api"],
            "ip_allow_list": [{"cidr":"203.0.113.7/32","note":"bell\u{7}\u{0}"}],
            "report_only": false, "source": "api", "created_at": "2026-11-25T10:00:00Z",
            "updated_at": "2026-11-25T10:00:00Z", "last_used_at": null, "revoked_at": null
        });
        let listed = Shape::List.render(&json!({"keys":[key.clone()]}));
        let shown = render_key(&key);
        let audit = Shape::Audit.render(&json!({"entries":[{
            "seq": 1, "at": "2026-11-25T10:00:00Z", "principal": "admin:ops",
            "address": "127.0.0.1", "action": "update", "key_id": "key_1",
            "before": {"name": "a"}, "after": {"name": "b\u{1b}[0m"}
        }]}));
        for out in [&listed, &shown, &audit] {
            assert!(
                !out.chars()
                    .any(|c| crate::keys::validate::is_forbidden(c) && c != '\n'),
                "{out:?}"
            );
        }
        assert_eq!(listed.lines().count(), 2, "one header, one row: {listed:?}");
        assert!(
            listed.contains("evil\\u{1b}[2J\\u{1b}[31mname\\u{a}fake row\\u{202e}txt"),
            "{listed}"
        );
        assert!(shown.contains("# bell\\u{7}\\u{0}"), "{shown}");
        assert!(audit.contains("name: a -> b\\u{1b}[0m"), "{audit}");
        let err = render_error(&Answer {
            status: 400,
            body: json!({"error": "x\u{1b}]0;title\u{7}"}),
        });
        assert_eq!(err, "keyfence keys: 400 x\\u{1b}]0;title\\u{7}\n");
    }

    #[test]
    fn lockout_rows_read_as_lockouts() {
        let audit = Shape::Audit.render(&json!({"entries":[{
            "seq": 7, "at": "2026-11-25T10:00:00Z", "principal": "admin:ops",
            "address": "192.0.2.100", "action": "lockout", "key_id": null, "before": null,
            "after": {"reason": "confirm", "scope": "address", "subject": "192.0.2.100",
                      "seconds": 30, "lockouts_in_a_row": 1}
        }]}));
        let row = audit.lines().nth(1).unwrap();
        assert!(row.contains("lockout  -"), "{row}");
        assert!(
            row.ends_with("address 192.0.2.100 locked out for 30s (confirm)"),
            "{row}"
        );
    }

    #[test]
    fn key_and_list_rendering() {
        let key = json!({
            "id": "key_1", "name": "CI", "tenant": "default", "scopes": ["api"],
            "ip_allow_list": ["198.51.100.0/24", {"cidr":"203.0.113.7/32","note":"vpn","expires_at":"2026-12-31T00:00:00Z"}],
            "report_only": false, "source": "api", "created_at": "2026-11-25T10:00:00Z",
            "updated_at": "2026-11-25T10:00:00Z", "last_used_at": null, "revoked_at": null,
            "secret": "kf_x"
        });
        let shown = render_key(&key);
        assert!(shown.contains("allow      2 entries\n  198.51.100.0/24\n  203.0.113.7/32  # vpn  (expires 2026-12-31T00:00:00Z)\n"), "{shown}");
        assert!(shown.contains("secret     kf_x"), "{shown}");
        let listed = Shape::List.render(&json!({"keys":[key]}));
        let mut lines = listed.lines();
        assert!(
            lines.next().unwrap().starts_with("ID     NAME  TENANT"),
            "{listed}"
        );
        let row = lines.next().unwrap();
        assert!(row.contains("active"), "{row}");
        assert!(row.ends_with("198.51.100.0/24, 203.0.113.7/32"), "{row}");
    }

    #[test]
    fn sources_show_the_hosts_in_a_fleet() {
        let one = serde_json::json!({"key_id": "k", "sources": [
            {"ip": "192.0.2.1", "allowed": 3, "refused": 0, "last_seen": "2026-12-01T11:00:00Z"}]});
        let plain = Shape::Sources.render(&one);
        assert!(!plain.contains("HOSTS"), "{plain}");
        let fleet = serde_json::json!({"key_id": "k", "sources": [
            {"ip": "192.0.2.1", "allowed": 3, "refused": 0, "last_seen": "2026-12-01T11:00:00Z",
             "hosts": ["gw-a", "gw-b"]}]});
        let shown = Shape::Sources.render(&fleet);
        assert!(shown.contains("HOSTS"), "{shown}");
        assert!(shown.contains("gw-a,gw-b"), "{shown}");
    }
}

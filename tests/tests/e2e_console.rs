//! The key console in a real browser: headless Chromium (`WebDriver`, run in
//! the client namespace, so it speaks from a documentation address) against
//! the real `keyfence` in the gateway namespace, and curl using the keys the
//! console makes. Each step saves a screenshot under `target/console/`.
//! Needs root and `cargo xtask setup` (chromium, chromium-driver).

use std::{
    net::IpAddr,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use keyfence::confirm::{Confirmer, STEP_SECONDS};
use keyfence_tests::{
    config,
    http::{Curl, Reply},
    netns::{Agent, CLIENT_IF, GATEWAY_V4, Lab, Netns},
    tls,
    webdriver::Browser,
};
use serde_json::{Value, json};

const API: u16 = 8443;
const MANAGEMENT: u16 = 9900;
const OPS_TOKEN: &str = "e2e-ops-token-0123456789abcdef";
/// Base32 of "12345678901234567890" (RFC 6238's test secret).
const TOTP_SECRET: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

/// The operator's browser (in `ops`'s list).
const OPS: &str = "192.0.2.100";
/// Where an admin-scoped key signs in from.
const ADMIN_KEY_FROM: &str = "192.0.2.101";
/// Outside `ops`'s list.
const OUTSIDER: &str = "192.0.2.102";
/// Clients of the keys the console makes.
const ALLOWED: &str = "192.0.2.10";
const REFUSED: &str = "192.0.2.20";

const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn config(pin: &std::path::Path, confirm: bool) -> String {
    let confirm = if confirm {
        "\n  confirm: { totp_secret_env: KF_E2E_TOTP }"
    } else {
        ""
    };
    format!(
        r#"{datapath}
listeners:
  - {{ name: api, bind: "0.0.0.0:{API}", mode: auth, early_drop: false }}
management:
  bind: "0.0.0.0:{MANAGEMENT}"
  admins:
    - {{ name: ops, token_env: KF_E2E_OPS, ip_allow_list: ["{OPS}", "127.0.0.1"] }}{confirm}
  console: {{ idle_timeout: 4s, max_age: 1h }}
{metrics}
"#,
        datapath = config::datapath(pin, "auto"),
        metrics = config::metrics(),
    )
}

/// Hosts and agent; field order is drop order.
struct Scenario {
    agent: Agent,
    lab: Lab,
}

impl Scenario {
    fn start(confirm: bool) -> Self {
        let addrs: Vec<IpAddr> = [OPS, ADMIN_KEY_FROM, OUTSIDER, ALLOWED, REFUSED]
            .iter()
            .map(|a| ip(a))
            .collect();
        let lab = Lab::new(&addrs).expect("building the namespaces");
        let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
        agent.env("KF_E2E_OPS", OPS_TOKEN);
        agent.env("KF_E2E_TOTP", TOTP_SECRET);
        agent
            .launch(&config(agent.pin_path(), confirm))
            .expect("starting keyfence");
        Self { agent, lab }
    }

    /// A browser speaking from `source`: the route to the gateway names it.
    fn browser(&self, source: &str, width: u32) -> Browser {
        set_source(&self.lab.client, source);
        Browser::start(&self.lab.client, self.agent.dir(), width).expect("starting chromium")
    }

    fn use_key(&self, from: &str, secret: &str) -> (u16, String) {
        match Curl::new(
            &self.lab.client,
            ip(from),
            format!("http://{GATEWAY_V4}:{API}/_keyfence/ping"),
        )
        .bearer(secret)
        .send()
        {
            Reply::Answered { status, body, .. } => (status, body),
            other => panic!("no answer from the listener: {other:?}"),
        }
    }

    /// The management API as `ops` from OPS (for what the test checks).
    fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        code: Option<&str>,
    ) -> (u16, Value) {
        let mut c = Curl::new(&self.lab.client, ip(OPS), console(path))
            .bearer(OPS_TOKEN)
            .arg("-X")
            .arg(method);
        if let Some(b) = body {
            c = c
                .header("Content-Type: application/json")
                .arg("--data")
                .arg(&b.to_string());
        }
        if let Some(code) = code {
            c = c.header(&format!("X-Keyfence-Confirm: {code}"));
        }
        match c.send() {
            Reply::Answered { status, body, .. } => (
                status,
                serde_json::from_str(&body).unwrap_or(Value::String(body)),
            ),
            other => panic!("no answer from the API: {other:?}"),
        }
    }
}

fn console(path: &str) -> String {
    format!("http://{GATEWAY_V4}:{MANAGEMENT}{path}")
}

fn set_source(client: &Netns, source: &str) {
    client
        .ip(&[
            "route",
            "replace",
            &format!("{GATEWAY_V4}/32"),
            "dev",
            CLIENT_IF,
            "src",
            source,
        ])
        .expect("choosing the browser's source address");
}

fn sign_in(b: &Browser, token: &str) {
    b.goto(&console("/login"))
        .expect("opening the sign-in page");
    b.type_into("#token", token).expect("typing the token");
    b.click("#sign-in").expect("signing in");
}

fn shot(b: &Browser, name: &str) {
    let path = b.screenshot(name).expect("a screenshot");
    eprintln!("screenshot: {}", path.display());
}

/// The index of the editor row holding `cidr`.
fn row_of(b: &Browser, cidr: &str) -> u64 {
    b.script(
        "return [...document.querySelectorAll('input.cidr')].findIndex(i => i.value === arguments[0]);",
        &[json!(cidr)],
    )
    .expect("reading the rows")
    .as_i64()
    .and_then(|i| u64::try_from(i).ok())
    .unwrap_or_else(|| panic!("no row holds {cidr}"))
}

/// A CSS selector for an id with dots (`remove.0`).
fn id_sel(id: &str) -> String {
    format!("[id=\"{id}\"]")
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one operator's session, step by step, each step depending on the last"
)]
fn console_create_use_edit_revoke_audit_csrf() {
    let s = Scenario::start(false);
    let b = s.browser(OPS, 375);
    sign_in(&b, OPS_TOKEN);
    b.wait("#keys", WAIT).expect("the keys page after sign-in");
    let nav = b.text("#nav-address").expect("the address in the bar");
    assert_eq!(nav, OPS, "the console sees the browser's own address");
    // Readable at 375 px: nothing wider than the window but the tables'
    // own scrolling boxes.
    let width = b
        .script("return document.documentElement.scrollWidth;", &[])
        .unwrap();
    assert!(
        width.as_u64().unwrap() <= 375,
        "page is {width} px wide at 375"
    );
    shot(&b, "console-01-keys-empty");

    // Create, with one bad entry: the live check and the submit both name it.
    b.click("a[href=\"/keys/new\"]").unwrap();
    b.type_into("#name", "browser made").unwrap();
    b.type_into(
        "#ip_allow_list",
        &format!("{ALLOWED}, 10.0.0.5/8\n2001:db8::/32"),
    )
    .unwrap();
    b.wait_text("#allow-check", "did you mean 10.0.0.0/8?", WAIT)
        .expect("live validation names the canonical form");
    shot(&b, "console-02-create-live-error");
    b.click("#create").unwrap();
    let refused = b
        .wait_text("#entry-errors", "did you mean 10.0.0.0/8?", WAIT)
        .unwrap();
    assert!(refused.contains("entry 2"), "{refused}");
    let (_, keys) = s.api("GET", "/v1/keys", None, None);
    assert_eq!(
        keys["keys"].as_array().unwrap().len(),
        0,
        "nothing created: {keys}"
    );
    // Fixed: an empty field would say "anywhere"; this one is valid.
    b.clear("#ip_allow_list").unwrap();
    b.type_into("#ip_allow_list", "").unwrap();
    b.type_into("#ip_allow_list", " ").unwrap();
    b.wait_text("#allow-check", "work from anywhere", WAIT)
        .expect("empty is said in words");
    b.clear("#ip_allow_list").unwrap();
    b.type_into(
        "#ip_allow_list",
        &format!("{ALLOWED}, 10.0.0.0/8\n2001:db8::/32"),
    )
    .unwrap();
    b.wait_text("#allow-check", "Valid", WAIT).unwrap();
    b.click("#create").unwrap();
    b.wait("#secret", WAIT).expect("the secret page");
    let secret = b
        .property("#secret", "value")
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert!(secret.starts_with("kf_"), "{secret}");
    assert!(
        b.text("#secret-warning")
            .unwrap()
            .contains("will not be shown again")
    );
    shot(&b, "console-03-secret-once");
    b.click("#to-key").unwrap();
    b.wait("#editor", WAIT).unwrap();
    assert!(
        !b.source().unwrap().contains(&secret),
        "the secret is shown once only"
    );
    let id = b.text("#key-id").unwrap();

    // The key from an allowed and a refused address while the page is open.
    assert_eq!(s.use_key(ALLOWED, &secret).0, 200);
    let (status, body) = s.use_key(REFUSED, &secret);
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"IP address not allowed"}"#)
    );

    // "Your address": one click, enforced at once.
    assert_eq!(s.use_key(OPS, &secret).0, 403);
    assert_eq!(b.text("#your-address").unwrap(), OPS);
    b.click("#add-mine").unwrap();
    b.wait("#done", WAIT).expect("saved");
    assert_eq!(s.use_key(OPS, &secret).0, 200, "your address works at once");

    // Remove an address: preview, save, the very next request refused.
    let row = row_of(&b, ALLOWED);
    b.click(&id_sel(&format!("remove.{row}"))).unwrap();
    b.click("#preview-button").unwrap();
    let preview = b.wait_text("#preview", ALLOWED, WAIT).unwrap();
    assert!(
        preview.contains(&format!("\u{2212} {ALLOWED}")),
        "{preview}"
    );
    assert!(
        b.text("#covers-after").unwrap().contains("16,777,217 IPv4"),
        "{}",
        b.text("#covers-after").unwrap()
    );
    shot(&b, "console-04-preview");
    assert_eq!(
        s.use_key(ALLOWED, &secret).0,
        200,
        "a preview changes nothing"
    );
    b.click("#save").unwrap();
    b.wait("#done", WAIT).expect("saved");
    assert_eq!(
        s.use_key(ALLOWED, &secret).0,
        403,
        "the very next request is refused"
    );

    // Seen sources: the refused address, added with one click.
    b.goto(&console(&format!("/keys/{id}"))).unwrap();
    b.wait("#sources-table", WAIT).unwrap();
    let sources = b.text("#sources-table").unwrap();
    assert!(sources.contains(REFUSED), "{sources}");
    assert!(
        !b.all("#activity rect.refused").unwrap().is_empty(),
        "the chart shows refusals"
    );
    shot(&b, "console-05-sources-activity");
    b.click(&format!("button[data-add=\"{REFUSED}\"]")).unwrap();
    b.wait("#done", WAIT).unwrap();
    assert_eq!(s.use_key(REFUSED, &secret).0, 200, "added from evidence");

    // CSRF: the session's cookie without the form's token changes nothing.
    let cookie = b.cookie("kf_session").unwrap().expect("the session cookie");
    assert_eq!(cookie["httpOnly"], true);
    assert_eq!(cookie["sameSite"], "Strict");
    let forged = Curl::new(&s.lab.client, ip(OPS), console("/keys/new"))
        .header(&format!(
            "Cookie: kf_session={}",
            cookie["value"].as_str().unwrap()
        ))
        .arg("--data")
        .arg("name=forged&ip_allow_list=")
        .send();
    match forged {
        Reply::Answered { status, body, .. } => {
            assert_eq!(status, 403, "{body}");
            assert!(body.contains("csrf-refused"), "{body}");
        }
        other => panic!("{other:?}"),
    }
    let (_, keys) = s.api("GET", "/v1/keys", None, None);
    assert_eq!(
        keys["keys"].as_array().unwrap().len(),
        1,
        "the forged post made nothing"
    );

    // Revoke with confirmation: without the box nothing happens.
    b.goto(&console(&format!("/keys/{id}"))).unwrap();
    b.script(
        "document.getElementById('revoke-confirm').removeAttribute('required');",
        &[],
    )
    .unwrap();
    b.click("#revoke").unwrap();
    b.wait_text("#form-error", "tick the box", WAIT).unwrap();
    assert_eq!(s.use_key(REFUSED, &secret).0, 200);
    b.click("#revoke-confirm").unwrap();
    b.click("#revoke").unwrap();
    b.wait_text("#done", "Revoked", WAIT).unwrap();
    assert_eq!(s.use_key(REFUSED, &secret).0, 401, "revoked at once");

    // Audit: every change, as ops, from the browser's address, with diffs.
    b.click("#key-audit").unwrap();
    b.wait("#audit", WAIT).unwrap();
    let rows = b.all(".audit-row").unwrap().len();
    assert_eq!(rows, 5, "create, your address, removal, source, revoke");
    let audit = b.text("#audit").unwrap();
    assert!(
        audit.contains("admin:ops") && audit.contains(OPS),
        "{audit}"
    );
    assert!(audit.contains(&format!("\u{2212} {ALLOWED}")), "{audit}");
    assert!(audit.contains(&format!("+ {REFUSED}")), "{audit}");
    shot(&b, "console-06-audit");

    // Sign out ends the session.
    b.click("#sign-out").unwrap();
    b.wait("#token", WAIT).unwrap();
    b.goto(&console("/keys")).unwrap();
    b.wait("#token", WAIT)
        .expect("signed out: back to the sign-in form");
}

fn code_at(unix: u64) -> String {
    Confirmer::from_base32(TOTP_SECRET).unwrap().code_at(unix)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn console_step_up_lockout_expiry_and_outsider() {
    let s = Scenario::start(true);

    // A principal outside its allow list cannot sign in.
    {
        let b = s.browser(OUTSIDER, 1024);
        sign_in(&b, OPS_TOKEN);
        let error = b
            .wait_text("#login-error", "IP address not allowed", WAIT)
            .unwrap();
        assert!(!error.is_empty());
        shot(&b, "console-07-outsider-refused");
        assert!(b.cookie("kf_session").unwrap().is_none(), "no session");
    }

    // An admin-scoped key (made through the API, with a code).
    let t = now();
    let (status, made) = s.api(
        "POST",
        "/v1/keys",
        Some(&json!({ "name": "self admin", "scopes": ["admin", "api"], "ip_allow_list": [ADMIN_KEY_FROM, ALLOWED] })),
        Some(&code_at(t)),
    );
    assert_eq!(status, 201, "{made}");
    let secret = made["secret"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();

    let b = s.browser(ADMIN_KEY_FROM, 1024);
    sign_in(&b, &secret);
    b.wait("#keys", WAIT).unwrap();
    b.goto(&console(&format!("/keys/{id}"))).unwrap();
    b.wait("#editor", WAIT).unwrap();

    // Self-lockout: the dialog asks for the code, the API's 409 is shown by
    // the field, nothing changes.
    let row = row_of(&b, ADMIN_KEY_FROM);
    b.click(&id_sel(&format!("remove.{row}"))).unwrap();
    b.click("#save").unwrap();
    b.wait("#totp-dialog[open]", WAIT)
        .expect("the step-up dialog");
    shot(&b, "console-08-totp-dialog");
    b.type_into("#totp-code", "000000").unwrap();
    b.click("#totp-confirm").unwrap();
    let lockout = b.wait_text("#list-error", "lock you out", WAIT).unwrap();
    assert!(lockout.contains(ADMIN_KEY_FROM), "{lockout}");
    shot(&b, "console-09-self-lockout");
    let (_, key) = s.api("GET", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(
        key["ip_allow_list"].as_array().unwrap().len(),
        2,
        "nothing changed"
    );

    // Step-up: a wrong code is refused next to the field, a fresh one works.
    b.goto(&console(&format!("/keys/{id}"))).unwrap();
    b.wait("#editor", WAIT).unwrap();
    let row = row_of(&b, ALLOWED);
    b.click(&id_sel(&format!("remove.{row}"))).unwrap();
    b.click("#save").unwrap();
    b.wait("#totp-dialog[open]", WAIT).unwrap();
    b.type_into("#totp-code", "000000").unwrap();
    b.click("#totp-confirm").unwrap();
    b.wait_text("#code-error", "confirmation required", WAIT)
        .unwrap();
    let (_, key) = s.api("GET", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(
        key["ip_allow_list"].as_array().unwrap().len(),
        2,
        "nothing changed"
    );
    // The code of the next step (the current one was used by the API call).
    let fresh = code_at(t + STEP_SECONDS);
    let row = row_of(&b, ALLOWED);
    let removed = b
        .property(&id_sel(&format!("remove.{row}")), "checked")
        .unwrap();
    assert_eq!(removed, true, "the refused form keeps its edit");
    b.type_into("#code", &fresh).unwrap();
    b.click("#save").unwrap();
    b.wait("#done", WAIT).expect("saved with a fresh code");
    let (_, key) = s.api("GET", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(
        key["ip_allow_list"],
        json!([format!("{ADMIN_KEY_FROM}/32")])
    );

    // Idle expiry: 4 s without a request ends the session.
    thread::sleep(Duration::from_secs(5));
    b.goto(&console("/keys")).unwrap();
    b.wait_text("#login-error", "without use", WAIT)
        .expect("sent to sign in again");
    shot(&b, "console-10-session-expired");
}

/// `curl -k -i` to the console over TLS from OPS: the whole answer, headers first.
fn tls_curl(s: &Scenario, path: &str, extra: &[&str]) -> String {
    let mut c = Curl::new(
        &s.lab.client,
        ip(OPS),
        format!("https://{GATEWAY_V4}:{MANAGEMENT}{path}"),
    )
    .arg("--insecure")
    .arg("--include");
    for a in extra {
        c = c.arg(a);
    }
    match c.send() {
        Reply::Answered { body, .. } => body,
        other => panic!("no TLS answer: {other:?}"),
    }
}

/// `POST /v1/allowlist/check`: the grammar's answer, bad bodies 400, no token
/// 401, nothing stored.
fn allowlist_check_over_tls(s: &Scenario) {
    let check = |body: &str, token: bool| {
        // HTTP/1.1: curl 7.88 takes an early answer to an h2 upload
        // (RST_STREAM(NO_ERROR) after a 401) for an error.
        let mut args = vec![
            "--http1.1",
            "--header",
            "Content-Type: application/json",
            "--data",
            body,
        ];
        let bearer = format!("Authorization: Bearer {OPS_TOKEN}");
        if token {
            args.extend(["--header", &bearer]);
        }
        let answer = tls_curl(s, "/v1/allowlist/check", &args);
        let status: u16 = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
        let json = answer
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (
            status,
            serde_json::from_str::<Value>(&json).unwrap_or(Value::String(json)),
        )
    };
    let (status, ok) = check(r#"{"ip_allow_list": "192.0.2.0/24, 2001:db8::/64"}"#, true);
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["valid"], true);
    assert_eq!(ok["addresses"], "256 IPv4 and 2^64 IPv6 addresses");
    let (status, bad) = check(r#"{"ip_allow_list": ["10.0.0.5/8", "example.com"]}"#, true);
    assert_eq!(status, 200, "{bad}");
    assert_eq!(bad["errors"][0]["suggestion"], "10.0.0.0/8", "{bad}");
    assert_eq!(bad["errors"][1]["position"], 2, "{bad}");
    assert_eq!(check(r#"{"ip_allow_list": 5}"#, true).0, 400);
    assert_eq!(check(r#"{"list": ""}"#, true).0, 400);
    assert_eq!(check(r#"{"ip_allow_list": ""}"#, false).0, 401);
    let keys = tls_curl(
        s,
        "/v1/keys",
        &["--header", &format!("Authorization: Bearer {OPS_TOKEN}")],
    );
    assert!(
        keys.contains(r#""keys":[]"#),
        "a check stores nothing: {keys}"
    );
}

#[test]
fn console_over_management_tls_has_secure_cookies_and_reloads_its_certificate() {
    let dir = std::env::temp_dir().join(format!("kf-e2e-console-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let (cert, key) = tls::self_signed(&dir, "first", &["192.0.2.1"]);
    let addrs: Vec<IpAddr> = [OPS].iter().map(|a| ip(a)).collect();
    let lab = Lab::new(&addrs).expect("building the namespaces");
    let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
    agent.env("KF_E2E_OPS", OPS_TOKEN);
    let yaml = config(agent.pin_path(), false).replace(
        "  console: {",
        &format!(
            "  tls: {{ cert: {}, key: {} }}\n  console: {{",
            cert.display(),
            key.display()
        ),
    );
    agent.launch(&yaml).expect("starting keyfence");
    assert!(
        !agent.log().contains("management_without_tls"),
        "no warning with TLS"
    );
    let s = Scenario { agent, lab };

    let page = tls_curl(&s, "/login", &[]);
    let cookie_line = page
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: kf_login="))
        .unwrap_or_else(|| panic!("{page}"));
    assert!(
        cookie_line.contains("Secure") && cookie_line.contains("HttpOnly"),
        "{cookie_line}"
    );
    let login_token = cookie_line.split(['=', ';']).nth(1).unwrap().to_owned();
    let signed = tls_curl(
        &s,
        "/login",
        &[
            "--cookie",
            &format!("kf_login={login_token}"),
            "--data",
            &format!("csrf={login_token}&token={OPS_TOKEN}"),
        ],
    );
    let session = signed
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: kf_session=")
        })
        .unwrap_or_else(|| panic!("{signed}"));
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Max-Age=3600"] {
        assert!(session.contains(flag), "{flag}: {session}");
    }
    let csp = page
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-security-policy:")
        })
        .unwrap_or_else(|| panic!("{page}"));
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    // The API speaks TLS on the same port; plain HTTP gets no answer.
    let api = tls_curl(
        &s,
        "/v1/keys",
        &["--header", &format!("Authorization: Bearer {OPS_TOKEN}")],
    );
    assert!(
        api.starts_with("HTTP/1.1 200") || api.starts_with("HTTP/2 200"),
        "{api}"
    );
    assert!(matches!(
        Curl::new(&s.lab.client, ip(OPS), console("/login")).send(),
        Reply::Failed(_)
    ));

    allowlist_check_over_tls(&s);

    // A renewed certificate serves the next connection, without a restart.
    let (second, second_key) = tls::self_signed(&dir, "second", &["192.0.2.1"]);
    thread::sleep(Duration::from_millis(1100));
    std::fs::copy(&second_key, &key).unwrap();
    std::fs::copy(&second, &cert).unwrap();
    let out = s
        .lab
        .client
        .command("sh")
        .args([
            "-c",
            &format!("openssl s_client -connect {GATEWAY_V4}:{MANAGEMENT} </dev/null 2>/dev/null | openssl x509 -noout -subject"),
        ])
        .output()
        .expect("openssl s_client");
    let subject = String::from_utf8_lossy(&out.stdout);
    assert!(
        subject.contains("second"),
        "the renewed certificate is served: {subject}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn console_forms_work_without_javascript() {
    let s = Scenario::start(true);
    set_source(&s.lab.client, OPS);
    let b =
        Browser::start_with(&s.lab.client, s.agent.dir(), 1024, false).expect("starting chromium");
    sign_in(&b, OPS_TOKEN);
    b.wait("#keys", WAIT).unwrap();
    let scripted = b.script("return 1;", &[]);
    assert!(
        scripted.is_ok(),
        "WebDriver scripts still run: {scripted:?}"
    );
    let live = b.source().unwrap();
    assert!(live.contains("console.js"), "the page names its script");

    // Create: the server checks the list; the code field is plainly there.
    b.goto(&console("/keys/new")).unwrap();
    b.type_into("#name", "no script").unwrap();
    b.type_into("#ip_allow_list", "192.0.2.10\n10.0.0.5/8")
        .unwrap();
    thread::sleep(Duration::from_millis(400));
    assert_eq!(
        b.text("#allow-check").unwrap(),
        "",
        "no live check without script"
    );
    b.click("#create").unwrap();
    b.wait_text("#entry-errors", "did you mean 10.0.0.0/8?", WAIT)
        .unwrap();
    shot(&b, "console-11-no-script-error");
    b.clear("#ip_allow_list").unwrap();
    b.type_into("#ip_allow_list", "192.0.2.10\n10.0.0.0/8")
        .unwrap();
    let t = now();
    b.type_into("#code", &code_at(t)).unwrap();
    b.click("#create").unwrap();
    b.wait("#secret", WAIT).unwrap();
    let copy_hidden = b.property("#copy", "hidden").unwrap();
    assert_eq!(copy_hidden, true, "the copy button needs script");
    b.click("#to-key").unwrap();
    b.wait("#editor", WAIT).unwrap();
    let id = b.text("#key-id").unwrap();

    // Edit: preview and save by plain form posts, the code in its field.
    b.type_into("#add", "203.0.113.0/24").unwrap();
    b.click("#preview-button").unwrap();
    b.wait_text("#preview", "+ 203.0.113.0/24", WAIT).unwrap();
    shot(&b, "console-12-no-script-preview");
    b.type_into("#code", &code_at(t + STEP_SECONDS)).unwrap();
    b.click("#save").unwrap();
    b.wait("#done", WAIT).expect("saved without script");
    let (_, key) = s.api("GET", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(
        key["ip_allow_list"],
        json!(["10.0.0.0/8", "192.0.2.10/32", "203.0.113.0/24"]),
        "{key}"
    );
}

/// Sign in with curl (the double-submit dance): the session cookie's value.
fn curl_session(s: &Scenario) -> String {
    let page = Curl::new(&s.lab.client, ip(OPS), console("/login"))
        .arg("--include")
        .send();
    let Reply::Answered { body: page, .. } = page else {
        panic!("{page:?}")
    };
    let login = page
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: kf_login=")
                .or_else(|| l.strip_prefix("Set-Cookie: kf_login="))
        })
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("{page}"))
        .to_owned();
    let signed = Curl::new(&s.lab.client, ip(OPS), console("/login"))
        .arg("--include")
        .header(&format!("Cookie: kf_login={login}"))
        .arg("--data")
        .arg(&format!("csrf={login}&token={OPS_TOKEN}"))
        .send();
    let Reply::Answered { body: signed, .. } = signed else {
        panic!("{signed:?}")
    };
    signed
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: kf_session=")
                .or_else(|| l.strip_prefix("Set-Cookie: kf_session="))
        })
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("{signed}"))
        .to_owned()
}

#[test]
fn the_keys_page_with_10000_keys_renders_in_time() {
    use keyfence::{
        allowlist::{DEFAULT_MAX_ENTRIES, RawList, parse_list},
        keys::{Key, Origin},
        store::{Actor, sqlite::SqliteStore},
    };
    let s = Scenario::start(false);
    let keys: Vec<Key> = (0..10_000u32)
        .map(|i| Key {
            id: format!("key_bulk{i:05}"),
            name: format!("bulk key {i}"),
            tenant: format!("tenant{}", i % 10),
            scopes: keyfence::keys::Scopes::API,
            digest: keyfence::keys::credentials::digest(&format!("bulk-secret-{i:020}")),
            allow: parse_list(
                &RawList::One(format!("203.0.113.{}, 2001:db8:{:x}::/48", i % 256, i)),
                DEFAULT_MAX_ENTRIES,
            )
            .expect("a list"),
            report_only: false,
            origin: Origin::Store,
        })
        .collect();
    let actor = Actor {
        principal: "admin:bulk".into(),
        address: ip(OPS),
    };
    SqliteStore::open(&s.agent.store_path())
        .expect("the agent's store")
        .create_many(&keys, &actor, SystemTime::now())
        .expect("10,000 keys in one transaction");
    let session = curl_session(&s);
    // Timed around curl (its own start-up, a few ms, included).
    let get = |path: &str| -> (u16, String, f64) {
        let started = std::time::Instant::now();
        let r = Curl::new(&s.lab.client, ip(OPS), console(path))
            .header(&format!("Cookie: kf_session={session}"))
            .send();
        let took = started.elapsed().as_secs_f64();
        let Reply::Answered { status, body, .. } = r else {
            panic!("{r:?}")
        };
        (status, body, took)
    };
    // The daemon takes the keys from the store's feed.
    let seen = keyfence_tests::netns::poll_until(
        Duration::from_mins(1),
        Duration::from_millis(500),
        || get("/keys").1.contains("10000 of 10000 keys"),
    );
    assert!(seen, "the keys page never listed the 10,000 keys");
    let mut times: Vec<f64> = (0..5).map(|_| get("/keys").2).collect();
    times.sort_by(f64::total_cmp);
    let (status, page, _) = get("/keys?q=bulk+key+99&tenant=tenant9&status=active");
    assert_eq!(status, 200);
    assert!(
        page.contains("12 of 10000 keys"),
        "99, 999 and 9909..9999 in tenant9"
    );
    let searched = get("/keys?q=bulk+key+99&tenant=tenant9&status=active").2;
    eprintln!(
        "keys page with 10,000 keys (first 500 rows): median {:.1} ms, min {:.1} ms, max {:.1} ms; filtered: {:.1} ms",
        times[2] * 1e3,
        times[0] * 1e3,
        times[4] * 1e3,
        searched * 1e3
    );
    assert!(times[2] < 2.0, "{times:?}");
}

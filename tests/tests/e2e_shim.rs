//! End to end through the HTTP shim: the real `keyfence` binary in the gateway
//! namespace with XDP on its veth, an echoing upstream on `127.0.0.1:8080`
//! behind it, and real clients (curl, nginx, HAProxy) speaking HTTP from
//! documentation addresses held by the client namespace. Needs root; run
//! through `cargo xtask test`.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use keyfence_tests::{
    config,
    http::{Curl, Daemon, Reply, Upstream, raw_exchange, require, url},
    netns::{Agent, GATEWAY_V4, GATEWAY_V6, Lab, poll_until},
    tls,
};

const API: u16 = 8443;
const STRICT: u16 = 8444;
const AUTH: u16 = 8445;
const PROXY_PROTOCOL: u16 = 8446;
const XFF: u16 = 8447;
const TLS: u16 = 8448;
const BROKEN: u16 = 8449;
/// Proxy listener reading `X-API-Key` too; forwards the checked credential.
const KEYED: u16 = 8450;
/// Like `keyed`, with `forward_credential: false`.
const HIDDEN: u16 = 8451;
/// nginx (`auth_request` to listener `auth`) in the gateway.
const NGINX: u16 = 8090;
/// HAProxy (PROXY v2 to listener `pp`) in the gateway.
const HAPROXY: u16 = 8091;
const UPSTREAM: &str = "127.0.0.1:8080";

const DENIED_BODY: &str = r#"{"error":"IP address not allowed"}"#;
const INVALID_BODY: &str = r#"{"error":"invalid API key"}"#;

/// Every address the client host holds.
const CLIENT_ADDRS: &[&str] = &[
    "192.0.2.10",
    "192.0.2.11",
    "192.0.2.12",
    "192.0.2.13",
    "192.0.2.20",
    "192.0.2.30",
    "192.0.2.31",
    "192.0.2.40",
    "192.0.2.41",
    "192.0.2.50",
    "192.0.2.51",
    "192.0.2.60",
    "192.0.2.61",
    "192.0.2.70",
    "192.0.2.71",
    "192.0.2.80",
    "192.0.2.81",
    "198.51.100.7",
    "198.51.100.200",
    "198.51.100.250",
    "203.0.113.8",
    "203.0.113.11",
    "203.0.113.12",
    "203.0.113.99",
    "2001:db8:1::5",
    "2001:db8:2::10",
    "2001:db8:2::11",
    "2001:db8:3:4::5",
    "2001:db8:4::1",
];

/// `(key id, tenant, allow list as YAML, report_only)`; each key's secret is
/// `secret_of(id)`, passed in `KF_E2E_<ID>`.
const KEYS: &[(&str, &str, &str, bool)] = &[
    ("anyone", "default", "", false),
    ("single", "default", r#"["192.0.2.10"]"#, false),
    ("host32", "default", r#"["192.0.2.12/32"]"#, false),
    ("net24", "default", r#"["198.51.100.0/24"]"#, false),
    // A /16 around the documentation range 192.0.2.0/24: no traffic goes
    // beyond the namespaces' own addresses.
    ("net16", "default", r#"["192.0.0.0/16"]"#, false),
    ("net30", "default", r#"["203.0.113.8/30"]"#, false),
    (
        "mixed",
        "default",
        r#"["192.0.2.20", "198.51.100.128/25", "2001:db8:1::/64"]"#,
        false,
    ),
    ("v6single", "default", r#"["2001:db8:2::10"]"#, false),
    ("v6prefix", "default", r#"["2001:db8:3::/48"]"#, false),
    (
        "prodoffice",
        "default",
        r#""192.0.2.30, 192.0.2.31, 203.0.113.0/24""#,
        false,
    ),
    ("reportonly", "default", r#"["192.0.2.80"]"#, true),
    ("a", "strict", r#"["192.0.2.40"]"#, false),
    ("b", "strict", r#"["192.0.2.41"]"#, false),
    ("edge", "edge", r#"["192.0.2.60"]"#, false),
    ("x", "xff", r#"["192.0.2.70"]"#, false),
    ("y", "xff", r#"["192.0.2.71"]"#, false),
    // Lists the trusted proxy's own network: it must never work for a client
    // the shim cannot name.
    ("proxynet", "xff", r#"["198.51.100.0/24"]"#, false),
];

fn secret_of(id: &str) -> String {
    format!("e2e-{id}-secret-0123456789abcdef")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

/// The gateway's address of `source`'s family, at `port`.
fn gateway(source: IpAddr, port: u16) -> SocketAddr {
    match source {
        IpAddr::V4(_) => SocketAddr::new(GATEWAY_V4.into(), port),
        IpAddr::V6(_) => SocketAddr::new(GATEWAY_V6.into(), port),
    }
}

/// What varies between the tests' configs.
#[derive(Default)]
struct Options<'a> {
    /// Extra YAML list of key `tester` (empty: `["192.0.2.50"]`).
    tester: Option<&'a str>,
    rejection_body: Option<&'a str>,
    tls: Option<(&'a Path, &'a Path)>,
    /// Key `temp` (tenant strict) lists 192.0.2.13 until this RFC 3339 time.
    temp_until: Option<String>,
}

fn config(pin: &Path, o: &Options<'_>) -> String {
    let mut keys = String::new();
    let tester = o.tester.unwrap_or(r#"["192.0.2.50"]"#);
    let temp = o.temp_until.as_ref().map_or_else(
        || r#"["192.0.2.41"]"#.to_owned(),
        |until| format!(r#"[{{ cidr: "192.0.2.13", note: "contractor", expires_at: "{until}" }}]"#),
    );
    for &(id, tenant, list, report_only) in KEYS.iter().chain(
        [
            ("tester", "default", tester, false),
            ("temp", "strict", temp.as_str(), false),
        ]
        .iter(),
    ) {
        let _ = writeln!(
            keys,
            "  - {{ id: {id}, name: {id}, tenant: {tenant}, secret_env: KF_E2E_{env}, report_only: {report_only}{list} }}",
            env = id.to_ascii_uppercase(),
            list = if list.is_empty() {
                String::new()
            } else {
                format!(", ip_allow_list: {list}")
            },
        );
    }
    let tls = o.tls.map_or_else(String::new, |(cert, key)| {
        format!(
            r#"
  - name: tls
    bind: "[::]:{TLS}"
    mode: proxy
    upstream: "http://{UPSTREAM}"
    tenants: [default]
    tls: {{ cert: "{}", key: "{}" }}"#,
            cert.display(),
            key.display()
        )
    });
    let rejection = o.rejection_body.map_or_else(String::new, |body| {
        format!("rejection: {{ status: 403, body: '{body}' }}\n")
    });
    format!(
        r#"{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: proxy, upstream: "http://{UPSTREAM}", tenants: [default] }}
  - {{ name: strict, bind: "[::]:{STRICT}", mode: proxy, upstream: "http://{UPSTREAM}", tenants: [strict] }}
  - name: auth
    bind: "127.0.0.1:{AUTH}"
    mode: auth
    tenants: [edge]
    client_ip: {{ source: x_forwarded_for, trusted_proxies: ["127.0.0.1/32"], hops: 1 }}
  - name: pp
    bind: "127.0.0.1:{PROXY_PROTOCOL}"
    mode: proxy
    upstream: "http://{UPSTREAM}"
    tenants: [edge]
    client_ip: {{ source: proxy_protocol, trusted_proxies: ["127.0.0.1/32"] }}
  - name: xff
    bind: "[::]:{XFF}"
    mode: proxy
    upstream: "http://{UPSTREAM}"
    tenants: [xff]
    client_ip: {{ source: x_forwarded_for, trusted_proxies: ["198.51.100.250/32"], hops: 1 }}
  - {{ name: broken, bind: "0.0.0.0:{BROKEN}", mode: proxy, upstream: "http://127.0.0.1:8099", tenants: [default] }}{tls}{credential}
keys:
{keys}{rejection}{metrics}
"#,
        datapath = config::datapath(pin, "auto"),
        metrics = config::metrics(),
        credential = credential_listeners(),
    )
}

/// Listeners `keyed` and `hidden`: keys from `Authorization` or `X-API-Key`,
/// the checked credential forwarded or not.
fn credential_listeners() -> String {
    format!(
        r#"
  - {{ name: keyed, bind: "[::]:{KEYED}", mode: proxy, upstream: "http://{UPSTREAM}", tenants: [default], key_header: X-API-Key }}
  - {{ name: hidden, bind: "[::]:{HIDDEN}", mode: proxy, upstream: "http://{UPSTREAM}", tenants: [default], key_header: X-API-Key, forward_credential: false }}"#
    )
}

/// Hosts, upstream and agent. Field order is drop order.
struct Scenario {
    agent: Agent,
    upstream: Upstream,
    lab: Lab,
}

impl Scenario {
    fn new(options: &Options<'_>) -> Self {
        let addrs: Vec<IpAddr> = CLIENT_ADDRS.iter().map(|a| ip(a)).collect();
        let lab = Lab::new(&addrs).expect("building the namespaces");
        let upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream address"))
            .expect("starting the upstream");
        let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
        for id in KEYS.iter().map(|k| k.0).chain(["tester", "temp"]) {
            agent.env(
                &format!("KF_E2E_{}", id.to_ascii_uppercase()),
                &secret_of(id),
            );
        }
        let yaml = config(agent.pin_path(), options);
        agent.launch(&yaml).expect("starting keyfence");
        Self {
            agent,
            upstream,
            lab,
        }
    }

    /// `GET path` on `port` from `source` with key `key`'s secret.
    fn get(&self, source: &str, port: u16, key: Option<&str>, path: &str) -> Reply {
        let source = ip(source);
        let mut curl = Curl::new(
            &self.lab.client,
            source,
            url("http", gateway(source, port), path),
        );
        if let Some(key) = key {
            curl = curl.bearer(&secret_of(key));
        }
        curl.send()
    }

    fn http_count(&self, listener: &str, outcome: &str) -> u64 {
        self.agent
            .http_count(listener, outcome)
            .expect("reading /metrics")
    }

    fn packet_count(&self, listener: &str, reason: &str) -> u64 {
        self.agent
            .packet_count(listener, reason)
            .expect("reading /metrics")
    }
}

/// The request reached the upstream, which saw the key id and the client
/// address appended to `X-Forwarded-For`.
#[track_caller]
fn assert_proxied(reply: &Reply, key: &str, client: &str, what: &str) {
    assert_eq!(reply.status(), Some(200), "{what}: {reply:?}");
    assert_eq!(
        reply.upstream_header("x-keyfence-key-id").as_deref(),
        Some(key),
        "{what}: the upstream did not see the key id: {reply:?}"
    );
    let xff = reply.upstream_header("x-forwarded-for").unwrap_or_default();
    assert!(
        xff.rsplit(',').next().map(str::trim) == Some(client),
        "{what}: X-Forwarded-For {xff:?} does not end with {client}"
    );
    assert!(
        reply.upstream_header("authorization").is_some(),
        "{what}: the credential is the upstream's business too; it must pass"
    );
}

#[track_caller]
fn assert_refused(reply: &Reply, body: &str, what: &str) {
    assert_eq!(reply.status(), Some(403), "{what}: {reply:?}");
    assert_eq!(reply.body(), body, "{what}: not the rejection body");
}

/// `(key, source, allowed)`: the seed scenarios on listener `api`.
const SEED: &[(&str, &str, bool)] = &[
    ("single", "192.0.2.10", true),
    ("single", "192.0.2.11", false),
    ("single", "2001:db8:1::5", false),
    ("host32", "192.0.2.12", true),
    ("host32", "192.0.2.13", false),
    ("net24", "198.51.100.7", true),
    ("net24", "198.51.100.200", true),
    ("net24", "203.0.113.99", false),
    ("net16", "192.0.2.11", true),
    ("net16", "198.51.100.7", false),
    ("net30", "203.0.113.8", true),
    ("net30", "203.0.113.11", true),
    ("net30", "203.0.113.12", false),
    ("mixed", "192.0.2.20", true),
    ("mixed", "198.51.100.200", true),
    ("mixed", "2001:db8:1::5", true),
    ("mixed", "198.51.100.7", false),
    ("mixed", "2001:db8:2::10", false),
    ("v6single", "2001:db8:2::10", true),
    ("v6single", "2001:db8:2::11", false),
    ("v6single", "192.0.2.10", false),
    ("v6prefix", "2001:db8:3:4::5", true),
    ("v6prefix", "2001:db8:4::1", false),
    ("prodoffice", "192.0.2.30", true),
    ("prodoffice", "192.0.2.31", true),
    ("prodoffice", "203.0.113.99", true),
    ("prodoffice", "192.0.2.10", false),
];

#[test]
fn seed_scenarios_answer_as_the_allow_lists_say() {
    let s = Scenario::new(&Options::default());
    let (allowed_before, refused_before) = (
        s.http_count("api", "allowed"),
        s.http_count("api", "ip_not_allowed"),
    );
    let mut allowed = 0;
    for &(key, source, expect_allowed) in SEED {
        let what = format!("key {key} from {source}");
        let reply = s.get(source, API, Some(key), "/v1/orders?page=2");
        if expect_allowed {
            assert_proxied(&reply, key, source, &what);
            let echo = reply.echo().expect("an echo");
            assert_eq!(echo["path"], "/v1/orders?page=2", "{what}: path changed");
            allowed += 1;
        } else {
            assert_refused(&reply, DENIED_BODY, &what);
        }
    }
    // The empty list works from every address the client holds.
    for source in CLIENT_ADDRS {
        let reply = s.get(source, API, Some("anyone"), "/");
        assert_proxied(
            &reply,
            "anyone",
            source,
            &format!("key anyone from {source}"),
        );
        allowed += 1;
    }
    let refused = SEED.iter().filter(|s| !s.2).count() as u64;
    assert_eq!(
        s.http_count("api", "allowed"),
        allowed_before + allowed,
        "keyfence_http_requests_total{{outcome=allowed}}"
    );
    assert_eq!(
        s.http_count("api", "ip_not_allowed"),
        refused_before + refused,
        "keyfence_http_requests_total{{outcome=ip_not_allowed}}"
    );
    assert_eq!(
        s.upstream.requests(),
        allowed,
        "refused requests reached the upstream"
    );
}

#[test]
fn missing_and_unknown_keys_get_401_and_the_helpers_answer() {
    let s = Scenario::new(&Options::default());
    let invalid_before = s.http_count("api", "invalid_key");
    let no_key = s.get("192.0.2.10", API, None, "/");
    assert_eq!(no_key.status(), Some(401), "{no_key:?}");
    assert_eq!(no_key.body(), INVALID_BODY);
    let unknown = Curl::new(
        &s.lab.client,
        ip("192.0.2.10"),
        url("http", gateway(ip("192.0.2.10"), API), "/"),
    )
    .bearer("e2e-nobody-secret-0123456789abcdef")
    .send();
    assert_eq!(unknown.status(), Some(401), "{unknown:?}");
    assert_eq!(unknown.body(), INVALID_BODY);
    // A key of another tenant is unknown on this listener.
    let other_tenant = s.get("192.0.2.40", API, Some("a"), "/");
    assert_eq!(other_tenant.status(), Some(401), "{other_tenant:?}");
    assert_eq!(s.http_count("api", "invalid_key"), invalid_before + 3);

    let ping = s.get("192.0.2.10", API, Some("single"), "/_keyfence/ping");
    assert_eq!(ping.status(), Some(200), "{ping:?}");
    assert_eq!(ping.body(), r#"{"message":"pong"}"#);
    let ping_refused = s.get("192.0.2.11", API, Some("single"), "/_keyfence/ping");
    assert_refused(&ping_refused, DENIED_BODY, "ping from an unlisted address");
    let ping_no_key = s.get("192.0.2.10", API, None, "/_keyfence/ping");
    assert_eq!(ping_no_key.status(), Some(401), "{ping_no_key:?}");

    // The address the shim sees; IPv4 clients of a dual-stack listener folded.
    for source in ["192.0.2.11", "2001:db8:1::5"] {
        let reply = s.get(source, API, None, "/_keyfence/ip");
        assert_eq!(reply.body(), format!(r#"{{"ip":"{source}"}}"#), "{reply:?}");
    }
    assert_eq!(
        s.upstream.requests(),
        0,
        "nothing here may reach the upstream"
    );
}

#[test]
fn layers_agree_the_datapath_drops_what_no_key_allows() {
    let s = Scenario::new(&Options::default());
    let dropped = s.packet_count("strict", "not_allowed");
    let answered: u64 = ["allowed", "ip_not_allowed", "invalid_key"]
        .iter()
        .map(|o| s.http_count("strict", o))
        .sum();

    // 203.0.113.99 is in no strict key's list: its SYN never reaches the shim.
    let reply = Curl::new(
        &s.lab.client,
        ip("203.0.113.99"),
        url("http", gateway(ip("203.0.113.99"), STRICT), "/"),
    )
    .bearer(&secret_of("a"))
    .connect_timeout(Duration::from_millis(800))
    .send();
    assert_eq!(reply, Reply::TimedOut, "the datapath should drop it");
    assert!(
        s.packet_count("strict", "not_allowed") > dropped,
        "the datapath's not_allowed counter did not move"
    );
    let answered_after: u64 = ["allowed", "ip_not_allowed", "invalid_key"]
        .iter()
        .map(|o| s.http_count("strict", o))
        .sum();
    assert_eq!(answered_after, answered, "the shim saw a dropped client");

    // Key A's address with key B: packets pass (A's list), the shim refuses.
    assert_refused(
        &s.get("192.0.2.40", STRICT, Some("b"), "/"),
        DENIED_BODY,
        "key b from key a's address",
    );
    assert_proxied(
        &s.get("192.0.2.40", STRICT, Some("a"), "/"),
        "a",
        "192.0.2.40",
        "key a from its address",
    );
    assert_proxied(
        &s.get("192.0.2.41", STRICT, Some("b"), "/"),
        "b",
        "192.0.2.41",
        "key b from its address",
    );
    assert_eq!(s.http_count("strict", "ip_not_allowed"), 1);
    assert_eq!(s.http_count("strict", "allowed"), 2);
}

/// "Testing IP restrictions": add the client's address, remove it, put it back,
/// each by editing the config file; the agent never restarts.
#[test]
fn allow_list_edits_in_the_config_apply_without_restart() {
    let mut s = Scenario::new(&Options::default());
    let pid = s.agent.pid();
    let pin = s.agent.pin_path().to_owned();
    let client = "192.0.2.51";
    let status = |s: &Scenario| s.get(client, API, Some("tester"), "/").status();
    assert_eq!(status(&s), Some(403), "before: not listed");

    let steps: [(&str, Option<&str>, u16); 3] = [
        ("add", Some(r#"["192.0.2.50", "192.0.2.51"]"#), 200),
        ("remove", None, 403),
        ("put back", Some(r#""192.0.2.50, 192.0.2.51""#), 200),
    ];
    for (i, (step, list, want)) in steps.into_iter().enumerate() {
        let yaml = config(
            &pin,
            &Options {
                tester: list,
                ..Options::default()
            },
        );
        // Both ways editors save: in place, and write-then-rename.
        if i % 2 == 0 {
            s.agent.write_config(&yaml).expect("editing the config");
        } else {
            s.agent.replace_config(&yaml).expect("replacing the config");
        }
        let applied = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            status(&s) == Some(want)
        });
        assert!(applied, "{step}: not {want} within 5 s of the edit");
        let reply = s.get(client, API, Some("tester"), "/");
        if want == 200 {
            assert_proxied(&reply, "tester", client, step);
        } else {
            assert_refused(&reply, DENIED_BODY, step);
        }
        // The other address of the list never stopped working.
        assert_proxied(
            &s.get("192.0.2.50", API, Some("tester"), "/"),
            "tester",
            "192.0.2.50",
            step,
        );
    }
    assert!(s.agent.is_running(), "the agent exited");
    assert_eq!(s.agent.pid(), pid, "the agent was restarted");
}

#[test]
fn report_only_keys_pass_and_count_and_the_rejection_template_renders() {
    let template =
        r#"{"message":"source IP {ip} is not allowed for this API key","key":"{key_id}"}"#;
    let s = Scenario::new(&Options {
        rejection_body: Some(template),
        ..Options::default()
    });
    let would_refuse = s.http_count("api", "report_only");
    assert_proxied(
        &s.get("192.0.2.81", API, Some("reportonly"), "/"),
        "reportonly",
        "192.0.2.81",
        "report-only key from an unlisted address",
    );
    assert_eq!(
        s.http_count("api", "report_only"),
        would_refuse + 1,
        "the would-be refusal was not counted"
    );
    assert_proxied(
        &s.get("192.0.2.80", API, Some("reportonly"), "/"),
        "reportonly",
        "192.0.2.80",
        "report-only key from its address",
    );
    assert_eq!(s.http_count("api", "report_only"), would_refuse + 1);

    assert_refused(
        &s.get("192.0.2.11", API, Some("single"), "/"),
        r#"{"message":"source IP 192.0.2.11 is not allowed for this API key","key":"single"}"#,
        "templated rejection",
    );
    assert_refused(
        &s.get("2001:db8:2::11", API, Some("v6single"), "/"),
        r#"{"message":"source IP 2001:db8:2::11 is not allowed for this API key","key":"v6single"}"#,
        "templated rejection over IPv6",
    );
}

#[test]
fn an_unreachable_upstream_answers_502() {
    let s = Scenario::new(&Options::default());
    let reply = s.get("192.0.2.10", BROKEN, Some("single"), "/");
    assert_eq!(reply.status(), Some(502), "{reply:?}");
    assert_eq!(s.http_count("broken", "upstream_error"), 1);
    // A refusal is still a refusal there.
    assert_refused(
        &s.get("192.0.2.11", BROKEN, Some("single"), "/"),
        DENIED_BODY,
        "refused on the broken listener",
    );
}

#[test]
fn a_forged_x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let s = Scenario::new(&Options::default());
    let from = |source: &str, key: &str, xff: &str, path: &str| {
        let source = ip(source);
        Curl::new(
            &s.lab.client,
            source,
            url("http", gateway(source, XFF), path),
        )
        .bearer(&secret_of(key))
        .header(&format!("X-Forwarded-For: {xff}"))
        .send()
    };
    // 192.0.2.71 claims to be key x's 192.0.2.70: its own address counts.
    assert_refused(
        &from("192.0.2.71", "x", "192.0.2.70", "/"),
        DENIED_BODY,
        "forged X-Forwarded-For",
    );
    let seen = from("192.0.2.71", "x", "192.0.2.70", "/_keyfence/ip");
    assert_eq!(seen.body(), r#"{"ip":"192.0.2.71"}"#, "{seen:?}");
    // The trusted proxy 198.51.100.250 speaks for its clients.
    let via_proxy = from("198.51.100.250", "x", "192.0.2.70", "/");
    assert_proxied(
        &via_proxy,
        "x",
        "198.51.100.250",
        "through the trusted proxy",
    );
    assert_eq!(
        via_proxy.upstream_header("x-forwarded-for").as_deref(),
        Some("192.0.2.70, 198.51.100.250"),
        "the chain is kept and the proxy appended"
    );
    assert_refused(
        &from("198.51.100.250", "x", "192.0.2.71", "/"),
        DENIED_BODY,
        "through the trusted proxy for another client",
    );
    // Rightmost untrusted entry wins: a client-written left part is ignored.
    assert_refused(
        &from("198.51.100.250", "x", "192.0.2.70, 192.0.2.71", "/"),
        DENIED_BODY,
        "forged left part behind the trusted proxy",
    );
}

fn nginx_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    server {{
        listen {NGINX};
        listen [::]:{NGINX};
        location / {{
            auth_request /_keyfence_auth;
            auth_request_set $keyfence_key_id $upstream_http_x_keyfence_key_id;
            proxy_set_header X-Keyfence-Key-Id $keyfence_key_id;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_pass http://{UPSTREAM};
        }}
        location = /_keyfence_auth {{
            internal;
            proxy_pass http://127.0.0.1:{AUTH};
            proxy_pass_request_body off;
            proxy_set_header Content-Length '';
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"
    )
}

#[test]
fn nginx_auth_request_in_front_of_an_auth_listener() {
    require("nginx").expect("nginx");
    let s = Scenario::new(&Options::default());
    let dir = s.agent.dir().to_owned();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_config(&dir)).expect("writing nginx.conf");
    let _nginx = Daemon::nginx(
        &s.lab.gateway,
        &dir,
        &conf,
        SocketAddr::from(([127, 0, 0, 1], NGINX)),
    )
    .expect("starting nginx");

    let allowed = s.get("192.0.2.60", NGINX, Some("edge"), "/v1/things");
    assert_eq!(allowed.status(), Some(200), "{allowed:?}");
    assert_eq!(
        allowed.upstream_header("x-keyfence-key-id").as_deref(),
        Some("edge"),
        "nginx passed keyfence's key id on: {allowed:?}"
    );
    let refused = s.get("192.0.2.61", NGINX, Some("edge"), "/v1/things");
    assert_eq!(refused.status(), Some(403), "{refused:?}");
    let no_key = s.get("192.0.2.60", NGINX, None, "/v1/things");
    assert_eq!(no_key.status(), Some(401), "{no_key:?}");
    assert_eq!(
        s.upstream.requests(),
        1,
        "only the allowed request is proxied"
    );
    assert_eq!(s.http_count("auth", "allowed"), 1);
    assert_eq!(s.http_count("auth", "ip_not_allowed"), 1);
    assert_eq!(s.http_count("auth", "invalid_key"), 1);
}

#[test]
fn haproxy_sends_proxy_v2_to_a_proxy_protocol_listener() {
    require("haproxy").expect("haproxy");
    let s = Scenario::new(&Options::default());
    let dir = s.agent.dir().to_owned();
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\nfrontend edge\n    bind :::{HAPROXY} v4v6\n    default_backend keyfence\nbackend keyfence\n    server kf 127.0.0.1:{PROXY_PROTOCOL} send-proxy-v2\n"
        ),
    )
    .expect("writing haproxy.cfg");
    let _haproxy = Daemon::start(
        &s.lab.gateway,
        "haproxy",
        &["-db", "-f", &conf.to_string_lossy()],
        &dir.join("haproxy.out"),
        SocketAddr::from(([127, 0, 0, 1], HAPROXY)),
    )
    .expect("starting haproxy");

    let allowed = s.get("192.0.2.60", HAPROXY, Some("edge"), "/");
    assert_proxied(&allowed, "edge", "192.0.2.60", "through HAProxy");
    let refused = s.get("192.0.2.61", HAPROXY, Some("edge"), "/");
    assert_refused(&refused, DENIED_BODY, "through HAProxy, unlisted client");
    let seen = s.get("192.0.2.61", HAPROXY, None, "/_keyfence/ip");
    assert_eq!(seen.body(), r#"{"ip":"192.0.2.61"}"#, "{seen:?}");

    assert_eq!(s.upstream.requests(), 1);
}

/// One raw exchange with listener `pp` from `source` on the gateway's
/// loopback: `(answer, closed after)`; the close must come within 3 s.
fn pp_exchange(s: &Scenario, source: &str, bytes: Vec<u8>) -> (String, Duration) {
    let (answer, closed) = raw_exchange(
        &s.lab.gateway,
        ip(source),
        SocketAddr::from(([127, 0, 0, 1], PROXY_PROTOCOL)),
        bytes,
        Duration::from_secs(3),
    )
    .expect("talking to listener pp");
    let closed =
        closed.unwrap_or_else(|| panic!("pp kept the connection from {source} open: {answer:?}"));
    (answer, closed)
}

/// A request for listener `pp` (key `edge`) behind `header`.
fn behind(header: &str, path: &str) -> Vec<u8> {
    format!(
        "{header}GET {path} HTTP/1.1\r\nHost: pp\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        secret_of("edge")
    )
    .into_bytes()
}

/// `proxy_protocol` (SPEC §4): a trusted peer must send the header, an
/// untrusted one is closed whatever it sends, and PROXY v1 works end to end
/// (HAProxy above speaks v2). Each refusal is a close without a byte of
/// answer, before the 5 s PROXY header timeout, and nothing reaches the
/// upstream or the request counters: the reason is the header, not the key
/// or the address.
#[test]
fn proxy_protocol_is_required_from_trusted_peers_and_refused_from_others() {
    let s = Scenario::new(&Options::default());
    let counted = |s: &Scenario| -> u64 {
        ["allowed", "ip_not_allowed", "invalid_key", "bad_request"]
            .iter()
            .map(|o| s.http_count("pp", o))
            .sum()
    };

    // PROXY v1 from the trusted proxy (127.0.0.1): the announced client decides.
    let (answer, _) = pp_exchange(
        &s,
        "127.0.0.1",
        behind("PROXY TCP4 192.0.2.60 127.0.0.1 51000 8446\r\n", "/v1"),
    );
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "v1, allowed client: {answer:?}"
    );
    assert!(
        answer.contains(r#""x-forwarded-for":"192.0.2.60""#),
        "the upstream should see the announced client: {answer:?}"
    );
    let (answer, _) = pp_exchange(
        &s,
        "127.0.0.1",
        behind("PROXY TCP4 192.0.2.61 127.0.0.1 51000 8446\r\n", "/v1"),
    );
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "v1, unlisted client: {answer:?}"
    );
    assert!(answer.ends_with(DENIED_BODY), "{answer:?}");
    let (answer, _) = pp_exchange(
        &s,
        "127.0.0.1",
        behind(
            "PROXY TCP6 2001:db8:9::7 ::1 51000 8446\r\n",
            "/_keyfence/ip",
        ),
    );
    assert!(
        answer.ends_with(r#"{"ip":"2001:db8:9::7"}"#),
        "v1 TCP6: {answer:?}"
    );
    // UNKNOWN (a health check): the proxy speaks for itself.
    let (answer, _) = pp_exchange(
        &s,
        "127.0.0.1",
        behind("PROXY UNKNOWN\r\n", "/_keyfence/ip"),
    );
    assert!(
        answer.ends_with(r#"{"ip":"127.0.0.1"}"#),
        "v1 UNKNOWN: {answer:?}"
    );
    assert_eq!(
        s.upstream.requests(),
        1,
        "only the allowed request is proxied"
    );
    let before = counted(&s);

    // The trusted proxy without a header: closed, nothing answered.
    let (answer, closed) = pp_exchange(&s, "127.0.0.1", behind("", "/v1"));
    assert_eq!(
        answer, "",
        "a trusted peer without a PROXY header was answered"
    );
    assert!(
        closed < Duration::from_secs(2),
        "closed after {closed:?}, not at once"
    );
    // A malformed v1 header: the same.
    let (answer, _) = pp_exchange(
        &s,
        "127.0.0.1",
        behind("PROXY TCP4 192.0.2.60 ::1 51000 8446\r\n", "/v1"),
    );
    assert_eq!(answer, "", "a malformed PROXY header was answered");

    // An untrusted peer (127.0.0.2 is loopback, but not in trusted_proxies)
    // announcing an allowed client with a well-formed header: closed.
    let (answer, closed) = pp_exchange(
        &s,
        "127.0.0.2",
        behind("PROXY TCP4 192.0.2.60 127.0.0.1 51000 8446\r\n", "/v1"),
    );
    assert_eq!(answer, "", "an untrusted peer's PROXY header was believed");
    assert!(
        closed < Duration::from_secs(2),
        "closed after {closed:?}, not at once"
    );
    let (answer, _) = pp_exchange(&s, "127.0.0.2", behind("", "/_keyfence/ip"));
    assert_eq!(answer, "", "an untrusted peer was served without a header");

    assert_eq!(
        s.upstream.requests(),
        1,
        "a refused connection reached the upstream"
    );
    assert_eq!(
        counted(&s),
        before,
        "a refused connection counted as a request"
    );
}

#[test]
fn tls_listener_with_a_test_certificate_and_reload() {
    require("openssl").expect("openssl");
    let dir = std::env::temp_dir().join(format!("kf-e2e-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let (cert, key) = tls::self_signed(&dir, "first", &["192.0.2.1", "2001:db8::1"]);
    let s = Scenario::new(&Options {
        tls: Some((&cert, &key)),
        ..Options::default()
    });
    let https = |source: &str, key_id: &str, ca: &Path, http2: bool| {
        let source = ip(source);
        let mut curl = Curl::new(
            &s.lab.client,
            source,
            url("https", gateway(source, TLS), "/"),
        )
        .bearer(&secret_of(key_id))
        .arg("--cacert")
        .arg(&ca.to_string_lossy());
        curl = curl.arg(if http2 { "--http2" } else { "--http1.1" });
        curl.send()
    };
    for (source, http2) in [("192.0.2.10", false), ("192.0.2.10", true)] {
        let reply = https(source, "single", &cert, http2);
        assert_proxied(&reply, "single", source, "over TLS");
        let Reply::Answered { http_version, .. } = &reply else {
            unreachable!()
        };
        assert_eq!(http_version, if http2 { "2" } else { "1.1" }, "ALPN");
    }
    assert_refused(
        &https("2001:db8:2::11", "v6single", &cert, true),
        DENIED_BODY,
        "over TLS, unlisted",
    );

    // A renewed certificate is picked up without restart.
    let (new_cert, new_key) = tls::self_signed(&dir, "second", &["192.0.2.1", "2001:db8::1"]);
    std::fs::copy(&new_key, &key).expect("replacing the key");
    std::fs::copy(&new_cert, &cert).expect("replacing the certificate");
    let reloaded = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        https("192.0.2.10", "single", &new_cert, false).status() == Some(200)
    });
    assert!(reloaded, "the new certificate was not served within 15 s");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_expired_entry_stops_matching_on_time_in_both_layers() {
    let until = std::time::SystemTime::now() + Duration::from_secs(4);
    let s = Scenario::new(&Options {
        temp_until: Some(humantime::format_rfc3339_seconds(until).to_string()),
        ..Options::default()
    });
    assert_proxied(
        &s.get("192.0.2.13", STRICT, Some("temp"), "/"),
        "temp",
        "192.0.2.13",
        "before expiry",
    );
    std::thread::sleep(
        until
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(300),
    );
    let dropped = s.packet_count("strict", "not_allowed");
    let expired = poll_until(Duration::from_secs(3), Duration::from_millis(100), || {
        Curl::new(
            &s.lab.client,
            ip("192.0.2.13"),
            url("http", gateway(ip("192.0.2.13"), STRICT), "/"),
        )
        .bearer(&secret_of("temp"))
        .connect_timeout(Duration::from_millis(500))
        .send()
            == Reply::TimedOut
    });
    assert!(expired, "192.0.2.13 still passes after its entry expired");
    assert!(s.packet_count("strict", "not_allowed") > dropped);
}

#[test]
fn oversized_headers_and_bodies_and_slow_clients_are_cut_off() {
    let s = Scenario::new(&Options::default());
    let client = ip("192.0.2.10");
    let dest = gateway(client, API);
    let auth = format!("Authorization: Bearer {}", secret_of("single"));

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: api\r\n{auth}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let (answer, closed) = keyfence_tests::http::raw_exchange(
        &s.lab.client,
        client,
        dest,
        huge.into_bytes(),
        Duration::from_secs(5),
    )
    .expect("sending a 100 KiB header");
    assert!(closed.is_some(), "the connection stayed open");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "a 100 KiB header must be refused: {answer:?}"
    );

    let big_body =
        format!("POST / HTTP/1.1\r\nHost: api\r\n{auth}\r\nContent-Length: 17000000\r\n\r\n");
    let (answer, _) = keyfence_tests::http::raw_exchange(
        &s.lab.client,
        client,
        dest,
        big_body.into_bytes(),
        Duration::from_secs(5),
    )
    .expect("announcing a 17 MB body");
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "a body over the limit must get 413: {answer:?}"
    );

    // Half a request head, then silence: cut off after the header read timeout.
    let slow = b"GET / HTTP/1.1\r\nHost: api\r\n".to_vec();
    let (_, closed) = keyfence_tests::http::raw_exchange(
        &s.lab.client,
        client,
        dest,
        slow,
        Duration::from_secs(20),
    )
    .expect("a slow client");
    let closed = closed.expect("a silent client must be cut off within 20 s");
    assert!(
        closed >= Duration::from_secs(9) && closed < Duration::from_secs(15),
        "cut off after {closed:?}, expected about 10 s"
    );
    assert_eq!(
        s.upstream.requests(),
        0,
        "none of these may reach the upstream"
    );
}

#[test]
fn sigterm_lets_requests_in_flight_finish() {
    let mut s = Scenario::new(&Options::default());
    let client = &s.lab.client;
    let in_flight = std::thread::scope(|scope| {
        let request = scope.spawn(|| {
            Curl::new(
                client,
                ip("192.0.2.10"),
                url("http", gateway(ip("192.0.2.10"), API), "/slow/1500"),
            )
            .bearer(&secret_of("single"))
            .send()
        });
        std::thread::sleep(Duration::from_millis(500));
        let status = s.agent.sigterm().expect("SIGTERM");
        assert!(status.success(), "keyfence exited {status} on SIGTERM");
        request.join().expect("the request thread")
    });
    assert_proxied(
        &in_flight,
        "single",
        "192.0.2.10",
        "in flight during SIGTERM",
    );
    // The listener is closed now; the pinned datapath still drops strangers.
    let after = s.get("192.0.2.10", API, Some("single"), "/");
    assert!(
        matches!(&after, Reply::Failed(e) if e.contains("refused") || e.contains("(7)")),
        "nothing listens after the drain: {after:?}"
    );
}

const SEVERAL_BODY: &str = r#"{"error":"more than one API key credential"}"#;

impl Scenario {
    /// A request from `source` to `port` with raw header lines and curl arguments.
    fn send(&self, source: &str, port: u16, path: &str, headers: &[&[u8]], args: &[&str]) -> Reply {
        let source = ip(source);
        let mut curl = Curl::new(
            &self.lab.client,
            source,
            url("http", gateway(source, port), path),
        );
        for line in headers {
            curl = curl.header_bytes(line);
        }
        for arg in args {
            curl = curl.arg(arg);
        }
        curl.send()
    }
}

/// `Authorization: Bearer <secret of key>` as a header line.
fn bearer_line(key: &str) -> Vec<u8> {
    format!("Authorization: Bearer {}", secret_of(key)).into_bytes()
}

fn api_key_line(key: &str) -> Vec<u8> {
    format!("X-API-Key: {}", secret_of(key)).into_bytes()
}

#[track_caller]
fn assert_several(reply: &Reply, what: &str) {
    assert_eq!(reply.status(), Some(400), "{what}: {reply:?}");
    assert_eq!(reply.body(), SEVERAL_BODY, "{what}");
}

/// Issue 13, finding 2: the shim checked the first credential and forwarded
/// them all, so a key that works from the attacker's address carried a stolen
/// one to the upstream.
#[test]
fn more_than_one_credential_is_refused_and_never_reaches_the_upstream() {
    let s = Scenario::new(&Options::default());
    // `single` works from 192.0.2.10; `net24` is the stolen key.
    let (mine, stolen) = (bearer_line("single"), api_key_line("net24"));
    let from = "192.0.2.10";
    assert_several(
        &s.send(from, KEYED, "/", &[&mine, &stolen], &[]),
        "Authorization and X-API-Key",
    );
    assert_several(
        &s.send(from, HIDDEN, "/", &[&mine, &stolen], &[]),
        "Authorization and X-API-Key, credential not forwarded",
    );
    assert_several(
        &s.send(from, KEYED, "/", &[&api_key_line("single"), &stolen], &[]),
        "two X-API-Key headers",
    );
    // An Authorization the shim cannot read (not UTF-8, or not Bearer) must
    // not let the key header be the one checked.
    assert_several(
        &s.send(
            from,
            KEYED,
            "/",
            &[b"Authorization: Bearer \xff\xfe", &api_key_line("single")],
            &[],
        ),
        "unreadable Authorization and X-API-Key",
    );
    assert_several(
        &s.send(
            from,
            KEYED,
            "/",
            &[
                b"Authorization: Basic dXNlcjpwdw==",
                &api_key_line("single"),
            ],
            &[],
        ),
        "Basic Authorization and X-API-Key",
    );
    // Two Authorization headers over HTTP/1.1 and HTTP/2 (prior knowledge).
    let two = [mine.as_slice(), &bearer_line("net24")];
    assert_several(
        &s.send(from, API, "/", &two, &[]),
        "two Authorization, HTTP/1.1",
    );
    let h2 = s.send(from, API, "/", &two, &["--http2-prior-knowledge"]);
    assert_several(&h2, "two Authorization, HTTP/2");
    assert!(
        matches!(&h2, Reply::Answered { http_version, .. } if http_version == "2"),
        "not HTTP/2: {h2:?}"
    );
    // The rule holds before the address is looked at, and in auth mode.
    assert_several(
        &s.send("192.0.2.11", API, "/", &two, &[]),
        "two Authorization from an unlisted address",
    );
    let auth_mode = Curl::new(
        &s.lab.gateway,
        ip("127.0.0.1"),
        format!("http://127.0.0.1:{AUTH}/"),
    )
    .bearer(&secret_of("edge"))
    .bearer(&secret_of("edge"))
    .send();
    assert_several(&auth_mode, "two Authorization on an auth listener");

    assert_eq!(s.http_count("keyed", "bad_request"), 4);
    assert_eq!(s.http_count("hidden", "bad_request"), 1);
    assert_eq!(s.http_count("api", "bad_request"), 3);
    assert_eq!(s.http_count("auth", "bad_request"), 1);
    for listener in ["keyed", "hidden", "api", "auth"] {
        assert_eq!(s.http_count(listener, "allowed"), 0, "{listener}");
    }
    assert_eq!(
        s.upstream.requests(),
        0,
        "a refused request reached the upstream"
    );
}

/// The upstream receives exactly the credential that was checked
/// (`forward_credential: true`, the default) or none (`false`).
#[test]
fn the_upstream_receives_exactly_the_checked_credential_or_none() {
    let s = Scenario::new(&Options::default());
    let from = "192.0.2.10";
    let secret = secret_of("single");
    for http2 in [false, true] {
        let args: &[&str] = if http2 {
            &["--http2-prior-knowledge"]
        } else {
            &[]
        };
        let what = |w: &str| format!("{w} (HTTP/{})", if http2 { "2" } else { "1.1" });

        let by_header = s.send(from, KEYED, "/", &[&api_key_line("single")], args);
        assert_eq!(by_header.status(), Some(200), "{by_header:?}");
        assert_eq!(
            by_header.upstream_header("x-api-key").as_deref(),
            Some(secret.as_str()),
            "{}: the checked X-API-Key, once",
            what("keyed")
        );
        assert_eq!(
            by_header.upstream_header("authorization"),
            None,
            "{}",
            what("keyed")
        );
        assert_eq!(
            by_header.upstream_header("x-keyfence-key-id").as_deref(),
            Some("single")
        );

        let by_bearer = s.send(from, KEYED, "/", &[&bearer_line("single")], args);
        assert_eq!(by_bearer.status(), Some(200), "{by_bearer:?}");
        assert_eq!(
            by_bearer.upstream_header("authorization"),
            Some(format!("Bearer {secret}")),
            "{}: the checked Authorization, once",
            what("keyed")
        );
        assert_eq!(by_bearer.upstream_header("x-api-key"), None);

        for line in [api_key_line("single"), bearer_line("single")] {
            let hidden = s.send(from, HIDDEN, "/", &[&line], args);
            assert_eq!(hidden.status(), Some(200), "{hidden:?}");
            assert_eq!(
                hidden.upstream_header("authorization"),
                None,
                "{}",
                what("hidden")
            );
            assert_eq!(
                hidden.upstream_header("x-api-key"),
                None,
                "{}",
                what("hidden")
            );
            assert_eq!(
                hidden.upstream_header("x-keyfence-key-id").as_deref(),
                Some("single"),
                "{}: the key id still tells the upstream who called",
                what("hidden")
            );
        }
    }
    assert_eq!(s.http_count("keyed", "allowed"), 4);
    assert_eq!(s.http_count("hidden", "allowed"), 4);
    assert_eq!(s.upstream.requests(), 8);
}

/// Issue 13, finding 1: a value of `X-Forwarded-For` that is not UTF-8 was
/// dropped whole, so the trusted proxy itself became the client.
#[test]
fn an_unreadable_x_forwarded_for_makes_the_client_unknown_never_the_proxy() {
    let s = Scenario::new(&Options::default());
    let proxy = "198.51.100.250";
    let with_xff = |source: &str, key: Option<&str>, xff: &[u8], path: &str| {
        let mut line = b"X-Forwarded-For: ".to_vec();
        line.extend_from_slice(xff);
        let mut headers = vec![line];
        if let Some(key) = key {
            headers.push(bearer_line(key));
        }
        let headers: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        s.send(source, XFF, path, &headers, &[])
    };
    let seen = with_xff(proxy, None, b"x\xff", "/_keyfence/ip");
    assert_eq!(seen.body(), r#"{"ip":"unknown"}"#, "{seen:?}");
    // Key proxynet lists the proxy's /24: an unknown client may not use it.
    assert_refused(
        &with_xff(proxy, Some("proxynet"), b"192.0.2.99\xff", "/"),
        DENIED_BODY,
        "unreadable X-Forwarded-For behind the trusted proxy",
    );
    // What nginx's $proxy_add_x_forwarded_for builds: the client's bytes on
    // the left, the address the proxy saw on the right of the same line.
    let nginx_line = b"192.0.2.99\xff, 192.0.2.70";
    assert_refused(
        &with_xff(proxy, Some("proxynet"), nginx_line, "/"),
        DENIED_BODY,
        "the client is 192.0.2.70, not the proxy",
    );
    let passed = with_xff(proxy, Some("x"), nginx_line, "/");
    assert_eq!(passed.status(), Some(200), "{passed:?}");
    assert_eq!(
        passed.upstream_header("x-forwarded-for").as_deref(),
        Some("192.0.2.99\u{fffd}, 192.0.2.70, 198.51.100.250"),
        "the chain goes upstream byte for byte with the proxy appended"
    );
    // An untrusted peer stays its own client, whatever bytes it sends.
    let direct = with_xff("192.0.2.71", None, b"x\xff", "/_keyfence/ip");
    assert_eq!(direct.body(), r#"{"ip":"192.0.2.71"}"#, "{direct:?}");
    assert_eq!(s.http_count("xff", "ip_not_allowed"), 2);
    assert_eq!(s.upstream.requests(), 1);
}

/// Issue 13, finding 9: a chunked body over 16 MiB was answered 502 and
/// counted as the upstream's failure.
#[test]
fn a_body_over_the_limit_gets_413_and_counts_as_a_bad_request() {
    let s = Scenario::new(&Options::default());
    let dir = std::env::temp_dir().join(format!("kf-e2e-body-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let write = |name: &str, mib: usize| {
        let path = dir.join(name);
        let chunk = vec![b'k'; 1024 * 1024];
        let mut file = std::fs::File::create(&path).expect("creating the body file");
        for _ in 0..mib {
            std::io::Write::write_all(&mut file, &chunk).expect("writing the body file");
        }
        format!("@{}", path.display())
    };
    let (big, small) = (write("17mib", 17), write("1mib", 1));
    let post = |file: &str, chunked: bool| {
        let mut args = vec!["--data-binary", file];
        if chunked {
            args.extend(["--header", "Transfer-Encoding: chunked"]);
        }
        s.send(
            "192.0.2.10",
            API,
            "/upload",
            &[&bearer_line("single")],
            &args,
        )
    };
    let too_large = r#"{"error":"request body too large"}"#;
    for (what, chunked) in [
        ("chunked, HTTP/1.1", true),
        ("Content-Length, HTTP/1.1", false),
    ] {
        let reply = post(&big, chunked);
        assert_eq!(reply.status(), Some(413), "{what}: {reply:?}");
        assert_eq!(reply.body(), too_large, "{what}");
    }
    // HTTP/2, with no length announced (the body is only known to be too
    // large once 16 MiB have streamed) and with one: the answer must reach
    // the client before the stream is reset.
    let secret = format!("Bearer {}", secret_of("single"));
    for announce in [false, true] {
        let h2 = keyfence_tests::http::h2_post(
            &s.lab.client,
            ip("192.0.2.10"),
            gateway(ip("192.0.2.10"), API),
            &[("authorization", &secret)],
            (17 * 1024 * 1024, announce),
            Duration::from_secs(20),
        )
        .expect("an HTTP/2 answer");
        assert_eq!(
            h2,
            (413, too_large.to_owned()),
            "HTTP/2, length announced: {announce}"
        );
    }
    assert_eq!(s.http_count("api", "bad_request"), 4);
    assert_eq!(s.http_count("api", "upstream_error"), 0);
    assert_eq!(
        s.upstream.requests(),
        0,
        "an over-limit body reached the application"
    );

    // Under the limit, a chunked body streams through whole.
    let reply = post(&small, true);
    assert_eq!(reply.status(), Some(200), "{reply:?}");
    assert_eq!(
        reply.echo().expect("an echo")["body_bytes"],
        1024 * 1024,
        "the upstream got the whole body"
    );
    assert_eq!(s.http_count("api", "allowed"), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `key_header` end to end: a key in `X-API-Key` is judged exactly as one in
/// `Authorization` on the listener that names the header (its list, its
/// secret), and is not read at all on a listener that does not.
#[test]
fn key_header_carries_a_key_judged_like_a_bearer() {
    let s = Scenario::new(&Options::default());
    let before = s.upstream.requests();
    let allowed = s.send("192.0.2.10", KEYED, "/k", &[&api_key_line("single")], &[]);
    assert_eq!(
        allowed.status(),
        Some(200),
        "X-API-Key from its address: {allowed:?}"
    );
    assert_eq!(
        allowed.upstream_header("x-keyfence-key-id").as_deref(),
        Some("single")
    );

    let elsewhere = s.send("192.0.2.11", KEYED, "/k", &[&api_key_line("single")], &[]);
    assert_refused(&elsewhere, DENIED_BODY, "X-API-Key from another address");
    let unknown = s.send(
        "192.0.2.10",
        KEYED,
        "/k",
        &[b"X-API-Key: e2e-nobody-secret-0123456789abcdef"],
        &[],
    );
    assert_eq!(unknown.status(), Some(401), "{unknown:?}");
    assert_eq!(unknown.body(), INVALID_BODY);
    // `api` has no key_header: the header is not a credential there.
    let unread = s.send("192.0.2.10", API, "/k", &[&api_key_line("single")], &[]);
    assert_eq!(
        unread.status(),
        Some(401),
        "X-API-Key on a listener without key_header: {unread:?}"
    );

    assert_eq!(
        s.upstream.requests(),
        before + 1,
        "only the allowed request is proxied"
    );
    assert_eq!(s.http_count("keyed", "allowed"), 1);
    assert_eq!(s.http_count("keyed", "ip_not_allowed"), 1);
    assert_eq!(s.http_count("keyed", "invalid_key"), 1);
    assert_eq!(s.http_count("api", "invalid_key"), 1);
}

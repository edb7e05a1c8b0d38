//! End to end through a proxy listener to upstreams of every kind: `h2c://`
//! (HTTP/2 with prior knowledge), `https://` with ALPN choosing HTTP/2 or
//! HTTP/1.1 and the certificate checked against `upstream_ca`, a timeout
//! (504), and HTTP/2 with prior knowledge from clients on a plain listener.
//! The upstreams are hyper servers in the gateway namespace
//! (`keyfence_tests::h2`); keyfence runs on three shim workers, so requests
//! are spread over `SO_REUSEPORT` sockets. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use keyfence_tests::{
    config,
    h2::{Alpn, HyperUpstream},
    http::{Curl, Reply, h2_get_concurrently, require, url},
    netns::{Agent, GATEWAY_V4, Lab},
};

const H2C: u16 = 8460;
const HTTPS_H2: u16 = 8461;
const HTTPS_H1: u16 = 8462;
const WRONG_CA: u16 = 8463;
const SLOW: u16 = 8464;
const PLAIN: u16 = 8465;
const UP_PLAIN: u16 = 8180;
const UP_TLS_H2: u16 = 8181;
const UP_TLS_H1: u16 = 8182;
const CLIENT: &str = "192.0.2.10";
const OTHER: &str = "192.0.2.11";
const SECRET: &str = "e2e-upstream-secret-0123456789abcdef";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA `name` (`dir/name-ca.crt`) and a certificate for 127.0.0.1
/// (the upstreams' address) it signed: `(ca, cert, key)`. webpki refuses a
/// self-signed certificate that is its own CA, so the chain is a real one.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let file = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let (ca, ca_key, cert, key, csr, ext) = (
        file("-ca.crt"),
        file("-ca.key"),
        file(".crt"),
        file(".key"),
        file(".csr"),
        file(".ext"),
    );
    let p = |p: &PathBuf| p.to_string_lossy().into_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let subject = format!("/CN={name} test CA");
    let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject];
    args.extend(ec);
    let (ca_s, ca_key_s) = (p(&ca), p(&ca_key));
    args.extend(["-keyout", &ca_key_s, "-out", &ca_s]);
    openssl(&args);
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    )
    .expect("writing the extensions");
    let (key_s, csr_s, cert_s, ext_s) = (p(&key), p(&csr), p(&cert), p(&ext));
    let mut args = vec!["req", "-subj", "/CN=127.0.0.1"];
    args.extend(ec);
    args.extend(["-keyout", &key_s, "-out", &csr_s]);
    openssl(&args);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr_s,
        "-CA",
        &ca_s,
        "-CAkey",
        &ca_key_s,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &ext_s,
        "-out",
        &cert_s,
    ]);
    (ca, cert, key)
}

fn yaml(pin: &Path, ca: &Path, wrong_ca: &Path) -> String {
    let (ca, wrong) = (ca.display(), wrong_ca.display());
    format!(
        r#"{datapath}
shim: {{ workers: 3 }}
listeners:
  - {{ name: h2c, bind: "[::]:{H2C}", mode: proxy, upstream: "h2c://127.0.0.1:{UP_PLAIN}" }}
  - {{ name: tls_h2, bind: "[::]:{HTTPS_H2}", mode: proxy, upstream: "https://127.0.0.1:{UP_TLS_H2}", upstream_ca: "{ca}" }}
  - {{ name: tls_h1, bind: "[::]:{HTTPS_H1}", mode: proxy, upstream: "https://127.0.0.1:{UP_TLS_H1}", upstream_ca: "{ca}" }}
  - {{ name: wrong_ca, bind: "[::]:{WRONG_CA}", mode: proxy, upstream: "https://127.0.0.1:{UP_TLS_H2}", upstream_ca: "{wrong}" }}
  - {{ name: slow, bind: "[::]:{SLOW}", mode: proxy, upstream: "http://127.0.0.1:{UP_PLAIN}", upstream_timeout: 500ms }}
  - {{ name: plain, bind: "[::]:{PLAIN}", mode: proxy, upstream: "http://127.0.0.1:{UP_PLAIN}" }}
keys:
  - {{ id: k, name: k, secret_env: KF_E2E_UPSTREAM, ip_allow_list: ["{CLIENT}"] }}
{metrics}
"#,
        // The shim alone decides here (no early drop), so refusals are 403s.
        datapath = config::datapath(pin, "off"),
        metrics = config::metrics(),
    )
}

/// Field order is drop order.
struct Scenario {
    agent: Agent,
    plain: HyperUpstream,
    _tls_h2: HyperUpstream,
    tls_h1: HyperUpstream,
    lab: Lab,
    dir: PathBuf,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Scenario {
    fn new() -> Self {
        require("openssl").expect("openssl");
        let lab = Lab::new(&[ip(CLIENT), ip(OTHER)]).expect("building the namespaces");
        let dir = std::env::temp_dir().join(format!("kf-e2e-upstream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let (ca, cert, key) = certificate(&dir, "upstream");
        let (wrong, _, _) = certificate(&dir, "other");
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let plain = HyperUpstream::start(&lab.gateway, local(UP_PLAIN), Alpn::Plain, None)
            .expect("h2c upstream");
        let tls_h2 = HyperUpstream::start(
            &lab.gateway,
            local(UP_TLS_H2),
            Alpn::TlsH2,
            Some((&cert, &key)),
        )
        .expect("TLS h2 upstream");
        let tls_h1 = HyperUpstream::start(
            &lab.gateway,
            local(UP_TLS_H1),
            Alpn::TlsH1,
            Some((&cert, &key)),
        )
        .expect("TLS http/1.1 upstream");
        let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
        agent.env("KF_E2E_UPSTREAM", SECRET);
        let config = yaml(agent.pin_path(), &ca, &wrong);
        agent.launch(&config).expect("starting keyfence");
        Self {
            agent,
            plain,
            _tls_h2: tls_h2,
            tls_h1,
            lab,
            dir,
        }
    }

    fn curl(&self, source: &str, port: u16, path: &str) -> Curl<'_> {
        Curl::new(
            &self.lab.client,
            ip(source),
            url("http", SocketAddr::new(GATEWAY_V4.into(), port), path),
        )
        .bearer(SECRET)
    }

    fn count(&self, listener: &str, outcome: &str) -> u64 {
        self.agent
            .http_count(listener, outcome)
            .expect("reading /metrics")
    }
}

/// The echo's protocol version, path and key id, after a 200.
#[track_caller]
fn echoed(reply: &Reply, what: &str) -> (String, String, String) {
    assert_eq!(reply.status(), Some(200), "{what}: {reply:?}");
    let echo = reply
        .echo()
        .unwrap_or_else(|| panic!("{what}: no echo: {reply:?}"));
    (
        echo["version"].as_str().unwrap_or_default().to_owned(),
        echo["path"].as_str().unwrap_or_default().to_owned(),
        echo["headers"]["x-keyfence-key-id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[test]
fn upstreams_over_h2c_and_tls_speak_the_protocol_they_name() {
    let s = Scenario::new();
    // h2c: HTTP/2 with prior knowledge to the upstream, whatever the client
    // spoke; the checked request's headers ride along.
    for (client_flag, client_version) in [("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")] {
        let reply = s.curl(CLIENT, H2C, "/v1/a?b=c").arg(client_flag).send();
        let (version, path, key) = echoed(&reply, "h2c upstream");
        assert_eq!(version, "HTTP/2.0", "{reply:?}");
        assert_eq!(path, "/v1/a?b=c");
        assert_eq!(key, "k");
        let Reply::Answered { http_version, .. } = &reply else {
            unreachable!()
        };
        assert_eq!(http_version, client_version, "the client's own protocol");
        let xff = reply.upstream_header("x-forwarded-for").unwrap_or_default();
        assert_eq!(xff, CLIENT, "{reply:?}");
    }
    // Refused requests never reach it.
    let refused = s.curl(OTHER, H2C, "/").send();
    assert_eq!(refused.status(), Some(403), "{refused:?}");

    // https: ALPN picks HTTP/2 where the upstream offers it, HTTP/1.1 where
    // it does not; the certificate is checked against upstream_ca.
    let (version, _, _) = echoed(&s.curl(CLIENT, HTTPS_H2, "/").send(), "https h2");
    assert_eq!(version, "HTTP/2.0");
    let (version, _, _) = echoed(&s.curl(CLIENT, HTTPS_H1, "/").send(), "https http/1.1");
    assert_eq!(version, "HTTP/1.1");
    // Two requests on one client connection (curl reuses it for a second
    // URL): the second goes out on the upstream connection the first opened.
    let many = s
        .curl(CLIENT, HTTPS_H1, "/one")
        .arg(&url(
            "http",
            SocketAddr::new(GATEWAY_V4.into(), HTTPS_H1),
            "/two",
        ))
        .send();
    assert_eq!(many.status(), Some(200), "{many:?}");
    assert_eq!(
        s.tls_h1.connections(),
        2,
        "one upstream connection per client connection, reused by its requests"
    );
    let untrusted = s.curl(CLIENT, WRONG_CA, "/").send();
    assert_eq!(untrusted.status(), Some(502), "{untrusted:?}");
    assert_eq!(s.count("wrong_ca", "upstream_error"), 1);
    assert_eq!(s.count("tls_h2", "allowed"), 1);
    assert_eq!(s.count("tls_h1", "allowed"), 3);
    assert_eq!(s.count("h2c", "allowed"), 2);
    assert_eq!(s.count("h2c", "ip_not_allowed"), 1);
}

#[test]
fn an_upstream_slower_than_upstream_timeout_answers_504() {
    let s = Scenario::new();
    let fast = s.curl(CLIENT, SLOW, "/slow/10").send();
    assert_eq!(fast.status(), Some(200), "{fast:?}");
    let slow = s.curl(CLIENT, SLOW, "/slow/2000").send();
    assert_eq!(slow.status(), Some(504), "{slow:?}");
    assert_eq!(slow.body(), r#"{"error":"upstream timed out"}"#);
    assert_eq!(s.count("slow", "upstream_error"), 1);
    assert_eq!(s.count("slow", "allowed"), 1);
    // The listener keeps serving after the abandoned exchange.
    let again = s.curl(CLIENT, SLOW, "/").send();
    assert_eq!(again.status(), Some(200), "{again:?}");
}

#[test]
fn h2c_from_clients_on_a_plain_listener() {
    let s = Scenario::new();
    let reply = s
        .curl(CLIENT, PLAIN, "/h2c")
        .arg("--http2-prior-knowledge")
        .send();
    let (version, path, key) = echoed(&reply, "h2c from the client");
    // HTTP/1.1 to an http:// upstream.
    assert_eq!(
        (version.as_str(), path.as_str(), key.as_str()),
        ("HTTP/1.1", "/h2c", "k")
    );
    let Reply::Answered { http_version, .. } = &reply else {
        unreachable!()
    };
    assert_eq!(http_version, "2");
    // The upstream got a Host although HTTP/2 requests carry none.
    assert!(reply.upstream_header("host").is_some(), "{reply:?}");
    let refused = s
        .curl(OTHER, PLAIN, "/")
        .arg("--http2-prior-knowledge")
        .send();
    assert_eq!(refused.status(), Some(403), "{refused:?}");
    // A connection each: the kernel spreads them over the workers' sockets,
    // and every one is served.
    for i in 0..30 {
        let reply = s.curl(CLIENT, PLAIN, &format!("/n/{i}")).send();
        assert_eq!(reply.status(), Some(200), "request {i}: {reply:?}");
    }
    assert_eq!(s.count("plain", "allowed"), 31);
}

#[test]
fn concurrent_http2_streams_from_one_client_each_get_their_answer() {
    let s = Scenario::new();
    let paths = ["/slow/300", "/slow/301", "/slow/302", "/slow/303"];
    let answers = h2_get_concurrently(
        &s.lab.client,
        ip(CLIENT),
        SocketAddr::new(GATEWAY_V4.into(), PLAIN),
        &[("authorization", &format!("Bearer {SECRET}"))],
        &paths,
        Duration::from_secs(10),
    )
    .expect("four streams on one connection");
    assert_eq!(answers.len(), paths.len(), "{answers:?}");
    for (path, (status, body)) in paths.iter().zip(&answers) {
        assert_eq!(*status, 200, "{path}: {body}");
        let echo: serde_json::Value = serde_json::from_str(body).expect(body);
        assert_eq!(echo["path"], *path, "{body}");
    }
    // The streams were in flight together: the connection's owned upstream
    // connection was busy, so the others opened their own.
    assert!(s.plain.connections() >= 2, "{}", s.plain.connections());
    assert_eq!(s.count("plain", "allowed"), 4);
}

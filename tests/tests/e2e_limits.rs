//! Connection limits end to end (issue 13, finding 4): the real `keyfence`
//! binary in the gateway namespace, clients in the client namespace opening
//! connections that never send, or send one byte, or go idle after a request
//! (HTTP/1.1 keep-alive and HTTP/2), and an agent run under a low descriptor
//! limit with its listeners flooded from several addresses. Needs root; run
//! through `cargo xtask test`.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use keyfence_tests::{
    http::{Curl, require, url},
    netns::{Agent, GATEWAY_V4, Lab, connect_from, parse_samples, poll_until},
};

const API: u16 = 8443;
const MANAGEMENT: u16 = 9900;
const KEY_SECRET: &str = "e2e-limits-key-secret-0123456789";
const OPS_TOKEN: &str = "e2e-limits-ops-token-0123456789";

/// The flooding client, a bystander, and the sources of the descriptor flood.
const FLOODER: &str = "192.0.2.10";
const BYSTANDER: &str = "192.0.2.11";
const SWARM: &[&str] = &[
    "192.0.2.20",
    "192.0.2.21",
    "192.0.2.22",
    "192.0.2.23",
    "192.0.2.24",
];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn api() -> SocketAddr {
    SocketAddr::new(GATEWAY_V4.into(), API)
}

/// One auth-mode listener with the given `connections` block, a key allowed
/// from all of 192.0.2.0/24, and the management API with admin `ops`.
fn config(connections: &str) -> String {
    format!(
        r#"datapath:
  mode: off
listeners:
  - name: api
    bind: "[::]:{API}"
    mode: auth
    connections: {connections}
keys:
  - id: ci
    name: CI
    secret_env: KF_E2E_KEY
    ip_allow_list: ["192.0.2.0/24"]
management:
  bind: "127.0.0.1:{MANAGEMENT}"
  admins:
    - {{ name: ops, token_env: KF_E2E_OPS, ip_allow_list: ["127.0.0.1"] }}
"#
    )
}

fn start(lab: &Lab, connections: &str, wrapper: &[&str]) -> anyhow::Result<Agent> {
    let mut agent = Agent::new(&lab.gateway)?;
    agent
        .env("KF_E2E_KEY", KEY_SECRET)
        .env("KF_E2E_OPS", OPS_TOKEN)
        .wrap(wrapper);
    agent.launch(&config(connections))?;
    Ok(agent)
}

/// `count` TCP connections from `source` to the listener, opened inside the
/// client namespace and handed back (a socket stays in its namespace).
fn open(lab: &Lab, source: &str, count: usize) -> anyhow::Result<Vec<(TcpStream, Instant)>> {
    let source = ip(source);
    lab.client
        .run(move || -> io::Result<Vec<(TcpStream, Instant)>> {
            (0..count)
                .map(|_| {
                    let s = connect_from(source, api(), Duration::from_secs(2))?;
                    Ok((s, Instant::now()))
                })
                .collect()
        })?
        .map_err(Into::into)
}

/// Wait at most `within` for the peer to close `stream`: the time it took, or
/// `None` if it was still open then. Bytes the server sends are skipped.
fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            // A reset is a close too.
            Err(_) => return Some(Instant::now()),
        }
    }
}

/// A counter or gauge summed over the samples with `labels`.
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<u64> {
    let total: f64 = parse_samples(&agent.metrics()?, name)
        .iter()
        .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum();
    #[expect(
        clippy::cast_sign_loss,
        reason = "these metrics are non-negative integers below 2^53"
    )]
    Ok(total.round() as u64)
}

/// True when `took` lies in `target - early ..= target + late`.
fn around(took: Duration, target: Duration, early_ms: u64, late_ms: u64) -> bool {
    took >= target.saturating_sub(Duration::from_millis(early_ms))
        && took <= target + Duration::from_millis(late_ms)
}

fn ping(lab: &Lab, source: &str) -> Option<u16> {
    Curl::new(
        &lab.client,
        ip(source),
        url("http", api(), "/_keyfence/ping"),
    )
    .bearer(KEY_SECRET)
    .send()
    .status()
}

fn management(lab: &Lab) -> Option<u16> {
    Curl::new(
        &lab.gateway,
        ip("127.0.0.1"),
        format!("http://127.0.0.1:{MANAGEMENT}/v1/keys"),
    )
    .bearer(OPS_TOKEN)
    .send()
    .status()
}

fn ping_request() -> Vec<u8> {
    format!(
        "GET /_keyfence/ping HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY_SECRET}\r\n\r\n"
    )
    .into_bytes()
}

/// Read one HTTP/1.1 response head (and its short body) off a keep-alive
/// connection: the bytes up to and including the body's closing brace.
fn read_response(stream: &mut TcpStream) -> anyhow::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("pong\"}") {
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(
            n > 0,
            "closed before the answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// The regression of the finding: more silent connections than the cap from
/// one allowed address. The excess are closed at once and counted; the others
/// (and one that sent a single byte) are closed at the header timeout; while
/// they are held, `/metrics`, the management API and another client answer.
#[test]
fn silent_connections_are_capped_and_closed_at_the_header_timeout() -> anyhow::Result<()> {
    require("curl")?;
    let header = Duration::from_secs(2);
    let mut addrs = vec![ip(FLOODER), ip(BYSTANDER)];
    addrs.extend(SWARM.iter().map(|s| ip(s)));
    let lab = Lab::new(&addrs)?;
    let agent = start(
        &lab,
        "{ header_timeout: 2s, idle_timeout: 10s, max_per_source: 20 }",
        &[],
    )?;

    let mut held = open(&lab, FLOODER, 20)?;
    // The shim's workers accept from their own SO_REUSEPORT sockets, in no
    // order across them: the 20 are admitted before the excess is opened, so
    // that the excess is what the cap refuses.
    let admitted = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        metric(&agent, "keyfence_connections_open", &[("listener", "api")]).ok() == Some(20)
    });
    assert!(admitted, "the 20 connections were not all admitted");
    let mut excess = open(&lab, FLOODER, 10)?;
    // One of the held ones sends a byte of a request head, and no more.
    held[0].0.write_all(b"G")?;
    for (i, (stream, _)) in excess.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_millis(500)).is_some(),
            "connection {} over the cap of 20 was not closed at once",
            20 + i
        );
    }
    // While the 20 are held: the other servers and another client answer.
    assert_eq!(agent.get("/readyz")?.0, 200);
    assert_eq!(
        metric(
            &agent,
            "keyfence_connections_refused_total",
            &[("listener", "api"), ("reason", "per_source_limit")]
        )?,
        10
    );
    assert_eq!(
        metric(&agent, "keyfence_connections_open", &[("listener", "api")])?,
        20
    );
    assert_eq!(management(&lab), Some(200));
    assert_eq!(ping(&lab, BYSTANDER), Some(200));
    // The flooder itself is at its cap: a 21st connection is refused too.
    assert_eq!(ping(&lab, FLOODER), None);

    for (i, (stream, opened)) in held.iter_mut().enumerate() {
        let closed = closed_within(stream, header + Duration::from_secs(3))
            .unwrap_or_else(|| panic!("held connection {i} still open 5 s after the accept"));
        let after = closed.duration_since(*opened);
        assert!(
            around(after, header, 300, 1500),
            "held connection {i} closed {after:?} after the accept (header timeout {header:?})"
        );
    }
    assert_eq!(
        metric(
            &agent,
            "keyfence_connections_timed_out_total",
            &[("listener", "api"), ("reason", "header_timeout")]
        )?,
        20
    );
    assert_eq!(
        metric(&agent, "keyfence_connections_open", &[("listener", "api")])?,
        0
    );
    // The source's slots are free again.
    assert_eq!(ping(&lab, FLOODER), Some(200));
    Ok(())
}

/// HTTP/1.1 keep-alive: a connection idle after a request stays past the
/// header timeout and is closed at the idle timeout; one that starts the next
/// request with a single byte is closed at the header timeout after that byte.
#[test]
fn keep_alive_connections_get_the_idle_and_the_header_timeout() -> anyhow::Result<()> {
    let (header, idle) = (Duration::from_secs(1), Duration::from_secs(4));
    let lab = Lab::new(&[ip(FLOODER)])?;
    let agent = start(
        &lab,
        "{ header_timeout: 1s, idle_timeout: 4s, max_per_source: 20 }",
        &[],
    )?;
    let mut conns = open(&lab, FLOODER, 2)?;
    let (mut idle_conn, mut slow_conn) = {
        let mut it = conns.drain(..);
        (it.next().expect("two").0, it.next().expect("two").0)
    };
    for stream in [&mut idle_conn, &mut slow_conn] {
        stream.write_all(&ping_request())?;
        let answer = read_response(stream)?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let answered = Instant::now();
    thread::sleep(Duration::from_millis(300));
    slow_conn.write_all(b"G")?;
    let byte_sent = Instant::now();
    let slow_closed = closed_within(&mut slow_conn, Duration::from_secs(3))
        .expect("a connection that sent one byte of its next head stayed open");
    let after_byte = slow_closed.duration_since(byte_sent);
    assert!(
        around(after_byte, header, 300, 1000),
        "closed {after_byte:?} after the next head's first byte (header timeout {header:?})"
    );
    let idle_closed = closed_within(&mut idle_conn, idle + Duration::from_secs(3))
        .expect("an idle keep-alive connection was never closed");
    let after_idle = idle_closed.duration_since(answered);
    assert!(
        around(after_idle, idle, 300, 1500),
        "idle keep-alive closed {after_idle:?} after its answer (idle timeout {idle:?})"
    );
    let timed_out = |reason: &str| {
        metric(
            &agent,
            "keyfence_connections_timed_out_total",
            &[("listener", "api"), ("reason", reason)],
        )
    };
    assert_eq!(timed_out("header_timeout")?, 1);
    assert_eq!(timed_out("idle_timeout")?, 1);
    Ok(())
}

/// One HTTP/2 frame: `(type, flags, stream, payload)`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("a small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK literal with incremental indexing, name from the static table.
fn literal(index: u8, value: &str) -> Vec<u8> {
    let mut out = vec![0x40 | index, u8::try_from(value.len()).expect("short")];
    out.extend_from_slice(value.as_bytes());
    out
}

/// HTTP/2 (prior knowledge): after one request the connection goes idle and
/// is closed gracefully (GOAWAY) at the idle timeout, not at the header one.
#[test]
fn idle_http2_connections_are_closed_with_goaway() -> anyhow::Result<()> {
    let idle = Duration::from_secs(3);
    let lab = Lab::new(&[ip(FLOODER)])?;
    let agent = start(
        &lab,
        "{ header_timeout: 1s, idle_timeout: 3s, max_per_source: 20 }",
        &[],
    )?;
    let (mut stream, _) = open(&lab, FLOODER, 1)?.pop().expect("one");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    // GET http://gw/_keyfence/ping with the key (:method GET = 2,
    // :scheme http = 6, :path = 4, :authority = 1, authorization = 23).
    let mut block = vec![0x82, 0x86];
    block.extend(literal(4, "/_keyfence/ping"));
    block.extend(literal(1, "gw"));
    block.extend(literal(23, &format!("Bearer {KEY_SECRET}")));
    hello.extend(frame(0x1, 0x5, 1, &block));
    stream.write_all(&hello)?;

    // Read frames: answer SETTINGS and PING, note the response and GOAWAY.
    let started = Instant::now();
    let (mut answered, mut goaway, mut closed) = (None, None, None);
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while closed.is_none() && started.elapsed() < idle + Duration::from_secs(5) {
        match stream.read(&mut chunk) {
            Ok(0) => closed = Some(Instant::now()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => closed = Some(Instant::now()),
        }
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                0x4 if flags & 1 == 0 => {
                    let _ = stream.write_all(&frame(0x4, 1, 0, &[]));
                }
                0x6 if flags & 1 == 0 => {
                    let _ = stream.write_all(&frame(0x6, 1, 0, &payload));
                }
                0x1 => answered = answered.or(Some(Instant::now())),
                0x7 => goaway = goaway.or(Some(Instant::now())),
                _ => {}
            }
        }
    }
    let answered = answered.expect("no HEADERS answer to the HTTP/2 request");
    let goaway = goaway.expect("no GOAWAY on the idle HTTP/2 connection");
    let after = goaway.duration_since(answered);
    assert!(
        around(after, idle, 300, 1500),
        "GOAWAY {after:?} after the answer (idle timeout {idle:?})"
    );
    assert!(closed.is_some(), "the connection stayed open after GOAWAY");
    assert_eq!(
        metric(
            &agent,
            "keyfence_connections_timed_out_total",
            &[("listener", "api"), ("reason", "idle_timeout")]
        )?,
        1
    );
    Ok(())
}

/// At a descriptor limit of 256 with the listener flooded from five addresses
/// (300 connections held open, more than the process could hold), the
/// listener refuses what would eat the reserve, and `/metrics` and the
/// management API still answer.
#[test]
fn management_and_metrics_answer_at_the_descriptor_limit() -> anyhow::Result<()> {
    require("curl")?;
    require("prlimit")?;
    let addrs: Vec<IpAddr> = SWARM.iter().map(|s| ip(s)).collect();
    let lab = Lab::new(&addrs)?;
    let agent = start(
        &lab,
        "{ header_timeout: 60s, idle_timeout: 60s, max_per_source: 60 }",
        &["prlimit", "--nofile=256:256", "--"],
    )?;
    let log = agent.plain_log();
    assert!(
        log.contains("descriptor limit") && log.contains("soft=256") && log.contains("reserve=64"),
        "the agent did not log its descriptor limit:\n{log}"
    );
    let mut flood = Vec::new();
    for source in SWARM {
        flood.extend(open(&lab, source, 60)?);
    }
    assert_eq!(flood.len(), 300);
    // Give the agent a moment to accept (and refuse) the whole backlog.
    thread::sleep(Duration::from_millis(500));
    for attempt in 0..3 {
        let metrics = agent.get("/metrics");
        assert!(
            matches!(metrics, Ok((200, _))),
            "/metrics did not answer under the flood (attempt {attempt}): {metrics:?}"
        );
        assert_eq!(management(&lab), Some(200), "management under the flood");
    }
    let open_now = metric(&agent, "keyfence_connections_open", &[("listener", "api")])?;
    let refused = metric(
        &agent,
        "keyfence_connections_refused_total",
        &[("listener", "api"), ("reason", "descriptor_reserve")],
    )?;
    // The listener holds no descriptor numbered 192 (256 - 64) or above.
    assert!(
        open_now > 0 && open_now < 192,
        "{open_now} connections open"
    );
    assert_eq!(
        open_now + refused,
        300,
        "{open_now} open + {refused} refused for the reserve"
    );
    // The refused ones were closed, the admitted ones are still open.
    let mut closed = 0u64;
    for (stream, _) in &mut flood {
        if closed_within(stream, Duration::from_millis(20)).is_some() {
            closed += 1;
        }
    }
    assert_eq!(closed, refused);
    drop(flood);
    Ok(())
}

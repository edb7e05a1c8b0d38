//! Operations end to end: restarts of the real agent under load. Needs root;
//! run through `cargo xtask test`.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use keyfence_tests::{
    http::{Curl, Reply, Upstream, url},
    netns::{Agent, Connect, GATEWAY_V4, Lab, tcp_connect},
};

const API: u16 = 8443;
const UPSTREAM: &str = "127.0.0.1:8080";
const SECRET: &str = "e2e-ops-prod-secret-0123456789";
const ALLOWED: &str = "192.0.2.10";
const REFUSED: &str = "192.0.2.66";
const RESTARTS: usize = 3;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn config(pin: &Path) -> String {
    format!(
        r#"datapath: {{ interfaces: [gw0], mode: auto, pin_path: "{pin}" }}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: proxy, upstream: "http://{UPSTREAM}" }}
keys:
  - {{ id: prod, name: prod, secret_env: KF_E2E_PROD, ip_allow_list: ["{ALLOWED}"] }}
metrics: {{ bind: "127.0.0.1:9901" }}
"#,
        pin = pin.display()
    )
}

/// What one allowed request met, after retrying refused connects.
#[derive(Debug)]
struct Outcome {
    reply: Reply,
    /// Connects refused (nobody listening during a restart) and retried.
    retried: u32,
}

/// `GET /v1/orders` with the key, retrying a refused connect every 50 ms for
/// up to 5 s: what a client with connect retries sees across a restart.
fn allowed_request(lab: &Lab) -> Outcome {
    let dest = SocketAddr::new(GATEWAY_V4.into(), API);
    let mut retried = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = Curl::new(&lab.client, ip(ALLOWED), url("http", dest, "/v1/orders"))
            .connect_timeout(Duration::from_secs(1))
            .bearer(SECRET)
            .send();
        // curl exit 7: the connect was refused (RST: nobody listening).
        let refused = matches!(&reply, Reply::Failed(why) if why.contains("curl: (7)"));
        if refused && Instant::now() < deadline {
            retried += 1;
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        return Outcome { reply, retried };
    }
}

/// Three SIGTERM restarts while one client sends allowed requests and another
/// tries connections from an address no key allows: no allowed request fails
/// (beyond connects refused while no agent listens, which are retried), and the
/// refused source never completes a handshake, also while the agent is away.
#[test]
fn three_restarts_under_load_lose_no_allowed_request_and_open_nothing() {
    let lab = Lab::new(&[ip(ALLOWED), ip(REFUSED)]).expect("building the namespaces");
    let _upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream"))
        .expect("starting the upstream");
    let mut agent =
        Agent::start(&lab.gateway, &[("KF_E2E_PROD", SECRET)], config).expect("starting keyfence");
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let max_run = Duration::from_secs(40);

    let (allowed, refused) = thread::scope(|scope| {
        let allowed_client = scope.spawn(|| {
            let mut outcomes = Vec::new();
            // Bounded: at most 600 requests, 40 s.
            for _ in 0..600 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > max_run {
                    break;
                }
                outcomes.push(allowed_request(&lab));
                thread::sleep(Duration::from_millis(30));
            }
            outcomes
        });
        let refused_client = scope.spawn(|| {
            // An attempt every 50 ms, each waiting 300 ms for a handshake.
            let mut attempts = Vec::new();
            let dest = SocketAddr::new(GATEWAY_V4.into(), API);
            let client = &lab.client;
            for _ in 0..400 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > max_run {
                    break;
                }
                attempts.push(scope.spawn(move || {
                    tcp_connect(client, ip(REFUSED), dest, Duration::from_millis(300))
                }));
                thread::sleep(Duration::from_millis(50));
            }
            attempts
                .into_iter()
                .map(|h| h.join().expect("attempt thread"))
                .collect::<Vec<_>>()
        });
        for _ in 0..RESTARTS {
            thread::sleep(Duration::from_millis(800));
            agent
                .restart()
                .expect("restarting keyfence (SIGTERM, start)");
        }
        thread::sleep(Duration::from_millis(800));
        stop.store(true, Ordering::SeqCst);
        (
            allowed_client.join().expect("allowed client"),
            refused_client.join().expect("refused client"),
        )
    });

    let failed: Vec<&Outcome> = allowed
        .iter()
        .filter(|o| o.reply.status() != Some(200))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} allowed requests failed: {failed:?}",
        failed.len(),
        allowed.len()
    );
    assert!(
        allowed.len() >= 30,
        "only {} allowed requests",
        allowed.len()
    );
    let handshakes: Vec<&Connect> = refused.iter().filter(|c| !c.timed_out()).collect();
    assert!(
        handshakes.is_empty(),
        "{} of {} attempts from {REFUSED} were not dropped: {handshakes:?}",
        handshakes.len(),
        refused.len()
    );
    assert!(
        refused.len() >= 20,
        "only {} refused attempts",
        refused.len()
    );
    let retried: u32 = allowed.iter().map(|o| o.retried).sum();
    eprintln!(
        "{RESTARTS} restarts: {} allowed requests all answered 200 ({retried} refused connects retried); {} attempts from {REFUSED} all dropped",
        allowed.len(),
        refused.len()
    );
}

/// `keyfence run --detach-on-exit`: on SIGTERM the agent drains, detaches its
/// programs and removes the pins, so a source the datapath dropped now meets
/// the kernel (a RST: nobody listens) instead of silence. Without the flag the
/// pins stay (the other tests show them enforcing).
#[test]
fn detach_on_exit_removes_the_datapath() {
    let lab = Lab::new(&[ip(ALLOWED), ip(REFUSED)]).expect("building the namespaces");
    let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
    agent.env("KF_E2E_PROD", SECRET).run_arg("--detach-on-exit");
    agent
        .write_config(&config(agent.pin_path()))
        .expect("writing the config");
    agent.spawn().expect("starting keyfence");
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("keyfence becomes ready");
    let dest = SocketAddr::new(GATEWAY_V4.into(), API);
    let before = tcp_connect(&lab.client, ip(REFUSED), dest, Duration::from_millis(500));
    assert!(before.timed_out(), "dropped while attached: {before:?}");
    assert!(agent.pin_path().exists(), "pinned while running");

    let status = agent.sigterm().expect("SIGTERM");
    assert!(status.success(), "a clean exit: {status}\n{}", agent.log());
    assert!(
        !agent.pin_path().exists(),
        "the pins are gone: {}",
        agent.pin_path().display()
    );
    let links = lab
        .gateway
        .exec(&["ip", "-d", "link", "show", "gw0"])
        .expect("ip link");
    assert!(
        !links.contains("xdp"),
        "no XDP program left on gw0:\n{links}"
    );
    let after = tcp_connect(&lab.client, ip(REFUSED), dest, Duration::from_millis(500));
    assert!(
        matches!(after, Connect::Refused),
        "after detaching, the SYN reaches the kernel: {after:?}"
    );
    assert!(
        agent.log().contains("datapath detached and pins removed"),
        "{}",
        agent.log()
    );
}

/// One structured log line per refused request (key id, client, listener,
/// reason) with `--log-format json`, rate-limited: a burst of 400 refusals
/// writes a bounded number of lines while the counters count every one.
#[test]
fn refusals_are_logged_as_json_and_rate_limited() {
    const BURST: usize = 200;
    let lab = Lab::new(&[ip(ALLOWED)]).expect("building the namespaces");
    let _upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream"))
        .expect("starting the upstream");
    let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
    agent
        .env("KF_E2E_PROD", SECRET)
        .env("KF_E2E_OTHER", "e2e-ops-other-secret-0123456789")
        .run_arg("--log-format")
        .run_arg("json");
    let yaml = config(agent.pin_path()).replace(
        "keys:\n",
        "keys:\n  - { id: other, name: other, secret_env: KF_E2E_OTHER, ip_allow_list: [\"198.51.100.7\"] }\n",
    );
    agent.write_config(&yaml).expect("writing the config");
    agent.spawn().expect("starting keyfence");
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("keyfence becomes ready");
    let target = url(
        "http",
        SocketAddr::new(GATEWAY_V4.into(), API),
        "/v1/orders",
    );
    let started = Instant::now();
    for secret in ["e2e-ops-other-secret-0123456789", "not-a-key-0123456789"] {
        // One curl, BURST requests on one connection.
        let mut curl = Curl::new(&lab.client, ip(ALLOWED), target.clone()).bearer(secret);
        for _ in 1..BURST {
            curl = curl.arg(&target);
        }
        let reply = curl.send();
        assert!(
            matches!(reply, Reply::Answered { .. }),
            "the burst was answered: {reply:?}"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let refused = agent.http_count("api", "ip_not_allowed").expect("metrics");
    let invalid = agent.http_count("api", "invalid_key").expect("metrics");
    assert_eq!(
        (refused, invalid),
        (BURST as u64, BURST as u64),
        "every request counted"
    );

    let log = agent.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request refused")
        .collect();
    for reason in ["ip_not_allowed", "invalid_key"] {
        assert!(
            lines.iter().any(|v| v["fields"]["reason"] == reason),
            "a {reason} line:\n{log}"
        );
    }
    let sample = lines
        .iter()
        .find(|v| v["fields"]["reason"] == "ip_not_allowed")
        .expect("an ip_not_allowed line");
    assert_eq!(sample["fields"]["key_id"], "other");
    assert_eq!(sample["fields"]["client"], ALLOWED);
    assert_eq!(sample["fields"]["listener"], "api");
    // 20 at once, then 20 per second.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a small bound"
    )]
    let bound = 20 + (20.0 * (elapsed + 1.0)) as usize;
    assert!(
        lines.len() >= 20 && lines.len() <= bound && lines.len() < 2 * BURST,
        "{} refusal lines for {} refusals in {elapsed:.2} s (bound {bound})",
        lines.len(),
        2 * BURST
    );
}

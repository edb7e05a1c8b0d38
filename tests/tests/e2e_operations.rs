//! Operations end to end: restarts of the real agent under load, reloads,
//! detaching, refusal logs. Needs root;
//! run through `cargo xtask test`.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use keyfence_tests::{
    config,
    http::{Curl, Reply, Upstream, url},
    netns::{
        Agent, Connect, GATEWAY_V4, Lab, connect_from, enter, keyfence_bin, parse_samples,
        poll_until, tcp_connect,
    },
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
        r#"{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: proxy, upstream: "http://{UPSTREAM}" }}
keys:
  - {{ id: prod, name: prod, secret_env: KF_E2E_PROD, ip_allow_list: ["{ALLOWED}"] }}
{metrics}
"#,
        datapath = config::datapath(pin, "auto"),
        metrics = config::metrics(),
    )
}

/// What one allowed request met, after retrying refused connects.
#[derive(Debug)]
struct Outcome {
    reply: Reply,
    /// Connects refused (nobody listening during a restart) and retried.
    retried: u32,
    /// When the first try started and the answer came.
    began: Instant,
    ended: Instant,
}

/// `GET /v1/orders` with the key, retrying a refused connect every 50 ms for
/// up to 5 s: what a client with connect retries sees across a restart.
fn allowed_request(lab: &Lab) -> Outcome {
    let dest = SocketAddr::new(GATEWAY_V4.into(), API);
    let mut retried = 0;
    let began = Instant::now();
    let deadline = began + Duration::from_secs(5);
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
        return Outcome {
            reply,
            retried,
            began,
            ended: Instant::now(),
        };
    }
}

/// Each restart gap `(from, to)` held at least one allowed request in flight
/// and two refused attempts started inside it.
fn assert_gaps_under_load(
    gaps: &[(Instant, Instant)],
    allowed: &[Outcome],
    refused: &[(Instant, Connect)],
) {
    for (n, (from, to)) in gaps.iter().enumerate() {
        let in_flight = allowed
            .iter()
            .filter(|o| o.began <= *to && o.ended >= *from)
            .count();
        let tried = refused
            .iter()
            .filter(|(at, _)| at >= from && at <= to)
            .count();
        assert!(
            in_flight >= 1 && tried >= 2,
            "restart {n} (a gap of {:?}) was not under load: {in_flight} allowed requests in flight, {tried} refused attempts started",
            to.duration_since(*from)
        );
    }
}

/// Three SIGTERM restarts while one client sends allowed requests and another
/// tries connections from an address no key allows: no allowed request fails
/// (beyond connects refused while no agent listens, which are retried), and the
/// refused source never completes a handshake, also while the agent is away.
/// Each restart's gap (from the SIGTERM to the new agent's readiness) is
/// shown to have been under load: allowed requests in flight and refused
/// attempts started inside it.
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

    let (allowed, refused, gaps) = thread::scope(|scope| {
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
                let at = Instant::now();
                attempts.push((
                    at,
                    scope.spawn(move || {
                        tcp_connect(client, ip(REFUSED), dest, Duration::from_millis(300))
                    }),
                ));
                thread::sleep(Duration::from_millis(50));
            }
            attempts
                .into_iter()
                .map(|(at, h)| (at, h.join().expect("attempt thread")))
                .collect::<Vec<_>>()
        });
        let mut gaps = Vec::new();
        for _ in 0..RESTARTS {
            thread::sleep(Duration::from_millis(800));
            let from = Instant::now();
            agent.sigterm().expect("SIGTERM");
            agent.spawn().expect("starting keyfence again");
            agent
                .wait_ready(Duration::from_secs(30))
                .expect("keyfence ready again");
            gaps.push((from, Instant::now()));
        }
        thread::sleep(Duration::from_millis(800));
        stop.store(true, Ordering::SeqCst);
        (
            allowed_client.join().expect("allowed client"),
            refused_client.join().expect("refused client"),
            gaps,
        )
    });
    assert_gaps_under_load(&gaps, &allowed, &refused);
    let refused: Vec<Connect> = refused.into_iter().map(|(_, c)| c).collect();

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

/// A client that connected just before a SIGTERM and sends its request only
/// after it still gets its answer, with `Connection: close`, and the agent
/// then exits: stopping closes connections between requests, never one whose
/// first request is still on its way (that would reset it; stop 21's CI run
/// lost an allowed request of the restart test this way).
#[test]
fn a_connection_opened_before_sigterm_gets_its_first_request_answered() {
    let lab = Lab::new(&[ip(ALLOWED)]).expect("building the namespaces");
    let _upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream"))
        .expect("starting the upstream");
    let mut agent =
        Agent::start(&lab.gateway, &[("KF_E2E_PROD", SECRET)], config).expect("starting keyfence");
    let dest = SocketAddr::new(GATEWAY_V4.into(), API);
    let path = lab.client.path();
    let (connected_tx, connected) = mpsc::channel();
    let client = thread::spawn(move || -> anyhow::Result<String> {
        enter(&path)?;
        let mut stream = connect_from(ip(ALLOWED), dest, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        connected_tx.send(())?;
        // The SIGTERM lands in this pause.
        thread::sleep(Duration::from_millis(700));
        write!(
            stream,
            "GET /v1/orders HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
        )?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    });
    connected
        .recv_timeout(Duration::from_secs(5))
        .expect("the client connected");
    // Long enough for the agent to have accepted the connection.
    thread::sleep(Duration::from_millis(200));
    let status = agent.sigterm().expect("keyfence stops after answering");
    assert!(status.success(), "keyfence exited with {status}");
    let reply = client
        .join()
        .expect("client thread")
        .expect("the request got an answer, not a reset");
    let head = reply
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "answer: {reply:?}");
    assert!(head.contains("connection: close"), "answer: {reply:?}");
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
        .launch(&config(agent.pin_path()))
        .expect("starting keyfence");
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
    agent.launch(&yaml).expect("starting keyfence");
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

/// `keyfence_config_reloads_total{result}` and
/// `keyfence_config_last_reload_successful`.
#[derive(Clone, Copy, Debug)]
struct Reloads {
    success: f64,
    failure: f64,
    last_ok: bool,
}

fn reloads(agent: &Agent) -> Reloads {
    let text = agent.metrics().expect("reading /metrics");
    let count = |result: &str| {
        parse_samples(&text, "keyfence_config_reloads_total")
            .iter()
            .find(|s| s.label("result") == Some(result))
            .map_or(0.0, |s| s.value)
    };
    Reloads {
        success: count("success"),
        failure: count("failure"),
        last_ok: parse_samples(&text, "keyfence_config_last_reload_successful")
            .first()
            .is_some_and(|s| s.value > 0.5),
    }
}

/// Lay the config out as a Kubernetes `ConfigMap` volume does and publish
/// `yaml` the way its atomic writer does: a new timestamped directory, a
/// `..data_tmp` symlink to it renamed over `..data`; `keyfence.yaml` is a
/// symlink through `..data` and never changes itself.
fn configmap_publish(dir: &Path, generation: u32, yaml: &str) {
    use std::os::unix::fs::symlink;
    let version = format!("..2026_12_01_00_00_0{generation}.{generation}");
    fs::create_dir(dir.join(&version)).expect("a ConfigMap version directory");
    fs::write(dir.join(&version).join("keyfence.yaml"), yaml).expect("the ConfigMap's file");
    symlink(&version, dir.join("..data_tmp")).expect("..data_tmp");
    fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swapping ..data");
    if !fs::symlink_metadata(dir.join("keyfence.yaml"))
        .expect("the config")
        .is_symlink()
    {
        symlink("..data/keyfence.yaml", dir.join(".keyfence.yaml.link")).expect("link");
        fs::rename(dir.join(".keyfence.yaml.link"), dir.join("keyfence.yaml"))
            .expect("turning the config into the ConfigMap's symlink");
    }
}

/// One HTTP/1.1 request on an open keep-alive connection: the status.
fn keep_alive_request(stream: &mut std::net::TcpStream) -> std::io::Result<u16> {
    use std::io::{Read as _, Write as _};
    write!(
        stream,
        "GET /v1/orders HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("closed by keyfence"));
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        if body.len() >= length {
            return head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")));
        }
    }
}

/// A keep-alive connection from the allowed client, held open on its own
/// thread in the client's namespace; each `next` sends one request on it.
struct Held {
    go: Option<mpsc::Sender<()>>,
    statuses: mpsc::Receiver<Result<u16, String>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Held {
    fn open(lab: &Lab, dest: SocketAddr) -> Self {
        let (go, go_rx) = mpsc::channel::<()>();
        let (status_tx, statuses) = mpsc::channel();
        let client_ns = lab.client.path();
        let thread = thread::spawn(move || {
            let connected = enter(&client_ns).and_then(|()| {
                let stream = connect_from(ip(ALLOWED), dest, Duration::from_secs(2))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                Ok(stream)
            });
            let mut stream = match connected {
                Ok(s) => s,
                Err(e) => {
                    let _ = status_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            // Bounded: one request per `next`, until closed.
            while go_rx.recv().is_ok() {
                let _ = status_tx.send(keep_alive_request(&mut stream).map_err(|e| e.to_string()));
            }
        });
        Self {
            go: Some(go),
            statuses,
            thread: Some(thread),
        }
    }

    /// One more request on the held connection: its status.
    fn next(&self) -> Result<u16, String> {
        self.go
            .as_ref()
            .and_then(|go| go.send(()).ok())
            .ok_or("the held connection's thread ended")?;
        self.statuses
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("no answer on the held connection: {e}"))?
    }

    fn close(mut self) {
        drop(self.go.take());
        if let Some(t) = self.thread.take() {
            t.join().expect("the held connection's thread");
        }
    }
}

/// Reloads as SPEC §7 and issue 5 describe them: a config that follows a
/// Kubernetes `ConfigMap` swap is applied without restart and without closing an
/// open keep-alive connection; a broken one is refused with the very lines
/// `keyfence check` prints, the last good config keeps enforcing in both layers,
/// and the reload metrics say so; SIGHUP reloads too.
#[test]
fn reloads_follow_configmap_swaps_and_a_broken_config_changes_nothing() {
    let lab = Lab::new(&[ip(ALLOWED), ip(REFUSED)]).expect("building the namespaces");
    let _upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream"))
        .expect("starting the upstream");
    let mut agent =
        Agent::start(&lab.gateway, &[("KF_E2E_PROD", SECRET)], config).expect("starting keyfence");
    let dir = agent.dir().to_owned();
    let good = fs::read_to_string(agent.config_path()).expect("the written config");
    let dest = SocketAddr::new(GATEWAY_V4.into(), API);
    let status_from = |source: &str| {
        Curl::new(&lab.client, ip(source), url("http", dest, "/v1/orders"))
            .connect_timeout(Duration::from_secs(1))
            .bearer(SECRET)
            .send()
            .status()
    };
    let wait_for = |what: &str, want: &dyn Fn(Reloads) -> bool| {
        let ok = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            want(reloads(&agent))
        });
        assert!(
            ok,
            "{what}: reloads now {:?}\n{}",
            reloads(&agent),
            agent.log()
        );
    };

    let held = Held::open(&lab, dest);
    assert_eq!(held.next(), Ok(200), "the held connection, first request");

    // 1. Into the ConfigMap layout (same content): a successful reload.
    configmap_publish(&dir, 1, &good);
    wait_for("the ConfigMap layout", &|r| r.success >= 1.0 && r.last_ok);
    let successes = reloads(&agent).success;

    // 2. A broken version: refused, every error logged as `keyfence check` prints it.
    let broken = good
        .replace(
            "ip_allow_list: [\"192.0.2.10\"]",
            "ip_allow_list: [\"192.0.2.10\", \"192.0.2.66/24\"], colour: red",
        )
        .replace("mode: proxy,", "mode: proxy, early_drop: maybe,");
    assert_ne!(broken, good, "the test broke the config");
    configmap_publish(&dir, 2, &broken);
    wait_for("the broken version", &|r| r.failure >= 1.0 && !r.last_ok);
    let check = std::process::Command::new(keyfence_bin().expect("keyfence"))
        .args(["check", "--config"])
        .arg(agent.config_path())
        .output()
        .expect("keyfence check");
    assert_eq!(check.status.code(), Some(64), "keyfence check refuses it");
    let lines: Vec<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&check.stdout).lines())
        .filter(|l| l.contains(": listeners[0].") || l.contains(": keys[0]."))
        .map(ToOwned::to_owned)
        .collect();
    assert_eq!(lines.len(), 2, "both shape mistakes at once: {lines:?}");
    let log = agent.log();
    for line in &lines {
        assert!(
            log.contains(line.as_str()),
            "the reload logged {line:?}:\n{log}"
        );
    }
    assert_eq!(
        status_from(ALLOWED),
        Some(200),
        "the last good config allows"
    );
    let refused = tcp_connect(&lab.client, ip(REFUSED), dest, Duration::from_millis(500));
    assert!(
        refused.timed_out(),
        "and still drops in the datapath: {refused:?}"
    );
    assert_eq!(
        held.next(),
        Ok(200),
        "the held connection after the refusal"
    );

    // 3. A good version that adds the second client: applied, connection kept.
    configmap_publish(
        &dir,
        3,
        &good.replace("[\"192.0.2.10\"]", "[\"192.0.2.10\", \"192.0.2.66\"]"),
    );
    wait_for("the good version", &|r| r.success > successes && r.last_ok);
    assert_eq!(
        status_from(REFUSED),
        Some(200),
        "the added address is allowed"
    );
    assert_eq!(held.next(), Ok(200), "the held connection after the change");

    // 4. SIGHUP reloads the same file once more.
    let before = reloads(&agent).success;
    agent.sighup().expect("SIGHUP");
    wait_for("SIGHUP", &|r| r.success > before && r.last_ok);
    assert_eq!(held.next(), Ok(200), "the held connection after SIGHUP");
    held.close();
    assert!(agent.is_running(), "the agent never restarted");
}

/// `keyfence status` (and `--json`) after allowed and dropped traffic: the
/// attachment and its mode, the listener's policy sizes, map fill against
/// capacity, and top counters naming interface, listener and reason, largest
/// first; the same while the agent is stopped, when the pins are what enforces.
#[test]
fn status_shows_attachments_fill_and_top_counters_also_while_stopped() {
    const DROPS: u64 = 12;
    let lab = Lab::new(&[ip(ALLOWED), ip(REFUSED)]).expect("building the namespaces");
    let _upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream"))
        .expect("starting the upstream");
    let mut agent =
        Agent::start(&lab.gateway, &[("KF_E2E_PROD", SECRET)], config).expect("starting keyfence");
    let dest = SocketAddr::new(GATEWAY_V4.into(), API);
    assert_eq!(allowed_request(&lab).reply.status(), Some(200));
    for _ in 0..DROPS {
        let c = tcp_connect(&lab.client, ip(REFUSED), dest, Duration::from_millis(150));
        assert!(c.timed_out(), "dropped: {c:?}");
    }
    let bin = keyfence_bin().expect("keyfence");
    let config_path = agent.config_path().display().to_string();
    // nsenter, not `ip netns exec`: that remounts /sys and hides bpffs.
    let status = |json: bool| {
        let mut cmd = lab.gateway.command(&bin);
        cmd.args(["status", "--config", &config_path]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("running keyfence status");
        assert!(
            out.status.success(),
            "keyfence status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    for running in [true, false] {
        if !running {
            assert!(agent.sigterm().expect("SIGTERM").success(), "a clean stop");
        }
        let when = if running { "running" } else { "stopped" };
        let text = status(false);
        assert!(
            text.contains("attached: gw0 (native, program "),
            "{when}:\n{text}"
        );
        assert!(
            text.contains("maps: listeners 2/"),
            "{when}: both families of [::]:{API}\n{text}"
        );
        assert!(text.contains("exact 1/"), "{when}: one /32\n{text}");
        let top = text.split("top counters:").nth(1).unwrap_or_default();
        let first = top
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            first.contains("gw0") && first.contains("api") && first.contains("drop/"),
            "{when}: the drops lead the top counters:\n{text}"
        );

        let json: serde_json::Value =
            serde_json::from_str(&status(true)).expect("status --json is JSON");
        assert_eq!(json["links"][0]["interface"], "gw0", "{when}: {json}");
        assert_eq!(json["links"][0]["mode"], "native", "{when}: {json}");
        let api = &json["listeners"][0];
        assert_eq!(
            (api["name"].as_str(), api["open"].as_bool()),
            (Some("api"), Some(false))
        );
        assert_eq!(api["exact_entries"], 1, "{when}: {json}");
        let top = json["top"].as_array().expect("a top list");
        let packets: Vec<u64> = top.iter().filter_map(|c| c["packets"].as_u64()).collect();
        assert!(
            packets.windows(2).all(|w| w[0] >= w[1]),
            "{when}: largest first: {packets:?}"
        );
        let drops: u64 = top
            .iter()
            .filter(|c| {
                c["listener"] == "api"
                    && c["verdict"]
                        .as_str()
                        .is_some_and(|v| v.starts_with("drop/"))
            })
            .filter_map(|c| c["packets"].as_u64())
            .sum();
        // SYN retransmits within the 150 ms wait may add a few more.
        assert!(
            drops >= DROPS,
            "{when}: {drops} drops counted for {DROPS} attempts: {json}"
        );
    }
}

//! `cargo xtask demo --fleet`: fleet mode at work (docs/fleet.md).
//!
//! Three gateway hosts, each the tests' [`Lab`] (a client namespace and a
//! gateway namespace with XDP on its veth, an echoing upstream and the real
//! `keyfence`, `$KEYFENCE_BIN`), all joined by a bridge to one database
//! namespace where the harness's PostgreSQL (`src/postgres.rs`, run as
//! `nobody`) listens. It shows a key made through one host in force on the
//! others when the API answers (the answer's `enforcement`), a change through
//! another host dropping a removed address at packet level everywhere, the
//! database stopped while every gateway keeps enforcing (writes answer 503),
//! and the database back: the hosts catch up and a write works again.
//! Everything it creates is removed on the way out (the guards clean up on
//! return, error, panic and Ctrl-C). Needs root.
//!
//! ```text
//!  client-a ── gw0 [gw-a] ─┐
//!  client-b ── gw0 [gw-b] ─┼─ br0 198.51.100.1 [db: PostgreSQL]
//!  client-c ── gw0 [gw-c] ─┘
//! ```

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use keyfence_tests::{
    config,
    http::{Curl, Reply, Upstream, url},
    interrupt,
    netns::{Agent, GATEWAY_V4, Lab, Netns, keyfence_bin, parse_samples, poll_until},
    postgres::{self, Postgres},
};
use serde_json::{Value, json};

const API: u16 = 8443;
const MANAGEMENT: &str = "127.0.0.1:9900";
const UPSTREAM: &str = "127.0.0.1:8080";
const ADMIN_TOKEN: &str = "demo-admin-token-0123456789";
const DB_ADDR: &str = "198.51.100.1:5432";
/// How long a refused attempt waits before calling its SYN dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
const PARTNER: &str = "192.0.2.10";
const MOVED_TO: &str = "192.0.2.11";
const HOSTS: [&str; 3] = ["gw-a", "gw-b", "gw-c"];

fn say(what: impl std::fmt::Display) {
    println!("demo: {what}");
}

fn main() -> ExitCode {
    install_interrupt_handler();
    let mut namespaces = Vec::new();
    let started = Instant::now();
    let result = demo(&mut namespaces);
    for name in &namespaces {
        if Path::new("/run/netns").join(name).exists() {
            say(format_args!("could not remove namespace {name}"));
        }
    }
    say(format_args!(
        "removed {} namespaces; {:.0?} in all",
        namespaces.len(),
        started.elapsed()
    ));
    let result = if interrupt::interrupted() {
        Err(anyhow!("interrupted; cleaned up as reported above"))
    } else {
        result
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_interrupt() -> anyhow::Result<()> {
    if interrupt::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// SIGINT/SIGTERM only set a flag ([`interrupt`]); every step and wait
/// polls it and the guards clean up on the way out.
fn install_interrupt_handler() {
    for (sig, e) in interrupt::install() {
        say(format_args!("cannot handle {sig} ({e})"));
    }
}

fn ip(s: &str) -> anyhow::Result<IpAddr> {
    s.parse().with_context(|| format!("address {s}"))
}

fn host_config(pin: &Path, host: &str, url: &str) -> String {
    format!(
        r#"store:
  postgres: {{ url: "{url}", host_id: "{host}" }}
fleet: {{ live_after: 10s, wait_timeout: 2s, poll: 1s }}
{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: proxy, upstream: "http://{UPSTREAM}" }}
management:
  bind: "{MANAGEMENT}"
  admins:
    - {{ name: ops, token_env: KF_DEMO_ADMIN, ip_allow_list: ["127.0.0.1"] }}
{metrics}
"#,
        datapath = config::datapath(pin, "auto"),
        metrics = config::metrics(),
    )
}

/// One gateway host. Field order is drop order: the agent first.
struct Host {
    name: &'static str,
    agent: Agent,
    _upstream: Upstream,
    lab: Lab,
}

impl Host {
    /// A request to the protected API from `source` with `secret`.
    fn request(&self, source: &str, secret: &str) -> anyhow::Result<Reply> {
        Ok(Curl::new(
            &self.lab.client,
            ip(source)?,
            url(
                "http",
                SocketAddr::new(GATEWAY_V4.into(), API),
                "/v1/orders",
            ),
        )
        .connect_timeout(CONNECT_TIMEOUT)
        .bearer(secret)
        .send())
    }

    /// A management call on this host, printed with its answer.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        let shown = body.map(|b| format!(" {b}")).unwrap_or_default();
        println!(
            "  {} $ curl -X {method} http://{MANAGEMENT}{path}{shown}",
            self.name
        );
        let mut curl = Curl::new(
            &self.lab.gateway,
            ip("127.0.0.1")?,
            url("http", MANAGEMENT.parse()?, path),
        )
        .connect_timeout(Duration::from_secs(2))
        .arg("--request")
        .arg(method)
        .bearer(ADMIN_TOKEN);
        if let Some(body) = body {
            curl = curl
                .header("Content-Type: application/json")
                .arg("--data-binary")
                .arg(&body.to_string());
        }
        match curl.send() {
            Reply::Answered { status, body, .. } => {
                let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
                let mut brief = body.clone();
                if let Some(o) = brief.as_object_mut() {
                    o.retain(|k, _| {
                        ["id", "error", "enforcement", "ip_allow_list"].contains(&k.as_str())
                    });
                }
                println!("  {:>4}   {status} {brief}", "");
                Ok((status, body))
            }
            other => bail!("{method} {path} on {}: no answer: {other:?}", self.name),
        }
    }

    fn metric(&self, name: &str) -> i64 {
        self.agent
            .metrics()
            .map(|text| {
                parse_samples(&text, name)
                    .iter()
                    .map(|s| s.value)
                    .sum::<f64>()
            })
            .map_or(-1, |v| v.round() as i64)
    }
}

/// What a request should meet.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    Status(u16),
    /// The SYN is dropped in XDP: no answer at all.
    Dropped,
}

/// Try `source` with `secret` through every host; note what differs.
fn everywhere(
    hosts: &[Host],
    source: &str,
    secret: &str,
    expected: Expect,
    surprises: &mut Vec<String>,
) -> anyhow::Result<()> {
    check_interrupt()?;
    let mut line = format!("  {source:>11} →");
    for h in hosts {
        let reply = h.request(source, secret)?;
        let (shown, met) = match (&reply, expected) {
            (Reply::Answered { status, .. }, Expect::Status(want)) => {
                (status.to_string(), *status == want)
            }
            (Reply::Answered { status, .. }, Expect::Dropped) => (status.to_string(), false),
            (Reply::TimedOut, e) => ("dropped".to_owned(), e == Expect::Dropped),
            (other, _) => (format!("{other:?}"), false),
        };
        let _ = write!(line, "  {}: {shown:<7}", h.name);
        if !met {
            surprises.push(format!("{source} through {}: {shown}", h.name));
        }
    }
    println!("{line}");
    Ok(())
}

/// `keyfence fleet status` on `host`.
fn fleet_status(bin: &Path, host: &Host) -> anyhow::Result<()> {
    println!("  {} $ keyfence fleet status", host.name);
    let out = host
        .lab
        .gateway
        .command(bin)
        .args(["fleet", "status"])
        .env("KEYFENCE_API", format!("http://{MANAGEMENT}"))
        .env("KEYFENCE_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::null())
        .output()
        .context("running keyfence fleet status")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    Ok(())
}

#[expect(clippy::too_many_lines, reason = "the demo's story, told in order")]
fn demo(namespaces: &mut Vec<String>) -> anyhow::Result<()> {
    let db = Netns::new("demo-db")?;
    namespaces.push(db.name().to_owned());
    let addrs = [ip(PARTNER)?, ip(MOVED_TO)?];
    let mut labs = Vec::new();
    for _ in HOSTS {
        let lab = Lab::named("kf-demo-fleet", &addrs)?;
        namespaces.push(lab.client.name().to_owned());
        namespaces.push(lab.gateway.name().to_owned());
        labs.push(lab);
    }
    check_interrupt()?;
    let gateways: Vec<&Netns> = labs.iter().map(|l| &l.gateway).collect();
    postgres::bridge(&db, &gateways).context("joining the gateways to the database")?;
    let mut pg = Postgres::start(&db, DB_ADDR.parse()?).context("starting PostgreSQL")?;
    say(format_args!(
        "PostgreSQL on {DB_ADDR} in {} (initdb in a temporary directory, run as nobody)",
        db.name()
    ));
    let url = pg.url();
    let mut hosts = Vec::new();
    for (lab, name) in labs.into_iter().zip(HOSTS) {
        check_interrupt()?;
        let upstream = Upstream::start(&lab.gateway, UPSTREAM.parse()?)?;
        let mut agent = Agent::named(&lab.gateway, "kf-demo-fleet")?;
        agent.env("KF_DEMO_ADMIN", ADMIN_TOKEN);
        agent.launch(&host_config(agent.pin_path(), name, &url))?;
        say(format_args!(
            "{name}: keyfence ready in {} (store.postgres, host_id {name})",
            lab.gateway.name()
        ));
        hosts.push(Host {
            name,
            agent,
            _upstream: upstream,
            lab,
        });
    }
    let bin = keyfence_bin()?;
    let mut surprises = Vec::new();
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);

    say("a key made through gw-a is in force on every host when the answer comes:");
    let (status, created) = a.call(
        "POST",
        "/v1/keys",
        Some(&json!({ "name": "partner", "ip_allow_list": [PARTNER] })),
    )?;
    if status != 201 {
        bail!("creating a key through gw-a: {status} {created}");
    }
    let id = created["id"].as_str().context("the key's id")?.to_owned();
    let secret = created["secret"].as_str().context("the secret")?.to_owned();
    everywhere(
        &hosts,
        PARTNER,
        &secret,
        Expect::Status(200),
        &mut surprises,
    )?;
    everywhere(&hosts, MOVED_TO, &secret, Expect::Dropped, &mut surprises)?;

    say(
        "the partner moved: a PATCH through gw-b, and the old address is dropped in XDP on all three:",
    );
    let (status, patched) = b.call(
        "PATCH",
        &format!("/v1/keys/{id}"),
        Some(&json!({ "ip_allow_list": [MOVED_TO] })),
    )?;
    if status != 200 || patched["enforcement"]["lagging"] != json!([]) {
        surprises.push(format!("PATCH through gw-b: {status} {patched}"));
    }
    everywhere(&hosts, PARTNER, &secret, Expect::Dropped, &mut surprises)?;
    everywhere(
        &hosts,
        MOVED_TO,
        &secret,
        Expect::Status(200),
        &mut surprises,
    )?;
    fleet_status(&bin, c)?;

    check_interrupt()?;
    say("PostgreSQL stopped: every gateway keeps enforcing its last state; writes answer 503:");
    pg.stop().context("stopping PostgreSQL")?;
    everywhere(
        &hosts,
        MOVED_TO,
        &secret,
        Expect::Status(200),
        &mut surprises,
    )?;
    everywhere(&hosts, PARTNER, &secret, Expect::Dropped, &mut surprises)?;
    let (status, _) = c.call(
        "PATCH",
        &format!("/v1/keys/{id}"),
        Some(&json!({ "ip_allow_list": [PARTNER] })),
    )?;
    if status != 503 {
        surprises.push(format!("a write with the database down: {status}"));
    }
    let down = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        hosts.iter().all(|h| h.metric("keyfence_store_up") == 0)
    });
    let each = |f: &dyn Fn(&Host) -> i64| {
        hosts
            .iter()
            .map(|h| f(h).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    say(format_args!(
        "keyfence_store_up on gw-a gw-b gw-c: {}; /readyz: {}",
        each(&|h| h.metric("keyfence_store_up")),
        each(&|h| h.agent.get("/readyz").map_or(0, |r| i64::from(r.0))),
    ));
    if !down {
        surprises.push("keyfence_store_up stayed 1 with the database down".into());
    }

    check_interrupt()?;
    say("PostgreSQL started again: the hosts reconnect on their own, and a write works:");
    pg.resume().context("starting PostgreSQL again")?;
    let up = poll_until(Duration::from_secs(20), Duration::from_millis(250), || {
        hosts.iter().all(|h| h.metric("keyfence_store_up") == 1)
    });
    if !up {
        surprises.push("a host did not reconnect within 20 s".into());
    }
    let (status, revoked) = c.call("DELETE", &format!("/v1/keys/{id}"), None)?;
    if status != 200 || revoked["enforcement"]["lagging"] != json!([]) {
        surprises.push(format!("revoke through gw-c: {status} {revoked}"));
    }
    everywhere(&hosts, MOVED_TO, &secret, Expect::Dropped, &mut surprises)?;
    fleet_status(&bin, a)?;

    drop(hosts);
    drop(pg);
    drop(db);
    if surprises.is_empty() {
        say("every attempt went as the fleet says");
        Ok(())
    } else {
        bail!("unexpected outcomes:\n  {}", surprises.join("\n  "))
    }
}

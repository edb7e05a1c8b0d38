//! `cargo xtask demo`: the agent at work on a built-in example.
//!
//! Builds two hosts as network namespaces joined by a veth pair (the tests'
//! [`Lab`]), runs the tests' echoing upstream on `127.0.0.1:8080` in the
//! gateway, starts the real `keyfence` (`$KEYFENCE_BIN`, the release build)
//! there (XDP on the veth, proxy listeners on :8443 and :8444), and shows
//! requests with API keys from allowed and refused documentation addresses:
//! proxied answers, the 403 body, a missing key's 401, an unrestricted key,
//! SYNs the datapath drops, keys managed with `keyfence keys`, the counters of
//! both layers from `/metrics`, and that enforcement outlives the agent (its
//! links are pinned). Everything it creates is removed on the way out: guards
//! clean up on return, on error, on panic and on Ctrl-C. Needs root.
//!
//! ```text
//!  client ns (kf-demo-client-PID-N)            gateway ns (kf-demo-gw-PID-N)
//!  client0: 192.0.2.10 192.0.2.99 ─── veth ─── gw0: 192.0.2.1, 2001:db8::1
//!           198.51.100.7 203.0.113.66            XDP + listeners :8443 (api) and
//!           2001:db8:1::10 2001:db8:2::7         :8444 (open), upstream on
//!           2001:db8:3::66                       127.0.0.1:8080, /metrics on :9901
//! ```

use std::{
    net::IpAddr,
    path::Path,
    process::{ExitCode, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use keyfence_tests::{
    http::{Curl, Reply, Upstream, url},
    interrupt,
    netns::{Agent, CLIENT_IF, GATEWAY_IF, GATEWAY_V4, GATEWAY_V6, Lab, METRICS_BIND, Netns},
};

/// What is left to remove by hand if a second Ctrl-C cuts the cleanup short.
/// Each step adds its undo command when it creates something.
static LEFTOVERS: Mutex<Vec<String>> = Mutex::new(Vec::new());

const API_PORT: u16 = 8443;
const OPEN_PORT: u16 = 8444;
const MANAGEMENT: &str = "127.0.0.1:9900";
/// The demo operator's management token (`management.admins[0]`).
const ADMIN_TOKEN: &str = "demo-admin-token-0123456789";
/// The API the listeners protect, inside the gateway.
const UPSTREAM: &str = "127.0.0.1:8080";
/// How long a refused attempt waits before calling its SYN dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Addresses the client host holds, each with what the example config says of it.
const CLIENT_ADDRS: &[&str] = &[
    "192.0.2.10",
    "192.0.2.99",
    "198.51.100.7",
    "203.0.113.66",
    "2001:db8:1::10",
    "2001:db8:2::7",
    "2001:db8:3::66",
];

/// What a demo request should meet.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// Answered with this HTTP status.
    Status(u16),
    /// The SYN is dropped in XDP: no answer at all.
    Dropped,
}

/// `(source, port, key, expected, why)`; `key` names a secret of [`secrets`].
const ATTEMPTS: &[(&str, u16, Option<&str>, Expect, &str)] = &[
    (
        "192.0.2.10",
        API_PORT,
        Some("prod"),
        Expect::Status(200),
        "key prod lists 192.0.2.10",
    ),
    (
        "2001:db8:1::10",
        API_PORT,
        Some("prod"),
        Expect::Status(200),
        "key prod lists 2001:db8:1::10",
    ),
    (
        "198.51.100.7",
        API_PORT,
        Some("office"),
        Expect::Status(200),
        "key office lists 198.51.100.0/24",
    ),
    (
        "2001:db8:2::7",
        API_PORT,
        Some("office"),
        Expect::Status(200),
        "key office lists 2001:db8:2::/48",
    ),
    (
        "198.51.100.7",
        API_PORT,
        Some("prod"),
        Expect::Status(403),
        "packets pass (office's range), key prod does not list it",
    ),
    (
        "192.0.2.10",
        API_PORT,
        None,
        Expect::Status(401),
        "no API key",
    ),
    (
        "203.0.113.66",
        API_PORT,
        Some("prod"),
        Expect::Dropped,
        "in no key's list: dropped in XDP",
    ),
    (
        "192.0.2.99",
        API_PORT,
        Some("prod"),
        Expect::Dropped,
        "in no key's list (its neighbour .10 is)",
    ),
    (
        "2001:db8:3::66",
        API_PORT,
        Some("office"),
        Expect::Dropped,
        "in no key's list",
    ),
    (
        "203.0.113.66",
        OPEN_PORT,
        Some("public"),
        Expect::Status(200),
        "key public has no list: works from anywhere",
    ),
];

fn say(what: impl std::fmt::Display) {
    println!("demo: {what}");
}

fn main() -> ExitCode {
    install_interrupt_handler();
    let mut namespaces = Vec::new();
    let result = demo(&mut namespaces);
    // The guards are gone: say what they removed.
    for name in &namespaces {
        if Path::new("/run/netns").join(name).exists() {
            say(format_args!("could not remove namespace {name}"));
        } else {
            say(format_args!("removed namespace {name}"));
        }
    }
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
        announce_interrupt();
        bail!("interrupted");
    }
    Ok(())
}

/// SIGINT/SIGTERM only set a flag ([`interrupt`]); every step and wait
/// polls it and the guards clean up on the way out.
fn install_interrupt_handler() {
    for (sig, e) in interrupt::install() {
        say(format_args!(
            "cannot handle {sig} ({e}); interrupting may leave namespaces behind"
        ));
    }
}

/// Once interrupted, say what a second Ctrl-C would leave behind.
fn announce_interrupt() {
    static ANNOUNCED: AtomicBool = AtomicBool::new(false);
    if ANNOUNCED.swap(true, Ordering::SeqCst) {
        return;
    }
    eprintln!("demo: interrupted: cleaning up. Ctrl-C again leaves at once; then remove by hand:");
    if let Ok(left) = LEFTOVERS.lock() {
        for item in left.iter().rev() {
            eprintln!("  {item}");
        }
    }
}

fn leftover(hint: String) {
    if let Ok(mut left) = LEFTOVERS.lock() {
        left.push(hint);
    }
}

fn ip(addr: &str) -> anyhow::Result<IpAddr> {
    addr.parse()
        .with_context(|| format!("{addr}: not an address"))
}

/// The demo; `namespaces` gets the name of every namespace it creates (the
/// guards remove them when it returns).
fn demo(namespaces: &mut Vec<String>) -> anyhow::Result<()> {
    let addrs = CLIENT_ADDRS
        .iter()
        .map(|a| ip(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let lab = Lab::named("demo", &addrs)?;
    for ns in [&lab.client, &lab.gateway] {
        namespaces.push(ns.name().to_owned());
        leftover(format!("ip netns del {}", ns.name()));
    }
    let (client, gateway) = (&lab.client, &lab.gateway);
    say(format_args!(
        "hosts: {} ({CLIENT_IF}: {}) ─ veth ─ {} ({GATEWAY_IF}: {GATEWAY_V4}, {GATEWAY_V6})",
        client.name(),
        CLIENT_ADDRS.join(" "),
        gateway.name()
    ));
    check_interrupt()?;

    let upstream = Upstream::start(gateway, UPSTREAM.parse()?)?;
    say(format_args!("upstream in {} on {UPSTREAM}", gateway.name()));

    let mut agent = Agent::named(gateway, "kf-demo")?;
    for (name, value) in secrets() {
        agent.env(name, value);
    }
    let config = example_config(agent.pin_path(), &agent.store_path());
    agent.write_config(&config)?;
    say(format_args!(
        "config {} (pins under {}):",
        agent.config_path().display(),
        agent.pin_path().display()
    ));
    for line in config.lines() {
        println!("    {line}");
    }
    agent
        .check()
        .context("keyfence check refused the built-in example")?;
    say("keyfence check: the config is valid");

    let bin = keyfence_tests::netns::keyfence_bin()?;
    leftover(format!(
        "nsenter --net={} {} detach --config {}",
        gateway.path().display(),
        bin.display(),
        agent.config_path().display()
    ));
    agent.spawn()?;
    agent.wait_ready(Duration::from_secs(30))?;
    say(format_args!(
        "agent ready (pid {}, log {})",
        agent.pid().unwrap_or_default(),
        agent.log_path().display()
    ));

    let mut surprises = Vec::new();
    static_keys(client, &mut surprises)?;
    check_interrupt()?;
    api_routine(&bin, client, gateway, &mut surprises)?;
    check_interrupt()?;
    console_tour(&bin, gateway, agent.dir())?;

    check_interrupt()?;
    print_counters(&agent)?;

    check_interrupt()?;
    if agent.sigterm().is_err() {
        say("keyfence did not stop on SIGTERM within 10 s: killing it");
        agent.sigkill()?;
    }
    say("agent stopped; the pinned datapath keeps enforcing:");
    let after = attempt(client, "203.0.113.66", API_PORT, Some(secret_of("prod")?))?;
    println!("  {:>15} → :{API_PORT}  {}", "203.0.113.66", shown(&after));
    if after != Reply::TimedOut {
        surprises.push(format!(
            "203.0.113.66 → :{API_PORT} after the agent stopped: {}",
            shown(&after)
        ));
    }
    match agent.detach() {
        Ok(_) => say("keyfence detach: programs detached, pins removed"),
        Err(e) => say(format_args!("{e:#}")),
    }
    let pins = agent.pin_path().to_owned();
    drop(agent);
    if pins.exists() {
        say(format_args!("could not remove {}", pins.display()));
    }
    drop(upstream);

    if surprises.is_empty() {
        say("every attempt went as the config says");
        Ok(())
    } else {
        bail!("unexpected outcomes:\n  {}", surprises.join("\n  "))
    }
}

/// Every attempt of [`ATTEMPTS`], each with what it met.
fn static_keys(client: &Netns, surprises: &mut Vec<String>) -> anyhow::Result<()> {
    println!();
    for &(source, port, key, expected, why) in ATTEMPTS {
        check_interrupt()?;
        let outcome = attempt(client, source, port, key.map(secret_of).transpose()?)?;
        check_interrupt()?;
        let verdict = if meets(&outcome, expected) {
            "as expected"
        } else {
            surprises.push(format!("{source} → :{port}: {}", shown(&outcome)));
            "NOT AS EXPECTED"
        };
        let key = key.map_or_else(|| "no key".to_owned(), |k| format!("key {k}"));
        println!("  {source:>15} → :{port} {key:<10} {why} [{verdict}]");
        println!("  {:>15}   {}", "", shown(&outcome));
    }
    println!();
    Ok(())
}

/// The example config: a small working one (addresses from the documentation
/// ranges), the one README points to.
fn example_config(pin_path: &Path, store: &Path) -> String {
    format!(
        r#"# keyfence demo: the built-in example (addresses from the documentation ranges).
datapath:
  interfaces: [{GATEWAY_IF}]
  mode: auto
  pin_path: {pin}
listeners:
  # Only keys of the default tenant: without `tenants`, key public (no list)
  # would open this listener too.
  - name: api
    bind: "[::]:{API_PORT}"
    mode: proxy
    upstream: "http://{UPSTREAM}"
    tenants: [default]
  - name: open
    bind: "0.0.0.0:{OPEN_PORT}"
    mode: proxy
    upstream: "http://{UPSTREAM}"
    tenants: [public]
keys:
  - id: prod
    name: Production servers
    secret_env: KF_DEMO_PROD
    ip_allow_list: ["192.0.2.10", "2001:db8:1::10"]
  - id: office
    name: Office and CI
    secret_env: KF_DEMO_OFFICE
    ip_allow_list: "198.51.100.0/24, 2001:db8:2::/48"
  - id: public
    name: Public (no restriction)
    tenant: public
    secret_env: KF_DEMO_PUBLIC
management:
  bind: "{MANAGEMENT}"
  admins:
    - name: ops
      token_env: KF_DEMO_ADMIN
      ip_allow_list: ["127.0.0.1"]
store:
  path: {store}
metrics:
  bind: "{METRICS_BIND}"
"#,
        pin = pin_path.display(),
        store = store.display(),
    )
}

/// The counters of both layers from `/metrics`, zero series left out.
fn print_counters(agent: &Agent) -> anyhow::Result<()> {
    let metrics = agent.metrics()?;
    say("counters from /metrics (zero series left out):");
    let mut zero = 0;
    for line in metrics.lines() {
        let series = line.starts_with("keyfence_datapath_packets_total")
            || line.starts_with("keyfence_policy_apply_seconds_count")
            || line.starts_with("keyfence_keys ")
            || line.starts_with("keyfence_datapath_attached")
            || line.starts_with("keyfence_http_requests_total");
        if !series {
            continue;
        }
        if line.ends_with(" 0") {
            zero += 1;
        } else {
            println!("    {line}");
        }
    }
    say(format_args!("({zero} series at 0)"));
    Ok(())
}

/// `keyfence keys ARGS` in the gateway (where the management API listens on
/// loopback), printed with its output; returns stdout.
fn keys_cli(bin: &Path, gateway: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains([' ', ',']) {
                format!("\"{a}\"")
            } else {
                (*a).to_owned()
            }
        })
        .collect();
    println!("  $ keyfence keys {}", shown.join(" "));
    let out = gateway
        .command(bin)
        .arg("keys")
        .args(args)
        .env("KEYFENCE_API", format!("http://{MANAGEMENT}"))
        .env("KEYFENCE_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::null())
        .output()
        .context("running keyfence keys")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in stdout.lines() {
        println!("    {line}");
    }
    if !out.status.success() {
        bail!(
            "keyfence keys {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// The console's address, and with a browser installed, screenshots of the
/// keys page and of a key's detail page (`target/console/demo-*.png`).
fn console_tour(bin: &Path, gateway: &Netns, dir: &Path) -> anyhow::Result<()> {
    say(format_args!(
        "the key console: http://{MANAGEMENT}/ inside namespace {} \
         (nsenter --net=/run/netns/{} …), sign in with $KF_DEMO_ADMIN ({ADMIN_TOKEN})",
        gateway.name(),
        gateway.name()
    ));
    let created = keys_cli(
        bin,
        gateway,
        &[
            "create",
            "--name",
            "Console demo",
            "--allow",
            "192.0.2.99, 198.51.100.0/24, 2001:db8:2::/48",
        ],
    )?;
    let id = created
        .lines()
        .find_map(|l| l.strip_prefix("id ").map(|v| v.trim().to_owned()))
        .ok_or_else(|| anyhow!("keyfence keys create printed no id"))?;
    if keyfence_tests::http::require("chromium").is_err()
        || keyfence_tests::http::require("chromedriver").is_err()
    {
        say("no chromium/chromedriver (cargo xtask setup installs them): no screenshots");
        return Ok(());
    }
    let browser = keyfence_tests::webdriver::Browser::start(gateway, dir, 1280)?;
    browser.goto(&format!("http://{MANAGEMENT}/login"))?;
    browser.type_into("#token", ADMIN_TOKEN)?;
    browser.click("#sign-in")?;
    browser.wait("#keys", Duration::from_secs(10))?;
    let keys = browser.screenshot("demo-keys")?;
    browser.goto(&format!("http://{MANAGEMENT}/keys/{id}"))?;
    browser.wait("#editor", Duration::from_secs(10))?;
    let detail = browser.screenshot("demo-key-detail")?;
    say(format_args!(
        "console screenshots: {} and {}",
        keys.display(),
        detail.display()
    ));
    println!();
    Ok(())
}

/// A key made through the management API with the CLI, and the routine of
/// an operator adding and removing a client's address while it calls: each
/// change is in force when the command returns.
fn api_routine(
    bin: &Path,
    client: &Netns,
    gateway: &Netns,
    surprises: &mut Vec<String>,
) -> anyhow::Result<()> {
    const PARTNER_FROM: &str = "198.51.100.7";
    say(format_args!(
        "keys through the management API ({MANAGEMENT}) with the CLI:"
    ));
    let created = keys_cli(
        bin,
        gateway,
        &["create", "--name", "Partner", "--allow", "192.0.2.99"],
    )?;
    let field = |name: &str| {
        created
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .ok_or_else(|| anyhow!("keyfence keys create printed no {name}"))
    };
    let id = field("id ")?;
    let secret = field("secret ")?;
    let mut check = |step: &str, source: &str, expected: Expect| -> anyhow::Result<()> {
        check_interrupt()?;
        let outcome = attempt(client, source, API_PORT, Some(&secret))?;
        let verdict = if meets(&outcome, expected) {
            "as expected"
        } else {
            surprises.push(format!(
                "{step}: {source} → :{API_PORT}: {}",
                shown(&outcome)
            ));
            "NOT AS EXPECTED"
        };
        println!("  {source:>15} → :{API_PORT} key {id} {step} [{verdict}]");
        println!("  {:>15}   {}", "", shown(&outcome));
        Ok(())
    };
    let both = format!("192.0.2.99, {PARTNER_FROM}");
    check("does not list it yet", PARTNER_FROM, Expect::Status(403))?;
    keys_cli(bin, gateway, &["update", &id, "--allow", &both])?;
    check("added: works at once", PARTNER_FROM, Expect::Status(200))?;
    keys_cli(bin, gateway, &["update", &id, "--allow", "192.0.2.99"])?;
    check(
        "removed: refused at once",
        PARTNER_FROM,
        Expect::Status(403),
    )?;
    keys_cli(bin, gateway, &["update", &id, "--allow", &both])?;
    check("re-added: works again", PARTNER_FROM, Expect::Status(200))?;
    check("lists 192.0.2.99", "192.0.2.99", Expect::Status(200))?;
    keys_cli(bin, gateway, &["sources", &id])?;
    keys_cli(bin, gateway, &["audit", "--key", &id])?;
    keys_cli(bin, gateway, &["revoke", &id])?;
    check(
        "revoked: the next request",
        PARTNER_FROM,
        Expect::Status(401),
    )?;
    check(
        "revoked: no key lists 192.0.2.99 now",
        "192.0.2.99",
        Expect::Dropped,
    )?;
    keys_cli(bin, gateway, &["list"])?;
    println!();
    Ok(())
}

/// `curl --interface SOURCE` from the client host to the gateway on `port`,
/// presenting `secret` (if any) as a bearer token.
fn attempt(client: &Netns, source: &str, port: u16, secret: Option<&str>) -> anyhow::Result<Reply> {
    let source = ip(source)?;
    let mut curl = Curl::new(
        client,
        source,
        url("http", Lab::gateway_addr(source, port), "/v1/orders"),
    )
    .connect_timeout(CONNECT_TIMEOUT);
    if let Some(secret) = secret {
        curl = curl.bearer(secret);
    }
    Ok(curl.send())
}

fn meets(outcome: &Reply, expected: Expect) -> bool {
    match (outcome, expected) {
        (Reply::Answered { status, .. }, Expect::Status(want)) => *status == want,
        (Reply::TimedOut, Expect::Dropped) => true,
        _ => false,
    }
}

/// One line for what a request met: the upstream's view of a proxied request
/// (the key id keyfence named, the client address it appended to
/// `X-Forwarded-For`), keyfence's own answer as it came, or the silence of a
/// dropped SYN.
fn shown(outcome: &Reply) -> String {
    match outcome {
        Reply::Answered { status, body, .. } => {
            let said = if outcome.echo().is_some() {
                let header = |name| outcome.upstream_header(name).unwrap_or_else(|| "-".into());
                format!(
                    "hello from the upstream: key {}, forwarded for {}",
                    header("x-keyfence-key-id"),
                    header("x-forwarded-for")
                )
            } else {
                body.trim().to_owned()
            };
            if said.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status} {said}")
            }
        }
        Reply::TimedOut => format!(
            "no answer in {} s: the SYN was dropped",
            CONNECT_TIMEOUT.as_secs()
        ),
        Reply::Failed(why) => format!("failed: {why}"),
    }
}

/// The secret of the example key `id`.
fn secret_of(id: &str) -> anyhow::Result<&'static str> {
    let var = format!("KF_DEMO_{}", id.to_ascii_uppercase());
    secrets()
        .into_iter()
        .find(|(name, _)| *name == var)
        .map(|(_, secret)| secret)
        .ok_or_else(|| anyhow!("no secret for key {id}"))
}

/// Secrets for the example's keys (static keys read them from the environment).
fn secrets() -> [(&'static str, &'static str); 4] {
    [
        ("KF_DEMO_ADMIN", ADMIN_TOKEN),
        ("KF_DEMO_PROD", "demo-prod-secret-0123456789"),
        ("KF_DEMO_OFFICE", "demo-office-secret-0123456789"),
        ("KF_DEMO_PUBLIC", "demo-public-secret-0123456789"),
    ]
}

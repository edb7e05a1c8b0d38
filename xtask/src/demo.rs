//! `cargo xtask demo`: the agent at work on a built-in example.
//!
//! Builds two hosts as network namespaces joined by a veth pair, runs a small
//! HTTP upstream on `127.0.0.1:8080` in the gateway, starts the real
//! `target/release/keyfence` there (XDP on the veth, proxy listeners on :8443
//! and :8444), and shows requests with API keys from allowed and refused
//! documentation addresses: proxied answers, the 403 body, a missing key's 401,
//! an unrestricted key, SYNs the datapath drops, the counters of both layers
//! from `/metrics`, and that enforcement outlives the agent (its links are
//! pinned). Everything it creates is removed on the way
//! out: guards clean up on return, on error, on panic and on Ctrl-C.
//!
//! ```text
//!  client ns (kf-demo-client-PID)              gateway ns (kf-demo-gw-PID)
//!  client0: 192.0.2.10 192.0.2.99 ─── veth ─── gw0: 192.0.2.1, 2001:db8::1
//!           198.51.100.7 203.0.113.66            XDP + listeners :8443 (api) and
//!           2001:db8:1::10 2001:db8:2::7         :8444 (open), upstream on
//!           2001:db8:3::66                       127.0.0.1:8080, /metrics on :9901
//! ```

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use nix::{
    sched::CloneFlags,
    sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal},
    unistd::Pid,
};

use crate::{build, cmd};

/// Set by the signal thread on the first SIGINT/SIGTERM; every wait polls it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// What is left to remove by hand if a second Ctrl-C cuts the cleanup short.
/// Guards add their undo command when they create something, drop it when undone.
static LEFTOVERS: Mutex<Vec<String>> = Mutex::new(Vec::new());

const CLIENT_IF: &str = "client0";
const GATEWAY_IF: &str = "gw0";
const GATEWAY_V4: &str = "192.0.2.1";
const GATEWAY_V6: &str = "2001:db8::1";
const API_PORT: u16 = 8443;
const OPEN_PORT: u16 = 8444;
const METRICS: &str = "127.0.0.1:9901";
const MANAGEMENT: &str = "127.0.0.1:9900";
/// The demo operator's management token (`management.admins[0]`).
const ADMIN_TOKEN: &str = "demo-admin-token-0123456789";
/// The API the listeners protect, inside the gateway.
const UPSTREAM: &str = "127.0.0.1:8080";
/// How long a refused attempt waits before calling its SYN dropped.
const CONNECT_TIMEOUT_S: &str = "2";

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

pub fn run() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the demo needs root (network namespaces, BPF): run `sudo -E cargo xtask demo`");
    }
    let bin = build::run()?;
    install_interrupt_handler();
    let result = demo(&bin);
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaned up as reported above");
    }
    result
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        announce_interrupt();
        bail!("interrupted");
    }
    Ok(())
}

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set [`INTERRUPTED`]; every step and wait polls it and the
/// guards clean up on the way out. `SA_RESETHAND` restores the default action
/// after the first signal, so a second Ctrl-C ends the demo at once. (A handler
/// rather than blocked signals: children inherit a signal mask, not handlers.)
fn install_interrupt_handler() {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe,
        // and it replaces no handler anything else in this process relies on.
        #[expect(unsafe_code, reason = "installing a signal handler is unsafe in nix")]
        let installed = unsafe { signal::sigaction(sig, &action) };
        if let Err(e) = installed {
            say(format_args!(
                "cannot handle {sig} ({e}); interrupting may leave namespaces behind"
            ));
        }
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

fn forget_leftover(hint: &str) {
    if let Ok(mut left) = LEFTOVERS.lock() {
        left.retain(|h| h != hint);
    }
}

fn demo(bin: &Path) -> anyhow::Result<()> {
    let pid = std::process::id();
    let work = WorkDir::new(std::env::temp_dir().join(format!("keyfence-demo-{pid}")))?;
    let client = Netns::new(format!("kf-demo-client-{pid}"))?;
    let gateway = Netns::new(format!("kf-demo-gw-{pid}"))?;
    veth(&client, &gateway)?;
    say(format_args!(
        "hosts: {} ({CLIENT_IF}: {}) ─ veth ─ {} ({GATEWAY_IF}: {GATEWAY_V4}, {GATEWAY_V6})",
        client.name,
        CLIENT_ADDRS.join(" "),
        gateway.name
    ));
    check_interrupt()?;

    let upstream = Responder::start(&gateway, UPSTREAM)?;
    say(format_args!("upstream in {} on {UPSTREAM}", gateway.name));

    let pin_path = PathBuf::from(format!("/sys/fs/bpf/keyfence-demo-{pid}"));
    let config = work.path.join("keyfence.yaml");
    let store = work.path.join("keyfence.db");
    fs::write(&config, example_config(&pin_path, &store))
        .with_context(|| format!("writing {}", config.display()))?;
    say(format_args!(
        "config {} (pins under {}):",
        config.display(),
        pin_path.display()
    ));
    for line in example_config(&pin_path, &store).lines() {
        println!("    {line}");
    }
    cmd::output(
        cmd::new(&bin.to_string_lossy(), ["check", "--config"])
            .arg(&config)
            .envs(secrets()),
    )
    .context("keyfence check refused the built-in example")?;
    say("keyfence check: the config is valid");

    let mut agent = Agent::start(bin, &gateway, &config, &pin_path, &work.path)?;
    agent.wait_ready(Duration::from_secs(30))?;
    say(format_args!(
        "agent ready (pid {}, log {})",
        agent.pid(),
        agent.log.display()
    ));

    println!();
    let mut surprises = Vec::new();
    for &(source, port, key, expected, why) in ATTEMPTS {
        check_interrupt()?;
        let outcome = attempt(&client, source, port, key)?;
        check_interrupt()?;
        let met = match (&outcome, expected) {
            (Attempt::Answered { status, .. }, Expect::Status(want)) => *status == want,
            (Attempt::TimedOut, Expect::Dropped) => true,
            _ => false,
        };
        let verdict = if met {
            "as expected"
        } else {
            surprises.push(format!("{source} → :{port}: {outcome}"));
            "NOT AS EXPECTED"
        };
        let key = key.map_or_else(|| "no key".to_owned(), |k| format!("key {k}"));
        println!("  {source:>15} → :{port} {key:<10} {why} [{verdict}]");
        println!("  {:>15}   {outcome}", "");
    }
    println!();

    check_interrupt()?;
    api_routine(bin, &client, &gateway, &mut surprises)?;

    check_interrupt()?;
    print_counters(&gateway)?;

    check_interrupt()?;
    agent.stop();
    say("agent stopped; the pinned datapath keeps enforcing:");
    let after = attempt(&client, "203.0.113.66", API_PORT, Some("prod"))?;
    println!("  {:>15} → :{API_PORT}  {after}", "203.0.113.66");
    if !matches!(after, Attempt::TimedOut) {
        surprises.push(format!(
            "203.0.113.66 → :{API_PORT} after the agent stopped: {after}"
        ));
    }
    drop(agent);
    drop(upstream);

    if surprises.is_empty() {
        say("every attempt went as the config says");
        Ok(())
    } else {
        bail!("unexpected outcomes:\n  {}", surprises.join("\n  "))
    }
}

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
  bind: "{METRICS}"
"#,
        pin = pin_path.display(),
        store = store.display(),
    )
}

/// The counters of both layers from `/metrics`, zero series left out.
fn print_counters(gateway: &Netns) -> anyhow::Result<()> {
    let metrics = in_netns(&gateway.path(), || http_get(METRICS, "/metrics"))??;
    say("counters from /metrics (zero series left out):");
    let mut zero = 0;
    for line in metrics.1.lines() {
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
    let out = Command::new("nsenter")
        .arg(format!("--net={}", gateway.path().display()))
        .arg("--")
        .arg(bin)
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
        let outcome = attempt_with(client, source, API_PORT, Some(&secret))?;
        let met = match (&outcome, expected) {
            (Attempt::Answered { status, .. }, Expect::Status(want)) => *status == want,
            (Attempt::TimedOut, Expect::Dropped) => true,
            _ => false,
        };
        let verdict = if met {
            "as expected"
        } else {
            "NOT AS EXPECTED"
        };
        if !met {
            surprises.push(format!("{step}: {source} → :{API_PORT}: {outcome}"));
        }
        println!("  {source:>15} → :{API_PORT} key {id} {step} [{verdict}]");
        println!("  {:>15}   {outcome}", "");
        Ok(())
    };
    check("does not list it yet", PARTNER_FROM, Expect::Status(403))?;
    keys_cli(
        bin,
        gateway,
        &[
            "update",
            &id,
            "--allow",
            &format!("192.0.2.99, {PARTNER_FROM}"),
        ],
    )?;
    check("added: works at once", PARTNER_FROM, Expect::Status(200))?;
    keys_cli(bin, gateway, &["update", &id, "--allow", "192.0.2.99"])?;
    check(
        "removed: refused at once",
        PARTNER_FROM,
        Expect::Status(403),
    )?;
    keys_cli(
        bin,
        gateway,
        &[
            "update",
            &id,
            "--allow",
            &format!("192.0.2.99, {PARTNER_FROM}"),
        ],
    )?;
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

/// A temporary directory, removed on drop.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> anyhow::Result<Self> {
        cmd::output(&mut cmd::new("ip", ["netns", "add", &name]))?;
        let hint = format!("ip netns del {name}");
        leftover(hint);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        // Addresses are usable at once: no duplicate address detection here.
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Run a command inside (`ip netns exec`) and return its stdout.
    fn exec(&self, argv: &[&str]) -> anyhow::Result<String> {
        cmd::output(cmd::new("ip", ["netns", "exec", &self.name]).args(argv))
    }

    /// `ip -n NAME …`.
    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        cmd::output(cmd::new("ip", ["-n", &self.name]).args(args)).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match cmd::output(&mut cmd::new("ip", ["netns", "del", &self.name])) {
            Ok(_) => {
                say(format_args!("removed namespace {}", self.name));
                forget_leftover(&format!("ip netns del {}", self.name));
            }
            Err(e) => say(format_args!(
                "could not remove namespace {}: {e:#}",
                self.name
            )),
        }
    }
}

/// The veth pair and addresses of the demo's topology; on-link default routes
/// on both sides, so every client address reaches the gateway and back.
fn veth(client: &Netns, gateway: &Netns) -> anyhow::Result<()> {
    client.ip(&[
        "link",
        "add",
        CLIENT_IF,
        "type",
        "veth",
        "peer",
        "name",
        GATEWAY_IF,
        "netns",
        &gateway.name,
    ])?;
    for addr in CLIENT_ADDRS {
        add_addr(client, CLIENT_IF, addr)?;
    }
    add_addr(gateway, GATEWAY_IF, GATEWAY_V4)?;
    add_addr(gateway, GATEWAY_IF, GATEWAY_V6)?;
    for (ns, ifname) in [(client, CLIENT_IF), (gateway, GATEWAY_IF)] {
        ns.ip(&["link", "set", ifname, "up"])?;
        ns.ip(&["route", "add", "default", "dev", ifname])?;
        ns.ip(&["-6", "route", "add", "default", "dev", ifname])?;
    }
    Ok(())
}

fn add_addr(ns: &Netns, ifname: &str, addr: &str) -> anyhow::Result<()> {
    if addr.contains(':') {
        ns.ip(&[
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            ifname,
            "nodad",
        ])
    } else {
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", ifname])
    }
}

/// Run `f` on a thread that has entered the network namespace at `ns`.
fn in_netns<T, F>(ns: &Path, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = ns.to_owned();
    thread::spawn(move || -> anyhow::Result<T> {
        enter(&ns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("a thread in the namespace panicked"))?
}

fn enter(ns: &Path) -> anyhow::Result<()> {
    let file = File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {}", ns.display()))
}

/// `GET path` over HTTP/1.0 (no chunked answers); `(status, body)`.
fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let addr: SocketAddr = addr.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header in the answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// A tiny HTTP upstream in the gateway namespace, standing in for the API the
/// listeners protect. It answers with what keyfence told it: the key id and the
/// client address keyfence appended to `X-Forwarded-For`.
struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    fn start(ns: &Netns, bind: &'static str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let stop_flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let bound = enter(&path).and_then(|()| {
                let listener =
                    TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            });
            let listener = match bound {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the upstream did not start")??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// Read one request head and answer it (one request per connection).
fn answer(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map_or("-", |(_, v)| v.trim())
            .to_owned()
    };
    let body = format!(
        "hello from the upstream: key {}, forwarded for {}",
        header("x-keyfence-key-id"),
        header("x-forwarded-for")
    );
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The result of one `curl` from the client host.
enum Attempt {
    Answered { status: u16, body: String },
    TimedOut,
    Failed(String),
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            Attempt::Answered { status, body } => {
                let mut t = format!("HTTP {status}");
                if !body.is_empty() {
                    let _ = write!(t, " {}", body.trim());
                }
                t
            }
            Attempt::TimedOut => {
                format!("no answer in {CONNECT_TIMEOUT_S} s: the SYN was dropped")
            }
            Attempt::Failed(why) => format!("failed: {why}"),
        };
        f.pad(&text)
    }
}

/// `curl --interface SOURCE` from the client host to the gateway on `port`,
/// presenting the secret of `key` as a bearer token.
fn attempt(client: &Netns, source: &str, port: u16, key: Option<&str>) -> anyhow::Result<Attempt> {
    attempt_with(client, source, port, key.map(secret_of).transpose()?)
}

/// `curl --interface SOURCE` presenting `secret` (if any).
fn attempt_with(
    client: &Netns,
    source: &str,
    port: u16,
    secret: Option<&str>,
) -> anyhow::Result<Attempt> {
    let url = if source.contains(':') {
        format!("http://[{GATEWAY_V6}]:{port}/v1/orders")
    } else {
        format!("http://{GATEWAY_V4}:{port}/v1/orders")
    };
    let mut curl = Command::new("ip");
    curl.args([
        "netns",
        "exec",
        &client.name,
        "curl",
        "--silent",
        "--show-error",
    ])
    .args(["--globoff", "--interface", source])
    .args(["--connect-timeout", CONNECT_TIMEOUT_S, "--max-time", "5"])
    .args(["--write-out", "\n%{http_code}"]);
    if let Some(secret) = secret {
        curl.args(["--header", &format!("Authorization: Bearer {secret}")]);
    }
    let out = curl
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(match out.status.code() {
        Some(0) => {
            let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
            Attempt::Answered {
                status: status.trim().parse().unwrap_or_default(),
                body: body.to_owned(),
            }
        }
        // curl's "operation timed out".
        Some(28) => Attempt::TimedOut,
        _ => Attempt::Failed(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    })
}

/// The real agent inside the gateway namespace. Stopped, detached and unpinned on drop.
struct Agent {
    bin: PathBuf,
    netns: PathBuf,
    config: PathBuf,
    pin_path: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// `nsenter --net`, not `ip netns exec`: the latter remounts `/sys` in a new
    /// mount namespace, which hides the host's bpffs at `/sys/fs/bpf` (where the
    /// pins must live to outlive the agent).
    fn start(
        bin: &Path,
        gateway: &Netns,
        config: &Path,
        pin_path: &Path,
        work: &Path,
    ) -> anyhow::Result<Self> {
        let log = work.join("keyfence.log");
        let log_file = File::create(&log)?;
        let netns = gateway.path();
        leftover(format!(
            "nsenter --net={} {} detach --config {}",
            netns.display(),
            bin.display(),
            config.display()
        ));
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(bin)
            .args(["run", "--config"])
            .arg(config)
            .envs(secrets())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting keyfence")?;
        Ok(Self {
            bin: bin.to_owned(),
            netns,
            config: config.to_owned(),
            pin_path: pin_path.to_owned(),
            log,
            child: Some(child),
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupt()?;
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "keyfence exited ({status}) before it was ready; its log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let ready = in_netns(&self.netns, || http_get(METRICS, "/readyz"))?;
            if matches!(ready, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "keyfence not ready after {timeout:?} (last /readyz: {ready:?}); its log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within five seconds.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let _ = signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        say("keyfence did not stop on SIGTERM within 5 s: killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let detach = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(&self.bin)
            .args(["detach", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output();
        match detach {
            Ok(out) if out.status.success() => {
                say("keyfence detach: programs detached, pins removed");
            }
            Ok(out) => say(format_args!(
                "keyfence detach failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => say(format_args!("cannot run keyfence detach: {e}")),
        }
        if self.pin_path.exists() {
            match fs::remove_dir_all(&self.pin_path) {
                Ok(()) => say(format_args!("removed {}", self.pin_path.display())),
                Err(e) => say(format_args!(
                    "could not remove {}: {e}",
                    self.pin_path.display()
                )),
            }
        }
        let hints: Vec<String> = LEFTOVERS
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|h| h.contains(" detach "))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for hint in hints {
            forget_leftover(&hint);
        }
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

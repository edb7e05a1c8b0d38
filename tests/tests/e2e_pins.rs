//! The pinned datapath across agents: a restart adopts the pinned link and
//! swaps its program in place (`BPF_LINK_UPDATE`: the same link, a new
//! program, no moment without one), a pinned map of another layout is refused
//! and left alone, a second agent on the same pin path is refused by the lock,
//! and `keyfence detach` removes everything. Needs root; run through
//! `cargo xtask test`.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use keyfence::datapath::{is_link_pin, pin_dir, pinned_links};
use keyfence_common::map_names;
use keyfence_tests::{
    config,
    loaded::Loaded,
    netns::{Agent, Connect, GATEWAY_V4, Lab, keyfence_bin, tcp_connect},
};

const API: u16 = 8443;
const SECRET: &str = "e2e-pins-prod-secret-0123456789";
const ALLOWED: &str = "192.0.2.10";
const REFUSED: &str = "192.0.2.66";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn config(pin: &Path) -> String {
    format!(
        r#"{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: auth }}
keys:
  - {{ id: prod, name: prod, secret_env: KF_E2E_PROD, ip_allow_list: ["{ALLOWED}"] }}
{metrics}
"#,
        datapath = config::datapath(pin, "auto"),
        metrics = config::metrics(),
    )
}

/// The hosts and the agent (field order is drop order).
struct Scenario {
    agent: Agent,
    lab: Lab,
}

impl Scenario {
    fn new() -> Self {
        let lab = Lab::new(&[ip(ALLOWED), ip(REFUSED)]).expect("building the namespaces");
        let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
        agent.env("KF_E2E_PROD", SECRET);
        Self { agent, lab }
    }

    fn start(mut self) -> Self {
        let yaml = config(self.agent.pin_path());
        self.agent.launch(&yaml).expect("starting keyfence");
        self
    }

    fn dest() -> SocketAddr {
        SocketAddr::new(GATEWAY_V4.into(), API)
    }

    /// The one link pin, its inode and the program it runs.
    fn link(&self) -> (PathBuf, u64, u32) {
        let dir = pin_dir(self.agent.pin_path());
        let pins: Vec<PathBuf> = fs::read_dir(&dir)
            .expect("listing the pins")
            .filter_map(Result::ok)
            .filter(|e| is_link_pin(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
        assert_eq!(pins.len(), 1, "one link pin: {pins:?}");
        let inode = fs::metadata(&pins[0]).expect("the link pin").ino();
        let links = pinned_links(&dir).expect("reading the link pins");
        let program = links[0].program_id.expect("the link's program");
        (pins[0].clone(), inode, program)
    }

    /// The XDP program id on the gateway's veth, if any.
    fn xdp_program(&self) -> Option<u32> {
        let out = self
            .lab
            .gateway
            .exec(&["ip", "-d", "link", "show", "gw0"])
            .expect("ip link");
        let rest = &out[out.find("prog/xdp id ")? + "prog/xdp id ".len()..];
        rest.split_whitespace().next()?.parse().ok()
    }

    fn dropped(&self) -> u64 {
        self.agent
            .packet_count("api", "not_allowed")
            .expect("reading /metrics")
    }
}

/// One refused connection attempt: when it started and what it met.
struct Attempt {
    at: Instant,
    outcome: Connect,
}

/// Connection attempts from `REFUSED` every 20 ms until `stop`.
fn refused_attempts(lab: &Lab, stop: &AtomicBool) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let deadline = Instant::now() + Duration::from_mins(1);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let at = Instant::now();
        let outcome = tcp_connect(
            &lab.client,
            ip(REFUSED),
            Scenario::dest(),
            Duration::from_millis(150),
        );
        attempts.push(Attempt { at, outcome });
        thread::sleep(Duration::from_millis(20));
    }
    attempts
}

/// A restart adopts the pinned link: the same link (its pin's inode) now
/// runs the new agent's program, the interface never lost its program (the
/// XDP id follows the link's), the log says `adopted=true`, and refused
/// attempts made while no agent ran, and while the new one swapped its
/// program in, were all dropped and counted.
#[test]
fn a_restart_swaps_the_program_into_the_pinned_link_without_a_gap() {
    let mut s = Scenario::new().start();
    let (pin, inode, program) = s.link();
    assert_eq!(
        s.xdp_program(),
        Some(program),
        "gw0 runs the pinned link's program"
    );
    let dropped_before = s.dropped();

    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, exited, ready) = thread::scope(|scope| {
        let client = scope.spawn(|| refused_attempts(&s.lab, &stop));
        thread::sleep(Duration::from_millis(200));
        s.agent.sigterm().expect("SIGTERM");
        let exited = Instant::now();
        // Away for a while: the kernel enforces alone.
        thread::sleep(Duration::from_millis(500));
        s.agent.spawn().expect("starting keyfence again");
        s.agent
            .wait_ready(Duration::from_secs(30))
            .expect("keyfence ready again");
        let ready = Instant::now();
        thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        (client.join().expect("the client thread"), exited, ready)
    });

    let in_gap = attempts
        .iter()
        .filter(|a| a.at >= exited && a.at <= ready)
        .count();
    assert!(
        in_gap >= 3,
        "only {in_gap} of {} attempts fell between the exit and the new agent's readiness",
        attempts.len()
    );
    let through: Vec<String> = attempts
        .iter()
        .filter(|a| !a.outcome.timed_out())
        .map(|a| format!("{:?} at +{:?}", a.outcome, a.at.duration_since(exited)))
        .collect();
    assert!(through.is_empty(), "refused SYNs got through: {through:?}");
    assert!(
        s.dropped() >= dropped_before + attempts.len() as u64,
        "every attempt counted as not_allowed ({} attempts, counter {} → {})",
        attempts.len(),
        dropped_before,
        s.dropped()
    );

    let (pin_after, inode_after, program_after) = s.link();
    assert_eq!(pin_after, pin, "the same link pin");
    assert_eq!(
        inode_after, inode,
        "the link was updated in place, not re-created"
    );
    assert_ne!(
        program_after, program,
        "the new agent's program runs in the link"
    );
    assert_eq!(
        s.xdp_program(),
        Some(program_after),
        "gw0 runs the new program"
    );
    let log = s.agent.plain_log();
    let second = &log[log
        .find("=== keyfence start #2 ===")
        .expect("a second start")..];
    assert!(
        second.contains("datapath attached") && second.contains("adopted=true"),
        "the second start adopted the link:\n{second}"
    );
}

/// A pinned map whose layout is not this keyfence's (here: another pinned
/// map of the real object, renamed to `KF_STATS` within bpffs) is refused at
/// start with the fix, nothing is attached, and the map is left as it was.
#[test]
fn a_pinned_map_of_another_layout_is_refused_and_left_alone() {
    let s = Scenario::new();
    let donor = Loaded::new("layout-donor", 1).expect("loading a donor object");
    let dir = pin_dir(s.agent.pin_path());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .expect("creating the pin directory");
    let foreign = dir.join(map_names::STATS);
    fs::rename(pin_dir(donor.pin_root()).join(map_names::PORTS), &foreign)
        .expect("moving a map pin within bpffs");
    let inode = fs::metadata(&foreign).expect("the foreign pin").ino();

    let mut agent = s.agent;
    agent
        .write_config(&config(agent.pin_path()))
        .expect("writing the config");
    agent.spawn().expect("starting keyfence");
    let err = agent
        .wait_ready(Duration::from_secs(30))
        .expect_err("an agent adopting a map of another layout");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!("pinned map {} has layout", foreign.display()))
            && err.contains("keyfence detach"),
        "{err}"
    );
    let links = s
        .lab
        .gateway
        .exec(&["ip", "-d", "link", "show", "gw0"])
        .expect("ip link");
    assert!(!links.contains("xdp"), "nothing attached:\n{links}");
    assert_eq!(
        fs::metadata(&foreign)
            .expect("the foreign pin is still there")
            .ino(),
        inode
    );
    let entries: Vec<String> = fs::read_dir(&dir)
        .expect("listing")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, [map_names::STATS], "nothing was pinned beside it");
    drop(agent);
    drop(donor);
}

/// A second agent on the same pin path (its own sockets, so only the pins
/// are shared) is refused by the lock and changes nothing: the first keeps
/// its link and enforcing.
#[test]
fn a_second_agent_on_the_same_pins_is_refused_by_the_lock() {
    let s = Scenario::new().start();
    let (_, inode, program) = s.link();
    let dir = s.agent.dir().to_owned();
    let second = dir.join("second.yaml");
    let yaml = config(s.agent.pin_path())
        .replace(&format!("[::]:{API}"), "[::]:8453")
        .replace("127.0.0.1:9901", "127.0.0.1:9902")
        + &format!(
            "management: {{ bind: \"127.0.0.1:9912\" }}\nstore: {{ path: {} }}\n",
            dir.join("second.db").display()
        );
    fs::write(&second, yaml).expect("writing the second config");
    let out = s
        .lab
        .gateway
        .command(keyfence_bin().expect("the keyfence binary"))
        .args(["run", "--config"])
        .arg(&second)
        .env("KF_E2E_PROD", SECRET)
        .stdin(Stdio::null())
        .output()
        .expect("running a second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another keyfence agent holds"), "{err}");
    let (_, inode_after, program_after) = s.link();
    assert_eq!(
        (inode_after, program_after),
        (inode, program),
        "the first agent's link is untouched"
    );
    let dropped = s.dropped();
    let attempt = tcp_connect(
        &s.lab.client,
        ip(REFUSED),
        Scenario::dest(),
        Duration::from_millis(300),
    );
    assert!(attempt.timed_out(), "still enforcing: {attempt:?}");
    assert!(s.dropped() > dropped, "and counting");
}

/// `keyfence detach` while the agent runs is refused (exit 1) and changes
/// nothing; after the agent stopped it detaches the link and removes every
/// pin, the pin directories and the lock file: a dropped source now meets
/// the kernel's RST, and a second detach finds nothing.
#[test]
fn detach_removes_everything_and_is_refused_while_an_agent_runs() {
    let mut s = Scenario::new().start();
    let refused = s.agent.detach().expect_err("detach while the agent runs");
    assert!(
        format!("{refused:#}").contains("another keyfence agent holds"),
        "{refused:#}"
    );
    let (pin, _, _) = s.link();
    assert!(pin.exists(), "nothing removed");

    s.agent.sigterm().expect("SIGTERM");
    let before = tcp_connect(
        &s.lab.client,
        ip(REFUSED),
        Scenario::dest(),
        Duration::from_millis(300),
    );
    assert!(
        before.timed_out(),
        "the pins enforce while the agent is away: {before:?}"
    );
    let report = s.agent.detach().expect("keyfence detach");
    assert!(
        report.starts_with("detached 1 link(s), removed ") && report.contains("map pin(s)"),
        "{report}"
    );
    assert!(
        !s.agent.pin_path().exists(),
        "{} removed",
        s.agent.pin_path().display()
    );
    assert!(
        !keyfence::datapath::lock_path(s.agent.pin_path()).exists(),
        "the lock file removed"
    );
    assert_eq!(s.xdp_program(), None, "no XDP program left on gw0");
    let after = tcp_connect(
        &s.lab.client,
        ip(REFUSED),
        Scenario::dest(),
        Duration::from_millis(300),
    );
    assert!(
        matches!(after, Connect::Refused),
        "the SYN reaches the kernel: {after:?}"
    );
    let again = s.agent.detach().expect("a second detach");
    assert!(
        again.starts_with("detached 0 link(s), removed 0 map pin(s)"),
        "{again}"
    );
}

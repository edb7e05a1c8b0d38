//! End to end: TC through a clsact qdisc and a netlink filter (the path on
//! kernels before 6.6, chosen here with `datapath.tc_attach: netlink`), and
//! `tc_attach: auto` picking TCX or netlink by kernel version. The real
//! `keyfence` on the lab's gateway veth (topology in `tests/README.md`);
//! what the kernel holds is read back with `tc(8)` inside the namespace.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use keyfence_tests::{
    config,
    netns::{Agent, GATEWAY_IF, Lab, parse_samples, tcp_connect},
};

const API_PORT: u16 = 8443;
const ALLOWED_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const ALLOWED_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10));
const REFUSED_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66));
const REFUSED_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x66));
const CLIENT_ADDRS: [IpAddr; 4] = [ALLOWED_V4, ALLOWED_V6, REFUSED_V4, REFUSED_V6];
const SECRETS: [(&str, &str); 1] = [("KF_E2E_PROD", "e2e-prod-secret-0123456789")];
/// Below the first SYN retransmission (1 s): one SYN per attempt.
const REFUSED_WAIT: Duration = Duration::from_millis(500);
const ALLOWED_WAIT: Duration = Duration::from_millis(900);

/// keyfence's filter as `tc filter show` prints it (priority 1, handle "KF").
const OUR_FILTER: &str = "pref 1 bpf chain 0 handle 0x4b46 keyfence_tc";

fn config(pin: &Path, tc_attach: &str) -> String {
    format!(
        r#"{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API_PORT}", mode: proxy, upstream: "http://127.0.0.1:8080" }}
keys:
  - {{ id: prod, name: Prod, secret_env: KF_E2E_PROD, ip_allow_list: ["{ALLOWED_V4}", "{ALLOWED_V6}"] }}
{metrics}
"#,
        datapath = config::datapath(pin, &format!("tc, tc_attach: {tc_attach}")),
        metrics = config::metrics(),
    )
}

/// Field order is drop order: the agent detaches while its namespace exists.
struct Scenario {
    agent: Agent,
    lab: Lab,
}

impl Scenario {
    fn lab() -> Lab {
        Lab::new(&CLIENT_ADDRS).expect("building the namespaces")
    }

    fn start(lab: Lab, tc_attach: &str) -> Self {
        let agent = Agent::start(&lab.gateway, &SECRETS, |pin| config(pin, tc_attach))
            .expect("starting keyfence");
        Self { agent, lab }
    }

    fn tc(&self, args: &[&str]) -> String {
        let command: Vec<&str> = std::iter::once("tc").chain(args.iter().copied()).collect();
        self.lab.gateway.exec(&command).expect("running tc")
    }

    fn ingress_filters(&self) -> String {
        self.tc(&["filter", "show", "dev", GATEWAY_IF, "ingress"])
    }

    fn has_clsact(&self) -> bool {
        self.tc(&["qdisc", "show", "dev", GATEWAY_IF])
            .lines()
            .any(|l| l.starts_with("qdisc clsact"))
    }

    /// The `path` label of `keyfence_datapath_attached` per interface.
    fn paths(&self) -> Vec<(String, String)> {
        parse_samples(
            &self.agent.metrics().expect("reading /metrics"),
            "keyfence_datapath_attached",
        )
        .into_iter()
        .map(|s| {
            (
                s.label("interface").unwrap_or_default().to_owned(),
                s.label("path").unwrap_or_default().to_owned(),
            )
        })
        .collect()
    }

    fn connect(&self, source: IpAddr, wait: Duration) -> keyfence_tests::netns::Connect {
        tcp_connect(
            &self.lab.client,
            source,
            Lab::gateway_addr(source, API_PORT),
            wait,
        )
    }

    #[track_caller]
    fn assert_enforces(&self) {
        let before = self
            .agent
            .packet_count("api", "not_allowed")
            .expect("reading /metrics");
        for source in [ALLOWED_V4, ALLOWED_V6] {
            let c = self.connect(source, ALLOWED_WAIT);
            assert!(c.completed(), "{source} should complete, got {c:?}");
        }
        for source in [REFUSED_V4, REFUSED_V6] {
            let c = self.connect(source, REFUSED_WAIT);
            assert!(c.timed_out(), "{source} should be dropped, got {c:?}");
        }
        let after = self
            .agent
            .packet_count("api", "not_allowed")
            .expect("reading /metrics");
        assert!(
            after >= before + 2,
            "not_allowed moved from {before} to {after}: the drops were not the datapath's"
        );
    }

    /// The program id `tc filter show` names on keyfence's filter.
    fn filter_program(&self) -> u32 {
        let filters = self.ingress_filters();
        let line = filters
            .lines()
            .find(|l| l.contains(OUR_FILTER))
            .unwrap_or_else(|| panic!("keyfence's filter missing:\n{filters}"));
        let mut words = line.split_whitespace();
        words.by_ref().find(|w| *w == "id").expect("an id field");
        words
            .next()
            .and_then(|id| id.parse().ok())
            .expect("a program id")
    }
}

/// Without a qdisc, the agent creates clsact and its filter at priority 1,
/// handle 0x4b46; it enforces; a restart replaces the filter's program in place
/// (adopted, one filter, a new program) while refused attempts keep failing
/// across the gap; `keyfence detach` removes the filter and the qdisc it made.
#[test]
fn netlink_tc_creates_its_qdisc_survives_a_restart_and_detach_removes_both() {
    let lab = Scenario::lab();
    let mut s = Scenario::start(lab, "netlink");
    assert_eq!(
        s.paths(),
        [(GATEWAY_IF.to_owned(), "tc-netlink".to_owned())]
    );
    assert!(s.has_clsact(), "no clsact qdisc on {GATEWAY_IF}");
    let filters = s.ingress_filters();
    assert_eq!(
        filters.lines().filter(|l| l.contains("handle ")).count(),
        1,
        "exactly one filter expected:\n{filters}"
    );
    s.assert_enforces();
    let status = s.agent.status(false).expect("keyfence status");
    assert!(
        status.contains(&format!("attached: {GATEWAY_IF} (tc, program "))
            && status.contains("via tc-netlink"),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.agent.status(true).expect("keyfence status --json"))
            .expect("status JSON");
    assert_eq!(json["links"][0]["path"], "tc-netlink", "{json}");
    let program = s.filter_program();
    assert_eq!(
        json["links"][0]["program_id"].as_u64(),
        Some(u64::from(program)),
        "status names another program than the filter runs: {json}"
    );

    restart_while_probing(&mut s);
    let log = s.agent.plain_log();
    assert!(
        log.lines()
            .any(|l| l.contains("datapath attached") && l.contains("adopted=true")),
        "the restarted agent did not adopt its filter:\n{log}"
    );
    let filters = s.ingress_filters();
    assert_eq!(
        filters.lines().filter(|l| l.contains("handle ")).count(),
        1,
        "the restart left more than one filter:\n{filters}"
    );
    assert_ne!(
        s.filter_program(),
        program,
        "the filter still runs the old agent's program"
    );
    s.assert_enforces();

    s.agent.sigterm().expect("stopping keyfence");
    let report = s.agent.detach().expect("keyfence detach");
    assert!(report.contains("detached 1 link"), "{report}");
    assert!(
        !s.ingress_filters().contains("keyfence_tc"),
        "the filter outlived detach"
    );
    assert!(
        !s.has_clsact(),
        "the qdisc keyfence created outlived detach"
    );
}

/// Restart the agent while refused attempts keep coming (bounded: 10 s, 100
/// tries): every one is dropped, and some fell into the restart itself.
/// Four probers start 50 ms apart, so that a dropped
/// attempt's 200 ms wait leaves no hole as wide as a fast restart (≈ 300 ms).
fn restart_while_probing(s: &mut Scenario) {
    const PROBERS: u32 = 4;
    const PROBE_STAGGER: Duration = Duration::from_millis(50);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let client = &s.lab.client;
    let agent = &mut s.agent;
    let (attempts, restarted) = thread::scope(|scope| {
        let probers: Vec<_> = (0..PROBERS)
            .map(|p| {
                let stop = &stop;
                scope.spawn(move || {
                    thread::sleep(PROBE_STAGGER * p);
                    let mut attempts = Vec::new();
                    for i in 0..100 / PROBERS {
                        if stop.load(Ordering::SeqCst)
                            || started.elapsed() > Duration::from_secs(10)
                        {
                            break;
                        }
                        let source = if (i + p) % 2 == 0 {
                            REFUSED_V4
                        } else {
                            REFUSED_V6
                        };
                        let at = started.elapsed();
                        let dest = Lab::gateway_addr(source, API_PORT);
                        let outcome = tcp_connect(client, source, dest, Duration::from_millis(200));
                        attempts.push((at, source, outcome));
                    }
                    attempts
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        let down = started.elapsed();
        agent.restart().expect("restarting keyfence");
        let up = started.elapsed();
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let attempts: Vec<_> = probers
            .into_iter()
            .flat_map(|p| p.join().expect("prober"))
            .collect();
        (attempts, (down, up))
    });
    let (down, up) = restarted;
    let during = attempts
        .iter()
        .filter(|(at, _, _)| *at >= down && *at <= up)
        .count();
    assert!(
        during >= 2,
        "only {during} attempts fell into the restart ({down:?}..{up:?}): the test proved nothing"
    );
    for (at, source, outcome) in &attempts {
        assert!(
            outcome.timed_out(),
            "{source} at {at:?} (restart {down:?}..{up:?}) was not dropped: {outcome:?}"
        );
    }
}

/// A clsact qdisc that was there before keyfence (another program's) stays,
/// with that program's filter, through attach and detach.
#[test]
fn netlink_tc_leaves_a_qdisc_and_filters_it_did_not_create() {
    let lab = Scenario::lab();
    lab.gateway
        .exec(&["tc", "qdisc", "add", "dev", GATEWAY_IF, "clsact"])
        .expect("adding a clsact qdisc");
    // Another program's filter, on egress: classic BPF "accept" (cls_bpf is
    // there wherever keyfence's TC path is; matchall and u32 may be modules).
    lab.gateway
        .exec(&[
            "tc",
            "filter",
            "add",
            "dev",
            GATEWAY_IF,
            "egress",
            "prio",
            "7",
            "bpf",
            "bytecode",
            "1,6 0 0 4294967295,",
        ])
        .expect("adding another filter");
    let mut s = Scenario::start(lab, "netlink");
    s.assert_enforces();
    s.agent.sigterm().expect("stopping keyfence");
    s.agent.detach().expect("keyfence detach");
    assert!(!s.ingress_filters().contains("keyfence_tc"));
    assert!(
        s.has_clsact(),
        "detach removed a qdisc keyfence did not create"
    );
    let egress = s.tc(&["filter", "show", "dev", GATEWAY_IF, "egress"]);
    assert!(
        egress.contains("bytecode"),
        "the other filter is gone:\n{egress}"
    );
}

/// `tc_attach: auto` takes TCX links from Linux 6.6 on and the netlink
/// filter before; `tcx` on a kernel without TCX fails to start, saying so.
#[test]
fn tc_attach_auto_follows_the_kernel_version() {
    let release = nix::sys::utsname::uname()
        .expect("uname")
        .release()
        .to_string_lossy()
        .into_owned();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let has_tcx = version >= (6, 6);
    let lab = Scenario::lab();
    let s = Scenario::start(lab, "auto");
    let want = if has_tcx { "tcx" } else { "tc-netlink" };
    assert_eq!(
        s.paths(),
        [(GATEWAY_IF.to_owned(), want.to_owned())],
        "kernel {release}"
    );
    s.assert_enforces();
    if !has_tcx {
        let lab = Scenario::lab();
        let mut agent = Agent::new(&lab.gateway).expect("an agent");
        for (k, v) in SECRETS {
            agent.env(k, v);
        }
        let yaml = config(agent.pin_path(), "tcx");
        let err = agent
            .launch(&yaml)
            .expect_err("tc_attach: tcx must not start on a kernel without TCX");
        assert!(
            format!("{err:#}").contains("no attach mode worked"),
            "{err:#}"
        );
    }
}

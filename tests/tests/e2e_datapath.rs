//! End to end: the real `keyfence` binary on the gateway's veth in a network
//! namespace, TCP clients connecting from documentation addresses held by a
//! client namespace (topology in `tests/README.md`). Needs root; run through
//! `cargo xtask test`, which builds the binary first.
//!
//! The agent's own proxy listeners hold the protected ports. A refused
//! connection is one whose SYN the datapath drops: `connect` times out, and the
//! drop counter moves. Attempts that should be refused
//! wait less than the kernel's first SYN retransmission (1 s), so each sends
//! exactly one SYN, and allowed attempts must complete within that time too, so
//! a single dropped SYN of an allowed source fails the test.

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use keyfence_tests::{
    config,
    frames::{Ext, NEXT_DEST},
    netns::{Agent, Connect, GATEWAY_V6, Lab, Netns, poll_until, tcp_connect},
    rawsyn,
};

const API_PORT: u16 = 8443;
const OPEN_PORT: u16 = 8444;

/// Listed by key `prod` as a single address.
const V4_EXACT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// Inside `198.51.100.0/24`, listed by key `office`.
const V4_PREFIX: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
/// Listed by key `prod` as a single address.
const V6_EXACT: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10));
/// Inside `2001:db8:2::/48`, listed by key `office`.
const V6_PREFIX: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 7));
/// In no list.
const REFUSED_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66));
/// In no list, next to [`V4_EXACT`].
const REFUSED_V4_NEIGHBOUR: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
/// In no list.
const REFUSED_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x66));

const CLIENT_ADDRS: [IpAddr; 7] = [
    V4_EXACT,
    V4_PREFIX,
    V6_EXACT,
    V6_PREFIX,
    REFUSED_V4,
    REFUSED_V4_NEIGHBOUR,
    REFUSED_V6,
];
const ALLOWED: [IpAddr; 4] = [V4_EXACT, V4_PREFIX, V6_EXACT, V6_PREFIX];
const REFUSED: [IpAddr; 3] = [REFUSED_V4, REFUSED_V4_NEIGHBOUR, REFUSED_V6];

/// Below the first SYN retransmission: one SYN per attempt.
const REFUSED_WAIT: Duration = Duration::from_millis(500);
/// Below the first SYN retransmission: a dropped SYN fails the attempt.
const ALLOWED_WAIT: Duration = Duration::from_millis(900);

const SECRETS: [(&str, &str); 3] = [
    ("KF_E2E_PROD", "e2e-prod-secret-0123456789"),
    ("KF_E2E_OFFICE", "e2e-office-secret-0123456789"),
    ("KF_E2E_OPEN", "e2e-open-secret-0123456789"),
];

/// The test config. Listener `api` accepts only the default tenant's keys (the
/// unrestricted key `anyone` belongs to tenant `public`, which only listener
/// `open` accepts). `prod_extra` adds entries to key `prod`'s list.
fn config(pin_path: &Path, mode: &str, prod_extra: &[IpAddr]) -> String {
    let mut prod = vec![format!("\"{V4_EXACT}\""), format!("\"{V6_EXACT}\"")];
    prod.extend(prod_extra.iter().map(|a| format!("\"{a}\"")));
    format!(
        r#"{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API_PORT}", mode: proxy, upstream: "http://127.0.0.1:8080", tenants: [default] }}
  - {{ name: open, bind: "0.0.0.0:{OPEN_PORT}", mode: proxy, upstream: "http://127.0.0.1:8080", tenants: [public] }}
keys:
  - {{ id: prod, name: Prod, secret_env: KF_E2E_PROD, ip_allow_list: [{prod}] }}
  - {{ id: office, name: Office, secret_env: KF_E2E_OFFICE, ip_allow_list: "198.51.100.0/24, 2001:db8:2::/48" }}
  - {{ id: anyone, name: Open, tenant: public, secret_env: KF_E2E_OPEN }}
{metrics}
"#,
        datapath = config::datapath(pin_path, mode),
        metrics = config::metrics(),
        prod = prod.join(", "),
    )
}

/// The hosts and the agent. Field order is drop order: the agent detaches
/// while its namespace still exists.
struct Scenario {
    agent: Agent,
    lab: Lab,
}

impl Scenario {
    fn new(mode: &str) -> Self {
        let lab = Lab::new(&CLIENT_ADDRS).expect("building the namespaces");
        let agent = Agent::start(&lab.gateway, &SECRETS, |pin| config(pin, mode, &[]))
            .expect("starting keyfence");
        Self { agent, lab }
    }

    fn connect(&self, source: IpAddr, port: u16, wait: Duration) -> Connect {
        tcp_connect(
            &self.lab.client,
            source,
            Lab::gateway_addr(source, port),
            wait,
        )
    }

    #[track_caller]
    fn assert_completes(&self, source: IpAddr, port: u16) {
        let outcome = self.connect(source, port, ALLOWED_WAIT);
        assert!(
            outcome.completed(),
            "{source} → :{port} should complete, got {outcome:?}"
        );
    }

    /// The attempt times out (its one SYN dropped) and the listener's
    /// `not_allowed` counter moves.
    #[track_caller]
    fn assert_dropped(&self, source: IpAddr, port: u16) {
        let listener = if port == API_PORT { "api" } else { "open" };
        let before = self.count(listener, "not_allowed");
        let outcome = self.connect(source, port, REFUSED_WAIT);
        assert!(
            outcome.timed_out(),
            "{source} → :{port} should time out (SYN dropped), got {outcome:?}"
        );
        assert!(
            self.count(listener, "not_allowed") > before,
            "{source} → :{port} timed out but not_allowed did not move"
        );
    }

    fn count(&self, listener: &str, reason: &str) -> u64 {
        self.agent
            .packet_count(listener, reason)
            .expect("reading /metrics")
    }
}

#[test]
fn auto_mode_is_native_xdp_and_enforces_the_allow_lists() {
    let s = Scenario::new("auto");
    assert_eq!(
        s.agent.attached().expect("reading /metrics"),
        [("gw0".to_owned(), "native".to_owned())],
        "mode auto on a veth must attach native XDP"
    );
    let (exact, prefix, direct, dropped) = (
        s.count("api", "allowed_exact"),
        s.count("api", "allowed_prefix"),
        s.count("api", "allowed_direct"),
        s.count("api", "not_allowed"),
    );

    for source in ALLOWED {
        s.assert_completes(source, API_PORT);
    }
    for source in REFUSED {
        s.assert_dropped(source, API_PORT);
        s.assert_dropped(source, API_PORT);
    }
    // Each refused attempt sent exactly one SYN; each allowed connection sent
    // at least its SYN and its final ACK through the datapath.
    let refused_syns = 2 * REFUSED.len() as u64;
    assert!(
        s.count("api", "not_allowed") >= dropped + refused_syns,
        "not_allowed moved from {dropped} to {}, expected at least +{refused_syns}",
        s.count("api", "not_allowed")
    );
    assert!(
        s.count("api", "allowed_exact") >= exact + 2,
        "allowed_exact did not move"
    );
    assert!(
        s.count("api", "allowed_prefix") >= prefix + 2,
        "allowed_prefix did not move"
    );
    // IPv4 sources are decided by the direct tables (both IPv6 ones above).
    assert!(
        s.count("api", "allowed_direct") >= direct + 4,
        "allowed_direct did not move"
    );
}

#[test]
fn an_unrestricted_key_opens_its_listener_to_everyone() {
    let s = Scenario::new("auto");
    let open_before = s.count("open", "listener_open");
    for source in [REFUSED_V4, REFUSED_V4_NEIGHBOUR, V4_EXACT] {
        s.assert_completes(source, OPEN_PORT);
    }
    assert!(
        s.count("open", "listener_open") >= open_before + 3,
        "listener_open did not move for listener open"
    );
    // The same sources stay refused on the listener that does not take the key.
    s.assert_dropped(REFUSED_V4, API_PORT);
    s.assert_dropped(REFUSED_V4_NEIGHBOUR, API_PORT);
}

#[test]
fn tc_mode_enforces_the_same_allow_lists() {
    let s = Scenario::new("tc");
    assert_eq!(
        s.agent.attached().expect("reading /metrics"),
        [("gw0".to_owned(), "tc".to_owned())],
        "mode tc must attach the TC program"
    );
    let dropped = s.count("api", "not_allowed");
    for source in ALLOWED {
        s.assert_completes(source, API_PORT);
    }
    for source in REFUSED {
        s.assert_dropped(source, API_PORT);
    }
    s.assert_completes(REFUSED_V4, OPEN_PORT);
    assert!(
        s.count("api", "not_allowed") >= dropped + REFUSED.len() as u64,
        "not_allowed did not count the drops in tc mode"
    );
}

/// Issue 13: SYNs padded with IPv6 extension headers (destination options).
/// Seven, one more than the parser used to walk, are judged like any SYN; a
/// chain longer than the walk passes under `datapath.unparsed: pass` (and the
/// gateway answers it if its kernel follows chains that long, as 6.1 does;
/// newer kernels discard more than 12 headers) and is dropped under `drop`.
/// Each SYN is hand-made and sent through a raw socket; a SYN-ACK coming back
/// means it reached the shim's listen queue.
#[test]
fn extension_header_chains_do_not_carry_refused_syns_past_the_datapath() {
    const WALK: usize = 32;
    const SYN_ACK_WAIT: Duration = Duration::from_millis(500);
    let s = Scenario::new("auto");
    let pin = s.agent.pin_path().to_owned();
    let gateway = SocketAddrV6::new(GATEWAY_V6, API_PORT, 0, 0);
    let sport = Cell::new(41_000u16);
    // A SYN from `source` to `to` behind `headers`, sent inside `ns`.
    let answered_in = |ns: &Netns, source: Ipv6Addr, to: SocketAddrV6, headers: usize| {
        sport.set(sport.get() + 1);
        let port = sport.get();
        let chain = vec![Ext::Options(NEXT_DEST, 0); headers];
        ns.run(move || rawsyn::syn_answered(source, port, to, &chain, SYN_ACK_WAIT))
            .expect("entering the namespace")
            .expect("sending a raw SYN")
    };
    let answered = |source: IpAddr, headers: usize| -> bool {
        let IpAddr::V6(source) = source else {
            unreachable!("IPv6 sources only")
        };
        answered_in(&s.lab.client, source, gateway, headers)
    };

    // The hand-made SYN is one the gateway's stack takes: allowed, it is answered.
    assert!(
        answered(V6_EXACT, 7),
        "an allowed SYN behind 7 extension headers got no SYN-ACK"
    );
    let dropped = s.count("api", "not_allowed");
    assert!(
        !answered(REFUSED_V6, 7),
        "a refused SYN behind 7 extension headers was answered"
    );
    assert!(
        s.count("api", "not_allowed") > dropped,
        "the refused SYN behind 7 headers was not counted not_allowed"
    );
    assert!(
        !answered(REFUSED_V6, WALK),
        "a refused SYN behind the deepest chain walked was answered"
    );

    // Past the walk, `unparsed: pass` (the default) lets it through, counted
    // malformed. Whether the gateway's stack then answers is the kernel's
    // choice: 6.1 follows any number of headers, newer kernels discard a
    // packet with more than 12 (`IP6_MAX_EXT_HDRS_CNT`). Asked first over the
    // gateway's loopback, where no datapath is attached.
    let stack_takes = answered_in(
        &s.lab.gateway,
        Ipv6Addr::LOCALHOST,
        SocketAddrV6::new(Ipv6Addr::LOCALHOST, API_PORT, 0, 0),
        WALK + 1,
    );
    let malformed = s.count("none", "malformed");
    assert_eq!(
        answered(REFUSED_V6, WALK + 1),
        stack_takes,
        "with unparsed: pass a SYN past the walk should fare as it does without the datapath \
         (answered over loopback: {stack_takes})"
    );
    assert!(
        s.count("none", "malformed") > malformed,
        "the SYN past the walk was not passed as malformed"
    );

    // `unparsed: drop` stops it, from any source, after a reload.
    s.agent
        .replace_config(
            &config(&pin, "auto", &[]).replace("mode: auto,", "mode: auto, unparsed: drop,"),
        )
        .expect("replacing the config");
    let closed = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let unparsed = s.count("none", "unparsed");
        !answered(REFUSED_V6, WALK + 1) && s.count("none", "unparsed") > unparsed
    });
    assert!(closed, "unparsed: drop not in force 5 s after the reload");
    let unparsed = s.count("none", "unparsed");
    assert!(!answered(REFUSED_V6, WALK + 1));
    assert!(
        !answered(V6_EXACT, WALK + 1),
        "the port is unknown: any source drops"
    );
    assert!(
        s.count("none", "unparsed") >= unparsed + 2,
        "drops past the walk were not counted unparsed"
    );
    // Within the walk nothing changed.
    assert!(answered(V6_EXACT, 7));
    assert!(!answered(REFUSED_V6, 7));
    s.assert_completes(V6_EXACT, API_PORT);
}

#[test]
fn config_edits_are_enforced_without_restart() {
    let mut s = Scenario::new("auto");
    let pid = s.agent.pid();
    let pin = s.agent.pin_path().to_owned();
    s.assert_dropped(REFUSED_V4, API_PORT);

    // Edit in place: key prod now lists the refused address.
    s.agent
        .write_config(&config(&pin, "auto", &[REFUSED_V4]))
        .expect("editing the config");
    let opened = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        s.connect(REFUSED_V4, API_PORT, Duration::from_millis(300))
            .completed()
    });
    assert!(
        opened,
        "the added address was not allowed within 5 s of the edit"
    );
    s.assert_completes(REFUSED_V4, API_PORT);
    s.assert_completes(V4_EXACT, API_PORT);
    s.assert_dropped(REFUSED_V6, API_PORT);

    // Replace by rename (as editors do): the address is gone again.
    s.agent
        .replace_config(&config(&pin, "auto", &[]))
        .expect("replacing the config");
    let closed = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        s.connect(REFUSED_V4, API_PORT, Duration::from_millis(300))
            .timed_out()
    });
    assert!(
        closed,
        "the removed address still connects 5 s after the edit"
    );
    for _ in 0..3 {
        s.assert_dropped(REFUSED_V4, API_PORT);
    }
    s.assert_completes(V4_EXACT, API_PORT);
    s.assert_completes(V6_PREFIX, API_PORT);

    assert!(s.agent.is_running(), "the agent exited");
    assert_eq!(s.agent.pid(), pid, "the agent was restarted");
}

/// Every ~50 ms a refused attempt, every ~100 ms an allowed one, while the agent
/// is killed with SIGKILL, stays down for a second, and starts again. Refused
/// sources never complete a handshake, also while no agent runs.
#[test]
fn enforcement_survives_an_agent_kill_and_restart() {
    let mut s = Scenario::new("auto");
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let max_run = Duration::from_secs(20);
    let client = &s.lab.client;

    let (refused, allowed, killed_at, ready_at) = thread::scope(|scope| {
        let refusing_client = scope.spawn(|| {
            let mut attempts = Vec::new();
            // Bounded: at most 400 attempts (20 s at 50 ms).
            for i in 0..400_u32 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > max_run {
                    break;
                }
                let source = if i % 2 == 0 { REFUSED_V4 } else { REFUSED_V6 };
                let at = started.elapsed();
                attempts.push((
                    at,
                    source,
                    scope.spawn(move || {
                        let dest = Lab::gateway_addr(source, API_PORT);
                        tcp_connect(client, source, dest, REFUSED_WAIT)
                    }),
                ));
                thread::sleep(Duration::from_millis(50));
            }
            attempts
                .into_iter()
                .map(|(at, source, h)| (at, source, h.join().expect("attempt thread")))
                .collect::<Vec<_>>()
        });
        let allowed_client = scope.spawn(|| {
            let mut attempts = Vec::new();
            for i in 0..200_u32 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > max_run {
                    break;
                }
                let source = if i % 2 == 0 { V4_EXACT } else { V6_PREFIX };
                let at = started.elapsed();
                let dest = Lab::gateway_addr(source, API_PORT);
                attempts.push((at, source, tcp_connect(client, source, dest, ALLOWED_WAIT)));
                thread::sleep(Duration::from_millis(100));
            }
            attempts
        });

        thread::sleep(Duration::from_millis(500));
        let killed_at = started.elapsed();
        let status = s.agent.sigkill().expect("SIGKILL the agent");
        assert!(!status.success(), "a SIGKILLed agent cannot exit 0");
        thread::sleep(Duration::from_secs(1));
        s.agent.spawn().expect("starting the agent again");
        s.agent
            .wait_ready(Duration::from_secs(30))
            .expect("the restarted agent becomes ready");
        let ready_at = started.elapsed();
        thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::SeqCst);

        let refused = refusing_client.join().expect("refusing client");
        let allowed = allowed_client.join().expect("allowed client");
        let in_gap = refused
            .iter()
            .filter(|(at, _, _)| *at > killed_at && *at < ready_at)
            .count();
        assert!(
            in_gap >= 10,
            "only {in_gap} refused attempts while the agent was away ({killed_at:?}..{ready_at:?})"
        );
        (refused, allowed, killed_at, ready_at)
    });

    let completed: Vec<_> = refused
        .iter()
        .filter(|(_, _, outcome)| !outcome.timed_out())
        .collect();
    assert!(
        completed.is_empty(),
        "{} of {} refused attempts did not time out: {completed:?}",
        completed.len(),
        refused.len()
    );
    check_allowed_across_restart(&allowed, killed_at, ready_at);

    // The restarted agent still counts drops.
    let before = s.count("api", "not_allowed");
    s.assert_dropped(REFUSED_V4, API_PORT);
    assert!(s.count("api", "not_allowed") > before);
}

/// While the agent is away nobody listens on the port: an allowed SYN still
/// passes the pinned datapath and meets the kernel's RST (or, when it reached
/// the listener just as the killed process's socket closed, a RST right after
/// the handshake). Outside that window (with a margin for an attempt under
/// way) every allowed attempt completes; inside it, none may time out (that
/// would be a dropped SYN).
#[track_caller]
fn check_allowed_across_restart(
    allowed: &[(Duration, IpAddr, Connect)],
    killed_at: Duration,
    ready_at: Duration,
) {
    let margin = ALLOWED_WAIT + Duration::from_millis(100);
    let in_window = |at: Duration| at + margin > killed_at && at < ready_at;
    let failed: Vec<_> = allowed
        .iter()
        .filter(|(at, _, outcome)| !(outcome.completed() || in_window(*at) && outcome.reset()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} allowed attempts failed: {failed:?}",
        failed.len(),
        allowed.len()
    );
    assert!(allowed.len() >= 10, "too few allowed attempts");
    let gap_rsts = allowed
        .iter()
        .filter(|(_, _, outcome)| outcome.reset())
        .count();
    assert!(
        gap_rsts >= 3,
        "only {gap_rsts} allowed attempts met the empty port while the agent was away"
    );
}

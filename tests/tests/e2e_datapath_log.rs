//! End to end: the eBPF programs' own log records (aya-log) reach the agent's
//! log under the target `keyfence::datapath`, and only behind the kernel's
//! per-CPU rate limit (one record per CPU per 100 ms), never one per packet.
//! The real `keyfence` on the lab's gateway veth (topology in `tests/README.md`).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddrV6},
    path::Path,
    time::Duration,
};

use keyfence_tests::{
    config,
    frames::{Ext, NEXT_DEST},
    netns::{Agent, GATEWAY_V6, Lab, poll_until},
    rawsyn,
};

const API_PORT: u16 = 8443;
const ALLOWED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const SECRETS: [(&str, &str); 1] = [("KF_E2E_PROD", "e2e-prod-secret-0123456789")];
/// One more IPv6 extension header than the parser walks: `malformed`.
const PAST_THE_WALK: usize = 33;
/// Packets sent back to back: far inside one 100 ms window per CPU.
const BURST: u16 = 20;
/// What `ebpf/src/log.rs` says about a malformed packet.
const MALFORMED_LINE: &str = "malformed header: the parser cannot read the packet";

fn config(pin: &Path, mode: &str) -> String {
    format!(
        r#"{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API_PORT}", mode: proxy, upstream: "http://127.0.0.1:8080" }}
keys:
  - {{ id: prod, name: Prod, secret_env: KF_E2E_PROD, ip_allow_list: ["{ALLOWED}"] }}
{metrics}
"#,
        datapath = config::datapath(pin, mode),
        metrics = config::metrics(),
    )
}

/// Lines of the agent's log from the datapath's own records.
fn datapath_lines(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("keyfence::datapath") && l.contains(MALFORMED_LINE))
        .map(str::to_owned)
        .collect()
}

fn malformed_records_reach_the_log(mode: &str) {
    let lab = Lab::new(&[IpAddr::V6(ALLOWED)]).expect("building the namespaces");
    let agent =
        Agent::start(&lab.gateway, &SECRETS, |pin| config(pin, mode)).expect("starting keyfence");
    assert!(datapath_lines(&agent).is_empty(), "{}", agent.log());
    let before = agent
        .packet_count("none", "malformed")
        .expect("reading /metrics");
    let gateway = SocketAddrV6::new(GATEWAY_V6, API_PORT, 0, 0);
    let chain = vec![Ext::Options(NEXT_DEST, 0); PAST_THE_WALK];
    lab.client
        .run(move || {
            for i in 0..BURST {
                rawsyn::syn_answered(ALLOWED, 42_000 + i, gateway, &chain, Duration::ZERO)?;
            }
            anyhow::Ok(())
        })
        .expect("entering the client namespace")
        .expect("sending raw SYNs");
    let counted = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        agent
            .packet_count("none", "malformed")
            .is_ok_and(|n| n >= before + u64::from(BURST))
    });
    assert!(counted, "the datapath did not count the burst malformed");
    let logged = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        !datapath_lines(&agent).is_empty()
    });
    assert!(
        logged,
        "no aya-log record of the malformed packets in the agent's log:\n{}",
        agent.log()
    );
    let lines = datapath_lines(&agent);
    // Rate-limited per CPU: a burst sent within well under a second gives a
    // handful of records at most (2 CPUs, 100 ms), never one per packet.
    assert!(
        lines.len() < usize::from(BURST) / 2,
        "{} records for {BURST} packets: the log is not rate-limited:\n{}",
        lines.len(),
        lines.join("\n")
    );
}

#[test]
fn xdp_logs_malformed_headers_through_aya_log() {
    malformed_records_reach_the_log("native");
}

#[test]
fn tc_logs_malformed_headers_through_aya_log() {
    malformed_records_reach_the_log("tc");
}

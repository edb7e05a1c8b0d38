//! Datapath behaviour as a table of packet fixtures, run through
//! `BPF_PROG_TEST_RUN` on the real object (XDP and TC programs), maps seeded by
//! the agent's own writer. Each row checks the verdict, that exactly the
//! expected counter moved by one, and that the reference model agrees. The
//! tables run with `datapath.unparsed: pass` and `drop`.
//! Needs root (BPF); run with `cargo xtask test`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun as _, TestRunOptions};
use keyfence::{config::Unparsed, policy::CompiledPolicy};
use keyfence_common::{WILDCARD_V4, WILDCARD_V6, ipv4_mapped, map_names, stats::Stat};
use keyfence_tests::{
    frames::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Ext, L4, NEXT_DEST, NEXT_ESP, NEXT_HOP,
        NEXT_NONE, NEXT_ROUTING, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, arp, ethernet, ipv4, ipv6,
        simple,
    },
    loaded::{Loaded, open, restricted},
    refmodel,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX; // -1
/// `BPF_PROG_TEST_RUN` runs the programs on the loopback device (ifindex 1);
/// the test maps it to this counter slot to exercise the interface lookup.
const LO_SLOT: u32 = 3;

fn policy() -> CompiledPolicy {
    CompiledPolicy {
        listeners: vec![
            restricted(
                "api",
                "[::]:8443",
                &[
                    "198.51.100.0/24",
                    "203.0.113.100/32",
                    "203.0.113.101/32",
                    "2001:db8:1::10/128",
                    "2001:db8:2::/48",
                ],
            ),
            restricted("admin", "192.0.2.1:22", &["203.0.113.0/30"]),
            open("open", "0.0.0.0:8444"),
            restricted("v6any", "[2001:db8::1]:9443", &["::/0"]),
            // The direct IPv4 tables' shapes: a /24 that needs a node of
            // its own (a /25 and a host in it), a whole /24, and a /0 (every
            // top entry) on a listener of its own.
            restricted(
                "edge",
                "0.0.0.0:7443",
                &["192.0.2.0/25", "192.0.2.200/32", "203.0.113.0/24"],
            ),
            restricted("any4", "0.0.0.0:7444", &["0.0.0.0/0"]),
        ],
        next_change: None,
    }
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn tcp(dport: u16) -> L4 {
    L4::Tcp {
        sport: 40000,
        dport,
    }
}
fn tcp_bytes(dport: u16) -> Vec<u8> {
    tcp(dport).bytes()
}

const GW4: &str = "192.0.2.1";
const GW6: &str = "2001:db8::1";

/// `(name, packet, expected reason, listener the packet is counted under)`.
type Row = (&'static str, Vec<u8>, Stat, Option<&'static str>);

/// The deepest IPv6 extension chain the parser walks (`MAX_IPV6_EXT_HEADERS`).
const MAX_EXT: usize = 32;

/// `n` minimal extension headers of every kind the parser walks, in turn.
fn chain(n: usize) -> Vec<Ext> {
    (0..n)
        .map(|i| match i % 5 {
            0 => Ext::Options(NEXT_HOP, 0),
            1 => Ext::Options(NEXT_DEST, 0),
            2 => Ext::Options(NEXT_ROUTING, 0),
            3 => Ext::Fragment {
                offset: 0,
                more: false,
            },
            _ => Ext::Auth(0),
        })
        .collect()
}

/// Rows of [`fixtures`] whose IP header the parser read but whose transport
/// header it could not reach: under `datapath.unparsed: drop` (every address
/// is protected there, by the wildcard listener `api`) they are dropped.
const UNREACHED: &[&str] = &[
    "one header more than the walk",
    "a non-first fragment past the walk is out of reach too",
    "transport header past the bytes the parser reads",
    "truncated in an extension header",
    "truncated before the IPv4 ports",
    "truncated before the IPv6 ports",
    "truncated in the last header of the deepest chain",
    "truncated after the deepest chain",
];

/// The rows as `datapath.unparsed: drop` should see them.
fn in_drop_mode(rows: Vec<Row>) -> Vec<Row> {
    rows.into_iter()
        .map(|(name, packet, stat, listener)| {
            if UNREACHED.contains(&name) {
                (name, packet, Stat::DropUnparsed, None)
            } else {
                (name, packet, stat, listener)
            }
        })
        .collect()
}

#[expect(clippy::too_many_lines, reason = "the table is the test")]
fn fixtures() -> Vec<Row> {
    let v6pkt = |src: &str, exts: &[Ext], l4: &L4| {
        ethernet(
            &[],
            ETH_P_IPV6,
            &ipv6(v6(src), v6(GW6), exts, l4.proto(), None, &l4.bytes()),
        )
    };
    let allowed4 = "203.0.113.100";
    let refused4 = "192.0.2.99";
    let refused6 = "2001:db8:3::1";
    let mut rows: Vec<Row> = vec![
        // The direct tables: boundaries inside a node, whole /24s, a /0.
        (
            "direct: last address of a /25",
            simple(&[], ip("192.0.2.127"), ip(GW4), &tcp(7443)),
            Stat::PassAllowedDirect,
            Some("edge"),
        ),
        (
            "direct: first address after a /25",
            simple(&[], ip("192.0.2.128"), ip(GW4), &tcp(7443)),
            Stat::DropNotAllowed,
            Some("edge"),
        ),
        (
            "direct: a host beside a /25 in one node",
            simple(&[], ip("192.0.2.200"), ip(GW4), &tcp(7443)),
            Stat::PassAllowedDirect,
            Some("edge"),
        ),
        (
            "direct: the address after that host",
            simple(&[], ip("192.0.2.201"), ip(GW4), &tcp(7443)),
            Stat::DropNotAllowed,
            Some("edge"),
        ),
        (
            "direct: first address of a whole /24",
            simple(&[], ip("203.0.113.0"), ip(GW4), &tcp(7443)),
            Stat::PassAllowedDirect,
            Some("edge"),
        ),
        (
            "direct: last address of a whole /24",
            simple(&[], ip("203.0.113.255"), ip(GW4), &tcp(7443)),
            Stat::PassAllowedDirect,
            Some("edge"),
        ),
        (
            "direct: another listener's /24 is not this one's",
            simple(&[], ip("198.51.100.77"), ip(GW4), &tcp(7443)),
            Stat::DropNotAllowed,
            Some("edge"),
        ),
        (
            "direct: 0.0.0.0/0 admits any IPv4 source",
            simple(&[], ip("198.51.100.77"), ip(GW4), &tcp(7444)),
            Stat::PassAllowedDirect,
            Some("any4"),
        ),
        (
            "direct: 0.0.0.0/0, the lowest source",
            simple(&[], ip("0.0.0.0"), ip(GW4), &tcp(7444)),
            Stat::PassAllowedDirect,
            Some("any4"),
        ),
        // Verdicts on the dual-stack restricted listener.
        (
            "v4 exact allowed",
            simple(&[], ip(allowed4), ip(GW4), &tcp(8443)),
            Stat::PassAllowedDirect,
            Some("api"),
        ),
        (
            "v4 prefix allowed",
            simple(&[], ip("198.51.100.77"), ip(GW4), &tcp(8443)),
            Stat::PassAllowedDirect,
            Some("api"),
        ),
        (
            "v4 refused",
            simple(&[], ip(refused4), ip(GW4), &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "v6 exact allowed",
            simple(&[], ip("2001:db8:1::10"), ip(GW6), &tcp(8443)),
            Stat::PassAllowedExact,
            Some("api"),
        ),
        (
            "v6 prefix allowed",
            simple(&[], ip("2001:db8:2:ffff::1"), ip(GW6), &tcp(8443)),
            Stat::PassAllowedPrefix,
            Some("api"),
        ),
        (
            "v6 refused",
            simple(&[], ip(refused6), ip(GW6), &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "v4-mapped source matches its IPv4 entry",
            simple(&[], ip("::ffff:203.0.113.100"), ip(GW6), &tcp(8443)),
            Stat::PassAllowedExact,
            Some("api"),
        ),
        (
            "v4-mapped source outside the list",
            simple(&[], ip("::ffff:192.0.2.99"), ip(GW6), &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        // Tags.
        (
            "802.1Q refused",
            simple(&[ETH_P_8021Q], ip(refused4), ip(GW4), &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "802.1Q allowed",
            simple(&[ETH_P_8021Q], ip(allowed4), ip(GW4), &tcp(8443)),
            Stat::PassAllowedDirect,
            Some("api"),
        ),
        (
            "QinQ v6 allowed",
            simple(
                &[ETH_P_8021AD, ETH_P_8021Q],
                ip("2001:db8:2::5"),
                ip(GW6),
                &tcp(8443),
            ),
            Stat::PassAllowedPrefix,
            Some("api"),
        ),
        (
            "QinQ v4 refused",
            simple(
                &[ETH_P_8021AD, ETH_P_8021Q],
                ip(refused4),
                ip(GW4),
                &tcp(8443),
            ),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "three tags are not parsed",
            simple(
                &[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q],
                ip(refused4),
                ip(GW4),
                &tcp(8443),
            ),
            Stat::PassNotIp,
            None,
        ),
        // Not for a listener.
        ("ARP", arp(), Stat::PassNotIp, None),
        (
            "ICMP to a protected address",
            simple(
                &[],
                ip(refused4),
                ip(GW4),
                &L4::Raw {
                    proto: PROTO_ICMP,
                    payload: vec![8, 0, 0, 0, 0, 1, 0, 1],
                },
            ),
            Stat::PassNotTcpUdp,
            None,
        ),
        (
            "ICMPv6 neighbour solicitation",
            simple(
                &[],
                ip("fe80::2"),
                ip(GW6),
                &L4::Raw {
                    proto: PROTO_ICMPV6,
                    payload: vec![135, 0, 0, 0, 0, 0, 0, 0],
                },
            ),
            Stat::PassNotTcpUdp,
            None,
        ),
        (
            "UDP to a TCP listener's port",
            simple(
                &[],
                ip(refused4),
                ip(GW4),
                &L4::Udp {
                    sport: 53,
                    dport: 8443,
                },
            ),
            Stat::PassNoListener,
            None,
        ),
        (
            "TCP to an unprotected port",
            simple(&[], ip(refused4), ip(GW4), &tcp(8080)),
            Stat::PassNoListener,
            None,
        ),
        // Open, specific and single-family binds.
        (
            "open listener",
            simple(&[], ip(refused4), ip(GW4), &tcp(8444)),
            Stat::PassListenerOpen,
            Some("open"),
        ),
        (
            "0.0.0.0 bind is IPv4 only",
            simple(&[], ip(refused6), ip(GW6), &tcp(8444)),
            Stat::PassNoListener,
            None,
        ),
        (
            "specific bind, allowed",
            simple(&[], ip("203.0.113.2"), ip(GW4), &tcp(22)),
            Stat::PassAllowedDirect,
            Some("admin"),
        ),
        (
            "specific bind, refused",
            simple(&[], ip("203.0.113.9"), ip(GW4), &tcp(22)),
            Stat::DropNotAllowed,
            Some("admin"),
        ),
        (
            "specific bind, other address",
            simple(&[], ip("203.0.113.9"), ip("192.0.2.2"), &tcp(22)),
            Stat::PassNoListener,
            None,
        ),
        (
            "::/0 admits IPv6",
            simple(&[], ip("2001:db8:9::9"), ip(GW6), &tcp(9443)),
            Stat::PassAllowedPrefix,
            Some("v6any"),
        ),
        (
            "::/0 does not admit IPv4-mapped",
            simple(&[], ip("::ffff:203.0.113.100"), ip(GW6), &tcp(9443)),
            Stat::DropNotAllowed,
            Some("v6any"),
        ),
        // IPv4 header shapes.
        (
            "IPv4 options, allowed",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(
                    v4(allowed4),
                    v4(GW4),
                    PROTO_TCP,
                    12,
                    0,
                    None,
                    &tcp_bytes(8443),
                ),
            ),
            Stat::PassAllowedDirect,
            Some("api"),
        ),
        (
            "IPv4 maximum options, refused",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(
                    v4(refused4),
                    v4(GW4),
                    PROTO_TCP,
                    40,
                    0,
                    None,
                    &tcp_bytes(8443),
                ),
            ),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "IHL below 5",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(
                    v4(refused4),
                    v4(GW4),
                    PROTO_TCP,
                    0,
                    0,
                    Some(0x44),
                    &tcp_bytes(8443),
                ),
            ),
            Stat::PassMalformed,
            None,
        ),
        (
            "version 6 under the IPv4 ethertype",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(
                    v4(refused4),
                    v4(GW4),
                    PROTO_TCP,
                    0,
                    0,
                    Some(0x65),
                    &tcp_bytes(8443),
                ),
            ),
            Stat::PassMalformed,
            None,
        ),
        (
            "IPv4 non-first fragment",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(
                    v4(refused4),
                    v4(GW4),
                    PROTO_TCP,
                    0,
                    100,
                    None,
                    &tcp_bytes(8443),
                ),
            ),
            Stat::PassFragment,
            None,
        ),
        (
            "IPv4 first fragment (MF) is judged",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(
                    v4(refused4),
                    v4(GW4),
                    PROTO_TCP,
                    0,
                    0x2000,
                    None,
                    &tcp_bytes(8443),
                ),
            ),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        // IPv6 extension headers.
        (
            "hop-by-hop + destination options, allowed",
            v6pkt(
                "2001:db8:2::7",
                &[Ext::Options(NEXT_HOP, 0), Ext::Options(NEXT_DEST, 1)],
                &tcp(8443),
            ),
            Stat::PassAllowedPrefix,
            Some("api"),
        ),
        (
            "routing header, refused",
            v6pkt(refused6, &[Ext::Options(NEXT_ROUTING, 2)], &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "first fragment, refused",
            v6pkt(
                refused6,
                &[Ext::Fragment {
                    offset: 0,
                    more: true,
                }],
                &tcp(8443),
            ),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "non-first fragment",
            v6pkt(
                refused6,
                &[Ext::Fragment {
                    offset: 185,
                    more: false,
                }],
                &tcp(8443),
            ),
            Stat::PassFragment,
            None,
        ),
        (
            "authentication header, refused",
            v6pkt(refused6, &[Ext::Auth(4)], &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "six extension headers are followed",
            v6pkt(
                refused6,
                &[
                    Ext::Options(NEXT_HOP, 0),
                    Ext::Options(NEXT_DEST, 0),
                    Ext::Options(NEXT_ROUTING, 0),
                    Ext::Options(NEXT_DEST, 0),
                    Ext::Fragment {
                        offset: 0,
                        more: false,
                    },
                    Ext::Auth(1),
                ],
                &tcp(8443),
            ),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "seven extension headers are followed (issue 13)",
            v6pkt(refused6, &chain(7), &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "the deepest chain walked, refused",
            v6pkt(refused6, &chain(MAX_EXT), &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "the deepest chain walked, allowed",
            v6pkt("2001:db8:2::7", &chain(MAX_EXT), &tcp(8443)),
            Stat::PassAllowedPrefix,
            Some("api"),
        ),
        (
            "one header more than the walk",
            v6pkt(refused6, &chain(MAX_EXT + 1), &tcp(8443)),
            Stat::PassMalformed,
            None,
        ),
        (
            "a non-first fragment past the walk is out of reach too",
            v6pkt(
                refused6,
                &[
                    chain(MAX_EXT),
                    vec![Ext::Fragment {
                        offset: 185,
                        more: false,
                    }],
                ]
                .concat(),
                &tcp(8443),
            ),
            Stat::PassMalformed,
            None,
        ),
        (
            "transport header past the bytes the parser reads",
            v6pkt(refused6, &[Ext::Options(NEXT_DEST, 60)], &tcp(8443)),
            Stat::PassMalformed,
            None,
        ),
        (
            "transport header at the last byte the parser reads",
            // TCP at 14 + 40 + 8 * 56 = 502 <= 508 (57 units would be 510).
            v6pkt(refused6, &[Ext::Options(NEXT_DEST, 55)], &tcp(8443)),
            Stat::DropNotAllowed,
            Some("api"),
        ),
        (
            "ESP",
            v6pkt(
                refused6,
                &[],
                &L4::Raw {
                    proto: NEXT_ESP,
                    payload: vec![0; 16],
                },
            ),
            Stat::PassNotTcpUdp,
            None,
        ),
        (
            "no next header",
            v6pkt(
                refused6,
                &[],
                &L4::Raw {
                    proto: NEXT_NONE,
                    payload: vec![],
                },
            ),
            Stat::PassNotTcpUdp,
            None,
        ),
        (
            "version 4 under the IPv6 ethertype",
            ethernet(
                &[],
                ETH_P_IPV6,
                &ipv6(
                    v6(refused6),
                    v6(GW6),
                    &[],
                    PROTO_TCP,
                    Some(4),
                    &tcp_bytes(8443),
                ),
            ),
            Stat::PassMalformed,
            None,
        ),
    ];
    // Truncation at each header boundary: everything up to the boundary, one byte short.
    let tagged = simple(&[ETH_P_8021Q], ip(refused4), ip(GW4), &tcp(8443));
    let plain4 = simple(&[], ip(refused4), ip(GW4), &tcp(8443));
    let opts4 = ethernet(
        &[],
        ETH_P_IP,
        &ipv4(
            v4(refused4),
            v4(GW4),
            PROTO_TCP,
            12,
            0,
            None,
            &tcp_bytes(8443),
        ),
    );
    let ext6 = v6pkt(refused6, &[Ext::Options(NEXT_HOP, 1)], &tcp(8443));
    let deep6 = v6pkt(refused6, &chain(MAX_EXT), &tcp(8443));
    let plain6 = simple(&[], ip(refused6), ip(GW6), &tcp(8443));
    rows.extend([
        (
            "truncated in the VLAN tag",
            tagged[..16].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated in the IPv4 header",
            plain4[..14 + 19].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated in the IPv4 options",
            opts4[..14 + 28].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated before the IPv4 ports",
            plain4[..14 + 20 + 3].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated in the IPv6 header",
            plain6[..14 + 39].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated in an extension header",
            ext6[..14 + 40 + 7].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated before the IPv6 ports",
            plain6[..14 + 40 + 3].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated in the last header of the deepest chain",
            deep6[..14 + 40 + 8 * MAX_EXT - 1].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated after the deepest chain",
            deep6[..14 + 40 + 8 * MAX_EXT + 2].to_vec(),
            Stat::PassTruncated,
            None,
        ),
        (
            "Ethernet header only",
            plain4[..14].to_vec(),
            Stat::PassTruncated,
            None,
        ),
    ]);
    rows
}

fn run_table(program: &str) {
    run_rows(program, "fixtures", &policy(), Unparsed::Pass, fixtures());
}

/// Every row through `program` with the maps seeded from `policy` and `mode`.
fn run_rows(program: &str, table: &str, policy: &CompiledPolicy, mode: Unparsed, rows: Vec<Row>) {
    let mut loaded = Loaded::new(&format!("{table}-{program}"), LO_SLOT)
        .expect("loading the datapath (root needed)");
    let dp = &mut loaded.datapath;
    dp.set_unparsed(mode);
    dp.apply(policy).expect("seeding the maps");
    let tables = dp.tables().expect("reading the policy maps");
    let unparsed = dp.unparsed_addresses().expect("reading KF_UNPARSED");
    assert_eq!(
        unparsed.is_empty(),
        mode == Unparsed::Pass,
        "KF_UNPARSED under {mode:?}"
    );
    assert!(rows.len() >= 10, "{} fixtures", rows.len());
    let mut failures = Vec::new();
    let mut refused_by_kernel = Vec::new();
    for (name, packet, stat, listener) in rows {
        let slot = listener.map_or(0, |l| dp.listener_slot(l).expect("listener slot"));
        assert_eq!(
            refmodel::verdict_with(&packet, &tables, &unparsed),
            (stat, slot),
            "{name}: the reference model disagrees with the fixture"
        );
        let before = dp.counters().unwrap();
        let opts = TestRunOptions {
            data_in: Some(&packet),
            ..TestRunOptions::default()
        };
        let result = match program {
            "xdp" => dp.xdp().test_run(opts),
            _ => dp.tc().test_run(opts),
        };
        let result = match result {
            Ok(r) => r,
            // The skb test harness validates headers it builds an skb from, so
            // some truncated frames cannot be fed to the TC program at all
            // (XDP runs them all); nothing else may be refused.
            Err(_)
                if program == "tc"
                    && (stat == Stat::PassTruncated
                        || (stat == Stat::DropUnparsed && name.starts_with("truncated"))) =>
            {
                refused_by_kernel.push(name);
                continue;
            }
            Err(e) => panic!("{name}: test run failed: {e}"),
        };
        let after = dp.counters().unwrap();
        let (drop_code, pass_code) = match program {
            "xdp" => (XDP_DROP, XDP_PASS),
            _ => (TC_ACT_SHOT, TC_ACT_UNSPEC),
        };
        let want = if stat.is_drop() { drop_code } else { pass_code };
        if result.return_value != want {
            failures.push(format!(
                "{name}: returned {} (want {want})",
                result.return_value
            ));
        }
        let moved = after.get(LO_SLOT, slot, stat) - before.get(LO_SLOT, slot, stat);
        let total: u64 = Stat::ALL
            .iter()
            .map(|s| after.total(*s) - before.total(*s))
            .sum();
        if moved != 1 || total != 1 {
            failures.push(format!(
                "{name}: counter {stat:?} at (iface {LO_SLOT}, listener {slot}) moved {moved}, all counters {total}"
            ));
        }
    }
    if !refused_by_kernel.is_empty() {
        eprintln!("{program}: the kernel would not build an skb for: {refused_by_kernel:?}");
    }
    assert!(
        failures.is_empty(),
        "{program} ({table}, {mode:?}):\n{}",
        failures.join("\n")
    );
}

#[test]
fn xdp_fixture_table() {
    run_table("xdp");
}

#[test]
fn tc_fixture_table() {
    run_table("tc");
}

/// The same table with `datapath.unparsed: drop`: the wildcard listener `api`
/// protects every address, so every packet whose transport header is out of
/// reach drops; everything else is judged as with `pass`.
#[test]
fn xdp_fixture_table_unparsed_drop() {
    run_rows(
        "xdp",
        "fixtures-drop",
        &policy(),
        Unparsed::Drop,
        in_drop_mode(fixtures()),
    );
}

#[test]
fn tc_fixture_table_unparsed_drop() {
    run_rows(
        "tc",
        "fixtures-drop",
        &policy(),
        Unparsed::Drop,
        in_drop_mode(fixtures()),
    );
}

/// Listeners on specific addresses only, and an open wildcard: which
/// destinations `datapath.unparsed: drop` protects.
fn specific_policy() -> CompiledPolicy {
    CompiledPolicy {
        listeners: vec![
            restricted("admin", "192.0.2.1:22", &["203.0.113.0/30"]),
            restricted("v6", "[2001:db8::1]:9443", &["2001:db8:2::/48"]),
            open("open", "[::]:8444"),
        ],
        next_change: None,
    }
}

/// `(name, packet, reason with pass, reason with drop, listener)`.
type UnparsedRow = (&'static str, Vec<u8>, Stat, Stat, Option<&'static str>);

#[expect(clippy::too_many_lines, reason = "the table is the test")]
fn unparsed_rows() -> Vec<UnparsedRow> {
    let to6 = |src: &str, dst: &str, exts: &[Ext], l4: &L4| {
        ethernet(
            &[],
            ETH_P_IPV6,
            &ipv6(v6(src), v6(dst), exts, l4.proto(), None, &l4.bytes()),
        )
    };
    let (refused6, allowed6) = ("2001:db8:3::1", "2001:db8:2::9");
    let (protected6, unprotected6) = ("2001:db8::1", "2001:db8::2");
    let (refused4, protected4, unprotected4) = ("203.0.113.9", "192.0.2.1", "192.0.2.2");
    let udp = L4::Udp {
        sport: 53,
        dport: 9443,
    };
    let tcp4 = simple(&[], ip(refused4), ip(protected4), &tcp(22));
    let tcp4_other = simple(&[], ip(refused4), ip(unprotected4), &tcp(22));
    let deep = to6(refused6, protected6, &chain(MAX_EXT + 1), &tcp(9443));
    vec![
        (
            "7 headers to a protected address, refused",
            to6(refused6, protected6, &chain(7), &tcp(9443)),
            Stat::DropNotAllowed,
            Stat::DropNotAllowed,
            Some("v6"),
        ),
        (
            "7 headers to a protected address, allowed",
            to6(allowed6, protected6, &chain(7), &tcp(9443)),
            Stat::PassAllowedPrefix,
            Stat::PassAllowedPrefix,
            Some("v6"),
        ),
        (
            "deepest chain to a protected address, refused",
            to6(refused6, protected6, &chain(MAX_EXT), &tcp(9443)),
            Stat::DropNotAllowed,
            Stat::DropNotAllowed,
            Some("v6"),
        ),
        (
            "deepest chain to a protected address, allowed",
            to6(allowed6, protected6, &chain(MAX_EXT), &tcp(9443)),
            Stat::PassAllowedPrefix,
            Stat::PassAllowedPrefix,
            Some("v6"),
        ),
        (
            "one header past the walk to a protected address",
            deep.clone(),
            Stat::PassMalformed,
            Stat::DropUnparsed,
            None,
        ),
        (
            "one header past the walk from an allowed source (the port is unknown)",
            to6(allowed6, protected6, &chain(MAX_EXT + 1), &tcp(9443)),
            Stat::PassMalformed,
            Stat::DropUnparsed,
            None,
        ),
        (
            "one header past the walk, UDP, to a protected address",
            to6(refused6, protected6, &chain(MAX_EXT + 1), &udp),
            Stat::PassMalformed,
            Stat::DropUnparsed,
            None,
        ),
        (
            "one header past the walk to an unprotected address",
            to6(refused6, unprotected6, &chain(MAX_EXT + 1), &tcp(8444)),
            Stat::PassMalformed,
            Stat::PassMalformed,
            None,
        ),
        (
            "40 headers to a protected address",
            to6(refused6, protected6, &chain(40), &tcp(9443)),
            Stat::PassMalformed,
            Stat::DropUnparsed,
            None,
        ),
        (
            "transport header past the read window, protected",
            to6(
                refused6,
                protected6,
                &[Ext::Options(NEXT_HOP, 0), Ext::Options(NEXT_DEST, 255)],
                &tcp(9443),
            ),
            Stat::PassMalformed,
            Stat::DropUnparsed,
            None,
        ),
        (
            "truncated extension header, protected",
            deep[..14 + 40 + 8 * 3 + 5].to_vec(),
            Stat::PassTruncated,
            Stat::DropUnparsed,
            None,
        ),
        (
            "truncated extension header, unprotected",
            to6(refused6, unprotected6, &chain(4), &tcp(8444))[..14 + 40 + 8 * 3 + 5].to_vec(),
            Stat::PassTruncated,
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated TCP header, IPv4, protected",
            tcp4[..14 + 20 + 3].to_vec(),
            Stat::PassTruncated,
            Stat::DropUnparsed,
            None,
        ),
        (
            "truncated TCP header, IPv4, unprotected",
            tcp4_other[..14 + 20 + 3].to_vec(),
            Stat::PassTruncated,
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated IPv4 header: no destination to protect",
            tcp4[..14 + 19].to_vec(),
            Stat::PassTruncated,
            Stat::PassTruncated,
            None,
        ),
        (
            "truncated IPv6 header: no destination to protect",
            deep[..14 + 39].to_vec(),
            Stat::PassTruncated,
            Stat::PassTruncated,
            None,
        ),
        (
            "IPv4 non-first fragment to a protected address",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(
                    v4(refused4),
                    v4(protected4),
                    PROTO_TCP,
                    0,
                    100,
                    None,
                    &tcp_bytes(22),
                ),
            ),
            Stat::PassFragment,
            Stat::PassFragment,
            None,
        ),
        (
            "IPv6 non-first fragment to a protected address",
            to6(
                refused6,
                protected6,
                &[
                    Ext::Options(NEXT_HOP, 0),
                    Ext::Fragment {
                        offset: 185,
                        more: false,
                    },
                ],
                &tcp(9443),
            ),
            Stat::PassFragment,
            Stat::PassFragment,
            None,
        ),
        (
            "ICMPv6 behind a chain, to a protected address",
            to6(
                "fe80::2",
                protected6,
                &chain(3),
                &L4::Raw {
                    proto: PROTO_ICMPV6,
                    payload: vec![135, 0, 0, 0, 0, 0, 0, 0],
                },
            ),
            Stat::PassNotTcpUdp,
            Stat::PassNotTcpUdp,
            None,
        ),
        (
            "ESP to a protected address",
            to6(
                refused6,
                protected6,
                &[],
                &L4::Raw {
                    proto: NEXT_ESP,
                    payload: vec![0; 16],
                },
            ),
            Stat::PassNotTcpUdp,
            Stat::PassNotTcpUdp,
            None,
        ),
        (
            "bad IPv6 version to a protected address (the kernel discards it)",
            ethernet(
                &[],
                ETH_P_IPV6,
                &ipv6(
                    v6(refused6),
                    v6(protected6),
                    &[],
                    PROTO_TCP,
                    Some(4),
                    &tcp_bytes(9443),
                ),
            ),
            Stat::PassMalformed,
            Stat::PassMalformed,
            None,
        ),
        ("ARP", arp(), Stat::PassNotIp, Stat::PassNotIp, None),
        (
            "UDP to a protected address, parsed",
            to6(refused6, protected6, &[], &udp),
            Stat::PassNoListener,
            Stat::PassNoListener,
            None,
        ),
        (
            "IPv4 SYN to a protected address, refused",
            tcp4.clone(),
            Stat::DropNotAllowed,
            Stat::DropNotAllowed,
            Some("admin"),
        ),
        (
            "open wildcard listener, one header past the walk",
            to6(refused6, "2001:db8::7", &chain(MAX_EXT + 1), &tcp(8444)),
            Stat::PassMalformed,
            Stat::PassMalformed,
            None,
        ),
    ]
}

fn run_unparsed(program: &str, mode: Unparsed) {
    let rows = unparsed_rows()
        .into_iter()
        .map(|(name, packet, pass, drop, listener)| {
            let stat = if mode == Unparsed::Drop { drop } else { pass };
            // Drops of unparsed packets are counted under no listener.
            (
                name,
                packet,
                stat,
                listener.filter(|_| stat != Stat::DropUnparsed),
            )
        })
        .collect();
    run_rows(program, "unparsed", &specific_policy(), mode, rows);
}

#[test]
fn xdp_unparsed_pass() {
    run_unparsed("xdp", Unparsed::Pass);
}

#[test]
fn xdp_unparsed_drop() {
    run_unparsed("xdp", Unparsed::Drop);
}

#[test]
fn tc_unparsed_pass() {
    run_unparsed("tc", Unparsed::Pass);
}

#[test]
fn tc_unparsed_drop() {
    run_unparsed("tc", Unparsed::Drop);
}

/// What the agent writes to `KF_UNPARSED`: nothing with `pass`; with `drop`
/// the restricted listeners' addresses (a wildcard as its family's wildcard),
/// not the open ones'; and back to nothing when the setting returns to `pass`.
#[test]
fn unparsed_map_follows_the_setting_and_the_policy() {
    let mut loaded = Loaded::new("unparsed-map", LO_SLOT).expect("loading the datapath");
    let dp = &mut loaded.datapath;
    dp.apply(&specific_policy()).unwrap();
    assert!(dp.unparsed_addresses().unwrap().is_empty());
    dp.set_unparsed(Unparsed::Drop);
    dp.apply(&specific_policy()).unwrap();
    let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
    assert_eq!(
        dp.unparsed_addresses().unwrap(),
        BTreeSet::from([ipv4_mapped([192, 0, 2, 1]), v6.octets()])
    );
    dp.apply(&policy()).unwrap();
    assert_eq!(
        dp.unparsed_addresses().unwrap(),
        BTreeSet::from([
            WILDCARD_V4,
            WILDCARD_V6,
            ipv4_mapped([192, 0, 2, 1]),
            v6.octets()
        ])
    );
    dp.set_unparsed(Unparsed::Pass);
    dp.apply(&policy()).unwrap();
    assert!(dp.unparsed_addresses().unwrap().is_empty());
}

/// Removes a pin root however the test ends.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = keyfence::datapath::detach(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pins of an agent that predates `KF_UNPARSED` and `KF_SAMPLE_SKIP`: the next agent adopts them
/// and creates the new maps beside them (a map added is not a layout change,
/// so the pinned links and policy stay where they are).
#[test]
fn pins_without_the_unparsed_map_are_adopted() {
    let root = std::path::PathBuf::from(format!("/sys/fs/bpf/kf-upgrade-{}", std::process::id()));
    let _cleanup = Cleanup(root.clone());
    let dir = keyfence::datapath::pin_dir(&root);
    {
        let mut dp = keyfence::datapath::Datapath::load_unattached(&root).unwrap();
        dp.apply(&policy()).unwrap();
    }
    std::fs::remove_file(dir.join(map_names::UNPARSED)).unwrap();
    std::fs::remove_file(dir.join(map_names::SAMPLE_SKIP)).unwrap();
    let mut dp = keyfence::datapath::Datapath::load_unattached(&root).unwrap();
    assert!(dir.join(map_names::UNPARSED).exists());
    assert!(dir.join(map_names::SAMPLE_SKIP).exists());
    // The adopted policy is intact and the new map works.
    assert!(!dp.tables().unwrap().listeners.is_empty());
    dp.set_unparsed(Unparsed::Drop);
    dp.apply(&policy()).unwrap();
    assert!(dp.unparsed_addresses().unwrap().contains(&WILDCARD_V6));
}

/// The verifier's work for both programs: what the deeper extension walk
/// costs. The budget leaves room below the 1M-instruction limit for older
/// verifiers (Debian 12's 6.1 prunes less than 6.18).
#[test]
fn verifier_cost() {
    const BUDGET: u32 = 150_000;
    let loaded = Loaded::new("verifier-cost", LO_SLOT).expect("loading the datapath");
    let xdp = loaded.datapath.xdp().info().unwrap();
    let tc = loaded.datapath.tc().info().unwrap();
    for (name, info) in [("xdp", xdp), ("tc", tc)] {
        let verified = info.verified_instruction_count().unwrap_or(0);
        let size = info.size_translated().unwrap_or(0) / 8;
        eprintln!("{name}: {verified} instructions verified, {size} instructions loaded");
        assert!(
            verified > 0 && verified < BUDGET,
            "{name}: {verified} verified instructions (budget {BUDGET})"
        );
    }
}

/// What `KF_SAMPLE_SKIP` holds for `cpu`.
fn sample_skip(root: &std::path::Path, cpu: usize) -> u32 {
    let path = keyfence::datapath::pin_dir(root).join(map_names::SAMPLE_SKIP);
    let data = aya::maps::MapData::from_pin(&path).unwrap();
    let map: aya::maps::PerCpuArray<_, u32> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).unwrap();
    map.get(&0, 0).unwrap()[cpu]
}

/// The drop-sample rate limit: a drop more than the interval after the
/// last sample is sampled; a drop inside it makes the next `SAMPLE_SKIP`
/// drops skip the clock, unsampled; then the clock decides again. Run on one
/// CPU, since the limit is per CPU.
#[test]
fn drop_samples_skip_the_clock_during_a_burst() {
    use keyfence_common::sample::{SAMPLE_INTERVAL_NS, SAMPLE_SKIP};
    let cpu = 0;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    let mut loaded = Loaded::new("samples", LO_SLOT).expect("loading the datapath");
    let root = std::path::PathBuf::from(format!("/sys/fs/bpf/kf-samples-{}", std::process::id()));
    loaded.datapath.apply(&policy()).unwrap();
    let mut ring = loaded.datapath.take_samples().expect("the sample ring");
    let refused = simple(&[], ip("192.0.2.99"), ip(GW4), &tcp(8443));
    let drop_once = |loaded: &Loaded| {
        let r = loaded
            .datapath
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(&refused),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .unwrap();
        assert_eq!(r.return_value, XDP_DROP);
    };
    let mut samples = || {
        let mut n = 0;
        while let Some(item) = ring.next() {
            let s = keyfence::datapath::decode_sample(&item).expect("a whole sample");
            assert_eq!(s.src, ipv4_mapped([192, 0, 2, 99]));
            n += 1;
        }
        n
    };
    let interval = std::time::Duration::from_nanos(SAMPLE_INTERVAL_NS);
    // Past any sample an earlier test on this CPU left.
    std::thread::sleep(interval + interval / 2);
    drop_once(&loaded);
    assert_eq!(samples(), 1, "the first drop is sampled");
    assert_eq!(sample_skip(&root, cpu), 0);
    drop_once(&loaded);
    assert_eq!(samples(), 0, "inside the interval: no sample");
    assert_eq!(
        sample_skip(&root, cpu),
        SAMPLE_SKIP,
        "the burst starts a skip"
    );
    for left in (0..SAMPLE_SKIP).rev() {
        drop_once(&loaded);
        assert_eq!(sample_skip(&root, cpu), left);
    }
    assert_eq!(samples(), 0, "skipped drops are not sampled");
    std::thread::sleep(interval + interval / 2);
    drop_once(&loaded);
    assert_eq!(samples(), 1, "after the interval the clock decides again");
    assert_eq!(sample_skip(&root, cpu), 0);
}

/// More /24s with host entries than the direct IPv4 tables have nodes:
/// IPv4 takes the trie (exact, so the same verdicts under other reasons),
/// and the direct tables again once the policy fits. The hosts are
/// synthetic, from 240.0.0.0/4 (reserved, never routed), and only ever exist
/// in maps and test-run packets.
#[test]
fn direct_tables_fall_back_to_the_trie_and_back() {
    use keyfence::maps::direct::V4Path;
    use keyfence_common::policy::V4_NODES_CAPACITY;
    let host = |i: u32| Ipv4Addr::from(0xf000_0000 + i * 256 + 1);
    let many: Vec<String> = (0..=V4_NODES_CAPACITY)
        .map(|i| format!("{}/32", host(i)))
        .collect();
    let few: Vec<String> = (0..100).map(|i| format!("{}/32", host(i))).collect();
    let mut loaded = Loaded::new("fallback", LO_SLOT).expect("loading the datapath (root needed)");
    let dp = &mut loaded.datapath;
    let unparsed = BTreeSet::new();
    for (nets, path_is_direct, allowed) in [
        (&many, false, Stat::PassAllowedExact),
        (&few, true, Stat::PassAllowedDirect),
        (&many, false, Stat::PassAllowedExact),
    ] {
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        let policy = CompiledPolicy {
            listeners: vec![restricted("api", "0.0.0.0:8443", &refs)],
            next_change: None,
        };
        dp.apply(&policy).expect("applying");
        assert_eq!(
            matches!(dp.v4_path(), V4Path::Direct),
            path_is_direct,
            "{} hosts: {:?}",
            nets.len(),
            dp.v4_path()
        );
        let tables = dp.tables().expect("reading the policy maps");
        let slot = dp.listener_slot("api").expect("listener slot");
        for (src, stat, verdict) in [
            (host(7), allowed, XDP_PASS),
            (host(99), allowed, XDP_PASS),
            (
                Ipv4Addr::from(u32::from(host(7)) + 1),
                Stat::DropNotAllowed,
                XDP_DROP,
            ),
            (v4("203.0.113.9"), Stat::DropNotAllowed, XDP_DROP),
        ] {
            let packet = simple(&[], src.into(), ip(GW4), &tcp(8443));
            assert_eq!(
                refmodel::verdict_with(&packet, &tables, &unparsed),
                (stat, slot),
                "{src} with {} hosts: the reference model",
                nets.len()
            );
            let result = dp
                .xdp()
                .test_run(TestRunOptions {
                    data_in: Some(&packet),
                    ..TestRunOptions::default()
                })
                .expect("test run");
            assert_eq!(
                result.return_value,
                verdict,
                "{src} with {} hosts",
                nets.len()
            );
        }
    }
}

/// The writer hands runs of one kind to the kernel in batches
/// (`BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`, 8,192 a call): the
/// maps hold exactly the entries the writer plans, after a first apply of
/// tens of thousands and after most of them go. Synthetic IPv4 sources from
/// 240.0.0.0/4 (reserved, never routed) and IPv6 from `2001:db8::/32`; they
/// only ever exist in maps.
#[test]
fn batched_writes_leave_the_maps_as_the_writer_plans() {
    use keyfence::maps::{memory::MemoryBackend, policy::PolicyWriter};
    let mut nets: Vec<String> = Vec::new();
    nets.extend((0..20_000u32).map(|i| format!("{}/32", Ipv4Addr::from(0xf000_0000 + i))));
    nets.extend((0..3_000u32).map(|i| format!("{}/24", Ipv4Addr::from(0xf100_0000 + (i << 8)))));
    nets.extend((0..3_000u32).map(|i| format!("2001:db8::{i:x}/128")));
    nets.extend((1..=9_000u32).map(|i| format!("2001:db8:{i:x}::/48")));
    let kept: Vec<String> = nets.iter().step_by(7).cloned().collect();
    let mut loaded = Loaded::new("batched", LO_SLOT).expect("loading the datapath (root needed)");
    let dp = &mut loaded.datapath;
    for (step, nets) in [("first apply", &nets), ("most removed", &kept)] {
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        let policy = CompiledPolicy {
            listeners: vec![restricted("api", "[::]:8443", &refs)],
            next_change: None,
        };
        dp.apply(&policy).expect("applying");
        let mut plain = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        plain.apply(&policy).unwrap();
        let want = plain.tables();
        let kernel = dp.tables().expect("reading the policy maps");
        assert_eq!(
            kernel.exact.len(),
            want.exact.len(),
            "{step}: KF_EXACT size"
        );
        assert!(kernel.exact == want.exact, "{step}: KF_EXACT differs");
        assert_eq!(
            kernel.prefixes.len(),
            want.prefixes.len(),
            "{step}: KF_PREFIXES size"
        );
        assert!(
            kernel.prefixes == want.prefixes,
            "{step}: KF_PREFIXES differs"
        );
    }
}

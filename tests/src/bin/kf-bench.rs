//! `cargo xtask bench` (datapath section): nanoseconds per packet of the real
//! XDP program through `BPF_PROG_TEST_RUN` (repeat 1,000,000, median of 5), on
//! the pass and drop paths, at growing prefix counts. Ratios within one run are
//! what count on these noisy machines; the table prints them against the
//! 10-prefix pass path.

use std::{net::Ipv4Addr, time::Instant};

use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::{IpNet, Ipv4Net};
use keyfence::{
    datapath::Datapath,
    policy::{Access, CompiledPolicy, ListenerPolicy},
};
use keyfence_tests::{
    frames::{L4, simple},
    loaded::Loaded,
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// `n` non-adjacent prefixes from 10.0.0.0 upwards: all /32, or a mix of
/// /32 /28 /24 /20 (one 4096-address block each).
fn prefixes(n: u32, mixed: bool) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let (base, len) = if mixed {
                (0x0a00_0000 + i * 4096, [32, 28, 24, 20][(i % 4) as usize])
            } else {
                (0x0a00_0000 + i * 2, 32)
            };
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), len).expect("valid"))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ns per packet, after checking the program gives `verdict`.
fn ns_per_packet(dp: &Datapath, packet: &[u8], verdict: u32) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let r = dp.xdp().test_run(TestRunOptions {
            data_in: Some(packet),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })?;
        anyhow::ensure!(
            r.return_value == verdict,
            "expected XDP action {verdict}, got {}",
            r.return_value
        );
        samples.push(r.duration.as_secs_f64() * 1e9);
    }
    Ok(median(samples))
}

fn main() -> anyhow::Result<()> {
    let mut loaded = Loaded::new("bench", 1)?;
    let dp = &mut loaded.datapath;
    let refused = simple(
        &[],
        "203.0.113.9".parse()?,
        "192.0.2.1".parse()?,
        &L4::Tcp {
            sport: 40000,
            dport: 8443,
        },
    );
    let unprotected = simple(
        &[],
        "203.0.113.9".parse()?,
        "192.0.2.1".parse()?,
        &L4::Tcp {
            sport: 40000,
            dport: 80,
        },
    );
    println!("| prefixes | kind | apply | pass ns/pkt | drop ns/pkt | no-listener ns/pkt |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut baseline = None;
    for (n, mixed) in [
        (10, false),
        (10, true),
        (10_000, false),
        (10_000, true),
        (100_000, false),
        (1_000_000, false),
    ] {
        let nets = prefixes(n, mixed);
        // A source inside a prefix that is not a /32 when the mix has them (the
        // trie path), else inside a /32 (the exact-hash path).
        let inside = match nets[nets.len().min(2) - 1] {
            IpNet::V4(v4) => v4.hosts().next().unwrap_or(v4.addr()),
            IpNet::V6(_) => unreachable!("IPv4 prefixes only"),
        };
        let allowed = simple(
            &[],
            inside.into(),
            "192.0.2.1".parse()?,
            &L4::Tcp {
                sport: 40000,
                dport: 8443,
            },
        );
        let policy = CompiledPolicy {
            listeners: vec![ListenerPolicy {
                name: "api".into(),
                bind: "[::]:8443".parse()?,
                access: Access::Restricted(nets),
            }],
            next_change: None,
        };
        let started = Instant::now();
        dp.apply(&policy)?;
        let apply = started.elapsed();
        let pass = ns_per_packet(dp, &allowed, XDP_PASS)?;
        let drop = ns_per_packet(dp, &refused, XDP_DROP)?;
        let none = ns_per_packet(dp, &unprotected, XDP_PASS)?;
        let base = *baseline.get_or_insert(pass);
        println!(
            "| {n} | {} | {apply:.2?} | {pass:.1} ({:.2}×) | {drop:.1} ({:.2}×) | {none:.1} |",
            if mixed { "mixed /32-/20" } else { "/32" },
            pass / base,
            drop / base,
        );
    }
    Ok(())
}

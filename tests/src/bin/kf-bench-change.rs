//! `cargo xtask bench` (change section): how long an allow-list change takes
//! from the API call to enforcement, with 100,000 prefixes loaded.
//!
//! The store is filled before the agent starts (100 keys of 1,000 entries:
//! `/64`s and `/128`s inside `2001:db8::/32`, none adjacent, so the policy
//! holds 100,000 prefixes), so the start itself shows the
//! time to load them; then one key's list is changed through the management
//! API `CHANGES` times (adding and removing an address in turn), each call
//! timed from the client's side: the answer arrives only once the shim and the
//! BPF maps enforce the change. The agent's own `keyfence_policy_apply_seconds`
//! histogram and its RSS are read at the end. Needs root and `KEYFENCE_BIN`.

use std::{
    net::{IpAddr, Ipv6Addr},
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use ipnet::{IpNet, Ipv6Net};
use keyfence::{
    allowlist::{AllowEntry, AllowList},
    keys_cli,
    shim::keys::digest,
    store::{Actor, KeyStore as _, NewKey, sqlite::SqliteStore},
};
use keyfence_tests::netns::{Agent, Lab, enter, parse_samples};
use serde_json::json;

const KEYS: usize = 100;
const ENTRIES_PER_KEY: usize = 1000;
const CHANGES: usize = 200;
const TOKEN: &str = "bench-admin-token-0123456789";
const MANAGEMENT: &str = "127.0.0.1:9900";

fn config(pin: &Path) -> String {
    format!(
        r#"datapath: {{ interfaces: [gw0], mode: auto, pin_path: "{pin}" }}
listeners:
  - {{ name: api, bind: "[::]:8443", mode: proxy, upstream: "http://127.0.0.1:8080" }}
management:
  bind: "{MANAGEMENT}"
  admins:
    - {{ name: bench, token_env: KF_BENCH_TOKEN, ip_allow_list: ["127.0.0.1"] }}
metrics: {{ bind: "127.0.0.1:9901" }}
"#,
        pin = pin.display()
    )
}

/// Entry `i` of key `k`: `2001:db8:K:2I::/64` or, every third one,
/// `2001:db8:K:2I::1/128` (never two siblings, so none merge).
fn entry(k: usize, i: usize) -> anyhow::Result<AllowEntry> {
    let k = u16::try_from(k)?;
    let i = u16::try_from(i * 2)?;
    let net = if i % 6 == 0 {
        Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, k, i, 0, 0, 0, 1), 128)?
    } else {
        Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, k, i, 0, 0, 0, 0), 64)?
    };
    Ok(AllowEntry {
        net: IpNet::V6(net),
        note: None,
        expires_at: None,
    })
}

fn fill(store: &Path) -> anyhow::Result<()> {
    let mut s = SqliteStore::open(store)?;
    let actor = Actor {
        principal: "bench".into(),
        address: IpAddr::from([127, 0, 0, 1]),
    };
    for k in 0..KEYS {
        let entries = (0..ENTRIES_PER_KEY)
            .map(|i| entry(k, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        s.create(
            NewKey {
                id: format!("key_bench{k:03}"),
                name: format!("bench {k}"),
                tenant: "default".into(),
                scopes: vec!["api".into()],
                digest: digest(&format!("bench-key-secret-{k}-0123456789")),
                allow: AllowList::from_canonical(entries),
                report_only: false,
            },
            &actor,
            SystemTime::now(),
        )?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short vector"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let lab = Lab::new(&["192.0.2.10".parse()?])?;
    let mut agent = Agent::new(&lab.gateway)?;
    agent.env("KF_BENCH_TOKEN", TOKEN);
    let filled = Instant::now();
    fill(&agent.store_path())?;
    let fill_took = filled.elapsed();
    agent.write_config(&config(agent.pin_path()))?;
    let started = Instant::now();
    agent.spawn()?;
    agent.wait_ready(Duration::from_mins(2))?;
    let start_took = started.elapsed();
    let prefixes: f64 = parse_samples(&agent.metrics()?, "keyfence_policy_prefixes")
        .iter()
        .map(|s| s.value)
        .sum();

    // The changes, timed from a thread inside the gateway namespace.
    let netns = lab.gateway.path();
    let timings = thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        enter(&netns)?;
        let api = format!("http://{MANAGEMENT}");
        let path = "/v1/keys/key_bench000";
        let base: Vec<String> = (0..ENTRIES_PER_KEY - 1)
            .map(|i| entry(0, i).map(|e| e.net.to_string()))
            .collect::<anyhow::Result<_>>()?;
        let mut took = Vec::with_capacity(CHANGES);
        for n in 0..CHANGES {
            let mut list = base.clone();
            if n % 2 == 0 {
                list.push("192.0.2.10".into());
            }
            let body = json!({ "ip_allow_list": list });
            let t = Instant::now();
            let a = keys_cli::call(&api, TOKEN, "PATCH", path, Some(&body), None)?;
            took.push(t.elapsed().as_secs_f64() * 1e3);
            if a.status != 200 {
                bail!("PATCH answered {}: {}", a.status, a.body);
            }
        }
        Ok(took)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the timing thread panicked"))??;
    let mut sorted = timings.clone();
    sorted.sort_by(f64::total_cmp);
    let metrics = agent.metrics()?;
    let apply_sum: f64 = parse_samples(&metrics, "keyfence_policy_apply_seconds_sum")
        .iter()
        .map(|s| s.value)
        .sum();
    let apply_count: f64 = parse_samples(&metrics, "keyfence_policy_apply_seconds_count")
        .iter()
        .map(|s| s.value)
        .sum();
    let rss = rss_mib(agent.pid().context("agent pid")?)?;

    println!("| measure | value |\n|---|---:|");
    println!("| prefixes loaded (keyfence_policy_prefixes) | {prefixes:.0} |");
    println!(
        "| store filled before start ({KEYS} keys × {ENTRIES_PER_KEY} entries) | {:.2} s |",
        fill_took.as_secs_f64()
    );
    println!(
        "| agent start to ready with them | {:.2} s |",
        start_took.as_secs_f64()
    );
    println!(
        "| allow-list change, API call to enforced: p50 | {:.2} ms |",
        percentile(&sorted, 0.5)
    );
    println!(
        "| allow-list change, API call to enforced: p99 | {:.2} ms |",
        percentile(&sorted, 0.99)
    );
    println!(
        "| allow-list change: max | {:.2} ms |",
        sorted.last().copied().unwrap_or_default()
    );
    println!(
        "| keyfence_policy_apply_seconds mean (compile + map diff) | {:.2} ms |",
        apply_sum / apply_count.max(1.0) * 1e3
    );
    println!("| agent RSS | {rss:.1} MiB |");
    println!(
        "\n{CHANGES} PATCHes of one key's 1,000-entry list (an address added, then removed), one at a time, timed by the client."
    );
    Ok(())
}

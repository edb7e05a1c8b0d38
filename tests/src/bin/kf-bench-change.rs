//! `cargo xtask bench` (change section): how long an allow-list change takes
//! from the API call to enforcement, with 100,000 prefixes loaded.
//!
//! The store is filled before the agent starts (100 keys of 1,000 entries:
//! `/80`s and `/128`s inside `2001:db8::/32`, none adjacent, so the policy
//! holds 100,000 prefixes), so the start itself shows the
//! time to load them; then one key's list is changed through the management
//! API `CHANGES` times (adding and removing an address in turn), each call
//! timed from the client's side: the answer arrives only once the shim and the
//! BPF maps enforce the change. The agent's own `keyfence_policy_apply_seconds`
//! histogram and its RSS are read at the end.
//!
//! Then the scale phase, in fresh namespaces: 100,000 keys of 10 entries
//! each (1,000,000 prefixes) imported into the store, and the agent started
//! on it: time from start to ready (every prefix in the BPF maps), its RSS,
//! and the memory of its BPF maps (`memlock` of each map it holds). Needs root
//! and `KEYFENCE_BIN`. Writes `change.json` into `$KF_BENCH_DIR` when set.

use std::{
    net::IpAddr,
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use keyfence::{
    allowlist::AllowList,
    keys::{Key, Origin, credentials::digest},
    keys_cli,
    store::{Actor, sqlite::SqliteStore},
};
use keyfence_tests::{
    bench::{self, percentile, v6_entry as entry},
    netns::{Agent, Lab, enter, parse_samples},
};
use serde_json::json;

const KEYS: usize = 100;
const ENTRIES_PER_KEY: usize = 1000;
const CHANGES: usize = 200;
const SCALE_KEYS: usize = 100_000;
const SCALE_ENTRIES_PER_KEY: usize = 10;
const SCALE_CHANGES: usize = 50;
const IMPORT_BATCH: usize = 10_000;
const TOKEN: &str = "bench-admin-token-0123456789";
const MANAGEMENT: &str = "127.0.0.1:9900";

fn config(pin: &Path) -> String {
    bench::agent_config(pin, MANAGEMENT, "")
}

/// `keys` keys (`key_bench000000`…) of `entries_per_key` entries each,
/// imported `IMPORT_BATCH` keys per transaction.
fn fill(store: &Path, keys: usize, entries_per_key: usize) -> anyhow::Result<()> {
    let mut s = SqliteStore::open(store)?;
    let actor = Actor {
        principal: "bench".into(),
        address: IpAddr::from([127, 0, 0, 1]),
    };
    for start in (0..keys).step_by(IMPORT_BATCH) {
        let batch = (start..(start + IMPORT_BATCH).min(keys))
            .map(|k| {
                let entries = (0..entries_per_key)
                    .map(|i| entry(k, i))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok(Key {
                    id: format!("key_bench{k:06}"),
                    name: format!("bench {k}"),
                    tenant: "default".into(),
                    scopes: keyfence::keys::Scopes::API,
                    digest: digest(&format!("bench-key-secret-{k}-0123456789")),
                    allow: AllowList::from_canonical(entries),
                    report_only: false,
                    origin: Origin::Store,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        s.create_many(&batch, &actor, SystemTime::now())?;
    }
    Ok(())
}

/// Bytes of BPF map memory held by `pid` (`memlock` of each map descriptor).
fn bpf_map_bytes(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        if !info.contains("map_type:") {
            continue;
        }
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// The scale phase, its table printed: `(start to ready s, prefixes, RSS MiB,
/// BPF map MiB, sorted change times ms)`.
fn scale() -> anyhow::Result<(f64, f64, f64, f64, Vec<f64>)> {
    let lab = Lab::new(&["192.0.2.10".parse()?])?;
    let mut agent = Agent::new(&lab.gateway)?;
    agent.env("KF_BENCH_TOKEN", TOKEN);
    // The agent's phase lines: where the start-up's seconds and bytes go.
    agent.env("RUST_LOG", "info,keyfence::phases=debug");
    let imported = Instant::now();
    fill(&agent.store_path(), SCALE_KEYS, SCALE_ENTRIES_PER_KEY)?;
    let import_took = imported.elapsed().as_secs_f64();
    agent.write_config(&config(agent.pin_path()))?;
    let started = Instant::now();
    agent.spawn()?;
    agent.wait_ready(Duration::from_mins(3))?;
    let start_took = started.elapsed().as_secs_f64();
    let prefixes: f64 = parse_samples(&agent.metrics()?, "keyfence_policy_prefixes")
        .iter()
        .map(|s| s.value)
        .sum();
    let pid = agent.pid().context("agent pid")?;
    #[expect(clippy::cast_precision_loss, reason = "bytes far below 2^52")]
    let maps = bpf_map_bytes(pid)? as f64 / (1024.0 * 1024.0);
    let rss = rss_mib(pid)?;
    let changes = time_changes(&lab, SCALE_ENTRIES_PER_KEY, SCALE_CHANGES)?;
    println!(
        "\n| scale: {SCALE_KEYS} keys × {SCALE_ENTRIES_PER_KEY} entries | value |\n|---|---:|"
    );
    println!(
        "| import into the store ({IMPORT_BATCH} keys per transaction) | {import_took:.1} s |"
    );
    println!("| prefixes loaded (keyfence_policy_prefixes) | {prefixes:.0} |");
    println!("| agent start to ready (every prefix in the BPF maps) | {start_took:.2} s |");
    println!("| agent RSS | {rss:.1} MiB |");
    println!("| BPF map memory (memlock of the agent's maps) | {maps:.1} MiB |");
    println!(
        "| allow-list change with them, API call to enforced: p50 / max ({SCALE_CHANGES} PATCHes of a 10-entry list) | {:.2} / {:.2} ms |",
        percentile(&changes, 0.5),
        changes.last().copied().unwrap_or_default()
    );
    print_phases(&agent.log());

    Ok((start_took, prefixes, rss, maps, changes))
}

/// The agent's start-up phases (its `keyfence::phases` debug lines up to
/// "keyfence running"): how long each took, the heap in use and the RSS
/// after it.
fn print_phases(log: &str) {
    println!(
        "\n| start-up phase (agent log) | took | heap after | RSS after |\n|---|---:|---:|---:|"
    );
    for line in log.lines().map(strip_ansi) {
        if line.contains("keyfence running") {
            break;
        }
        let Some((_, fields)) = line.split_once("phase done ") else {
            continue;
        };
        let field = |name: &str| {
            let rest = fields.split_once(&format!("{name}="))?.1;
            Some(match rest.strip_prefix('"') {
                Some(quoted) => quoted.split('"').next()?.to_owned(),
                None => rest.split(' ').next()?.to_owned(),
            })
        };
        let took = field("took_ms").and_then(|v| v.parse::<f64>().ok());
        println!(
            "| {} | {} ms | {} MiB | {} MiB |",
            field("phase").unwrap_or_default(),
            took.map_or_else(|| "?".into(), |v| format!("{v:.0}")),
            field("heap_mib").unwrap_or_default(),
            field("rss_mib").unwrap_or_default()
        );
    }
}

/// `line` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `keyfence_policy_apply_seconds`: its sum (s) and count.
fn applies(metrics: &str) -> (f64, f64) {
    let total = |name| parse_samples(metrics, name).iter().map(|s| s.value).sum();
    (
        total("keyfence_policy_apply_seconds_sum"),
        total("keyfence_policy_apply_seconds_count"),
    )
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

/// `changes` `PATCH` calls to key 0 (which holds `entries` entries), each
/// timed by the client, from a thread inside the gateway namespace:
/// milliseconds each, sorted.
fn time_changes(lab: &Lab, entries: usize, changes: usize) -> anyhow::Result<Vec<f64>> {
    let netns = lab.gateway.path();
    thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        enter(&netns)?;
        let api = format!("http://{MANAGEMENT}");
        let path = "/v1/keys/key_bench000000";
        let base: Vec<String> = (0..entries - 1)
            .map(|i| entry(0, i).map(|e| e.net.to_string()))
            .collect::<anyhow::Result<_>>()?;
        let mut took = Vec::with_capacity(changes);
        for n in 0..changes {
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
        took.sort_by(f64::total_cmp);
        Ok(took)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the timing thread panicked"))?
}

fn main() -> anyhow::Result<()> {
    let lab = Lab::new(&["192.0.2.10".parse()?])?;
    let mut agent = Agent::new(&lab.gateway)?;
    agent.env("KF_BENCH_TOKEN", TOKEN);
    let filled = Instant::now();
    fill(&agent.store_path(), KEYS, ENTRIES_PER_KEY)?;
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

    // The start's own full apply is in the histogram too: only what the
    // changes added counts.
    let applied_at_start = applies(&agent.metrics()?);
    let sorted = time_changes(&lab, ENTRIES_PER_KEY, CHANGES)?;
    let applied = applies(&agent.metrics()?);
    let (apply_sum, apply_count) = (
        applied.0 - applied_at_start.0,
        applied.1 - applied_at_start.1,
    );
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
        "| keyfence_policy_apply_seconds mean over the changes (the daemon's apply: policy diff and map writes) | {:.2} ms |",
        apply_sum / apply_count.max(1.0) * 1e3
    );
    println!("| agent RSS | {rss:.1} MiB |");
    println!(
        "\n{CHANGES} PATCHes of one key's 1,000-entry list (an address added, then removed), one at a time, timed by the client."
    );
    drop(agent);
    drop(lab);

    let (scale_start, scale_prefixes, scale_rss, scale_maps, scale_changes) = scale()?;
    let p50 = percentile(&sorted, 0.5);
    let p99 = percentile(&sorted, 0.99);
    let report = json!({
        "change_ms": { "p50": p50, "p99": p99, "max": sorted.last().copied().unwrap_or_default() },
        "policy_apply_mean_ms": apply_sum / apply_count.max(1.0) * 1e3,
        "start_100k_prefixes_s": start_took.as_secs_f64(),
        "rss_100k_prefixes_mib": rss,
        "scale": {
            "keys": SCALE_KEYS,
            "prefixes": scale_prefixes,
            "start_to_ready_s": scale_start,
            "rss_mib": scale_rss,
            "bpf_map_mib": scale_maps,
            "change_ms": {
                "p50": percentile(&scale_changes, 0.5),
                "max": scale_changes.last().copied().unwrap_or_default(),
            },
        },
        "goals": [
            bench::goal(
                "allow-list change through the API to enforcement p99 ≤ 5 ms (100k prefixes loaded)",
                &format!("{p99:.1} ms"),
                p99 <= 5.0,
            ),
            bench::goal(
                "1M prefixes loaded from start ≤ 5 s",
                &format!("{scale_start:.2} s"),
                scale_start <= 5.0 && scale_prefixes >= 1_000_000.0,
            ),
            bench::goal(
                "agent RSS ≤ 100 MiB with 100k keys",
                &format!("{scale_rss:.1} MiB"),
                scale_rss <= 100.0,
            ),
        ],
    });
    bench::save("change", &report)?;
    Ok(())
}

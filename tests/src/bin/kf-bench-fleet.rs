//! `cargo xtask bench` (fleet section): fleet mode on a real PostgreSQL
//! (`src/postgres.rs`), three gateway hosts on one database.
//!
//! - 100 keys of 1,000 entries (100,000 prefixes) are imported into the
//!   database, then three agents start on it; one key's list is changed
//!   through host A's API `CHANGES` times, each call timed by the client: the
//!   answer arrives only once every live host enforces the change (its
//!   `enforcement` is checked). The same with `?wait=local`, and for each of
//!   those the time until the other two hosts report it applied (their lag).
//! - 100,000 keys (one entry each) in the database and an agent started on
//!   them: the snapshot read alone, and start to ready.
//!
//! Needs root and `KEYFENCE_BIN`. Writes `fleet.json` into `$KF_BENCH_DIR`.

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use keyfence::{
    allowlist::AllowList,
    config::{FleetConfig, PostgresConfig, PostgresUrl},
    keys::{Key, Origin, credentials::digest},
    keys_cli,
    store::{KeyStore as _, StoredKey, postgres::PgStore},
};
use keyfence_tests::{
    bench::{self, percentile, v6_entry as entry},
    netns::{Agent, Lab, Netns, enter},
    postgres::{self, Postgres},
};
use serde_json::json;

const KEYS: usize = 100;
const ENTRIES_PER_KEY: usize = 1000;
const CHANGES: usize = 200;
const SYNC_KEYS: usize = 100_000;
const TOKEN: &str = "bench-admin-token-0123456789";
const MANAGEMENT: &str = "127.0.0.1:9900";
const DB: &str = "198.51.100.1:5432";

fn config(pin: &std::path::Path, host: &str, url: &str) -> String {
    bench::agent_config(
        pin,
        MANAGEMENT,
        &format!("store:\n  postgres: {{ url: \"{url}\", host_id: \"{host}\" }}\n"),
    )
}

fn keys(count: usize, entries: usize) -> anyhow::Result<Vec<StoredKey>> {
    let now = SystemTime::now();
    (0..count)
        .map(|k| {
            let allow = (0..entries)
                .map(|i| entry(k, i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(StoredKey {
                key: Arc::new(Key {
                    id: format!("key_bench{k:06}"),
                    name: format!("bench {k}"),
                    tenant: "default".into(),
                    scopes: keyfence::keys::Scopes::API,
                    digest: digest(&format!("bench-key-secret-{k}-0123456789")),
                    allow: AllowList::from_canonical(allow),
                    report_only: false,
                    origin: Origin::Store,
                }),
                created_at: now,
                updated_at: now,
                last_used_at: None,
                revoked_at: None,
            })
        })
        .collect()
}

/// Run `f` on a thread inside `ns` with a runtime of its own.
fn in_ns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce(&tokio::runtime::Runtime) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = ns.path();
    thread::spawn(move || -> anyhow::Result<T> {
        enter(&path)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        f(&rt)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a bench thread panicked"))?
}

fn open(rt: &tokio::runtime::Runtime, url: &str) -> anyhow::Result<PgStore> {
    let config = PostgresConfig {
        url: PostgresUrl::Inline(url.to_owned()),
        ca_file: None,
        host_id: "bench-loader".into(),
    };
    Ok(rt.block_on(PgStore::open(&config, &FleetConfig::default()))?)
}

/// Import `keys` into the database (from inside `ns`): seconds.
fn import(ns: &Netns, url: &str, keys: Vec<StoredKey>) -> anyhow::Result<f64> {
    let url = url.to_owned();
    in_ns(ns, move |rt| {
        let store = open(rt, &url)?;
        let started = Instant::now();
        rt.block_on(store.import(&keys, &[]))?;
        Ok(started.elapsed().as_secs_f64())
    })
}

struct Timed {
    /// Client-side answer times, ms, sorted.
    answers: Vec<f64>,
    /// Answers whose `enforcement` named a lagging host.
    lagging: usize,
    /// With `?wait=local`: ms from the answer until every host applied it, sorted.
    others: Vec<f64>,
}

/// `CHANGES` `PATCH` calls to key 0 through the API inside `ns`.
fn time_changes(ns: &Netns, local: bool) -> anyhow::Result<Timed> {
    let path = ns.path();
    thread::spawn(move || -> anyhow::Result<Timed> {
        enter(&path)?;
        let api = format!("http://{MANAGEMENT}");
        let suffix = if local { "?wait=local" } else { "" };
        let mut answers = Vec::new();
        let mut others = Vec::new();
        let mut lagging = 0;
        let base: Vec<String> = (0..ENTRIES_PER_KEY)
            .map(|i| entry(0, i).map(|e| e.net.to_string()))
            .collect::<anyhow::Result<_>>()?;
        for n in 0..CHANGES {
            // Every other change swaps the last entry (the list stays at
            // the 1,000 entries a key may hold).
            let mut list = base.clone();
            if n % 2 == 0
                && let Some(last) = list.last_mut()
            {
                *last = "2001:db8:ffff::1".into();
            }
            let body = json!({ "ip_allow_list": list });
            let started = Instant::now();
            let a = keys_cli::call(
                &api,
                TOKEN,
                "PATCH",
                &format!("/v1/keys/key_bench000000{suffix}"),
                Some(&body),
                None,
            )?;
            let took = started.elapsed();
            if a.status != 200 {
                bail!("PATCH answered {}: {}", a.status, a.body);
            }
            answers.push(took.as_secs_f64() * 1000.0);
            if !local && a.body["enforcement"]["lagging"] != json!([]) {
                lagging += 1;
            }
            if local {
                // Until every host reports the head this write made.
                let mut head = None;
                loop {
                    let f = keys_cli::call(&api, TOKEN, "GET", "/v1/fleet", None, None)?;
                    let h = *head.get_or_insert(f.body["head_sequence"].as_i64().unwrap_or(0));
                    let done = f.body["hosts"].as_array().is_some_and(|hs| {
                        hs.iter()
                            .all(|x| x["applied_sequence"].as_i64().unwrap_or(0) >= h)
                    });
                    if done {
                        break;
                    }
                    if started.elapsed() > Duration::from_secs(5) {
                        bail!("the other hosts did not apply a change within 5 s");
                    }
                }
                others.push(started.elapsed().saturating_sub(took).as_secs_f64() * 1000.0);
            }
        }
        answers.sort_by(f64::total_cmp);
        others.sort_by(f64::total_cmp);
        Ok(Timed {
            answers,
            lagging,
            others,
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the timing thread panicked"))?
}

struct Fleet {
    agents: Vec<Agent>,
    pg: Postgres,
    labs: Vec<Lab>,
    _db: Netns,
}

/// `hosts` gateways joined to a fresh database; nothing started yet.
fn fleet(hosts: usize) -> anyhow::Result<Fleet> {
    let db = Netns::new("db")?;
    let labs = (0..hosts)
        .map(|_| Lab::new(&["192.0.2.10".parse()?]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let gateways: Vec<&Netns> = labs.iter().map(|l| &l.gateway).collect();
    postgres::bridge(&db, &gateways)?;
    let pg = Postgres::start(&db, DB.parse()?)?;
    Ok(Fleet {
        agents: Vec::new(),
        pg,
        labs,
        _db: db,
    })
}

fn start_agent(f: &mut Fleet, i: usize, name: &str) -> anyhow::Result<f64> {
    let mut agent = Agent::new(&f.labs[i].gateway)?;
    agent.env("KF_BENCH_TOKEN", TOKEN);
    agent.write_config(&config(agent.pin_path(), name, &f.pg.url()))?;
    let started = Instant::now();
    agent.spawn()?;
    agent.wait_ready(Duration::from_mins(3))?;
    let took = started.elapsed().as_secs_f64();
    f.agents.push(agent);
    Ok(took)
}

fn main() -> anyhow::Result<()> {
    // Phase 1: 100,000 prefixes, three hosts, changes through A.
    let mut f = fleet(3)?;
    let url = f.pg.url();
    let loaded = import(&f.labs[0].gateway, &url, keys(KEYS, ENTRIES_PER_KEY)?)?;
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        start_agent(&mut f, i, name)?;
    }
    let fleet_wide = time_changes(&f.labs[0].gateway, false)?;
    let local = time_changes(&f.labs[0].gateway, true)?;
    drop(f);

    // Phase 2: initial sync of 100,000 keys.
    let mut f = fleet(1)?;
    let url = f.pg.url();
    let imported = import(&f.labs[0].gateway, &url, keys(SYNC_KEYS, 1)?)?;
    let read = {
        let url = url.clone();
        in_ns(&f.labs[0].gateway, move |rt| {
            let store = open(rt, &url)?;
            let started = Instant::now();
            let snapshot = rt.block_on(store.snapshot())?;
            if snapshot.keys.len() != SYNC_KEYS {
                bail!("read {} keys", snapshot.keys.len());
            }
            Ok(started.elapsed().as_secs_f64())
        })?
    };
    let start = start_agent(&mut f, 0, "sync")?;
    drop(f);

    let (p50, p99) = (
        percentile(&fleet_wide.answers, 0.5),
        percentile(&fleet_wide.answers, 0.99),
    );
    let (l50, l99) = (
        percentile(&local.answers, 0.5),
        percentile(&local.answers, 0.99),
    );
    let (o50, o99) = (
        percentile(&local.others, 0.5),
        percentile(&local.others, 0.99),
    );
    println!(
        "| fleet: 3 hosts, one PostgreSQL, {KEYS} keys × {ENTRIES_PER_KEY} entries | value |\n|---|---:|"
    );
    println!("| import of the 100,000 prefixes into PostgreSQL | {loaded:.1} s |");
    println!(
        "| change through host A until enforced on all three: p50 / p99 ({CHANGES} PATCHes of a {ENTRIES_PER_KEY}-entry list) | {p50:.2} / {p99:.2} ms |"
    );
    println!(
        "| answers naming a lagging host | {} of {CHANGES} |",
        fleet_wide.lagging
    );
    println!("| the same with `?wait=local`: p50 / p99 | {l50:.2} / {l99:.2} ms |");
    println!("| … then until B and C applied it (their lag): p50 / p99 | {o50:.2} / {o99:.2} ms |");
    println!("| {SYNC_KEYS} keys: import into PostgreSQL | {imported:.1} s |");
    println!("| {SYNC_KEYS} keys: full snapshot read from PostgreSQL | {read:.2} s |");
    println!(
        "| {SYNC_KEYS} keys: agent start to ready (snapshot, policy, BPF maps) | {start:.2} s |"
    );
    let report = json!({
        "fleet_change_ms": { "p50": p50, "p99": p99, "lagging": fleet_wide.lagging },
        "local_change_ms": { "p50": l50, "p99": l99 },
        "others_lag_ms": { "p50": o50, "p99": o99 },
        "sync_100k": { "import_s": imported, "snapshot_s": read, "start_to_ready_s": start },
        "goals": [
            bench::goal(
                "fleet-wide change p99 ≤ 100 ms (Kong's default: a 5 s poll)",
                &format!("{p99:.1} ms"),
                p99 <= 100.0,
            ),
            bench::goal(
                "initial sync of 100k keys ≤ 5 s",
                &format!("{start:.2} s to ready ({read:.2} s read)"),
                start <= 5.0,
            ),
        ],
    });
    bench::save("fleet", &report).context("writing fleet.json")?;
    Ok(())
}

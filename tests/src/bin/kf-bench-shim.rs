//! `cargo xtask bench` (shim section): requests/s and latency percentiles with
//! wrk on loopback inside one network namespace, side by side in one run:
//!
//! - the upstream (nginx answering `200 ok`) directly,
//! - keyfence in proxy mode in front of it (a key whose list holds the client),
//! - keyfence in auth mode behind nginx `auth_request` (nginx proxies, asking
//!   keyfence about every request over a keep-alive upstream),
//! - nginx as a reverse proxy with `allow`/`deny` for the same address (it
//!   cannot bind lists to keys; it is the speed reference).
//!
//! Each target is measured `ROUNDS` times, interleaved, at 1, 16 and 128
//! connections; the table shows medians and ratios against the upstream. The
//! goals judge keyfence proxy mode against nginx allow/deny by the median of
//! each round's ratio (the two run back to back, first in turn). wrk,
//! nginx and keyfence share the machine's cores, as they would on a gateway.
//! The comparison is fair: the upstream is an nginx process of its own (one
//! worker), the reference proxy (and `auth_request`) another nginx process
//! with [`PROXY_THREADS`] workers, and keyfence serves its listeners on
//! `shim.workers: PROXY_THREADS` threads: both proxies get the same threads.
//! Needs root (namespace) and `KEYFENCE_BIN` (a release build).

use std::{fmt::Write as _, net::SocketAddr, path::Path, time::Duration};

use anyhow::bail;
use keyfence_tests::{
    bench,
    http::require,
    netns::{Agent, Netns},
    wrk::{self, Run},
};
use serde_json::json;

const UPSTREAM: u16 = 8080;
const KEYFENCE: u16 = 8443;
const NGINX_PROXY: u16 = 8081;
const NGINX_AUTH: u16 = 8082;
const KEYFENCE_AUTH: u16 = 8444;
const ROUNDS: usize = 5;
const DURATION: &str = "3s";
const CONNECTIONS: [u32; 3] = [1, 16, 128];
const SECRET: &str = "bench-secret-0123456789abcdef";
/// Worker threads of each proxy under test: nginx's `worker_processes` and
/// keyfence's `shim.workers`.
const PROXY_THREADS: u32 = 1;

/// nginx's `allow`/`deny` proxy and nginx `auth_request` in front of
/// keyfence's auth listener (the upstream is another process).
fn nginx_servers() -> String {
    format!(
        r#"    upstream backend {{ server 127.0.0.1:{UPSTREAM}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{NGINX_PROXY};
        location / {{
            allow 127.0.0.1;
            deny all;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_pass http://backend;
        }}
    }}
    upstream keyfence_auth {{ server 127.0.0.1:{KEYFENCE_AUTH}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{NGINX_AUTH};
        location / {{
            auth_request /_keyfence_auth;
            auth_request_set $keyfence_key_id $upstream_http_x_keyfence_key_id;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Keyfence-Key-Id $keyfence_key_id;
            proxy_pass http://backend;
        }}
        location = /_keyfence_auth {{
            internal;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_pass http://keyfence_auth;
        }}
    }}
"#
    )
}

fn keyfence_config(pin: &Path) -> String {
    format!(
        r#"datapath: {{ mode: off, pin_path: "{pin}" }}
{shim}listeners:
  - {{ name: api, bind: "127.0.0.1:{KEYFENCE}", mode: proxy, upstream: "http://127.0.0.1:{UPSTREAM}" }}
  - {{ name: auth, bind: "127.0.0.1:{KEYFENCE_AUTH}", mode: auth, client_ip: {{ source: x_forwarded_for, trusted_proxies: ["127.0.0.1"] }} }}
keys:
  - {{ id: bench, name: bench, secret_env: KF_BENCH_SECRET, ip_allow_list: ["127.0.0.1", "203.0.113.0/24"] }}
metrics: {{ bind: "127.0.0.1:9901" }}
"#,
        pin = pin.display(),
        shim = shim_section(),
    )
}

/// `shim.workers: PROXY_THREADS`, unless `KF_BENCH_SHIM_WORKERS=none` (to
/// measure a build from before `shim.workers` existed, side by side).
fn shim_section() -> String {
    if std::env::var_os("KF_BENCH_SHIM_WORKERS").is_some_and(|v| v == "none") {
        String::new()
    } else {
        format!("shim: {{ workers: {PROXY_THREADS} }}\n")
    }
}

fn wrk(ns: &Netns, port: u16, connections: u32, key: bool) -> anyhow::Result<Run> {
    wrk::run(
        ns,
        &format!("http://127.0.0.1:{port}/"),
        connections,
        DURATION,
        key.then_some(SECRET),
    )
}

/// What is measured: a name, a port, and whether wrk presents the key. The
/// first is the upstream every row is compared with.
const TARGETS: [(&str, u16, bool); 4] = [
    ("upstream direct (nginx return 200)", UPSTREAM, false),
    ("keyfence proxy mode", KEYFENCE, true),
    ("nginx auth_request → keyfence auth mode", NGINX_AUTH, true),
    ("nginx proxy, allow/deny", NGINX_PROXY, false),
];
/// The indices in [`TARGETS`] of keyfence proxy mode and the nginx
/// allow/deny proxy it is judged against.
const KEYFENCE_PROXY: usize = 1;
const NGINX_ALLOW_DENY: usize = 3;

/// The order of round `round`: the two judged proxies back to back, the one
/// first in even rounds second in odd ones, so a machine that speeds up or
/// slows down during a round favours neither.
fn round_order(round: usize, targets: usize) -> Vec<usize> {
    let pair = if round.is_multiple_of(2) {
        [KEYFENCE_PROXY, NGINX_ALLOW_DENY]
    } else {
        [NGINX_ALLOW_DENY, KEYFENCE_PROXY]
    };
    let mut order = vec![0];
    order.extend(pair);
    order.extend((1..targets).filter(|i| !pair.contains(i)));
    order
}

/// Every target at every connection count, `ROUNDS` interleaved rounds: the
/// markdown table, the JSON rows, and keyfence proxy against nginx
/// allow/deny at each connection count, as the median of each round's
/// ratio (the two measured back to back) with the rounds' range.
fn measure(
    ns: &Netns,
    targets: &[(&str, u16, bool)],
) -> anyhow::Result<(String, Vec<serde_json::Value>, Vec<Against>)> {
    let mut table = String::from(
        "| connections | target | requests/s | × upstream | p50 µs | p99 µs | p99 added µs |\n|---:|---|---:|---:|---:|---:|---:|\n",
    );
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for connections in CONNECTIONS {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
        for round in 0..ROUNDS {
            for i in round_order(round, targets.len()) {
                let (_, port, key) = targets[i];
                runs[i].push(wrk(ns, port, connections, key)?);
            }
        }
        let medians: Vec<Run> = runs.iter().map(|r| Run::median(r)).collect();
        let base = medians[0];
        for (&(name, _, _), m) in targets.iter().zip(&medians) {
            let _ = writeln!(
                table,
                "| {connections} | {name} | {:.0} | {:.2} | {:.0} | {:.0} | {:+.0} |",
                m.rps,
                m.rps / base.rps,
                m.p50_us,
                m.p99_us,
                m.p99_us - base.p99_us
            );
            rows.push(json!({
                "connections": connections,
                "target": name,
                "requests_per_second": m.rps,
                "p50_us": m.p50_us,
                "p99_us": m.p99_us,
                "p99_added_us": m.p99_us - base.p99_us,
            }));
        }
        let paired = |figure: fn(&Run) -> f64| {
            Paired::of(
                runs[KEYFENCE_PROXY]
                    .iter()
                    .zip(&runs[NGINX_ALLOW_DENY])
                    .map(|(k, n)| figure(k) / figure(n))
                    .collect(),
            )
        };
        ratios.push(Against {
            connections,
            rps: paired(|r| r.rps),
            p99: paired(|r| r.p99_us),
            keyfence_p99_us: medians[KEYFENCE_PROXY].p99_us,
            nginx_p99_us: medians[NGINX_ALLOW_DENY].p99_us,
        });
    }
    Ok((table, rows, ratios))
}

/// keyfence proxy mode against nginx allow/deny at one connection count.
struct Against {
    connections: u32,
    /// keyfence requests/s over nginx's.
    rps: Paired,
    /// keyfence p99 over nginx's.
    p99: Paired,
    keyfence_p99_us: f64,
    nginx_p99_us: f64,
}

/// A ratio over the rounds: their median and range.
struct Paired {
    median: f64,
    low: f64,
    high: f64,
}

impl Paired {
    fn of(ratios: Vec<f64>) -> Self {
        let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self {
            median: bench::median(ratios),
            low,
            high,
        }
    }
}

impl std::fmt::Display for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2}× (rounds {:.2}–{:.2}×)",
            self.median, self.low, self.high
        )
    }
}

fn main() -> anyhow::Result<()> {
    for program in ["wrk", "nginx"] {
        require(program)?;
    }
    let ns = Netns::new("bench")?;
    let mut agent = Agent::new(&ns)?;
    agent.env("KF_BENCH_SECRET", SECRET);
    let dir = agent.dir().to_owned();
    let _upstream = bench::nginx_process(
        &ns,
        &dir,
        "upstream",
        1,
        &bench::upstream_server(UPSTREAM),
        SocketAddr::from(([127, 0, 0, 1], UPSTREAM)),
    )?;
    let _proxy = bench::nginx_process(
        &ns,
        &dir,
        "proxy",
        PROXY_THREADS,
        &nginx_servers(),
        SocketAddr::from(([127, 0, 0, 1], NGINX_PROXY)),
    )?;
    agent.write_config(&keyfence_config(agent.pin_path()))?;
    agent.spawn()?;
    agent.wait_ready(Duration::from_secs(30))?;

    let (table, rows, against) = measure(&ns, &TARGETS)?;
    let mut proxied = 0;
    for listener in ["api", "auth"] {
        proxied += agent.http_count(listener, "allowed")?;
        let other: u64 = ["ip_not_allowed", "invalid_key", "upstream_error"]
            .iter()
            .map(|o| agent.http_count(listener, o))
            .sum::<anyhow::Result<u64>>()?;
        if other > 0 {
            bail!(
                "keyfence ({listener}) answered {other} requests with something other than the upstream's"
            );
        }
    }
    print!("{table}");
    println!(
        "\nwrk -t1 -d {DURATION} on loopback, median of {ROUNDS} interleaved rounds (keyfence proxy and nginx allow/deny back to back, first in turn; their ratios are each round's); keyfence allowed {proxied} requests, refused none. Threads: nginx upstream 1 worker (its own process); nginx proxy {PROXY_THREADS} worker(s); keyfence {}.",
        if shim_section().is_empty() {
            "without shim.workers (its default runtime)".to_owned()
        } else {
            format!("shim.workers {PROXY_THREADS}")
        }
    );
    let mut goals: Vec<serde_json::Value> = against
        .iter()
        .map(|a| {
            bench::goal(
                &format!(
                    "keyfence proxy mode requests/s ≥ 1.0× nginx allow/deny proxy ({} connections, {PROXY_THREADS} thread each)",
                    a.connections
                ),
                &a.rps.to_string(),
                a.rps.median >= 1.0,
            )
        })
        .collect();
    if let Some(a) = against.iter().find(|a| a.connections == 16) {
        goals.push(bench::goal(
            "keyfence proxy mode p99 ≤ 1.0× nginx allow/deny's (16 connections)",
            &format!(
                "{} (medians {:.0} vs {:.0} µs)",
                a.p99, a.keyfence_p99_us, a.nginx_p99_us
            ),
            a.p99.median <= 1.0,
        ));
    }
    let report = json!({ "rows": rows, "goals": goals });
    bench::save("shim", &report)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        KEYFENCE, KEYFENCE_PROXY, NGINX_ALLOW_DENY, NGINX_PROXY, TARGETS, UPSTREAM, round_order,
    };

    #[test]
    fn the_judged_indices_name_the_judged_targets() {
        assert_eq!(TARGETS[0].1, UPSTREAM);
        assert_eq!(TARGETS[KEYFENCE_PROXY].1, KEYFENCE);
        assert_eq!(TARGETS[NGINX_ALLOW_DENY].1, NGINX_PROXY);
    }

    #[test]
    fn each_round_runs_every_target_once_with_the_judged_pair_back_to_back_first_in_turn() {
        for round in 0..4 {
            let order = round_order(round, TARGETS.len());
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3], "round {round}: {order:?}");
            assert_eq!(order[0], 0, "the upstream opens each round");
            let first = if round.is_multiple_of(2) {
                [KEYFENCE_PROXY, NGINX_ALLOW_DENY]
            } else {
                [NGINX_ALLOW_DENY, KEYFENCE_PROXY]
            };
            assert_eq!(order[1..3], first, "round {round}: {order:?}");
        }
    }
}

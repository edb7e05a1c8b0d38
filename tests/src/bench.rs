//! What the bench binaries (`src/bin/kf-bench*`) share: medians, goals and
//! the JSON each section leaves for `cargo xtask bench`, and nginx as the
//! upstream (and reference proxy) started inside a namespace.

use std::{net::SocketAddr, path::Path};

use serde_json::{Value, json};

use crate::{http::Daemon, netns::Netns};

/// The middle value (the upper one of an even count); NaN-safe ordering.
#[must_use]
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One goal of the issue, as the report's goals table shows it.
#[must_use]
pub fn goal(goal: &str, measured: &str, met: bool) -> Value {
    json!({ "goal": goal, "measured": measured, "met": met })
}

/// [`goal`], missed but out of reach on this machine for the reason `limit`
/// gives (when `Some`); the report says so beside "missed".
#[must_use]
pub fn goal_within(goal: &str, measured: &str, met: bool, limit: Option<&str>) -> Value {
    json!({ "goal": goal, "measured": measured, "met": met, "limit": limit })
}

/// Write `report` as `$KF_BENCH_DIR/<section>.json` when the variable is set
/// (`cargo xtask bench` sets it and merges the files); the directory, if any.
pub fn save(section: &str, report: &Value) -> anyhow::Result<Option<std::path::PathBuf>> {
    let Some(dir) = std::env::var_os("KF_BENCH_DIR").map(std::path::PathBuf::from) else {
        return Ok(None);
    };
    std::fs::write(dir.join(format!("{section}.json")), report.to_string())?;
    Ok(Some(dir))
}

/// Start nginx in `ns` (one worker, no access log, files under `dir`) with
/// `servers` inside its `http` block, and wait until `ready` accepts. The
/// caller's servers usually include the plain upstream, [`upstream_server`].
pub fn nginx(ns: &Netns, dir: &Path, servers: &str, ready: SocketAddr) -> anyhow::Result<Daemon> {
    nginx_process(ns, dir, "nginx", 1, servers, ready)
}

/// [`nginx`] as its own process named `name` (its config, pid file, logs and
/// temporary directories are `dir/<name>…`) with `workers` worker processes:
/// the bench runs the upstream and the reference proxy as two processes, so
/// that each is given the threads it is said to have.
pub fn nginx_process(
    ns: &Netns,
    dir: &Path,
    name: &str,
    workers: u32,
    servers: &str,
    ready: SocketAddr,
) -> anyhow::Result<Daemon> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r"daemon off;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
{servers}
}}
"
        ),
    )?;
    Daemon::nginx(ns, &dir, &conf, ready)
}

/// An nginx server answering `200 ok` on `127.0.0.1:port`: the upstream.
#[must_use]
pub fn upstream_server(port: u16) -> String {
    format!(
        r#"    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "ok\n"; }}
    }}"#
    )
}

/// The `p` quantile (0..=1) of `sorted`, nearest rank.
#[must_use]
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short vector"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Allow-list entry `i` of bench key `k`: `2001:db8:KH:KL:2I::/80` or, every
/// third one, a `/128` inside it (never two siblings, so none merge: `n`
/// entries are `n` prefixes in the policy).
pub fn v6_entry(k: usize, i: usize) -> anyhow::Result<keyfence::allowlist::AllowEntry> {
    use std::net::Ipv6Addr;
    let (hi, lo) = (u16::try_from(k >> 16)?, u16::try_from(k & 0xffff)?);
    let i = u16::try_from(i * 2)?;
    let net = if i % 6 == 0 {
        ipnet::Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, hi, lo, i, 0, 0, 1), 128)?
    } else {
        ipnet::Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, hi, lo, i, 0, 0, 0), 80)?
    };
    Ok(keyfence::allowlist::AllowEntry {
        net: keyfence::allowlist::Net::new(ipnet::IpNet::V6(net))?,
        note: None,
        expires_at: None,
    })
}

/// The agent the change and fleet benches run: one proxy listener on
/// `[::]:8443` in front of the bench upstream, management on `management`
/// with the `bench` admin (`KF_BENCH_TOKEN`), metrics on 127.0.0.1:9901.
/// `store` is a `store:` section (empty: the default SQLite file).
#[must_use]
pub fn agent_config(pin: &Path, management: &str, store: &str) -> String {
    format!(
        r#"{store}datapath: {{ interfaces: [gw0], mode: auto, pin_path: "{pin}" }}
listeners:
  - {{ name: api, bind: "[::]:8443", mode: proxy, upstream: "http://127.0.0.1:8080" }}
management:
  bind: "{management}"
  admins:
    - {{ name: bench, token_env: KF_BENCH_TOKEN, ip_allow_list: ["127.0.0.1"] }}
metrics: {{ bind: "127.0.0.1:9901" }}
"#,
        pin = pin.display()
    )
}

//! Fleet mode end to end (issue 15, SPEC §10): three gateway hosts, each the
//! standard `Lab` (a client namespace and a gateway namespace with XDP on
//! its veth, an echoing upstream and the real `keyfence`), all joined to one
//! database namespace by a bridge, where the harness's PostgreSQL
//! (`src/postgres.rs`, run as `nobody`) listens on 198.51.100.1:5432.
//!
//! ```text
//!  client-a ── gw0 [gw a] dbl 198.51.100.11 ─┐
//!  client-b ── gw0 [gw b] dbl 198.51.100.12 ─┼─ br0 198.51.100.1 [db: postgres]
//!  client-c ── gw0 [gw c] dbl 198.51.100.13 ─┘
//! ```
//!
//! Static key `neighbour` allows 192.0.2.10 and .11 on every host, so their
//! packets always pass and the shim's verdict shows; 192.0.2.12 is in no
//! static list, so whether its SYN is dropped shows what the host's BPF maps
//! hold. Needs root; run through `cargo xtask test`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use keyfence::{
    confirm::Confirmer,
    keys::{Key, Origin},
    store::{Actor, sqlite::SqliteStore},
};
use keyfence_tests::{
    config,
    http::{Curl, Reply, Upstream, url},
    netns::{Agent, GATEWAY_V4, Lab, Netns, keyfence_bin, parse_samples, poll_until},
    pinned,
    postgres::{self, Postgres},
};
use serde_json::{Value, json};

const API: u16 = 8443;
const MANAGEMENT: u16 = 9900;
const UPSTREAM: &str = "127.0.0.1:8080";
const OPS_TOKEN: &str = "e2e-ops-token-0123456789abcdef";
const NEIGHBOUR_SECRET: &str = "e2e-neighbour-secret-0123456789";
/// Base32 of "12345678901234567890" (RFC 6238's test secret).
const TOTP_SECRET: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
const DB_ADDR: &str = "198.51.100.1:5432";

const OPS: &str = "192.0.2.100";
const SEEN: &str = "192.0.2.10";
const SEEN_TOO: &str = "192.0.2.11";
const DROPPED: &str = "192.0.2.12";
const CLIENT_ADDRS: &[&str] = &[SEEN, SEEN_TOO, DROPPED, OPS];
const HOSTS: [&str; 3] = ["a", "b", "c"];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn host_config(pin: &Path, host: &str, url: &str, confirm: bool) -> String {
    let confirm = if confirm {
        "\n  confirm: { totp_secret_env: KF_E2E_TOTP }"
    } else {
        ""
    };
    format!(
        r#"store:
  postgres: {{ url: "{url}", host_id: "{host}" }}
fleet: {{ live_after: 10s, wait_timeout: 2s, poll: 1s }}
{datapath}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: proxy, upstream: "http://{UPSTREAM}" }}
keys:
  - {{ id: neighbour, name: neighbour, secret_env: KF_E2E_NEIGHBOUR, ip_allow_list: ["{SEEN}", "{SEEN_TOO}"] }}
management:
  bind: "0.0.0.0:{MANAGEMENT}"
  admins:
    - {{ name: ops, token_env: KF_E2E_OPS, ip_allow_list: ["{OPS}", "127.0.0.1"] }}{confirm}
{metrics}
"#,
        datapath = config::datapath(pin, "auto"),
        metrics = config::metrics(),
    )
}

/// One gateway host. Field order is drop order.
struct Host {
    name: &'static str,
    agent: Agent,
    _upstream: Upstream,
    lab: Lab,
}

/// The three hosts and the database. Field order is drop order: agents
/// first, then the server, then its namespace.
struct Fleet {
    hosts: Vec<Host>,
    pg: Postgres,
    _db: Netns,
}

/// An API answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

impl Fleet {
    fn start(count: usize, confirm: bool) -> Self {
        let db = Netns::new("db").expect("the database namespace");
        let addrs: Vec<IpAddr> = CLIENT_ADDRS.iter().map(|a| ip(a)).collect();
        let labs: Vec<Lab> = (0..count)
            .map(|_| Lab::new(&addrs).expect("building a host"))
            .collect();
        let gateways: Vec<&Netns> = labs.iter().map(|l| &l.gateway).collect();
        postgres::bridge(&db, &gateways).expect("joining the hosts to the database");
        let pg = Postgres::start(&db, DB_ADDR.parse().expect("db address"))
            .expect("starting PostgreSQL");
        let url = pg.url();
        let mut hosts = Vec::new();
        for (lab, name) in labs.into_iter().zip(HOSTS) {
            let upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream"))
                .expect("starting the upstream");
            let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
            agent.env("KF_E2E_OPS", OPS_TOKEN);
            agent.env("KF_E2E_NEIGHBOUR", NEIGHBOUR_SECRET);
            agent.env("KF_E2E_TOTP", TOTP_SECRET);
            let yaml = host_config(agent.pin_path(), name, &url, confirm);
            agent.launch(&yaml).expect("starting keyfence");
            hosts.push(Host {
                name,
                agent,
                _upstream: upstream,
                lab,
            });
        }
        Self { hosts, pg, _db: db }
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .expect("a host of the fleet")
    }
}

impl Host {
    /// `GET /v1/orders` on listener `api` from `source` with `secret`.
    fn request(&self, source: &str, secret: &str) -> Reply {
        Curl::new(
            &self.lab.client,
            ip(source),
            url(
                "http",
                SocketAddr::new(GATEWAY_V4.into(), API),
                "/v1/orders",
            ),
        )
        .connect_timeout(Duration::from_millis(700))
        .bearer(secret)
        .send()
    }

    /// A management call as `ops`.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        confirm: Option<&str>,
    ) -> Answer {
        let mut curl = Curl::new(
            &self.lab.client,
            ip(OPS),
            url("http", SocketAddr::new(GATEWAY_V4.into(), MANAGEMENT), path),
        )
        .connect_timeout(Duration::from_secs(2))
        .arg("--request")
        .arg(method)
        .bearer(OPS_TOKEN);
        if let Some(body) = body {
            curl = curl
                .header("Content-Type: application/json")
                .arg("--data-binary")
                .arg(&body.to_string());
        }
        if let Some(code) = confirm {
            curl = curl.header(&format!("X-Keyfence-Confirm: {code}"));
        }
        match curl.send() {
            Reply::Answered { status, body, .. } => Answer {
                status,
                body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
            },
            other => panic!("{method} {path} on {}: no answer: {other:?}", self.name),
        }
    }

    /// Create a key with `list`; panics unless 201. `(id, secret, answer)`.
    fn create(&self, list: &[&str]) -> (String, String, Value) {
        let a = self.call(
            "POST",
            "/v1/keys",
            Some(&json!({ "name": "fleet", "ip_allow_list": list })),
            None,
        );
        assert_eq!(a.status, 201, "create on {}: {a:?}", self.name);
        (
            a.body["id"].as_str().expect("id").to_owned(),
            a.body["secret"].as_str().expect("secret").to_owned(),
            a.body,
        )
    }

    /// A metric's value summed over its series, in thousandths (gauges here
    /// are whole numbers or seconds).
    fn metric_milli(&self, name: &str) -> i64 {
        let text = self.agent.metrics().expect("reading /metrics");
        let sum: f64 = parse_samples(&text, name).iter().map(|s| s.value).sum();
        (sum * 1000.0).round() as i64
    }

    /// A whole-number metric.
    fn metric(&self, name: &str) -> i64 {
        self.metric_milli(name) / 1000
    }
}

#[track_caller]
fn assert_status(reply: &Reply, status: u16, what: &str) {
    assert_eq!(reply.status(), Some(status), "{what}: {reply:?}");
}

#[track_caller]
fn assert_enforced_everywhere(answer: &Value, hosts: usize) {
    assert_eq!(
        answer["enforcement"],
        json!({ "applied": hosts, "hosts": hosts, "lagging": [] }),
        "{answer}"
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_change_through_any_host_is_in_force_on_every_host_when_it_answers() {
    let fleet = Fleet::start(3, false);
    let (a, b, c) = (fleet.host("a"), fleet.host("b"), fleet.host("c"));

    // Created through A: works through B and C on the very next request.
    let (id, secret, answer) = a.create(&[SEEN, SEEN_TOO, DROPPED]);
    assert_enforced_everywhere(&answer, 3);
    for h in [b, c, a] {
        assert_status(&h.request(SEEN, &secret), 200, h.name);
        assert_status(&h.request(DROPPED, &secret), 200, h.name);
    }

    // A PATCH through B removes two addresses: refused on A and C at once,
    // in the shim (403) and, where no key allows it, at packet level.
    let patch = json!({ "ip_allow_list": [SEEN] });
    let patched = b.call("PATCH", &format!("/v1/keys/{id}"), Some(&patch), None);
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_enforced_everywhere(&patched.body, 3);
    for h in [a, c] {
        assert_status(&h.request(SEEN_TOO, &secret), 403, h.name);
        assert_eq!(
            h.request(DROPPED, &secret),
            Reply::TimedOut,
            "{}: dropped",
            h.name
        );
        assert_status(&h.request(SEEN, &secret), 200, h.name);
    }

    // `?wait=local` answers with what it knows, and carries the same shape.
    let local = a.call(
        "PATCH",
        &format!("/v1/keys/{id}?wait=local"),
        Some(&json!({ "name": "renamed" })),
        None,
    );
    assert_eq!(local.status, 200, "{local:?}");
    assert_eq!(local.body["enforcement"]["hosts"], 3, "{local:?}");
    assert!(local.body["enforcement"]["applied"].as_u64() >= Some(1));
    let bad = a.call(
        "PATCH",
        &format!("/v1/keys/{id}?wait=later"),
        Some(&json!({})),
        None,
    );
    assert_eq!(bad.status, 400, "{bad:?}");

    // Revoked through C: 401 everywhere on the next request.
    let revoked = c.call("DELETE", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(revoked.status, 200, "{revoked:?}");
    assert_enforced_everywhere(&revoked.body, 3);
    for h in [a, b, c] {
        assert_status(&h.request(SEEN, &secret), 401, h.name);
    }

    // The fleet as every host sees it.
    let head: i64 = fleet
        .pg
        .sql("SELECT max(seq) FROM audit")
        .expect("psql")
        .trim()
        .parse()
        .expect("a number");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            let status = b.call("GET", "/v1/fleet", None, None).body;
            status["hosts"].as_array().is_some_and(|hs| {
                hs.len() == 3
                    && hs.iter().all(|h| {
                        h["live"] == json!(true)
                            && h["applied_sequence"] == json!(head)
                            && h["lag_seconds"] == json!(0.0)
                    })
            })
        }
    ));
    let status = b.call("GET", "/v1/fleet", None, None).body;
    assert_eq!(status["host_id"], "b", "{status}");
    assert_eq!(status["head_sequence"], json!(head), "{status}");
    for h in [a, b, c] {
        // The lag gauge drops to 0 once the host has applied the head (it is
        // refreshed after every report).
        assert!(
            poll_until(Duration::from_secs(3), Duration::from_millis(100), || {
                h.metric("keyfence_fleet_applied_sequence") == head
                    && h.metric_milli("keyfence_fleet_lag_seconds") == 0
            }),
            "applied {} of {head}, lag {} ms\n{}",
            h.metric("keyfence_fleet_applied_sequence"),
            h.metric_milli("keyfence_fleet_lag_seconds"),
            h.agent.log()
        );
        assert_eq!(h.metric("keyfence_store_up"), 1);
    }
    // One audit log for the fleet, whichever host is asked.
    let log = c
        .call("GET", &format!("/v1/audit?key_id={id}"), None, None)
        .body;
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["create", "update", "update", "revoke"]);
    // Secrets are stored only as SHA-256.
    let stored = fleet
        .pg
        .sql(&format!(
            "SELECT encode(secret_sha256, 'hex') FROM keys WHERE id = '{id}'"
        ))
        .expect("psql");
    assert_eq!(stored.trim().len(), 64);
    let dump = fleet
        .pg
        .sql("SELECT string_agg(coalesce(after, ''), '') FROM audit")
        .expect("psql");
    assert!(
        !dump.contains(&secret),
        "the secret is nowhere in the database"
    );
}

#[test]
fn with_the_database_down_every_host_keeps_enforcing_and_catches_up() {
    let mut fleet = Fleet::start(3, false);
    let (_, secret, _) = fleet.host("a").create(&[SEEN, DROPPED]);
    let (kept, _, _) = fleet.host("a").create(&[SEEN_TOO]);
    fleet.pg.stop().expect("stopping PostgreSQL");

    for h in &fleet.hosts {
        assert_status(&h.request(SEEN, &secret), 200, h.name);
        assert_status(&h.request(DROPPED, &secret), 200, h.name);
        assert_status(&h.request(SEEN_TOO, &secret), 403, h.name);
        assert_eq!(h.agent.get("/readyz").expect("readyz").0, 200, "{}", h.name);
    }
    let refused = fleet
        .host("b")
        .call("POST", "/v1/keys", Some(&json!({ "name": "x" })), None);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body, json!({ "error": "store unavailable" }));
    let patched = fleet.host("b").call(
        "PATCH",
        &format!("/v1/keys/{kept}"),
        Some(&json!({ "ip_allow_list": [] })),
        None,
    );
    assert_eq!(patched.status, 503, "{patched:?}");
    // Reads answer from memory.
    let list = fleet.host("c").call("GET", "/v1/keys", None, None);
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(
        list.body["keys"].as_array().map(Vec::len),
        Some(3),
        "{list:?}"
    );
    let one = fleet
        .host("c")
        .call("GET", &format!("/v1/keys/{kept}"), None, None);
    assert_eq!(one.status, 200, "{one:?}");
    for h in &fleet.hosts {
        assert!(
            poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
                h.metric("keyfence_store_up") == 0
            }),
            "{}: store_up stays 1",
            h.name
        );
    }

    fleet.pg.resume().expect("starting PostgreSQL again");
    // Nothing the refused writes asked for happened.
    let rows = fleet.pg.sql("SELECT count(*) FROM keys").expect("psql");
    assert_eq!(rows.trim(), "2");
    let b = fleet.host("b");
    let mut created = None;
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(250), || {
            let a = b.call(
                "POST",
                "/v1/keys",
                Some(&json!({ "name": "after", "ip_allow_list": [DROPPED] })),
                None,
            );
            if a.status == 201 && a.body["enforcement"]["lagging"] == json!([]) {
                created = Some(a.body);
                true
            } else {
                false
            }
        }),
        "writes work again, enforced on every host"
    );
    let created = created.expect("created");
    let secret2 = created["secret"].as_str().expect("secret");
    for h in &fleet.hosts {
        assert_status(&h.request(DROPPED, secret2), 200, h.name);
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(200), || {
                h.metric("keyfence_store_up") == 1
            }),
            "{}",
            h.name
        );
    }
}

#[test]
fn a_host_cut_off_from_the_database_is_named_lagging_and_catches_up() {
    let f = Fleet::start(3, false);
    let (a, c) = (f.host("a"), f.host("c"));
    let (id, secret, _) = a.create(&[SEEN, DROPPED]);
    // Cut C off: its packets to and from the database are dropped.
    c.lab
        .gateway
        .exec(&[
            "nft",
            "add table inet kfcut; \
             add chain inet kfcut out { type filter hook output priority 0; }; \
             add chain inet kfcut in { type filter hook input priority 0; }; \
             add rule inet kfcut out ip daddr 198.51.100.1 drop; \
             add rule inet kfcut in ip saddr 198.51.100.1 drop",
        ])
        .expect("nft");
    let started = Instant::now();
    let p = a.call(
        "PATCH",
        &format!("/v1/keys/{id}"),
        Some(&json!({ "ip_allow_list": [SEEN] })),
        None,
    );
    let took = started.elapsed();
    assert_eq!(p.status, 200, "{p:?}");
    assert_eq!(
        p.body["enforcement"],
        json!({ "applied": 2, "hosts": 3, "lagging": ["c"] }),
        "{p:?}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(a.request(DROPPED, &secret), Reply::TimedOut);
    // C still enforces what it last knew.
    assert_status(&c.request(DROPPED, &secret), 200, "c, cut off");
    // More changes meanwhile, so C has several to catch up on.
    let (_, later, _) = a.create(&[SEEN_TOO]);

    c.lab
        .gateway
        .exec(&["nft", "delete table inet kfcut"])
        .expect("nft");
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
            c.request(DROPPED, &secret) == Reply::TimedOut
        }),
        "c catches up after the cut heals; log:\n{}",
        c.agent.log()
    );
    assert_status(&c.request(SEEN_TOO, &later), 200, "c has the later key too");
    let head = f.pg.sql("SELECT max(seq) FROM audit").expect("psql");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || { c.metric("keyfence_fleet_applied_sequence").to_string() == head.trim() }
    ));
}

#[test]
fn a_totp_code_used_on_one_host_is_refused_on_another_and_migrations_run_once() {
    let mut f = Fleet::start(2, true);
    let confirmer = Confirmer::from_base32(TOTP_SECRET).expect("secret");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Stay clear of a step boundary: the code must be the same on both calls.
    let now = if now % 30 > 25 {
        thread::sleep(Duration::from_secs(6));
        now + 6
    } else {
        now
    };
    let code = confirmer.code_at(now);
    let body = json!({ "name": "stepped", "ip_allow_list": [SEEN] });
    let first = f.hosts[0].call("POST", "/v1/keys", Some(&body), Some(&code));
    assert_eq!(first.status, 201, "{first:?}");
    let replay = f.hosts[1].call("POST", "/v1/keys", Some(&body), Some(&code));
    assert_eq!(replay.status, 401, "{replay:?}");
    assert_eq!(replay.body, json!({ "error": "confirmation required" }));
    let keys = f.pg.sql("SELECT count(*) FROM keys").expect("psql");
    assert_eq!(keys.trim(), "1", "the refused write stored nothing");

    // Two agents started on an empty database: the schema was made once.
    let schema = |pg: &Postgres| {
        pg.sql("SELECT version, applied_at FROM keyfence_schema ORDER BY version")
            .expect("psql")
    };
    let before = schema(&f.pg);
    assert_eq!(before.lines().count(), 2, "{before}");
    f.hosts[1].agent.restart().expect("restart");
    assert_eq!(schema(&f.pg), before, "a second start migrates nothing");
}

/// One address of a key's sources: `(ip, allowed, refused, hosts)`.
type SourceRow = (String, u64, u64, Vec<String>);

/// `GET /v1/keys/{id}/sources` through `host`, as `(ip, allowed, refused,
/// hosts)` most recent first, and whether the answer is `partial`.
fn shared_sources(host: &Host, id: &str) -> (Vec<SourceRow>, bool) {
    let a = host.call("GET", &format!("/v1/keys/{id}/sources"), None, None);
    assert_eq!(a.status, 200, "{a:?}");
    let rows = a.body["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .map(|s| {
            (
                s["ip"].as_str().unwrap_or_default().to_owned(),
                s["allowed"].as_u64().unwrap_or_default(),
                s["refused"].as_u64().unwrap_or_default(),
                s["hosts"]
                    .as_array()
                    .expect("hosts")
                    .iter()
                    .filter_map(|h| h.as_str().map(str::to_owned))
                    .collect(),
            )
        })
        .collect();
    (rows, a.body["partial"] == json!(true))
}

#[test]
fn per_key_sources_are_the_sum_over_hosts_and_name_them() {
    let mut f = Fleet::start(3, false);
    let (a, b, c) = (f.host("a"), f.host("b"), f.host("c"));
    let (id, secret, _) = a.create(&[SEEN]);
    for _ in 0..2 {
        assert_status(&a.request(SEEN, &secret), 200, "a");
    }
    assert_status(&b.request(SEEN, &secret), 200, "b");
    // Not in the key's list (the static key lets its packets through).
    assert_status(&b.request(SEEN_TOO, &secret), 403, "b");
    let hosts = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    let want = vec![
        (SEEN_TOO.to_owned(), 0, 1, hosts(&["b"])),
        (SEEN.to_owned(), 3, 0, hosts(&["a", "b"])),
    ];
    // Host C served none of them: it shows what A and B flushed (within a
    // second or two).
    let mut seen = None;
    assert!(
        poll_until(Duration::from_secs(6), Duration::from_millis(200), || {
            let (rows, partial) = shared_sources(c, &id);
            let done = rows == want && !partial;
            seen = Some(rows);
            done
        }),
        "through c: {seen:?}"
    );
    // The same through A (what A has not flushed yet is added, not doubled).
    assert_eq!(shared_sources(a, &id).0, want);
    let rows =
        f.pg.sql(&format!(
            "SELECT ip, host_id, allowed, refused FROM key_sources \
             WHERE key_id = '{id}' ORDER BY ip, host_id"
        ))
        .expect("psql");
    assert_eq!(
        rows.lines().collect::<Vec<_>>(),
        [
            format!("{SEEN}|a|2|0"),
            format!("{SEEN}|b|1|0"),
            format!("{SEEN_TOO}|b|0|1")
        ],
        "one row per (key, address, host)"
    );

    // The database is down: counts stay in memory, the API answers with this
    // host's own (partial) view, and they are flushed once it is back.
    f.pg.stop().expect("stopping PostgreSQL");
    let a = f.host("a");
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            a.metric("keyfence_store_up") == 0
        }),
        "a: store_up stays 1"
    );
    for _ in 0..3 {
        assert_status(&a.request(SEEN, &secret), 200, "a, database down");
    }
    let (rows, partial) = shared_sources(a, &id);
    assert!(partial, "{rows:?}");
    assert_eq!(rows, vec![(SEEN.to_owned(), 5, 0, hosts(&["a"]))]);
    f.pg.resume().expect("starting PostgreSQL again");
    let c = f.host("c");
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(250), || {
            let (rows, partial) = shared_sources(c, &id);
            seen = Some(rows.clone());
            !partial && rows.iter().any(|r| r.0 == SEEN && r.1 == 6)
        }),
        "the counts kept while the database was down arrive: {seen:?}"
    );
    assert_eq!(
        f.host("a").metric("keyfence_fleet_sources_dropped_total"),
        0
    );

    // The table holds at most 32 addresses per key, like each host's
    // memory: older addresses (here planted as another host's) go first.
    f.pg.sql(&format!(
        "INSERT INTO key_sources (key_id, ip, host_id, allowed, refused, last_seen) \
         SELECT '{id}', '203.0.113.' || n, 'z', 1, 0, n FROM generate_series(1, 40) n"
    ))
    .expect("psql");
    let b = f.host("b");
    assert_status(&b.request(SEEN, &secret), 200, "b");
    let count = || {
        f.pg.sql(&format!(
            "SELECT count(DISTINCT ip), count(*) FILTER (WHERE ip = '{SEEN}') \
             FROM key_sources WHERE key_id = '{id}'"
        ))
        .expect("psql")
        .trim()
        .to_owned()
    };
    assert!(
        poll_until(Duration::from_secs(6), Duration::from_millis(200), || {
            count() == "32|2"
        }),
        "capped at 32 addresses, the recent ones kept: {}",
        count()
    );
    assert_eq!(shared_sources(c, &id).0.len(), 32);

    // Revoked: its sources go, from the table too.
    let revoked = c.call("DELETE", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(revoked.status, 200, "{revoked:?}");
    let left =
        f.pg.sql(&format!(
            "SELECT count(*) FROM key_sources WHERE key_id = '{id}'"
        ))
        .expect("psql");
    assert_eq!(left.trim(), "0");
}

/// A key for a store written outside the agent.
fn key(id: &str, secret: &str, list: &str) -> Key {
    Key {
        id: id.into(),
        name: id.into(),
        tenant: "default".into(),
        scopes: keyfence::keys::Scopes::API,
        digest: keyfence::keys::credentials::digest(secret),
        allow: keyfence::allowlist::parse_list(
            &keyfence::allowlist::RawList::One(list.into()),
            keyfence::allowlist::DEFAULT_MAX_ENTRIES,
        )
        .expect("a list"),
        report_only: false,
        origin: Origin::Store,
    }
}

/// `keyfence ARGS` inside `ns`: (exit status, stdout + stderr).
fn keyfence_cli(ns: &Netns, args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let bin = keyfence_bin().expect("the keyfence binary");
    let out = ns
        .command(&bin)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("running keyfence");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn store_copy_moves_a_single_hosts_store_into_the_fleet_once() {
    let f = Fleet::start(1, false);
    let a = f.host("a");
    // A store file as today's single-host keyfence leaves it.
    let file = a.agent.dir().join("single-host.db");
    let actor = Actor {
        principal: "admin:ops".into(),
        address: ip(OPS),
    };
    {
        let mut single = SqliteStore::open(&file).expect("a SQLite store");
        let now = SystemTime::now();
        single
            .create(
                key("key_copied1", "kf-copy-secret-one-0123456789", DROPPED),
                &actor,
                now,
            )
            .expect("create");
        single
            .create(
                key("key_copied2", "kf-copy-secret-two-0123456789", SEEN),
                &actor,
                now,
            )
            .expect("create");
        single.revoke("key_copied2", &actor, now).expect("revoke");
    }
    let from = format!("sqlite:{}", file.display());
    let to = format!("postgres:{}", f.pg.url());
    let args = ["store", "copy", "--from", &from, "--to", &to];
    let (code, out) = keyfence_cli(&a.lab.gateway, &args, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("copied 2 of 2 keys and 3 of 3 audit rows; verified"),
        "{out}"
    );
    let (code, out) = keyfence_cli(&a.lab.gateway, &args, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("copied 0 of 2 keys and 0 of 3 audit rows; verified"),
        "{out}"
    );
    assert_eq!(
        f.pg.sql("SELECT count(*) FROM keys").expect("psql").trim(),
        "2"
    );
    // The running host follows the copy through the feed.
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            a.request(DROPPED, "kf-copy-secret-one-0123456789").status() == Some(200)
        }),
        "{}",
        a.agent.log()
    );
    assert_status(
        &a.request(SEEN, "kf-copy-secret-two-0123456789"),
        401,
        "revoked",
    );
    let audit = a.call("GET", "/v1/audit", None, None).body;
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(3),
        "{audit}"
    );
    // Bad input: nothing happens, the error says why.
    let (code, out) = keyfence_cli(
        &a.lab.gateway,
        &["store", "copy", "--from", "/nope.db", "--to", &to],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expected sqlite:PATH"), "{out}");

    // `keyfence fleet status` through any host's API.
    let api = format!("--api=http://127.0.0.1:{MANAGEMENT}");
    let (code, out) = keyfence_cli(
        &a.lab.gateway,
        &["fleet", "status", &api],
        &[("KEYFENCE_TOKEN", OPS_TOKEN)],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("store up") && out.lines().any(|l| l.starts_with("a ")),
        "{out}"
    );
}

/// Random creates, list changes and revocations through all three hosts at
/// once; afterwards every host enforces the database's state.
/// Every host's BPF maps hold what the database says: under the one
/// listener's policy, the static key's addresses and every active key's
/// entries, nothing more.
fn assert_maps_match_the_database(f: &Fleet) {
    let listed =
        f.pg.sql(
            "SELECT DISTINCT e.cidr FROM allow_entries e JOIN keys k ON k.id = e.key_id \
             WHERE k.revoked_at IS NULL",
        )
        .expect("psql");
    let want = pinned::aggregate(
        [SEEN, SEEN_TOO]
            .iter()
            .map(|a| format!("{a}/32"))
            .chain(listed.lines().map(|l| l.trim().to_owned()))
            .filter(|l| !l.is_empty())
            .map(|l| l.parse().expect("a stored network")),
    );
    for h in &f.hosts {
        let tables = pinned::policy_tables(h.agent.pin_path()).expect("reading the pinned maps");
        let policies: BTreeSet<u32> = tables.listeners.values().map(|v| v.policy).collect();
        assert_eq!(policies.len(), 1, "{}: one listener: {tables:?}", h.name);
        let allowed = pinned::allowed_by_policy(&tables);
        assert_eq!(
            allowed.keys().copied().collect::<BTreeSet<_>>(),
            policies,
            "{}: entries only under the listener's policy",
            h.name
        );
        assert_eq!(
            allowed.values().next(),
            Some(&want),
            "{}: the BPF maps equal the database's state",
            h.name
        );
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn concurrent_changes_through_every_host_converge_on_the_databases_state() {
    const CHANGES: usize = 1000;
    let f = Fleet::start(3, false);
    // A few keys to change; each list is one of the test's client addresses.
    let lists = [
        vec![SEEN],
        vec![SEEN_TOO],
        vec![DROPPED],
        vec![SEEN, DROPPED],
    ];
    let mut keys = Vec::new();
    for i in 0..12 {
        let (id, secret, _) = f.hosts[i % 3].create(&lists[i % lists.len()]);
        keys.push((id, secret));
    }
    let started = Instant::now();
    let acknowledged = thread::scope(|scope| {
        let workers: Vec<_> = f
            .hosts
            .iter()
            .enumerate()
            .map(|(w, h)| {
                let keys = &keys;
                let lists = &lists;
                scope.spawn(move || {
                    let mut seed = 0x9e37_79b9_u64 + w as u64;
                    let mut ok = 0usize;
                    for _ in 0..CHANGES / 3 {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let (id, _) = &keys[(seed % keys.len() as u64) as usize];
                        let list = &lists[((seed >> 8) % lists.len() as u64) as usize];
                        let a = h.call(
                            "PATCH",
                            &format!("/v1/keys/{id}"),
                            Some(&json!({ "ip_allow_list": list })),
                            None,
                        );
                        assert!(a.status == 200 || a.status == 409, "{a:?}");
                        ok += usize::from(a.status == 200);
                    }
                    ok
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a worker"))
            .sum::<usize>()
    });
    eprintln!(
        "{acknowledged} changes through three hosts in {:?}",
        started.elapsed()
    );
    assert!(acknowledged >= CHANGES - 3, "{acknowledged}");
    let head = f.pg.sql("SELECT max(seq) FROM audit").expect("psql");
    // Every host at the head, with the same key table and packet policy.
    for h in &f.hosts {
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
                h.metric("keyfence_fleet_applied_sequence").to_string() == head.trim()
            }),
            "{}",
            h.name
        );
    }
    let reference = f.hosts[0].metric("keyfence_policy_prefixes");
    for h in &f.hosts {
        assert_eq!(
            h.metric("keyfence_keys"),
            f.hosts[0].metric("keyfence_keys")
        );
        assert_eq!(
            h.metric("keyfence_policy_prefixes"),
            reference,
            "{}",
            h.name
        );
    }
    assert_maps_match_the_database(&f);
    // Each key's final list, as the database holds it, is what every host
    // enforces: in the shim and at packet level.
    for (id, secret) in &keys {
        let cidrs = f
            .pg
            .sql(&format!("SELECT string_agg(cidr, ',' ORDER BY cidr) FROM allow_entries WHERE key_id = '{id}'"))
            .expect("psql");
        for h in &f.hosts {
            for addr in [SEEN, SEEN_TOO, DROPPED] {
                let listed = cidrs.split(',').any(|c| c.trim() == format!("{addr}/32"));
                let reply = h.request(addr, secret);
                match (listed, addr) {
                    (true, _) => assert_status(&reply, 200, &format!("{} {id} {addr}", h.name)),
                    (false, DROPPED) => {
                        // Another key may still list DROPPED: then the shim refuses.
                        assert!(
                            reply == Reply::TimedOut || reply.status() == Some(403),
                            "{} {id} {addr}: {reply:?}",
                            h.name
                        );
                    }
                    (false, _) => assert_status(&reply, 403, &format!("{} {id} {addr}", h.name)),
                }
            }
        }
    }
}

/// An agent killed (SIGKILL) in the middle of a write burst through another host
/// starts again from a full snapshot and converges; no acknowledged write is
/// lost.
#[test]
fn a_host_killed_during_a_write_burst_converges_after_restart() {
    let mut f = Fleet::start(3, false);
    let (id, secret, _) = f.hosts[0].create(&[SEEN]);
    let lists = [vec![SEEN], vec![SEEN, DROPPED], vec![SEEN_TOO]];
    let mut last_acknowledged = None;
    for i in 0..60 {
        if i == 20 {
            f.hosts[1].agent.sigkill().expect("kill -9");
        }
        if i == 40 {
            f.hosts[1].agent.spawn().expect("start again");
        }
        let list = &lists[i % lists.len()];
        // `?wait=local`: the killed host would hold every answer for
        // `fleet.wait_timeout` until its heartbeat expires.
        let a = f.hosts[0].call(
            "PATCH",
            &format!("/v1/keys/{id}?wait=local"),
            Some(&json!({ "ip_allow_list": list })),
            None,
        );
        assert_eq!(a.status, 200, "{a:?}");
        last_acknowledged = Some(list.clone());
    }
    f.hosts[1]
        .agent
        .wait_ready(Duration::from_secs(30))
        .expect("ready again");
    let last = last_acknowledged.expect("writes");
    let stored =
        f.pg.sql(&format!(
            "SELECT string_agg(cidr, ',' ORDER BY cidr) FROM allow_entries WHERE key_id = '{id}'"
        ))
        .expect("psql");
    let mut want: Vec<String> = last.iter().map(|a| format!("{a}/32")).collect();
    want.sort();
    assert_eq!(
        stored.trim(),
        want.join(","),
        "the last acknowledged write is stored"
    );
    let head = f.pg.sql("SELECT max(seq) FROM audit").expect("psql");
    let b = &f.hosts[1];
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || { b.metric("keyfence_fleet_applied_sequence").to_string() == head.trim() }
    ));
    for addr in [SEEN, SEEN_TOO, DROPPED] {
        let reply = b.request(addr, &secret);
        if last.contains(&addr) {
            assert_status(&reply, 200, addr);
        } else if addr == DROPPED {
            assert_eq!(reply, Reply::TimedOut, "{addr}");
        } else {
            assert_status(&reply, 403, addr);
        }
    }
}

//! End to end through the management API: the real `keyfence` binary in the
//! gateway namespace (XDP on its veth, the API on `0.0.0.0:9900`), an echoing
//! upstream behind listener `api`, and curl in the client namespace speaking
//! from documentation addresses, both to the API and to the listener. Needs
//! root; run through `cargo xtask test`.
//!
//! Static key `neighbour` allows 192.0.2.10 and .11, so their packets always
//! pass the datapath and the shim's verdict (200/401/403) is visible; 192.0.2.12
//! is in no static list, so whether its SYN is dropped shows what the BPF maps
//! hold.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use keyfence::{
    confirm::{Confirmer, STEP_SECONDS},
    keys::{Key, Origin},
    keys_cli,
    store::{Actor, sqlite::SqliteStore},
};
use keyfence_tests::{
    config,
    http::{Curl, Reply, Upstream, url},
    netns::{Agent, GATEWAY_V4, Lab, enter, parse_samples, poll_until},
};
use serde_json::{Value, json};

const API: u16 = 8443;
const MANAGEMENT: u16 = 9900;
const UPSTREAM: &str = "127.0.0.1:8080";
const OPS_TOKEN: &str = "e2e-ops-token-0123456789abcdef";
const NEIGHBOUR_SECRET: &str = "e2e-neighbour-secret-0123456789";
/// Base32 of "12345678901234567890" (RFC 6238's test secret).
const TOTP_SECRET: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

/// The operator's address (in `ops`'s list).
const OPS: &str = "192.0.2.100";
/// Addresses an admin-scoped key calls from.
const ADMIN_KEY_FROM: &str = "192.0.2.101";
const OUTSIDER: &str = "192.0.2.102";
/// Allowed by the static key `neighbour`: packets pass, the shim decides.
const SEEN: &str = "192.0.2.10";
const SEEN_TOO: &str = "192.0.2.11";
/// In no static list: packets pass only when a stored key allows it.
const DROPPED: &str = "192.0.2.12";

const CLIENT_ADDRS: &[&str] = &[SEEN, SEEN_TOO, DROPPED, OPS, ADMIN_KEY_FROM, OUTSIDER];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn config(pin: &Path, confirm: bool, mode: &str) -> String {
    let confirm = if confirm {
        "\n  confirm: { totp_secret_env: KF_E2E_TOTP }"
    } else {
        ""
    };
    format!(
        r#"{datapath}
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
        datapath = config::datapath(pin, mode),
        metrics = config::metrics(),
    )
}

/// Hosts, upstream and agent. Field order is drop order.
struct Scenario {
    agent: Agent,
    _upstream: Upstream,
    lab: Lab,
}

impl Scenario {
    fn new(confirm: bool) -> Self {
        Self::with_mode(confirm, "auto")
    }

    fn with_mode(confirm: bool, mode: &str) -> Self {
        Self::build(confirm, mode, None)
    }

    /// With `store`, the key store lives there instead of the agent's directory.
    fn build(confirm: bool, mode: &str, store: Option<&Path>) -> Self {
        Self::start(confirm, mode, |yaml| match store {
            Some(store) => format!("store:\n  path: {}\n{yaml}", store.display()),
            None => yaml,
        })
    }

    /// The hosts, the upstream and the agent, started with `config(...)`
    /// after `edit`.
    fn start(confirm: bool, mode: &str, edit: impl FnOnce(String) -> String) -> Self {
        let addrs: Vec<IpAddr> = CLIENT_ADDRS.iter().map(|a| ip(a)).collect();
        let lab = Lab::new(&addrs).expect("building the namespaces");
        let upstream = Upstream::start(&lab.gateway, UPSTREAM.parse().expect("upstream address"))
            .expect("starting the upstream");
        let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
        agent.env("KF_E2E_OPS", OPS_TOKEN);
        agent.env("KF_E2E_NEIGHBOUR", NEIGHBOUR_SECRET);
        agent.env("KF_E2E_TOTP", TOTP_SECRET);
        let yaml = edit(config(agent.pin_path(), confirm, mode));
        agent.launch(&yaml).expect("starting keyfence");
        Self {
            agent,
            _upstream: upstream,
            lab,
        }
    }

    /// The operator, calling from `OPS`.
    fn ops(&self) -> Caller<'_> {
        self.caller(OPS, OPS_TOKEN)
    }

    fn caller<'a>(&'a self, from: &str, token: &str) -> Caller<'a> {
        Caller {
            lab: &self.lab,
            from: ip(from),
            token: token.to_owned(),
        }
    }

    /// `GET /v1/orders` on listener `api` from `source` with `secret`.
    fn request(&self, source: &str, secret: &str) -> Reply {
        let source = ip(source);
        Curl::new(
            &self.lab.client,
            source,
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

    /// A request from `source` on listener `api` times out, and the datapath
    /// counted the drop: a timeout alone could be anything on the way (a slow
    /// agent, a lost answer), the counter says the SYN met the XDP program.
    #[track_caller]
    fn assert_dropped(&self, source: &str, secret: &str, what: &str) {
        let before = self.dropped();
        let reply = self.request(source, secret);
        assert_eq!(
            reply,
            Reply::TimedOut,
            "{what}: the datapath should drop the SYN from {source}"
        );
        let after = self.dropped();
        assert!(
            after > before,
            "{what}: {source} timed out but keyfence_packets_total{{listener=\"api\",reason=\"not_allowed\"}} stayed at {before}"
        );
    }

    /// `keyfence_http_requests_total` on listener `api` with `outcome`.
    fn metric_with_outcome(&self, outcome: &str) -> f64 {
        metric_with(self, "keyfence_http_requests_total", "outcome", outcome)
    }

    /// Packets the datapath dropped on listener `api` because no key allows their source.
    fn dropped(&self) -> u64 {
        self.agent
            .packet_count("api", "not_allowed")
            .expect("reading /metrics")
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.agent.metrics().expect("reading /metrics");
        parse_samples(&text, name).iter().map(|s| s.value).sum()
    }
}

/// A management principal calling the API from the client namespace.
struct Caller<'a> {
    lab: &'a Lab,
    from: IpAddr,
    token: String,
}

/// An API answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

impl Caller<'_> {
    fn call(&self, method: &str, path: &str, body: Option<&str>, confirm: Option<&str>) -> Answer {
        self.call_with_headers(method, path, body, confirm).0
    }

    /// The answer and its header block (as curl's `--dump-header` writes it).
    fn call_with_headers(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        confirm: Option<&str>,
    ) -> (Answer, String) {
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let head_file =
            std::env::temp_dir().join(format!("kf-e2e-head-{}-{n}", std::process::id()));
        let mut curl = Curl::new(
            &self.lab.client,
            self.from,
            url("http", SocketAddr::new(GATEWAY_V4.into(), MANAGEMENT), path),
        )
        .connect_timeout(Duration::from_secs(2))
        .arg("--dump-header")
        .arg(&head_file.display().to_string())
        .arg("--request")
        .arg(method)
        .bearer(&self.token);
        if let Some(body) = body {
            curl = curl
                .header("Content-Type: application/json")
                .arg("--data-binary")
                .arg(body);
        }
        if let Some(code) = confirm {
            curl = curl.header(&format!("X-Keyfence-Confirm: {code}"));
        }
        let reply = curl.send();
        let head = std::fs::read_to_string(&head_file).unwrap_or_default();
        let _ = std::fs::remove_file(&head_file);
        match reply {
            Reply::Answered { status, body, .. } => (
                Answer {
                    status,
                    body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                },
                head,
            ),
            other => panic!("{method} {path}: no answer: {other:?}"),
        }
    }

    fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None, None)
    }

    /// Create a key; panics unless 201. Returns `(id, secret)`.
    fn create(&self, body: &Value) -> (String, String) {
        let a = self.call("POST", "/v1/keys", Some(&body.to_string()), None);
        assert_eq!(a.status, 201, "create {body}: {a:?}");
        (
            a.body["id"].as_str().expect("an id").to_owned(),
            a.body["secret"].as_str().expect("a secret").to_owned(),
        )
    }

    fn set_allow(&self, id: &str, list: &Value) -> Answer {
        let body = json!({ "ip_allow_list": list }).to_string();
        self.call("PATCH", &format!("/v1/keys/{id}"), Some(&body), None)
    }

    fn audit_of(&self, id: &str) -> Vec<Value> {
        let a = self.get(&format!("/v1/audit?key_id={id}"));
        assert_eq!(a.status, 200, "{a:?}");
        a.body["entries"].as_array().cloned().unwrap_or_default()
    }
}

#[track_caller]
fn assert_status(reply: &Reply, status: u16, what: &str) {
    assert_eq!(reply.status(), Some(status), "{what}: {reply:?}");
}

#[test]
fn the_seed_routine_through_the_api_takes_effect_before_the_answer() {
    let s = Scenario::new(false);
    let ops = s.ops();
    let applies_before = s.metric("keyfence_policy_apply_seconds_count");
    let (id, secret) = ops.create(&json!({
        "name": "CI runners",
        "ip_allow_list": "198.51.100.7",
    }));
    assert!(id.starts_with("key_"), "{id}");
    assert!(secret.starts_with("kf_") && secret.len() == 52, "{secret}");
    assert_status(&s.request(SEEN, &secret), 403, "not yet listed");
    s.assert_dropped(DROPPED, &secret, "no key lists it");

    // Add the client's addresses: in force when the answer arrives.
    let a = ops.set_allow(&id, &json!(["198.51.100.7", SEEN, DROPPED]));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body["ip_allow_list"],
        json!(["192.0.2.10/32", "192.0.2.12/32", "198.51.100.7/32"])
    );
    let r = s.request(SEEN, &secret);
    assert_status(&r, 200, "added");
    assert_eq!(
        r.upstream_header("x-keyfence-key-id").as_deref(),
        Some(id.as_str())
    );
    assert_status(
        &s.request(DROPPED, &secret),
        200,
        "added, through the datapath",
    );

    // Remove them: 403 (and a dropped SYN) on the very next request.
    let a = ops.set_allow(&id, &json!(["198.51.100.7"]));
    assert_eq!(a.status, 200, "{a:?}");
    assert_status(&s.request(SEEN, &secret), 403, "removed");
    s.assert_dropped(DROPPED, &secret, "removed from the maps");

    // Re-add.
    let a = ops.set_allow(&id, &json!("198.51.100.7, 192.0.2.10, 192.0.2.12"));
    assert_eq!(a.status, 200, "{a:?}");
    assert_status(&s.request(SEEN, &secret), 200, "re-added");
    assert_status(&s.request(DROPPED, &secret), 200, "re-added to the maps");

    // Every change was applied and audited, with who, from where, before and after.
    assert!(s.metric("keyfence_policy_apply_seconds_count") >= applies_before + 4.0);
    assert!(
        (s.metric("keyfence_keys") - 2.0).abs() < 0.5,
        "neighbour and the new key"
    );
    let log = ops.audit_of(&id);
    let actions: Vec<&str> = log.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["create", "update", "update", "update"]);
    for e in &log {
        assert_eq!(e["principal"], "admin:ops");
        assert_eq!(e["address"], OPS);
        assert!(e["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
    }
    assert_eq!(log[0]["before"], Value::Null);
    assert_eq!(
        log[2]["before"]["ip_allow_list"],
        log[1]["after"]["ip_allow_list"]
    );
    assert_eq!(log[2]["after"]["ip_allow_list"], json!(["198.51.100.7/32"]));
    assert!(
        !log.iter().any(|e| e.to_string().contains(&secret)),
        "no secret in the audit log"
    );

    // The list shows both keys, secrets never.
    let listed = ops.get("/v1/keys");
    assert_eq!(listed.status, 200);
    let keys = listed.body["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["source"], "config");
    assert_eq!(keys[1]["id"], id.as_str());
    assert!(!listed.body.to_string().contains(&secret));
    let shown = ops.get(&format!("/v1/keys/{id}"));
    assert!(
        shown.body["last_used_at"].is_null(),
        "flushed once a minute"
    );
}

#[test]
fn a_change_that_would_lock_the_caller_out_is_refused() {
    let s = Scenario::new(false);
    let ops = s.ops();
    let (id, secret) = ops.create(&json!({
        "name": "automation",
        "scopes": ["admin", "api"],
        "ip_allow_list": [ADMIN_KEY_FROM],
    }));
    let me = s.caller(ADMIN_KEY_FROM, &secret);
    assert_eq!(
        me.get("/v1/keys").status,
        200,
        "an admin-scoped key is a principal"
    );
    assert_eq!(
        s.caller(OUTSIDER, &secret).get("/v1/keys").status,
        403,
        "from outside its own list"
    );

    let a = me.set_allow(&id, &json!(["198.51.100.0/24"]));
    assert_eq!(a.status, 409, "{a:?}");
    assert!(
        a.body["error"]
            .as_str()
            .is_some_and(|e| e.contains(ADMIN_KEY_FROM)),
        "the message names the address: {a:?}"
    );
    let a = me.call("DELETE", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(a.status, 409, "revoking itself: {a:?}");
    assert_eq!(
        ops.get(&format!("/v1/keys/{id}")).body["ip_allow_list"],
        json!(["192.0.2.101/32"]),
        "nothing changed"
    );
    assert_eq!(ops.audit_of(&id).len(), 1, "only the create");
    assert_eq!(me.get("/v1/keys").status, 200, "still works");

    // Keeping its own address is fine; an empty list (anywhere) too.
    let a = me.set_allow(&id, &json!([ADMIN_KEY_FROM, "198.51.100.0/24"]));
    assert_eq!(a.status, 200, "{a:?}");
    // Another principal may narrow it: that is not self-lockout.
    let a = ops.set_allow(&id, &json!(["198.51.100.0/24"]));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        me.get("/v1/keys").status,
        403,
        "its principal is updated at once"
    );
}

#[test]
fn step_up_confirmation_missing_wrong_replayed_and_valid() {
    let s = Scenario::new(true);
    let ops = s.ops();
    let totp = Confirmer::from_base32(TOTP_SECRET).expect("the test secret");
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    // Leave room for two steps in the window (current and next code).
    let into_step = now() % STEP_SECONDS;
    if into_step > STEP_SECONDS - 5 {
        thread::sleep(Duration::from_secs(STEP_SECONDS - into_step + 1));
    }
    let body = json!({"name": "CI", "ip_allow_list": [SEEN]}).to_string();
    let create = |code: Option<&str>| ops.call("POST", "/v1/keys", Some(&body), code);
    let keys_now = || {
        ops.get("/v1/keys").body["keys"]
            .as_array()
            .map_or(0, Vec::len)
    };

    let missing = create(None);
    assert_eq!(missing.status, 401, "{missing:?}");
    assert_eq!(missing.body, json!({"error": "confirmation required"}));
    let wrong = create(Some("000000"));
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert_eq!(wrong.body, json!({"error": "confirmation required"}));
    assert_eq!(keys_now(), 1, "nothing was created");

    let code = totp.code_at(now());
    let created = create(Some(&code));
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.body["id"].as_str().expect("id").to_owned();
    let secret = created.body["secret"].as_str().expect("secret").to_owned();
    assert_status(&s.request(SEEN, &secret), 200, "created with a valid code");

    // The same code again: refused, nothing changes.
    let change = json!({"ip_allow_list": [SEEN_TOO]}).to_string();
    let path = format!("/v1/keys/{id}");
    let replayed = ops.call("PATCH", &path, Some(&change), Some(&code));
    assert_eq!(replayed.status, 401, "{replayed:?}");
    assert_eq!(replayed.body, json!({"error": "confirmation required"}));
    assert_status(&s.request(SEEN, &secret), 200, "the replay changed nothing");
    let missing = ops.call("PATCH", &path, Some(&change), None);
    assert_eq!(missing.status, 401);

    // A renaming is not an allow-list change: no code needed.
    let renamed = ops.call("PATCH", &path, Some(r#"{"name":"CI runners"}"#), None);
    assert_eq!(renamed.status, 200, "{renamed:?}");

    // The next step's code (within the allowed skew) works once.
    let next = totp.code_at(now() + STEP_SECONDS);
    let valid = ops.call("PATCH", &path, Some(&change), Some(&next));
    assert_eq!(valid.status, 200, "{valid:?}");
    assert_status(
        &s.request(SEEN, &secret),
        403,
        "the confirmed change is in force",
    );
    assert_status(
        &s.request(SEEN_TOO, &secret),
        200,
        "the confirmed change is in force",
    );
    let log = ops.audit_of(&id);
    assert_eq!(log.len(), 3, "create, rename, update: {log:?}");
}

#[test]
fn revoke_refuses_the_next_request_and_rotate_swaps_the_secret() {
    let mut s = Scenario::new(false);
    let ops = s.ops();
    let (id, old) = ops.create(&json!({"name": "mobile", "ip_allow_list": [SEEN]}));
    assert_status(&s.request(SEEN, &old), 200, "new key");

    let rotated = ops.call("POST", &format!("/v1/keys/{id}/rotate"), None, None);
    assert_eq!(rotated.status, 200, "{rotated:?}");
    let new = rotated.body["secret"]
        .as_str()
        .expect("a new secret")
        .to_owned();
    assert_ne!(new, old);
    assert_eq!(rotated.body["id"], id.as_str());
    assert_eq!(rotated.body["ip_allow_list"], json!(["192.0.2.10/32"]));
    assert_status(&s.request(SEEN, &old), 401, "the old secret");
    assert_status(&s.request(SEEN, &new), 200, "the new secret");
    assert_status(&s.request(SEEN_TOO, &new), 403, "the same list");

    let revoked = ops.call("DELETE", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(revoked.status, 200, "{revoked:?}");
    assert!(revoked.body["revoked_at"].is_string());
    assert_status(
        &s.request(SEEN, &new),
        401,
        "revoked: the very next request",
    );
    let again = ops.call("DELETE", &format!("/v1/keys/{id}"), None, None);
    assert_eq!(again.status, 409, "{again:?}");
    let patch = ops.set_allow(&id, &json!([SEEN_TOO]));
    assert_eq!(
        patch.status, 409,
        "a revoked key cannot be edited: {patch:?}"
    );
    let actions: Vec<String> = ops
        .audit_of(&id)
        .iter()
        .filter_map(|e| e["action"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(actions, ["create", "rotate", "revoke"]);

    // A revoked key survives a restart as revoked.
    s.agent.restart().expect("restarting keyfence");
    assert_status(&s.request(SEEN, &new), 401, "still revoked after a restart");
}

/// A key written into the store by another writer (here a second
/// connection to the running agent's file, as another host would write a
/// shared store) reaches both layers through the store's change feed, and so
/// does its revocation; the API lists and audits it like its own.
#[test]
fn another_writers_changes_are_enforced_from_the_change_feed() {
    const SECRET: &str = "kf_written_elsewhere_0123456789abcdef";
    let s = Scenario::new(false);
    let ops = s.ops();
    s.assert_dropped(DROPPED, SECRET, "no key allows the address yet");
    let actor = Actor {
        principal: "admin:elsewhere".into(),
        address: ip(OPS),
    };
    let mut other = SqliteStore::open(&s.agent.store_path()).expect("a second connection");
    let key = other
        .create(
            Key {
                id: "key_writtenelsewhere".into(),
                name: "elsewhere".into(),
                tenant: "default".into(),
                scopes: keyfence::keys::Scopes::API,
                digest: keyfence::keys::credentials::digest(SECRET),
                allow: keyfence::allowlist::parse_list(
                    &keyfence::allowlist::RawList::One(DROPPED.into()),
                    keyfence::allowlist::DEFAULT_MAX_ENTRIES,
                )
                .expect("a list"),
                report_only: false,
                origin: Origin::Store,
            },
            &actor,
            SystemTime::now(),
        )
        .expect("writing a key from outside the agent");
    let feed = Duration::from_secs(5);
    let every = Duration::from_millis(100);
    assert!(
        poll_until(feed, every, || s.request(DROPPED, SECRET).status()
            == Some(200)),
        "the key is enforced in both layers: {:?}",
        s.request(DROPPED, SECRET)
    );
    assert_eq!(ops.get(&format!("/v1/keys/{}", key.id)).status, 200);
    let writers: Vec<Value> = ops
        .audit_of(&key.id)
        .iter()
        .map(|e| e["principal"].clone())
        .collect();
    assert_eq!(writers, [json!("admin:elsewhere")]);

    other
        .revoke(&key.id, &actor, SystemTime::now())
        .expect("revoking from outside");
    assert!(
        poll_until(feed, every, || s.request(DROPPED, SECRET)
            == Reply::TimedOut),
        "the revocation is enforced too: {:?}",
        s.request(DROPPED, SECRET)
    );
}

/// Each malformed or refused call answers its status and message.
fn expect_errors(ops: &Caller<'_>, path: &str) {
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("POST", "/v1/keys", Some("{not json"), 400, "malformed JSON"),
        (
            "POST",
            "/v1/keys",
            Some(r#"{"name":"x","colour":"red"}"#),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/v1/keys",
            Some(r#"{"name":7}"#),
            400,
            "invalid type",
        ),
        (
            "POST",
            "/v1/keys",
            Some(r#"{"name":""}"#),
            422,
            "name must be",
        ),
        (
            "POST",
            "/v1/keys",
            Some(r#"{"name":"x","scopes":["root"]}"#),
            422,
            "unknown scope",
        ),
        (
            "POST",
            "/v1/keys",
            Some(r#"{"name":"x","tenant":"a b"}"#),
            422,
            "tenant must be",
        ),
        (
            "PATCH",
            path,
            Some(r#"{"ip_allow_list":"10.0.0.1/33"}"#),
            422,
            "invalid allow list",
        ),
        ("PATCH", path, Some("[1,2]"), 400, "malformed JSON"),
        (
            "PATCH",
            "/v1/keys/key_doesnotexist00",
            Some(r#"{"name":"x"}"#),
            404,
            "unknown key id",
        ),
        (
            "DELETE",
            "/v1/keys/key_doesnotexist00",
            None,
            404,
            "unknown key id",
        ),
        (
            "POST",
            "/v1/keys/key_doesnotexist00/rotate",
            None,
            404,
            "unknown key id",
        ),
        (
            "GET",
            "/v1/keys/key_doesnotexist00/sources",
            None,
            404,
            "unknown key id",
        ),
        ("DELETE", "/v1/keys/neighbour", None, 409, "config file"),
        (
            "PATCH",
            "/v1/keys/neighbour",
            Some(r#"{"name":"x"}"#),
            409,
            "config file",
        ),
        ("GET", "/v1/audit?limit=many", None, 400, "limit"),
        ("GET", "/v2/everything", None, 404, "no such endpoint"),
    ];
    for &(method, p, body, status, message) in cases {
        let a = ops.call(method, p, body, None);
        assert_eq!(a.status, status, "{method} {p} {body:?}: {a:?}");
        assert!(
            a.body["error"]
                .as_str()
                .is_some_and(|e| e.contains(message)),
            "{method} {p} {body:?}: expected {message:?} in {a:?}"
        );
    }
}

#[test]
fn bad_input_meets_a_clear_error_and_changes_nothing() {
    let s = Scenario::new(false);
    let ops = s.ops();
    let (id, secret) = ops.create(&json!({"name": "kept", "ip_allow_list": [SEEN]}));
    let before = ops.get("/v1/keys").body;
    let path = format!("/v1/keys/{id}");

    expect_errors(&ops, &path);

    // 422 lists every bad entry with its position and reason.
    let bad = ops.set_allow(
        &id,
        &json!([
            "192.0.2.10",
            "10.0.0.1/33",
            "198.51.100.7/24",
            "not-an-ip",
            "2001:db8::/129"
        ]),
    );
    assert_eq!(bad.status, 422, "{bad:?}");
    let entries = bad.body["entries"].as_array().expect("entries");
    let positions: Vec<u64> = entries
        .iter()
        .filter_map(|e| e["position"].as_u64())
        .collect();
    assert_eq!(positions, [2, 3, 4, 5], "{bad:?}");
    assert!(
        entries
            .iter()
            .all(|e| e["reason"].as_str().is_some_and(|r| !r.is_empty()))
    );

    // Who may call: no token, a wrong one, the right one from elsewhere.
    let anonymous = s.caller(OPS, "");
    assert_eq!(anonymous.get("/v1/keys").status, 401);
    assert_eq!(
        s.caller(OPS, "wrong-token-0123456789")
            .get("/v1/keys")
            .status,
        401
    );
    let outsider = s.caller(OUTSIDER, OPS_TOKEN);
    let a = outsider.get("/v1/keys");
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body, json!({"error": "IP address not allowed"}));
    assert_eq!(
        outsider.set_allow(&id, &json!([])).status,
        403,
        "a write from outside the principal's list"
    );

    assert_eq!(ops.get("/v1/keys").body, before, "nothing changed");
    assert_eq!(ops.audit_of(&id).len(), 1, "nothing audited but the create");
    assert_status(&s.request(SEEN, &secret), 200, "the key works as before");
}

/// Sleep until `at`.
fn sleep_until(at: SystemTime) {
    if let Ok(left) = at.duration_since(SystemTime::now()) {
        thread::sleep(left);
    }
}

/// An entry's `expires_at` in both layers, to the second: it still matches
/// one second before (a request through the shim, a SYN through the datapath)
/// and is refused within one second after (403 from the shim; a dropped SYN,
/// counted).
#[test]
fn an_expiring_entry_stops_matching_on_time_in_both_layers() {
    let s = Scenario::new(false);
    let ops = s.ops();
    // Whole seconds, as RFC 3339 with seconds carries it.
    let expires = UNIX_EPOCH + Duration::from_secs(unix_now() + 8);
    let until = humantime::format_rfc3339_seconds(expires).to_string();
    let (id, secret) = ops.create(&json!({
        "name": "contractor",
        "ip_allow_list": [
            {"cidr": SEEN, "note": "contractor laptop", "expires_at": until},
            {"cidr": DROPPED, "expires_at": until},
            "198.51.100.7",
        ],
    }));
    let shown = ops.get(&format!("/v1/keys/{id}")).body;
    assert_eq!(shown["ip_allow_list"][0]["note"], "contractor laptop");
    assert_eq!(shown["ip_allow_list"][0]["expires_at"], until.as_str());

    // Still in force one second before (both checks end by then).
    sleep_until(expires - Duration::from_millis(1600));
    assert_status(&s.request(SEEN, &secret), 200, "1 s before expiry, shim");
    assert_status(
        &s.request(DROPPED, &secret),
        200,
        "1 s before expiry, datapath",
    );
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        left >= Duration::from_secs(1),
        "the checks before expiry ended only {left:?} before it: the machine is too slow to test the second"
    );

    // Refused within one second after: the first attempts made from the
    // expiry on.
    sleep_until(expires);
    let deadline = expires + Duration::from_secs(1);
    let before = s.dropped();
    let (mut shim_at, mut datapath_at) = (None, None);
    while shim_at.is_none() || datapath_at.is_none() {
        let at = SystemTime::now();
        assert!(
            at <= deadline,
            "1 s after expiry: shim refused {shim_at:?}, datapath dropped {datapath_at:?}"
        );
        if shim_at.is_none() && s.request(SEEN, &secret).status() == Some(403) {
            shim_at = Some(at);
        }
        let at = SystemTime::now();
        if datapath_at.is_none() && at <= deadline && s.request(DROPPED, &secret) == Reply::TimedOut
        {
            datapath_at = Some(at);
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(s.dropped() > before, "the datapath counted the drop");
    let after = |at: Option<SystemTime>| at.and_then(|a| a.duration_since(expires).ok());
    eprintln!(
        "expiry: the shim refused a request sent {:?} after it, the datapath dropped a SYN sent {:?} after it",
        after(shim_at),
        after(datapath_at)
    );
    // An entry without expiry is unaffected.
    let shown = ops.get(&format!("/v1/keys/{id}")).body;
    assert!(
        shown["ip_allow_list"].as_array().is_some_and(|l| l
            .iter()
            .any(|e| e == "198.51.100.7/32" || e["cidr"] == "198.51.100.7/32")),
        "{shown}"
    );
}

#[test]
fn sources_show_refused_attempts() {
    let s = Scenario::new(false);
    let ops = s.ops();
    let (id, secret) = ops.create(&json!({"name": "partner", "ip_allow_list": [SEEN]}));
    for _ in 0..3 {
        assert_status(&s.request(SEEN_TOO, &secret), 403, "not listed");
    }
    assert_status(&s.request(SEEN, &secret), 200, "listed");
    let a = ops.get(&format!("/v1/keys/{id}/sources"));
    assert_eq!(a.status, 200, "{a:?}");
    let sources: BTreeMap<String, (u64, u64)> = a.body["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .map(|s| {
            (
                s["ip"].as_str().unwrap_or_default().to_owned(),
                (
                    s["allowed"].as_u64().unwrap_or(0),
                    s["refused"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect();
    assert_eq!(sources.get(SEEN_TOO), Some(&(0, 3)), "{a:?}");
    assert_eq!(sources.get(SEEN), Some(&(1, 0)), "{a:?}");
    let other = ops.get("/v1/keys/neighbour/sources");
    assert_eq!(other.status, 200);
    assert_eq!(other.body["sources"], json!([]), "per key");
}

/// `keyfence keys …` run in the gateway namespace against the API on loopback.
fn cli(s: &Scenario, args: &[&str]) -> (i32, String, String) {
    let out = s
        .lab
        .gateway
        .command(keyfence_tests::netns::keyfence_bin().expect("the keyfence binary"))
        .arg("keys")
        .args(args)
        .env("KEYFENCE_API", format!("http://127.0.0.1:{MANAGEMENT}"))
        .env("KEYFENCE_TOKEN", OPS_TOKEN)
        .output()
        .expect("running keyfence keys");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_manages_keys_with_tables_and_json() {
    let s = Scenario::new(false);
    let (code, out, err) = cli(
        &s,
        &[
            "create",
            "--name",
            "CI runners",
            "--allow",
            "198.51.100.7, 192.0.2.10",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let created: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let id = created["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert_status(&s.request(SEEN, &secret), 200, "created by the CLI");

    let (code, out, _) = cli(&s, &["list"]);
    assert_eq!(code, 0);
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ID") && header.contains("ALLOW"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with(&id))
        .expect("the new key's row");
    assert!(
        row.contains("CI runners") && row.contains("active"),
        "{row}"
    );
    assert!(!out.contains(&secret), "list never shows secrets");

    let (code, out, err) = cli(&s, &["update", &id, "--allow", "198.51.100.7, 192.0.2.11"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("192.0.2.11/32"), "{out}");
    assert_status(&s.request(SEEN, &secret), 403, "updated by the CLI");
    assert_status(&s.request(SEEN_TOO, &secret), 200, "updated by the CLI");

    let (code, out, _) = cli(&s, &["sources", &id]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ADDRESS"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(SEEN) && l.split_whitespace().nth(2) == Some("1")),
        "192.0.2.10 refused once: {out}"
    );

    let (code, out, err) = cli(
        &s,
        &[
            "update",
            &id,
            "--allow",
            "192.0.2.10, 300.1.1.1, 10.0.0.0/33",
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("422 invalid allow list"), "{err}");
    assert!(err.contains("entry 2: \"300.1.1.1\""), "{err}");
    assert!(err.contains("entry 3: \"10.0.0.0/33\""), "{err}");

    let (code, out, _) = cli(&s, &["show", "key_doesnotexist00"]);
    assert_eq!(code, 1, "{out}");
    let (code, out, _) = cli(&s, &["rotate", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("secret     kf_"), "{out}");
    let (code, _, _) = cli(&s, &["revoke", &id]);
    assert_eq!(code, 0);
    let (code, out, _) = cli(&s, &["audit", "--key", &id]);
    assert_eq!(code, 0);
    let actions: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(actions, ["create", "update", "rotate", "revoke"], "{out}");
}

/// One write the crash test sent, and whether the API acknowledged it.
struct Write {
    id: String,
    /// The allow list the write set (canonical text).
    list: Vec<String>,
    acknowledged: bool,
}

/// Send writes (creates, and updates of `known` keys) one at a time from the
/// gateway namespace until the agent dies under them (at most 10 s).
fn write_until_killed(
    netns: &Path,
    known: Vec<String>,
    seed: u64,
) -> thread::JoinHandle<Vec<Write>> {
    let netns = netns.to_path_buf();
    thread::spawn(move || {
        enter(&netns).expect("entering the gateway namespace");
        let api = format!("http://127.0.0.1:{MANAGEMENT}");
        let mut done = Vec::new();
        let started = Instant::now();
        for i in 0u64.. {
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
            let octet = (seed.wrapping_add(i) % 250) + 1;
            let list = vec![
                format!("198.51.100.{octet}/32"),
                format!("203.0.113.{octet}/32"),
            ];
            let (path, id, body) = if i % 2 == 0 || known.is_empty() {
                let body = json!({ "name": format!("crash-{i}"), "ip_allow_list": list });
                ("/v1/keys".to_owned(), None, body)
            } else {
                let id = known[usize::try_from(seed ^ i).unwrap_or(0) % known.len()].clone();
                (
                    format!("/v1/keys/{id}"),
                    Some(id),
                    json!({ "ip_allow_list": list }),
                )
            };
            let method = if id.is_some() { "PATCH" } else { "POST" };
            match keys_cli::call(&api, OPS_TOKEN, method, &path, Some(&body), None) {
                Ok(a) if a.status == 200 || a.status == 201 => done.push(Write {
                    id: id.unwrap_or_else(|| a.body["id"].as_str().unwrap_or("").to_owned()),
                    list,
                    acknowledged: true,
                }),
                Ok(a) => panic!("{method} {path}: {} {}", a.status, a.body),
                // The agent died mid-call: not acknowledged.
                Err(_) => {
                    if let Some(id) = id {
                        done.push(Write {
                            id,
                            list,
                            acknowledged: false,
                        });
                    }
                    break;
                }
            }
        }
        done
    })
}

/// With the agent dead, read the store directly: sound, every acknowledged
/// write there, nothing half-written.
fn check_store(db: &Path, writes: &[Write], round: usize) {
    let mut store = SqliteStore::open(db).expect("the store opens after kill -9");
    assert_eq!(
        store.integrity_check().expect("integrity_check"),
        Vec::<String>::new(),
        "round {round}"
    );
    let stored: BTreeMap<String, Vec<String>> = store
        .keys()
        .expect("reading keys")
        .into_iter()
        .map(|k| {
            let list = k
                .allow
                .entries()
                .iter()
                .map(|e| e.net.to_string())
                .collect();
            (k.id.clone(), list)
        })
        .collect();
    // Each key holds the list of its last acknowledged write, or of a later
    // unacknowledged one (committed, but the agent died before answering).
    let mut expected: BTreeMap<&str, Vec<&Write>> = BTreeMap::new();
    for w in writes {
        expected.entry(w.id.as_str()).or_default().push(w);
    }
    for (id, ws) in &expected {
        let Some(list) = stored.get(*id) else {
            panic!("round {round}: acknowledged key {id} is missing");
        };
        let last_ack = ws
            .iter()
            .rposition(|w| w.acknowledged)
            .expect("created with an ack");
        let allowed: Vec<&Vec<String>> = ws[last_ack..].iter().map(|w| &w.list).collect();
        assert!(
            allowed.contains(&list),
            "round {round}: key {id} holds {list:?}, expected one of {allowed:?}"
        );
    }
    // Every stored key's list matches its last audit row (written in the
    // same transaction), so no change is visible without its audit row.
    let audit = store.audit(0, 1_000_000, None).expect("audit");
    let mut last_after: BTreeMap<&str, &Value> = BTreeMap::new();
    for e in &audit {
        if let Some(after) = &e.after {
            last_after.insert(&e.key_id, after);
        }
    }
    for (id, list) in &stored {
        let after = last_after
            .get(id.as_str())
            .unwrap_or_else(|| panic!("round {round}: key {id} has no audit row"));
        let audited: Vec<String> = after["ip_allow_list"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            &audited, list,
            "round {round}: key {id} disagrees with its audit row"
        );
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_and_the_store_stays_sound() {
    const KILLS: usize = 50;
    // No datapath: this is about the store; it also makes restarts quick.
    let mut s = Scenario::with_mode(false, "off");
    let db = s.agent.store_path();
    let netns = s.lab.gateway.path();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut writes: Vec<Write> = Vec::new();
    for round in 0..KILLS {
        let known: Vec<String> = writes.iter().map(|w| w.id.clone()).collect();
        let sender = write_until_killed(&netns, known, next());
        thread::sleep(Duration::from_millis(50 + next() % 400));
        s.agent.sigkill().expect("kill -9");
        writes.extend(sender.join().expect("the writer"));
        assert!(
            writes.iter().any(|w| w.acknowledged),
            "the writer got nothing done before the first kill"
        );
        check_store(&db, &writes, round);
        s.agent.spawn().expect("restarting keyfence");
        s.agent
            .wait_ready(Duration::from_secs(30))
            .expect("keyfence is ready after kill -9");
    }
    let acknowledged = writes.iter().filter(|w| w.acknowledged).count();
    assert!(
        acknowledged >= KILLS,
        "only {acknowledged} writes in {KILLS} rounds"
    );
    eprintln!("{KILLS} kills, {acknowledged} acknowledged writes checked");
}

#[test]
fn metrics_pass_promtool_check_metrics() {
    keyfence_tests::http::require("promtool").expect("promtool (Debian package prometheus)");
    let s = Scenario::new(false);
    let ops = s.ops();
    let (id, secret) = ops.create(&json!({"name": "promtool", "ip_allow_list": [SEEN]}));
    assert_status(&s.request(SEEN, &secret), 200, "allowed");
    assert_status(&s.request(SEEN_TOO, &secret), 403, "refused");
    assert_status(&s.request(SEEN, "no-such-key-0123456789"), 401, "unknown");
    s.assert_dropped(DROPPED, &secret, "dropped");
    assert_eq!(ops.set_allow(&id, &json!([SEEN, SEEN_TOO])).status, 200);
    let text = s.agent.metrics().expect("reading /metrics");
    for family in [
        "keyfence_datapath_packets_total",
        "keyfence_http_requests_total",
        "keyfence_http_request_duration_seconds_bucket",
        "keyfence_keys",
        "keyfence_policy_prefixes",
        "keyfence_policy_apply_seconds_bucket",
        "keyfence_config_last_reload_successful",
        "keyfence_datapath_attached",
    ] {
        assert!(
            !parse_samples(&text, family).is_empty(),
            "SPEC §8 family {family} missing:\n{text}"
        );
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("feeding promtool");
    }
    let out = child.wait_with_output().expect("promtool's answer");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The scenario with small allow-entry maps (`datapath.capacity`), so that
/// filling them takes a handful of keys. `neighbour`'s two addresses are
/// adjacent: one `/31` prefix entry, no exact one.
fn small_maps(exact: u32) -> Scenario {
    Scenario::start(false, "auto", |config| {
        let config = config.replacen(
            "mode: auto,",
            &format!("mode: auto, capacity: {{ exact: {exact}, prefixes: 64 }},"),
            1,
        );
        assert!(config.contains("capacity:"), "{config}");
        config
    })
}

impl Scenario {
    /// `/readyz`: status and body.
    fn readyz(&self) -> (u16, String) {
        self.agent.get("/readyz").expect("reading /readyz")
    }

    /// The ids of the stored keys the API lists.
    fn stored_ids(&self) -> Vec<String> {
        let listed = self.ops().get("/v1/keys");
        assert_eq!(listed.status, 200, "{listed:?}");
        listed.body["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter(|k| k["source"] == "api" && k["revoked_at"].is_null())
            .filter_map(|k| k["id"].as_str().map(str::to_owned))
            .collect()
    }
}

#[track_caller]
fn assert_full(a: &Answer, limit: u32, what: &str) {
    assert_eq!(a.status, 507, "{what}: {a:?}");
    assert_eq!(
        a.body["error"]
            .as_str()
            .map(|e| e.split(" (").next().unwrap_or(e)),
        Some(format!("datapath exact-match map full: {limit} entries").as_str()),
        "{what}: {a:?}"
    );
    assert_eq!(a.body["limit"], limit, "{what}: {a:?}");
    assert_eq!(a.body["map"], "exact", "{what}: {a:?}");
    assert!(a.body.get("secret").is_none(), "{what}: no secret: {a:?}");
}

/// Issue 13 finding 5: a full exact map used to answer 500 without the
/// secret while the key was stored and enforced by the shim only, and a
/// PATCH after a revoke answered 200 without reaching the maps. Now a change
/// the maps cannot hold is refused with 507 before anything is stored, and
/// once room is made the same change is enforced in both layers.
#[test]
fn a_full_map_refuses_with_507_stores_nothing_and_works_once_room_is_made() {
    // Room for two /32 entries.
    let s = small_maps(2);
    let ops = s.ops();
    let (a, a_secret) = ops.create(&json!({"name": "a", "ip_allow_list": [DROPPED]}));
    let (b, _) = ops.create(&json!({"name": "b", "ip_allow_list": ["198.51.100.7"]}));
    assert_status(
        &s.request(DROPPED, &a_secret),
        200,
        "a, through the datapath",
    );

    // Full: a create is refused, and nothing of it exists anywhere.
    let audit_before = ops.get("/v1/audit").body["entries"]
        .as_array()
        .map_or(0, Vec::len);
    let refused = ops.call(
        "POST",
        "/v1/keys",
        Some(&json!({"name": "c", "ip_allow_list": ["198.51.100.8"]}).to_string()),
        None,
    );
    assert_full(&refused, 2, "create in a full map");
    assert_eq!(s.stored_ids(), [a.clone(), b.clone()], "no key c");
    let audit_after = ops.get("/v1/audit").body["entries"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(audit_after, audit_before, "no audit row: nothing committed");

    // A PATCH that needs one more entry: refused, the key unchanged.
    let wider = json!([DROPPED, OUTSIDER]);
    assert_full(&ops.set_allow(&a, &wider), 2, "patch in a full map");
    let shown = ops.get(&format!("/v1/keys/{a}"));
    assert_eq!(shown.body["ip_allow_list"], json!(["192.0.2.12/32"]));
    assert_status(&s.request(SEEN, &a_secret), 403, "the shim agrees");
    s.assert_dropped(OUTSIDER, &a_secret, "no entry for it");

    // Room made: the same create works and its address passes.
    let revoked = ops.call("DELETE", &format!("/v1/keys/{b}"), None, None);
    assert_eq!(revoked.status, 200, "{revoked:?}");
    let (c, c_secret) = ops.create(&json!({"name": "c", "ip_allow_list": [ADMIN_KEY_FROM]}));
    assert_status(&s.request(ADMIN_KEY_FROM, &c_secret), 200, "c, both layers");
    // Full again (c took the space); revoke c, and the same PATCH is enforced.
    assert_full(&ops.set_allow(&a, &wider), 2, "full again");
    let revoked = ops.call("DELETE", &format!("/v1/keys/{c}"), None, None);
    assert_eq!(revoked.status, 200, "{revoked:?}");
    s.assert_dropped(ADMIN_KEY_FROM, &c_secret, "c's entry is gone");
    let a2 = ops.set_allow(&a, &wider);
    assert_eq!(a2.status, 200, "{a2:?}");
    assert_status(
        &s.request(OUTSIDER, &a_secret),
        200,
        "a's new address, both layers",
    );
    assert_status(&s.request(DROPPED, &a_secret), 200, "a's old address");
    assert_eq!(s.readyz(), (200, "ready\n".into()));
    assert!((s.metric("keyfence_datapath_in_sync") - 1.0).abs() < 0.5);
    assert!(s.metric("keyfence_datapath_write_failures_total") < 0.5);
}

/// Entries written into the agent's pinned `KF_EXACT` from outside under a
/// policy id no listener uses, so the kernel refuses the agent's next insert
/// although its own count says there is room.
fn fill_from_outside(
    s: &Scenario,
) -> aya::maps::HashMap<aya::maps::MapData, keyfence_common::policy::PolicyAddr, u32> {
    use aya::maps::{HashMap, Map, MapData};
    use keyfence_common::policy::{ALLOWED, PolicyAddr};
    let path = s
        .agent
        .pin_path()
        .join(format!("v{}", keyfence_common::LAYOUT_VERSION))
        .join(keyfence_common::map_names::EXACT);
    let data = MapData::from_pin(&path).expect("opening the pinned KF_EXACT");
    let mut map: HashMap<MapData, PolicyAddr, u32> =
        HashMap::try_from(Map::HashMap(data)).expect("KF_EXACT is a hash");
    let mut inserted = 0;
    for i in 0..=255u8 {
        let key = PolicyAddr::new(60, keyfence_common::ipv4_mapped([203, 0, 113, i]));
        if map.insert(key, ALLOWED, 0).is_err() {
            break;
        }
        inserted += 1;
    }
    assert!(inserted > 0 && inserted < 255, "the map filled: {inserted}");
    map
}

/// The kernel refusing a write the agent thought would fit: the key is
/// stored and answered (the shim enforces it), the datapath fails open for
/// its listener instead of dropping the key's addresses, `/readyz` says
/// degraded and `keyfence_datapath_in_sync` is 0; once the space is back
/// the reconcile writes the entries and the listener is restricted again.
#[test]
fn a_kernel_refusal_fails_open_reports_degraded_and_reconciles() {
    let s = small_maps(8);
    let ops = s.ops();
    assert_eq!(s.readyz(), (200, "ready\n".into()));
    let mut foreign = fill_from_outside(&s);

    let (id, secret) = ops.create(&json!({"name": "a", "ip_allow_list": [DROPPED]}));
    assert_status(
        &s.request(DROPPED, &secret),
        200,
        "the key's address passes although its entry could not be written",
    );
    let (status, body) = s.readyz();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("degraded"), "{body}");
    assert!(s.metric("keyfence_datapath_in_sync") < 0.5);
    assert!(s.metric("keyfence_datapath_write_failures_total") >= 1.0);
    // Open, not bypassed: the shim still refuses sources outside the list.
    assert_status(&s.request(ADMIN_KEY_FROM, &secret), 403, "the shim refuses");
    // The agent now knows the map is full: a change needing more is refused.
    let wider = json!([DROPPED, OUTSIDER]);
    assert_full(&ops.set_allow(&id, &wider), 8, "full from outside");
    assert_status(
        &s.request(OUTSIDER, &secret),
        403,
        "open, and the shim refuses",
    );

    // Space back: the reconcile (back-off from 0.5 s) catches up.
    let keys: Vec<_> = foreign.keys().filter_map(Result::ok).collect();
    for k in keys.iter().filter(|k| k.policy() == 60) {
        let _ = foreign.remove(k);
    }
    let synced = poll_until(Duration::from_secs(40), Duration::from_millis(250), || {
        s.readyz() == (200, "ready\n".to_string())
    });
    assert!(synced, "reconciled: {:?}\n{}", s.readyz(), s.agent.log());
    assert!((s.metric("keyfence_datapath_in_sync") - 1.0).abs() < 0.5);
    assert_status(&s.request(DROPPED, &secret), 200, "entry written");
    let a = ops.set_allow(&id, &wider);
    assert_eq!(a.status, 200, "{a:?}");
    assert_status(&s.request(OUTSIDER, &secret), 200, "entry written");
    s.assert_dropped(
        ADMIN_KEY_FROM,
        &secret,
        "restricted again: a source in no list is dropped",
    );
}

/// A reload whose policy the maps cannot hold is refused and counted, the
/// last good config staying in force; a restart asking for another map size
/// than the pinned maps have is refused with the fix.
#[test]
fn a_reload_beyond_capacity_is_refused_and_a_resized_pin_is_refused_at_start() {
    let mut s = small_maps(2);
    let failures = |s: &Scenario| {
        let text = s.agent.metrics().unwrap_or_default();
        parse_samples(&text, "keyfence_config_reloads_total")
            .iter()
            .filter(|x| x.label("result") == Some("failure"))
            .map(|x| x.value)
            .sum::<f64>()
    };
    let base = config(s.agent.pin_path(), false, "auto").replacen(
        "mode: auto,",
        "mode: auto, capacity: { exact: 2, prefixes: 64 },",
        1,
    );
    // Three /32 entries that do not merge: one more than the map holds.
    let wide = base.replacen(
        "management:\n",
        &format!(
            "  - {{ id: wide, name: wide, secret_sha256: \"{}\", ip_allow_list: [\"198.51.100.1\", \"198.51.100.3\", \"198.51.100.5\"] }}\nmanagement:\n",
            "ab".repeat(32)
        ),
        1,
    );
    // A write answered means the daemon's loop runs (signal handlers are in
    // place: `/readyz` turns ready a moment before them).
    let (_, secret) = s
        .ops()
        .create(&json!({"name": "a", "ip_allow_list": [DROPPED]}));
    s.agent.write_config(&wide).expect("writing the config");
    s.agent.sighup().expect("SIGHUP");
    let refused = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        failures(&s) >= 1.0
    });
    assert!(refused, "the reload is refused\n{}", s.agent.log());
    assert!(
        s.agent
            .log()
            .contains("datapath exact-match map full: 2 entries"),
        "refused for the capacity\n{}",
        s.agent.log()
    );
    let listed = s.ops().get("/v1/keys");
    assert!(
        !listed.body.to_string().contains("\"wide\""),
        "the last good config stays: {listed:?}"
    );
    assert_status(&s.request(SEEN, NEIGHBOUR_SECRET), 200, "still in force");
    assert_status(&s.request(DROPPED, &secret), 200, "the stored key too");
    assert_eq!(s.readyz(), (200, "ready\n".into()), "nothing was written");

    // Another size than the pinned maps: refused at start, naming the fix.
    s.agent.sigterm().expect("stopping keyfence");
    let resized = base.replacen("exact: 2,", "exact: 3,", 1);
    s.agent.write_config(&resized).expect("writing the config");
    s.agent.spawn().expect("starting keyfence");
    let exited = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        s.agent.exited().ok().flatten().is_some()
    });
    assert!(exited, "keyfence refuses to start\n{}", s.agent.log());
    let log = s.agent.log();
    assert!(
        log.contains("holds 2 entries, datapath.capacity asks for 3")
            && log.contains("keyfence detach"),
        "{log}"
    );
}

/// `Retry-After: N` from a header block, in seconds.
fn retry_after(head: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().parse().ok())?
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A six-digit code that is none of the codes valid right now.
fn wrong_code(totp: &Confirmer, n: u32) -> String {
    let now = unix_now();
    let valid: Vec<String> = [now - STEP_SECONDS, now, now + STEP_SECONDS]
        .iter()
        .map(|t| totp.code_at(*t))
        .collect();
    // Four candidates: at most three codes are valid at once.
    (0..4u64)
        .map(|k| format!("{:06}", (u64::from(n) * 4 + k) * 7919 % 1_000_000))
        .find(|c| !valid.contains(c))
        .expect("a wrong code")
}

/// Audit rows of action `lockout` (they belong to no key), via the CLI on
/// loopback (the callers' own addresses may be locked out).
fn lockout_rows(s: &Scenario) -> Vec<Value> {
    let (code, out, err) = cli(s, &["audit", "--json", "--limit", "1000"]);
    assert_eq!(code, 0, "{out}{err}");
    let all: Value = serde_json::from_str(&out).expect("--json prints JSON");
    all["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "lockout")
        .cloned()
        .collect()
}

fn metric_with(s: &Scenario, name: &str, label: &str, value: &str) -> f64 {
    let text = s.agent.metrics().expect("reading /metrics");
    parse_samples(&text, name)
        .iter()
        .filter(|x| x.label(label) == Some(value))
        .map(|x| x.value)
        .sum()
}

#[test]
fn guessing_step_up_codes_meets_a_lockout_that_a_correct_code_does_not_lift() {
    let s = Scenario::new(true);
    let ops = s.ops();
    let totp = Confirmer::from_base32(TOTP_SECRET).expect("the test secret");
    let body = json!({"name": "CI", "ip_allow_list": [SEEN]}).to_string();
    let keys_now = || {
        ops.get("/v1/keys").body["keys"]
            .as_array()
            .map_or(0, Vec::len)
    };

    // Five wrong codes are each 401; a missing code is not a guess.
    assert_eq!(ops.call("POST", "/v1/keys", Some(&body), None).status, 401);
    for i in 0..5 {
        let a = ops.call("POST", "/v1/keys", Some(&body), Some(&wrong_code(&totp, i)));
        assert_eq!(a.status, 401, "guess {i}: {a:?}");
        assert_eq!(a.body, json!({"error": "confirmation required"}));
    }
    // The sixth is refused unchecked, with the wait.
    let (a, head) =
        ops.call_with_headers("POST", "/v1/keys", Some(&body), Some(&wrong_code(&totp, 5)));
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.body, json!({"error": "too many failed confirmations"}));
    let wait = retry_after(&head).expect("Retry-After on a 429");
    assert!((1..=30).contains(&wait), "Retry-After {wait}: {head}");

    // The right code during the lockout: still 429, nothing created.
    let right = totp.code_at(unix_now());
    let (a, head) = ops.call_with_headers("POST", "/v1/keys", Some(&body), Some(&right));
    assert_eq!(
        a.status, 429,
        "a correct code does not lift the lockout: {a:?}"
    );
    assert!(retry_after(&head).is_some(), "{head}");
    assert_eq!(keys_now(), 1, "nothing was created");
    // The same principal from another address (loopback, through the CLI) is
    // locked out too: the throttle is per principal as well as per address.
    let (code, out, err) = cli(
        &s,
        &[
            "create",
            "--name",
            "CI",
            "--allow",
            SEEN,
            "--confirm",
            &right,
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("429 too many failed confirmations"), "{err}");
    // Writes that need no code, and reads, go on.
    assert_eq!(ops.get("/v1/keys").status, 200);

    // Audited: one row per locked subject, belonging to no key.
    let rows = lockout_rows(&s);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let mut scopes: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["after"]["scope"].as_str())
        .collect();
    scopes.sort_unstable();
    assert_eq!(scopes, ["address", "principal"], "{rows:?}");
    for r in &rows {
        assert_eq!(r["principal"], "admin:ops", "{r}");
        assert_eq!(r["address"], OPS, "{r}");
        assert_eq!(r["key_id"], Value::Null, "{r}");
        assert_eq!(r["before"], Value::Null, "{r}");
        assert_eq!(r["after"]["reason"], "confirm", "{r}");
        assert_eq!(r["after"]["seconds"], 30, "{r}");
        assert_eq!(r["after"]["lockouts_in_a_row"], 1, "{r}");
    }
    let subjects: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["after"]["subject"].as_str())
        .collect();
    assert!(
        subjects.contains(&OPS) && subjects.contains(&"admin:ops"),
        "{rows:?}"
    );
    // Counted.
    let failures = "keyfence_management_auth_failures_total";
    assert!((metric_with(&s, failures, "reason", "confirm") - 5.0).abs() < 0.5);
    let lockouts = "keyfence_management_lockouts_total";
    assert!((metric_with(&s, lockouts, "reason", "confirm") - 2.0).abs() < 0.5);
    let throttled = "keyfence_management_throttled_total";
    assert!(metric_with(&s, throttled, "reason", "confirm") >= 3.0);
    // Refusals are logged through the rate limiter, not one WARN per guess
    // without bound (6 attempts here: all fit in the burst).
    assert!(s.agent.log().contains("management lockout started"));

    // Once the lockout is over, a correct code works.
    thread::sleep(Duration::from_secs(wait + 1));
    let a = ops.call(
        "POST",
        "/v1/keys",
        Some(&body),
        Some(&totp.code_at(unix_now())),
    );
    assert_eq!(a.status, 201, "after the lockout: {a:?}");
    assert_eq!(keys_now(), 2);
}

#[test]
fn guessing_bearer_tokens_locks_out_that_address_only() {
    let s = Scenario::new(false);
    // Requests without a token guess nothing and are not counted.
    let anonymous = s.caller(OUTSIDER, "");
    for _ in 0..10 {
        assert_eq!(anonymous.get("/v1/keys").status, 401);
    }
    for i in 0..5 {
        let a = s
            .caller(OPS, &format!("guess-{i}-0123456789abcdef"))
            .get("/v1/keys");
        assert_eq!(a.status, 401, "guess {i}: {a:?}");
        assert_eq!(a.body, json!({"error": "invalid management token"}));
    }
    let (a, head) = s
        .caller(OPS, "guess-5-0123456789abcdef")
        .call_with_headers("GET", "/v1/keys", None, None);
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.body, json!({"error": "too many failed authentications"}));
    let wait = retry_after(&head).expect("Retry-After on a 429");
    assert!((1..=30).contains(&wait), "Retry-After {wait}: {head}");
    // Even the valid token is refused from that address…
    let a = s.ops().get("/v1/keys");
    assert_eq!(a.status, 429, "a valid token during the lockout: {a:?}");
    // …and only from that one: other addresses are not affected.
    assert_eq!(
        s.caller(OUTSIDER, "guess-6-0123456789abcdef")
            .get("/v1/keys")
            .status,
        401
    );
    let (code, out, err) = cli(&s, &["list"]);
    assert_eq!(code, 0, "ops from loopback: {out}{err}");

    let rows = lockout_rows(&s);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["principal"], "unauthenticated");
    assert_eq!(rows[0]["address"], OPS);
    assert_eq!(rows[0]["after"]["reason"], "token");
    assert_eq!(rows[0]["after"]["scope"], "address");
    let failures = "keyfence_management_auth_failures_total";
    assert!((metric_with(&s, failures, "reason", "token") - 6.0).abs() < 0.5);
    let lockouts = "keyfence_management_lockouts_total";
    assert!((metric_with(&s, lockouts, "reason", "token") - 1.0).abs() < 0.5);
    let throttled = "keyfence_management_throttled_total";
    assert!((metric_with(&s, throttled, "reason", "token") - 2.0).abs() < 0.5);

    thread::sleep(Duration::from_secs(wait + 1));
    assert_eq!(s.ops().get("/v1/keys").status, 200, "after the lockout");
}

#[test]
fn names_with_control_characters_are_refused_and_escaped_on_output() {
    let mut s = Scenario::new(false);
    let ops = s.ops();
    let (id, _) = ops.create(&json!({"name": "kept", "ip_allow_list": [SEEN]}));
    let before = ops.get("/v1/keys").body;
    let path = format!("/v1/keys/{id}");
    for (name, code) in [
        ("red\u{1b}[31m", "U+001B"),
        ("two\nlines", "U+000A"),
        ("carriage\rreturn", "U+000D"),
        ("nul\u{0}byte", "U+0000"),
        ("tab\there", "U+0009"),
        ("del\u{7f}", "U+007F"),
        ("c1 csi\u{9b}2J", "U+009B"),
        ("\u{202e}gpj.exe", "U+202E"),
        ("embed\u{202a}ding", "U+202A"),
        ("iso\u{2066}late\u{2069}", "U+2066"),
        ("zero\u{200b}width", "U+200B"),
        ("bom\u{feff}", "U+FEFF"),
        ("line\u{2028}separator", "U+2028"),
    ] {
        // serde_json escapes C0 controls (so no NUL reaches curl's argv).
        let created = json!({ "name": name }).to_string();
        let a = ops.call("POST", "/v1/keys", Some(&created), None);
        assert_eq!(a.status, 422, "create {name:?}: {a:?}");
        let message = a.body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("control or formatting characters") && message.contains(code),
            "create {name:?}: {a:?}"
        );
        let a = ops.call("PATCH", &path, Some(&created), None);
        assert_eq!(a.status, 422, "rename {name:?}: {a:?}");
    }
    assert_eq!(ops.get("/v1/keys").body, before, "nothing stored");
    assert_eq!(ops.audit_of(&id).len(), 1, "nothing audited but the create");

    // A name stored before the rule (written into the store directly) is
    // printed escaped by `keyfence keys list`.
    s.agent.sigterm().expect("stopping keyfence");
    {
        let mut store = SqliteStore::open(&s.agent.store_path()).expect("the store");
        store
            .create(
                Key {
                    id: "key_oldcontrolname".into(),
                    name: "old\u{1b}[2J\u{1b}[31m\nfake row\u{202e}".into(),
                    tenant: "default".into(),
                    scopes: keyfence::keys::Scopes::API,
                    digest: keyfence::keys::credentials::digest("kf_old_control_name_0123456789"),
                    allow: keyfence::allowlist::AllowList::default(),
                    report_only: false,
                    origin: Origin::Store,
                },
                &Actor {
                    principal: "admin:ops".into(),
                    address: ip(OPS),
                },
                SystemTime::now(),
            )
            .expect("writing an old-style name");
    }
    s.agent.spawn().expect("restarting keyfence");
    s.agent
        .wait_ready(Duration::from_secs(30))
        .expect("keyfence is ready");
    let (code, out, err) = cli(&s, &["list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.chars()
            .any(|c| c.is_control() && c != '\n' || c == '\u{202e}'),
        "raw control characters in {out:?}"
    );
    assert_eq!(
        out.lines().count(),
        4,
        "header, neighbour, kept, old: {out}"
    );
    assert!(
        out.contains("old\\u{1b}[2J\\u{1b}[31m\\u{a}fake row\\u{202e}"),
        "{out}"
    );
}

/// A small tmpfs mounted on a fresh directory; unmounted and removed on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn new(size: &str) -> Self {
        static MOUNTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MOUNTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("kf-e2e-tmpfs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the mount point");
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .expect("running mount");
        assert!(status.success(), "mount -t tmpfs: {status}");
        Self(dir)
    }

    /// Write zeros to `file` until the file system is full.
    fn fill(&self, file: &str) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.0.join(file)).expect("creating the filler");
        let chunk = vec![0u8; 4096];
        for _ in 0..100_000 {
            if f.write_all(&chunk).is_err() {
                return;
            }
        }
        panic!("the tmpfs never filled up");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_answers_507_changes_nothing_and_keeps_serving() {
    // Declared first, dropped last: the agent stops before the unmount.
    let disk = Tmpfs::new("4m");
    let s = Scenario::build(false, "auto", Some(&disk.0.join("keyfence.db")));
    let ops = s.ops();
    let (id, secret) = ops.create(&json!({"name": "kept", "ip_allow_list": [SEEN]}));
    let before = ops.get("/v1/keys").body;
    let audit_before = ops.get("/v1/audit").body;

    disk.fill("filler");
    let long: Vec<String> = (0..1000u32)
        .map(|i| format!("198.51.{}.{}", 100 + i / 250, i % 250 + 1))
        .collect();
    let big = json!({"name": "big", "ip_allow_list": long}).to_string();
    let a = ops.call("POST", "/v1/keys", Some(&big), None);
    assert_eq!(a.status, 507, "{a:?}");
    assert_eq!(a.body, json!({"error": "store full"}));
    let patch = json!({"ip_allow_list": long}).to_string();
    let a = ops.call("PATCH", &format!("/v1/keys/{id}"), Some(&patch), None);
    assert_eq!(a.status, 507, "{a:?}");

    // Nothing changed, reads are served, the old lists are enforced.
    assert_eq!(ops.get("/v1/keys").body, before, "nothing stored");
    assert_eq!(ops.get("/v1/audit").body, audit_before, "nothing audited");
    assert_status(&s.request(SEEN, &secret), 200, "the key still works");
    assert_status(
        &s.request(SEEN_TOO, &secret),
        403,
        "and is still restricted",
    );
    s.assert_dropped(DROPPED, &secret, "the datapath is unchanged");
    assert!(
        s.agent.log().contains("key store full"),
        "{}",
        s.agent.log()
    );

    // Room again: the same write succeeds.
    std::fs::remove_file(disk.0.join("filler")).expect("removing the filler");
    let a = ops.call("POST", "/v1/keys", Some(&big), None);
    assert_eq!(a.status, 201, "{a:?}");
}

/// `report_only` through the API: a key switched to report-only passes its
/// unlisted addresses in both layers (its listener opens at packet level) and
/// counts `outcome="report_only"`; switched back, the same address is refused
/// by the shim and dropped by the datapath again.
#[test]
fn report_only_through_the_api_reports_instead_of_refusing_in_both_layers() {
    let s = Scenario::new(false);
    let ops = s.ops();
    let (id, secret) = ops.create(&json!({"name": "trial", "ip_allow_list": [SEEN]}));
    assert_status(&s.request(SEEN_TOO, &secret), 403, "unlisted, enforcing");
    s.assert_dropped(DROPPED, &secret, "unlisted and in no list, enforcing");

    let path = format!("/v1/keys/{id}");
    let on = ops.call("PATCH", &path, Some(r#"{"report_only": true}"#), None);
    assert_eq!(on.status, 200, "{on:?}");
    assert_eq!(on.body["report_only"], true, "{on:?}");
    let reported = s.metric_with_outcome("report_only");
    assert_status(&s.request(SEEN_TOO, &secret), 200, "unlisted, report-only");
    assert_status(
        &s.request(DROPPED, &secret),
        200,
        "report-only opens the datapath too",
    );
    let counted = s.metric_with_outcome("report_only") - reported;
    assert!(
        (counted - 2.0).abs() < 0.5,
        "report_only counted {counted}, not 2"
    );
    assert_eq!(ops.get(&path).body["report_only"], true);

    let off = ops.call("PATCH", &path, Some(r#"{"report_only": false}"#), None);
    assert_eq!(off.status, 200, "{off:?}");
    assert_status(&s.request(SEEN_TOO, &secret), 403, "enforcing again");
    s.assert_dropped(DROPPED, &secret, "enforcing again, datapath");
    assert_status(&s.request(SEEN, &secret), 200, "its own address all along");
    let actions: Vec<String> = ops
        .audit_of(&id)
        .iter()
        .filter_map(|e| e["action"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(actions.len(), 3, "create and two updates: {actions:?}");
}

/// The CLI's `--confirm` against an agent that requires step-up: without it
/// a write that sets an allow list fails (exit 1, the API's reason) and
/// changes nothing; with the current code it works; `KEYFENCE_CONFIRM` is the
/// same option.
#[test]
fn the_cli_sends_the_step_up_code_with_confirm() {
    let s = Scenario::new(true);
    let totp = Confirmer::from_base32(TOTP_SECRET).expect("the test secret");
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    let keys = |s: &Scenario| {
        s.ops().get("/v1/keys").body["keys"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let before = keys(&s);
    let (code, out, err) = cli(&s, &["create", "--name", "CI", "--allow", SEEN]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("confirmation required"), "{err}");
    assert_eq!(keys(&s), before, "nothing was created");
    let (code, out, err) = cli(
        &s,
        &[
            "create",
            "--name",
            "CI",
            "--allow",
            SEEN,
            "--confirm",
            "000000",
        ],
    );
    assert_eq!(code, 1, "a wrong code: {out}{err}");
    assert_eq!(keys(&s), before, "nothing was created");

    // Two writes need two codes (a code works once): wait for a fresh step.
    let into_step = now() % STEP_SECONDS;
    if into_step > STEP_SECONDS - 5 {
        thread::sleep(Duration::from_secs(STEP_SECONDS - into_step + 1));
    }
    let (code, out, err) = cli(
        &s,
        &[
            "create",
            "--name",
            "CI",
            "--allow",
            SEEN,
            "--json",
            "--confirm",
            &totp.code_at(now()),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let created: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let id = created["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert_status(&s.request(SEEN, &secret), 200, "created with --confirm");

    thread::sleep(Duration::from_secs(STEP_SECONDS - now() % STEP_SECONDS + 1));
    let out = s
        .lab
        .gateway
        .command(keyfence_tests::netns::keyfence_bin().expect("the keyfence binary"))
        .args(["keys", "update", &id, "--allow", SEEN_TOO])
        .env("KEYFENCE_API", format!("http://127.0.0.1:{MANAGEMENT}"))
        .env("KEYFENCE_TOKEN", OPS_TOKEN)
        .env("KEYFENCE_CONFIRM", totp.code_at(now()))
        .output()
        .expect("running keyfence keys");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_status(
        &s.request(SEEN_TOO, &secret),
        200,
        "updated with KEYFENCE_CONFIRM",
    );
    assert_status(
        &s.request(SEEN, &secret),
        403,
        "updated with KEYFENCE_CONFIRM",
    );
}

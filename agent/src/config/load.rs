//! YAML → validated [`Config`], or every error found, each located as
//! `FILE:LINE:COL: field.path: message` (SPEC §1, STYLE rule 7).

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, de};
use serde_saphyr::{Location, Spanned};

use super::shape;

use super::model::{
    Admin, AttachMode, ClientIp, ClientIpSource, Config, ConsoleConfig, DEFAULT_UPSTREAM_TIMEOUT,
    DatapathConfig, FleetConfig, KeySecret, ListenerConfig, ListenerMode, ManagementConfig,
    MapCapacity, MetricsConfig, PostgresConfig, PostgresUrl, Rejection, ShimConfig, StaticKey,
    StoreConfig, TcAttach, TlsConfig, Unparsed,
};
use crate::{
    allowlist::{AllowList, DEFAULT_MAX_ENTRIES, Net, RawList, fold_ip, parse_entry, parse_list},
    keys::validate,
    secret_env::{self, EnvSecret},
};

/// One located problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: u64,
    pub col: u64,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, self.path, self.message
        )
    }
}

/// Every problem of one file, in file order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The whole file. A listener or key left out of the value pass (its shape
/// is wrong, see [`shape::Skip`]) is a `None` that keeps the others' indices.
#[derive(Default)]
struct RawConfig {
    store: Option<RawStore>,
    datapath: Option<RawDatapath>,
    listeners: Vec<Option<Spanned<RawListener>>>,
    keys: Vec<Option<Spanned<RawKey>>>,
    rejection: Option<RawRejection>,
    management: Option<RawManagement>,
    metrics: Option<RawMetrics>,
    shim: Option<RawShim>,
    fleet: Option<RawFleet>,
}

impl RawConfig {
    const FIELDS: &[&str] = &[
        "store",
        "datapath",
        "listeners",
        "keys",
        "rejection",
        "management",
        "metrics",
        "shim",
        "fleet",
    ];
}

/// Reads [`RawConfig`] without the parts in the [`shape::Skip`]: those are
/// consumed unread, so the rest is checked although they would not
/// deserialize. With nothing to skip it reads as a derived
/// `deny_unknown_fields` struct would.
struct ConfigSeed<'a>(&'a shape::Skip);

impl<'de> Deserialize<'de> for RawConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::DeserializeSeed::deserialize(ConfigSeed(&shape::Skip::default()), d)
    }
}

impl<'de> de::DeserializeSeed<'de> for ConfigSeed<'_> {
    type Value = RawConfig;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<RawConfig, D::Error> {
        d.deserialize_struct("RawConfig", RawConfig::FIELDS, self)
    }
}

impl<'de> de::Visitor<'de> for ConfigSeed<'_> {
    type Value = RawConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a keyfence configuration")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawConfig, A::Error> {
        let mut raw = RawConfig::default();
        while let Some(key) = map.next_key::<String>()? {
            if self.0.section(&key) {
                map.next_value::<de::IgnoredAny>()?;
                continue;
            }
            match key.as_str() {
                "store" => raw.store = map.next_value()?,
                "datapath" => raw.datapath = map.next_value()?,
                "listeners" => {
                    raw.listeners = map.next_value_seed(Items::new(&self.0.listeners))?;
                }
                "keys" => raw.keys = map.next_value_seed(Items::new(&self.0.keys))?,
                "rejection" => raw.rejection = map.next_value()?,
                "management" => raw.management = map.next_value()?,
                "metrics" => raw.metrics = map.next_value()?,
                "shim" => raw.shim = map.next_value()?,
                "fleet" => raw.fleet = map.next_value()?,
                other => return Err(de::Error::unknown_field(other, RawConfig::FIELDS)),
            }
        }
        Ok(raw)
    }
}

/// A list whose items at the indices in `skip` are consumed unread (`None`).
struct Items<'a, T> {
    skip: &'a BTreeSet<usize>,
    item: std::marker::PhantomData<T>,
}

impl<'a, T> Items<'a, T> {
    fn new(skip: &'a BTreeSet<usize>) -> Self {
        Self {
            skip,
            item: std::marker::PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> de::DeserializeSeed<'de> for Items<'_, T> {
    type Value = Vec<Option<Spanned<T>>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Items<'_, T> {
    type Value = Vec<Option<Spanned<T>>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let item = if self.skip.contains(&out.len()) {
                seq.next_element::<de::IgnoredAny>()?.map(|_| None)
            } else {
                seq.next_element::<Spanned<T>>()?.map(Some)
            };
            match item {
                Some(item) => out.push(item),
                None => return Ok(out),
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<Spanned<String>>,
    postgres: Option<Spanned<RawPostgres>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: Option<Spanned<String>>,
    url_env: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    host_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    live_after: Option<Spanned<String>>,
    wait_timeout: Option<Spanned<String>>,
    poll: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    mode: Option<Spanned<String>>,
    pin_path: Option<Spanned<String>>,
    unparsed: Option<Spanned<String>>,
    capacity: Option<RawCapacity>,
    tc_attach: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    exact: Option<Spanned<u32>>,
    prefixes: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    bind: Spanned<String>,
    mode: Spanned<String>,
    upstream: Option<Spanned<String>>,
    upstream_timeout: Option<Spanned<String>>,
    upstream_ca: Option<Spanned<String>>,
    tls: Option<RawTls>,
    client_ip: Option<RawClientIp>,
    early_drop: Option<bool>,
    tenants: Option<Vec<String>>,
    key_header: Option<Spanned<String>>,
    forward_credential: Option<Spanned<bool>>,
    connections: Option<RawConnections>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnections {
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_per_source: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientIp {
    source: Option<Spanned<String>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    hops: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: Spanned<String>,
    /// Optional: the id when absent.
    name: Option<Spanned<String>>,
    tenant: Option<Spanned<String>>,
    scopes: Option<Spanned<Vec<String>>>,
    secret_sha256: Option<Spanned<String>>,
    secret_env: Option<Spanned<String>>,
    ip_allow_list: Option<Spanned<RawList>>,
    report_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRejection {
    status: Option<Spanned<u16>>,
    body: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManagement {
    bind: Option<Spanned<String>>,
    #[serde(default)]
    admins: Vec<Spanned<RawAdmin>>,
    confirm: Option<RawConfirm>,
    console: Option<RawConsole>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    idle_timeout: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    name: String,
    token_sha256: Option<Spanned<String>>,
    token_env: Option<Spanned<String>>,
    ip_allow_list: Option<Spanned<RawList>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfirm {
    totp_secret_env: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShim {
    workers: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    bind: Option<Spanned<String>>,
}

/// Whether loading also checks the variables the config names for secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    /// Only the file (`run` reads them at start; reloads do not change them).
    Unchecked,
    /// Each `secret_env`, `token_env` and `totp_secret_env` variable must be
    /// set and hold what `run` accepts (`keyfence check` without `--skip-env`).
    Checked,
}

/// Collects errors with their file.
struct Errors {
    file: String,
    list: Vec<ConfigError>,
    secrets: Secrets,
}

impl Errors {
    /// The variable `var` named at `loc` (field `path`) against the rules of
    /// [`secret_env`], when secrets are checked.
    fn secret_env(&mut self, loc: &Location, path: String, var: &str, kind: EnvSecret) {
        if self.secrets == Secrets::Checked
            && let Err(e) = secret_env::read(var, kind)
        {
            self.at(loc, path, e.to_string());
        }
    }

    /// A key secret or token named by the variable in `env` (field `path`),
    /// checked as [`Self::secret_env`] says.
    fn env_secret(&mut self, env: &Spanned<String>, path: String) -> KeySecret {
        let var = env.value.trim();
        self.secret_env(&env.referenced, path, var, EnvSecret::Secret);
        KeySecret::Env(var.to_owned())
    }

    fn at(&mut self, loc: &Location, path: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.clone(),
            line: loc.line(),
            col: loc.column(),
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Read and validate `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, Secrets::Unchecked)
}

/// Read and validate `path`, and with [`Secrets::Checked`] the variables it
/// names for secrets.
pub fn load_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_with(&text, &file, secrets),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: 0,
            col: 0,
            path: "(file)".into(),
            message: format!("cannot read: {e}"),
        }])),
    }
}

/// Validate YAML `text` that came from `file` (used in messages). The shape
/// pass runs first; the value pass then checks every part whose shape is
/// right, so one run reports the mistakes of both (`check` prints them in
/// file order).
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    parse_with(text, file, Secrets::Unchecked)
}

/// [`parse`], and with [`Secrets::Checked`] the variables the text names for
/// secrets.
pub fn parse_with(text: &str, file: &str, secrets: Secrets) -> Result<Config, ConfigErrors> {
    let mut errors = Errors {
        file: file.into(),
        list: Vec::new(),
        secrets,
    };
    let mistakes = serde_saphyr::from_str::<Spanned<shape::Node>>(text).map_or_else(
        |_| Vec::new(),
        |tree| {
            let mut mistakes = Vec::new();
            shape::check(&tree, &shape::CONFIG, "", &mut mistakes);
            mistakes
        },
    );
    let skip = shape::Skip::of(&mistakes);
    let shaped = !mistakes.is_empty();
    for m in mistakes {
        errors.at(&m.at, m.path, m.message);
    }
    let raw = skip.map(|skip| {
        serde_saphyr::with_deserializer_from_str(text, |d| {
            de::DeserializeSeed::deserialize(ConfigSeed(&skip), d)
        })
    });
    match raw {
        Some(Ok(raw)) => {
            let config = validate(raw, &mut errors);
            if errors.list.is_empty() {
                return Ok(config);
            }
        }
        Some(Err(e)) if !shaped => {
            let (line, col) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let rendered = e.without_snippet().to_string();
            let first = rendered.lines().next().unwrap_or("invalid YAML").trim();
            // The position is already in the prefix.
            let message = first
                .rfind(" at line ")
                .map_or(first, |i| &first[..i])
                .to_string();
            return Err(ConfigErrors(vec![ConfigError {
                file: file.into(),
                line,
                col,
                path: "(yaml)".into(),
                message,
            }]));
        }
        // The shape mistakes say what is wrong; the file's top is not a
        // mapping, or what they left could not be read (say an alias into a
        // part left out).
        None | Some(Err(_)) => {}
    }
    errors.list.sort_by_key(|e| (e.line, e.col));
    Err(ConfigErrors(errors.list))
}

fn validate(raw: RawConfig, errors: &mut Errors) -> Config {
    let store = match raw.store {
        Some(RawStore {
            path,
            postgres: Some(pg),
        }) => {
            if let Some(p) = path {
                errors.at(
                    &p.referenced,
                    "store.path",
                    "store.path and store.postgres exclude each other: pick one",
                );
            }
            StoreConfig {
                postgres: postgres(pg, errors),
                ..default_store()
            }
        }
        Some(RawStore {
            path: Some(p),
            postgres: None,
        }) => StoreConfig {
            path: PathBuf::from(p.value),
            postgres: None,
        },
        _ => default_store(),
    };
    let fleet = fleet(raw.fleet, errors);
    let datapath = datapath(raw.datapath, errors);
    let listeners = listeners(raw.listeners, errors);
    let keys = keys(raw.keys, errors);
    if datapath.mode != AttachMode::Off
        && datapath.interfaces.is_empty()
        && listeners.iter().any(|l| l.early_drop)
    {
        tracing::warn!(
            "datapath.interfaces is empty: listeners with early_drop are enforced by the shim only"
        );
    }
    let rejection = match raw.rejection {
        None => default_rejection(),
        Some(r) => {
            let status = match r.status {
                Some(s) if (400..=599).contains(&s.value) => s.value,
                Some(s) => {
                    errors.at(
                        &s.referenced,
                        "rejection.status",
                        format!("status {} is not an HTTP error status (400-599)", s.value),
                    );
                    403
                }
                None => 403,
            };
            Rejection {
                status,
                body: r.body.unwrap_or_else(|| default_rejection().body),
            }
        }
    };
    let management = management(raw.management, errors);
    let metrics = MetricsConfig {
        bind: raw
            .metrics
            .and_then(|m| m.bind)
            .and_then(|b| socket_addr(&b, "metrics.bind", errors))
            .unwrap_or_else(|| "127.0.0.1:9901".parse().expect("constant")),
    };
    let shim = shim(raw.shim, errors);
    Config {
        store,
        datapath,
        listeners,
        keys,
        rejection,
        management,
        metrics,
        shim,
        fleet,
    }
}

/// `shim` (defaults: [`ShimConfig::default`]).
fn shim(raw: Option<RawShim>, errors: &mut Errors) -> ShimConfig {
    let mut shim = ShimConfig::default();
    if let Some(w) = raw.and_then(|r| r.workers) {
        match usize::try_from(w.value) {
            Ok(n) if (1..=ShimConfig::MAX_WORKERS).contains(&n) => shim.workers = n,
            _ => errors.at(
                &w.referenced,
                "shim.workers",
                format!("{} is outside 1..{}", w.value, ShimConfig::MAX_WORKERS),
            ),
        }
    }
    shim
}

fn default_store() -> StoreConfig {
    StoreConfig {
        path: PathBuf::from("/var/lib/keyfence/keyfence.db"),
        postgres: None,
    }
}

/// `store.postgres`: exactly one of `url` and `url_env`; `host_id` defaults
/// to the hostname.
fn postgres(raw: Spanned<RawPostgres>, errors: &mut Errors) -> Option<PostgresConfig> {
    let at = raw.referenced;
    let raw = raw.value;
    let url = match (raw.url, raw.url_env) {
        (Some(u), None) => {
            let text = u.value.trim();
            if !(text.starts_with("postgres://") || text.starts_with("postgresql://"))
                || text.parse::<tokio_postgres::Config>().is_err()
            {
                errors.at(
                    &u.referenced,
                    "store.postgres.url",
                    "not a PostgreSQL URL (postgres://user@host:port/database)",
                );
                return None;
            }
            PostgresUrl::Inline(text.to_owned())
        }
        (None, Some(var)) if !var.value.trim().is_empty() => {
            let name = var.value.trim().to_owned();
            if errors.secrets == Secrets::Checked && std::env::var_os(&name).is_none() {
                errors.at(
                    &var.referenced,
                    "store.postgres.url_env",
                    format!("the variable {name} is not set"),
                );
            }
            PostgresUrl::Env(name)
        }
        _ => {
            errors.at(
                &at,
                "store.postgres",
                "needs exactly one of url and url_env",
            );
            return None;
        }
    };
    let host_id = match raw.host_id {
        Some(h) => {
            let id = h.value.trim();
            if id.is_empty()
                || id.len() > 128
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                errors.at(
                    &h.referenced,
                    "store.postgres.host_id",
                    "1 to 128 characters of letters, digits, '-', '_', '.' and ':'",
                );
            }
            id.to_owned()
        }
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into()),
    };
    Some(PostgresConfig {
        url,
        ca_file: raw.ca_file.map(|c| PathBuf::from(c.value.trim())),
        host_id,
    })
}

/// `fleet`: durations as elsewhere (`10`, `10s`, `500ms`).
fn fleet(raw: Option<RawFleet>, errors: &mut Errors) -> FleetConfig {
    let mut fleet = FleetConfig::default();
    let Some(raw) = raw else {
        return fleet;
    };
    for (value, path, slot) in [
        (raw.live_after, "fleet.live_after", &mut fleet.live_after),
        (
            raw.wait_timeout,
            "fleet.wait_timeout",
            &mut fleet.wait_timeout,
        ),
        (raw.poll, "fleet.poll", &mut fleet.poll),
    ] {
        if let Some(d) = value.and_then(|v| duration(&v, path, errors)) {
            *slot = d;
        }
    }
    fleet
}

fn default_rejection() -> Rejection {
    Rejection {
        status: 403,
        body: r#"{"error":"IP address not allowed"}"#.into(),
    }
}

fn socket_addr(s: &Spanned<String>, path: &str, errors: &mut Errors) -> Option<SocketAddr> {
    let parsed = s.value.trim().parse::<SocketAddr>();
    if parsed.is_err() {
        errors.at(
            &s.referenced,
            path,
            format!(
                "{:?} is not ADDR:PORT (IPv6 in brackets: \"[::]:8443\")",
                s.value
            ),
        );
    }
    parsed.ok()
}

fn datapath(raw: Option<RawDatapath>, errors: &mut Errors) -> DatapathConfig {
    let Some(raw) = raw else {
        return DatapathConfig {
            interfaces: Vec::new(),
            mode: AttachMode::Auto,
            pin_path: PathBuf::from("/sys/fs/bpf/keyfence"),
            capacity: MapCapacity::default(),
            unparsed: Unparsed::Pass,
            tc_attach: TcAttach::Auto,
        };
    };
    let mode = match raw.mode.as_ref().map(|m| m.value.as_str()) {
        None | Some("auto") => AttachMode::Auto,
        Some("native") => AttachMode::Native,
        Some("generic") => AttachMode::Generic,
        Some("tc") => AttachMode::Tc,
        Some("off") => AttachMode::Off,
        Some(other) => {
            let loc = &raw.mode.as_ref().expect("matched Some").referenced;
            errors.at(
                loc,
                "datapath.mode",
                format!("unknown mode {other:?}; expected auto, native, generic, tc or off"),
            );
            AttachMode::Auto
        }
    };
    let mut interfaces = Vec::new();
    for (i, iface) in raw.interfaces.into_iter().enumerate() {
        let name = iface.value.trim();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            errors.at(
                &iface.referenced,
                format!("datapath.interfaces[{i}]"),
                format!("{name:?} is not an interface name"),
            );
        } else if interfaces.iter().any(|n| n == name) {
            errors.at(
                &iface.referenced,
                format!("datapath.interfaces[{i}]"),
                format!("interface {name} is listed twice"),
            );
        } else {
            interfaces.push(name.to_string());
        }
    }
    let max = keyfence_common::stats::MAX_IFACE_SLOTS as usize - 1;
    if interfaces.len() > max {
        errors.list.push(ConfigError {
            file: errors.file.clone(),
            line: 0,
            col: 0,
            path: "datapath.interfaces".into(),
            message: format!("at most {max} interfaces are supported"),
        });
    }
    let pin_path = match raw.pin_path {
        Some(p) if Path::new(&p.value).is_absolute() => PathBuf::from(p.value),
        Some(p) => {
            errors.at(
                &p.referenced,
                "datapath.pin_path",
                "must be an absolute path",
            );
            PathBuf::from("/sys/fs/bpf/keyfence")
        }
        None => PathBuf::from("/sys/fs/bpf/keyfence"),
    };
    let unparsed = unparsed(raw.unparsed.as_ref(), errors);
    DatapathConfig {
        interfaces,
        mode,
        pin_path,
        capacity: capacity(raw.capacity, errors),
        unparsed,
        tc_attach: tc_attach(raw.tc_attach.as_ref(), errors),
    }
}

/// `datapath.tc_attach`: `auto` (default), `tcx` or `netlink`.
fn tc_attach(raw: Option<&Spanned<String>>, errors: &mut Errors) -> TcAttach {
    match raw.map(|r| r.value.as_str()) {
        None | Some("auto") => TcAttach::Auto,
        Some("tcx") => TcAttach::Tcx,
        Some("netlink") => TcAttach::Netlink,
        Some(other) => {
            errors.at(
                &raw.expect("matched Some").referenced,
                "datapath.tc_attach",
                format!("unknown value {other:?}; expected auto, tcx or netlink"),
            );
            TcAttach::Auto
        }
    }
}

/// `datapath.unparsed`: `pass` (default) or `drop`.
fn unparsed(raw: Option<&Spanned<String>>, errors: &mut Errors) -> Unparsed {
    match raw.map(|r| r.value.as_str()) {
        None | Some("pass") => Unparsed::Pass,
        Some("drop") => Unparsed::Drop,
        Some(other) => {
            errors.at(
                &raw.expect("matched Some").referenced,
                "datapath.unparsed",
                format!("unknown value {other:?}; expected pass or drop"),
            );
            Unparsed::Pass
        }
    }
}

/// `datapath.capacity`: each size from 1 to [`MapCapacity::MAX`], defaults
/// the built-in sizes.
fn capacity(raw: Option<RawCapacity>, errors: &mut Errors) -> MapCapacity {
    let default = MapCapacity::default();
    let Some(raw) = raw else {
        return default;
    };
    let mut size = |v: Option<Spanned<u32>>, field: &str, fallback: u32| match v {
        None => fallback,
        Some(v) if (1..=MapCapacity::MAX).contains(&v.value) => v.value,
        Some(v) => {
            errors.at(
                &v.referenced,
                format!("datapath.capacity.{field}"),
                format!(
                    "{} is out of range: from 1 to {} entries",
                    v.value,
                    MapCapacity::MAX
                ),
            );
            fallback
        }
    };
    MapCapacity {
        exact: size(raw.exact, "exact", default.exact),
        prefixes: size(raw.prefixes, "prefixes", default.prefixes),
    }
}

/// Parse trusted proxies (canonical CIDR rules; the whole Internet is refused).
fn trusted_proxies(raw: &[Spanned<String>], path: &str, errors: &mut Errors) -> Vec<Net> {
    let mut out = Vec::new();
    for (i, entry) in raw.iter().enumerate() {
        match parse_entry(&entry.value) {
            Ok(net) if net.prefix_len() == 0 => errors.at(
                &entry.referenced,
                format!("{path}[{i}]"),
                format!("{net} trusts every address: any client could forge its address"),
            ),
            Ok(net) => out.push(net),
            Err(reason) => errors.at(
                &entry.referenced,
                format!("{path}[{i}]"),
                reason.to_string(),
            ),
        }
    }
    Net::aggregate(&out)
}

fn conflicts(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let (ia, ib) = (fold_ip(a.ip()), fold_ip(b.ip()));
    let dual = |ip: IpAddr| matches!(ip, IpAddr::V6(v6) if v6.is_unspecified());
    ia == ib
        || ia.is_unspecified() && (dual(ia) || ib.is_ipv4())
        || ib.is_unspecified() && (dual(ib) || ia.is_ipv4())
}

#[expect(
    clippy::too_many_lines,
    reason = "one pass over a listener's fields, in file order"
)]
fn listeners(raw: Vec<Option<Spanned<RawListener>>>, errors: &mut Errors) -> Vec<ListenerConfig> {
    let mut out: Vec<ListenerConfig> = Vec::new();
    let max = keyfence_common::policy::MAX_LISTENERS as usize - 1;
    if raw.len() > max {
        let at = raw[max..]
            .iter()
            .flatten()
            .next()
            .map_or(Location::UNKNOWN, |l| l.referenced);
        errors.at(
            &at,
            format!("listeners[{max}]"),
            format!("at most {max} listeners are supported"),
        );
    }
    for (i, item) in raw.into_iter().enumerate() {
        // A hole: its shape is wrong, and was reported.
        let Some(item) = item else { continue };
        let p = format!("listeners[{i}]");
        let l = item.value;
        let name = l.name.value.trim().to_string();
        if name.is_empty() {
            errors.at(&l.name.referenced, format!("{p}.name"), "must not be empty");
        } else if out.iter().any(|o| o.name == name) {
            errors.at(
                &l.name.referenced,
                format!("{p}.name"),
                format!("listener name {name:?} is used twice"),
            );
        }
        let bind = socket_addr(&l.bind, &format!("{p}.bind"), errors);
        if let Some(b) = bind
            && let Some(other) = out.iter().find(|o| conflicts(o.bind, b))
        {
            errors.at(
                &l.bind.referenced,
                format!("{p}.bind"),
                format!("{b} overlaps listener {:?} on {}", other.name, other.bind),
            );
        }
        let mode = match l.mode.value.as_str() {
            "proxy" => ListenerMode::Proxy,
            "auth" => ListenerMode::Auth,
            other => {
                errors.at(
                    &l.mode.referenced,
                    format!("{p}.mode"),
                    format!("unknown mode {other:?}; expected proxy or auth"),
                );
                ListenerMode::Auth
            }
        };
        let upstream = match (mode, l.upstream) {
            (ListenerMode::Proxy, None) => {
                errors.at(
                    &item.referenced,
                    format!("{p}.upstream"),
                    "proxy mode needs an upstream (http://, h2c:// or https://host:port)",
                );
                None
            }
            (ListenerMode::Auth, Some(u)) => {
                errors.at(
                    &u.referenced,
                    format!("{p}.upstream"),
                    "auth mode answers the proxy in front; it has no upstream",
                );
                None
            }
            (ListenerMode::Proxy, Some(u)) => {
                if valid_upstream(&u.value) {
                    Some(u.value)
                } else {
                    errors.at(
                        &u.referenced,
                        format!("{p}.upstream"),
                        format!(
                            "{:?} is not an http://, h2c:// or https:// URL with a host",
                            u.value
                        ),
                    );
                    None
                }
            }
            (ListenerMode::Auth, None) => None,
        };
        let tls = l.tls.and_then(|t| tls_files(&t, &p, errors));
        let client_ip = match l.client_ip {
            None => ClientIp {
                source: ClientIpSource::Peer,
                trusted_proxies: Vec::new(),
                hops: 1,
            },
            Some(c) => {
                let source = match c.source.as_ref().map(|s| s.value.as_str()) {
                    None | Some("peer") => ClientIpSource::Peer,
                    Some("proxy_protocol") => ClientIpSource::ProxyProtocol,
                    Some("x_forwarded_for") => ClientIpSource::XForwardedFor,
                    Some(other) => {
                        errors.at(
                            &c.source.as_ref().expect("matched Some").referenced,
                            format!("{p}.client_ip.source"),
                            format!(
                                "unknown source {other:?}; expected peer, proxy_protocol or x_forwarded_for"
                            ),
                        );
                        ClientIpSource::Peer
                    }
                };
                let trusted = trusted_proxies(
                    &c.trusted_proxies,
                    &format!("{p}.client_ip.trusted_proxies"),
                    errors,
                );
                if source != ClientIpSource::Peer && c.trusted_proxies.is_empty() {
                    errors.at(
                        &item.referenced,
                        format!("{p}.client_ip.trusted_proxies"),
                        "proxy_protocol and x_forwarded_for need trusted_proxies",
                    );
                }
                ClientIp {
                    source,
                    trusted_proxies: trusted,
                    hops: c.hops.unwrap_or(1),
                }
            }
        };
        let key_header = l.key_header.and_then(|h| {
            let name = h.value.trim().to_ascii_lowercase();
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid || name == "authorization" {
                errors.at(
                    &h.referenced,
                    format!("{p}.key_header"),
                    format!("{:?} is not a usable header name", h.value),
                );
                return None;
            }
            Some(name)
        });
        let connections = connections(l.connections, &format!("{p}.connections"), errors);
        let upstream_timeout = match l.upstream_timeout {
            Some(t) if mode == ListenerMode::Auth => {
                errors.at(
                    &t.referenced,
                    format!("{p}.upstream_timeout"),
                    "auth mode has no upstream",
                );
                None
            }
            Some(t) => duration(&t, &format!("{p}.upstream_timeout"), errors),
            None => None,
        }
        .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT);
        let upstream_ca = l.upstream_ca.and_then(|ca| {
            let path = format!("{p}.upstream_ca");
            if !upstream
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
            {
                errors.at(
                    &ca.referenced,
                    path,
                    "only an https:// upstream uses a CA file",
                );
                return None;
            }
            match std::fs::File::open(&ca.value) {
                Ok(_) => Some(PathBuf::from(&ca.value)),
                Err(e) => {
                    errors.at(
                        &ca.referenced,
                        path,
                        format!("cannot read {}: {e}", ca.value),
                    );
                    None
                }
            }
        });
        let forward_credential = forward_credential(l.forward_credential, mode, &p, errors);
        if let Some(bind) = bind {
            out.push(ListenerConfig {
                name,
                bind,
                mode,
                upstream,
                upstream_timeout,
                upstream_ca,
                tls,
                client_ip,
                early_drop: l.early_drop.unwrap_or(true),
                tenants: l.tenants,
                key_header,
                connections,
                forward_credential,
            });
        }
    }
    out
}

/// Shortest and longest `header_timeout` / `idle_timeout` accepted.
const MIN_CONN_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_CONN_TIMEOUT: std::time::Duration = std::time::Duration::from_hours(24);

/// A duration: whole seconds (`10`) or with a unit (`10s`, `500ms`, `2m`).
fn duration(s: &Spanned<String>, path: &str, errors: &mut Errors) -> Option<std::time::Duration> {
    let text = s.value.trim();
    let parsed = match text.parse::<u64>() {
        Ok(secs) => Ok(std::time::Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(d) if (MIN_CONN_TIMEOUT..=MAX_CONN_TIMEOUT).contains(&d) => Some(d),
        Ok(_) => {
            errors.at(
                &s.referenced,
                path,
                format!("{text:?} is outside 100ms..24h"),
            );
            None
        }
        Err(e) => {
            errors.at(
                &s.referenced,
                path,
                format!(
                    "{text:?} is not a duration (seconds, or with a unit: \"10s\", \"500ms\"): {e}"
                ),
            );
            None
        }
    }
}

/// `listeners[].connections`; defaults from `crate::conn`.
fn connections(
    raw: Option<RawConnections>,
    path: &str,
    errors: &mut Errors,
) -> crate::conn::ConnLimits {
    let mut limits = crate::conn::ConnLimits::default();
    let Some(raw) = raw else {
        return limits;
    };
    if let Some(d) = raw
        .header_timeout
        .and_then(|h| duration(&h, &format!("{path}.header_timeout"), errors))
    {
        limits.header_timeout = d;
    }
    if let Some(d) = raw
        .idle_timeout
        .and_then(|h| duration(&h, &format!("{path}.idle_timeout"), errors))
    {
        limits.idle_timeout = d;
    }
    match raw.max_per_source {
        Some(n) if n.value == 0 => errors.at(
            &n.referenced,
            format!("{path}.max_per_source"),
            "must be at least 1",
        ),
        Some(n) => limits.max_per_source = n.value,
        None => {}
    }
    limits
}

/// `forward_credential` (default true). Only a proxy forwards anything: in
/// auth mode the proxy in front decides what its upstream receives, so the
/// field there would promise what keyfence cannot keep.
fn forward_credential(
    field: Option<Spanned<bool>>,
    mode: ListenerMode,
    p: &str,
    errors: &mut Errors,
) -> bool {
    match (field, mode) {
        (None, _) => true,
        (Some(f), ListenerMode::Proxy) => f.value,
        (Some(f), ListenerMode::Auth) => {
            errors.at(
                &f.referenced,
                format!("{p}.forward_credential"),
                "auth mode forwards nothing; set what the proxy in front passes on there",
            );
            true
        }
    }
}

fn valid_upstream(u: &str) -> bool {
    let Some(rest) = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .or_else(|| u.strip_prefix("h2c://"))
    else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    !authority.is_empty() && u.parse::<hyper::Uri>().is_ok()
}

fn keys(raw: Vec<Option<Spanned<RawKey>>>, errors: &mut Errors) -> Vec<StaticKey> {
    let mut out: Vec<StaticKey> = Vec::new();
    let mut ids: BTreeSet<String> = BTreeSet::new();
    for (i, item) in raw.into_iter().enumerate() {
        // A hole: its shape is wrong, and was reported.
        let Some(item) = item else { continue };
        let p = format!("keys[{i}]");
        let k = item.value;
        let id = k.id.value.clone();
        if let Err(e) = validate::key_id(&id) {
            errors.at(&k.id.referenced, format!("{p}.id"), e.to_string());
        } else if !ids.insert(id.clone()) {
            errors.at(
                &k.id.referenced,
                format!("{p}.id"),
                format!("key id {id:?} is used twice"),
            );
        }
        // The rules the API applies too.
        let name = match &k.name {
            Some(name) => validate::name(&name.value)
                .map_err(|e| errors.at(&name.referenced, format!("{p}.name"), e.to_string())),
            None => Ok(id.clone()),
        };
        let tenant = validate::tenant(k.tenant.as_ref().map(|t| t.value.as_str())).map_err(|e| {
            let at = k
                .tenant
                .as_ref()
                .map_or(&item.referenced, |t| &t.referenced);
            errors.at(at, format!("{p}.tenant"), e.to_string());
        });
        let scopes_at = k.scopes.as_ref().map(|s| s.referenced);
        let scopes = validate::scopes(k.scopes.map(|s| s.value)).map_err(|e| {
            errors.at(
                scopes_at.as_ref().unwrap_or(&item.referenced),
                format!("{p}.scopes"),
                e.to_string(),
            );
        });
        let secret = match (k.secret_sha256, k.secret_env) {
            (Some(h), None) => match hex::decode(h.value.trim()) {
                Ok(bytes) if bytes.len() == 32 => {
                    Some(KeySecret::Sha256(bytes.try_into().expect("32 bytes")))
                }
                _ => {
                    errors.at(
                        &h.referenced,
                        format!("{p}.secret_sha256"),
                        "must be 64 hexadecimal characters (the SHA-256 of the secret)",
                    );
                    None
                }
            },
            (None, Some(env)) if !env.value.trim().is_empty() => {
                Some(errors.env_secret(&env, format!("{p}.secret_env")))
            }
            (Some(_), Some(env)) => {
                errors.at(
                    &env.referenced,
                    format!("{p}.secret_env"),
                    "give either secret_sha256 or secret_env, not both",
                );
                None
            }
            _ => {
                errors.at(
                    &item.referenced,
                    p.clone(),
                    "needs secret_sha256 or secret_env",
                );
                None
            }
        };
        let allow = match k.ip_allow_list {
            None => AllowList::default(),
            Some(list) => match parse_list(&list.value, DEFAULT_MAX_ENTRIES) {
                Ok(l) => l,
                Err(problems) => {
                    for problem in problems {
                        errors.at(
                            &list.referenced,
                            format!("{p}.ip_allow_list"),
                            problem.to_string(),
                        );
                    }
                    AllowList::default()
                }
            },
        };
        if let (Some(secret), Ok(name), Ok(tenant), Ok(scopes)) = (secret, name, tenant, scopes) {
            out.push(StaticKey {
                id,
                name,
                tenant,
                scopes,
                secret,
                allow,
                report_only: k.report_only.unwrap_or(false),
            });
        }
    }
    out
}

fn management(raw: Option<RawManagement>, errors: &mut Errors) -> ManagementConfig {
    let default_bind: SocketAddr = "127.0.0.1:9900".parse().expect("constant");
    let Some(raw) = raw else {
        return ManagementConfig {
            bind: default_bind,
            admins: Vec::new(),
            confirm_totp_env: None,
            console: ConsoleConfig::default(),
            tls: None,
        };
    };
    let tls = raw
        .tls
        .as_ref()
        .and_then(|t| tls_files(t, "management", errors));
    let console = console(raw.console.as_ref(), errors);
    let bind = raw
        .bind
        .as_ref()
        .and_then(|b| socket_addr(b, "management.bind", errors))
        .unwrap_or(default_bind);
    let mut admins: Vec<Admin> = Vec::new();
    for (i, admin) in raw.admins.into_iter().enumerate() {
        let p = format!("management.admins[{i}]");
        let a = admin.value;
        if admins.iter().any(|o| o.name == a.name) {
            errors.at(
                &admin.referenced,
                format!("{p}.name"),
                format!("admin name {:?} is used twice", a.name),
            );
        }
        let token = match (&a.token_sha256, &a.token_env) {
            (Some(h), None) => match hex::decode(h.value.trim()) {
                Ok(b) if b.len() == 32 => Some(KeySecret::Sha256(b.try_into().expect("32 bytes"))),
                _ => {
                    errors.at(
                        &h.referenced,
                        format!("{p}.token_sha256"),
                        "must be 64 hexadecimal characters",
                    );
                    None
                }
            },
            (None, Some(env)) => Some(errors.env_secret(env, format!("{p}.token_env"))),
            _ => {
                errors.at(
                    &admin.referenced,
                    p.clone(),
                    format!(
                        "admin {:?} needs exactly one of token_sha256 or token_env",
                        a.name
                    ),
                );
                None
            }
        };
        let allow = match &a.ip_allow_list {
            None => AllowList::default(),
            Some(list) => match parse_list(&list.value, DEFAULT_MAX_ENTRIES) {
                Ok(l) => l,
                Err(problems) => {
                    for problem in problems {
                        errors.at(
                            &list.referenced,
                            format!("{p}.ip_allow_list"),
                            problem.to_string(),
                        );
                    }
                    AllowList::default()
                }
            },
        };
        if let Some(token) = token {
            admins.push(Admin {
                name: a.name,
                token,
                allow,
            });
        }
    }
    ManagementConfig {
        bind,
        admins,
        confirm_totp_env: raw.confirm.map(|c| {
            let var = c.totp_secret_env.value;
            errors.secret_env(
                &c.totp_secret_env.referenced,
                "management.confirm.totp_secret_env".into(),
                &var,
                EnvSecret::Totp,
            );
            var
        }),
        console,
        tls,
    }
}

/// A `tls: {cert, key}` section under `path`: both files must be readable.
fn tls_files(t: &RawTls, path: &str, errors: &mut Errors) -> Option<TlsConfig> {
    let mut ok = true;
    for (field, f) in [("cert", &t.cert), ("key", &t.key)] {
        if let Err(e) = std::fs::File::open(&f.value) {
            errors.at(
                &f.referenced,
                format!("{path}.tls.{field}"),
                format!("cannot read {}: {e}", f.value),
            );
            ok = false;
        }
    }
    ok.then(|| TlsConfig {
        cert: PathBuf::from(&t.cert.value),
        key: PathBuf::from(&t.key.value),
    })
}

/// `management.console`: durations, each with its default.
fn console(raw: Option<&RawConsole>, errors: &mut Errors) -> ConsoleConfig {
    let default = ConsoleConfig::default();
    let Some(raw) = raw else { return default };
    let pick = |field: &Option<Spanned<String>>, path: &str, errors: &mut Errors| {
        field.as_ref().and_then(|d| duration(d, path, errors))
    };
    ConsoleConfig {
        idle_timeout: pick(&raw.idle_timeout, "management.console.idle_timeout", errors)
            .unwrap_or(default.idle_timeout),
        max_age: pick(&raw.max_age, "management.console.max_age", errors)
            .unwrap_or(default.max_age),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"
store:
  path: /var/lib/keyfence/keyfence.db
datapath:
  interfaces: [eth0]
  mode: auto
  pin_path: /sys/fs/bpf/keyfence
listeners:
  - name: api
    bind: "[::]:8443"
    mode: proxy
    upstream: "http://127.0.0.1:8080"
    early_drop: true
    client_ip: { source: peer }
  - name: authz
    bind: "127.0.0.1:9000"
    mode: auth
    client_ip: { source: x_forwarded_for, trusted_proxies: ["127.0.0.1/32"], hops: 1 }
keys:
  - id: prod
    name: Production servers
    secret_env: KEYFENCE_PROD_SECRET
    ip_allow_list: ["203.0.113.100", "203.0.113.101", "203.0.113.102"]
  - id: office
    name: Office and CI
    secret_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    ip_allow_list: "203.0.113.100/30, 198.51.100.0/24, 2001:db8:1::/48"
  - id: dev
    name: Development (no restriction)
    secret_env: KEYFENCE_DEV_SECRET
rejection:
  status: 403
  body: '{"error":"IP address not allowed"}'
management:
  bind: "127.0.0.1:9900"
  admins:
    - name: ops
      token_env: KEYFENCE_ADMIN_TOKEN
      ip_allow_list: ["127.0.0.1", "198.51.100.0/24"]
  confirm:
    totp_secret_env: KEYFENCE_CONFIRM_TOTP
metrics:
  bind: "127.0.0.1:9901"
"#;

    #[test]
    fn the_spec_example_parses() {
        let c = parse(SPEC_EXAMPLE, "keyfence.yaml").unwrap();
        assert_eq!(c.datapath.interfaces, ["eth0"]);
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(
            c.listeners[1].client_ip.source,
            ClientIpSource::XForwardedFor
        );
        assert_eq!(c.keys.len(), 3);
        assert_eq!(c.keys[1].allow.entries().len(), 3);
        assert!(c.keys[2].allow.is_unrestricted());
        assert_eq!(c.keys[0].tenant, "default");
        assert_eq!(c.keys[0].scopes, ["api"]);
        assert_eq!(c.metrics.bind, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.management.bind, "127.0.0.1:9900".parse().unwrap());
        assert_eq!(c.management.admins[0].name, "ops");
        assert_eq!(c.management.admins[0].allow.entries().len(), 2);
        assert_eq!(
            c.management.confirm_totp_env.as_deref(),
            Some("KEYFENCE_CONFIRM_TOTP")
        );
    }

    /// The shape pass and the serde types describe the same file: at every
    /// mapping, serde's own list of known fields (from its unknown-field error)
    /// is the shape's. Allow-list entry mappings are left out: serde reads
    /// them untagged and ignores extra fields, the shape refuses them.
    #[test]
    fn the_shape_knows_the_same_fields_as_the_serde_types() {
        for (yaml, path) in [
            ("bogus_field: 1\n", &[][..]),
            ("store: { bogus_field: 1 }\n", &["store"][..]),
            ("datapath: { bogus_field: 1 }\n", &["datapath"][..]),
            ("listeners: [{ bogus_field: 1 }]\n", &["listeners"][..]),
            (
                "listeners: [{ tls: { bogus_field: 1 } }]\n",
                &["listeners", "tls"][..],
            ),
            (
                "listeners: [{ client_ip: { bogus_field: 1 } }]\n",
                &["listeners", "client_ip"][..],
            ),
            (
                "listeners: [{ connections: { bogus_field: 1 } }]\n",
                &["listeners", "connections"][..],
            ),
            ("keys: [{ bogus_field: 1 }]\n", &["keys"][..]),
            ("rejection: { bogus_field: 1 }\n", &["rejection"][..]),
            ("management: { bogus_field: 1 }\n", &["management"][..]),
            (
                "management: { admins: [{ bogus_field: 1 }] }\n",
                &["management", "admins"][..],
            ),
            (
                "management: { confirm: { bogus_field: 1 } }\n",
                &["management", "confirm"][..],
            ),
            ("metrics: { bogus_field: 1 }\n", &["metrics"][..]),
        ] {
            let Err(e) = serde_saphyr::from_str::<RawConfig>(yaml) else {
                panic!("{yaml}: serde accepted an unknown field");
            };
            let message = e.without_snippet().to_string();
            let (_, rest) = message
                .split_once("expected")
                .unwrap_or_else(|| panic!("{yaml}: {message}"));
            let expected = rest.lines().next().unwrap_or_default();
            let mut serde_fields: Vec<&str> = expected
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| {
                    !w.is_empty() && !["one", "of", "or", "at", "line", "column"].contains(w)
                })
                .filter(|w| !w.chars().all(|c| c.is_ascii_digit()))
                .collect();
            let mut shape_fields = super::shape::fields_at(path);
            serde_fields.sort_unstable();
            shape_fields.sort_unstable();
            assert_eq!(serde_fields, shape_fields, "{path:?} ({message})");
        }
    }

    #[test]
    fn datapath_unparsed_takes_pass_or_drop() {
        for (yaml, want) in [
            ("datapath: { unparsed: pass }\n", Unparsed::Pass),
            ("datapath: { unparsed: drop }\n", Unparsed::Drop),
            ("datapath: { mode: tc }\n", Unparsed::Pass),
        ] {
            let c = parse(yaml, "k.yaml").unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(c.datapath.unparsed, want, "{yaml}");
        }
    }

    #[test]
    fn datapath_tc_attach_takes_auto_tcx_or_netlink() {
        for (yaml, want) in [
            ("datapath: { mode: tc }\n", TcAttach::Auto),
            ("datapath: { tc_attach: auto }\n", TcAttach::Auto),
            ("datapath: { tc_attach: tcx }\n", TcAttach::Tcx),
            (
                "datapath: { mode: tc, tc_attach: netlink }\n",
                TcAttach::Netlink,
            ),
        ] {
            let c = parse(yaml, "k.yaml").unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(c.datapath.tc_attach, want, "{yaml}");
        }
        let e = parse("datapath: { tc_attach: clsact }\n", "k.yaml")
            .expect_err("an unknown tc_attach must be refused")
            .to_string();
        assert!(
            e.contains("k.yaml:1:")
                && e.contains("datapath.tc_attach")
                && e.contains("auto, tcx or netlink"),
            "{e}"
        );
    }

    #[test]
    fn allow_list_entries_may_be_mappings() {
        let c = parse(
            "keys:\n  - id: k\n    name: a\n    secret_env: A\n    ip_allow_list:\n      - 192.0.2.1\n      - { cidr: 198.51.100.0/24, note: office, expires_at: \"2030-01-01T00:00:00Z\" }\n",
            "k.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.keys[0].allow.entries().len(), 2);
    }

    #[test]
    fn a_static_key_name_defaults_to_its_id() {
        let c = parse(
            "keys:\n  - { id: ci, secret_env: A }\n  - { id: prod, name: Production, secret_env: B }\n",
            "k.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.keys[0].name, "ci");
        assert_eq!(c.keys[1].name, "Production");
    }

    #[test]
    fn defaults_for_a_minimal_file() {
        let c = parse("listeners: []\n", "k.yaml").unwrap();
        assert_eq!(c.datapath.mode, AttachMode::Auto);
        assert_eq!(c.datapath.pin_path, PathBuf::from("/sys/fs/bpf/keyfence"));
        assert_eq!(c.datapath.capacity, MapCapacity::default());
        assert_eq!(
            c.datapath.capacity.exact,
            keyfence_common::policy::EXACT_CAPACITY
        );
        let small = parse(
            "datapath:\n  capacity: { exact: 8 }\nlisteners: []\n",
            "k.yaml",
        )
        .unwrap();
        assert_eq!(
            small.datapath.capacity,
            MapCapacity {
                exact: 8,
                prefixes: keyfence_common::policy::PREFIXES_CAPACITY
            }
        );
        assert_eq!(c.datapath.unparsed, Unparsed::Pass);
        assert_eq!(c.rejection.status, 403);
        assert_eq!(c.rejection.body, r#"{"error":"IP address not allowed"}"#);
    }

    #[test]
    fn forward_credential_defaults_to_true_and_is_proxy_only() {
        let yaml = |extra: &str, mode: &str| {
            format!(
                "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: {mode}\n{}{extra}",
                if mode == "proxy" {
                    "    upstream: \"http://127.0.0.1:1\"\n"
                } else {
                    ""
                }
            )
        };
        let forward = |extra: &str| {
            parse(&yaml(extra, "proxy"), "k.yaml")
                .unwrap_or_else(|e| panic!("{e}"))
                .listeners[0]
                .forward_credential
        };
        assert!(forward(""));
        assert!(forward("    forward_credential: true\n"));
        assert!(!forward("    forward_credential: false\n"));
        assert!(
            parse(&yaml("", "auth"), "k.yaml").unwrap().listeners[0].forward_credential,
            "the default holds in auth mode too"
        );
        let errors = parse(&yaml("    forward_credential: false\n", "auth"), "k.yaml")
            .expect_err("refused in auth mode")
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].line, errors[0].col, errors[0].path.as_str()),
            (5, 25, "listeners[0].forward_credential")
        );
        let errors = parse(&yaml("    forward_credential: maybe\n", "proxy"), "k.yaml")
            .expect_err("not a bool")
            .0;
        assert_eq!(errors[0].path, "listeners[0].forward_credential");
    }

    #[test]
    fn shim_workers_and_upstream_fields_are_checked() {
        let c = parse("listeners: []\n", "k.yaml").unwrap();
        assert!(c.shim.workers >= 1, "one per CPU by default");
        let c = parse("shim: { workers: 3 }\nlisteners: []\n", "k.yaml").unwrap();
        assert_eq!(c.shim.workers, 3);
        for bad in ["0", "257"] {
            let errors = parse(
                &format!("shim: {{ workers: {bad} }}\nlisteners: []\n"),
                "k.yaml",
            )
            .expect_err("out of range")
            .0;
            assert_eq!(errors[0].path, "shim.workers", "{errors:?}");
        }
        let listener = |upstream: &str, extra: &str, mode: &str| {
            format!(
                "listeners:\n  - {{ name: a, bind: \"[::]:1\", mode: {mode}{upstream}{extra} }}\n"
            )
        };
        let ok = |yaml: &str| {
            parse(yaml, "k.yaml")
                .unwrap_or_else(|e| panic!("{e}"))
                .listeners
                .remove(0)
        };
        let up = ", upstream: \"h2c://127.0.0.1:1\"";
        let l = ok(&listener(up, "", "proxy"));
        assert_eq!(l.upstream.as_deref(), Some("h2c://127.0.0.1:1"));
        assert_eq!(l.upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT);
        assert_eq!(l.upstream_ca, None);
        let l = ok(&listener(up, ", upstream_timeout: 750ms", "proxy"));
        assert_eq!(l.upstream_timeout, std::time::Duration::from_millis(750));
        let dir = std::env::temp_dir().join(format!("kf-load-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        let tls = ", upstream: \"https://127.0.0.1:1\"";
        let with_ca = format!(", upstream_ca: \"{}\"", ca.display());
        assert_eq!(ok(&listener(tls, &with_ca, "proxy")).upstream_ca, Some(ca));
        let missing = format!(", upstream_ca: \"{}\"", dir.join("absent.pem").display());
        // (extra fields, mode, upstream, path of the one error)
        let cases = [
            (", upstream_timeout: 5ms", "proxy", up, "upstream_timeout"),
            (", upstream_timeout: soon", "proxy", up, "upstream_timeout"),
            (", upstream_timeout: 1s", "auth", "", "upstream_timeout"),
            (with_ca.as_str(), "proxy", up, "upstream_ca"),
            (missing.as_str(), "proxy", tls, "upstream_ca"),
            ("", "proxy", ", upstream: \"h2://127.0.0.1:1\"", "upstream"),
        ];
        for (extra, mode, upstream, path) in cases {
            let errors = parse(&listener(upstream, extra, mode), "k.yaml")
                .expect_err(extra)
                .0;
            assert_eq!(errors.len(), 1, "{extra}: {errors:?}");
            assert_eq!(errors[0].path, format!("listeners[0].{path}"), "{extra}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// (name, yaml, expected "LINE:COL: path: message-substring" lines, in order)
    const BROKEN: &[(&str, &str, &[&str])] = &[
        (
            "unknown top-level field",
            "listners: []\n",
            &["1:1: listners: unknown field `listners`, expected one of store, datapath,"],
        ),
        (
            "unknown listener field",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n    colour: red\n",
            &["5:5: listeners[0].colour: unknown field `colour`, expected one of name,"],
        ),
        (
            "wrong type",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n    early_drop: maybe\n",
            &["5:17: listeners[0].early_drop: expected true or false, found text"],
        ),
        (
            "every shape mistake at once",
            "datapath: [gw0]\nlisteners:\n  - name: a\n    bind: \"[::]:1\"\n    client_ip: { hops: -1, trusted_proxies: 10.0.0.1 }\nkeys:\n  - { id: k, name: [a], secret_env: A, ip_allow_list: { a: 1 } }\nrejection: { status: 70000 }\nmetric: {}\n",
            &[
                "1:11: datapath: expected a mapping, found a list",
                "3:5: listeners[0].mode: missing field `mode`",
                "5:24: listeners[0].client_ip.hops: expected a whole number from 0 to 4294967295, found a number",
                "5:45: listeners[0].client_ip.trusted_proxies: expected a list, found text",
                "7:20: keys[0].name: expected text, found a list",
                "7:55: keys[0].ip_allow_list: expected text or a list, found a mapping",
                "8:22: rejection.status: expected a whole number from 0 to 65535",
                "9:1: metric: unknown field `metric`",
            ],
        ),
        (
            "shape and value mistakes together, in file order",
            "listeners:\n  - { name: a, bind: \"[::]:1\", mode: auth, early_drop: maybe }\n  - { name: b, bind: \"8443\", mode: auth }\nkeys:\n  - { id: k, secret_env: A, ip_allow_list: \"10.0.0.5/8\" }\n  - { id: j, colour: red, secret_env: B }\nrejection: { status: 200 }\n",
            &[
                "2:56: listeners[0].early_drop: expected true or false, found text",
                "3:22: listeners[1].bind: \"8443\" is not ADDR:PORT",
                "5:44: keys[0].ip_allow_list: entry 1 \"10.0.0.5/8\": host bits set",
                "6:14: keys[1].colour: unknown field `colour`",
                "7:22: rejection.status: status 200 is not an HTTP error status",
            ],
        ),
        (
            "a part with a shape mistake is not value-checked too",
            "listeners:\n  - { name: a, bind: \"8443\", mode: auth, colour: red }\n",
            &["2:42: listeners[0].colour: unknown field `colour`"],
        ),
        (
            "an alias into a part left out: the shape mistakes alone",
            "keys:\n  - { id: &i k, name: [x], secret_env: A }\n  - { id: *i, name: b, secret_env: B }\n",
            &["2:23: keys[0].name: expected text, found a list"],
        ),
        (
            "a list entry that is not text",
            "keys:\n  - { id: k, name: a, secret_env: A, ip_allow_list: [192.0.2.1, [10.0.0.0/8]] }\n",
            &["2:65: keys[0].ip_allow_list[1]: expected text, found a list"],
        ),
        (
            "an entry mapping with a typo and without its cidr",
            "keys:\n  - id: k\n    name: a\n    secret_env: A\n    ip_allow_list:\n      - { cidr: 192.0.2.1, notes: x }\n      - { note: y }\n",
            &[
                "6:28: keys[0].ip_allow_list[0].notes: unknown field `notes`, expected one of cidr, note, expires_at",
                "7:9: keys[0].ip_allow_list[1].cidr: missing field `cidr`",
            ],
        ),
        (
            "syntax",
            "listeners: [\n",
            &["1:12: (yaml): unclosed bracket"],
        ),
        (
            "bad datapath mode",
            "datapath:\n  mode: turbo\n",
            &["2:9: datapath.mode: unknown mode \"turbo\""],
        ),
        (
            "bad datapath.unparsed",
            "datapath:\n  unparsed: block\n",
            &["2:13: datapath.unparsed: unknown value \"block\"; expected pass or drop"],
        ),
        (
            "datapath.unparsed is case-sensitive",
            "datapath:\n  unparsed: Drop\n",
            &["2:13: datapath.unparsed: unknown value \"Drop\""],
        ),
        (
            "datapath.unparsed as a boolean",
            "datapath:\n  unparsed: true\n",
            &["2:13: datapath.unparsed: unknown value \"true\"; expected pass or drop"],
        ),
        (
            "datapath.unparsed as a list",
            "datapath:\n  unparsed: [drop]\n",
            &["2:13: datapath.unparsed: expected text, found a list"],
        ),
        (
            "relative pin path",
            "datapath:\n  pin_path: bpf/kf\n",
            &["2:13: datapath.pin_path: must be an absolute path"],
        ),
        (
            "map capacity out of range",
            "datapath:\n  capacity: { exact: 0, prefixes: 16777217 }\n",
            &[
                "2:22: datapath.capacity.exact: 0 is out of range: from 1 to 16777216 entries",
                "2:35: datapath.capacity.prefixes: 16777217 is out of range",
            ],
        ),
        (
            "map capacity field typo",
            "datapath:\n  capacity: { exakt: 8 }\n",
            &["2:15: datapath.capacity.exakt: unknown field `exakt`"],
        ),
        (
            "bad bind",
            "listeners:\n  - name: a\n    bind: \"8443\"\n    mode: auth\n",
            &["3:11: listeners[0].bind: \"8443\" is not ADDR:PORT"],
        ),
        (
            "bad listener mode",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: mirror\n",
            &["4:11: listeners[0].mode: unknown mode \"mirror\""],
        ),
        (
            "proxy without upstream",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: proxy\n",
            &["2:5: listeners[0].upstream: proxy mode needs an upstream"],
        ),
        (
            "auth with upstream",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n    upstream: \"http://127.0.0.1:1\"\n",
            &["5:15: listeners[0].upstream: auth mode"],
        ),
        (
            "bad upstream",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: proxy\n    upstream: \"ftp://x\"\n",
            &["5:15: listeners[0].upstream: \"ftp://x\" is not an http"],
        ),
        (
            "missing tls files",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n    tls: { cert: /nonexistent/c.pem, key: /nonexistent/k.pem }\n",
            &[
                "5:18: listeners[0].tls.cert: cannot read",
                "5:43: listeners[0].tls.key: cannot read",
            ],
        ),
        (
            "missing management tls files, console durations out of range",
            "management:\n  tls: { cert: /nonexistent/c.pem, key: /nonexistent/k.pem }\n  console: { idle_timeout: 10ms, max_age: 2d }\n",
            &[
                "2:16: management.tls.cert: cannot read",
                "2:41: management.tls.key: cannot read",
                "3:28: management.console.idle_timeout",
                "3:43: management.console.max_age: \"2d\" is outside 100ms..24h",
            ],
        ),
        (
            "duplicate listener names and overlapping binds",
            "listeners:\n  - { name: a, bind: \"[::]:1\", mode: auth }\n  - { name: a, bind: \"0.0.0.0:1\", mode: auth }\n",
            &[
                "3:13: listeners[1].name: listener name \"a\" is used twice",
                "3:22: listeners[1].bind: 0.0.0.0:1 overlaps",
            ],
        ),
        (
            "trust everyone",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n    client_ip: { source: x_forwarded_for, trusted_proxies: [\"::/0\"] }\n",
            &["5:61: listeners[0].client_ip.trusted_proxies[0]: ::/0 trusts every address"],
        ),
        (
            "forwarded without trusted proxies",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n    client_ip: { source: proxy_protocol }\n",
            &[
                "2:5: listeners[0].client_ip.trusted_proxies: proxy_protocol and x_forwarded_for need trusted_proxies",
            ],
        ),
        (
            "unknown client_ip source",
            "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n    client_ip: { source: header }\n",
            &["5:26: listeners[0].client_ip.source: unknown source \"header\""],
        ),
        (
            "duplicate key ids",
            "keys:\n  - { id: k, name: a, secret_env: A }\n  - { id: k, name: b, secret_env: B }\n",
            &["3:11: keys[1].id: key id \"k\" is used twice"],
        ),
        (
            "bad key id",
            "keys:\n  - { id: \"a b\", name: a, secret_env: A }\n",
            &["2:11: keys[0].id: \"a b\" is not a key id"],
        ),
        (
            "control characters in a key name",
            "keys:\n  - { id: k, name: \"red\\e[31m\", secret_env: A }\n  - { id: j, name: \"\\u202Eexe.txt\", secret_env: B }\n",
            &[
                "2:20: keys[0].name: name must not contain control or formatting characters (U+001B at character 4)",
                "3:20: keys[1].name: name must not contain control or formatting characters (U+202E at character 1)",
            ],
        ),
        (
            "no secret",
            "keys:\n  - { id: k, name: a }\n",
            &["2:5: keys[0]: needs secret_sha256 or secret_env"],
        ),
        (
            "two secrets",
            "keys:\n  - { id: k, name: a, secret_env: A, secret_sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\" }\n",
            &["keys[0].secret_env: give either"],
        ),
        (
            "bad digest",
            "keys:\n  - { id: k, name: a, secret_sha256: \"abc\" }\n",
            &["2:38: keys[0].secret_sha256: must be 64 hexadecimal"],
        ),
        (
            "bad entries all reported",
            "keys:\n  - id: k\n    name: a\n    secret_env: A\n    ip_allow_list: \"192.0.2.1, 10.0.0.5/8, localhost\"\n",
            &[
                "5:20: keys[0].ip_allow_list: entry 2 \"10.0.0.5/8\": host bits set; did you mean 10.0.0.0/8?",
                "5:20: keys[0].ip_allow_list: entry 3 \"localhost\": hostnames are not allowed",
            ],
        ),
        (
            "rejection status",
            "rejection:\n  status: 200\n",
            &["2:11: rejection.status: status 200 is not an HTTP error status"],
        ),
        (
            "postgres without a url",
            "store:\n  postgres: { host_id: a }\n",
            &["2:13: store.postgres: needs exactly one of url and url_env"],
        ),
        (
            "postgres with a bad url",
            "store:\n  postgres: { url: \"mysql://x\" }\n",
            &["2:20: store.postgres.url: not a PostgreSQL URL"],
        ),
        (
            "postgres and path",
            "store:\n  path: /tmp/k.db\n  postgres: { url: \"postgres://u@h/d\" }\n",
            &["2:9: store.path: store.path and store.postgres exclude each other"],
        ),
        (
            "fleet duration",
            "fleet:\n  wait_timeout: soon\n",
            &["2:17: fleet.wait_timeout: \"soon\" is not a duration"],
        ),
        (
            "admin without token",
            "management:\n  admins:\n    - { name: ops }\n",
            &["3:7: management.admins[0]: admin \"ops\" needs exactly one of"],
        ),
        (
            "metrics bind",
            "metrics:\n  bind: localhost\n",
            &["2:9: metrics.bind: \"localhost\" is not ADDR:PORT"],
        ),
    ];

    #[test]
    fn broken_configs_are_located_and_complete() {
        for (name, yaml, expected) in BROKEN {
            let errors = parse(yaml, "k.yaml").expect_err(name).0;
            let lines: Vec<String> = errors
                .iter()
                .map(|e| format!("{}:{}: {}: {}", e.line, e.col, e.path, e.message))
                .collect();
            assert_eq!(lines.len(), expected.len(), "{name}: {lines:#?}");
            for (line, want) in lines.iter().zip(*expected) {
                assert!(
                    line.contains(want),
                    "{name}: {line:?} should contain {want:?}"
                );
            }
            let rendered = ConfigErrors(errors).to_string();
            assert!(rendered.starts_with("k.yaml:"), "{name}: {rendered}");
        }
    }
}

#[cfg(test)]
mod packaged_example {
    /// The example shipped in `packaging/` is a valid config.
    #[test]
    fn the_packaged_example_is_valid() {
        let text = include_str!("../../../packaging/keyfence.yaml");
        let config = super::parse(text, "packaging/keyfence.yaml")
            .unwrap_or_else(|e| panic!("packaging/keyfence.yaml:\n{e}"));
        assert_eq!(config.listeners.len(), 3);
        assert_eq!(config.keys.len(), 2);
        // The diagnostics listener serves /_keyfence/ip to every address:
        // outside the datapath, and no key works there.
        let diagnostics = config
            .listeners
            .iter()
            .find(|l| l.name == "diagnostics")
            .expect("a diagnostics listener");
        assert!(!diagnostics.early_drop);
        assert!(
            config.keys.iter().all(|k| diagnostics
                .tenants
                .as_ref()
                .is_some_and(|t| !t.contains(&k.tenant))),
            "no key of the example is accepted on the diagnostics listener"
        );
        assert_eq!(
            config.store.path,
            std::path::Path::new("/var/lib/keyfence/keyfence.db")
        );
    }
}

#[cfg(test)]
mod connection_limits {
    use std::time::Duration;

    use super::parse;

    const LISTENER: &str = "listeners:\n  - name: a\n    bind: \"[::]:1\"\n    mode: auth\n";

    #[test]
    fn defaults_when_absent() {
        let c = parse(LISTENER, "k.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.listeners[0].connections,
            crate::conn::ConnLimits::default()
        );
        assert_eq!(
            c.listeners[0].connections.header_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(
            c.listeners[0].connections.idle_timeout,
            Duration::from_mins(1)
        );
        assert_eq!(c.listeners[0].connections.max_per_source, 256);
    }

    #[test]
    fn durations_in_seconds_or_with_units() {
        for (header, idle, want_header, want_idle) in [
            ("1", "5", 1000, 5000),
            ("\"10s\"", "2m", 10_000, 120_000),
            ("500ms", "1h", 500, 3_600_000),
        ] {
            let yaml = format!(
                "{LISTENER}    connections: {{ header_timeout: {header}, idle_timeout: {idle}, max_per_source: 20 }}\n"
            );
            let c = parse(&yaml, "k.yaml").unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let l = c.listeners[0].connections;
            assert_eq!(
                l.header_timeout,
                Duration::from_millis(want_header),
                "{yaml}"
            );
            assert_eq!(l.idle_timeout, Duration::from_millis(want_idle), "{yaml}");
            assert_eq!(l.max_per_source, 20);
        }
    }

    #[test]
    fn bad_values_are_located() {
        for (fields, want) in [
            (
                "header_timeout: soon",
                "5:36: listeners[0].connections.header_timeout: \"soon\" is not a duration",
            ),
            (
                "idle_timeout: 10ms",
                "5:34: listeners[0].connections.idle_timeout: \"10ms\" is outside 100ms..24h",
            ),
            (
                "header_timeout: 0",
                "5:36: listeners[0].connections.header_timeout: \"0\" is outside",
            ),
            (
                "idle_timeout: 2d",
                "5:34: listeners[0].connections.idle_timeout: \"2d\" is outside",
            ),
            (
                "max_per_source: 0",
                "5:36: listeners[0].connections.max_per_source: must be at least 1",
            ),
            (
                "max_per_source: -3",
                "5:36: listeners[0].connections.max_per_source: expected a whole number",
            ),
            (
                "max_per_source: many",
                "5:36: listeners[0].connections.max_per_source: expected a whole number",
            ),
        ] {
            let yaml = format!("{LISTENER}    connections: {{ {fields} }}\n");
            let errors = parse(&yaml, "k.yaml").expect_err(fields).0;
            assert_eq!(errors.len(), 1, "{fields}: {errors:?}");
            let e = &errors[0];
            let line = format!("{}:{}: {}: {}", e.line, e.col, e.path, e.message);
            assert!(
                line.starts_with(want),
                "{fields}: {line:?} should start with {want:?}"
            );
        }
    }
}

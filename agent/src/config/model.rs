//! The validated, canonical configuration: what the rest of the agent consumes.
//! Nothing here is raw YAML; `config::parse` produces these types or a list of
//! located errors, never a half-valid value.

use std::{net::SocketAddr, path::PathBuf};

use crate::allowlist::{AllowList, Net};

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub store: StoreConfig,
    pub datapath: DatapathConfig,
    pub listeners: Vec<ListenerConfig>,
    pub keys: Vec<StaticKey>,
    pub rejection: Rejection,
    pub management: ManagementConfig,
    pub metrics: MetricsConfig,
    pub shim: ShimConfig,
    /// `fleet`: how hosts sharing a PostgreSQL store wait for each other (§10).
    pub fleet: FleetConfig,
}

/// `listeners[].upstream_timeout` when absent.
pub const DEFAULT_UPSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `shim`: how the listeners are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShimConfig {
    /// Threads serving the listeners, each a single-threaded runtime with
    /// its own `SO_REUSEPORT` socket per listener (default: one per CPU).
    pub workers: usize,
}

impl ShimConfig {
    /// The most `workers` accepted.
    pub const MAX_WORKERS: usize = 256;
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Embedded `SQLite` file (default `/var/lib/keyfence/keyfence.db`).
    /// Unused when `postgres` is set.
    pub path: PathBuf,
    /// `store.postgres`: fleet mode, every host on one database (SPEC §10).
    pub postgres: Option<PostgresConfig>,
}

/// `store.postgres`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The connection URL (`postgres://user:password@host:port/db?...`).
    pub url: PostgresUrl,
    /// `ca_file`: PEM CA certificates; set, the connection uses TLS
    /// (rustls) and checks the server against them.
    pub ca_file: Option<PathBuf>,
    /// `host_id`: this host's name in the fleet (default the hostname).
    pub host_id: String,
}

/// Where the connection URL comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PostgresUrl {
    /// `url`, written in the config.
    Inline(String),
    /// `url_env`: the variable holding it, read when the store opens (a
    /// password stays out of the file).
    Env(String),
}

impl PostgresUrl {
    /// The URL itself.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            Self::Inline(url) => Ok(url.clone()),
            Self::Env(var) => match std::env::var(var) {
                Ok(url) if !url.trim().is_empty() => Ok(url.trim().to_owned()),
                _ => Err(format!(
                    "store.postgres.url_env: the variable {var} is not set"
                )),
            },
        }
    }
}

/// The URL may hold a password: never in logs or `Debug` output.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("ca_file", &self.ca_file)
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

/// `fleet` (SPEC §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// A host whose heartbeat is older than this is not waited for (default 10 s).
    pub live_after: std::time::Duration,
    /// A write waits this long at most for the live hosts (default 2 s).
    pub wait_timeout: std::time::Duration,
    /// The change feed is read this often even without a notification (default 1 s).
    pub poll: std::time::Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            live_after: std::time::Duration::from_secs(10),
            wait_timeout: std::time::Duration::from_secs(2),
            poll: std::time::Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    /// Default `/sys/fs/bpf/keyfence`; the agent pins under `<pin_path>/v<LAYOUT_VERSION>/`.
    pub pin_path: PathBuf,
    /// `datapath.capacity`: sizes of the allow-entry maps.
    pub capacity: MapCapacity,
    /// `datapath.unparsed`: what happens to packets whose transport header the
    /// parser cannot reach, on protected listeners' addresses (default pass).
    pub unparsed: Unparsed,
    /// `datapath.tc_attach`: how TC attaches (mode `tc`, or `auto` without
    /// native XDP).
    pub tc_attach: TcAttach,
}

/// `datapath.tc_attach`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX on kernels >= 6.6, a clsact qdisc and a netlink filter before.
    #[default]
    Auto,
    /// A TCX link, or fail (kernels before 6.6 have none).
    Tcx,
    /// A clsact qdisc and a netlink filter, on any kernel.
    Netlink,
}

/// `datapath.capacity`: how many entries the allow-entry maps hold, summed
/// over listeners. Fixed when the maps are created: a pinned map of another
/// size is refused at start (see `datapath::check_pinned_layouts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    /// `KF_EXACT`: `/32` and `/128` entries.
    pub exact: u32,
    /// `KF_PREFIXES`: every other prefix length (and deny markers).
    pub prefixes: u32,
}

impl MapCapacity {
    /// The largest size accepted for either map: gigabytes of kernel memory
    /// for the hash, far beyond any list keyfence is meant for.
    pub const MAX: u32 = 1 << 24;
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self {
            exact: keyfence_common::policy::EXACT_CAPACITY,
            prefixes: keyfence_common::policy::PREFIXES_CAPACITY,
        }
    }
}

/// `datapath.unparsed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unparsed {
    /// They pass, counted `truncated` or `malformed`; the shim decides.
    #[default]
    Pass,
    /// They are dropped, counted `drop`/`unparsed`.
    Drop,
}

/// `datapath.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP, else TC. Never generic XDP.
    Auto,
    /// Native XDP or fail.
    Native,
    /// Generic (skb) XDP: only when named.
    Generic,
    /// TC ingress (tcx on kernels >= 6.6, clsact before).
    Tc,
    /// No datapath: the shim alone enforces.
    Off,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    /// `[::]:PORT` is dual-stack; `0.0.0.0:PORT` IPv4 only.
    pub bind: SocketAddr,
    pub mode: ListenerMode,
    /// Required in proxy mode, absent in auth mode. `http://host:port`,
    /// `h2c://host:port` (HTTP/2 with prior knowledge) or `https://host:port`
    /// (TLS, HTTP/2 or HTTP/1.1 by ALPN).
    pub upstream: Option<String>,
    /// Time the upstream has to answer with a response head (then 504).
    pub upstream_timeout: std::time::Duration,
    /// `https://` upstream: PEM CA certificates to trust instead of the
    /// built-in web roots.
    pub upstream_ca: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    pub client_ip: ClientIp,
    /// Default true.
    pub early_drop: bool,
    /// `None`: every key. `Some(list)`: only keys of these tenants.
    pub tenants: Option<Vec<String>>,
    /// A header read for the key when `Authorization: Bearer` is absent (for
    /// example `X-API-Key`); `None` reads only `Authorization`.
    pub key_header: Option<String>,
    /// `connections`: header and idle timeouts, connections per source.
    pub connections: crate::conn::ConnLimits,
    /// Proxy mode: whether the one credential header that carried the checked
    /// key goes on to the upstream (true, the default) or `Authorization` and
    /// `key_header` are both removed (false).
    pub forward_credential: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerMode {
    Proxy,
    Auth,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIp {
    pub source: ClientIpSource,
    /// Canonical (host bits clear, IPv4-mapped folded).
    pub trusted_proxies: Vec<Net>,
    /// `x_forwarded_for`: trusted hops skipped at most (default 1).
    pub hops: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientIpSource {
    Peer,
    ProxyProtocol,
    XForwardedFor,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StaticKey {
    pub id: String,
    /// The id when the config gives none.
    pub name: String,
    /// `default` when absent (rules: `crate::keys::validate`).
    pub tenant: String,
    /// `["api"]` when absent.
    pub scopes: crate::keys::Scopes,
    pub secret: KeySecret,
    /// Empty = unrestricted.
    pub allow: AllowList,
    pub report_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySecret {
    /// `secret_sha256`: the hex digest, decoded.
    Sha256([u8; 32]),
    /// `secret_env`: the variable's name; read when the key is loaded.
    Env(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Default 403.
    pub status: u16,
    /// Default `{"error":"IP address not allowed"}`; placeholders `{ip}`, `{key_id}`.
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Default `127.0.0.1:9901`.
    pub bind: SocketAddr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ManagementConfig {
    /// Default `127.0.0.1:9900`.
    pub bind: SocketAddr,
    pub admins: Vec<Admin>,
    /// `confirm.totp_secret_env`: the variable holding the base32 TOTP secret.
    pub confirm_totp_env: Option<String>,
    /// `console`: how long a console session lives.
    pub console: ConsoleConfig,
    /// `tls: {cert, key}`: the management listener (API and console) speaks
    /// TLS; the files are reloaded when they change.
    pub tls: Option<TlsConfig>,
}

/// `management.console`: a session ends after `idle_timeout` without a
/// request, and after `max_age` whatever happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Default 15 minutes.
    pub idle_timeout: std::time::Duration,
    /// Default 8 hours.
    pub max_age: std::time::Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            idle_timeout: std::time::Duration::from_mins(15),
            max_age: std::time::Duration::from_hours(8),
        }
    }
}

/// A management principal from the config (read-only through the API).
#[derive(Clone, Debug, PartialEq)]
pub struct Admin {
    pub name: String,
    /// `token_sha256` or `token_env`, as for static keys.
    pub token: KeySecret,
    /// Empty = from anywhere (not recommended; the management API binds to
    /// loopback by default).
    pub allow: AllowList,
}

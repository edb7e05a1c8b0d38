//! Command line (SPEC §1). Exit codes: 0 ok, 2 usage, 64 invalid config, 1 other.
#![expect(
    clippy::doc_markdown,
    reason = "doc comments here are clap's --help text, shown verbatim"
)]

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Where the packaging installs the configuration (`packaging/`): the
/// default `--config` of every command that reads one.
pub const DEFAULT_CONFIG: &str = "/etc/keyfence/keyfence.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "keyfence",
    version,
    about = "Binds API keys to the IP addresses they may be used from",
    long_about = "keyfence binds API keys to the IP addresses they may be used from. An eBPF \
                  datapath (XDP, TC as fallback) drops packets to protected listeners from \
                  sources that no key on that listener allows; the pinned datapath keeps \
                  enforcing across agent restarts."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the datapath, apply the policy, serve
    /// /metrics and /readyz, reload on SIGHUP or when the config file changes.
    Run {
        /// Configuration file (YAML).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// On SIGTERM/SIGINT, after draining, detach the datapath and remove
        /// its pins (as `keyfence detach`) instead of leaving the last policy
        /// enforcing: for a real uninstall.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Validate a configuration without touching the kernel. Prints every error
    /// as FILE:LINE:COL: field.path: message and exits 64, or exits 0. Every
    /// secret_env, token_env and totp_secret_env variable must be set and hold
    /// what run accepts (a secret or token of at least 20 characters, a base32
    /// TOTP secret of at least 16 bytes).
    Check {
        /// Configuration file (YAML).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Do not check the variables the config names for secrets: validate
        /// the file on a machine that does not hold them.
        #[arg(long)]
        skip_env: bool,
    },
    /// Show what is attached where (interface, mode), map fill against
    /// capacity, packet counters per listener and the largest counters by
    /// interface and listener, read from the pinned maps (works while the
    /// agent is stopped).
    Status {
        /// Configuration file (YAML); its datapath.pin_path is read.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Manage keys through the running agent's management API: create, list,
    /// show, update, revoke, rotate, sources, audit. The token comes from
    /// KEYFENCE_TOKEN (a config admin's token or an admin-scoped key).
    Keys(KeysArgs),
    /// Detach the datapath from every interface and remove its pins under the
    /// config's datapath.pin_path (uninstall). Refused while an agent runs.
    Detach {
        /// Configuration file (YAML); its datapath.pin_path is read.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Fleet mode (store.postgres): the hosts sharing the store.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Key store tools.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Every host of the fleet: version, applied sequence, lag, last
    /// heartbeat, live or not (through the management API's GET /v1/fleet;
    /// token from KEYFENCE_TOKEN). Exits 1 while a live host is behind.
    Status {
        /// The management API of any host.
        #[arg(long, env = "KEYFENCE_API", default_value = "http://127.0.0.1:9900")]
        api: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a single host's SQLite store (keys and audit log, ids and
    /// sequence numbers kept) into the fleet's PostgreSQL database, then
    /// verify that every key and row is there. Idempotent: run it again and
    /// it copies nothing and verifies again. Stop the agent that uses the
    /// SQLite file first.
    Copy {
        /// sqlite:PATH of the store file.
        #[arg(long)]
        from: String,
        /// postgres:URL (postgres://user:password@host:port/database).
        #[arg(long)]
        to: String,
        /// PEM CA certificates: connect with TLS and check the server against them.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// The management API.
    #[arg(
        long,
        env = "KEYFENCE_API",
        default_value = "http://127.0.0.1:9900",
        global = true
    )]
    pub api: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Step-up code (the current TOTP code) for writes that set or change an
    /// allow list, when the agent requires confirmation.
    #[arg(long, env = "KEYFENCE_CONFIRM", global = true)]
    pub confirm: Option<String>,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key. Its secret is printed once; keyfence stores only its
    /// SHA-256.
    Create {
        /// A name people recognise ("CI runners").
        #[arg(long)]
        name: String,
        /// Tenant (default: default).
        #[arg(long)]
        tenant: Option<String>,
        /// Scope, repeatable: api (use on listeners, the default) and/or
        /// admin (call this API).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Allow list: "203.0.113.100, 198.51.100.0/24". Empty or absent: any
        /// address.
        #[arg(long)]
        allow: Option<String>,
        /// Log refusals but let requests through.
        #[arg(long)]
        report_only: bool,
    },
    /// List every key (config keys included, marked source=config).
    List,
    /// Show one key.
    Show { id: String },
    /// Change a key's name, allow list or report-only flag. The new list
    /// replaces the old one and is in force when the command returns.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// The whole new allow list ("" makes the key work from anywhere).
        #[arg(long)]
        allow: Option<String>,
        #[arg(long)]
        report_only: Option<bool>,
    },
    /// Revoke a key: its next request is refused (401).
    Revoke { id: String },
    /// Give a key a new secret (printed once); the old one stops working.
    Rotate { id: String },
    /// Client addresses seen recently with this key, allowed and refused.
    Sources { id: String },
    /// Who changed what, from where (oldest first).
    Audit {
        /// Only this key's changes.
        #[arg(long)]
        key: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Rows after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
}

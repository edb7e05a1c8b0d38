//! Command line (SPEC §1). Exit codes: 0 ok, 2 usage, 64 invalid config, 1 other.
#![expect(
    clippy::doc_markdown,
    reason = "doc comments here are clap's --help text, shown verbatim"
)]

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration without touching the kernel. Prints every error
    /// as FILE:LINE:COL: field.path: message and exits 64, or exits 0.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what is attached where (interface, mode), map fill against
    /// capacity, and packet counters per listener, read from the pinned maps
    /// (works while the agent is stopped).
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Detach the datapath from every interface and remove its pins under the
    /// config's datapath.pin_path (uninstall). Refused while an agent runs.
    Detach {
        #[arg(long, short)]
        config: PathBuf,
    },
}

//! keyfence: binds API keys to the IP addresses they may be used from.
//!
//! Data flows one way: config/store → [`policy`] (pure) → [`maps`] writers →
//! kernel; kernel counters → [`metrics`]. The loader ([`datapath`]) owns every
//! kernel-dependent choice (attach mode, pins, lock).
//!
//! `unsafe` is denied workspace-wide; [`sys`] is the one exception.

pub mod allowlist;
pub mod cli;
pub mod config;
pub mod config_warnings;
pub mod confirm;
pub mod conn;
pub mod console;
pub mod daemon;
pub mod datapath;
pub mod datapath_log;
pub mod fleet_cli;
pub mod fsguard;
pub mod keys;
pub mod keys_cli;
pub mod management;
pub mod maps;
pub mod metrics;
pub mod phases;
pub mod policy;
pub mod prefixset;
pub mod ratelimit;
pub mod secret_env;
pub mod shim;
pub mod status;
pub mod store;
pub mod sys;
pub mod tc_netlink;

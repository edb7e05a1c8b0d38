//! `keyfence run`: the daemon, in rooms.
//!
//! - [`start`]: load and validate the config, open the key store, open the
//!   datapath (adopting pins), apply the policy, attach, start the shim, the
//!   management API and metrics, then turn `/readyz` ready;
//! - [`event_loop`]: what wakes the daemon afterwards (API writes, the store's
//!   change feed, config changes, expiries, timers, signals);
//! - [`feed`]: the store's changes → shim key table, principals, policy;
//! - [`reconcile`]: policy → datapath maps: full and incremental applies, the
//!   capacity check, failing open and the reconcile after a failed write;
//! - [`reload`]: a new config file, checked and switched to;
//! - [`watch`]: the config file watcher and the signals.
//!
//! On exit the pinned datapath keeps enforcing the last policy.

mod active;
mod event_loop;
mod feed;
mod fleet;
mod reconcile;
mod reload;
mod start;
mod watch;

use std::{path::PathBuf, sync::Arc, time::Instant};

use active::ActiveKeys;

use crate::{
    config::{self, Config},
    datapath::Datapath,
    keys::{Key, KeyTable},
    management::{self, api::EnforceError},
    metrics::Metrics,
    policy::PolicyState,
    shim::runtime as shim_runtime,
    store::SharedStore,
};
pub use start::run;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(config::ConfigErrors),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The daemon's state; only the event loop touches it.
struct Daemon {
    config_path: PathBuf,
    config: Config,
    /// The config's static keys, their secrets resolved.
    statics: Arc<[Arc<Key>]>,
    /// `None` with `datapath.mode: off`. Scrapes and the drop-sample log read
    /// through its `reader()`, never through this.
    datapath: Option<Datapath>,
    metrics: Arc<Metrics>,
    store: SharedStore,
    /// The store's active keys: read at start, then kept current by the
    /// store's change feed.
    stored: ActiveKeys,
    /// The feed's sequence number up to which `stored` is enforced.
    applied: i64,
    /// `applied`, for the fleet reporter (`fleet.rs`).
    progress: tokio::sync::watch::Sender<i64>,
    /// The feed range whose last apply failed, and why: the write waiting
    /// for a number in it is answered with the failure (one waits at a time:
    /// the API enforces its writes one by one).
    feed_failure: Option<(std::ops::RangeInclusive<i64>, EnforceError)>,
    /// The packet-level policy of `config` and `stored`, kept so that a key
    /// change recompiles only what the changed key touches. Its next expiry
    /// is when the event loop compiles it again.
    policy: PolicyState,
    /// After a failed datapath write: when to reconcile next, and the wait
    /// after that. `None` while the maps match `policy`.
    reconcile: Option<(Instant, std::time::Duration)>,
}

impl Daemon {
    /// The shim's key table: static and active stored keys.
    fn key_table(&self) -> KeyTable {
        shim_runtime::key_table(&self.statics, self.stored.iter())
    }

    fn principals(&self) -> anyhow::Result<management::principals::Principals> {
        management::principals(&self.config.management.admins, self.stored.iter())
    }

    /// Every key a listener may accept: static ones and active stored ones.
    fn key_facts(&self) -> Vec<&Key> {
        self.statics
            .iter()
            .map(AsRef::as_ref)
            .chain(self.stored.iter().map(AsRef::as_ref))
            .collect()
    }
}

//! What wakes the daemon once it runs: the API's requests, the store's
//! change feed, config changes and SIGHUP, allow-list expiries, the reconcile
//! timer, certificate and last-use timers, and SIGTERM/SIGINT. One arm runs
//! at a time, so the daemon's state needs no lock.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::{Daemon, watch::Triggers};
use crate::{
    management::api::{ApiState, Apply},
    shim::runtime::Shim,
};

/// How often keys' last-use times are written to the store.
const LAST_USED_FLUSH: Duration = Duration::from_mins(1);
/// How often TLS certificate files are checked for changes.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How often the store's change feed is read for writes this agent's API did
/// not make (another writer of the store); the API's own writes are applied
/// at once, before it answers.
const FEED_POLL: Duration = Duration::from_secs(1);
/// A config change seen on disk is applied after this quiet period, so a
/// writer's several events (truncate, write, rename) make one reload.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(150);

impl Daemon {
    /// React to API writes, store changes, config changes, expiries and
    /// signals until SIGTERM or SIGINT.
    pub(super) async fn event_loop(
        &mut self,
        shim: &mut Shim,
        api: &ApiState,
        apply_rx: &mut mpsc::Receiver<Apply>,
        triggers: Triggers,
    ) -> anyhow::Result<()> {
        let Triggers {
            _watcher,
            mut change_rx,
            mut hup,
            mut term,
            mut int,
        } = triggers;
        let mut cert_check = tokio::time::interval(CERT_CHECK_INTERVAL);
        let mut last_used = tokio::time::interval(LAST_USED_FLUSH);
        // A shared store notifies its changes; the poll is the safety net.
        let changed = self.store.fleet().map(crate::store::fleet::Fleet::changed);
        let poll = if changed.is_some() {
            self.config.fleet.poll
        } else {
            FEED_POLL
        };
        let mut feed = tokio::time::interval(poll);
        feed.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let expiry = sleep_until_system(self.policy.next_change());
            let reconcile = sleep_until_opt(self.reconcile.map(|(at, _)| at));
            tokio::select! {
                Some(apply) = apply_rx.recv() => match apply {
                    Apply::Check { key, done } => {
                        let _ = done.send(self.check_key(&key));
                    }
                    Apply::Upto { seq, written, done } => {
                        let _ = done.send(self.enforce_upto(seq, written.map(|k| *k), shim, api).await);
                    }
                },
                _ = feed.tick() => {
                    if let Err(e) = self.follow_feed(shim, api).await {
                        tracing::warn!(error = %e, "applying the store's changes");
                    }
                }
                () = notified(changed.as_deref()) => {
                    if let Err(e) = self.follow_feed(shim, api).await {
                        tracing::warn!(error = %e, "applying the store's changes");
                    }
                }
                () = reconcile => {
                    let _ = self.reconcile();
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    self.reload(shim, api).await;
                    shim.reload_certificates();
                }
                Some(()) = change_rx.recv() => {
                    tokio::time::sleep(RELOAD_DEBOUNCE).await;
                    while change_rx.try_recv().is_ok() {}
                    tracing::info!("configuration file changed: reloading");
                    self.reload(shim, api).await;
                }
                _ = cert_check.tick() => shim.reload_certificates(),
                _ = last_used.tick() => self.flush_last_used(&shim.sources()).await,
                () = expiry => {
                    tracing::info!("an allow-list entry expired: recompiling the policy");
                    if let Err(e) = self.apply_policy() {
                        tracing::error!(error = %format!("{e:#}"), "applying the policy");
                    }
                }
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
        }
    }
}

/// Resolves when `notify` is notified, or never.
async fn notified(notify: Option<&tokio::sync::Notify>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `when` (monotonic), or never.
async fn sleep_until_opt(when: Option<Instant>) {
    match when {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves at `when` (wall clock), or never.
async fn sleep_until_system(when: Option<SystemTime>) {
    match when {
        Some(t) => {
            let wait = t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

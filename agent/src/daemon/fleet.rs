//! Fleet mode's side of the daemon (SPEC §10): a task that reports this
//! host's applied sequence to the shared store as soon as it moves (writers
//! on other hosts wait for it) and as a heartbeat every `fleet.poll`, and
//! keeps `keyfence_store_up`, `keyfence_fleet_applied_sequence` and
//! `keyfence_fleet_lag_seconds` current; and a task that flushes the
//! shim's per-key source counts to the store in batches. Both run beside
//! the event loop, so a database that does not answer never holds
//! enforcement up.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{metrics::Metrics, ratelimit::RateLimiter, shim::sources::Sources, store::SharedStore};

/// How often a host flushes its per-key source counts to the shared store.
pub const SOURCES_FLUSH: Duration = Duration::from_secs(1);
/// At most this many (key, address) pairs wait for the store between
/// flushes (and while it is away); past it new pairs' counts are dropped
/// (`keyfence_fleet_sources_dropped_total`).
pub const SOURCES_PENDING: usize = 16_384;
/// Rows per upsert: a full buffer is written in a few statements.
const SOURCES_BATCH: usize = 2_048;

/// In a fleet, gather the shim's per-key source counts and flush them every
/// [`SOURCES_FLUSH`]. Counts a flush could not write (the store is away)
/// go back to the bounded buffer and are written by a later flush.
pub(super) fn spawn_sources_flusher(daemon: &super::Daemon, sources: Arc<Sources>) {
    if daemon.store.fleet().is_none() {
        return;
    }
    sources.share(SOURCES_PENDING);
    let store = daemon.store.clone();
    let metrics = daemon.metrics.clone();
    let mut progress = daemon.progress.subscribe();
    tokio::spawn(async move {
        let logs = RateLimiter::new(1, Duration::from_secs(10));
        let mut tick = tokio::time::interval(SOURCES_FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // The daemon is gone (it flushed a last time on its way out).
                changed = progress.changed() => if changed.is_err() {
                    return;
                },
            }
            flush_sources(&store, &sources, &metrics, &logs).await;
        }
    });
}

impl super::Daemon {
    /// As the daemon stops: keys' last use, and in a fleet the per-key
    /// source counts still waiting.
    pub(super) async fn flush_on_exit(&self, sources: &Sources) {
        self.flush_last_used(sources).await;
        let logs = RateLimiter::new(1, Duration::from_secs(10));
        flush_sources(&self.store, sources, &self.metrics, &logs).await;
    }
}

/// Write what is waiting, batch by batch; put back what was not written.
async fn flush_sources(
    store: &SharedStore,
    sources: &Sources,
    metrics: &Metrics,
    logs: &RateLimiter,
) {
    let Some(fleet) = store.fleet() else { return };
    let mut waiting = sources.take_pending();
    while !waiting.is_empty() {
        let rest = waiting.split_off(waiting.len().min(SOURCES_BATCH));
        if let Err(e) = fleet.flush_sources(&waiting, sources.per_key()).await {
            if logs.allow() {
                tracing::warn!(error = %e, "flushing per-key sources to the store: kept for later");
            }
            waiting.extend(rest);
            sources.restore(waiting);
            break;
        }
        waiting = rest;
    }
    metrics.fleet.sources_dropped.inc_by(sources.take_dropped());
}

/// Start the reporter when the store is shared; it stops when the daemon
/// (the sender of its progress) is dropped.
pub(super) fn spawn_reporter(daemon: &super::Daemon) {
    if daemon.store.fleet().is_none() {
        return;
    }
    report(
        daemon.store.clone(),
        daemon.metrics.clone(),
        daemon.progress.subscribe(),
        daemon.config.fleet.poll,
    );
}

fn report(
    store: SharedStore,
    metrics: Arc<Metrics>,
    mut progress: watch::Receiver<i64>,
    poll: Duration,
) {
    tokio::spawn(async move {
        let logs = RateLimiter::new(1, Duration::from_secs(10));
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A new applied sequence, or the heartbeat's tick.
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tick.tick() => {}
            }
            let Some(fleet) = store.fleet() else { return };
            let applied = *progress.borrow_and_update();
            metrics.fleet.applied_sequence.set(applied);
            if let Err(e) = fleet.report(applied).await
                && logs.allow()
            {
                tracing::warn!(error = %e, "reporting this host's progress to the fleet");
            }
            // After every report, not only on the heartbeat's tick: the
            // gauge must drop to 0 when this host has caught up, not up to
            // one poll interval later (it read 0.05 s after the host had
            // applied the head).
            if let Ok(status) = fleet.status().await {
                let lag = status
                    .hosts
                    .iter()
                    .find(|h| h.host_id == fleet.host_id())
                    .map_or(0.0, |h| h.lag_seconds);
                metrics.fleet.lag_seconds.set(lag);
            }
            metrics.fleet.store_up.set(i64::from(fleet.is_up()));
        }
    });
}

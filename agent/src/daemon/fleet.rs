//! Fleet mode's side of the daemon (SPEC §10): a task that reports this
//! host's applied sequence to the shared store as soon as it moves (writers
//! on other hosts wait for it) and as a heartbeat every `fleet.poll`, and
//! keeps `keyfence_store_up`, `keyfence_fleet_applied_sequence` and
//! `keyfence_fleet_lag_seconds` current. It runs beside the event loop, so a
//! database that does not answer never holds enforcement up.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{metrics::Metrics, ratelimit::RateLimiter, store::SharedStore};

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
            let heartbeat = tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = tick.tick() => true,
            };
            let Some(fleet) = store.fleet() else { return };
            let applied = *progress.borrow_and_update();
            metrics.fleet.applied_sequence.set(applied);
            if let Err(e) = fleet.report(applied).await
                && logs.allow()
            {
                tracing::warn!(error = %e, "reporting this host's progress to the fleet");
            }
            if heartbeat && let Ok(status) = fleet.status().await {
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

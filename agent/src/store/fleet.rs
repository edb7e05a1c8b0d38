//! Fleet mode (SPEC §10): what a store shared by several gateway hosts
//! offers beyond [`KeyStore`](super::KeyStore). Each host reports the feed
//! position it enforces and a heartbeat; a write waits until every live host
//! has reported its sequence number; the step-up replay guard is shared.
//! [`super::postgres::PgStore`] is the one implementation.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;

use super::StoreFuture;
use crate::shim::sources::{SharedSource, SourceDelta};

/// How far a write is enforced across the fleet when its answer is sent:
/// `applied` of `hosts` live hosts have applied it; `lagging` names the others.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Enforcement {
    pub applied: usize,
    pub hosts: usize,
    pub lagging: Vec<String>,
}

/// One host as the store knows it (`GET /v1/fleet`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostStatus {
    pub host_id: String,
    /// The keyfence version it runs.
    pub version: String,
    pub applied_sequence: i64,
    /// RFC 3339.
    pub last_heartbeat: String,
    /// Seconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_seconds: f64,
    /// Heartbeat within `fleet.live_after`: writes wait for it.
    pub live: bool,
    /// How long the oldest change it has not applied has been waiting (0
    /// when it is current).
    pub lag_seconds: f64,
}

/// The fleet as a whole: the feed's head and every host that reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FleetStatus {
    pub head_sequence: i64,
    pub hosts: Vec<HostStatus>,
}

/// The calls only a shared store has.
pub trait Fleet: Send + Sync {
    /// This host's name in the fleet.
    fn host_id(&self) -> &str;
    /// Whether the database answered the last call (`keyfence_store_up`).
    fn is_up(&self) -> bool;
    /// Notified when another writer committed a change (its `NOTIFY`
    /// arrived) or the notification channel reconnected: read the feed.
    fn changed(&self) -> Arc<tokio::sync::Notify>;
    /// Record that this host enforces the feed up to `applied` (also its
    /// heartbeat), and tell writers waiting for it.
    fn report(&self, applied: i64) -> StoreFuture<'_, ()>;
    /// Wait until every live host has applied `seq`, at most `timeout`.
    /// `timeout` zero looks once without waiting (`?wait=local`).
    fn wait_applied(&self, seq: i64, timeout: Duration) -> StoreFuture<'_, Enforcement>;
    /// Every host that ever reported, and the feed's head.
    fn status(&self) -> StoreFuture<'_, FleetStatus>;
    /// Claim the step-up code of TOTP time step `step` for the whole fleet:
    /// `false` when this or a later step was already used on any host.
    fn claim_step(&self, step: u64) -> StoreFuture<'_, bool>;
    /// Add this host's per-key source counts (one batch, one statement),
    /// then keep at most `per_key` addresses of each key it touched (the
    /// most recently seen, whichever host saw them).
    fn flush_sources<'a>(&'a self, batch: &'a [SourceDelta], per_key: usize)
    -> StoreFuture<'a, ()>;
    /// The addresses every host saw for `key_id`, summed over hosts, most
    /// recent first, at most `limit`.
    fn sources<'a>(&'a self, key_id: &'a str, limit: usize) -> StoreFuture<'a, Vec<SharedSource>>;
}

/// `keyfence_store_up`, `keyfence_fleet_applied_sequence`,
/// `keyfence_fleet_lag_seconds`, `keyfence_fleet_sources_dropped_total`.
#[derive(Clone, Debug, Default)]
pub struct FleetMetrics {
    pub store_up: Gauge,
    pub applied_sequence: Gauge,
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub sources_dropped: Counter,
}

impl FleetMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        m.store_up.set(1);
        registry.register(
            "keyfence_store_up",
            "1 while the key store answers; 0 while it is unreachable (enforcement goes on from memory)",
            m.store_up.clone(),
        );
        registry.register(
            "keyfence_fleet_applied_sequence",
            "The store's change-feed sequence number this host enforces",
            m.applied_sequence.clone(),
        );
        registry.register(
            "keyfence_fleet_lag_seconds",
            "How long the oldest store change this host has not applied has been waiting (0 when current)",
            m.lag_seconds.clone(),
        );
        registry.register(
            "keyfence_fleet_sources_dropped",
            "Decisions left out of the fleet's per-key sources: their (key, address) found no room among the counts waiting for the store",
            m.sources_dropped.clone(),
        );
        m
    }
}

/// Seconds between `earlier` and `later`, 0 when `earlier` is not earlier.
#[must_use]
pub fn seconds_between(earlier: SystemTime, later: SystemTime) -> f64 {
    later
        .duration_since(earlier)
        .map_or(0.0, |d| d.as_secs_f64())
}

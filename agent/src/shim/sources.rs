//! Recently seen client addresses per key, with allowed and refused counts
//! (`GET /v1/keys/{id}/sources`): what an operator needs to answer "I added my
//! IP but it still says not allowed". Memory is bounded: at most
//! `per_key` addresses per key (the least recently seen is forgotten first) and
//! at most `keys` keys (when full, the least recently seen eighth of them is
//! forgotten at once).
//!
//! In fleet mode ([`Sources::share`]) the counts are also gathered as
//! deltas that the daemon flushes to the shared store in batches
//! ([`Sources::take_pending`]); the API then answers the sum over hosts
//! ([`Sources::merged`]). The deltas are bounded too: past `pending` distinct
//! (key, address) pairs waiting for the store (a database that is away for
//! long, or a flood of new sources), a new pair's counts are dropped and
//! counted ([`Sources::take_dropped`]); pairs already waiting keep counting.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;

use super::outcome::Outcome;

/// What is known of one address for one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceStats {
    pub ip: IpAddr,
    pub allowed: u64,
    pub refused: u64,
    #[serde(with = "unix_seconds")]
    pub last_seen: SystemTime,
}

/// One address for one key across the fleet: the sum of every host's
/// counts, and which hosts saw it (`GET /v1/keys/{id}/sources` in fleet mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SharedSource {
    pub ip: IpAddr,
    pub allowed: u64,
    pub refused: u64,
    #[serde(with = "unix_seconds")]
    pub last_seen: SystemTime,
    /// Sorted, each once.
    pub hosts: Vec<String>,
}

/// Counts one host gathered for one (key, address) since its last flush.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceDelta {
    pub key_id: String,
    pub ip: IpAddr,
    pub allowed: u64,
    pub refused: u64,
    pub last_seen: SystemTime,
}

/// The deltas waiting for the shared store, at most `cap` pairs.
struct Pending {
    cap: usize,
    len: usize,
    by_key: HashMap<String, HashMap<IpAddr, (u64, u64, SystemTime)>>,
}

impl Pending {
    /// Add counts; `false` when a new pair found no room.
    fn add(
        &mut self,
        key_id: &str,
        ip: IpAddr,
        allowed: u64,
        refused: u64,
        seen: SystemTime,
    ) -> bool {
        if let Some(slot) = self.by_key.get_mut(key_id).and_then(|k| k.get_mut(&ip)) {
            slot.0 += allowed;
            slot.1 += refused;
            slot.2 = slot.2.max(seen);
            return true;
        }
        if self.len >= self.cap {
            return false;
        }
        self.len += 1;
        self.by_key
            .entry(key_id.to_owned())
            .or_default()
            .insert(ip, (allowed, refused, seen));
        true
    }
}

mod unix_seconds {
    use std::time::SystemTime;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
    }
}

#[derive(Default)]
struct PerKey {
    addrs: HashMap<IpAddr, SourceStats>,
    last_seen: Option<SystemTime>,
    /// The last allowed use (the key's `last_used_at`).
    last_allowed: Option<SystemTime>,
    /// Allowed and refused decisions per minute, the last [`MINUTES`] minutes
    /// (the console's activity chart).
    minutes: std::collections::VecDeque<Minute>,
}

/// How many minutes of activity are kept per key.
pub const MINUTES: usize = 60;

/// One minute of decisions for a key: `(unix minute, allowed, refused)`.
pub type Minute = (u64, u64, u64);

fn unix_minute(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60
}

pub struct Sources {
    per_key: usize,
    keys: usize,
    inner: Mutex<Inner>,
    /// Counts of new pairs [`Pending`] had no room for.
    dropped: AtomicU64,
}

/// When the key table is full, the least recently seen `1/FORGET_AT_ONCE` of
/// it is forgotten in one pass: a scan of the table per new key would cost
/// every request of a gateway whose clients use more keys than it remembers
/// one pass over all of them (4096 entries, tens of µs).
const FORGET_AT_ONCE: usize = 8;

/// Forget the `n` keys seen least recently (ties broken arbitrarily).
fn forget_oldest(keys: &mut HashMap<String, PerKey>, n: usize) {
    let n = n.min(keys.len());
    if n == 0 {
        return;
    }
    let mut ages: Vec<(Option<SystemTime>, &String)> =
        keys.iter().map(|(id, k)| (k.last_seen, id)).collect();
    ages.select_nth_unstable(n - 1);
    let oldest: Vec<String> = ages[..n].iter().map(|&(_, id)| id.clone()).collect();
    for id in oldest {
        keys.remove(&id);
    }
}

#[derive(Default)]
struct Inner {
    keys: HashMap<String, PerKey>,
    /// `Some` in fleet mode.
    pending: Option<Pending>,
}

impl Sources {
    #[must_use]
    pub fn new(per_key: usize, keys: usize) -> Self {
        Self {
            per_key,
            keys,
            inner: Mutex::new(Inner::default()),
            dropped: AtomicU64::new(0),
        }
    }

    /// The addresses kept per key (here, and per key in the shared store).
    #[must_use]
    pub fn per_key(&self) -> usize {
        self.per_key
    }

    /// Fleet mode: from now on also gather deltas for the shared store, at
    /// most `pending` (key, address) pairs between flushes.
    pub fn share(&self, pending: usize) {
        let mut inner = self.lock();
        if inner.pending.is_none() {
            inner.pending = Some(Pending {
                cap: pending,
                len: 0,
                by_key: HashMap::new(),
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The deltas gathered since the last call, sorted by key and address
    /// (writers lock rows in one order), and none left waiting.
    #[must_use]
    pub fn take_pending(&self) -> Vec<SourceDelta> {
        let by_key = {
            let mut inner = self.lock();
            let Some(p) = inner.pending.as_mut() else {
                return Vec::new();
            };
            p.len = 0;
            std::mem::take(&mut p.by_key)
        };
        let mut out: Vec<SourceDelta> = by_key
            .into_iter()
            .flat_map(|(key_id, addrs)| {
                addrs
                    .into_iter()
                    .map(move |(ip, (allowed, refused, last_seen))| SourceDelta {
                        key_id: key_id.clone(),
                        ip,
                        allowed,
                        refused,
                        last_seen,
                    })
            })
            .collect();
        out.sort_by(|a, b| a.key_id.cmp(&b.key_id).then(a.ip.cmp(&b.ip)));
        out
    }

    /// Put back deltas a flush could not write (the store is away), merged
    /// with what arrived meanwhile; what finds no room is dropped and counted.
    pub fn restore(&self, deltas: Vec<SourceDelta>) {
        let mut lost = 0;
        {
            let mut inner = self.lock();
            let Some(p) = inner.pending.as_mut() else {
                return;
            };
            for d in deltas {
                if !p.add(&d.key_id, d.ip, d.allowed, d.refused, d.last_seen) {
                    lost += d.allowed + d.refused;
                }
            }
        }
        self.dropped.fetch_add(lost, Ordering::Relaxed);
    }

    /// Decisions whose counts found no room while waiting for the store,
    /// since the last call.
    #[must_use]
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// The fleet's view of `key_id` (`shared`, read from the store) with
    /// this host's deltas not yet flushed added as `host`'s, most recent
    /// first, at most [`Sources::per_key`] addresses.
    #[must_use]
    pub fn merged(&self, key_id: &str, shared: Vec<SharedSource>, host: &str) -> Vec<SharedSource> {
        let mut by_ip: HashMap<IpAddr, SharedSource> =
            shared.into_iter().map(|s| (s.ip, s)).collect();
        {
            let inner = self.lock();
            let waiting = inner
                .pending
                .as_ref()
                .and_then(|p| p.by_key.get(key_id))
                .into_iter()
                .flatten();
            for (&ip, &(allowed, refused, seen)) in waiting {
                let s = by_ip.entry(ip).or_insert_with(|| SharedSource {
                    ip,
                    allowed: 0,
                    refused: 0,
                    last_seen: seen,
                    hosts: Vec::new(),
                });
                s.allowed += allowed;
                s.refused += refused;
                s.last_seen = s.last_seen.max(seen);
                if let Err(at) = s.hosts.binary_search_by(|h| h.as_str().cmp(host)) {
                    s.hosts.insert(at, host.to_owned());
                }
            }
        }
        let mut out: Vec<SharedSource> = by_ip.into_values().collect();
        out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.ip.cmp(&b.ip)));
        out.truncate(self.per_key);
        out
    }

    /// This host's own view as the fleet's shape (every address seen by
    /// `host`): what the API answers while the shared store is away.
    #[must_use]
    pub fn local_shared(&self, key_id: &str, host: &str) -> Vec<SharedSource> {
        self.of(key_id)
            .into_iter()
            .map(|s| SharedSource {
                ip: s.ip,
                allowed: s.allowed,
                refused: s.refused,
                last_seen: s.last_seen,
                hosts: vec![host.to_owned()],
            })
            .collect()
    }

    /// Record one decision for `key_id` from `ip` (see
    /// [`Outcome::counts_as_allowed`]).
    pub fn record(&self, key_id: &str, ip: IpAddr, decided: Outcome, now: SystemTime) {
        let allowed = decided.counts_as_allowed();
        let mut guard = self.lock();
        let Inner {
            keys: inner,
            pending,
        } = &mut *guard;
        if let Some(p) = pending
            && !p.add(key_id, ip, u64::from(allowed), u64::from(!allowed), now)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // Look up by `&str` first: a key already known costs no `String`,
        // and only a new key pays the check for room.
        if !inner.contains_key(key_id) {
            if inner.len() >= self.keys {
                forget_oldest(inner, self.keys.div_ceil(FORGET_AT_ONCE));
            }
            inner.insert(key_id.to_owned(), PerKey::default());
        }
        let Some(entry) = inner.get_mut(key_id) else {
            return;
        };
        entry.last_seen = Some(now);
        // The length first: the address is hashed here only when full.
        if entry.addrs.len() >= self.per_key
            && !entry.addrs.contains_key(&ip)
            && let Some(oldest) = entry
                .addrs
                .values()
                .min_by_key(|s| s.last_seen)
                .map(|s| s.ip)
        {
            entry.addrs.remove(&oldest);
        }
        let stats = entry.addrs.entry(ip).or_insert(SourceStats {
            ip,
            allowed: 0,
            refused: 0,
            last_seen: now,
        });
        if allowed {
            stats.allowed += 1;
            entry.last_allowed = Some(now);
        } else {
            stats.refused += 1;
        }
        stats.last_seen = now;
        let minute = unix_minute(now);
        match entry.minutes.back_mut() {
            Some(last) if last.0 == minute => {}
            _ => {
                entry.minutes.push_back((minute, 0, 0));
                if entry.minutes.len() > MINUTES {
                    entry.minutes.pop_front();
                }
            }
        }
        if let Some(last) = entry.minutes.back_mut() {
            if allowed {
                last.1 += 1;
            } else {
                last.2 += 1;
            }
        }
    }

    /// Allowed and refused decisions for `key_id` in each of the last
    /// [`MINUTES`] minutes before `now`, oldest first (minutes without any
    /// are zero).
    #[must_use]
    pub fn activity(&self, key_id: &str, now: SystemTime) -> Vec<(u64, u64)> {
        let inner = self.lock();
        let current = unix_minute(now);
        let mut out = vec![(0, 0); MINUTES];
        for &(minute, allowed, refused) in inner
            .keys
            .get(key_id)
            .map(|k| &k.minutes)
            .into_iter()
            .flatten()
        {
            let Some(ago) = current.checked_sub(minute) else {
                continue;
            };
            if let Some(slot) = usize::try_from(ago)
                .ok()
                .filter(|&a| a < MINUTES)
                .map(|a| MINUTES - 1 - a)
            {
                out[slot] = (allowed, refused);
            }
        }
        out
    }

    /// The addresses seen for `key_id`, most recent first.
    #[must_use]
    pub fn of(&self, key_id: &str) -> Vec<SourceStats> {
        let inner = self.lock();
        let mut out: Vec<SourceStats> = inner
            .keys
            .get(key_id)
            .map(|k| k.addrs.values().cloned().collect())
            .unwrap_or_default();
        out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.ip.cmp(&b.ip)));
        out
    }

    /// The last allowed use of every key seen.
    #[must_use]
    pub fn last_used(&self) -> Vec<(String, SystemTime)> {
        self.lock()
            .keys
            .iter()
            .filter_map(|(id, k)| k.last_allowed.map(|t| (id.clone(), t)))
            .collect()
    }

    /// Forget a key (revoked), its waiting deltas too.
    pub fn forget(&self, key_id: &str) {
        let mut inner = self.lock();
        inner.keys.remove(key_id);
        if let Some(p) = inner.pending.as_mut()
            && let Some(gone) = p.by_key.remove(key_id)
        {
            p.len -= gone.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_and_order() {
        let s = Sources::new(8, 8);
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(1));
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(2));
        s.record("k", ip("203.0.113.9"), Outcome::IpNotAllowed, t(3));
        let seen = s.of("k");
        assert_eq!(seen[0].ip, ip("203.0.113.9"));
        assert_eq!((seen[0].allowed, seen[0].refused), (0, 1));
        assert_eq!((seen[1].allowed, seen[1].refused), (2, 0));
        assert!(s.of("other").is_empty());
        assert_eq!(
            s.last_used(),
            vec![("k".to_string(), t(2))],
            "refusals are not uses"
        );
    }

    #[test]
    fn memory_is_bounded() {
        let s = Sources::new(3, 2);
        for i in 0..10u8 {
            s.record(
                "k",
                IpAddr::from([192, 0, 2, i]),
                Outcome::Allowed,
                t(u64::from(i)),
            );
        }
        let seen = s.of("k");
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].ip, ip("192.0.2.9"), "the most recent stay");
        s.record("a", ip("192.0.2.1"), Outcome::Allowed, t(20));
        s.record("b", ip("192.0.2.1"), Outcome::Allowed, t(21));
        assert!(
            s.of("k").is_empty(),
            "the least recently seen key went first"
        );
        assert_eq!(s.of("a").len(), 1);
        s.forget("a");
        assert!(s.of("a").is_empty());
    }

    #[test]
    fn a_full_key_table_forgets_its_least_recently_seen_eighth_at_once() {
        let s = Sources::new(4, 16);
        let key = |i: u64| format!("key-{i}");
        for i in 0..16u64 {
            s.record(&key(i), ip("192.0.2.1"), Outcome::Allowed, t(i));
        }
        // Seen again: now the most recent, whatever its place in the fill.
        s.record(&key(0), ip("192.0.2.1"), Outcome::Allowed, t(100));
        s.record("new-1", ip("192.0.2.1"), Outcome::Allowed, t(101));
        let kept = |i: u64| !s.of(&key(i)).is_empty();
        assert!(kept(0), "a key seen again is not among the oldest");
        assert!(!kept(1) && !kept(2), "the two least recently seen went");
        assert!((3..16).all(kept), "only two went");
        assert_eq!(s.of("new-1").len(), 1);
        // Room for one more without forgetting anything.
        s.record("new-2", ip("192.0.2.1"), Outcome::Allowed, t(102));
        assert!((3..16).all(kept) && kept(0) && !s.of("new-2").is_empty());
        // Full again: the next two oldest go.
        s.record("new-3", ip("192.0.2.1"), Outcome::Allowed, t(103));
        assert!(!kept(3) && !kept(4) && (5..16).all(kept));
    }

    #[test]
    fn forgetting_with_equal_ages_forgets_exactly_as_many() {
        let mut keys: HashMap<String, PerKey> = (0..10)
            .map(|i| {
                let k = PerKey {
                    last_seen: Some(t(if i < 6 { 5 } else { 9 })),
                    ..PerKey::default()
                };
                (format!("k{i}"), k)
            })
            .collect();
        forget_oldest(&mut keys, 3);
        assert_eq!(keys.len(), 7);
        assert_eq!(
            keys.values().filter(|k| k.last_seen == Some(t(9))).count(),
            4,
            "the newer keys all stay"
        );
        forget_oldest(&mut keys, 100);
        assert!(keys.is_empty());
    }

    #[test]
    fn activity_per_minute_for_the_last_hour() {
        let s = Sources::new(8, 8);
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(600));
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(601));
        s.record("k", ip("192.0.2.2"), Outcome::IpNotAllowed, t(665));
        let a = s.activity("k", t(700));
        assert_eq!(a.len(), MINUTES);
        assert_eq!(a[MINUTES - 1], (0, 1), "this minute");
        assert_eq!(a[MINUTES - 2], (2, 0), "the minute before");
        assert_eq!(a.iter().map(|m| m.0 + m.1).sum::<u64>(), 3);
        let later = s.activity("k", t(700 + 3600));
        assert!(later.iter().all(|m| *m == (0, 0)), "older than an hour");
        assert!(s.activity("other", t(700)).iter().all(|m| *m == (0, 0)));
    }

    #[test]
    fn deltas_for_the_fleet_are_bounded_and_survive_a_failed_flush() {
        let s = Sources::new(8, 8);
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(1));
        assert!(s.take_pending().is_empty(), "not shared: nothing gathered");
        s.share(2);
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(2));
        s.record("k", ip("192.0.2.1"), Outcome::IpNotAllowed, t(3));
        s.record("a", ip("192.0.2.2"), Outcome::Allowed, t(4));
        s.record("a", ip("192.0.2.3"), Outcome::Allowed, t(5));
        assert_eq!(s.take_dropped(), 1, "a third pair found no room");
        let batch = s.take_pending();
        assert_eq!(
            batch
                .iter()
                .map(|d| (d.key_id.as_str(), d.allowed, d.refused, d.last_seen))
                .collect::<Vec<_>>(),
            vec![("a", 1, 0, t(4)), ("k", 1, 1, t(3))],
            "sorted by key, one delta per pair"
        );
        assert!(s.take_pending().is_empty(), "taken once");
        // The store was away: back they go, merged with what came meanwhile.
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(6));
        s.restore(batch);
        let again = s.take_pending();
        assert_eq!(again.len(), 2);
        assert_eq!(
            (again[1].allowed, again[1].refused, again[1].last_seen),
            (2, 1, t(6))
        );
        assert_eq!(s.take_dropped(), 0);
        s.record("a", ip("192.0.2.9"), Outcome::Allowed, t(7));
        s.record("b", ip("192.0.2.9"), Outcome::Allowed, t(7));
        s.restore(again);
        assert_eq!(
            s.take_dropped(),
            4,
            "no room left for the restored pairs (1 + 3 decisions)"
        );
        s.forget("a");
        s.record("c", ip("192.0.2.9"), Outcome::Allowed, t(8));
        assert_eq!(s.take_pending().len(), 2, "forgetting a key frees its room");
    }

    #[test]
    fn merged_adds_this_hosts_unflushed_counts() {
        let s = Sources::new(2, 8);
        s.share(16);
        s.record("k", ip("192.0.2.1"), Outcome::Allowed, t(10));
        let shared = vec![
            SharedSource {
                ip: ip("192.0.2.1"),
                allowed: 3,
                refused: 1,
                last_seen: t(5),
                hosts: vec!["gw-b".into()],
            },
            SharedSource {
                ip: ip("192.0.2.7"),
                allowed: 1,
                refused: 0,
                last_seen: t(7),
                hosts: vec!["gw-a".into(), "gw-c".into()],
            },
            SharedSource {
                ip: ip("192.0.2.8"),
                allowed: 1,
                refused: 0,
                last_seen: t(1),
                hosts: vec!["gw-c".into()],
            },
        ];
        let m = s.merged("k", shared, "gw-a");
        assert_eq!(m.len(), 2, "per-key cap");
        assert_eq!(m[0].ip, ip("192.0.2.1"));
        assert_eq!((m[0].allowed, m[0].refused, m[0].last_seen), (4, 1, t(10)));
        assert_eq!(m[0].hosts, vec!["gw-a".to_string(), "gw-b".to_string()]);
        assert_eq!(m[1].hosts, vec!["gw-a".to_string(), "gw-c".to_string()]);
        let json = serde_json::to_value(&m[1]).unwrap();
        assert_eq!(json["hosts"], serde_json::json!(["gw-a", "gw-c"]));
        assert_eq!(
            s.local_shared("k", "gw-a")[0].hosts,
            vec!["gw-a".to_string()]
        );
    }

    #[test]
    fn serializes_for_the_api() {
        let s = Sources::new(3, 3);
        s.record("k", ip("2001:db8::7"), Outcome::IpNotAllowed, t(86_400));
        let json = serde_json::to_string(&s.of("k")).unwrap();
        assert_eq!(
            json,
            r#"[{"ip":"2001:db8::7","allowed":0,"refused":1,"last_seen":"1970-01-02T00:00:00Z"}]"#
        );
    }
}

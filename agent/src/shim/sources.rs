//! Recently seen client addresses per key, with allowed and refused counts
//! (`GET /v1/keys/{id}/sources`): what an operator needs to answer "I added my
//! IP but it still says not allowed". Memory is bounded: at most
//! `per_key` addresses per key (the least recently seen is forgotten first) and
//! at most `keys` keys.

use std::{collections::HashMap, net::IpAddr, sync::Mutex, time::SystemTime};

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
    inner: Mutex<HashMap<String, PerKey>>,
}

impl Sources {
    #[must_use]
    pub fn new(per_key: usize, keys: usize) -> Self {
        Self {
            per_key,
            keys,
            inner: Mutex::new(HashMap::new()),
        }
    }

    /// Record one decision for `key_id` from `ip` (see
    /// [`Outcome::counts_as_allowed`]).
    pub fn record(&self, key_id: &str, ip: IpAddr, decided: Outcome, now: SystemTime) {
        let allowed = decided.counts_as_allowed();
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !inner.contains_key(key_id) && inner.len() >= self.keys {
            // Forget the key seen least recently.
            if let Some(oldest) = inner
                .iter()
                .min_by_key(|(_, k)| k.last_seen)
                .map(|(id, _)| id.clone())
            {
                inner.remove(&oldest);
            }
        }
        // Look up by `&str` first: a key already known costs no `String`.
        if !inner.contains_key(key_id) {
            inner.insert(key_id.to_owned(), PerKey::default());
        }
        let Some(entry) = inner.get_mut(key_id) else {
            return;
        };
        entry.last_seen = Some(now);
        if !entry.addrs.contains_key(&ip)
            && entry.addrs.len() >= self.per_key
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
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = unix_minute(now);
        let mut out = vec![(0, 0); MINUTES];
        for &(minute, allowed, refused) in
            inner.get(key_id).map(|k| &k.minutes).into_iter().flatten()
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
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<SourceStats> = inner
            .get(key_id)
            .map(|k| k.addrs.values().cloned().collect())
            .unwrap_or_default();
        out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.ip.cmp(&b.ip)));
        out
    }

    /// The last allowed use of every key seen.
    #[must_use]
    pub fn last_used(&self) -> Vec<(String, SystemTime)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(|(id, k)| k.last_allowed.map(|t| (id.clone(), t)))
            .collect()
    }

    /// Forget a key (revoked).
    pub fn forget(&self, key_id: &str) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key_id);
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

//! Throttling of failed attempts on the management API: wrong step-up codes
//! (per principal and per source address) and unknown bearer tokens (per
//! source address). A TOTP code has a million values and three of them are
//! valid at any moment, so unthrottled guessing finds one within seconds.
//!
//! The rule: `failures` failed attempts within `window` lock the subject out
//! for `first_lockout`; each further lockout in a row doubles that, up to
//! `max_lockout`; the doubling is forgotten once the subject has stayed quiet
//! for `max_lockout` after its last lockout ended. While locked out every
//! attempt is refused (429) before it is checked, so a correct code or token
//! does not help until the lockout ends.
//!
//! [`Table`] is the pure logic with the clock passed in; [`Guard`] holds the
//! API's tables, counts metrics and writes rate-limited log lines.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::ratelimit::RateLimiter;

/// The throttle's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Failed attempts that start a lockout…
    pub failures: u32,
    /// …when they fall within this long of the first of them.
    pub window: Duration,
    /// The first lockout; each one in a row doubles it.
    pub first_lockout: Duration,
    /// The longest lockout, and how long a subject must stay quiet after a
    /// lockout before the doubling starts over.
    pub max_lockout: Duration,
    /// Subjects remembered at most (per table); see [`Table`].
    pub capacity: usize,
}

impl Limits {
    /// 5 failures per 30 s step, then 30 s, 60 s, 120 s, … up to 15 min.
    pub const DEFAULT: Self = Self {
        failures: 5,
        window: Duration::from_secs(30),
        first_lockout: Duration::from_secs(30),
        max_lockout: Duration::from_mins(15),
        capacity: 4096,
    };

    /// The `n`-th lockout in a row (1-based).
    #[must_use]
    pub fn lockout(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.first_lockout
            .saturating_mul(1u32 << doublings)
            .min(self.max_lockout)
    }
}

/// A lockout that a failure just started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lockout {
    /// How long it lasts.
    pub duration: Duration,
    /// Its number in a row (1 for the first).
    pub number: u32,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Failures in the current window.
    failures: u32,
    window_start: Instant,
    /// Lockouts in a row.
    lockouts: u32,
    locked_until: Option<Instant>,
    /// Last attempt (its key in `Table::by_age`).
    touched: (Instant, u64),
}

/// Failed attempts per subject, at most `capacity` subjects. When a new
/// subject arrives at a full table, the subject whose last attempt is oldest
/// is forgotten, lockout and all: an attacker who can send failures from more
/// than `capacity` subjects within one lockout can thus end its own lockouts
/// early, but such an attacker already gets `failures` attempts per subject
/// and window, and memory stays bounded whatever it sends. Subjects with
/// nothing left to remember are dropped as they age.
#[derive(Debug)]
pub struct Table<K> {
    limits: Limits,
    entries: HashMap<K, Entry>,
    /// Subjects by last attempt, oldest first.
    by_age: BTreeMap<(Instant, u64), K>,
    next_seq: u64,
}

impl<K: Clone + Eq + Hash> Table<K> {
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            next_seq: 0,
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How long `key` stays locked out, if it is. A refused attempt counts as
    /// activity (it keeps the subject from being the first forgotten).
    pub fn locked(&mut self, key: &K, now: Instant) -> Option<Duration> {
        let until = self.entries.get(key)?.locked_until?;
        let left = until.checked_duration_since(now).filter(|d| !d.is_zero())?;
        self.touch(key, now);
        Some(left)
    }

    /// Count a failed attempt of `key`; returns the lockout it starts, if any.
    /// A failure during a lockout (attempts checked concurrently) adds nothing.
    pub fn fail(&mut self, key: &K, now: Instant) -> Option<Lockout> {
        if !self.entries.contains_key(key) {
            self.make_room(now);
            let touched = self.stamp(now);
            self.by_age.insert(touched, key.clone());
            self.entries.insert(
                key.clone(),
                Entry {
                    failures: 0,
                    window_start: now,
                    lockouts: 0,
                    locked_until: None,
                    touched,
                },
            );
        }
        self.touch(key, now);
        let limits = self.limits;
        let e = self.entries.get_mut(key)?;
        if let Some(until) = e.locked_until {
            if now < until {
                return None;
            }
            if now.saturating_duration_since(until) >= limits.max_lockout {
                e.lockouts = 0;
                e.locked_until = None;
            }
        }
        if e.failures == 0 || now.saturating_duration_since(e.window_start) >= limits.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures += 1;
        if e.failures < limits.failures {
            return None;
        }
        e.failures = 0;
        e.lockouts = e.lockouts.saturating_add(1);
        let duration = limits.lockout(e.lockouts);
        e.locked_until = Some(now + duration);
        Some(Lockout {
            duration,
            number: e.lockouts,
        })
    }

    fn stamp(&mut self, now: Instant) -> (Instant, u64) {
        self.next_seq += 1;
        (now, self.next_seq)
    }

    fn touch(&mut self, key: &K, now: Instant) {
        let stamp = self.stamp(now);
        if let Some(e) = self.entries.get_mut(key) {
            self.by_age.remove(&e.touched);
            e.touched = stamp;
            self.by_age.insert(stamp, key.clone());
        }
    }

    /// Whether `e` holds nothing that still matters at `now`.
    fn idle(&self, e: &Entry, now: Instant) -> bool {
        let counting =
            e.failures > 0 && now.saturating_duration_since(e.window_start) < self.limits.window;
        let remembered = e.locked_until.is_some_and(|until| {
            now < until || now.saturating_duration_since(until) < self.limits.max_lockout
        });
        !counting && !remembered
    }

    /// Drop idle subjects from the old end, then, if still full, the oldest.
    fn make_room(&mut self, now: Instant) {
        while let Some((&stamp, key)) = self.by_age.first_key_value() {
            let idle = self.entries.get(key).is_none_or(|e| self.idle(e, now));
            if !idle && self.entries.len() < self.limits.capacity {
                break;
            }
            let key = key.clone();
            self.by_age.remove(&stamp);
            self.entries.remove(&key);
        }
    }
}

/// What a throttle counts a failure against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// `admin:NAME` or `key:ID`.
    Principal(String),
    /// A source address: IPv4 as is, IPv6 by its /64 (one host's usual share).
    Address(IpAddr),
}

impl Subject {
    #[must_use]
    pub fn address(ip: IpAddr) -> Self {
        Self::Address(match crate::allowlist::fold_ip(ip) {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            v4 @ IpAddr::V4(_) => v4,
        })
    }

    #[must_use]
    pub fn scope(&self) -> &'static str {
        match self {
            Self::Principal(_) => "principal",
            Self::Address(_) => "address",
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Principal(p) => f.write_str(p),
            Self::Address(IpAddr::V6(net)) => write!(f, "{net}/64"),
            Self::Address(ip) => write!(f, "{ip}"),
        }
    }
}

/// What the throttle guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An unknown bearer token.
    Token,
    /// A wrong or replayed step-up code.
    Confirm,
}

impl Reason {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Confirm => "confirm",
        }
    }

    /// The 429 body's message.
    #[must_use]
    pub fn refusal(self) -> &'static str {
        match self {
            Self::Token => "too many failed authentications",
            Self::Confirm => "too many failed confirmations",
        }
    }
}

/// A failed management attempt: the `reason` label of
/// `keyfence_management_auth_failures`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// An unknown bearer token.
    Token,
    /// A valid token from outside its principal's list.
    Address,
    /// A wrong or replayed step-up code.
    Confirm,
}

impl Failure {
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Address => "address",
            Self::Confirm => "confirm",
        }
    }
}

impl From<Reason> for Failure {
    fn from(reason: Reason) -> Self {
        match reason {
            Reason::Token => Self::Token,
            Reason::Confirm => Self::Confirm,
        }
    }
}

/// A lockout that just started, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    pub reason: Reason,
    pub subject: Subject,
    pub lockout: Lockout,
}

/// The outcome of one guarded attempt.
#[derive(Debug)]
pub enum Attempt<T, E> {
    /// Refused unchecked: a subject is locked out for this long.
    Throttled(Duration),
    Passed(T),
    /// Checked and failed; the lockouts this failure started.
    Failed(E, Vec<Started>),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LockoutLabel {
    reason: &'static str,
    scope: &'static str,
}

/// The management API's security counters.
#[derive(Clone, Debug, Default)]
pub struct ManagementMetrics {
    auth_failures: Family<ReasonLabel, Counter>,
    throttled: Family<ReasonLabel, Counter>,
    lockouts: Family<LockoutLabel, Counter>,
}

impl ManagementMetrics {
    /// Register the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "keyfence_management_auth_failures",
            "Failed management API attempts: reason token (unknown bearer token), \
             address (valid token from outside its list), confirm (wrong or replayed step-up code)",
            m.auth_failures.clone(),
        );
        registry.register(
            "keyfence_management_throttled",
            "Management API requests refused with 429 during a lockout, by reason",
            m.throttled.clone(),
        );
        registry.register(
            "keyfence_management_lockouts",
            "Lockouts started after repeated failures, by reason and scope (principal or address)",
            m.lockouts.clone(),
        );
        m
    }

    fn failure(&self, failure: Failure) {
        self.auth_failures
            .get_or_create(&ReasonLabel {
                reason: failure.label(),
            })
            .inc();
    }
}

/// The management API's throttles, metrics and log limiter.
pub struct Guard {
    tokens: Mutex<Table<Subject>>,
    confirms: Mutex<Table<Subject>>,
    metrics: ManagementMetrics,
    /// Refusal and lockout lines: a flood of guesses must not fill the disk.
    logs: RateLimiter,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guard")
    }
}

impl Guard {
    #[must_use]
    pub fn new(limits: Limits, metrics: ManagementMetrics) -> Self {
        Self {
            tokens: Mutex::new(Table::new(limits)),
            confirms: Mutex::new(Table::new(limits)),
            metrics,
            logs: RateLimiter::new(20, Duration::from_secs(1)),
        }
    }

    /// Authenticate from `ip` with `check`, throttled per address. `Err(true)`
    /// of `counts` marks a failure that counts (an unknown token; not a
    /// missing one, nor a valid token from outside its list).
    pub fn authenticate<T, E>(
        &self,
        ip: IpAddr,
        now: Instant,
        check: impl FnOnce() -> Result<T, E>,
        counts: impl FnOnce(&E) -> bool,
    ) -> Attempt<T, E> {
        let subjects = [Subject::address(ip)];
        self.attempt(
            &self.tokens,
            Reason::Token,
            &subjects,
            ip,
            now,
            check,
            counts,
        )
    }

    /// Verify a step-up code of `principal` from `ip` with `check`, throttled
    /// per principal and per address.
    pub fn confirm<T, E>(
        &self,
        principal: &str,
        ip: IpAddr,
        now: Instant,
        check: impl FnOnce() -> Result<T, E>,
        counts: impl FnOnce(&E) -> bool,
    ) -> Attempt<T, E> {
        let subjects = [
            Subject::Principal(principal.to_owned()),
            Subject::address(ip),
        ];
        self.attempt(
            &self.confirms,
            Reason::Confirm,
            &subjects,
            ip,
            now,
            check,
            counts,
        )
    }

    /// A valid token from outside its principal's list: counted, not throttled
    /// (nothing was guessed).
    pub fn address_refused(&self, ip: IpAddr) {
        self.metrics.failure(Failure::Address);
        if self.logs.allow() {
            tracing::info!(client = %ip, "management request refused: address not allowed for this token");
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one private helper shared by the two public entry points"
    )]
    fn attempt<T, E>(
        &self,
        table: &Mutex<Table<Subject>>,
        reason: Reason,
        subjects: &[Subject],
        ip: IpAddr,
        now: Instant,
        check: impl FnOnce() -> Result<T, E>,
        counts: impl FnOnce(&E) -> bool,
    ) -> Attempt<T, E> {
        // Held across the check: concurrent attempts cannot all pass the
        // lockout test before any of their failures is counted. Checks are
        // a digest or three HMACs, microseconds.
        let mut t = table.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = subjects.iter().filter_map(|s| t.locked(s, now)).max();
        if let Some(wait) = wait {
            drop(t);
            self.metrics
                .throttled
                .get_or_create(&ReasonLabel {
                    reason: reason.label(),
                })
                .inc();
            if self.logs.allow() {
                tracing::warn!(
                    client = %ip,
                    reason = reason.label(),
                    retry_after = wait.as_secs(),
                    "management request refused: locked out after repeated failures"
                );
            }
            return Attempt::Throttled(wait);
        }
        let err = match check() {
            Ok(v) => return Attempt::Passed(v),
            Err(e) => e,
        };
        if !counts(&err) {
            return Attempt::Failed(err, Vec::new());
        }
        let started: Vec<Started> = subjects
            .iter()
            .filter_map(|s| {
                t.fail(s, now).map(|lockout| Started {
                    reason,
                    subject: s.clone(),
                    lockout,
                })
            })
            .collect();
        drop(t);
        self.metrics.failure(reason.into());
        if self.logs.allow() {
            tracing::warn!(client = %ip, reason = reason.label(), "management request refused: failed attempt");
        }
        for s in &started {
            self.metrics
                .lockouts
                .get_or_create(&LockoutLabel {
                    reason: reason.label(),
                    scope: s.subject.scope(),
                })
                .inc();
            if self.logs.allow() {
                tracing::warn!(
                    client = %ip,
                    reason = reason.label(),
                    subject = %s.subject,
                    seconds = s.lockout.duration.as_secs(),
                    number = s.lockout.number,
                    "management lockout started"
                );
            }
        }
        Attempt::Failed(err, started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        failures: 5,
        window: Duration::from_secs(30),
        first_lockout: Duration::from_secs(30),
        max_lockout: Duration::from_mins(15),
        capacity: 8,
    };

    /// The `reason` labels dashboards match on.
    #[test]
    fn failure_labels_are_the_published_ones() {
        assert_eq!(
            [Failure::Token, Failure::Address, Failure::Confirm].map(Failure::label),
            ["token", "address", "confirm"]
        );
        assert_eq!(Failure::from(Reason::Token), Failure::Token);
        assert_eq!(Failure::from(Reason::Confirm), Failure::Confirm);
        assert_eq!(Reason::Confirm.label(), "confirm");
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn five_failures_in_a_window_lock_out() {
        let t0 = Instant::now();
        let mut t = Table::new(L);
        for i in 0..4 {
            assert_eq!(t.fail(&"a", secs(t0, i)), None, "failure {i}");
            assert_eq!(t.locked(&"a", secs(t0, i)), None);
        }
        let lockout = t.fail(&"a", secs(t0, 4)).expect("the fifth failure locks");
        assert_eq!(
            lockout,
            Lockout {
                duration: Duration::from_secs(30),
                number: 1
            }
        );
        assert_eq!(t.locked(&"a", secs(t0, 4)), Some(Duration::from_secs(30)));
        assert_eq!(t.locked(&"a", secs(t0, 20)), Some(Duration::from_secs(14)));
        assert_eq!(
            t.locked(&"b", secs(t0, 20)),
            None,
            "others are not affected"
        );
        // A failure during the lockout (a concurrent attempt) adds nothing.
        assert_eq!(t.fail(&"a", secs(t0, 10)), None);
        assert_eq!(t.locked(&"a", secs(t0, 34)), None, "expired");
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_lock() {
        let t0 = Instant::now();
        let mut t = Table::new(L);
        // Four failures per 30 s, forever: never five in one window.
        for i in 0..40 {
            let at = secs(t0, (i / 4) * 31 + i % 4);
            assert_eq!(t.fail(&"a", at), None, "failure {i}");
        }
    }

    #[test]
    fn repeated_lockouts_back_off_up_to_the_cap_then_are_forgotten() {
        let t0 = Instant::now();
        let mut t = Table::new(L);
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let mut started = None;
            for _ in 0..5 {
                started = t.fail(&"a", now);
            }
            let l = started.expect("five failures lock");
            seen.push(l.duration.as_secs());
            // Wait the lockout out, then fail again at once.
            now += l.duration;
            assert_eq!(t.locked(&"a", now), None);
        }
        assert_eq!(seen, [30, 60, 120, 240, 480, 900, 900, 900]);
        // Quiet for the cap after the last lockout: back to the first step.
        now += L.max_lockout;
        let mut started = None;
        for _ in 0..5 {
            started = t.fail(&"a", now);
        }
        assert_eq!(
            started.map(|l| (l.duration.as_secs(), l.number)),
            Some((30, 1))
        );
        assert_eq!(
            Limits::DEFAULT.lockout(u32::MAX),
            Limits::DEFAULT.max_lockout
        );
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_the_oldest() {
        let t0 = Instant::now();
        let mut t = Table::new(L);
        // "victim" is locked out first, then 100 other subjects fail once each.
        for _ in 0..5 {
            t.fail(&0u32, t0);
        }
        assert!(t.locked(&0, t0).is_some());
        for k in 1..=100u32 {
            t.fail(&k, secs(t0, 1) + Duration::from_millis(u64::from(k)));
            assert!(t.len() <= L.capacity, "{} subjects", t.len());
            assert_eq!(t.by_age.len(), t.len());
        }
        assert_eq!(t.len(), L.capacity);
        assert_eq!(t.locked(&0, secs(t0, 2)), None, "the oldest was forgotten");
        assert_eq!(t.locked(&100, secs(t0, 2)), None);
        // Idle subjects are dropped as new ones arrive, long after.
        let later = secs(t0, 3600);
        t.fail(&1000, later);
        assert_eq!(t.len(), 1, "only the new subject is left");
    }

    #[test]
    fn a_recently_refused_subject_is_kept_over_quiet_ones() {
        let t0 = Instant::now();
        let mut t = Table::new(L);
        for _ in 0..5 {
            t.fail(&0u32, t0);
        }
        for k in 1..8u32 {
            t.fail(&k, secs(t0, 1));
        }
        // The locked subject keeps trying (refused): it is not the oldest.
        assert!(t.locked(&0, secs(t0, 2)).is_some());
        t.fail(&100, secs(t0, 3));
        assert!(t.locked(&0, secs(t0, 3)).is_some(), "still locked");
        assert_eq!(t.len(), L.capacity);
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let a = Subject::address("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Subject::address("2001:db8:1:2:bbbb::2".parse().unwrap());
        let c = Subject::address("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let v4 = Subject::address("::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(v4, Subject::Address("192.0.2.7".parse().unwrap()));
        assert_eq!(v4.to_string(), "192.0.2.7");
    }

    fn guard() -> Guard {
        Guard::new(L, ManagementMetrics::default())
    }

    /// A check that fails unless `code` is "right".
    fn check(code: &str) -> Result<(), &'static str> {
        if code == "right" {
            Ok(())
        } else {
            Err("wrong")
        }
    }

    #[test]
    fn a_correct_code_during_a_lockout_is_refused_unchecked() {
        let g = guard();
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.100".parse().unwrap();
        for i in 0..4 {
            let a = g.confirm("admin:ops", ip, t0, || check("wrong"), |_| true);
            assert!(
                matches!(a, Attempt::Failed("wrong", ref s) if s.is_empty()),
                "{i}: {a:?}"
            );
        }
        let a = g.confirm("admin:ops", ip, t0, || check("wrong"), |_| true);
        let Attempt::Failed(_, started) = a else {
            panic!("{a:?}")
        };
        let scopes: Vec<&str> = started.iter().map(|s| s.subject.scope()).collect();
        assert_eq!(scopes, ["principal", "address"], "both are locked");
        let mut checked = false;
        let a = g.confirm(
            "admin:ops",
            ip,
            secs(t0, 1),
            || {
                checked = true;
                check("right")
            },
            |_| true,
        );
        assert!(
            matches!(a, Attempt::Throttled(d) if d == Duration::from_secs(29)),
            "{a:?}"
        );
        assert!(!checked, "the code is not even looked at (nor consumed)");
        // The same principal from elsewhere, and another principal from the
        // same address, are both locked: per principal and per address.
        let elsewhere: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(matches!(
            g.confirm(
                "admin:ops",
                elsewhere,
                secs(t0, 1),
                || check("right"),
                |_| true
            ),
            Attempt::Throttled(_)
        ));
        assert!(matches!(
            g.confirm("key:k1", ip, secs(t0, 1), || check("right"), |_| true),
            Attempt::Throttled(_)
        ));
        assert!(matches!(
            g.confirm(
                "key:k1",
                elsewhere,
                secs(t0, 1),
                || check("right"),
                |_| true
            ),
            Attempt::Passed(())
        ));
        // After the lockout the right code passes.
        assert!(matches!(
            g.confirm("admin:ops", ip, secs(t0, 30), || check("right"), |_| true),
            Attempt::Passed(())
        ));
        // Confirmation failures do not lock bearer-token authentication.
        assert!(matches!(
            g.authenticate(ip, secs(t0, 1), || check("right"), |_| true),
            Attempt::Passed(())
        ));
    }

    #[test]
    fn tokens_are_throttled_per_address_and_uncounted_failures_are_free() {
        let g = guard();
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.100".parse().unwrap();
        // Failures that do not count (a missing token) never lock.
        for _ in 0..20 {
            assert!(
                matches!(g.authenticate(ip, t0, || check("none"), |_| false), Attempt::Failed(_, ref s) if s.is_empty())
            );
        }
        for _ in 0..4 {
            assert!(
                matches!(g.authenticate(ip, t0, || check("guess"), |_| true), Attempt::Failed(_, ref s) if s.is_empty())
            );
        }
        let a = g.authenticate(ip, t0, || check("guess"), |_| true);
        assert!(
            matches!(a, Attempt::Failed(_, ref s) if s.len() == 1 && s[0].reason == Reason::Token),
            "{a:?}"
        );
        // Even the valid token is refused from that address, not from others.
        assert!(matches!(
            g.authenticate(ip, secs(t0, 5), || check("right"), |_| true),
            Attempt::Throttled(_)
        ));
        let other: IpAddr = "192.0.2.101".parse().unwrap();
        assert!(matches!(
            g.authenticate(other, secs(t0, 5), || check("right"), |_| true),
            Attempt::Passed(())
        ));
    }
}

//! Console sessions: a random id in an `HttpOnly`, `SameSite=Strict` cookie
//! (`Secure` under TLS), the principal's token digest (never the token), a
//! CSRF token for the session's forms, idle and absolute expiry. Held in
//! memory: a restarted agent signs everyone out.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{config::ConsoleConfig, keys::Digest};

/// The session cookie's name.
pub const COOKIE: &str = "kf_session";
/// The cookie of a sign-in form's CSRF token (before there is a session).
pub const LOGIN_COOKIE: &str = "kf_login";
/// More live sessions than this: the oldest is ended first.
const MAX_SESSIONS: usize = 1024;

/// 32 random bytes as hex. The operating system's generator, so an id cannot
/// be guessed from earlier ones.
#[must_use]
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    // The kernel's generator does not fail once the system has booted; an
    // all-zero token would be refused by `equal` below anyway.
    if getrandom::fill(&mut b).is_err() {
        tracing::error!("no random bytes for a console token");
    }
    hex::encode(b)
}

/// Constant time in the length of `a`; never equal when either is empty or
/// all zero (a failed random source).
#[must_use]
pub fn equal(a: &str, b: &str) -> bool {
    !a.is_empty()
        && a.len() == b.len()
        && a.bytes().any(|c| c != b'0')
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// One signed-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    /// Whose token signed in (looked up again on every request, so a
    /// rotated or revoked admin key ends its sessions).
    pub digest: Digest,
    pub csrf: String,
    started: Instant,
    last: Instant,
}

/// Why a session cookie is not (or no longer) good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    #[error("not signed in")]
    Missing,
    #[error("your session ended after a while without use: sign in again")]
    Idle,
    #[error("your session reached its maximum age: sign in again")]
    Expired,
}

pub struct Sessions {
    limits: ConsoleConfig,
    live: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    #[must_use]
    pub fn new(limits: ConsoleConfig) -> Self {
        Self {
            limits,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The absolute lifetime (the cookie's `Max-Age`).
    #[must_use]
    pub fn max_age(&self) -> Duration {
        self.limits.max_age
    }

    /// A new session for `digest`: its id (for the cookie).
    pub fn start(&self, digest: Digest, now: Instant) -> String {
        let id = random_token();
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        live.retain(|_, s| self.alive(s, now).is_ok());
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.started)
                .map(|(id, _)| id.clone())
        {
            live.remove(&oldest);
        }
        live.insert(
            id.clone(),
            Session {
                digest,
                csrf: random_token(),
                started: now,
                last: now,
            },
        );
        id
    }

    fn alive(&self, s: &Session, now: Instant) -> Result<(), Ended> {
        if now.duration_since(s.started) >= self.limits.max_age {
            Err(Ended::Expired)
        } else if now.duration_since(s.last) >= self.limits.idle_timeout {
            Err(Ended::Idle)
        } else {
            Ok(())
        }
    }

    /// The session of cookie value `id`, touched (its idle clock restarts).
    /// An ended one is forgotten.
    pub fn get(&self, id: Option<&str>, now: Instant) -> Result<Session, Ended> {
        let id = id.ok_or(Ended::Missing)?;
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = live.get_mut(id).ok_or(Ended::Missing)?;
        if let Err(e) = self.alive(s, now) {
            live.remove(id);
            return Err(e);
        }
        s.last = now;
        Ok(s.clone())
    }

    /// Sign out.
    pub fn end(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
}

/// The value of cookie `name` in a `Cookie` header.
#[must_use]
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::credentials::digest;

    fn sessions() -> Sessions {
        Sessions::new(ConsoleConfig {
            idle_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(30),
        })
    }

    #[test]
    fn idle_and_absolute_expiry_and_sign_out() {
        let s = sessions();
        let t0 = Instant::now();
        let id = s.start(digest("token-0123456789abcdef"), t0);
        assert_eq!(id.len(), 64);
        assert!(s.get(Some(&id), t0 + Duration::from_secs(9)).is_ok());
        assert!(
            s.get(Some(&id), t0 + Duration::from_secs(18)).is_ok(),
            "use restarts the idle clock"
        );
        assert!(s.get(Some(&id), t0 + Duration::from_secs(27)).is_ok());
        assert_eq!(
            s.get(Some(&id), t0 + Duration::from_secs(31)).unwrap_err(),
            Ended::Expired
        );
        assert_eq!(
            s.get(Some(&id), t0).unwrap_err(),
            Ended::Missing,
            "forgotten"
        );
        let id = s.start(digest("token-0123456789abcdef"), t0);
        assert_eq!(
            s.get(Some(&id), t0 + Duration::from_secs(11)).unwrap_err(),
            Ended::Idle
        );
        let id = s.start(digest("token-0123456789abcdef"), t0);
        s.end(&id);
        assert_eq!(s.get(Some(&id), t0).unwrap_err(), Ended::Missing);
        assert_eq!(s.get(None, t0).unwrap_err(), Ended::Missing);
        assert_eq!(s.get(Some("forged"), t0).unwrap_err(), Ended::Missing);
    }

    #[test]
    fn tokens_compare_whole() {
        let a = random_token();
        assert!(equal(&a, &a.clone()));
        assert!(!equal(&a, &random_token()));
        assert!(!equal("", ""));
        assert!(!equal(&"0".repeat(64), &"0".repeat(64)));
        assert!(!equal(&a, &a[..63]));
    }

    #[test]
    fn cookies_by_name() {
        let h = Some("a=1; kf_session=abc; kf_login=def");
        assert_eq!(cookie(h, COOKIE), Some("abc"));
        assert_eq!(cookie(h, LOGIN_COOKIE), Some("def"));
        assert_eq!(cookie(h, "kf"), None);
        assert_eq!(cookie(None, COOKIE), None);
    }
}

//! A token bucket for log lines: at most `burst` per `period`, refilled evenly.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

pub struct RateLimiter {
    burst: f64,
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    #[must_use]
    pub fn new(burst: u32, period: Duration) -> Self {
        let burst = f64::from(burst);
        Self {
            burst,
            per_sec: burst / period.as_secs_f64(),
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Take a token if one is left.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> bool {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let refill = now.saturating_duration_since(s.1).as_secs_f64() * self.per_sec;
        s.0 = (s.0 + refill).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let r = RateLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!((0..5).filter(|_| r.allow_at(t0)).count(), 3);
        assert!(!r.allow_at(t0 + Duration::from_millis(100)));
        assert!(r.allow_at(t0 + Duration::from_millis(400)));
    }
}

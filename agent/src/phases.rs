//! How long each step of start-up (and of a full policy apply) takes, and
//! what the process holds after it: debug lines under the `keyfence::phases`
//! target (`RUST_LOG=info,keyfence::phases=debug`), which the change bench
//! prints beside its start-to-ready row.

use std::time::Instant;

/// The log target of the phase lines.
pub const TARGET: &str = "keyfence::phases";

/// A clock that logs each phase as it ends.
pub struct Phases {
    last: Instant,
}

impl Phases {
    #[must_use]
    pub fn start() -> Self {
        Self {
            last: Instant::now(),
        }
    }

    /// `phase` ended now: log its duration, the heap in use and the RSS.
    pub fn done(&mut self, phase: &'static str) {
        let now = Instant::now();
        if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
            let mib = |b: u64| {
                #[expect(clippy::cast_precision_loss, reason = "bytes far below 2^52")]
                let m = b as f64 / (1024.0 * 1024.0);
                (m * 10.0).round() / 10.0
            };
            tracing::debug!(
                target: TARGET,
                phase,
                took_ms = (now - self.last).as_secs_f64() * 1e3,
                heap_mib = crate::sys::heap_in_use().map(mib),
                rss_mib = rss_bytes().map(mib),
                "phase done"
            );
        }
        self.last = now;
    }
}

/// Resident bytes of this process (`VmRSS` of `/proc/self/status`).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

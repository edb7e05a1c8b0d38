//! Ctrl-C for the demos (`kf-demo`, `kf-demo-fleet`): the first SIGINT or
//! SIGTERM only sets a flag that every step polls, so the guards clean up on
//! the way out. `SA_RESETHAND` restores the default action after the first
//! signal, so a second Ctrl-C ends the demo at once. (A handler rather than
//! blocked signals: children inherit a signal mask, not handlers.)

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT or SIGTERM arrived since [`install`].
#[must_use]
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Install the handler for SIGINT and SIGTERM; returns what could not be
/// handled (`(signal, why)`), for the caller to warn about.
pub fn install() -> Vec<(Signal, nix::Error)> {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let mut failed = Vec::new();
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe,
        // and it replaces no handler anything else in this process relies on.
        #[expect(unsafe_code, reason = "installing a signal handler is unsafe in nix")]
        let installed = unsafe { signal::sigaction(sig, &action) };
        if let Err(e) = installed {
            failed.push((sig, e));
        }
    }
    failed
}

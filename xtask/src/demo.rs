//! `cargo xtask demo`: the agent at work on a built-in example, in network
//! namespaces. Setup and the release build here; the demo itself is the tests
//! package's `kf-demo` binary (`tests/src/bin/kf-demo.rs`), which shares the
//! privileged tests' namespace, agent and HTTP helpers, run as the bench
//! binaries are (`bench.rs`). `--fleet` runs `kf-demo-fleet` instead
//! (`tests/src/bin/kf-demo-fleet.rs`): three gateways on one PostgreSQL.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::bail;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::{build, cmd};

/// Set when Ctrl-C reached xtask while the demo ran.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The single-host demo, or with `fleet` the fleet's.
pub fn run(fleet: bool) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the demo needs root (network namespaces, BPF): run `sudo -E cargo xtask demo`");
    }
    let keyfence = build::run()?;
    let bin = if fleet { "kf-demo-fleet" } else { "kf-demo" };
    let mut demo = cmd::cargo();
    demo.env("KEYFENCE_BIN", &keyfence).args([
        "run",
        "--release",
        "--package",
        "keyfence-tests",
        "--bin",
        bin,
    ]);
    println!("demo: {}", cmd::display(&demo));
    outlive_interrupts();
    let result = cmd::run(&mut demo);
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; the demo cleaned up as reported above");
    }
    result
}

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C reaches the whole foreground process group: the demo cleans up on
/// it and reports, so xtask must not die first and hand the terminal back
/// meanwhile. A handler, not an ignored or blocked signal: children inherit
/// those, while a handler reverts to the default action on `exec`, so cargo
/// and the demo still get Ctrl-C. (A second Ctrl-C ends the demo at once, and
/// with it this wait.) Only SIGINT: a SIGTERM sent to xtask alone still ends it.
fn outlive_interrupts() {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe,
    // and it replaces no handler anything else in this process relies on.
    #[expect(unsafe_code, reason = "installing a signal handler is unsafe in nix")]
    let installed = unsafe { signal::sigaction(Signal::SIGINT, &action) };
    if let Err(e) = installed {
        println!("demo: cannot handle SIGINT ({e}); Ctrl-C may return before the demo cleaned up");
    }
}

//! `cargo xtask <subcommand>`: every step of building, testing and showing keyfence
//! that is not plain cargo. CI calls only `cargo xtask test`, so anyone can replay CI.
//! One module per subcommand; `setup` runs first in all of them.

mod bench;
mod build;
mod cmd;
mod demo;
mod fuzz;
mod guest;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "keyfence's developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare this machine: nightly rust-src, bpf-linker built against the
    /// nightly's LLVM, bpffs mounted, the Debian packages the tests need,
    /// cargo-fuzz.
    /// Idempotent.
    Setup,
    /// Setup, then build the agent (and through its build script the eBPF
    /// object) in release mode.
    Build,
    /// Setup, then rustfmt, clippy, the unprivileged tests, each fuzz target
    /// for 40 s, the privileged tests and the demo (root). Ends with a line
    /// `N passed, N failed`.
    Test,
    /// Setup, then only the guest-kernel stage of `test`: the datapath's tests
    /// on Debian 12's 6.1 kernel under qemu (TCG) with virtme-ng (root).
    Guest,
    /// Setup and build, then run the agent in network namespaces on a built-in
    /// example and show allowed and dropped connections and the counters.
    Demo {
        /// Three gateway hosts on one PostgreSQL instead: a change through
        /// one host in force on the others, the database stopped and the
        /// gateways still enforcing.
        #[arg(long)]
        fleet: bool,
    },
    /// Setup, then measure, side by side in one run: the datapath's cost per
    /// packet (`BPF_PROG_TEST_RUN` on the real object, on this kernel and in a
    /// 6.1 guest), refused attempts and floods, the shim against nginx, changes
    /// and scale, the fleet; writes `target/bench/report.md`.
    Bench {
        /// Run only these sections (repeatable): datapath, flood, shim,
        /// change, fleet, guest.
        #[arg(long)]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Build => build::run().map(|_| ()),
        Command::Test => test::run(),
        Command::Guest => test::guest_only(),
        Command::Demo { fleet } => demo::run(fleet),
        Command::Bench { only } => bench::run(&only),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

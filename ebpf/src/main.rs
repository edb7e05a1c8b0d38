//! keyfence's datapath: one XDP program and one TC (tcx / clsact ingress) program
//! that share the parser and the verdict. They drop packets to a protected
//! listener whose source is in no allow list of any key that listener accepts,
//! and pass everything else (SPEC §7). The shim in userspace remains the authority:
//! whatever cannot be parsed passes and is counted.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod log;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod runtime;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only by workspace-wide commands; the object comes from
    // `cargo build --target bpfel-unknown-none` (agent/build.rs).
}

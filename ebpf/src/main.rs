//! keyfence's datapath: one XDP program and one TC (tcx / clsact ingress) program
//! that share the parser and the verdict. They drop packets to a protected
//! listener whose source is in no allow list of any key that listener accepts,
//! and pass everything else (SPEC §7). The shim in userspace remains the authority:
//! whatever cannot be parsed passes and is counted.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only by workspace-wide commands; the object comes from
    // `cargo build --target bpfel-unknown-none` (agent/build.rs).
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[expect(unsafe_code, reason = "the kernel reads the license from this section")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! What each object of this crate needs beside its programs: the panic
//! handler (never reached) and the license the kernel reads.

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

#[expect(unsafe_code, reason = "the kernel reads the license from this section")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

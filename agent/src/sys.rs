//! The one place the agent uses `unsafe` (STYLE rule 8). Everything else in the
//! crate is denied `unsafe_code` by the workspace lints.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

/// Register the drop-sample ring buffer with the tokio reactor.
pub fn async_ring(ring: RingBuf<MapData>) -> io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: `RingBuf` owns its map fd (an `OwnedFd` inside `MapData`) and keeps
    // it open exactly as long as the `AsyncFd` owns the `RingBuf`; nothing else
    // closes or replaces that fd while it is registered.
    #[expect(unsafe_code, reason = "tokio's AsyncFd registration requires it")]
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    registered.map_err(|e| io::Error::other(e.to_string()))
}

/// Hand the heap's free memory back to the kernel. After a large policy
/// apply, glibc keeps the freed temporaries (the wanted tables, the compiled
/// lists: hundreds of MiB at a million prefixes) as resident memory.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks glibc's own heap; no Rust memory is
        // touched or invalidated.
        #[expect(unsafe_code, reason = "glibc's malloc_trim")]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

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

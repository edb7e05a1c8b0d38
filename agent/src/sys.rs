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

/// Register the programs' aya-log ring with the tokio reactor.
pub fn async_log(
    logger: crate::datapath_log::DatapathLogger,
) -> io::Result<AsyncFd<crate::datapath_log::DatapathLogger>> {
    // SAFETY: `EbpfLogger` owns its ring buffer's map fd and keeps it open
    // exactly as long as the `AsyncFd` owns the logger; nothing else closes or
    // replaces that fd while it is registered.
    #[expect(unsafe_code, reason = "tokio's AsyncFd registration requires it")]
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
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

/// Large allocations go straight to `mmap` and back to the kernel when
/// freed. glibc raises its mmap threshold to the size of each large block
/// freed (up to 32 MiB), so after the first big temporary of a policy apply
/// the next ones (the sorted lists and plans of a million prefixes, 18 MiB
/// each) came from the heap and left it fragmented, resident memory that
/// `malloc_trim` could not hand back. A fixed threshold stops that.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        /// glibc's default starting threshold, kept fixed (the value the
        /// change bench measured).
        const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
        // SAFETY: mallopt only sets glibc's own allocator parameters; called
        // before any other thread exists.
        #[expect(unsafe_code, reason = "glibc's mallopt")]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Bytes the heap hands out now (glibc's `mallinfo2`: in-use chunks plus
/// mmapped blocks); `None` off glibc. For the phase timings' log lines.
#[must_use]
pub fn heap_in_use() -> Option<u64> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 only reads glibc's own heap statistics and
        // returns them by value.
        #[expect(unsafe_code, reason = "glibc's mallinfo2")]
        let info = unsafe { libc::mallinfo2() };
        Some(u64::try_from(info.uordblks.saturating_add(info.hblkhd)).unwrap_or(u64::MAX))
    }
    #[cfg(not(target_env = "gnu"))]
    {
        None
    }
}

/// The process's `RLIMIT_NOFILE`: `(soft, hard)`. The soft limit is one more
/// than the highest descriptor number the process may open.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid, exclusive pointer
    // to a stack value and reads nothing else.
    #[expect(unsafe_code, reason = "getrlimit(2) has no safe wrapper in the tree")]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    if rc == 0 {
        Ok((limit.rlim_cur, limit.rlim_max))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Set the soft `RLIMIT_NOFILE` to `soft` (at most the hard limit), keeping
/// the hard limit.
pub fn set_nofile_soft(soft: u64) -> io::Result<()> {
    let (_, hard) = nofile_limit()?;
    let limit = libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the `rlimit` behind a valid pointer.
    #[expect(unsafe_code, reason = "setrlimit(2) has no safe wrapper in the tree")]
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

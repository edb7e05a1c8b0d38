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

/// What [`map_batch`] does to each element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapBatch {
    /// `BPF_MAP_UPDATE_BATCH`: insert or replace.
    Update,
    /// `BPF_MAP_DELETE_BATCH`: remove (a missing key stops the batch).
    Delete,
}

/// `bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Update (with `values`, one per key) or delete `keys` in the map behind
/// `fd` with one `bpf(2)` call; the kernel takes them in order, one at a
/// time, as the single-element calls would. On an error, the number of
/// elements the kernel took before it stopped comes with it.
pub fn map_batch<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    op: MapBatch,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    use std::os::fd::AsRawFd as _;
    assert!(
        op == MapBatch::Delete || values.len() == keys.len(),
        "one value per key"
    );
    if keys.is_empty() {
        return Ok(());
    }
    let count =
        u32::try_from(keys.len()).map_err(|_| (0, io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: if op == MapBatch::Update {
            values.as_ptr() as u64
        } else {
            0
        },
        count,
        map_fd: u32::try_from(fd.as_raw_fd()).expect("an open fd is not negative"),
        elem_flags: 0,
        flags: 0,
    };
    let cmd = match op {
        MapBatch::Update => BPF_MAP_UPDATE_BATCH,
        MapBatch::Delete => BPF_MAP_DELETE_BATCH,
    };
    // SAFETY: `attr` is a valid, exclusive `bpf_attr` prefix of the size
    // passed; the kernel reads `count` keys (and values) of the map's sizes,
    // which `K` and `V` are (aya's `Pod`: plain bytes, checked against the
    // map when it was opened), from the live slices, and writes back only
    // `attr.count`. Nothing is retained after the call.
    #[expect(unsafe_code, reason = "bpf(2) batch commands have no wrapper in aya")]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw mut attr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        Err((attr.count.min(count) as usize, err))
    }
}

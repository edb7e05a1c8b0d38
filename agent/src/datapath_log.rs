//! The eBPF programs' own log records (aya-log, `ebpf/src/log.rs`: drop
//! samples, `map_error`, unreadable headers, each behind the kernel's per-CPU
//! rate limit) forwarded into the agent's tracing output under the target
//! `keyfence::datapath`, so `RUST_LOG=keyfence::datapath=debug` shows them
//! all and the default (info) shows all but the drop samples, which the
//! drop-sample reader already logs with interface and listener names.

use aya::Ebpf;
use aya_log::EbpfLogger;

/// A `log::Log` that hands each record to tracing.
#[derive(Clone, Copy, Debug, Default)]
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        // tracing's filter decides, per event below.
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        // `from` is the eBPF module that logged (`keyfence_ebpf::log`).
        let from = record.target();
        match record.level() {
            log::Level::Error => {
                tracing::error!(target: "keyfence::datapath", from, "{message}");
            }
            log::Level::Warn => tracing::warn!(target: "keyfence::datapath", from, "{message}"),
            log::Level::Info => tracing::info!(target: "keyfence::datapath", from, "{message}"),
            log::Level::Debug => {
                tracing::debug!(target: "keyfence::datapath", from, "{message}");
            }
            log::Level::Trace => {
                tracing::trace!(target: "keyfence::datapath", from, "{message}");
            }
        }
    }

    fn flush(&self) {}
}

/// The programs' log ring of a freshly loaded object, read into tracing.
pub type DatapathLogger = EbpfLogger<ToTracing>;

/// Take the log ring out of `ebpf` (before the programs load: aya-log reads
/// the map of the object, whichever program writes it).
pub fn take(ebpf: &mut Ebpf) -> Result<DatapathLogger, aya_log::Error> {
    EbpfLogger::init_with_logger(ebpf, ToTracing)
}

/// Forward records until the ring cannot be polled.
pub async fn forward(logger: DatapathLogger) -> std::io::Result<()> {
    let mut fd = crate::sys::async_log(logger)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

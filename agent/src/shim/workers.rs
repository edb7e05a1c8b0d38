//! The shim's worker threads (`shim.workers`): one single-threaded tokio
//! runtime each, as nginx runs one worker process per core. Every listener
//! has one `SO_REUSEPORT` socket per worker, so the kernel spreads the
//! connections and a connection, its requests and the upstream connection
//! it owns are served on one thread, with no wake-ups across threads.

use std::{io, net::SocketAddr, thread};

use tokio::{net::TcpSocket, runtime::Handle, sync::oneshot};

/// Queue of connections not yet accepted, per socket.
pub(super) const BACKLOG: u32 = 1024;

/// The running workers; dropping this stops them (tasks still on them are
/// cancelled: stop the listeners first).
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Start `n` (at least one) worker threads.
    pub fn start(n: usize) -> io::Result<Self> {
        let mut workers = Self {
            handles: Vec::new(),
            stops: Vec::new(),
        };
        for i in 0..n.max(1) {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            thread::Builder::new()
                .name(format!("kf-shim-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            let _ = ready_tx.send(Ok(runtime.handle().clone()));
                            // Dropping the sender (the Workers) ends it too.
                            let _ = runtime.block_on(stop_rx);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })?;
            let handle = ready_rx
                .recv()
                .map_err(|_| io::Error::other("a shim worker thread died at start"))??;
            workers.handles.push(handle);
            workers.stops.push(stop_tx);
        }
        Ok(workers)
    }

    /// The workers' runtimes.
    #[must_use]
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// Bind `n` listening sockets on `addr` (one per worker; `SO_REUSEPORT`
/// when more than one). A port another socket holds fails here, also one
/// bound with `SO_REUSEPORT` by another process of this user: a plain
/// socket is bound first as the probe.
pub fn bind(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let socket = |reuseport: bool| -> io::Result<TcpSocket> {
        let s = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        if reuseport {
            s.set_reuseport(true)?;
        }
        s.bind(addr)?;
        Ok(s)
    };
    if n <= 1 {
        return Ok(vec![socket(false)?.listen(BACKLOG)?.into_std()?]);
    }
    drop(socket(false)?);
    (0..n)
        .map(|_| socket(true)?.listen(BACKLOG)?.into_std())
        .collect()
}

//! Connection limits shared by every HTTP server of the agent (the shim's
//! listeners, the management API and `/metrics`): how long a connection may
//! take to send a request head, how long it may sit idle, how many connections
//! one source address may hold, and the descriptors kept in reserve so that a
//! flood on the listeners cannot silence management and metrics.
//!
//! hyper alone is not enough: its HTTP/1 header timer starts only once hyper
//! reads a head, which the auto (HTTP/1 + HTTP/2) builder does only after the
//! client's first bytes, and HTTP/2 connections have no idle timeout. So every
//! accepted connection is driven by [`drive`], which watches an [`Activity`]
//! record the connection's I/O and service update, and closes it:
//!
//! - hard, when no complete request head arrived within `header_timeout` of
//!   the accept (TLS handshake and PROXY header included), or, on an HTTP/1
//!   keep-alive connection, within `header_timeout` of the next request's first
//!   byte;
//! - gracefully (HTTP/2 `GOAWAY`), when no request was in flight for
//!   `idle_timeout`.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    time::Instant,
};

use crate::allowlist::{ClientAddr, Net};

/// Default time from accept (or, on a keep-alive connection, from the next
/// request's first byte) to a complete request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may stay open with no request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// Default cap on open connections from one source address, per listener.
pub const DEFAULT_MAX_PER_SOURCE: u32 = 256;
/// HTTP/2 keep-alive: a PING after this long without frames from the peer...
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is closed if its answer takes longer than this.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Descriptors the shim's listeners leave to management, metrics and the
/// agent's own files (a quarter of the limit when that is smaller).
pub const DESCRIPTOR_RESERVE: u64 = 128;
/// How long a connection asked to close gracefully (idle or shutdown) may take
/// before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(30);

/// While stopping, how often a connection that has not sent its first request
/// looks whether it has (see [`drive`]).
const FIRST_REQUEST_POLL: Duration = Duration::from_millis(5);

/// A server's connection limits (`listeners[].connections` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_per_source: u32,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    listener: String,
}

/// The connection metrics, registered once and shared by every [`Gate`].
#[derive(Clone, Debug, Default)]
pub struct ConnMetrics {
    refused: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    open: Family<ServerLabel, Gauge>,
}

impl ConnMetrics {
    /// Create the families and register them in `registry`.
    #[must_use]
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "keyfence_connections_refused",
            "Connections closed at accept, by listener and reason (per_source_limit, \
             descriptor_reserve, descriptor_exhausted)",
            m.refused.clone(),
        );
        registry.register(
            "keyfence_connections_timed_out",
            "Connections closed by the agent, by listener and reason (header_timeout, idle_timeout)",
            m.closed.clone(),
        );
        registry.register(
            "keyfence_connections_open",
            "Connections open, by listener",
            m.open.clone(),
        );
        m
    }

    fn refused(&self, listener: &str, reason: Refusal) {
        self.refused
            .get_or_create(&ReasonLabels {
                listener: listener.to_owned(),
                reason: reason.label(),
            })
            .inc();
    }

    fn closed(&self, listener: &str, reason: Closed) {
        self.closed
            .get_or_create(&ReasonLabels {
                listener: listener.to_owned(),
                reason: reason.label(),
            })
            .inc();
    }

    fn open(&self, listener: &str) -> Gauge {
        self.open
            .get_or_create(&ServerLabel {
                listener: listener.to_owned(),
            })
            .clone()
    }
}

/// Whether a server's connections leave [`DESCRIPTOR_RESERVE`] free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    /// The shim's listeners: refuse a connection whose descriptor lies in
    /// the reserve.
    Honour,
    /// Management and metrics: may use the reserve (it is kept for them).
    Use,
}

/// Why a connection was closed at accept: the `reason` label of
/// `keyfence_connections_refused` and of the refusal log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the source already holds the listener's maximum of connections")]
    PerSourceLimit,
    #[error("the process is near its descriptor limit")]
    DescriptorReserve,
    /// `accept` failed for lack of descriptors; one pending connection was
    /// taken from the backlog and closed (never returned by [`Gate::admit`]).
    #[error("the process ran out of descriptors")]
    DescriptorExhausted,
}

impl Refusal {
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::PerSourceLimit => "per_source_limit",
            Self::DescriptorReserve => "descriptor_reserve",
            Self::DescriptorExhausted => "descriptor_exhausted",
        }
    }
}

/// Why the agent closed an admitted connection: the `reason` label of
/// `keyfence_connections_timed_out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// No complete request head within `header_timeout`.
    HeaderTimeout,
    /// No request within `idle_timeout` on a kept-alive connection.
    IdleTimeout,
}

impl Closed {
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

/// The descriptors kept free for management and metrics under a soft limit.
#[must_use]
pub fn descriptor_reserve(soft: u64) -> u64 {
    (soft / 4).min(DESCRIPTOR_RESERVE)
}

/// True when descriptor number `fd` lies in the reserve below `soft`. The
/// kernel hands out the lowest free number, so an accepted descriptor numbered
/// `fd` means every lower one is taken: refusing those in the reserve keeps
/// the top [`descriptor_reserve`] numbers for everyone but the listeners.
#[must_use]
pub fn in_reserve(fd: i32, soft: u64) -> bool {
    u64::try_from(fd).is_ok_and(|fd| fd >= soft.saturating_sub(descriptor_reserve(soft)))
}

/// One server's admission state: its limits, the connections each source
/// holds, and its counters.
#[derive(Debug)]
pub struct Gate {
    name: String,
    reserve: Reserve,
    limits: RwLock<(ConnLimits, Arc<Vec<Net>>)>,
    sources: Mutex<HashMap<IpAddr, u32>>,
    open: AtomicUsize,
    open_gauge: Gauge,
    drained: Notify,
    metrics: ConnMetrics,
    log: RateLimiterDebug,
}

/// [`crate::ratelimit::RateLimiter`] for refusal log lines (it has no Debug).
struct RateLimiterDebug(crate::ratelimit::RateLimiter);

impl std::fmt::Debug for RateLimiterDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateLimiter")
    }
}

impl Gate {
    /// A gate named `name` (the `listener` label). Peers in `uncapped` (a
    /// listener's trusted proxies, which speak for many clients) are not held
    /// to `max_per_source`.
    #[must_use]
    pub fn new(
        name: &str,
        reserve: Reserve,
        limits: ConnLimits,
        uncapped: Vec<Net>,
        metrics: ConnMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            reserve,
            limits: RwLock::new((limits, Arc::new(uncapped))),
            sources: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            open_gauge: metrics.open(name),
            drained: Notify::new(),
            metrics,
            log: RateLimiterDebug(crate::ratelimit::RateLimiter::new(
                5,
                Duration::from_secs(1),
            )),
        })
    }

    /// New limits for the connections accepted from now on (a reload).
    pub fn set_limits(&self, limits: ConnLimits, uncapped: Vec<Net>) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = (limits, Arc::new(uncapped));
    }

    #[must_use]
    pub fn limits(&self) -> ConnLimits {
        self.limits.read().unwrap_or_else(PoisonError::into_inner).0
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Admit a connection from `peer` whose descriptor is `fd`, under the soft
    /// descriptor limit `soft`, or say why not (and count it).
    pub fn admit(
        self: &Arc<Self>,
        client: ClientAddr,
        fd: i32,
        soft: u64,
    ) -> Result<Permit, Refusal> {
        let peer = client.ip();
        let refusal = if self.reserve == Reserve::Honour && in_reserve(fd, soft) {
            Some(Refusal::DescriptorReserve)
        } else {
            let (limits, uncapped) = self
                .limits
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let capped = !uncapped.iter().any(|net| net.contains(&peer));
            let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
            let held = sources.entry(peer).or_insert(0);
            if capped && *held >= limits.max_per_source {
                if *held == 0 {
                    sources.remove(&peer);
                }
                Some(Refusal::PerSourceLimit)
            } else {
                *held += 1;
                None
            }
        };
        if let Some(refusal) = refusal {
            self.refuse(Some(peer), refusal);
            return Err(refusal);
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        self.open_gauge.inc();
        Ok(Permit {
            gate: self.clone(),
            source: client,
        })
    }

    /// Count a refusal and log it (rate-limited); `peer` is `None` when no
    /// connection could be read (a shed backlog entry).
    fn refuse(&self, peer: Option<IpAddr>, refusal: Refusal) {
        self.metrics.refused(&self.name, refusal);
        if self.log.0.allow() {
            let client = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
            let reason = refusal.label();
            tracing::warn!(listener = self.name, client, reason, "connection refused");
        }
    }

    /// Connections open now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Wait until every connection has closed, at most `within`; false if some
    /// were still open then.
    pub async fn drain(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open() == 0;
            }
        }
    }
}

/// One admitted connection; closing it (dropping the permit) gives its
/// source's slot back.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    source: ClientAddr,
}

impl Permit {
    #[must_use]
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The connection's peer, folded once at accept.
    #[must_use]
    pub fn source(&self) -> ClientAddr {
        self.source
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut sources = self
                .gate
                .sources
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(held) = sources.get_mut(&self.source.ip()) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    sources.remove(&self.source.ip());
                }
            }
        }
        self.gate.open_gauge.dec();
        if self.gate.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.drained.notify_waiters();
        }
    }
}

/// A spare descriptor, given up for a moment when `accept` fails for lack of
/// descriptors so that one pending connection can be taken from the backlog
/// and closed: clients see a close instead of hanging in a wedged backlog.
static SPARE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// At start: raise the soft descriptor limit to the hard one (as nginx and the
/// Go runtime do; the agent never uses `select(2)`), log both, and open the
/// spare descriptor. Returns `(soft, hard)` after the change.
pub fn init_descriptors() -> io::Result<(u64, u64)> {
    let (soft, hard) = crate::sys::nofile_limit()?;
    if soft < hard
        && let Err(e) = crate::sys::set_nofile_soft(hard)
    {
        tracing::warn!(soft, hard, error = %e, "cannot raise the descriptor limit");
    }
    let (soft, hard) = crate::sys::nofile_limit()?;
    let reserve = descriptor_reserve(soft);
    tracing::info!(
        soft,
        hard,
        reserve,
        "descriptor limit (listeners leave the last `reserve` to management and metrics)"
    );
    *SPARE.lock().unwrap_or_else(PoisonError::into_inner) = std::fs::File::open("/dev/null").ok();
    Ok((soft, hard))
}

/// Give up the spare descriptor, take one pending connection and close it,
/// take the spare back. False when there was no spare (another server holds
/// it) or nothing to take.
async fn shed_one(socket: &TcpListener) -> bool {
    let spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner).take();
    if spare.is_none() {
        return false;
    }
    drop(spare);
    let shed = tokio::time::timeout(Duration::from_millis(10), socket.accept()).await;
    *SPARE.lock().unwrap_or_else(PoisonError::into_inner) = std::fs::File::open("/dev/null").ok();
    matches!(shed, Ok(Ok(_)))
}

/// Accept one connection and admit it through `gate`. `None` when the
/// connection was refused (it is closed at once and counted) or `accept`
/// failed; call again.
pub async fn accept(
    socket: &TcpListener,
    gate: &Arc<Gate>,
) -> Option<(TcpStream, SocketAddr, Permit)> {
    match socket.accept().await {
        Ok((stream, peer)) => {
            let soft = crate::sys::nofile_limit().map_or(u64::MAX, |(soft, _)| soft);
            match gate.admit(ClientAddr::new(peer.ip()), stream.as_raw_fd(), soft) {
                Ok(permit) => Some((stream, peer, permit)),
                // Dropping the stream closes it now.
                Err(_) => None,
            }
        }
        Err(e) => {
            let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
            if exhausted && shed_one(socket).await {
                gate.refuse(None, Refusal::DescriptorExhausted);
            } else {
                if gate.log.0.allow() {
                    tracing::warn!(listener = gate.name, error = %e, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    }
}

/// Marks "no time": no head is being waited for.
const NONE: u64 = u64::MAX;

/// What a connection is doing, shared by its I/O, its service and [`drive`].
/// Times are milliseconds since the accept.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// Requests whose response has not been sent completely.
    in_flight: AtomicU32,
    /// Since when a request head is awaited (the accept, or the first byte
    /// of the next request on an idle HTTP/1 connection); `NONE` if none is.
    head_since: AtomicU64,
    /// Since when no request has been in flight.
    idle_since: AtomicU64,
    /// HTTP/2: bytes while idle are PINGs and SETTINGS, not a new head.
    http2: AtomicBool,
    /// A request head has arrived on this connection (see [`drive`]'s
    /// shutdown: a connection is not closed before its first request).
    started: AtomicBool,
    /// The connection was asked to stop: HTTP/1 responses say
    /// `Connection: close`.
    stopping: AtomicBool,
}

impl Activity {
    /// A connection accepted now: a head is awaited from this moment.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            in_flight: AtomicU32::new(0),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            started: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        })
    }

    /// When the first request head is due at the latest.
    #[must_use]
    pub fn first_head_deadline(&self, limits: &ConnLimits) -> Instant {
        self.origin + limits.header_timeout
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    fn snapshot(&self) -> Snapshot {
        let head = self.head_since.load(Ordering::Acquire);
        Snapshot {
            in_flight: self.in_flight.load(Ordering::Acquire),
            head_since: (head != NONE).then_some(head),
            idle_since: self.idle_since.load(Ordering::Acquire),
        }
    }

    /// Bytes arrived: on an idle HTTP/1 connection they start the next head.
    fn bytes_read(&self) {
        if self.http2.load(Ordering::Relaxed) || self.in_flight.load(Ordering::Acquire) > 0 {
            return;
        }
        let now = self.now_ms();
        // No wake-up: drive() looks again in time (see `look_again`).
        let _ = self
            .head_since
            .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Acquire);
    }

    fn request_started(self: &Arc<Self>, version: hyper::Version) -> Busy {
        if version == hyper::Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Release);
        self.started.store(true, Ordering::Release);
        Busy {
            activity: self.clone(),
        }
    }
}

/// Held from a request's head until its response is sent (or abandoned).
#[derive(Debug)]
struct Busy {
    activity: Arc<Activity>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.activity;
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.idle_since.store(a.now_ms(), Ordering::Release);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Snapshot {
    in_flight: u32,
    head_since: Option<u64>,
    idle_since: u64,
}

/// What the watchdog does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Requests are in flight: wait for a change.
    Busy,
    /// Look again at this time (milliseconds since the accept).
    At(u64),
    /// The awaited head is late: close now.
    HeaderTimeout,
    /// Idle too long: close gracefully.
    Idle,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(NONE - 1)
}

fn next(s: Snapshot, limits: &ConnLimits, now: u64) -> Next {
    if s.in_flight > 0 {
        return Next::Busy;
    }
    if let Some(since) = s.head_since {
        let due = since.saturating_add(ms(limits.header_timeout));
        return if now >= due {
            Next::HeaderTimeout
        } else {
            Next::At(due)
        };
    }
    let due = s.idle_since.saturating_add(ms(limits.idle_timeout));
    if now >= due {
        Next::Idle
    } else {
        Next::At(due)
    }
}

/// When [`drive`] looks at the connection again after `step` at `now`
/// (milliseconds since the accept), without being woken by its I/O or
/// service: a deadline that starts after `now` falls no earlier than
/// `now + min(header_timeout, idle_timeout)` (a head starting now is due
/// `header_timeout` later, an idle spell starting now ends `idle_timeout`
/// later), so looking again by then misses none, and a request pays no
/// wake-up and no timer. `None`: no look is needed (the step ends it).
fn look_again(step: Next, limits: &ConnLimits, now: u64) -> Option<u64> {
    let soonest = now.saturating_add(ms(limits.header_timeout.min(limits.idle_timeout)));
    match step {
        Next::At(due) => Some(due.min(soonest)),
        Next::Busy => Some(soonest),
        Next::HeaderTimeout | Next::Idle => None,
    }
}

/// The connection's stream, reporting reads to its [`Activity`].
#[derive(Debug)]
pub struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> Tracked<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request counted in flight until hyper has
/// sent it (and drops it).
pub struct TrackedBody<B> {
    inner: B,
    _busy: Busy,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service that counts its requests in the connection's [`Activity`] and,
/// when `connect_info` is set, hands every request the peer as axum's
/// `ConnectInfo` (the management API's handlers read it; the shim does not,
/// and an extension costs two allocations per request).
struct TrackedService<S> {
    inner: S,
    activity: Arc<Activity>,
    connect_info: Option<SocketAddr>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for TrackedService<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    B: Body + Unpin,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let busy = self.activity.request_started(req.version());
        if let Some(peer) = self.connect_info {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        let http1 = req.version() < hyper::Version::HTTP_2;
        TrackedFuture {
            inner: self.inner.call(req),
            busy: Some(busy),
            http1,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TrackedService`]: a named type rather than a
    /// boxed `async` block, so hyper keeps it in the slot it allocates once
    /// per connection instead of a heap block (kilobytes, moved in and out)
    /// per request.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        busy: Option<Busy>,
        http1: bool,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Unpin,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(response)) => response,
        };
        let Some(busy) = this.busy.take() else {
            // Polled after it completed: a bug in the caller, not a request.
            panic!("TrackedFuture polled after completion");
        };
        // Stopping: tell the client before it sends another request on
        // this connection (hyper then closes after the response).
        if *this.http1 && busy.activity.stopping.load(Ordering::Acquire) {
            response.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, _busy: busy })))
    }
}

/// The hyper builder every server uses: HTTP/1.1 and HTTP/2, with hyper's own
/// HTTP/1 head timer as a backstop behind [`drive`]'s, and HTTP/2 keep-alive
/// pings.
#[must_use]
pub fn builder(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this timer when it begins to wait for a head, also
        // between keep-alive requests: past idle + header, drive() has closed
        // the connection already.
        .header_read_timeout(limits.idle_timeout + limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEPALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    builder
}

/// How a connection served by [`drive`] ended.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("no complete request head within {0:?}")]
    HeaderTimeout(Duration),
    #[error("still open {0:?} after it was asked to close")]
    CloseTimeout(Duration),
    #[error(transparent)]
    Http(BoxError),
}

/// Serve `service` on `io` (the stream after TLS) with `builder` until the
/// connection ends, enforcing the permit's limits (see the module doc). When
/// `shutdown` turns true the connection is closed gracefully, but not before
/// its first request: a client that connected just before a restart (or
/// whose connection the listener accepted from its queue while stopping) has
/// sent, or is sending, a request that expects an answer, and closing with it
/// unread would reset the connection. Such a connection gets its one answer
/// (`Connection: close`); one that never sends meets its header timeout.
pub async fn drive<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    connect_info: Option<SocketAddr>,
    service: S,
    permit: &Permit,
    activity: Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DriveError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let limits = permit.gate.limits();
    let service = TrackedService {
        inner: service,
        activity: activity.clone(),
        connect_info,
    };
    let conn = builder.serve_connection(TokioIo::new(Tracked::new(io, activity.clone())), service);
    tokio::pin!(conn);
    let asked_to_stop = async move {
        if shutdown.wait_for(|s| *s).await.is_err() {
            // No one can ask any more: never.
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(asked_to_stop);
    // Set once the connection was asked to close gracefully: drop it then.
    let mut closing: Option<Instant> = None;
    // One timer for the connection's life, reset only when it fires (about
    // once per `header_timeout`), never per request.
    let sleep = tokio::time::sleep_until(Instant::now());
    tokio::pin!(sleep);
    // Each turn follows the timer firing (or the ask to stop): look now.
    loop {
        if let Some(until) = closing
            && Instant::now() >= until
        {
            return Err(DriveError::CloseTimeout(
                limits.header_timeout.min(CLOSE_GRACE),
            ));
        }
        // Asked to stop: close gracefully once the first request has come.
        let stopping = activity.stopping.load(Ordering::Acquire);
        if stopping && closing.is_none() && activity.started.load(Ordering::Acquire) {
            conn.as_mut().graceful_shutdown();
            closing = Some(Instant::now() + CLOSE_GRACE);
        }
        // The time before the snapshot: whatever the snapshot misses
        // happened after it.
        let now = activity.now_ms();
        let step = next(activity.snapshot(), &limits, now);
        match step {
            Next::HeaderTimeout => {
                permit
                    .gate
                    .metrics
                    .closed(&permit.gate.name, Closed::HeaderTimeout);
                return Err(DriveError::HeaderTimeout(limits.header_timeout));
            }
            Next::Idle if closing.is_none() => {
                permit
                    .gate
                    .metrics
                    .closed(&permit.gate.name, Closed::IdleTimeout);
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + limits.header_timeout.min(CLOSE_GRACE));
            }
            Next::At(_) | Next::Idle | Next::Busy => {}
        }
        let again = look_again(step, &limits, now).map(|ms| activity.at(ms));
        let mut wake_at = match (again, closing) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or_else(|| Instant::now() + CLOSE_GRACE),
        };
        if stopping && closing.is_none() {
            // Only while stopping, on a connection still waiting for its
            // first head: look for it often.
            wake_at = wake_at.min(Instant::now() + FIRST_REQUEST_POLL);
        }
        sleep.as_mut().reset(wake_at);
        tokio::select! {
            done = conn.as_mut() => return done.map_err(DriveError::Http),
            () = sleep.as_mut() => {}
            // The next turn closes (see the top of the loop).
            () = &mut asked_to_stop, if closing.is_none() && !stopping => {
                activity.stopping.store(true, Ordering::Release);
            }
        }
    }
}

/// Serve an axum `router` on `socket` through `gate` until `shutdown`
/// resolves, then close connections gracefully (at most [`CLOSE_GRACE`]).
pub async fn serve_router(
    socket: TcpListener,
    router: axum::Router,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_router_tls(socket, router, gate, None, shutdown).await
}

/// [`serve_router`], speaking TLS when `tls` is given (the management
/// listener's `management.tls`): the handshake must finish within the
/// header timeout, and the certificate files are reloaded when they change
/// (checked at each accept, so a renewed certificate serves the next client).
pub async fn serve_router_tls(
    socket: TcpListener,
    router: axum::Router,
    gate: Arc<Gate>,
    tls: Option<crate::shim::tls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = accept(&socket, &gate) => {
                let Some((stream, peer, permit)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let stop = stop_rx.clone();
                let tls = tls.clone();
                if let Some(tls) = &tls {
                    tls.reload_if_changed();
                }
                tokio::spawn(async move {
                    let activity = Activity::new();
                    let limits = permit.gate.limits();
                    let builder = builder(&limits);
                    let done = match tls {
                        None => drive(&builder, stream, Some(peer), service, &permit, activity, stop).await,
                        Some(tls) => match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await {
                            Ok(Ok(stream)) => drive(&builder, stream, Some(peer), service, &permit, activity, stop).await,
                            Ok(Err(e)) => {
                                tracing::debug!(listener = permit.gate.name, %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(listener = permit.gate.name, %peer, "TLS handshake timed out");
                                return;
                            }
                        },
                    };
                    if let Err(e) = done {
                        tracing::debug!(listener = permit.gate.name, %peer, error = %e, "connection ended");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(socket);
    let _ = stop_tx.send(true);
    if !gate.drain(CLOSE_GRACE).await {
        tracing::warn!(
            listener = gate.name,
            "connections still open after {CLOSE_GRACE:?}: closing"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(header_ms: u64, idle_ms: u64, cap: u32) -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            max_per_source: cap,
        }
    }

    #[test]
    fn a_connection_must_send_its_first_head_in_time() {
        let l = limits(1000, 60_000, 1);
        let fresh = Snapshot {
            in_flight: 0,
            head_since: Some(0),
            idle_since: 0,
        };
        assert_eq!(next(fresh, &l, 0), Next::At(1000));
        assert_eq!(next(fresh, &l, 999), Next::At(1000));
        // Silent or one byte: the same deadline from the accept.
        assert_eq!(next(fresh, &l, 1000), Next::HeaderTimeout);
    }

    #[test]
    fn in_flight_requests_are_never_timed_out() {
        let l = limits(1000, 2000, 1);
        let busy = Snapshot {
            in_flight: 2,
            head_since: None,
            idle_since: 0,
        };
        assert_eq!(next(busy, &l, 1_000_000), Next::Busy);
    }

    #[test]
    fn idle_keep_alive_gets_the_idle_timeout_and_a_started_head_the_header_timeout() {
        let l = limits(1000, 5000, 1);
        let idle = Snapshot {
            in_flight: 0,
            head_since: None,
            idle_since: 3000,
        };
        assert_eq!(next(idle, &l, 4000), Next::At(8000));
        assert_eq!(next(idle, &l, 8000), Next::Idle);
        // The next request's first byte at 4500: its head is due at 5500,
        // well before the idle deadline.
        let started = Snapshot {
            head_since: Some(4500),
            ..idle
        };
        assert_eq!(next(started, &l, 4600), Next::At(5500));
        assert_eq!(next(started, &l, 5500), Next::HeaderTimeout);
    }

    #[test]
    fn the_next_look_comes_before_any_deadline_that_can_start_later() {
        let l = limits(1000, 5000, 1);
        // Busy: the response may end now (idle due 5000 later) and the next
        // head start now (due 1000 later): look again by the sooner.
        assert_eq!(look_again(Next::Busy, &l, 300), Some(1300));
        // Idle, due at 8000: a head may start at once, due at 1300.
        assert_eq!(look_again(Next::At(8000), &l, 300), Some(1300));
        // A head due before that is looked at on time.
        assert_eq!(look_again(Next::At(900), &l, 300), Some(900));
        assert_eq!(look_again(Next::HeaderTimeout, &l, 300), None);
        // An idle timeout shorter than the header timeout bounds it.
        assert_eq!(look_again(Next::Busy, &limits(1000, 200, 1), 0), Some(200));
    }

    #[test]
    fn the_reserve_is_the_top_of_the_descriptor_range() {
        assert_eq!(descriptor_reserve(1024), 128);
        assert_eq!(descriptor_reserve(256), 64);
        assert_eq!(descriptor_reserve(1 << 20), 128);
        assert!(!in_reserve(895, 1024));
        assert!(in_reserve(896, 1024));
        assert!(in_reserve(191 + 1, 256));
        assert!(!in_reserve(191, 256));
        assert!(!in_reserve(-1, 256));
        assert!(!in_reserve(100_000, u64::MAX));
    }

    fn gate(reserve: Reserve, cap: u32, uncapped: &[&str]) -> Arc<Gate> {
        Gate::new(
            "api",
            reserve,
            limits(1000, 1000, cap),
            uncapped.iter().map(|n| n.parse().unwrap()).collect(),
            ConnMetrics::default(),
        )
    }

    #[test]
    fn connections_per_source_are_capped_and_given_back() {
        let g = gate(Reserve::Honour, 2, &[]);
        let a: ClientAddr = "192.0.2.10".parse().unwrap();
        let b: ClientAddr = "192.0.2.11".parse().unwrap();
        let p1 = g.admit(a, 10, 1024).unwrap();
        let _p2 = g.admit(a, 11, 1024).unwrap();
        assert_eq!(g.admit(a, 12, 1024).unwrap_err(), Refusal::PerSourceLimit);
        // The IPv4-mapped form is the same source.
        let mapped: ClientAddr = "::ffff:192.0.2.10".parse().unwrap();
        assert_eq!(
            g.admit(mapped, 12, 1024).unwrap_err(),
            Refusal::PerSourceLimit
        );
        let _pb = g.admit(b, 12, 1024).unwrap();
        assert_eq!(g.open(), 3);
        drop(p1);
        assert_eq!(g.open(), 2);
        let _p3 = g.admit(a, 13, 1024).unwrap();
        assert_eq!(
            g.metrics
                .refused
                .get_or_create(&ReasonLabels {
                    listener: "api".into(),
                    reason: "per_source_limit",
                })
                .get(),
            2
        );
    }

    /// The `reason` labels dashboards match on.
    #[test]
    fn reason_labels_are_the_published_ones() {
        assert_eq!(
            [
                Refusal::PerSourceLimit,
                Refusal::DescriptorReserve,
                Refusal::DescriptorExhausted
            ]
            .map(Refusal::label),
            [
                "per_source_limit",
                "descriptor_reserve",
                "descriptor_exhausted"
            ]
        );
        assert_eq!(
            [Closed::HeaderTimeout, Closed::IdleTimeout].map(Closed::label),
            ["header_timeout", "idle_timeout"]
        );
    }

    #[test]
    fn trusted_proxies_are_not_capped() {
        let g = gate(Reserve::Honour, 1, &["198.51.100.0/24"]);
        let proxy: ClientAddr = "198.51.100.250".parse().unwrap();
        let held: Vec<Permit> = (0..5)
            .map(|i| g.admit(proxy, 10 + i, 1024).unwrap())
            .collect();
        assert_eq!(held.len(), 5);
    }

    #[test]
    fn listeners_refuse_reserved_descriptors_management_does_not() {
        let shim = gate(Reserve::Honour, 10, &[]);
        let mgmt = gate(Reserve::Use, 10, &[]);
        let a: ClientAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            shim.admit(a, 200, 256).unwrap_err(),
            Refusal::DescriptorReserve
        );
        let _held = shim.admit(a, 150, 256).unwrap();
        assert!(mgmt.admit(a, 250, 256).is_ok());
        // A refusal for the reserve holds no slot of the source.
        assert_eq!(shim.open(), 1);
    }

    #[tokio::test]
    async fn drain_waits_for_the_last_connection() {
        let g = gate(Reserve::Use, 10, &[]);
        let p = g.admit("127.0.0.1".parse().unwrap(), 5, 1024).unwrap();
        assert!(!g.drain(Duration::from_millis(20)).await);
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.drain(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(p);
        assert!(waiter.await.unwrap());
    }
}

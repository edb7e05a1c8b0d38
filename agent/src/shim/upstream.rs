//! A proxy listener's upstream: `http://` (HTTP/1.1), `h2c://` (HTTP/2 with
//! prior knowledge) or `https://` (TLS through rustls, HTTP/2 or HTTP/1.1 as
//! ALPN decides).
//!
//! An HTTP/1 upstream connection belongs to the downstream connection that
//! opened it ([`Owned`]): its requests go out on it one after the other, on
//! the same worker thread, with no pool to check out from, and its protocol
//! state machine is polled in the downstream connection's own task
//! ([`Owned::alongside`]), so a request and its response cross no task
//! boundary. A downstream HTTP/2 connection's concurrent requests each take
//! the owned connection when it is free and open another when it is not
//! (kept only while the owned slot is empty; run as a task of its own). An
//! HTTP/2 upstream connection is shared by the worker's requests of the
//! listener (one per worker, reopened when it closes).
//!
//! A request without a body to an `http://` upstream skips hyper's client:
//! keyfence's own codec (`super::h1`) writes it on a connection the
//! downstream connection keeps idle for it ([`Owned`]'s `raw` slot) and
//! reads the response straight from it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use http_body_util::Either;
use hyper::{
    Method, Request, Response, Uri, Version,
    body::{Body as _, Incoming},
    client::conn::{http1, http2},
    header::{self, HeaderValue},
    http::uri::{Authority, PathAndQuery, Scheme},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, rustls};

use super::h1;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of a request sent upstream: the client's, capped (a concrete
/// type, not a box: no allocation per request).
pub type ProxyBody = super::body::Capped<Incoming>;
/// The body of an upstream's response: hyper's, or read by keyfence's own
/// HTTP/1 codec.
pub type UpstreamBody = Either<Incoming, h1::ResponseBody>;

/// Time to open the TCP connection (and finish the TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The CA certificates an `https://` upstream is checked against when the
/// listener names no `upstream_ca` (Debian's `ca-certificates` bundle).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why an upstream could not be set up, or a request not exchanged.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0:?} is not an http://, h2c:// or https:// URL with a host")]
    BadUrl(String),
    #[error("reading the CA certificates in {0}: {1}")]
    Ca(PathBuf, String),
    #[error("no CA certificate in {0}")]
    NoCa(PathBuf),
    #[error("TLS client setup: {0}")]
    TlsSetup(#[from] rustls::Error),
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("connecting to {0}: no connection within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(String),
    #[error("TLS handshake with {0}: {1}")]
    Handshake(String, std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    H1(#[from] h1::H1Error),
}

/// How requests reach the upstream.
enum Protocol {
    Http1,
    H2c,
    Tls {
        connector: TlsConnector,
        name: ServerName<'static>,
    },
}

/// A listener's parsed upstream: where and how. Built once per listener (a
/// bad URL or CA file fails the start), shared by its workers.
pub struct Target {
    protocol: Protocol,
    /// `http` or `https`: the `:scheme` of HTTP/2 requests.
    scheme: Scheme,
    authority: Authority,
    /// The authority as a `Host` value, for requests that arrive without one.
    host: HeaderValue,
    /// `host:port` to connect to.
    addr: String,
}

impl Target {
    /// Parse `url` (`http://`, `h2c://` or `https://HOST[:PORT]`); `ca` is
    /// the `https://` upstream's CA file ([`SYSTEM_CA_BUNDLE`] when `None`).
    pub fn new(url: &str, ca: Option<&Path>) -> Result<Arc<Self>, UpstreamError> {
        let bad = || UpstreamError::BadUrl(url.to_owned());
        let (kind, rest) = url.split_once("://").ok_or_else(bad)?;
        let authority: Authority = rest
            .split('/')
            .next()
            .filter(|a| !a.is_empty())
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        let (scheme, default_port) = match kind {
            "http" | "h2c" => (Scheme::HTTP, 80),
            "https" => (Scheme::HTTPS, 443),
            _ => return Err(bad()),
        };
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(default_port);
        let addr = format!("{host}:{port}");
        let protocol = match kind {
            "http" => Protocol::Http1,
            "h2c" => Protocol::H2c,
            _ => {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let name = match bare.parse::<IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(bare.to_owned()).map_err(|_| bad())?,
                };
                Protocol::Tls {
                    connector: TlsConnector::from(Arc::new(client_config(
                        ca.unwrap_or(Path::new(SYSTEM_CA_BUNDLE)),
                    )?)),
                    name,
                }
            }
        };
        Ok(Arc::new(Self {
            protocol,
            scheme,
            host: HeaderValue::from_str(authority.as_str()).map_err(|_| bad())?,
            authority,
            addr,
        }))
    }
}

/// rustls with the ring provider, the CA certificates of `ca`, and ALPN
/// offering HTTP/2 first.
fn client_config(ca: &Path) -> Result<rustls::ClientConfig, UpstreamError> {
    let ca_error = |e: &dyn std::fmt::Display| UpstreamError::Ca(ca.to_owned(), e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| ca_error(&e))? {
        roots
            .add(cert.map_err(|e| ca_error(&e))?)
            .map_err(|e| ca_error(&e))?;
    }
    if roots.is_empty() {
        return Err(UpstreamError::NoCa(ca.to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What ALPN chose on an `https://` upstream's last connection.
const ALPN_UNKNOWN: u8 = 0;
const ALPN_H1: u8 = 1;
const ALPN_H2: u8 = 2;

/// One worker's side of a listener's upstream: the shared HTTP/2 connection.
pub struct Upstream {
    target: Arc<Target>,
    h2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    alpn: AtomicU8,
}

/// An upstream connection's protocol task (hyper's `Connection`), boxed
/// once per connection.
type ConnTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The HTTP/1 upstream connection a downstream connection owns (empty until
/// its first proxied request; closed with it). The downstream connection
/// must run under [`Owned::alongside`]: that is where its upstream
/// connection is driven.
#[derive(Default)]
pub struct Owned {
    slot: Mutex<Option<http1::SendRequest<ProxyBody>>>,
    /// The protocol task of the upstream connection opened first (and again
    /// after it closes), polled by [`Owned::alongside`].
    task: Mutex<Option<ConnTask>>,
    /// The waker `alongside` polls with (see [`Turns`]).
    turns: Arc<Turns>,
    /// The idle connection keyfence's own codec sends bodiless requests on
    /// (see `super::h1`).
    raw: h1::Slot,
}

impl Owned {
    fn take(&self) -> Option<http1::SendRequest<ProxyBody>> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Keep `sender` for the next request, unless the slot holds one.
    fn put(&self, sender: http1::SendRequest<ProxyBody>) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(sender);
        }
    }

    /// Run `task` (a new upstream connection's) in the downstream
    /// connection's task when none runs there, else as a task of its own.
    fn run(&self, task: ConnTask) {
        let mut slot = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(task);
            drop(slot);
            // It has registered no waker yet: have `alongside` poll it, at
            // once when this runs inside its poll (a downstream HTTP/1
            // request), else (a downstream HTTP/2 stream, a task of its own)
            // by waking the connection's task.
            self.turns.wake_by_ref();
        } else {
            drop(slot);
            tokio::spawn(task);
        }
    }

    /// Poll the upstream connection's task; forget it once it has ended.
    fn poll_task(&self, cx: &mut Context<'_>) {
        let mut slot = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = slot.as_mut()
            && task.as_mut().poll(cx).is_ready()
        {
            *slot = None;
        }
    }

    /// Drive `downstream` (the downstream connection) and the upstream
    /// connection it owns as one task, until `downstream` ends (the upstream
    /// connection then closes with it).
    ///
    /// The two hand each other every request and response, and each hand-off
    /// wakes the other; woken from inside this task's own poll, tokio would
    /// queue the task and poll it all again. Here such a wake only marks the
    /// turn to be taken again at once ([`Turns`]), at most [`TURNS`] times
    /// per poll. One downstream connection per `Owned`.
    pub async fn alongside<F: Future>(&self, downstream: F) -> F::Output {
        let mut downstream = std::pin::pin!(downstream);
        let turns = &self.turns;
        let waker = Waker::from(turns.clone());
        std::future::poll_fn(|cx| {
            turns.set_task(cx.waker());
            if self
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none()
            {
                // No hyper connection to drive (none yet, or keyfence's own
                // codec carries every request): nothing to take turns with.
                // One handed over during this poll wakes the task (`run`),
                // which then polls it here.
                return downstream.as_mut().poll(cx);
            }
            // A wake that came before this poll is what this poll answers.
            turns.woken.store(false, Ordering::SeqCst);
            let mut inner = Context::from_waker(&waker);
            for _ in 0..TURNS {
                turns.polling.store(true, Ordering::SeqCst);
                self.poll_task(&mut inner);
                if let Poll::Ready(out) = downstream.as_mut().poll(&mut inner) {
                    turns.polling.store(false, Ordering::SeqCst);
                    return Poll::Ready(out);
                }
                turns.polling.store(false, Ordering::SeqCst);
                if !turns.woken.swap(false, Ordering::SeqCst) {
                    return Poll::Pending;
                }
            }
            // Still being woken: let the worker run its other tasks first.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }
}

/// Turns [`Owned::alongside`] takes in one poll before yielding.
const TURNS: usize = 8;

/// The waker [`Owned::alongside`] polls with: a wake while it polls marks
/// another turn; any other wake wakes the task.
#[derive(Default)]
struct Turns {
    polling: AtomicBool,
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Turns {
    fn set_task(&self, waker: &Waker) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }
}

impl Wake for Turns {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Ordered against `alongside`'s store of `polling` and swap of
        // `woken`: either it sees this mark, or this sees it has stopped
        // polling and wakes the task.
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst)
            && let Some(task) = &*self.task.lock().unwrap_or_else(PoisonError::into_inner)
        {
            task.wake_by_ref();
        }
    }
}

/// A fresh upstream connection.
enum Fresh {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Upstream {
    #[must_use]
    pub fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            h2: Mutex::new(None),
            alpn: AtomicU8::new(ALPN_UNKNOWN),
        }
    }

    /// Send `req` (its headers already those to forward) and return the
    /// response head. `sequential`: the downstream connection is HTTP/1, so
    /// its requests come one after the other and the owned connection is
    /// waited for rather than doubled.
    ///
    /// Not an `async fn`: that would hold `req` beside the future it goes
    /// into. hyper's client is boxed: its futures would make every
    /// request's future kilobytes larger, and hyper moves (memmove) a
    /// request's future when it starts it.
    pub fn send<'a>(
        &'a self,
        owned: &'a Owned,
        req: Request<ProxyBody>,
        sequential: bool,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> + Send + 'a {
        if matches!(self.target.protocol, Protocol::Http1) && bodiless(&req) {
            tokio_util::either::Either::Left(self.send_raw(owned, req.into_parts().0))
        } else {
            tokio_util::either::Either::Right(Box::pin(self.send_hyper(owned, req, sequential)))
        }
    }

    /// [`Upstream::send`] through hyper's client.
    async fn send_hyper(
        &self,
        owned: &Owned,
        mut req: Request<ProxyBody>,
        sequential: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let h2 = match self.target.protocol {
            Protocol::Http1 => false,
            Protocol::H2c => true,
            Protocol::Tls { .. } => self.alpn.load(Ordering::Relaxed) == ALPN_H2,
        };
        if h2 {
            let shared = self
                .h2
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .filter(|s| !s.is_closed())
                .cloned();
            if let Some(sender) = shared {
                return Ok(self.send_h2(sender, req).await?.map(Either::Left));
            }
        } else if let Some(mut sender) = owned.take() {
            let usable = if sequential {
                sender.ready().await.is_ok()
            } else {
                sender.is_ready()
            };
            if usable {
                match sender.try_send_request(self.prepare_h1(req)).await {
                    Ok(resp) => {
                        owned.put(sender);
                        return Ok(resp.map(Either::Left));
                    }
                    // Closed by the upstream before the request went out
                    // (a keep-alive race): send it on a fresh connection.
                    Err(mut e) => match e.take_message() {
                        Some(back) => req = back,
                        None => return Err(e.into_error().into()),
                    },
                }
            } else if !sender.is_closed() {
                owned.put(sender);
            }
        }
        // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) happens once per
        // connection, and inline its state would make every request's future
        // kilobytes larger, copied (memmove) each time hyper moves it.
        match Box::pin(self.connect(owned)).await? {
            Fresh::H1(mut sender) => {
                let resp = sender.send_request(self.prepare_h1(req)).await?;
                owned.put(sender);
                Ok(resp.map(Either::Left))
            }
            Fresh::H2(sender) => {
                *self.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
                Ok(self.send_h2(sender, req).await?.map(Either::Left))
            }
        }
    }

    /// A bodiless request to an `http://` upstream, through keyfence's own
    /// codec: on the downstream connection's idle connection when it has
    /// one, else on a new one (kept idle after it when the slot is empty).
    ///
    /// A kept connection on which anything arrived while it idled (its close,
    /// a `408`) is not used. One the upstream closes in the instant after
    /// that check fails before any answer: an idempotent request (RFC 9110
    /// §9.2.2) is then sent once more on a new connection; any other is never
    /// sent twice, and the client gets 502.
    async fn send_raw(
        &self,
        owned: &Owned,
        mut parts: hyper::http::request::Parts,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        self.prepare_h1_parts(&mut parts);
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        if let Some(mut conn) = owned.raw.take().filter(h1::Conn::idle_clean) {
            match conn.exchange(&parts).await {
                Ok(head) => return Ok(raw_response(conn, head, &owned.raw)),
                Err(e) if idempotent && e.stale() => {
                    tracing::debug!(error = %e, "kept upstream connection gone: sending again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut conn = h1::Conn::new(Box::pin(self.tcp()).await?);
        let head = conn.exchange(&parts).await?;
        Ok(raw_response(conn, head, &owned.raw))
    }

    /// A new TCP connection to the upstream (`TCP_NODELAY` set).
    async fn tcp(&self) -> Result<TcpStream, UpstreamError> {
        let addr = &self.target.addr;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(addr.clone()))?
            .map_err(|e| UpstreamError::Connect(addr.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn send_h2(
        &self,
        mut sender: http2::SendRequest<ProxyBody>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.prepare_h2(&mut req);
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    /// HTTP/1.1 in origin form, with a `Host` (the client's, else the
    /// upstream's authority).
    fn prepare_h1(&self, req: Request<ProxyBody>) -> Request<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        self.prepare_h1_parts(&mut parts);
        Request::from_parts(parts, body)
    }

    fn prepare_h1_parts(&self, parts: &mut hyper::http::request::Parts) {
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = Uri::from(path);
        }
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, self.target.host.clone());
        }
        parts.version = Version::HTTP_11;
    }

    /// HTTP/2 in absolute form: `:authority` is the client's `Host` when it
    /// is one, else the upstream's; `Host` itself is not sent (RFC 9113
    /// §8.3.1).
    fn prepare_h2(&self, req: &mut Request<ProxyBody>) {
        let authority = req
            .headers_mut()
            .remove(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .or_else(|| req.uri().authority().cloned())
            .unwrap_or_else(|| self.target.authority.clone());
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(self.target.scheme.clone());
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_2;
    }

    /// Open a connection and run its protocol task on this worker: an
    /// HTTP/1 connection's in `owned`'s downstream task when it has none.
    async fn connect(&self, owned: &Owned) -> Result<Fresh, UpstreamError> {
        let addr = &self.target.addr;
        let tcp = self.tcp().await?;
        match &self.target.protocol {
            Protocol::Http1 => h1(tcp, owned).await,
            Protocol::H2c => h2(tcp).await,
            Protocol::Tls { connector, name } => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| UpstreamError::ConnectTimeout(addr.clone()))?
                        .map_err(|e| UpstreamError::Handshake(addr.clone(), e))?;
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    self.alpn.store(ALPN_H2, Ordering::Relaxed);
                    h2(tls).await
                } else {
                    self.alpn.store(ALPN_H1, Ordering::Relaxed);
                    h1(tls, owned).await
                }
            }
        }
    }
}

/// A request keyfence's own codec can carry: no body (none announced, none
/// to come) and not `CONNECT`.
fn bodiless(req: &Request<ProxyBody>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// The response of `head` read from `conn`, which goes back to `slot` when
/// its body has ended cleanly.
fn raw_response(conn: h1::Conn, head: h1::Head, slot: &h1::Slot) -> Response<UpstreamBody> {
    let body = h1::ResponseBody::new(conn, &head, slot.clone());
    h1::response(head, body).map(Either::Right)
}

async fn h1<T>(io: T, owned: &Owned) -> Result<Fresh, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    owned.run(Box::pin(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    }));
    Ok(Fresh::H1(sender))
}

async fn h2<T>(io: T) -> Result<Fresh, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(Fresh::H2(sender))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_parse_or_are_refused() {
        let t = Target::new("http://127.0.0.1:8080", None).unwrap();
        assert!(matches!(t.protocol, Protocol::Http1));
        assert_eq!(t.addr, "127.0.0.1:8080");
        assert_eq!(t.host, "127.0.0.1:8080");
        let t = Target::new("h2c://[2001:db8::1]", None).unwrap();
        assert!(matches!(t.protocol, Protocol::H2c));
        assert_eq!(t.addr, "[2001:db8::1]:80");
        assert_eq!(t.scheme, Scheme::HTTP);
        for bad in ["ftp://x", "http://", "127.0.0.1:80", "h2c:///path"] {
            assert!(
                matches!(Target::new(bad, None), Err(UpstreamError::BadUrl(_))),
                "{bad}"
            );
        }
    }

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An `Owned` driving a (never-ending) hyper connection task, so that
    /// `alongside` takes turns.
    fn driving() -> Owned {
        let owned = Owned::default();
        owned.run(Box::pin(std::future::pending()));
        owned
    }

    /// A future that wakes itself `n` times from inside its poll, then ends
    /// with the number of polls it took.
    fn self_waking(n: usize) -> impl Future<Output = usize> {
        let mut polls = 0;
        std::future::poll_fn(move |cx| {
            polls += 1;
            if polls > n {
                Poll::Ready(polls)
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
    }

    #[test]
    fn wakes_from_inside_alongside_take_another_turn_not_a_trip_through_the_queue() {
        let owned = driving();
        let outer = Arc::new(Count::default());
        let waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&waker);
        let mut run = std::pin::pin!(owned.alongside(self_waking(TURNS - 1)));
        assert_eq!(run.as_mut().poll(&mut cx), Poll::Ready(TURNS));
        assert_eq!(outer.0.load(Ordering::SeqCst), 0, "the task was not queued");

        // One that keeps waking itself yields after TURNS turns, queued.
        let mut run = std::pin::pin!(owned.alongside(self_waking(TURNS + 2)));
        assert!(run.as_mut().poll(&mut cx).is_pending());
        assert_eq!(outer.0.load(Ordering::SeqCst), 1);
        assert_eq!(run.as_mut().poll(&mut cx), Poll::Ready(TURNS + 3));
    }

    #[test]
    fn a_wake_from_outside_alongside_wakes_the_task() {
        let owned = driving();
        let outer = Arc::new(Count::default());
        let waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&waker);
        let kept: Arc<Mutex<Option<Waker>>> = Arc::default();
        let store = kept.clone();
        let mut done = false;
        let mut run = std::pin::pin!(owned.alongside(std::future::poll_fn(move |cx| {
            if done {
                return Poll::Ready(());
            }
            done = true;
            *store.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        })));
        assert!(run.as_mut().poll(&mut cx).is_pending());
        assert_eq!(outer.0.load(Ordering::SeqCst), 0);
        let inner = kept.lock().unwrap().take().unwrap();
        std::thread::spawn(move || inner.wake()).join().unwrap();
        assert_eq!(outer.0.load(Ordering::SeqCst), 1);
        assert_eq!(run.as_mut().poll(&mut cx), Poll::Ready(()));
    }

    #[test]
    fn a_connection_task_handed_to_alongside_is_polled_at_its_next_poll() {
        let owned = Owned::default();
        let outer = Arc::new(Count::default());
        let waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&waker);
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let owned_ref = &owned;
        let mut handed = false;
        // The downstream side hands over a task (as a fresh connection does)
        // and waits for it to run; nothing wakes anybody.
        let mut run = std::pin::pin!(owned.alongside(std::future::poll_fn(move |_| {
            if !handed {
                handed = true;
                let flag = flag.clone();
                owned_ref.run(Box::pin(async move { flag.store(true, Ordering::SeqCst) }));
            }
            if ran.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })));
        // Handed over in a poll that drove no connection: the task is woken
        // to come back for it.
        assert!(run.as_mut().poll(&mut cx).is_pending());
        assert_eq!(outer.0.load(Ordering::SeqCst), 1);
        assert_eq!(run.as_mut().poll(&mut cx), Poll::Ready(()));
        assert!(
            owned.task.lock().unwrap().is_none(),
            "an ended task is dropped"
        );
    }

    /// An upstream on loopback that answers the `n`th request head of its
    /// `c`th connection with `script[c][n]` and closes the connection after
    /// its last answer; the request lines it got, per connection. An empty
    /// answer closes the connection instead of answering; `idle:` + bytes
    /// sends the bytes 20 ms later unasked.
    struct Scripted {
        target: Arc<Target>,
        heads: Arc<Mutex<Vec<Vec<String>>>>,
    }

    impl Scripted {
        async fn start(script: Vec<Vec<&'static str>>) -> Self {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let heads: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
            let seen = heads.clone();
            tokio::spawn(async move {
                for answers in script {
                    let (mut tcp, _) = listener.accept().await.unwrap();
                    let seen = seen.clone();
                    let index = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Vec::new());
                        seen.len() - 1
                    };
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        for answer in answers {
                            if let Some(unasked) = answer.strip_prefix("idle:") {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                tcp.write_all(unasked.as_bytes()).await.unwrap();
                                continue;
                            }
                            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                let mut chunk = [0u8; 4096];
                                let n = tcp.read(&mut chunk).await.unwrap_or(0);
                                if n == 0 {
                                    return;
                                }
                                buf.extend_from_slice(&chunk[..n]);
                            }
                            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end);
                            seen.lock().unwrap()[index].push(head);
                            if answer.is_empty() {
                                return;
                            }
                            tcp.write_all(answer.as_bytes()).await.unwrap();
                        }
                    });
                }
            });
            let target = Target::new(&format!("http://{addr}"), None).unwrap();
            Self { target, heads }
        }

        /// The request lines each connection got.
        fn lines(&self) -> Vec<Vec<String>> {
            self.heads
                .lock()
                .unwrap()
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|h| h.lines().next().unwrap().to_owned())
                        .collect()
                })
                .collect()
        }
    }

    fn parts(method: &str, path: &str) -> hyper::http::request::Parts {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    /// Send a bodiless request through keyfence's own codec; status and body.
    async fn raw(
        upstream: &Upstream,
        owned: &Owned,
        method: &str,
        path: &str,
    ) -> Result<(u16, String), String> {
        use http_body_util::BodyExt as _;
        let resp = upstream
            .send_raw(owned, parts(method, path))
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    }

    /// `method path` is answered 200 `ok`.
    async fn answers_ok(upstream: &Upstream, owned: &Owned, method: &str, path: &str) {
        assert_eq!(
            raw(upstream, owned, method, path).await,
            Ok((200, "ok".into())),
            "{method} {path}"
        );
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    const CHUNKED: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nch\r\n5;x=1\r\nunked\r\n0\r\n\r\n";

    #[tokio::test]
    async fn bodiless_requests_share_one_kept_connection() {
        let up = Scripted::start(vec![vec![OK, CHUNKED, OK]]).await;
        let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
        answers_ok(&upstream, &owned, "GET", "/a").await;
        assert_eq!(
            raw(&upstream, &owned, "DELETE", "/b?x=1").await,
            Ok((200, "chunked".into()))
        );
        answers_ok(&upstream, &owned, "GET", "/c").await;
        assert_eq!(
            up.lines(),
            [[
                "GET /a HTTP/1.1",
                "DELETE /b?x=1 HTTP/1.1",
                "GET /c HTTP/1.1"
            ]]
        );
        // The upstream's authority is the Host of a request without one.
        let first = up.heads.lock().unwrap()[0][0].clone();
        assert!(
            first.contains(&format!("host: {}\r\n", up.target.authority)),
            "{first}"
        );
    }

    /// The close of an idle kept connection is seen before a request goes
    /// out on it, whatever the method: each goes out once, on a new one.
    #[tokio::test]
    async fn a_kept_connection_the_upstream_closed_carries_no_request() {
        for method in ["GET", "POST"] {
            // The first connection answers once and closes; the second answers.
            let up = Scripted::start(vec![vec![OK], vec![OK]]).await;
            let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
            for path in ["/a", "/b"] {
                answers_ok(&upstream, &owned, method, path).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                up.lines(),
                [
                    vec![format!("{method} /a HTTP/1.1")],
                    vec![format!("{method} /b HTTP/1.1")]
                ]
            );
        }
    }

    /// Closed in the instant after the check, when the request is already
    /// out: a GET is sent again on a new connection, a POST never twice.
    #[tokio::test]
    async fn a_close_that_races_the_request_retries_only_what_is_idempotent() {
        let up = Scripted::start(vec![vec![OK, ""], vec![OK]]).await;
        let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
        for path in ["/a", "/b"] {
            answers_ok(&upstream, &owned, "GET", path).await;
        }
        assert_eq!(
            up.lines(),
            [
                vec!["GET /a HTTP/1.1", "GET /b HTTP/1.1"],
                vec!["GET /b HTTP/1.1"]
            ]
        );

        let up = Scripted::start(vec![vec![OK, ""], vec![OK]]).await;
        let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
        answers_ok(&upstream, &owned, "POST", "/a").await;
        let e = raw(&upstream, &owned, "POST", "/b").await.unwrap_err();
        assert!(e.contains("before answering"), "{e}");
        assert_eq!(up.lines(), [vec!["POST /a HTTP/1.1", "POST /b HTTP/1.1"]]);
    }

    /// Bytes the upstream sent unasked on an idle connection (a `408` before
    /// it closes) are never read as the next request's answer.
    #[tokio::test]
    async fn an_unasked_answer_on_an_idle_connection_retires_it() {
        const TIMEOUT_408: &str = "idle:HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n";
        let up = Scripted::start(vec![vec![OK, TIMEOUT_408, OK], vec![OK]]).await;
        let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
        answers_ok(&upstream, &owned, "GET", "/a").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        answers_ok(&upstream, &owned, "GET", "/b").await;
        assert_eq!(
            up.lines(),
            [vec!["GET /a HTTP/1.1"], vec!["GET /b HTTP/1.1"]]
        );
    }

    #[tokio::test]
    async fn a_connection_is_not_used_again_after_a_response_it_cannot_trust() {
        let up = Scripted::start(vec![
            // More bytes than the response framed.
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n", OK],
            // Both Content-Length and Transfer-Encoding.
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", OK],
            // Connection: close.
            vec!["HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", OK],
            vec![OK],
        ])
        .await;
        let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
        for path in ["/a", "/b", "/c", "/d"] {
            answers_ok(&upstream, &owned, "GET", path).await;
        }
        assert_eq!(
            up.lines().iter().map(Vec::len).collect::<Vec<_>>(),
            [1, 1, 1, 1]
        );
    }

    #[tokio::test]
    async fn a_malformed_or_cut_response_is_an_error_and_its_connection_closes() {
        let up = Scripted::start(vec![
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"],
            // Cut in the middle of its body (the script then closes).
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"],
            vec!["HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
            vec![OK],
        ])
        .await;
        let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
        let e = raw(&upstream, &owned, "GET", "/a").await.unwrap_err();
        assert!(e.contains("Content-Length values differ"), "{e}");
        let e = raw(&upstream, &owned, "GET", "/b").await.unwrap_err();
        assert!(e.contains("middle of its response"), "{e}");
        let e = raw(&upstream, &owned, "GET", "/c").await.unwrap_err();
        assert!(e.contains("chunk size"), "{e}");
        answers_ok(&upstream, &owned, "GET", "/d").await;
        assert_eq!(up.lines().len(), 4);
    }

    #[tokio::test]
    async fn a_response_body_dropped_before_its_end_closes_its_connection() {
        let up = Scripted::start(vec![
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", OK],
            vec![OK],
        ])
        .await;
        let (upstream, owned) = (Upstream::new(up.target.clone()), Owned::default());
        let resp = upstream.send_raw(&owned, parts("GET", "/a")).await.unwrap();
        drop(resp);
        answers_ok(&upstream, &owned, "GET", "/b").await;
        assert_eq!(
            up.lines(),
            [vec!["GET /a HTTP/1.1"], vec!["GET /b HTTP/1.1"]]
        );
    }

    #[test]
    fn an_https_upstream_needs_readable_ca_certificates() {
        let dir = std::env::temp_dir().join(format!("kf-upstream-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            Target::new("https://example.test", Some(&empty)),
            Err(UpstreamError::NoCa(_))
        ));
        assert!(matches!(
            Target::new("https://example.test", Some(&dir.join("absent.pem"))),
            Err(UpstreamError::Ca(..))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

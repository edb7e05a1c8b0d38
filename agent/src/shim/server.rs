//! Listener sockets and the request path: our own accept loop reads the PROXY
//! header (when configured) before TLS and TLS before HTTP, then hyper serves
//! HTTP/1.1 and HTTP/2 on the connection (SPEC §5).

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock, PoisonError, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    service::service_fn,
};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    body::{Capped, Overflow},
    client_ip::{
        ConnClient, PROXY_V2_MAX, ProxyParse, appended_xff, is_trusted, parse_proxy_header,
    },
    decide::{Verdict, decide},
    outcome::Outcome,
    tls::TlsAcceptor,
    upstream::{Owned, ProxyBody, Target, Upstream, UpstreamBody, UpstreamError},
};
use crate::{
    allowlist::ClientAddr,
    config::{ClientIpSource, ListenerConfig, ListenerMode, Rejection},
    conn::{self, Activity, Gate, Permit, Reserve},
    keys::{
        Key, KeyTable,
        credentials::{Credential, CredentialHeader, credential},
    },
    metrics::Metrics,
};

/// Time a trusted proxy gets to send its PROXY header.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest request body forwarded.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A response: one keyfence wrote, or the upstream's body passed through
/// (an enum, not a box: no allocation per response).
type Body = Either<Full<Bytes>, UpstreamBody>;

pub const KEY_ID_HEADER: &str = "x-keyfence-key-id";
const KEY_ID: HeaderName = HeaderName::from_static(KEY_ID_HEADER);
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// What every listener reads on each request; swapped whole on change.
pub struct Shared {
    /// Read for the moment of a decision, written in place by key changes.
    pub keys: RwLock<KeyTable>,
    pub rejection: RwLock<Arc<Rejection>>,
    pub metrics: Arc<Metrics>,
    /// Recently seen client addresses per key.
    pub sources: Arc<super::sources::Sources>,
}

impl ListenerCtx {
    fn config(&self) -> Arc<ListenerConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Shared {
    fn rejection(&self) -> Arc<Rejection> {
        self.rejection
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// One worker's state of one listener.
struct ListenerCtx {
    config: RwLock<Arc<ListenerConfig>>,
    shared: Arc<Shared>,
    upstream: Option<Upstream>,
    /// `keyfence_http_requests_total` of this listener, per [`Outcome`]
    /// (looked up once: no label `String` per request).
    requests: [OnceLock<Counter>; Outcome::ALL.len()],
    duration: Histogram,
}

impl ListenerCtx {
    fn observe(&self, outcome: Outcome, took: Duration) {
        let metrics = &self.shared.metrics;
        self.requests[outcome as usize]
            .get_or_init(|| {
                metrics
                    .http_requests
                    .get_or_create(&crate::metrics::HttpLabels {
                        listener: self.name(),
                        outcome: outcome.label(),
                    })
                    .clone()
            })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    fn name(&self) -> String {
        self.config().name.clone()
    }
}

/// The admission gate of a listener, shared by its workers' sockets.
#[must_use]
pub fn gate(config: &ListenerConfig, shared: &Shared) -> Arc<Gate> {
    Gate::new(
        &config.name,
        Reserve::Honour,
        config.connections,
        config.client_ip.trusted_proxies.clone(),
        shared.metrics.connections.clone(),
    )
}

/// Accept and serve until `shutdown` flips to true; then stop accepting and let
/// open connections finish their requests. Every connection passes the
/// listener's [`Gate`] (a cap per source, the descriptor reserve) and is
/// driven under its header and idle timeouts (`crate::conn`). Runs on one
/// worker (see `super::workers`); `socket` is that worker's socket.
pub async fn serve(
    socket: std::net::TcpListener,
    mut config_rx: watch::Receiver<Arc<ListenerConfig>>,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    gate: Arc<Gate>,
    target: Option<Arc<Target>>,
) {
    let config = config_rx.borrow_and_update().clone();
    let name = config.name.clone();
    let socket = match TcpListener::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(listener = name, error = %e, "cannot serve the socket");
            return;
        }
    };
    let duration = shared
        .metrics
        .http_duration
        .get_or_create(&crate::metrics::ListenerLabel {
            listener: name.clone(),
        })
        .clone();
    let ctx = Arc::new(ListenerCtx {
        config: RwLock::new(config),
        shared,
        upstream: target.map(Upstream::new),
        requests: Default::default(),
        duration,
    });
    let stop_rx = shutdown.clone();
    let spawn = |(stream, peer, permit): (TcpStream, SocketAddr, Permit)| {
        // The connection keeps the config it was accepted under.
        let config = ctx.config();
        let ctx = ctx.clone();
        let tls = tls.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, permit, ctx, config, tls, stop).await {
                tracing::debug!(%peer, error = %format!("{e:#}"), "connection ended");
            }
        });
    };
    loop {
        tokio::select! {
            accepted = conn::accept(&socket, &gate) => {
                if let Some(accepted) = accepted {
                    spawn(accepted);
                }
            }
            Ok(()) = config_rx.changed() => {
                let new = config_rx.borrow_and_update().clone();
                gate.set_limits(new.connections, new.client_ip.trusted_proxies.clone());
                *ctx.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = new;
            }
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        }
    }
    // Connections the kernel completed but nobody accepted yet would be
    // reset when the socket closes: take them and answer their first request
    // (`conn::drive` lets a new connection send it). Zero timeout: one look
    // at the queue each, until it is empty; at most a full backlog's worth,
    // so a flood of new connections cannot hold the stop.
    for _ in 0..super::workers::BACKLOG {
        let Ok(accepted) = tokio::time::timeout(Duration::ZERO, conn::accept(&socket, &gate)).await
        else {
            break;
        };
        if let Some(accepted) = accepted {
            spawn(accepted);
        }
    }
    drop(socket);
    // Each connection sees `shutdown` too and closes gracefully.
    if !gate.drain(conn::CLOSE_GRACE).await {
        tracing::warn!(
            listener = name,
            "connections still open after 30 s: closing"
        );
    }
}

/// Read (consume) exactly the PROXY header, no byte more.
async fn read_proxy_header(stream: &mut TcpStream) -> anyhow::Result<Option<SocketAddr>> {
    let mut buf = vec![0u8; PROXY_V2_MAX];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            anyhow::bail!("closed before the PROXY header");
        }
        match parse_proxy_header(&buf[..n])? {
            ProxyParse::Incomplete => {
                if n == buf.len() {
                    anyhow::bail!("PROXY header too long");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ProxyParse::Done { len, source } => {
                let mut sink = vec![0u8; len];
                stream.read_exact(&mut sink).await?;
                return Ok(source);
            }
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    permit: Permit,
    ctx: Arc<ListenerCtx>,
    config: Arc<ListenerConfig>,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    // The head deadline runs from the accept: the PROXY header and the TLS
    // handshake spend the same budget as the request head.
    let activity = Activity::new();
    let limits = permit.gate().limits();
    let head_due = activity.first_head_deadline(&limits);
    let peer_ip = permit.source();
    // The connection-level client address (before any X-Forwarded-For).
    let conn_client = match config.client_ip.source {
        ClientIpSource::ProxyProtocol => {
            if !is_trusted(peer_ip, &config.client_ip.trusted_proxies) {
                anyhow::bail!("PROXY protocol from untrusted peer {peer_ip}: closed");
            }
            let due = head_due.min(tokio::time::Instant::now() + PROXY_HEADER_TIMEOUT);
            let source = tokio::time::timeout_at(due, read_proxy_header(&mut stream))
                .await
                .context("PROXY header timeout")??;
            ConnClient::proxied(peer_ip, source)
        }
        ClientIpSource::Peer | ClientIpSource::XForwardedFor => ConnClient::direct(peer_ip),
    };
    let per_conn = Arc::new(PerConn::new(conn_client.client));
    let driver = per_conn.clone();
    let service = service_fn(move |req| handle(req, &ctx, &config, conn_client, &per_conn));
    let mut builder = conn::builder(&limits);
    // drive() enforces the header timeout of every head; hyper's own timer
    // behind it would cost a boxed timer armed and dropped per request.
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .header_read_timeout(None);
    builder
        .http2()
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    if let Some(acceptor) = tls {
        let stream = tokio::time::timeout_at(head_due, acceptor.accept(stream))
            .await
            .context("TLS handshake timeout")?
            .context("TLS handshake")?;
        let serve = conn::drive(&builder, stream, None, service, &permit, activity, shutdown);
        driver.owned.alongside(serve).await?;
    } else {
        let serve = conn::drive(&builder, stream, None, service, &permit, activity, shutdown);
        driver.owned.alongside(serve).await?;
    }
    Ok(())
}

/// What a connection keeps for all its requests.
struct PerConn {
    /// The HTTP/1 upstream connection this connection owns (see
    /// `super::upstream`); it closes with the connection.
    owned: Owned,
    /// The connection's origin, appended to `X-Forwarded-For`: the TCP
    /// peer, or the source a trusted PROXY header named.
    origin: ClientAddr,
    /// `X-Forwarded-For` when the request brings none: the connection's
    /// origin, formatted once (a shared value: cloning it is a count).
    origin_xff: Option<HeaderValue>,
    /// `X-Keyfence-Key-Id` of the key last accepted on this connection
    /// (usually its only one), made once rather than per request.
    key_id: Mutex<Option<(Arc<Key>, HeaderValue)>>,
}

impl PerConn {
    fn new(origin: ClientAddr) -> Self {
        Self {
            owned: Owned::default(),
            origin,
            origin_xff: shared_value(origin.to_string()),
            key_id: Mutex::new(None),
        }
    }

    /// `key`'s id as a header value; `None` for an id that is not a valid
    /// value (the header is then not sent).
    fn key_id(&self, key: &Arc<Key>) -> Option<HeaderValue> {
        let mut cached = self.key_id.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((k, v)) = &*cached
            && Arc::ptr_eq(k, key)
        {
            return Some(v.clone());
        }
        let value = shared_value(key.id.clone())?;
        *cached = Some((key.clone(), value.clone()));
        Some(value)
    }
}

/// `s` as a header value whose clones share one buffer (a value made from a
/// `String` copies itself into a shared buffer at its first clone).
fn shared_value(s: String) -> Option<HeaderValue> {
    let value = HeaderValue::from_maybe_shared(Bytes::from(s)).ok()?;
    // The first clone makes the buffer shared; keep the clone.
    #[expect(
        clippy::redundant_clone,
        reason = "the clone is what shares the buffer"
    )]
    let shared = value.clone();
    Some(shared)
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Either::Left(Full::new(Bytes::from(body))))
        .expect("static response parts")
}

/// Escape a value for a JSON string literal.
fn json_escape(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted[1..quoted.len() - 1].to_string()
}

/// The rejection body with `{ip}` and `{key_id}` filled in (JSON-escaped).
#[must_use]
pub fn render_rejection(template: &str, ip: Option<IpAddr>, key_id: &str) -> String {
    let ip = ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    template
        .replace("{ip}", &json_escape(&ip))
        .replace("{key_id}", &json_escape(key_id))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), as names (no parse per request).
/// A `static`: a `const` array would be built and dropped at every use,
/// once per header looked at.
/// `Connection` first: [`strip_hop_by_hop`] reads it as bit 0.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove hop-by-hop headers, including those named by `Connection`.
/// `Connection` is read as bytes, so a value with a byte that is not UTF-8
/// does not hide the names listed next to it.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names a message has, noting which of the eight
    // it carries (bit i: `HOP_BY_HOP[i]`): most requests carry none, most
    // upstream responses only `Connection: keep-alive`. Only those present
    // are removed, one hash lookup each, rather than a lookup for all eight.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // `Connection` (`HOP_BY_HOP[0]`): the names it lists beyond the
        // fixed ones (removed below anyway), usually none, so no `Vec` and
        // no name parsed.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|n| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(n))
            })
            .filter_map(|n| HeaderName::from_bytes(n).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// What a request is answered with: a response made at once, or the
/// exchange with the upstream ([`forward`]).
///
/// The decision is synchronous; only the upstream exchange is a future. A
/// request's future is moved whole when hyper starts it, and each nested
/// `async fn` would store its arguments (the request among them) again: the
/// nested version was a 3960-byte future, copied per request.
type Answer<F> =
    tokio_util::either::Either<std::future::Ready<Result<Response<Body>, Infallible>>, F>;

/// `response`, answered at once.
fn at_once<F>(response: Response<Body>) -> Answer<F> {
    Answer::Left(std::future::ready(Ok(response)))
}

fn handle(
    req: Request<Incoming>,
    ctx: &Arc<ListenerCtx>,
    config: &ListenerConfig,
    conn: ConnClient,
    per_conn: &Arc<PerConn>,
) -> Answer<impl Future<Output = Result<Response<Body>, Infallible>> + Send + use<>> {
    let started = Instant::now();
    let listener = config.name.as_str();
    let resolved = conn.resolve(&config.client_ip, req.headers());
    let client = resolved.map(ClientAddr::ip);
    if req.uri().path() == "/_keyfence/ip" {
        let ip = client.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        return at_once(json(
            StatusCode::OK,
            format!("{{\"ip\":\"{}\"}}", json_escape(&ip)),
        ));
    }
    let answer_now = |response: Response<Body>, outcome: Outcome| {
        ctx.observe(outcome, started.elapsed());
        at_once(response)
    };
    let metrics = &ctx.shared.metrics;
    let now = SystemTime::now();
    let presented = request_credential(req.headers(), config.key_header.as_deref());
    let carrier = match presented {
        Credential::Several => {
            // The shim would check one and the upstream might read another.
            metrics.refusal_log(listener, None, client, Outcome::BadRequest);
            return answer_now(
                json(
                    StatusCode::BAD_REQUEST,
                    format!(r#"{{"error":"{SEVERAL_CREDENTIALS}"}}"#),
                ),
                Outcome::BadRequest,
            );
        }
        Credential::One { header, .. } => Some(header),
        Credential::Absent => None,
    };
    let verdict = decide(
        config,
        &ctx.shared
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        presented.key(),
        resolved,
        now,
    );
    let seen = |key_id: &str, ip: Option<IpAddr>, decided: Outcome| {
        if let Some(ip) = ip {
            ctx.shared.sources.record(key_id, ip, decided, now);
        }
    };
    let (key, answered) = match verdict {
        Verdict::InvalidKey => {
            metrics.refusal_log(listener, None, client, Outcome::InvalidKey);
            return answer_now(
                json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"error":"invalid API key"}"#.into(),
                ),
                Outcome::InvalidKey,
            );
        }
        Verdict::IpNotAllowed { key, ip } => {
            seen(&key.id, ip, Outcome::IpNotAllowed);
            let rejection = ctx.shared.rejection();
            metrics.refusal_log(listener, Some(&key.id), ip, Outcome::IpNotAllowed);
            let status = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::FORBIDDEN);
            return answer_now(
                json(status, render_rejection(&rejection.body, ip, &key.id)),
                Outcome::IpNotAllowed,
            );
        }
        Verdict::ReportOnly { key, ip } => {
            // Counted as refused: it is the refusal the key would have had.
            seen(&key.id, ip, Outcome::ReportOnly);
            metrics.refusal_log(listener, Some(&key.id), ip, Outcome::ReportOnly);
            (key, Outcome::ReportOnly)
        }
        Verdict::Allowed { key } => {
            seen(&key.id, client, Outcome::Allowed);
            (key, Outcome::Allowed)
        }
    };
    match pass(req, config, &key, carrier, per_conn) {
        Pass::Answered(response, passed) => answer_now(response, passed.outcome(answered)),
        Pass::Forward(exchange) => Answer::Right(forward(
            exchange,
            ctx.clone(),
            per_conn.clone(),
            config.upstream_timeout,
            answered,
            started,
        )),
    }
}

/// The error of a request with more than one API key credential.
pub const SEVERAL_CREDENTIALS: &str = "more than one API key credential";

/// The credential of a request: every `Authorization` value and every value
/// of the listener's `key_header`, as raw bytes (an unreadable one counts).
fn request_credential<'a>(headers: &'a HeaderMap, key_header: Option<&str>) -> Credential<'a> {
    /// The first two values of a header (two already make `Several`): on
    /// the stack, not a `Vec` per request.
    fn first_two<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> ([&'a [u8]; 2], usize) {
        let mut out: [&[u8]; 2] = [&[], &[]];
        let mut n = 0;
        for v in values.take(2) {
            out[n] = v.as_bytes();
            n += 1;
        }
        (out, n)
    }
    let (authorization, a) = first_two(headers.get_all(header::AUTHORIZATION).iter());
    let (extra, e) = key_header.map_or(([&[][..]; 2], 0), |name| {
        first_two(headers.get_all(name).iter())
    });
    credential(&authorization[..a], &extra[..e])
}

/// Remove every credential header but `keep` (the one that carried the
/// checked key; `None`: all of them), so the upstream receives exactly the
/// credential keyfence checked, or none.
fn strip_credentials(
    headers: &mut HeaderMap,
    key_header: Option<&str>,
    keep: Option<CredentialHeader>,
) {
    if keep != Some(CredentialHeader::Authorization) {
        headers.remove(header::AUTHORIZATION);
    }
    if let Some(name) = key_header
        && keep != Some(CredentialHeader::KeyHeader)
    {
        headers.remove(name);
    }
}

/// How a passed request ended, for its [`Outcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Passed {
    Answered,
    UpstreamFailed,
    /// Refused for the request itself (a body over the limit, a bad target).
    ClientError,
}

impl Passed {
    /// The outcome of a request passed as `answered` (allowed or report-only).
    fn outcome(self, answered: Outcome) -> Outcome {
        match self {
            Passed::Answered => answered,
            Passed::UpstreamFailed => Outcome::UpstreamError,
            Passed::ClientError => Outcome::BadRequest,
        }
    }
}

fn body_too_large() -> (Response<Body>, Passed) {
    (
        json(
            StatusCode::PAYLOAD_TOO_LARGE,
            r#"{"error":"request body too large"}"#.into(),
        ),
        Passed::ClientError,
    )
}

/// What an accepted request comes to.
enum Pass {
    /// Answered by keyfence (ping, auth mode, a request refused for itself).
    Answered(Response<Body>, Passed),
    /// To be sent upstream.
    Forward(Exchange),
}

/// A request ready for the upstream.
struct Exchange {
    request: Request<ProxyBody>,
    /// Set if its body passes the limit on the way.
    overflow: Overflow,
    /// `X-Keyfence-Key-Id` for the response.
    key_header: Option<HeaderValue>,
    /// The downstream connection is HTTP/1: one request after the other.
    sequential: bool,
}

/// An accepted request: ping, auth answer, or the request to forward.
/// `carrier` is the header that carried the checked key.
fn pass(
    req: Request<Incoming>,
    config: &ListenerConfig,
    key: &Arc<Key>,
    carrier: Option<CredentialHeader>,
    per_conn: &PerConn,
) -> Pass {
    let key_header = per_conn.key_id(key);
    if req.uri().path() == "/_keyfence/ping" {
        let mut resp = json(StatusCode::OK, r#"{"message":"pong"}"#.into());
        if let Some(v) = key_header {
            resp.headers_mut().insert(KEY_ID_HEADER, v);
        }
        return Pass::Answered(resp, Passed::Answered);
    }
    match config.mode {
        ListenerMode::Auth => {
            let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
            if let Some(v) = key_header {
                resp.headers_mut().insert(KEY_ID_HEADER, v);
            }
            Pass::Answered(resp, Passed::Answered)
        }
        ListenerMode::Proxy => {
            let keep = carrier.filter(|_| config.forward_credential);
            to_forward(req, config, key_header, keep, per_conn)
        }
    }
}

/// The request as it goes upstream: hop-by-hop headers and the credentials
/// not checked removed, `X-Forwarded-For` with the origin appended,
/// `X-Keyfence-Key-Id` set, the body capped; or the answer to a request that
/// cannot go (an announced body over the limit).
fn to_forward(
    req: Request<Incoming>,
    config: &ListenerConfig,
    key_header: Option<HeaderValue>,
    keep: Option<CredentialHeader>,
    per_conn: &PerConn,
) -> Pass {
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES)
    {
        let (resp, passed) = body_too_large();
        return Pass::Answered(resp, passed);
    }
    // Downstream HTTP/1: one request after the other on this connection.
    let sequential = req.version() != hyper::Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_credentials(&mut parts.headers, config.key_header.as_deref(), keep);
    // Byte for byte, every value: what the shim cannot read is still passed
    // on rather than silently replaced.
    let origin = per_conn.origin;
    let forwarded = {
        let previous = parts.headers.get_all(X_FORWARDED_FOR);
        let mut values = previous.iter().map(HeaderValue::as_bytes).peekable();
        if values.peek().is_none() {
            per_conn.origin_xff.clone().ok_or(())
        } else {
            HeaderValue::from_bytes(&appended_xff(&values.collect::<Vec<_>>(), origin))
                .map_err(drop)
        }
    };
    let Ok(forwarded) = forwarded else {
        // Each part was a valid header value, so this does not happen; if it
        // did, refuse rather than forward a chain without the origin.
        return Pass::Answered(
            json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"bad X-Forwarded-For"}"#.into(),
            ),
            Passed::ClientError,
        );
    };
    parts.headers.insert(X_FORWARDED_FOR, forwarded);
    parts.headers.remove(KEY_ID);
    if let Some(v) = key_header.clone() {
        parts.headers.insert(KEY_ID, v);
    }
    let (body, overflow): (ProxyBody, _) = Capped::new(body, MAX_BODY_BYTES);
    Pass::Forward(Exchange {
        request: Request::from_parts(parts, body),
        overflow,
        key_header,
        sequential,
    })
}

/// Send `exchange` upstream and answer with what comes back; counted as
/// `answered` (allowed or report-only) when the upstream answers.
async fn forward(
    exchange: Exchange,
    ctx: Arc<ListenerCtx>,
    per_conn: Arc<PerConn>,
    upstream_timeout: Duration,
    answered: Outcome,
    started: Instant,
) -> Result<Response<Body>, Infallible> {
    let (response, passed) = match &ctx.upstream {
        None => (
            json(StatusCode::BAD_GATEWAY, r#"{"error":"no upstream"}"#.into()),
            Passed::UpstreamFailed,
        ),
        Some(upstream) => {
            let Exchange {
                request,
                overflow,
                key_header,
                sequential,
            } = exchange;
            let result = tokio::time::timeout(
                upstream_timeout,
                upstream.send(&per_conn.owned, request, sequential),
            )
            .await;
            if overflow.happened() {
                // The body passed the limit before the upstream answered:
                // whatever the upstream exchange did then (usually failed),
                // the client sent too much.
                body_too_large()
            } else {
                answer_of(result, key_header)
            }
        }
    };
    ctx.observe(passed.outcome(answered), started.elapsed());
    Ok(response)
}

/// The client's answer to the upstream exchange's `result`.
fn answer_of(
    result: Result<Result<Response<UpstreamBody>, UpstreamError>, tokio::time::error::Elapsed>,
    key_header: Option<HeaderValue>,
) -> (Response<Body>, Passed) {
    match result {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(v) = key_header {
                parts.headers.insert(KEY_ID, v);
            }
            (
                Response::from_parts(parts, Either::Right(body)),
                Passed::Answered,
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upstream request failed");
            (
                json(
                    StatusCode::BAD_GATEWAY,
                    r#"{"error":"upstream unavailable"}"#.into(),
                ),
                Passed::UpstreamFailed,
            )
        }
        Err(_) => (
            json(
                StatusCode::GATEWAY_TIMEOUT,
                r#"{"error":"upstream timed out"}"#.into(),
            ),
            Passed::UpstreamFailed,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_template_placeholders_are_escaped() {
        let body = render_rejection(
            r#"{"message":"source IP {ip} is not allowed for this API key {key_id}"}"#,
            Some("203.0.113.7".parse().unwrap()),
            "prod\"x",
        );
        assert_eq!(
            body,
            r#"{"message":"source IP 203.0.113.7 is not allowed for this API key prod\"x"}"#
        );
        assert_eq!(
            render_rejection(r#"{"error":"IP address not allowed"}"#, None, "k"),
            r#"{"error":"IP address not allowed"}"#
        );
    }

    fn credential_headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn every_credential_header_value_counts() {
        let h = credential_headers(&[("authorization", "Bearer mine"), ("x-api-key", "stolen")]);
        // Without a key_header the other header is not a credential.
        assert_eq!(request_credential(&h, None).key(), Some("mine"));
        assert_eq!(
            request_credential(&h, Some("x-api-key")),
            Credential::Several
        );
        let mut two = credential_headers(&[("authorization", "Bearer mine")]);
        two.append(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(request_credential(&two, None), Credential::Several);
    }

    #[test]
    fn only_the_checked_credential_is_forwarded() {
        let all = || {
            credential_headers(&[
                ("authorization", "Bearer mine"),
                ("x-api-key", "other"),
                ("x-end-to-end", "kept"),
            ])
        };
        let mut h = all();
        strip_credentials(
            &mut h,
            Some("x-api-key"),
            Some(CredentialHeader::Authorization),
        );
        assert!(h.contains_key("authorization") && !h.contains_key("x-api-key"));
        let mut h = all();
        strip_credentials(&mut h, Some("x-api-key"), Some(CredentialHeader::KeyHeader));
        assert!(!h.contains_key("authorization") && h.contains_key("x-api-key"));
        let mut h = all();
        strip_credentials(&mut h, Some("x-api-key"), None);
        assert!(!h.contains_key("authorization") && !h.contains_key("x-api-key"));
        assert!(h.contains_key("x-end-to-end"));
        // Without a key_header, another header is not keyfence's to remove.
        let mut h = all();
        strip_credentials(&mut h, None, None);
        assert!(!h.contains_key("authorization") && h.contains_key("x-api-key"));
    }

    #[test]
    fn outcomes_of_a_passed_request() {
        assert_eq!(Passed::Answered.outcome(Outcome::Allowed), Outcome::Allowed);
        assert_eq!(
            Passed::Answered.outcome(Outcome::ReportOnly),
            Outcome::ReportOnly
        );
        assert_eq!(
            Passed::UpstreamFailed.outcome(Outcome::Allowed),
            Outcome::UpstreamError
        );
        assert_eq!(
            Passed::ClientError.outcome(Outcome::ReportOnly),
            Outcome::BadRequest
        );
    }

    #[test]
    fn a_connection_makes_its_header_values_once() {
        let conn = PerConn::new("198.51.100.7".parse().unwrap());
        let xff = conn.origin_xff.clone().unwrap();
        assert_eq!(xff, "198.51.100.7");
        // Clones share one buffer: no copy per request.
        assert_eq!(
            xff.as_bytes().as_ptr(),
            conn.origin_xff.as_ref().unwrap().as_bytes().as_ptr()
        );
        let a = Arc::new(crate::keys::testing::key(
            "prod",
            "secret-prod-000000000",
            "",
        ));
        let first = conn.key_id(&a).unwrap();
        assert_eq!(first, "prod");
        assert_eq!(
            conn.key_id(&a).unwrap().as_bytes().as_ptr(),
            first.as_bytes().as_ptr()
        );
        // Another key (or the same id replaced in the table) is not served
        // the cached value of the last one.
        let b = Arc::new(crate::keys::testing::key(
            "dev",
            "secret-dev-0000000000",
            "",
        ));
        assert_eq!(conn.key_id(&b).unwrap(), "dev");
        let renamed = Arc::new(crate::keys::testing::key(
            "prod2",
            "secret-prod-000000000",
            "",
        ));
        assert_eq!(conn.key_id(&renamed).unwrap(), "prod2");
        // An id that is no header value sends no header.
        let bad = Arc::new(crate::keys::testing::key(
            "bad\nid",
            "secret-bad-0000000000",
            "",
        ));
        assert!(conn.key_id(&bad).is_none());
        let utf8 = Arc::new(crate::keys::testing::key(
            "clé",
            "secret-cle-0000000000",
            "",
        ));
        // The same rule as `HeaderValue::from_str`, which made it before:
        // bytes above 127 pass.
        assert_eq!(conn.key_id(&utf8).unwrap().as_bytes(), "clé".as_bytes());
        assert_eq!(
            HeaderValue::from_str("clé").unwrap().as_bytes(),
            "clé".as_bytes()
        );
    }

    /// `headers` (appended in order) after `strip_hop_by_hop`.
    fn stripped(headers: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for &(name, value) in headers {
            h.append(
                name,
                HeaderValue::from_bytes(value).expect("a valid test value"),
            );
        }
        strip_hop_by_hop(&mut h);
        h
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let h = stripped(&[
            ("connection", b"keep-alive, x-secret-hop"),
            ("x-secret-hop", b"1"),
            ("keep-alive", b"timeout=5"),
            ("transfer-encoding", b"chunked"),
            ("x-end-to-end", b"kept"),
        ]);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));

        // A byte that is not UTF-8 in one name does not keep the others.
        let h = stripped(&[
            ("connection", b"x-b\xffad, x-secret-hop"),
            ("x-secret-hop", b"1"),
            ("x-end-to-end", b"kept"),
        ]);
        assert!(!h.contains_key("x-secret-hop"));
        assert!(h.contains_key("x-end-to-end"));

        // A fixed name listed in Connection (any case) and a header only
        // Connection names, next to it.
        let h = stripped(&[
            ("connection", b"Keep-Alive , TE,x-only-named"),
            ("x-only-named", b"1"),
            ("te", b"trailers"),
            ("x-end-to-end", b"kept"),
        ]);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end-to-end"));

        // Without any hop-by-hop header nothing is touched.
        let h = stripped(&[
            ("x-only-named", b"1"),
            ("x-end-to-end", b"a"),
            ("x-end-to-end", b"b"),
        ]);
        assert_eq!(h.len(), 3);
    }
}

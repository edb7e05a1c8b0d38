//! Listener sockets and the request path: our own accept loop reads the PROXY
//! header (when configured) before TLS and TLS before HTTP, then hyper serves
//! HTTP/1.1 and HTTP/2 on the connection (SPEC §5).

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    body::Capped,
    client_ip::{
        ConnClient, PROXY_V2_MAX, ProxyParse, appended_xff, is_trusted, parse_proxy_header,
    },
    decide::{Verdict, decide},
    outcome::Outcome,
    tls::TlsAcceptor,
};
use crate::{
    allowlist::ClientAddr,
    config::{ClientIpSource, ListenerConfig, ListenerMode, Rejection},
    conn::{self, Activity, Gate, Permit, Reserve},
    keys::{
        KeyTable,
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
/// Upstream response head deadline.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

type Body = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

pub const KEY_ID_HEADER: &str = "x-keyfence-key-id";

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

struct ListenerCtx {
    config: RwLock<Arc<ListenerConfig>>,
    shared: Arc<Shared>,
    client: Client<HttpConnector, ProxyBody>,
    upstream: Option<hyper::Uri>,
}

/// Bind a listener's socket (so a busy port fails the start).
pub async fn bind(config: &ListenerConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("listener {}: binding {}", config.name, config.bind))
}

/// Accept and serve until `shutdown` flips to true; then stop accepting and let
/// open connections finish their requests. Every connection passes the
/// listener's [`Gate`] (a cap per source, the descriptor reserve) and is
/// driven under its header and idle timeouts (`crate::conn`).
pub async fn serve(
    socket: TcpListener,
    mut config_rx: watch::Receiver<Arc<ListenerConfig>>,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = config_rx.borrow_and_update().as_ref().clone();
    let upstream = config
        .upstream
        .as_deref()
        .and_then(|u| u.parse::<hyper::Uri>().ok());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_mins(1))
        .build(connector);
    let name = config.name.clone();
    let gate = Gate::new(
        &name,
        Reserve::Honour,
        config.connections,
        config.client_ip.trusted_proxies.clone(),
        shared.metrics.connections.clone(),
    );
    let ctx = Arc::new(ListenerCtx {
        config: RwLock::new(Arc::new(config)),
        shared,
        client,
        upstream,
    });
    loop {
        tokio::select! {
            accepted = conn::accept(&socket, &gate) => {
                let Some((stream, peer, permit)) = accepted else { continue };
                // The connection keeps the config it was accepted under.
                let config = ctx.config();
                let ctx = ctx.clone();
                let tls = tls.clone();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, peer, permit, ctx, config, tls, stop).await {
                        tracing::debug!(%peer, error = %format!("{e:#}"), "connection ended");
                    }
                });
            }
            Ok(()) = config_rx.changed() => {
                let new = config_rx.borrow_and_update().clone();
                gate.set_limits(new.connections, new.client_ip.trusted_proxies.clone());
                *ctx.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = new;
            }
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
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
    peer: SocketAddr,
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
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let config = config.clone();
        async move { Ok::<_, Infallible>(handle(req, &ctx, &config, conn_client).await) }
    });
    let mut builder = conn::builder(&limits);
    builder.http1().max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    if let Some(acceptor) = tls {
        let stream = tokio::time::timeout_at(head_due, acceptor.accept(stream))
            .await
            .context("TLS handshake timeout")?
            .context("TLS handshake")?;
        conn::drive(&builder, stream, peer, service, &permit, activity, shutdown).await?;
    } else {
        conn::drive(&builder, stream, peer, service, &permit, activity, shutdown).await?;
    }
    Ok(())
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
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

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Remove hop-by-hop headers, including those named by `Connection`.
/// `Connection` is read as bytes, so a value with a byte that is not UTF-8
/// does not hide the names listed next to it.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

async fn handle(
    req: Request<Incoming>,
    ctx: &ListenerCtx,
    config: &ListenerConfig,
    conn: ConnClient,
) -> Response<Body> {
    let started = Instant::now();
    let listener = config.name.as_str();
    let resolved = conn.resolve(&config.client_ip, req.headers());
    let client = resolved.map(ClientAddr::ip);
    if req.uri().path() == "/_keyfence/ip" {
        let ip = client.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        return json(
            StatusCode::OK,
            format!("{{\"ip\":\"{}\"}}", json_escape(&ip)),
        );
    }
    let metrics = &ctx.shared.metrics;
    let presented = request_credential(req.headers(), config.key_header.as_deref());
    let carrier = match presented {
        Credential::Several => {
            // The shim would check one and the upstream might read another.
            metrics.refusal_log(listener, None, client, Outcome::BadRequest);
            metrics.observe_http(listener, Outcome::BadRequest, started.elapsed());
            return json(
                StatusCode::BAD_REQUEST,
                format!(r#"{{"error":"{SEVERAL_CREDENTIALS}"}}"#),
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
        SystemTime::now(),
    );
    let now = SystemTime::now();
    let seen = |key_id: &str, ip: Option<IpAddr>, decided: Outcome| {
        if let Some(ip) = ip {
            ctx.shared.sources.record(key_id, ip, decided, now);
        }
    };
    let (response, outcome) = match verdict {
        Verdict::InvalidKey => {
            metrics.refusal_log(listener, None, client, Outcome::InvalidKey);
            (
                json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"error":"invalid API key"}"#.into(),
                ),
                Outcome::InvalidKey,
            )
        }
        Verdict::IpNotAllowed { key, ip } => {
            seen(&key.id, ip, Outcome::IpNotAllowed);
            let rejection = ctx.shared.rejection();
            metrics.refusal_log(listener, Some(&key.id), ip, Outcome::IpNotAllowed);
            let status = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::FORBIDDEN);
            (
                json(status, render_rejection(&rejection.body, ip, &key.id)),
                Outcome::IpNotAllowed,
            )
        }
        Verdict::ReportOnly { key, ip } => {
            // Counted as refused: it is the refusal the key would have had.
            seen(&key.id, ip, Outcome::ReportOnly);
            metrics.refusal_log(listener, Some(&key.id), ip, Outcome::ReportOnly);
            let (resp, passed) = pass(req, ctx, config, &key.id, conn.client, carrier).await;
            (resp, passed.outcome(Outcome::ReportOnly))
        }
        Verdict::Allowed { key } => {
            seen(&key.id, client, Outcome::Allowed);
            let (resp, passed) = pass(req, ctx, config, &key.id, conn.client, carrier).await;
            (resp, passed.outcome(Outcome::Allowed))
        }
    };
    metrics.observe_http(listener, outcome, started.elapsed());
    response
}

/// The error of a request with more than one API key credential.
pub const SEVERAL_CREDENTIALS: &str = "more than one API key credential";

/// The credential of a request: every `Authorization` value and every value
/// of the listener's `key_header`, as raw bytes (an unreadable one counts).
fn request_credential<'a>(headers: &'a HeaderMap, key_header: Option<&str>) -> Credential<'a> {
    let values = |name: &str| -> Vec<&'a [u8]> {
        headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect()
    };
    let authorization = values(header::AUTHORIZATION.as_str());
    let extra = key_header.map(values).unwrap_or_default();
    credential(&authorization, &extra)
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

/// An accepted request: ping, auth answer, or the proxied exchange.
/// `origin` is the connection's origin appended to `X-Forwarded-For`: the TCP
/// peer, or the source a trusted PROXY header named. `carrier` is the header
/// that carried the checked key.
async fn pass(
    req: Request<Incoming>,
    ctx: &ListenerCtx,
    config: &ListenerConfig,
    key_id: &str,
    origin: ClientAddr,
    carrier: Option<CredentialHeader>,
) -> (Response<Body>, Passed) {
    let key_header = HeaderValue::from_str(key_id).ok();
    if req.uri().path() == "/_keyfence/ping" {
        let mut resp = json(StatusCode::OK, r#"{"message":"pong"}"#.into());
        if let Some(v) = key_header {
            resp.headers_mut().insert(KEY_ID_HEADER, v);
        }
        return (resp, Passed::Answered);
    }
    match config.mode {
        ListenerMode::Auth => {
            let mut resp = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
            if let Some(v) = key_header {
                resp.headers_mut().insert(KEY_ID_HEADER, v);
            }
            (resp, Passed::Answered)
        }
        ListenerMode::Proxy => {
            let keep = carrier.filter(|_| config.forward_credential);
            proxy(
                req,
                ctx,
                key_header,
                origin,
                config.key_header.as_deref(),
                keep,
            )
            .await
        }
    }
}

async fn proxy(
    req: Request<Incoming>,
    ctx: &ListenerCtx,
    key_header: Option<HeaderValue>,
    origin: ClientAddr,
    credential_header: Option<&str>,
    keep: Option<CredentialHeader>,
) -> (Response<Body>, Passed) {
    let Some(upstream) = &ctx.upstream else {
        return (
            json(StatusCode::BAD_GATEWAY, r#"{"error":"no upstream"}"#.into()),
            Passed::UpstreamFailed,
        );
    };
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES)
    {
        return body_too_large();
    }
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str);
    let uri = format!(
        "{}://{}{}",
        upstream.scheme_str().unwrap_or("http"),
        upstream
            .authority()
            .map_or("", hyper::http::uri::Authority::as_str),
        path
    );
    let Ok(uri) = uri.parse() else {
        return (
            json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"bad request target"}"#.into(),
            ),
            Passed::ClientError,
        );
    };
    parts.uri = uri;
    parts.version = hyper::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    strip_credentials(&mut parts.headers, credential_header, keep);
    // Byte for byte, every value: what the shim cannot read is still passed
    // on rather than silently replaced.
    let previous: Vec<&[u8]> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let forwarded = appended_xff(&previous, origin);
    let Ok(forwarded) = HeaderValue::from_bytes(&forwarded) else {
        // Each part was a valid header value, so this does not happen; if it
        // did, refuse rather than forward a chain without the origin.
        return (
            json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"bad X-Forwarded-For"}"#.into(),
            ),
            Passed::ClientError,
        );
    };
    parts.headers.insert("x-forwarded-for", forwarded);
    parts.headers.remove(KEY_ID_HEADER);
    if let Some(v) = key_header.clone() {
        parts.headers.insert(KEY_ID_HEADER, v);
    }
    let (body, overflow) = Capped::new(body, MAX_BODY_BYTES);
    let body: ProxyBody = body.boxed();
    let request = Request::from_parts(parts, body);
    let result = tokio::time::timeout(UPSTREAM_TIMEOUT, ctx.client.request(request)).await;
    if overflow.happened() {
        // The body passed the limit before the upstream answered: whatever
        // the upstream exchange did then (usually failed), the client sent
        // too much.
        return body_too_large();
    }
    match result {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(v) = key_header {
                parts.headers.insert(KEY_ID_HEADER, v);
            }
            (Response::from_parts(parts, body.boxed()), Passed::Answered)
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
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));

        // A byte that is not UTF-8 in one name does not keep the others.
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_bytes(b"x-b\xffad, x-secret-hop").unwrap(),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-secret-hop"));
        assert!(h.contains_key("x-end-to-end"));
    }
}

//! The management API's HTTP surface (SPEC §6, wire format in `docs/api.md`).
//!
//! Every write follows one order, so that a refused call changes nothing:
//! authenticate (throttled per address, 429) → parse → validate (422) →
//! self-lockout (409) → step-up confirmation (throttled, 429; 401) → datapath
//! capacity (507, a dry run of the store call: see `preview`) → one store
//! transaction (the change and its audit row; 507 when the disk is full) →
//! enforcement (the daemon applies the store's change feed up to the write's
//! sequence number: shim key table and BPF maps) → answer. The answer is sent
//! only once the daemon reports the new state enforced.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, FromRequestParts, Path, Query, State},
    http::{HeaderMap, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{
    principals::{AuthError, Principal, Principals},
    throttle::{Attempt, Guard, Reason, Started},
};
use crate::{
    allowlist::{AllowList, ClientAddr, DEFAULT_MAX_ENTRIES, RawList, parse_list},
    confirm::{ConfirmError, Confirmer},
    keys::{
        Key, Origin,
        credentials::{self, digest},
        validate,
    },
    shim::sources::Sources,
    store::{
        Actor, AuditEvent, KeyPatch, KeyView, KeyWrite, SharedStore, StoreError, StoredKey,
        time_json,
    },
};

/// Header carrying the step-up code.
pub const CONFIRM_HEADER: &str = "x-keyfence-confirm";
/// `GET /v1/audit` page size: default and cap.
const AUDIT_DEFAULT: usize = 100;
const AUDIT_MAX: usize = 1000;
/// A request body larger than this is refused before parsing.
const MAX_BODY: usize = 1024 * 1024;

/// Log lines about a full store: at most a few a second.
static STORE_FULL_LOGS: std::sync::LazyLock<crate::ratelimit::RateLimiter> =
    std::sync::LazyLock::new(|| crate::ratelimit::RateLimiter::new(1, Duration::from_secs(1)));

/// The daemon's answer: how long it took, or why it could not.
pub type Done = oneshot::Sender<Result<Duration, EnforceError>>;

/// What a write asks the daemon.
#[derive(Debug)]
pub enum Apply {
    /// Whether the datapath can hold `key` in this state (nothing is
    /// committed yet). Changes nothing.
    Check { key: Box<StoredKey>, done: Done },
    /// Answer once the store's change feed is enforced up to `seq` (the
    /// audit sequence number of a committed write). `written`: the key as
    /// the write committed it, given by an embedded store (one writer): the
    /// daemon applies it without reading it back when nothing else changed.
    Upto {
        seq: i64,
        written: Option<Box<StoredKey>>,
        done: Done,
    },
}

/// Why the daemon could not take a change.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// The datapath's maps cannot hold it: 507 naming the limit.
    #[error(transparent)]
    Full(#[from] crate::maps::policy::CapacityError),
    /// The daemon stopped before it answered.
    #[error("the agent is stopping")]
    Stopping,
    /// The kernel's maps could not be read or written (and, after a failed
    /// write, the listeners could not be opened either).
    #[error("{0:#}")]
    Datapath(anyhow::Error),
    /// The management principals could not be rebuilt for an admin key.
    #[error("{0:#}")]
    Principals(anyhow::Error),
    /// The store's change feed could not be read.
    #[error("reading the store's change feed: {0}")]
    Feed(crate::store::StoreError),
    /// The feed does not reach the write's sequence number yet.
    #[error("change {seq} is not in the store's change feed yet (it reads up to {applied})")]
    Behind { seq: i64, applied: i64 },
}

/// What the handlers share. `principals` and `static_keys` are swapped by the
/// daemon whenever keys or the config change.
pub struct ApiState {
    pub store: SharedStore,
    pub principals: RwLock<Arc<Principals>>,
    pub static_keys: RwLock<Arc<[Arc<Key>]>>,
    pub confirm: Option<Confirmer>,
    /// Throttles failed tokens and step-up codes (`throttle.rs`).
    pub guard: Guard,
    pub sources: Arc<Sources>,
    pub apply: mpsc::Sender<Apply>,
    /// Held from a write's commit until it is enforced, so the daemon applies
    /// changes in commit order.
    pub writes: tokio::sync::Mutex<()>,
    /// `fleet.wait_timeout`: how long a write waits for the other hosts of
    /// a shared store (SPEC §10).
    pub fleet_wait: Duration,
    /// The console's sessions and settings (`crate::console`).
    pub console: crate::console::Console,
}

/// The router: every call of SPEC §6.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/keys", post(create).get(list))
        .route("/v1/keys/{id}", get(show).patch(update).delete(revoke))
        .route("/v1/keys/{id}/rotate", post(rotate))
        .route("/v1/keys/{id}/sources", get(sources))
        .route("/v1/audit", get(audit))
        .route("/v1/fleet", get(fleet))
        .route("/v1/allowlist/check", post(check))
        .merge(crate::console::router())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serve `router` on `listener` until `shutdown` resolves, through the
/// connection limits of `crate::conn` (header and idle timeouts, a cap per
/// source, and the descriptor reserve the listeners leave free). Every
/// request carries the peer as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    tls: Option<crate::shim::tls::TlsAcceptor>,
    connections: crate::conn::ConnMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let gate = crate::conn::Gate::new(
        "management",
        crate::conn::Reserve::Use,
        crate::conn::ConnLimits::default(),
        Vec::new(),
        connections,
    );
    crate::conn::serve_router_tls(listener, router(state), gate, tls, shutdown).await
}

/// An error answer: status and JSON body (and `Retry-After` for a 429).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
    retry_after: Option<Duration>,
}

impl ApiError {
    /// The answer's status (the console shows the same refusal).
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The answer's `error` message.
    #[must_use]
    pub fn message(&self) -> &str {
        self.body["error"].as_str().unwrap_or("error")
    }

    /// The bad entries of a 422 on an allow list (position, entry, reason).
    #[must_use]
    pub fn entries(&self) -> Option<&Vec<Value>> {
        self.body["entries"].as_array()
    }

    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self::with_body(status, json!({ "error": message.into() }))
    }

    fn with_body(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            body,
            retry_after: None,
        }
    }

    /// 429 during a lockout, with the seconds left (rounded up).
    fn throttled(wait: Duration, reason: Reason) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, reason.refusal())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.max(1).into());
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = match e {
            AuthError::Unauthenticated => StatusCode::UNAUTHORIZED,
            AuthError::AddressNotAllowed => StatusCode::FORBIDDEN,
        };
        Self::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "unknown key id"),
            StoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, m),
            StoreError::Revoked(id) => {
                Self::new(StatusCode::CONFLICT, format!("key {id} is revoked"))
            }
            StoreError::Unavailable(why) => {
                if STORE_FULL_LOGS.allow() {
                    tracing::error!(error = why, "key store unavailable: write refused");
                }
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
            }
            StoreError::Full(why) => {
                // Every write meets it until an operator frees space: one
                // line per second is enough to say so.
                if STORE_FULL_LOGS.allow() {
                    tracing::error!(
                        error = why,
                        "key store full: write refused, nothing changed"
                    );
                }
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "store full")
            }
            other => {
                tracing::error!(error = %other, "key store");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "key store error")
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// The caller, authenticated (by a bearer token, or by a console session).
pub(crate) struct Caller {
    pub(crate) principal: Principal,
    /// `client`'s address.
    pub(crate) ip: IpAddr,
    pub(crate) client: ClientAddr,
}

impl Caller {
    /// A principal already authenticated from `client` (a console session
    /// whose principal's allow list was just checked).
    pub(crate) fn new(principal: Principal, client: ClientAddr) -> Self {
        Self {
            principal,
            ip: client.ip(),
            client,
        }
    }

    fn actor(&self) -> Actor {
        Actor {
            principal: self.principal.label(),
            address: self.ip,
        }
    }
}

/// Every handler takes the caller first: authentication (401/403) comes
/// before anything in the request is read.
impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no peer address"))?;
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| credentials::bearer(v.as_bytes()));
        authenticate(state, token, peer.ip()).await
    }
}

/// The bearer token's principal, throttled per source address: an address
/// locked out after repeated unknown tokens gets 429, even with a valid one.
/// The console's sign-in presents its token here too.
pub(crate) async fn authenticate(
    state: &ApiState,
    token: Option<&str>,
    peer: IpAddr,
) -> Result<Caller, ApiError> {
    // The API's one point of entry for an address: folded here, once.
    let client = ClientAddr::new(peer);
    let ip = client.ip();
    let principals = state
        .principals
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let attempt = state.guard.authenticate(
        ip,
        Instant::now(),
        || {
            principals
                .authenticate(token, client, SystemTime::now())
                .cloned()
        },
        // A missing token guesses nothing; a valid one from elsewhere
        // neither (it is counted below, not throttled).
        |e| token.is_some() && *e == AuthError::Unauthenticated,
    );
    match attempt {
        Attempt::Passed(principal) => Ok(Caller {
            principal,
            ip,
            client,
        }),
        Attempt::Throttled(wait) => Err(ApiError::throttled(wait, Reason::Token)),
        Attempt::Failed(e, started) => {
            if e == AuthError::AddressNotAllowed {
                state.guard.address_refused(ip);
            }
            audit_lockouts(state, &started, "unauthenticated", ip).await;
            Err(e.into())
        }
    }
}

/// One audit row per lockout started (action `lockout`, no key). A store
/// that cannot take it does not change the answer; the failure is logged.
async fn audit_lockouts(state: &ApiState, started: &[Started], principal: &str, ip: IpAddr) {
    for s in started {
        let until = SystemTime::now() + s.lockout.duration;
        let event = AuditEvent {
            principal: principal.to_owned(),
            address: ip,
            action: "lockout",
            details: json!({
                "reason": s.reason.label(),
                "scope": s.subject.scope(),
                "subject": s.subject.to_string(),
                "seconds": s.lockout.duration.as_secs(),
                "lockouts_in_a_row": s.lockout.number,
                "until": time_json(until),
            }),
        };
        if let Err(e) = state.store.record_event(&event, SystemTime::now()).await {
            tracing::error!(error = ?e, "writing the audit row of a management lockout");
        }
    }
}

/// Parse a JSON body; anything malformed (syntax, unknown field, wrong type) is 400.
fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))
}

/// The grammar of SPEC §3; 422 lists every bad entry.
fn parse_allow(raw: &RawList) -> Result<AllowList, ApiError> {
    parse_list(raw, DEFAULT_MAX_ENTRIES).map_err(|errors| {
        ApiError::with_body(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "error": "invalid allow list",
                "entries": errors.iter().map(|e| json!({
                    "position": e.position,
                    "entry": e.entry,
                    "reason": e.reason.to_string(),
                })).collect::<Vec<_>>(),
            }),
        )
    })
}

/// A field that breaks its rule (`crate::keys::validate`): 422.
fn invalid(e: &validate::Invalid) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
}

/// The step-up rule: with a TOTP secret configured, the write needs a fresh
/// code. Wrong and replayed codes are throttled per principal and per source
/// address; during a lockout no code is even looked at (429).
async fn confirm(state: &ApiState, caller: &Caller, code: Option<&str>) -> Result<(), ApiError> {
    let Some(confirmer) = &state.confirm else {
        return Ok(());
    };
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let principal = caller.actor().principal;
    let attempt = state.guard.confirm(
        &principal,
        caller.ip,
        Instant::now(),
        || confirmer.verify_step(code, unix),
        // No code guesses nothing.
        |e| *e != ConfirmError::Missing,
    );
    match attempt {
        Attempt::Passed(step) => match state.store.fleet() {
            None => Ok(()),
            // The step is spent on every host, or on none.
            Some(fleet) => match fleet.claim_step(step).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "confirmation required",
                )),
                Err(e) => Err(e.into()),
            },
        },
        Attempt::Throttled(wait) => Err(ApiError::throttled(wait, Reason::Confirm)),
        Attempt::Failed(_, started) => {
            audit_lockouts(state, &started, &principal, caller.ip).await;
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "confirmation required",
            ))
        }
    }
}

/// Ask the daemon (`Apply::Check` or `Apply::Upto`) and wait for its answer.
async fn ask(state: &ApiState, request: impl FnOnce(Done) -> Apply) -> Result<(), EnforceError> {
    let (done, rx) = oneshot::channel();
    state
        .apply
        .send(request(done))
        .await
        .map_err(|_| EnforceError::Stopping)?;
    rx.await
        .map_err(|_| EnforceError::Stopping)?
        .map(|_took| ())
}

/// 507: the datapath's maps cannot hold the change (nothing was stored).
fn full(e: &crate::maps::policy::CapacityError) -> ApiError {
    tracing::warn!(error = %e, "management write refused: the datapath is full");
    ApiError::with_body(
        StatusCode::INSUFFICIENT_STORAGE,
        json!({ "error": e.to_string(), "map": e.map(), "limit": e.limit() }),
    )
}

/// Refuse, before anything is stored, a key state the datapath cannot hold.
async fn check_capacity(state: &ApiState, key: StoredKey) -> Result<(), ApiError> {
    match ask(state, |done| Apply::Check {
        key: Box::new(key),
        done,
    })
    .await
    {
        Ok(()) => Ok(()),
        Err(EnforceError::Full(e)) => Err(full(&e)),
        Err(
            why @ (EnforceError::Stopping
            | EnforceError::Datapath(_)
            | EnforceError::Principals(_)
            | EnforceError::Feed(_)
            | EnforceError::Behind { .. }),
        ) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("nothing stored: {why}"),
        )),
    }
}

/// Wait until the daemon enforces the store's changes up to `seq`, the
/// write that left `written`.
async fn enforce(state: &ApiState, seq: i64, written: &StoredKey) -> Result<(), ApiError> {
    // A shared store's sequence is not one writer's: the daemon reads it.
    let written = state
        .store
        .fleet()
        .is_none()
        .then(|| Box::new(written.clone()));
    ask(state, |done| Apply::Upto { seq, written, done })
        .await
        .map_err(|e| {
            let why = e.to_string();
            tracing::error!(error = why, "a stored change is not enforced yet");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("stored, but not yet enforced: {why}"),
            )
        })
}

/// `?wait=`: whom a write waits for in a fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Wait {
    /// Every live host (the default).
    #[default]
    Fleet,
    /// This host alone.
    Local,
}

#[derive(Debug, Default, Deserialize)]
struct WriteQuery {
    #[serde(default)]
    wait: Wait,
}

type WriteParams = Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>;

fn wait_of(query: WriteParams) -> Result<Wait, ApiError> {
    query
        .map(|Query(q)| q.wait)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

impl Written {
    /// The answer's body: `body` with `enforcement` added in a fleet.
    /// The answer's body: the key as the API shows it, with how far the
    /// fleet enforces it and the new secret when there are such.
    fn answer(&self) -> axum::Json<KeyView<'_>> {
        axum::Json(
            self.key
                .view(Some("api"))
                .answering(self.enforcement.as_ref(), self.secret.as_deref()),
        )
    }
}

/// In a fleet, wait (after the local host) for every live host to apply
/// `seq`, up to `fleet.wait_timeout`; with `?wait=local` only look once.
async fn fleet_enforcement(
    state: &ApiState,
    seq: i64,
    wait: Wait,
) -> Option<crate::store::fleet::Enforcement> {
    let fleet = state.store.fleet()?;
    let timeout = match wait {
        Wait::Fleet => state.fleet_wait,
        Wait::Local => Duration::ZERO,
    };
    match fleet.wait_applied(seq, timeout).await {
        Ok(e) => {
            if wait == Wait::Fleet && !e.lagging.is_empty() {
                tracing::warn!(seq, lagging = ?e.lagging, "a change is not applied on every live host yet");
            }
            Some(e)
        }
        Err(e) => {
            // Stored and enforced here: the answer says who is known to have it.
            tracing::warn!(error = %e, "reading the fleet's progress");
            Some(crate::store::fleet::Enforcement {
                applied: 1,
                hosts: 1,
                lagging: Vec::new(),
            })
        }
    }
}

/// One write: serialised with the others, checked against the datapath's
/// capacity, committed with its audit row, enforced, logged. The capacity
/// check is a dry run ([`would_be`](super::preview::would_be): the key as the
/// write would leave it); the `writes` lock keeps other writes of this API out
/// until the write is enforced, so the daemon sees them in commit order. In a
/// fleet the answer then waits for the other live hosts (`wait`).
async fn commit(
    state: &ApiState,
    caller: &Caller,
    write: KeyWrite,
    wait: Wait,
) -> Result<(StoredKey, Option<crate::store::fleet::Enforcement>), ApiError> {
    let actor = caller.actor();
    let action = write.action();
    let order = state.writes.lock().await;
    let now = SystemTime::now();
    let would_be = super::preview::would_be(state.store.as_ref(), &write, now).await?;
    check_capacity(state, would_be).await?;
    let committed = state.store.write(write, &actor, now).await?;
    enforce(state, committed.seq, &committed.key).await?;
    // Later writes need not wait for the other hosts of this one.
    drop(order);
    let enforcement = fleet_enforcement(state, committed.seq, wait).await;
    let key = committed.key;
    tracing::info!(
        key_id = key.id,
        principal = actor.principal,
        action,
        "key changed"
    );
    Ok((key, enforcement))
}

pub(crate) fn static_key(state: &ApiState, id: &str) -> Option<Arc<Key>> {
    state
        .static_keys
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|k| k.id == id)
        .cloned()
}

fn refuse_static(state: &ApiState, id: &str) -> Result<(), ApiError> {
    if static_key(state, id).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("key {id} comes from the config file: change it there"),
        ));
    }
    Ok(())
}

/// A stored key as the API shows it (never its digest).
#[must_use]
pub fn stored_json(k: &StoredKey) -> Value {
    serde_json::to_value(k.view(Some("api"))).expect("a key serializes")
}

/// A key of the config as the API shows it.
fn static_json(k: &Key) -> Value {
    serde_json::to_value(KeyView::of_static(k)).expect("a key serializes")
}

/// The step-up code a request carries.
fn confirm_code(headers: &HeaderMap) -> Option<&str> {
    headers.get(CONFIRM_HEADER).and_then(|v| v.to_str().ok())
}

/// What a write leaves: the key as committed, and the new secret of a create
/// or a rotation (shown this once). Callers read what was enforced from here,
/// so a field added for the fleet's enforcement reaches the API and the
/// console alike.
pub(crate) struct Written {
    pub(crate) key: StoredKey,
    pub(crate) secret: Option<String>,
    /// In a fleet: how far the other hosts were when the write answered.
    pub(crate) enforcement: Option<crate::store::fleet::Enforcement>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    pub(crate) name: String,
    pub(crate) tenant: Option<String>,
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) ip_allow_list: Option<RawList>,
    pub(crate) report_only: Option<bool>,
}

async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    headers: HeaderMap,
    query: WriteParams,
    body: Bytes,
) -> ApiResult {
    let wait = wait_of(query)?;
    let body: CreateBody = parse_body(&body)?;
    let written = create_key(&state, &caller, body, confirm_code(&headers), wait).await?;
    Ok((StatusCode::CREATED, written.answer()).into_response())
}

/// The create operation, shared by the API and the console.
pub(crate) async fn create_key(
    state: &ApiState,
    caller: &Caller,
    body: CreateBody,
    code: Option<&str>,
    wait: Wait,
) -> Result<Written, ApiError> {
    let name = validate::name(&body.name).map_err(|e| invalid(&e))?;
    let tenant = validate::tenant(body.tenant.as_deref()).map_err(|e| invalid(&e))?;
    let scopes = validate::scopes(body.scopes).map_err(|e| invalid(&e))?;
    let allow = body
        .ip_allow_list
        .as_ref()
        .map(parse_allow)
        .transpose()?
        .unwrap_or_default();
    // A new key always sets a list (an empty one opens it to everyone).
    confirm(state, caller, code).await?;
    let secret = credentials::generate();
    let new = Key {
        id: credentials::new_key_id(),
        name,
        tenant,
        scopes,
        digest: digest(&secret),
        allow,
        report_only: body.report_only.unwrap_or(false),
        origin: Origin::Store,
    };
    let (key, enforcement) = commit(state, caller, KeyWrite::Create(new), wait).await?;
    Ok(Written {
        key,
        secret: Some(secret),
        enforcement,
    })
}

async fn list(State(state): State<Arc<ApiState>>, _caller: Caller) -> ApiResult {
    let stored = state.store.keys().await?;
    let statics = state
        .static_keys
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let keys: Vec<Value> = statics
        .iter()
        .map(|k| static_json(k))
        .chain(stored.iter().map(stored_json))
        .collect();
    Ok(axum::Json(json!({ "keys": keys })).into_response())
}

async fn show(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    if let Some(k) = static_key(&state, &id) {
        return Ok(axum::Json(static_json(&k)).into_response());
    }
    let key = state.store.key(&id).await?;
    Ok(axum::Json(stored_json(&key)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateBody {
    pub(crate) name: Option<String>,
    pub(crate) ip_allow_list: Option<RawList>,
    pub(crate) report_only: Option<bool>,
}

async fn update(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: WriteParams,
    body: Bytes,
) -> ApiResult {
    let wait = wait_of(query)?;
    let body: UpdateBody = parse_body(&body)?;
    let written = update_key(&state, &caller, id, body, confirm_code(&headers), wait).await?;
    Ok(written.answer().into_response())
}

/// The update operation (self-lockout, step-up), shared by the API and the
/// console.
pub(crate) async fn update_key(
    state: &ApiState,
    caller: &Caller,
    id: String,
    body: UpdateBody,
    code: Option<&str>,
    wait: Wait,
) -> Result<Written, ApiError> {
    refuse_static(state, &id)?;
    let patch = KeyPatch {
        name: body
            .name
            .as_deref()
            .map(validate::name)
            .transpose()
            .map_err(|e| invalid(&e))?,
        allow: body.ip_allow_list.as_ref().map(parse_allow).transpose()?,
        report_only: body.report_only,
    };
    if let Some(allow) = &patch.allow {
        super::principals::check_self_lockout(
            &caller.principal,
            caller.client,
            &id,
            allow,
            SystemTime::now(),
        )
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    }
    if (patch.allow.is_some() || patch.report_only.is_some()) && state.confirm.is_some() {
        // Unknown ids answer 404 before a code is spent on them.
        state.store.key(&id).await?;
        confirm(state, caller, code).await?;
    }
    let (key, enforcement) = commit(state, caller, KeyWrite::Update { id, patch }, wait).await?;
    Ok(Written {
        key,
        secret: None,
        enforcement,
    })
}

async fn revoke(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    query: WriteParams,
) -> ApiResult {
    let wait = wait_of(query)?;
    let written = revoke_key(&state, &caller, id, wait).await?;
    Ok(written.answer().into_response())
}

/// The revoke operation (a key cannot revoke itself), shared by the API and
/// the console.
pub(crate) async fn revoke_key(
    state: &ApiState,
    caller: &Caller,
    id: String,
    wait: Wait,
) -> Result<Written, ApiError> {
    refuse_static(state, &id)?;
    if caller.principal.is_key(&id) {
        // `caller.ip` is already folded.
        let lockout = super::principals::LockOut { ip: caller.ip };
        return Err(ApiError::new(StatusCode::CONFLICT, lockout.to_string()));
    }
    let (key, enforcement) =
        commit(state, caller, KeyWrite::Revoke { id: id.clone() }, wait).await?;
    state.sources.forget(&id);
    Ok(Written {
        key,
        secret: None,
        enforcement,
    })
}

async fn rotate(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    query: WriteParams,
) -> ApiResult {
    let wait = wait_of(query)?;
    let written = rotate_key(&state, &caller, id, wait).await?;
    Ok(written.answer().into_response())
}

/// The rotate operation, shared by the API and the console.
pub(crate) async fn rotate_key(
    state: &ApiState,
    caller: &Caller,
    id: String,
    wait: Wait,
) -> Result<Written, ApiError> {
    refuse_static(state, &id)?;
    let secret = credentials::generate();
    let write = KeyWrite::Rotate {
        id,
        digest: digest(&secret),
    };
    let (key, enforcement) = commit(state, caller, write, wait).await?;
    Ok(Written {
        key,
        secret: Some(secret),
        enforcement,
    })
}

async fn sources(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    if static_key(&state, &id).is_none() {
        state.store.key(&id).await?;
    }
    let Some(fleet) = state.store.fleet() else {
        let seen = state.sources.of(&id);
        return Ok(axum::Json(json!({ "key_id": id, "sources": seen })).into_response());
    };
    // The fleet's sum, with this host's counts not yet flushed; while the
    // store is away, what this host saw (`partial`).
    let host = fleet.host_id();
    let body = match fleet.sources(&id, state.sources.per_key()).await {
        Ok(shared) => json!({ "key_id": id, "sources": state.sources.merged(&id, shared, host) }),
        Err(StoreError::Unavailable(_)) => json!({
            "key_id": id,
            "sources": state.sources.local_shared(&id, host),
            "partial": true,
        }),
        Err(e) => return Err(e.into()),
    };
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    after: Option<i64>,
    limit: Option<usize>,
    key_id: Option<String>,
}

async fn audit(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(AUDIT_DEFAULT).clamp(1, AUDIT_MAX);
    let entries = state
        .store
        .audit(q.after.unwrap_or(0), limit, q.key_id.as_deref())
        .await?;
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "at": time_json(e.at),
                "principal": e.principal,
                "address": e.address.to_string(),
                "action": e.action,
                // Lockout rows belong to no key.
                "key_id": if e.key_id.is_empty() { Value::Null } else { Value::String(e.key_id.clone()) },
                "before": e.before,
                "after": e.after,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "entries": entries })).into_response())
}

/// `GET /v1/fleet`: every host of a shared store, with its version, applied
/// sequence, lag and last heartbeat; 404 for a host's own store.
async fn fleet(State(state): State<Arc<ApiState>>, _caller: Caller) -> ApiResult {
    let Some(fleet) = state.store.fleet() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not in fleet mode (store.postgres is not configured)",
        ));
    };
    let status = fleet.status().await?;
    Ok(axum::Json(json!({
        "host_id": fleet.host_id(),
        "store_up": fleet.is_up(),
        "head_sequence": status.head_sequence,
        "hosts": status.hosts,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    ip_allow_list: RawList,
}

/// `POST /v1/allowlist/check`: the §3 grammar applied to a list, nothing
/// stored. The console's live validation answers the same JSON.
async fn check(_caller: Caller, body: Bytes) -> ApiResult {
    let body: CheckBody = parse_body(&body)?;
    Ok(axum::Json(check_list(&body.ip_allow_list, SystemTime::now())).into_response())
}

/// What `list` would be: `valid`, the canonical `entries` and the addresses
/// they cover, or every bad entry with its reason and, where there is one,
/// the canonical `suggestion`.
#[must_use]
pub fn check_list(list: &RawList, now: SystemTime) -> Value {
    match parse_list(list, DEFAULT_MAX_ENTRIES) {
        Ok(list) => {
            let cover = crate::console::coverage::Coverage::of(
                list.active_nets(now).map(crate::allowlist::Net::get),
            );
            json!({
                "valid": true,
                "unrestricted": list.is_unrestricted(),
                "entries": crate::store::list_json(&list),
                "addresses": cover.to_string(),
                "errors": [],
            })
        }
        Err(errors) => json!({
            "valid": false,
            "errors": errors.iter().map(|e| json!({
                "position": e.position,
                "entry": e.entry,
                "reason": e.reason.to_string(),
                "suggestion": match &e.reason {
                    crate::allowlist::EntryErrorKind::HostBitsSet { canonical } => {
                        Value::String(canonical.to_string())
                    }
                    _ => Value::Null,
                },
            })).collect::<Vec<_>>(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_list_answers_canonical_entries_or_every_error_with_suggestions() {
        let now = SystemTime::now();
        let ok = check_list(
            &RawList::One("10.0.0.0/8\n192.0.2.10, 192.0.2.10".into()),
            now,
        );
        assert_eq!(ok["valid"], true);
        assert_eq!(ok["entries"], json!(["10.0.0.0/8", "192.0.2.10/32"]));
        assert_eq!(ok["addresses"], "16,777,217 addresses");
        let empty = check_list(&RawList::One(String::new()), now);
        assert_eq!(
            (empty["valid"].clone(), empty["unrestricted"].clone()),
            (json!(true), json!(true))
        );
        let bad = check_list(
            &RawList::One("10.0.0.5/8, host.example, ,2001:db8::1%eth0".into()),
            now,
        );
        assert_eq!(bad["valid"], false);
        let errors = bad["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 4, "{bad}");
        assert_eq!(errors[0]["position"], 1);
        assert_eq!(errors[0]["suggestion"], "10.0.0.0/8");
        assert_eq!(
            errors[0]["reason"],
            "host bits set; did you mean 10.0.0.0/8?"
        );
        assert!(errors[1]["reason"].as_str().unwrap().contains("hostnames"));
        assert_eq!(errors[1]["suggestion"], Value::Null);
        assert_eq!(errors[2]["reason"], "empty entry");
        assert!(errors[3]["reason"].as_str().unwrap().contains("zone"));
    }
}

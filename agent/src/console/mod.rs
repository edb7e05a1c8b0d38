//! The key console (SPEC §11): server-rendered pages at `/` of
//! `management.bind`, everything embedded in the binary. Every change goes
//! through the management API's own operations (`management::api`:
//! validation, self-lockout, step-up, capacity, audit, enforcement), as the
//! signed-in principal; the principal's allow list is checked on every
//! request, exactly as for a bearer token. Forms work without JavaScript;
//! `assets/console.js` only adds live validation, the copy button and the
//! step-up dialog. The Content-Security-Policy allows no inline script.

pub mod coverage;
mod form;
mod html;
mod pages;
pub mod session;

use std::{
    net::SocketAddr,
    sync::{Arc, PoisonError},
    time::{Instant, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, FromRequestParts, Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use crate::{
    allowlist::ClientAddr,
    config::ManagementConfig,
    keys::table::Credentialed as _,
    management::{
        api::{self, ApiState, Caller},
        principals::Principal,
    },
    store::AuditEvent,
};
use form::Form;
use session::{COOKIE, Ended, LOGIN_COOKIE, Session, Sessions};

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// No inline script or style, nothing from elsewhere, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's state inside the management API's.
pub struct Console {
    pub sessions: Sessions,
    /// Cookies are `Secure` when the listener speaks TLS.
    pub secure: bool,
}

impl Console {
    #[must_use]
    pub fn new(config: &ManagementConfig, secure: bool) -> Self {
        Self {
            sessions: Sessions::new(config.console),
            secure,
        }
    }
}

/// The console's routes, merged into the management router (which gives
/// them its state).
pub fn router() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/keys", get(keys))
        .route("/keys/new", get(new_key).post(create))
        .route("/keys/{id}", get(detail).post(edit))
        .route("/keys/{id}/add", post(add))
        .route("/keys/{id}/revoke", post(revoke))
        .route("/keys/{id}/rotate", post(rotate))
        .route("/audit", get(audit))
        .route("/check", post(check))
        .route(
            "/assets/console.css",
            get(|| async { asset("text/css", CSS) }),
        )
        .route(
            "/assets/console.js",
            get(|| async { asset("text/javascript", JS) }),
        )
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        // Pages hold secrets once and key lists always.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

fn peer(parts: &Parts) -> Option<ClientAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| ClientAddr::new(c.0.ip()))
}

fn cookie_header(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::COOKIE).and_then(|v| v.to_str().ok())
}

/// A signed-in request: its session, and the caller the API's operations
/// take (the principal, checked against its own allow list just now).
pub(crate) struct Signed {
    caller: Caller,
    session: Session,
    session_id: String,
}

impl Signed {
    fn nav(&self) -> (String, String) {
        (self.caller.principal.label(), self.caller.ip.to_string())
    }

    /// A form post's CSRF token must be the session's; anything else is
    /// refused before the form is read further.
    #[expect(
        clippy::result_large_err,
        reason = "the refusal is the page answered, built once per refused post"
    )]
    fn csrf(&self, presented: Option<&str>) -> Result<(), Response> {
        if presented.is_some_and(|t| session::equal(t, &self.session.csrf)) {
            Ok(())
        } else {
            Err(html(
                StatusCode::FORBIDDEN,
                html::page(
                    "Refused",
                    None,
                    "<h1>Refused</h1><p class=\"error\" id=\"csrf-refused\">This form was \
                     sent without this session's CSRF token: nothing was changed. Go back, \
                     reload the page and try again.</p>",
                ),
            ))
        }
    }

    /// Render a page with this session's navigation.
    fn page(&self, title: &str, main: &str) -> String {
        let (principal, address) = self.nav();
        html::page(
            title,
            Some(&html::Nav {
                principal: &principal,
                address: &address,
                csrf: &self.session.csrf,
            }),
            main,
        )
    }
}

impl FromRequestParts<Arc<ApiState>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Response> {
        let client =
            peer(parts).ok_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response())?;
        let id = session::cookie(cookie_header(&parts.headers), COOKIE).map(str::to_owned);
        let session = match state.console.sessions.get(id.as_deref(), Instant::now()) {
            Ok(s) => s,
            Err(Ended::Missing) => return Err(see_other("/login")),
            Err(Ended::Idle) => return Err(see_other("/login?ended=idle")),
            Err(Ended::Expired) => return Err(see_other("/login?ended=expired")),
        };
        let principal: Option<Principal> = state
            .principals
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup_digest(&session.digest)
            .map(|p| Principal::clone(p));
        let Some(principal) = principal else {
            // Rotated, revoked or removed from the config since sign-in.
            if let Some(id) = &id {
                state.console.sessions.end(id);
            }
            return Err(see_other("/login?ended=principal"));
        };
        if !principal.allow().allows(client, SystemTime::now()) {
            return Err(html(
                StatusCode::FORBIDDEN,
                html::page(
                    "Not allowed",
                    None,
                    &format!(
                        "<h1>Not allowed</h1><p class=\"error\" id=\"not-allowed\">IP address not \
                         allowed: {} is not in the allow list of {}.</p>",
                        html::esc(&client.ip().to_string()),
                        html::esc(&principal.label())
                    ),
                ),
            ));
        }
        Ok(Self {
            caller: Caller::new(principal, client),
            session,
            session_id: id.unwrap_or_default(),
        })
    }
}

async fn home(signed: Result<Signed, Response>) -> Response {
    match signed {
        Ok(_) => see_other("/keys"),
        Err(r) => r,
    }
}

fn login_cookie(token: &str) -> String {
    format!("{LOGIN_COOKIE}={token}; Path=/login; HttpOnly; SameSite=Strict; Max-Age=3600")
}

/// The sign-in form; its CSRF token is also in a cookie (double submit), as
/// there is no session yet.
fn login_form(state: &ApiState, client: ClientAddr, status: StatusCode, message: &str) -> Response {
    let token = session::random_token();
    let message = if message.is_empty() {
        String::new()
    } else {
        format!(
            "<p class=\"error\" id=\"login-error\" role=\"alert\">{}</p>",
            html::esc(message)
        )
    };
    let main = html::fill(
        html::LOGIN,
        &[
            ("ip", &html::esc(&client.ip().to_string())),
            ("csrf", &token),
            ("message", &message),
        ],
    );
    let mut cookie = login_cookie(&token);
    if state.console.secure {
        cookie.push_str("; Secure");
    }
    let mut r = html(status, html::page("Sign in", None, &main));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn login_page(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
) -> Response {
    let q = Form::parse(query.unwrap_or_default().as_bytes());
    let message = match q.get("ended") {
        Some("idle") => Ended::Idle.to_string(),
        Some("expired") => Ended::Expired.to_string(),
        Some("principal") => {
            "your principal changed (rotated, revoked or removed): sign in again".into()
        }
        Some("out") => "signed out".into(),
        _ => String::new(),
    };
    login_form(&state, ClientAddr::new(peer.ip()), StatusCode::OK, &message)
}

async fn login(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = ClientAddr::new(peer.ip());
    let f = Form::parse(&body);
    let expected = session::cookie(cookie_header(&headers), LOGIN_COOKIE).unwrap_or("");
    if !session::equal(f.text("csrf"), expected) {
        return login_form(
            &state,
            client,
            StatusCode::FORBIDDEN,
            "this form was sent without its CSRF token: nothing was done; try again",
        );
    }
    let token = f.text("token").trim();
    let caller =
        match api::authenticate(&state, Some(token).filter(|t| !t.is_empty()), client.ip()).await {
            Ok(c) => c,
            Err(e) => return login_form(&state, client, e.status(), e.message()),
        };
    let id = state
        .console
        .sessions
        .start(*caller.principal.digest(), Instant::now());
    let event = AuditEvent {
        principal: caller.principal.label(),
        address: caller.ip,
        action: "console_sign_in",
        details: json!({}),
    };
    if let Err(e) = state.store.record_event(&event, SystemTime::now()).await {
        tracing::error!(error = ?e, "writing the audit row of a console sign-in");
    }
    let mut cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        state.console.sessions.max_age().as_secs()
    );
    if state.console.secure {
        cookie.push_str("; Secure");
    }
    let mut r = see_other("/keys");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(state): State<Arc<ApiState>>, signed: Signed, body: Bytes) -> Response {
    let f = Form::parse(&body);
    if let Err(r) = signed.csrf(f.get("csrf")) {
        return r;
    }
    state.console.sessions.end(&signed.session_id);
    let mut r = see_other("/login?ended=out");
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("kf_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

async fn keys(
    State(state): State<Arc<ApiState>>,
    signed: Signed,
    RawQuery(query): RawQuery,
) -> Result<Response, Response> {
    let q = Form::parse(query.unwrap_or_default().as_bytes());
    let rows = pages::all_keys(&state).await.map_err(error_page(&signed))?;
    let main = pages::keys(&rows, &q, SystemTime::now());
    Ok(html(StatusCode::OK, signed.page("Keys", &main)))
}

fn error_page(signed: &Signed) -> impl Fn(api::ApiError) -> Response + '_ {
    move |e| {
        html(
            e.status(),
            signed.page(
                "Error",
                &format!(
                    "<h1>Error</h1><p class=\"error\" role=\"alert\">{}</p><p><a href=\"/keys\">Back to the keys</a></p>",
                    html::esc(e.message())
                ),
            ),
        )
    }
}

async fn new_key(State(state): State<Arc<ApiState>>, signed: Signed) -> Response {
    let main = pages::create_form(
        &Form::default(),
        &pages::Problems::default(),
        state.confirm.is_some(),
        &signed.session.csrf,
    );
    html(StatusCode::OK, signed.page("Create key", &main))
}

async fn create(State(state): State<Arc<ApiState>>, signed: Signed, body: Bytes) -> Response {
    let f = Form::parse(&body);
    if let Err(r) = signed.csrf(f.get("csrf")) {
        return r;
    }
    let step_up = state.confirm.is_some();
    let raw = pages::raw_from_text(f.text("ip_allow_list"));
    let checked = api::check_list(&raw, SystemTime::now());
    if checked["valid"] != true {
        let problems = pages::Problems::list(&checked);
        let main = pages::create_form(&f, &problems, step_up, &signed.session.csrf);
        return html(
            StatusCode::UNPROCESSABLE_ENTITY,
            signed.page("Create key", &main),
        );
    }
    let mut scopes: Vec<String> = f.all("scopes").map(str::to_owned).collect();
    if scopes.is_empty() {
        scopes.push(crate::keys::API_SCOPE.to_owned());
    }
    let tenant = f.text("tenant").trim();
    let body = api::CreateBody {
        name: f.text("name").to_owned(),
        tenant: (!tenant.is_empty()).then(|| tenant.to_owned()),
        scopes: Some(scopes),
        ip_allow_list: Some(raw),
        report_only: Some(f.get("report_only").is_some()),
    };
    match api::create_key(
        &state,
        &signed.caller,
        body,
        f.get("code"),
        api::Wait::Fleet,
    )
    .await
    {
        Ok(written) => {
            let main = pages::created(&written, "created");
            html(StatusCode::CREATED, signed.page("Key created", &main))
        }
        Err(e) => {
            let problems = pages::Problems::from_error(&e);
            let main = pages::create_form(&f, &problems, step_up, &signed.session.csrf);
            html(e.status(), signed.page("Create key", &main))
        }
    }
}

async fn detail(
    State(state): State<Arc<ApiState>>,
    signed: Signed,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, Response> {
    let q = Form::parse(query.unwrap_or_default().as_bytes());
    let key = pages::one_key(&state, &id)
        .await
        .map_err(error_page(&signed))?;
    let view = pages::Detail {
        done: q.get("done"),
        enforcement: pages::enforcement_of(&q),
        ..view_of(&state, &key, &signed)
    };
    Ok(html(
        StatusCode::OK,
        signed.page(&key.name, &view.render(SystemTime::now())),
    ))
}

/// The detail page of `key` as `signed` sees it, with nothing done, posted
/// or refused yet: what every handler starts from.
fn view_of<'a>(state: &'a ApiState, key: &'a pages::Row, signed: &'a Signed) -> pages::Detail<'a> {
    pages::Detail {
        state,
        key,
        client: signed.caller.client,
        csrf: &signed.session.csrf,
        done: None,
        enforcement: None,
        form: None,
        problems: pages::Problems::default(),
        preview: None,
    }
}

/// The list editor's Preview and Save.
async fn edit(
    State(state): State<Arc<ApiState>>,
    signed: Signed,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Response> {
    let f = Form::parse(&body);
    signed.csrf(f.get("csrf"))?;
    let key = pages::one_key(&state, &id)
        .await
        .map_err(error_page(&signed))?;
    let now = SystemTime::now();
    let edited = pages::edited_list(&f);
    let mut view = pages::Detail {
        form: Some(&f),
        ..view_of(&state, &key, &signed)
    };
    let list = match edited {
        Ok(list) => list,
        Err(problems) => {
            view.problems = problems;
            return Ok(html(
                StatusCode::UNPROCESSABLE_ENTITY,
                signed.page(&key.name, &view.render(now)),
            ));
        }
    };
    let changed_list = list != key.allow;
    if f.get("action") != Some("save") {
        view.preview = Some(pages::Preview::of(&key.allow, &list, now));
        return Ok(html(
            StatusCode::OK,
            signed.page(&key.name, &view.render(now)),
        ));
    }
    let name = f.text("name").trim();
    let report_only = f.get("report_only").is_some();
    let body = api::UpdateBody {
        name: (!name.is_empty() && name != key.name).then(|| name.to_owned()),
        ip_allow_list: changed_list.then(|| pages::raw_of(&list)),
        report_only: (report_only != key.report_only).then_some(report_only),
    };
    save(&state, &signed, id, body, f.get("code"), view, now).await
}

/// Commit an update through the API's operation; a refusal is shown on the
/// editor, next to the field it concerns.
async fn save(
    state: &ApiState,
    signed: &Signed,
    id: String,
    body: api::UpdateBody,
    code: Option<&str>,
    mut view: pages::Detail<'_>,
    now: SystemTime,
) -> Result<Response, Response> {
    let to = format!("/keys/{}?done=saved", form::encode(&id));
    if body.name.is_none() && body.ip_allow_list.is_none() && body.report_only.is_none() {
        return Ok(see_other(&to));
    }
    match api::update_key(state, &signed.caller, id, body, code, api::Wait::Fleet).await {
        Ok(written) => Ok(see_other(&format!(
            "{to}{}",
            pages::enforcement_query(written.enforcement.as_ref())
        ))),
        Err(e) => {
            view.problems = pages::Problems::from_error(&e);
            Ok(html(
                e.status(),
                signed.page(&view.key.name, &view.render(now)),
            ))
        }
    }
}

/// One click: add an address or prefix ("your address", a seen source).
async fn add(
    State(state): State<Arc<ApiState>>,
    signed: Signed,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Response> {
    let f = Form::parse(&body);
    signed.csrf(f.get("csrf"))?;
    let key = pages::one_key(&state, &id)
        .await
        .map_err(error_page(&signed))?;
    let now = SystemTime::now();
    let mut view = view_of(&state, &key, &signed);
    let list = match pages::with_added(&key.allow, f.text("cidr"), f.text("note")) {
        Ok(list) => list,
        Err(problems) => {
            view.problems = problems;
            return Ok(html(
                StatusCode::UNPROCESSABLE_ENTITY,
                signed.page(&key.name, &view.render(now)),
            ));
        }
    };
    let body = api::UpdateBody {
        ip_allow_list: Some(pages::raw_of(&list)),
        ..api::UpdateBody::default()
    };
    save(&state, &signed, id, body, f.get("code"), view, now).await
}

/// Revoke and rotate need their box ticked.
async fn confirmed_write(
    state: &ApiState,
    signed: &Signed,
    id: String,
    body: &Bytes,
    rotate: bool,
) -> Result<Response, Response> {
    let f = Form::parse(body);
    signed.csrf(f.get("csrf"))?;
    let key = pages::one_key(state, &id)
        .await
        .map_err(error_page(signed))?;
    let now = SystemTime::now();
    let mut view = view_of(state, &key, signed);
    if f.get("confirm") != Some("yes") {
        let what = if rotate { "rotate" } else { "revoke" };
        view.problems.general = Some(format!(
            "tick the box to {what} this key: nothing was changed"
        ));
        return Ok(html(
            StatusCode::UNPROCESSABLE_ENTITY,
            signed.page(&key.name, &view.render(now)),
        ));
    }
    let done = if rotate {
        api::rotate_key(state, &signed.caller, id.clone(), api::Wait::Fleet).await
    } else {
        api::revoke_key(state, &signed.caller, id.clone(), api::Wait::Fleet).await
    };
    match done {
        Ok(written) if rotate => Ok(html(
            StatusCode::OK,
            signed.page("Key rotated", &pages::created(&written, "rotated")),
        )),
        Ok(written) => Ok(see_other(&format!(
            "/keys/{}?done=revoked{}",
            form::encode(&id),
            pages::enforcement_query(written.enforcement.as_ref())
        ))),
        Err(e) => {
            view.problems = pages::Problems::from_error(&e);
            Ok(html(e.status(), signed.page(&key.name, &view.render(now))))
        }
    }
}

async fn revoke(
    State(state): State<Arc<ApiState>>,
    signed: Signed,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Response> {
    confirmed_write(&state, &signed, id, &body, false).await
}

async fn rotate(
    State(state): State<Arc<ApiState>>,
    signed: Signed,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Response> {
    confirmed_write(&state, &signed, id, &body, true).await
}

async fn audit(
    State(state): State<Arc<ApiState>>,
    signed: Signed,
    RawQuery(query): RawQuery,
) -> Result<Response, Response> {
    let q = Form::parse(query.unwrap_or_default().as_bytes());
    let key_id = q.get("key_id").filter(|k| !k.is_empty());
    let entries = state
        .store
        .audit(0, 100_000, key_id)
        .await
        .map_err(|e| error_page(&signed)(e.into()))?;
    let main = pages::audit(&entries, key_id);
    Ok(html(StatusCode::OK, signed.page("Audit", &main)))
}

/// Live validation: the editor's text, checked by the API's own check
/// (`POST /v1/allowlist/check`'s answer). The CSRF token comes as a header.
async fn check(signed: Signed, headers: HeaderMap, body: Bytes) -> Result<Response, Response> {
    signed.csrf(headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))?;
    let text = String::from_utf8_lossy(&body);
    let raw = pages::raw_from_text(&text);
    Ok(axum::Json(api::check_list(&raw, SystemTime::now())).into_response())
}

//! The console's pages, rendered to HTML strings. Values are escaped with
//! [`esc`]; the forms post to `mod.rs`'s handlers and work without script.

use std::{collections::HashMap, fmt::Write as _, sync::Arc, time::SystemTime};

use ipnet::IpNet;
use serde_json::Value;

use super::{
    coverage::Coverage,
    form::{Form, encode},
    html::esc,
};
use crate::{
    allowlist::{
        AllowEntry, AllowList, ClientAddr, DEFAULT_MAX_ENTRIES, Net, RawEntry, RawList,
        parse_entry, parse_list,
    },
    keys::{ADMIN_SCOPE, API_SCOPE, Key},
    management::api::{self, ApiError, ApiState, Written},
    store::{AuditEntry, fleet::Enforcement},
};

/// Rows of the keys table shown at once; the search narrows the rest.
pub const PAGE_ROWS: usize = 500;
/// Empty rows the list editor offers for new entries.
const NEW_ROWS: usize = 2;

/// A network as people write it: a single address without `/32` or `/128`.
fn net_text(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One key as the console lists it.
pub struct Row {
    pub key: Arc<Key>,
    /// `config` or `api`.
    pub source: &'static str,
    pub revoked: bool,
    pub last_used: Option<SystemTime>,
}

/// Every key, config keys first, with its last use (the shim's record when it
/// has one, else the store's).
pub async fn all_keys(state: &ApiState) -> Result<Vec<Row>, ApiError> {
    let stored = state.store.keys().await?;
    let used: HashMap<String, SystemTime> = state.sources.last_used().into_iter().collect();
    let statics = state
        .static_keys
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut rows: Vec<Row> = statics
        .iter()
        .map(|k| Row {
            key: k.clone(),
            source: "config",
            revoked: false,
            last_used: used.get(&k.id).copied(),
        })
        .collect();
    rows.extend(stored.into_iter().map(|s| Row {
        last_used: used.get(&s.id).copied().or(s.last_used_at),
        source: "api",
        revoked: !s.is_active(),
        key: s.key,
    }));
    Ok(rows)
}

/// One key by id (404 as the API answers it).
pub async fn one_key(state: &ApiState, id: &str) -> Result<Row, ApiError> {
    if let Some(k) = api::static_key(state, id) {
        return Ok(Row {
            last_used: state
                .sources
                .last_used()
                .into_iter()
                .find(|(i, _)| i == id)
                .map(|(_, t)| t),
            key: k,
            source: "config",
            revoked: false,
        });
    }
    let s = state.store.key(id).await?;
    Ok(Row {
        last_used: s.last_used_at,
        source: "api",
        revoked: !s.is_active(),
        key: s.key,
    })
}

impl std::ops::Deref for Row {
    type Target = Key;
    fn deref(&self) -> &Key {
        &self.key
    }
}

fn status(r: &Row) -> &'static str {
    if r.revoked {
        "revoked"
    } else if r.source == "config" {
        "config"
    } else {
        "active"
    }
}

/// "anywhere", or the first entries and how many more.
fn summary(list: &AllowList) -> String {
    if list.is_unrestricted() {
        return "anywhere (no restriction)".into();
    }
    let entries = list.entries();
    let mut out = entries
        .iter()
        .take(3)
        .map(|e| net_text(e.net.get()))
        .collect::<Vec<_>>()
        .join(", ");
    if entries.len() > 3 {
        let _ = write!(out, " and {} more", entries.len() - 3);
    }
    out
}

/// The keys table, filtered by `q` (name or id), `tenant` and `status`.
#[must_use]
pub fn keys(rows: &[Row], q: &Form, now: SystemTime) -> String {
    let search = q.text("q").trim().to_lowercase();
    let tenant = q.text("tenant");
    let want = q.text("status");
    let mut tenants: Vec<&str> = rows.iter().map(|r| r.tenant.as_str()).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let shown: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            (search.is_empty()
                || r.name.to_lowercase().contains(&search)
                || r.id.to_lowercase().contains(&search))
                && (tenant.is_empty() || r.tenant == tenant)
                && (want.is_empty() || status(r) == want)
        })
        .collect();
    let mut out = String::with_capacity(256 * shown.len().min(PAGE_ROWS) + 2048);
    out.push_str(
        "<h1>Keys</h1>\n<form method=\"get\" action=\"/keys\" class=\"filters\" role=\"search\">",
    );
    let _ = write!(
        out,
        "<label for=\"q\">Search</label><input id=\"q\" name=\"q\" type=\"search\" value=\"{}\" placeholder=\"name or id\">",
        esc(q.text("q"))
    );
    out.push_str("<label for=\"tenant\">Tenant</label><select id=\"tenant\" name=\"tenant\"><option value=\"\">all</option>");
    for t in tenants {
        let _ = write!(
            out,
            "<option{}>{}</option>",
            if t == tenant { " selected" } else { "" },
            esc(t)
        );
    }
    out.push_str("</select><label for=\"status\">Status</label><select id=\"status\" name=\"status\"><option value=\"\">all</option>");
    for s in ["active", "revoked", "config"] {
        let _ = write!(
            out,
            "<option{}>{s}</option>",
            if s == want { " selected" } else { "" }
        );
    }
    out.push_str("</select><button type=\"submit\">Filter</button></form>\n");
    let _ = write!(
        out,
        "<p id=\"key-count\">{} of {} keys{}. <a href=\"/keys/new\">Create key</a></p>",
        shown.len(),
        rows.len(),
        if shown.len() > PAGE_ROWS {
            format!(", the first {PAGE_ROWS} shown: search to narrow")
        } else {
            String::new()
        }
    );
    out.push_str("<div class=\"scroll\"><table id=\"keys\"><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Id</th><th scope=\"col\">Tenant</th><th scope=\"col\">Status</th><th scope=\"col\">Allowed IPs</th><th scope=\"col\">Last used</th></tr></thead><tbody>\n");
    for r in shown.iter().take(PAGE_ROWS) {
        let _ = writeln!(
            out,
            "<tr><td><a href=\"/keys/{}\">{}</a></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            encode(&r.id),
            esc(&r.name),
            esc(&r.id),
            esc(&r.tenant),
            status(r),
            esc(&summary(&r.allow)),
            r.last_used
                .map_or_else(|| "never".to_owned(), |t| ago(t, now)),
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

fn ago(t: SystemTime, now: SystemTime) -> String {
    let secs = now.duration_since(t).unwrap_or_default().as_secs();
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => time(t),
    }
}

/// What a form refused, by where it is shown.
#[derive(Debug, Default)]
pub struct Problems {
    /// At the top of the page.
    pub general: Option<String>,
    /// Next to the allow list: a self-lockout, a config key.
    pub list_message: Option<String>,
    /// Each bad entry with its reason and suggestion.
    pub entries: Vec<String>,
    /// Next to the confirmation code.
    pub code: Option<String>,
}

impl Problems {
    /// From the check's JSON (`api::check_list`).
    #[must_use]
    pub fn list(checked: &Value) -> Self {
        Self {
            entries: checked["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "entry {} \u{201c}{}\u{201d}: {}",
                        e["position"],
                        e["entry"].as_str().unwrap_or(""),
                        e["reason"].as_str().unwrap_or("")
                    )
                })
                .collect(),
            ..Self::default()
        }
    }

    /// An API operation's refusal, put where it belongs.
    #[must_use]
    pub fn from_error(e: &ApiError) -> Self {
        let message = Some(e.message().to_owned());
        match e.status().as_u16() {
            401 | 429 => Self {
                code: message,
                ..Self::default()
            },
            409 => Self {
                list_message: message,
                ..Self::default()
            },
            422 if e.entries().is_some() => Self::list(&serde_json::json!({
                "errors": e.entries().cloned().unwrap_or_default()
            })),
            _ => Self {
                general: message,
                ..Self::default()
            },
        }
    }

    fn general_html(&self) -> String {
        self.general.as_ref().map_or_else(String::new, |m| {
            format!(
                "<p class=\"error\" id=\"form-error\" role=\"alert\">{}</p>",
                esc(m)
            )
        })
    }

    fn list_html(&self) -> String {
        let mut out = String::new();
        if let Some(m) = &self.list_message {
            let _ = write!(
                out,
                "<p class=\"error\" id=\"list-error\" role=\"alert\">{}</p>",
                esc(m)
            );
        }
        if !self.entries.is_empty() {
            out.push_str("<ul class=\"error\" id=\"entry-errors\" role=\"alert\">");
            for e in &self.entries {
                let _ = write!(out, "<li>{}</li>", esc(e));
            }
            out.push_str("</ul>");
        }
        out
    }
}

/// The Allowed IPs field's text as the API's list: one string (commas and
/// newlines, exactly the API's grammar), a JSON array, or lines some of which
/// are `{"cidr": …, "note": …, "expires_at": …}` objects.
#[must_use]
pub fn raw_from_text(text: &str) -> RawList {
    let trimmed = text.trim();
    if trimmed.starts_with('[')
        && let Ok(list) = serde_json::from_str::<RawList>(trimmed)
    {
        return list;
    }
    if !text.lines().any(|l| l.trim_start().starts_with('{')) {
        return RawList::One(text.to_owned());
    }
    let mut entries = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('{') {
            entries.push(
                serde_json::from_str::<RawEntry>(l.trim_end_matches(','))
                    .unwrap_or_else(|_| RawEntry::Text(l.to_owned())),
            );
        } else {
            entries.extend(
                l.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| RawEntry::Text(p.to_owned())),
            );
        }
    }
    RawList::Many(entries)
}

/// A canonical list in the API's object form (the operations parse it again,
/// through the same grammar).
#[must_use]
pub fn raw_of(list: &AllowList) -> RawList {
    RawList::Many(
        list.entries()
            .into_iter()
            .map(|e| RawEntry::Object {
                cidr: e.net.to_string(),
                note: e.note,
                expires_at: e.expires_at.map(time),
            })
            .collect(),
    )
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The most rows an editor post may carry (the per-key limit and the new rows).
const MAX_ROWS: usize = DEFAULT_MAX_ENTRIES + NEW_ROWS + 1;

/// The rows of an editor post: `(cidr, note, expires, removed)`.
fn posted_rows(f: &Form) -> Vec<(String, String, String, bool)> {
    let rows: usize = f.text("rows").parse().unwrap_or(0);
    (0..rows.min(MAX_ROWS))
        .map(|i| {
            (
                f.text(&format!("cidr.{i}")).to_owned(),
                f.text(&format!("note.{i}")).to_owned(),
                f.text(&format!("expires.{i}")).to_owned(),
                f.get(&format!("remove.{i}")).is_some(),
            )
        })
        .collect()
}

/// The list an editor post describes: its rows (less the removed and blank
/// ones) and the "add entries" text, each checked by the §3 grammar.
pub fn edited_list(f: &Form) -> Result<AllowList, Problems> {
    let rows: Vec<RawEntry> = posted_rows(f)
        .into_iter()
        .filter(|(cidr, _, _, removed)| !removed && !cidr.trim().is_empty())
        .map(|(cidr, note, expires, _)| RawEntry::Object {
            cidr,
            note: non_empty(&note),
            expires_at: non_empty(&expires),
        })
        .collect();
    let mut problems = Problems::default();
    let kept = parse_list(&RawList::Many(rows), DEFAULT_MAX_ENTRIES).map_err(|errors| {
        errors
            .iter()
            .map(|e| {
                format!(
                    "row {} \u{201c}{}\u{201d}: {}",
                    e.position, e.entry, e.reason
                )
            })
            .collect::<Vec<_>>()
    });
    let added = parse_list(&raw_from_text(f.text("add")), DEFAULT_MAX_ENTRIES).map_err(|errors| {
        errors
            .iter()
            .map(|e| {
                format!(
                    "new entry {} \u{201c}{}\u{201d}: {}",
                    e.position, e.entry, e.reason
                )
            })
            .collect::<Vec<_>>()
    });
    match (kept, added) {
        (Ok(kept), Ok(added)) => {
            let mut entries = kept.entries();
            entries.extend(added.entries());
            let list = AllowList::from_canonical(entries);
            if list.entry_count() > DEFAULT_MAX_ENTRIES {
                problems.entries.push(format!(
                    "{} distinct entries; at most {DEFAULT_MAX_ENTRIES} per key",
                    list.entry_count()
                ));
                return Err(problems);
            }
            Ok(list)
        }
        (kept, added) => {
            problems.entries.extend(kept.err().into_iter().flatten());
            problems.entries.extend(added.err().into_iter().flatten());
            Err(problems)
        }
    }
}

/// `list` with one more entry (the one-click adds).
pub fn with_added(list: &AllowList, cidr: &str, note: &str) -> Result<AllowList, Problems> {
    let net = parse_entry(cidr).map_err(|reason| Problems {
        entries: vec![format!("\u{201c}{}\u{201d}: {reason}", cidr.trim())],
        ..Problems::default()
    })?;
    let mut entries = list.entries();
    if entries.iter().any(|e| e.net == net) {
        return Err(Problems {
            general: Some(format!("{net} is already in the list: nothing was changed")),
            ..Problems::default()
        });
    }
    entries.push(AllowEntry {
        net,
        note: non_empty(note),
        expires_at: None,
    });
    Ok(AllowList::from_canonical(entries))
}

/// What a Save would change.
pub struct Preview {
    added: Vec<IpNet>,
    removed: Vec<IpNet>,
    before: (bool, Coverage),
    after: (bool, Coverage),
    notes_changed: bool,
}

impl Preview {
    #[must_use]
    pub fn of(before: &AllowList, after: &AllowList, now: SystemTime) -> Self {
        let b: Vec<IpNet> = before.entries().iter().map(|e| e.net.get()).collect();
        let a: Vec<IpNet> = after.entries().iter().map(|e| e.net.get()).collect();
        Self {
            added: a.iter().filter(|n| !b.contains(n)).copied().collect(),
            removed: b.iter().filter(|n| !a.contains(n)).copied().collect(),
            before: (
                before.is_unrestricted(),
                Coverage::of(before.active_nets(now).map(Net::get)),
            ),
            after: (
                after.is_unrestricted(),
                Coverage::of(after.active_nets(now).map(Net::get)),
            ),
            notes_changed: before != after,
        }
    }

    fn render(&self) -> String {
        let words = |(open, c): (bool, Coverage)| {
            if open {
                "anywhere (the list is empty: no restriction)".to_owned()
            } else {
                c.to_string()
            }
        };
        let mut out = String::from(
            "<section id=\"preview\" class=\"preview\" aria-live=\"polite\"><h2>Preview: nothing is saved yet</h2><ul class=\"diff\">",
        );
        for n in &self.added {
            let _ = write!(out, "<li class=\"add\">+ {}</li>", esc(&net_text(*n)));
        }
        for n in &self.removed {
            let _ = write!(
                out,
                "<li class=\"del\">\u{2212} {}</li>",
                esc(&net_text(*n))
            );
        }
        if self.added.is_empty() && self.removed.is_empty() {
            out.push_str(if self.notes_changed {
                "<li>the same addresses; notes or expiries change</li>"
            } else {
                "<li>no change</li>"
            });
        }
        let _ = write!(
            out,
            "</ul><p>Covers before: <strong id=\"covers-before\">{}</strong>; after: <strong id=\"covers-after\">{}</strong>.</p></section>",
            esc(&words(self.before)),
            esc(&words(self.after))
        );
        out
    }
}

/// The step-up code's field; `id` is unique on its page (several forms
/// may each carry one).
fn code_field(step_up: bool, problem: Option<&String>, id: &str) -> String {
    if !step_up {
        return String::new();
    }
    let id = esc(id);
    let mut out = format!(
        "<div class=\"code-field\"><label for=\"{id}\">Confirmation code (TOTP, 6 digits)</label>\
         <input id=\"{id}\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9]{{6}}\" maxlength=\"6\">",
    );
    if let Some(p) = problem {
        let _ = write!(
            out,
            "<p class=\"error\" id=\"code-error\" role=\"alert\">{}</p>",
            esc(p)
        );
    }
    out.push_str("</div>");
    out
}

/// `data-step-up` makes the script ask for the code in a dialog.
fn step_up_attr(step_up: bool) -> &'static str {
    if step_up { " data-step-up" } else { "" }
}

/// The create form, refilled from `f` after a refusal.
#[must_use]
pub fn create_form(f: &Form, problems: &Problems, step_up: bool, csrf: &str) -> String {
    let scopes: Vec<&str> = f.all("scopes").collect();
    let checked = |s: &str| {
        if scopes.contains(&s) || (scopes.is_empty() && s == API_SCOPE) {
            " checked"
        } else {
            ""
        }
    };
    let mut out = String::from("<h1>Create key</h1>");
    out.push_str(&problems.general_html());
    let _ = write!(
        out,
        r#"<form method="post" action="/keys/new" class="stack" id="create-form"{step}>
<input type="hidden" name="csrf" value="{csrf}">
<label for="name">Name</label>
<input id="name" name="name" required maxlength="200" value="{name}">
<label for="tenant">Tenant <span class="hint">(empty: default)</span></label>
<input id="tenant" name="tenant" value="{tenant}">
<fieldset><legend>Scopes</legend>
<label><input type="checkbox" name="scopes" value="{api}"{api_c}> api: usable on the listeners</label>
<label><input type="checkbox" name="scopes" value="{admin}"{admin_c}> admin: may sign in here and call the management API</label>
</fieldset>
<label><input type="checkbox" name="report_only" id="report_only"{ro}> Report only: never refuse, count would-be refusals</label>
<label for="ip_allow_list">Allowed IPs</label>
<p class="hint" id="allow-hint">Addresses or CIDR ranges, separated by commas or new lines (IPv4 and IPv6). A line may be <code>{{"cidr": "203.0.113.0/24", "note": "office", "expires_at": "2027-01-01T00:00:00Z"}}</code>. Empty: the key works from anywhere.</p>
<textarea id="ip_allow_list" name="ip_allow_list" rows="6" aria-describedby="allow-hint allow-check" data-check="allow-check">{list}</textarea>
<div id="allow-check" class="check" aria-live="polite">{entries}</div>
{code}
<button type="submit" id="create">Create</button>
</form>"#,
        step = step_up_attr(step_up),
        csrf = esc(csrf),
        name = esc(f.text("name")),
        tenant = esc(f.text("tenant")),
        api = API_SCOPE,
        admin = ADMIN_SCOPE,
        api_c = checked(API_SCOPE),
        admin_c = checked(ADMIN_SCOPE),
        ro = if f.get("report_only").is_some() {
            " checked"
        } else {
            ""
        },
        list = esc(f.text("ip_allow_list")),
        entries = problems.list_html(),
        code = code_field(step_up, problems.code.as_ref(), "code"),
    );
    out
}

/// After a create or a rotation: the secret, this once.
#[must_use]
pub fn created(w: &Written, what: &str) -> String {
    let k = &w.key;
    format!(
        r#"<h1>Key {what}: {name}</h1>
<p class="warning" id="secret-warning" role="alert">Copy the secret now: it will not be shown again. keyfence keeps only its hash.</p>
<label for="secret">Secret of <code>{id}</code></label>
<div class="secret-row"><input id="secret" readonly value="{secret}"><button type="button" data-copy="secret" id="copy" hidden>Copy</button></div>
<p>Allowed IPs: {summary}</p>
{enforced}
<p><a href="/keys/{eid}" id="to-key">Go to the key</a></p>"#,
        enforced = enforcement(w.enforcement.as_ref()),
        name = esc(&k.name),
        id = esc(&k.id),
        secret = esc(w.secret.as_deref().unwrap_or("")),
        summary = esc(&summary(&k.allow)),
        eid = encode(&k.id),
    )
}

/// In a fleet, where the change is in force: "on N of M hosts", and the
/// hosts still applying it by name. Nothing with a single-host store.
#[must_use]
pub fn enforcement(e: Option<&Enforcement>) -> String {
    let Some(e) = e else {
        return String::new();
    };
    let mut out = format!(
        "<p class=\"ok\" id=\"enforcement\" role=\"status\">In force on {} of {} live hosts.</p>",
        e.applied, e.hosts
    );
    if !e.lagging.is_empty() {
        let names: Vec<String> = e.lagging.iter().map(|h| esc(h)).collect();
        let _ = write!(
            out,
            "<p class=\"warning\" id=\"lagging\" role=\"alert\">Not yet applied on {}: those hosts enforce the previous state until they catch up (see <code>keyfence fleet status</code>).</p>",
            names.join(", ")
        );
    }
    out
}

/// The query a redirect after a fleet write carries so the next page can
/// say where the change is in force (`applied`, `hosts`, `lagging`…).
#[must_use]
pub fn enforcement_query(e: Option<&Enforcement>) -> String {
    let Some(e) = e else {
        return String::new();
    };
    let mut q = format!("&applied={}&hosts={}", e.applied, e.hosts);
    for h in &e.lagging {
        let _ = write!(q, "&lagging={}", encode(h));
    }
    q
}

/// The enforcement a redirect's query carries (see [`enforcement_query`]).
#[must_use]
pub fn enforcement_of(q: &Form) -> Option<Enforcement> {
    Some(Enforcement {
        applied: q.get("applied")?.parse().ok()?,
        hosts: q.get("hosts")?.parse().ok()?,
        lagging: q.all("lagging").map(str::to_owned).collect(),
    })
}

/// The key detail page: facts, the list editor, "your address", seen
/// sources, activity, rotate and revoke.
pub struct Detail<'a> {
    pub state: &'a ApiState,
    pub key: &'a Row,
    pub client: ClientAddr,
    pub csrf: &'a str,
    /// `saved`, `revoked` after a redirect.
    pub done: Option<&'a str>,
    /// Where that change is in force, in a fleet.
    pub enforcement: Option<Enforcement>,
    /// The editor's post, to refill the form.
    pub form: Option<&'a Form>,
    pub problems: Problems,
    pub preview: Option<Preview>,
}

impl Detail<'_> {
    #[must_use]
    pub fn render(&self, now: SystemTime) -> String {
        let k = self.key;
        let id = encode(&k.id);
        let step_up = self.state.confirm.is_some();
        let editable = k.source == "api" && !k.revoked;
        let mut out = format!(
            "<h1>{}</h1><dl class=\"facts\"><dt>Id</dt><dd><code id=\"key-id\">{}</code></dd><dt>Tenant</dt><dd>{}</dd><dt>Scopes</dt><dd>{}</dd><dt>Status</dt><dd id=\"key-status\">{}</dd><dt>Report only</dt><dd>{}</dd><dt>Allowed</dt><dd id=\"key-summary\">{}</dd></dl>",
            esc(&k.name),
            esc(&k.id),
            esc(&k.tenant),
            esc(&k.scopes.names().collect::<Vec<_>>().join(", ")),
            status(k),
            if k.report_only { "yes" } else { "no" },
            esc(&if k.allow.is_unrestricted() {
                "from anywhere: the list is empty".to_owned()
            } else {
                format!(
                    "{} ({})",
                    summary(&k.allow),
                    Coverage::of(k.allow.active_nets(now).map(Net::get))
                )
            }),
        );
        match self.done {
            Some("saved") => out.push_str(
                "<p class=\"ok\" id=\"done\" role=\"status\">Saved: the change is enforced.</p>",
            ),
            Some("revoked") => out.push_str(
                "<p class=\"ok\" id=\"done\" role=\"status\">Revoked: the key no longer works.</p>",
            ),
            _ => {}
        }
        if self.done.is_some() {
            out.push_str(&enforcement(self.enforcement.as_ref()));
        }
        out.push_str(&self.problems.general_html());
        if k.source == "config" {
            out.push_str(
                "<p class=\"hint\">This key comes from the config file: change it there.</p>",
            );
        }
        if editable {
            out.push_str(&self.your_address(&id, step_up, now));
            out.push_str(&self.editor(&id, step_up, now));
        } else {
            out.push_str(&entries_table(&k.allow, now));
        }
        out.push_str(&self.sources(&id, editable, step_up, now));
        out.push_str(&activity(&self.state.sources.activity(&k.id, now)));
        let _ = write!(
            out,
            "<p><a href=\"/audit?key_id={id}\" id=\"key-audit\">Audit of this key</a></p>"
        );
        if editable {
            out.push_str(&self.dangerous(&id));
        }
        out
    }

    fn hidden(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            esc(self.csrf)
        )
    }

    fn your_address(&self, id: &str, step_up: bool, now: SystemTime) -> String {
        let ip = self.client.ip();
        let inside = self.key.allow.allows(self.client, now) && !self.key.allow.is_unrestricted();
        let mut out = format!(
            "<section id=\"your-address-section\"><h2>Your address</h2><p>The console sees this browser at <strong id=\"your-address\">{}</strong>.",
            esc(&ip.to_string())
        );
        if inside {
            out.push_str(" It is in this key's list.</p></section>");
            return out;
        }
        let _ = write!(
            out,
            "</p><form method=\"post\" action=\"/keys/{id}/add\" class=\"inline\"{}>{}<input type=\"hidden\" name=\"cidr\" value=\"{ip}\"><input type=\"hidden\" name=\"note\" value=\"added from the console\">{}<button type=\"submit\" id=\"add-mine\">Add {ip} to the list</button></form></section>",
            step_up_attr(step_up),
            self.hidden(),
            code_field(step_up, None, "code-mine"),
        );
        out
    }

    fn editor(&self, id: &str, step_up: bool, now: SystemTime) -> String {
        let rows: Vec<(String, String, String, bool)> = match self.form {
            Some(f) => posted_rows(f),
            None => self
                .key
                .allow
                .entries()
                .into_iter()
                .map(|e| {
                    (
                        net_text(e.net.get()),
                        e.note.unwrap_or_default(),
                        e.expires_at.map(time).unwrap_or_default(),
                        false,
                    )
                })
                .chain((0..NEW_ROWS).map(|_| Default::default()))
                .collect(),
        };
        let name = self.form.map_or(self.key.name.as_str(), |f| f.text("name"));
        let report_only = self
            .form
            .map_or(self.key.report_only, |f| f.get("report_only").is_some());
        let mut out = format!(
            r#"<section id="editor"><h2>Allowed IPs</h2>
<form method="post" action="/keys/{id}" id="edit-form"{step}>{hidden}
<label for="name">Name</label><input id="name" name="name" value="{name}" maxlength="200">
<label><input type="checkbox" name="report_only" id="report_only"{ro}> Report only</label>
<input type="hidden" name="rows" value="{n}">
<div class="scroll"><table id="entries"><caption>{caption}</caption><thead><tr><th scope="col">Address or range</th><th scope="col">Covers</th><th scope="col">Note</th><th scope="col">Expires (RFC 3339)</th><th scope="col">Remove</th></tr></thead><tbody>"#,
            step = step_up_attr(step_up),
            hidden = self.hidden(),
            name = esc(name),
            ro = if report_only { " checked" } else { "" },
            n = rows.len(),
            caption = if self.key.allow.is_unrestricted() {
                "The list is empty: this key works from anywhere."
            } else {
                "Each entry of the list; blank rows add entries."
            },
        );
        for (i, (cidr, note, expires, removed)) in rows.iter().enumerate() {
            let covers = cidr
                .trim()
                .parse::<IpNet>()
                .or_else(|_| parse_entry(cidr).map(Net::get))
                .map_or_else(|_| String::new(), |n| Coverage::net(n).to_string());
            let expired = humantime::parse_rfc3339_weak(expires.trim()).is_ok_and(|t| t <= now);
            let _ = write!(
                out,
                "<tr><td><label class=\"sr\" for=\"cidr.{i}\">Entry {n}</label><input id=\"cidr.{i}\" name=\"cidr.{i}\" value=\"{c}\" class=\"cidr\"></td><td>{covers}{exp}</td><td><label class=\"sr\" for=\"note.{i}\">Note {n}</label><input id=\"note.{i}\" name=\"note.{i}\" value=\"{note}\"></td><td><label class=\"sr\" for=\"expires.{i}\">Expiry {n}</label><input id=\"expires.{i}\" name=\"expires.{i}\" value=\"{e}\" placeholder=\"never\"></td><td><label><input type=\"checkbox\" name=\"remove.{i}\" id=\"remove.{i}\"{r}><span class=\"sr\"> remove entry {n}</span></label></td></tr>",
                n = i + 1,
                c = esc(cidr),
                note = esc(note),
                e = esc(expires),
                exp = if expired { " (expired)" } else { "" },
                r = if *removed { " checked" } else { "" },
            );
        }
        let _ = write!(
            out,
            r#"</tbody></table></div>
<label for="add">Add entries <span class="hint">(commas or new lines, as on the create page)</span></label>
<textarea id="add" name="add" rows="3" data-check="add-check" aria-describedby="add-check">{add}</textarea>
<div id="add-check" class="check" aria-live="polite"></div>
<div id="list-problems">{problems}</div>
{code}
<div class="buttons"><button type="submit" name="action" value="preview" id="preview-button">Preview</button>
<button type="submit" name="action" value="save" id="save">Save</button></div>
</form>{preview}</section>"#,
            add = esc(self.form.map_or("", |f| f.text("add"))),
            problems = self.problems.list_html(),
            code = code_field(step_up, self.problems.code.as_ref(), "code"),
            preview = self
                .preview
                .as_ref()
                .map_or_else(String::new, Preview::render),
        );
        out
    }

    fn sources(&self, id: &str, editable: bool, step_up: bool, now: SystemTime) -> String {
        let seen = self.state.sources.of(&self.key.id);
        let mut out = String::from("<section id=\"sources\"><h2>Seen sources</h2>");
        if seen.is_empty() {
            out.push_str("<p>No request with this key yet.</p></section>");
            return out;
        }
        out.push_str("<div class=\"scroll\"><table id=\"sources-table\"><thead><tr><th scope=\"col\">Address</th><th scope=\"col\">Allowed</th><th scope=\"col\">Refused</th><th scope=\"col\">Last seen</th><th scope=\"col\">Add</th></tr></thead><tbody>");
        for s in seen {
            let client = ClientAddr::new(s.ip);
            let mut add = String::new();
            if editable && !self.key.allow.allows(client, now) {
                let wide = match s.ip {
                    std::net::IpAddr::V4(_) => IpNet::new(s.ip, 24),
                    std::net::IpAddr::V6(_) => IpNet::new(s.ip, 64),
                }
                .map(|n| n.trunc().to_string())
                .unwrap_or_default();
                for (cidr, label) in [(s.ip.to_string(), s.ip.to_string()), (wide.clone(), wide)] {
                    let field = format!("code-add-{cidr}");
                    let _ = write!(
                        add,
                        "<form method=\"post\" action=\"/keys/{id}/add\" class=\"inline\"{}>{}<input type=\"hidden\" name=\"cidr\" value=\"{c}\"><input type=\"hidden\" name=\"note\" value=\"seen source\">{}<button type=\"submit\" data-add=\"{c}\">Add {l}</button></form>",
                        step_up_attr(step_up),
                        self.hidden(),
                        code_field(step_up, None, &field),
                        c = esc(&cidr),
                        l = esc(&label),
                    );
                }
            }
            let _ = write!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{add}</td></tr>",
                esc(&s.ip.to_string()),
                s.allowed,
                s.refused,
                ago(s.last_seen, now),
            );
        }
        out.push_str("</tbody></table></div></section>");
        out
    }

    fn dangerous(&self, id: &str) -> String {
        format!(
            r#"<section id="danger"><h2>Rotate or revoke</h2>
<form method="post" action="/keys/{id}/rotate" class="stack">{h}
<label><input type="checkbox" name="confirm" value="yes" required id="rotate-confirm"> Yes, give this key a new secret (the old one stops working)</label>
<button type="submit" id="rotate">Rotate secret</button></form>
<form method="post" action="/keys/{id}/revoke" class="stack">{h}
<label><input type="checkbox" name="confirm" value="yes" required id="revoke-confirm"> Yes, revoke this key for good</label>
<button type="submit" id="revoke" class="danger">Revoke key</button></form></section>"#,
            h = self.hidden(),
        )
    }
}

/// A read-only list (config and revoked keys).
fn entries_table(list: &AllowList, now: SystemTime) -> String {
    if list.is_unrestricted() {
        return "<p>The list is empty: this key works from anywhere.</p>".into();
    }
    let mut out = String::from(
        "<div class=\"scroll\"><table id=\"entries\"><thead><tr><th scope=\"col\">Address or range</th><th scope=\"col\">Covers</th><th scope=\"col\">Note</th><th scope=\"col\">Expires</th></tr></thead><tbody>",
    );
    for e in list.entries() {
        let _ = write!(
            out,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}{}</td></tr>",
            esc(&net_text(e.net.get())),
            Coverage::net(e.net.get()),
            esc(e.note.as_deref().unwrap_or("")),
            e.expires_at.map_or_else(|| "never".to_owned(), time),
            if e.is_active(now) { "" } else { " (expired)" },
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// Allowed and refused requests per minute over the last hour, as an SVG
/// bar chart (no script, no style sheet needed), with the totals in words.
#[must_use]
pub fn activity(minutes: &[(u64, u64)]) -> String {
    const W: u64 = 600;
    const H: u64 = 120;
    let allowed: u64 = minutes.iter().map(|m| m.0).sum();
    let refused: u64 = minutes.iter().map(|m| m.1).sum();
    let peak = minutes.iter().map(|m| m.0 + m.1).max().unwrap_or(0).max(1);
    let bar = W / u64::try_from(minutes.len().max(1)).unwrap_or(1);
    let mut out = format!(
        "<section id=\"activity\"><h2>Activity, last hour</h2><p id=\"activity-totals\">{allowed} allowed, {refused} refused.</p>\
         <svg class=\"chart\" viewBox=\"0 0 {W} {H}\" width=\"100%\" role=\"img\" aria-labelledby=\"activity-title\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title id=\"activity-title\">Requests per minute over the last hour: {allowed} allowed (green), {refused} refused (red); the busiest minute had {peak}.</title>\
         <line x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" stroke=\"#888\"/>"
    );
    for (i, &(a, r)) in minutes.iter().enumerate() {
        let x = u64::try_from(i).unwrap_or(0) * bar;
        let ha = a * H / peak;
        let hr = r * H / peak;
        if a > 0 {
            let _ = write!(
                out,
                "<rect class=\"allowed\" x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{ha}\" fill=\"#2e7d32\"/>",
                H - ha,
                bar - 1
            );
        }
        if r > 0 {
            let _ = write!(
                out,
                "<rect class=\"refused\" x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{hr}\" fill=\"#c62828\"/>",
                H - ha - hr,
                bar - 1
            );
        }
    }
    out.push_str("</svg></section>");
    out
}

/// An entry of a stored key's list, as text: `cidr (note, until T)`.
fn entry_text(entry: &Value) -> String {
    match entry {
        Value::String(text) => text.clone(),
        Value::Object(fields) => {
            let mut text = fields
                .get("cidr")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let note = fields.get("note").and_then(Value::as_str);
            let until = fields.get("expires_at").and_then(Value::as_str);
            match (note, until) {
                (Some(note), Some(until)) => {
                    let _ = write!(text, " ({note}, until {until})");
                }
                (Some(note), None) => {
                    let _ = write!(text, " ({note})");
                }
                (None, Some(until)) => {
                    let _ = write!(text, " (until {until})");
                }
                (None, None) => {}
            }
            text
        }
        other => other.to_string(),
    }
}

/// Before/after of one audit row: changed fields, then the list as a diff.
fn diff(before: Option<&Value>, after: Option<&Value>) -> String {
    let null = Value::Null;
    let b = before.unwrap_or(&null);
    let a = after.unwrap_or(&null);
    let mut out = String::from("<ul class=\"diff\">");
    for field in ["name", "tenant", "scopes", "report_only", "revoked_at"] {
        if b.get(field) != a.get(field) && !(b.is_null() && a.get(field).is_none_or(Value::is_null))
        {
            let _ = write!(
                out,
                "<li>{field}: {} \u{2192} {}</li>",
                esc(&b
                    .get(field)
                    .map_or_else(|| "\u{2014}".into(), Value::to_string)),
                esc(&a
                    .get(field)
                    .map_or_else(|| "\u{2014}".into(), Value::to_string)),
            );
        }
    }
    let list = |v: &Value| -> Vec<String> {
        v.get("ip_allow_list")
            .and_then(Value::as_array)
            .map(|l| l.iter().map(entry_text).collect())
            .unwrap_or_default()
    };
    let (lb, la) = (list(b), list(a));
    for e in &lb {
        if !la.contains(e) {
            let _ = write!(out, "<li class=\"del\">\u{2212} {}</li>", esc(e));
        }
    }
    for e in &la {
        if lb.contains(e) {
            let _ = write!(out, "<li class=\"same\">\u{a0} {}</li>", esc(e));
        } else {
            let _ = write!(out, "<li class=\"add\">+ {}</li>", esc(e));
        }
    }
    out.push_str("</ul>");
    out
}

/// The audit log, newest first: who, from where, when, what, and the diff.
#[must_use]
pub fn audit(entries: &[AuditEntry], key_id: Option<&str>) -> String {
    let mut out = String::from("<h1>Audit</h1>");
    if let Some(k) = key_id {
        let _ = write!(
            out,
            "<p>Changes of <a href=\"/keys/{}\"><code>{}</code></a>. <a href=\"/audit\">All changes</a></p>",
            encode(k),
            esc(k)
        );
    }
    out.push_str("<ol id=\"audit\" class=\"audit\" reversed>");
    for e in entries.iter().rev().take(PAGE_ROWS) {
        let _ = write!(
            out,
            "<li class=\"audit-row\" data-action=\"{action}\"><p><strong>{action}</strong> {key} by <code>{who}</code> from <code>{from}</code> at {at}</p>{diff}</li>",
            action = esc(&e.action),
            key = if e.key_id.is_empty() {
                String::new()
            } else {
                format!(
                    "<a href=\"/keys/{}\"><code>{}</code></a>",
                    encode(&e.key_id),
                    esc(&e.key_id)
                )
            },
            who = esc(&e.principal),
            from = esc(&e.address.to_string()),
            at = time(e.at),
            diff = if e.before.is_some() || e.after.is_some() {
                diff(e.before.as_ref(), e.after.as_ref())
            } else {
                String::new()
            },
        );
    }
    out.push_str("</ol>");
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn fleet_enforcement_survives_the_redirect_and_names_the_lagging_hosts() {
        let e = Enforcement {
            applied: 2,
            hosts: 3,
            lagging: vec!["gw-c&<b>".to_owned()],
        };
        let q = enforcement_query(Some(&e));
        let back = enforcement_of(&Form::parse(format!("done=saved{q}").as_bytes()));
        assert_eq!(back.as_ref(), Some(&e));
        let html = enforcement(back.as_ref());
        assert!(html.contains("In force on 2 of 3 live hosts."), "{html}");
        assert!(
            html.contains("gw-c&amp;&lt;b&gt;"),
            "host names are escaped: {html}"
        );
        // A single-host store says nothing, and a forged query with no
        // numbers says nothing either.
        assert_eq!(enforcement(None), "");
        assert_eq!(enforcement_query(None), "");
        assert_eq!(
            enforcement_of(&Form::parse(b"done=saved&applied=x&hosts=3")),
            None
        );
        let all = Enforcement {
            applied: 3,
            hosts: 3,
            lagging: vec![],
        };
        assert!(!enforcement(Some(&all)).contains("lagging"));
    }

    use std::time::{Duration, Instant};

    use super::*;
    use crate::keys::testing::key;

    fn rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                key: Arc::new(Key {
                    name: format!("key <{i}>"),
                    tenant: format!("t{}", i % 7),
                    ..key(
                        &format!("k{i}"),
                        &format!("secret-{i:020}"),
                        "192.0.2.0/24, 198.51.100.7, 2001:db8::/48, 203.0.113.9",
                    )
                }),
                source: "api",
                revoked: i % 10 == 0,
                last_used: None,
            })
            .collect()
    }

    #[test]
    fn keys_table_filters_escapes_and_renders_10k_keys_quickly() {
        let all = rows(10_000);
        let now = SystemTime::now();
        let started = Instant::now();
        let page = keys(&all, &Form::default(), now);
        let took = started.elapsed();
        eprintln!(
            "keys page, 10,000 keys ({PAGE_ROWS} rows shown): {took:?}, {} bytes",
            page.len()
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(page.contains("10000 of 10000 keys, the first 500 shown"));
        assert!(page.contains("key &lt;1&gt;") && !page.contains("key <1>"));
        assert!(page.contains("192.0.2.0/24, 198.51.100.7, 203.0.113.9 and 1 more"));
        let q = Form::parse(b"q=k99&tenant=t1&status=active");
        let page = keys(&all, &q, now);
        // k99, k990..k999, k9900..k9999 in tenant t1 and active.
        let expected = all
            .iter()
            .filter(|r| r.id.contains("k99") && r.tenant == "t1" && !r.revoked)
            .count();
        assert!(
            page.contains(&format!("{expected} of 10000 keys")),
            "{expected}"
        );
    }

    #[test]
    fn text_field_forms() {
        assert_eq!(raw_from_text("a, b\nc"), RawList::One("a, b\nc".into()));
        let RawList::Many(v) = raw_from_text(
            "192.0.2.1, 192.0.2.2\n{\"cidr\": \"203.0.113.0/24\", \"note\": \"office\"}\n{bad",
        ) else {
            panic!("object lines make a list of entries")
        };
        assert_eq!(v.len(), 4);
        assert!(matches!(&v[2], RawEntry::Object { note: Some(n), .. } if n == "office"));
        assert_eq!(
            v[3],
            RawEntry::Text("{bad".into()),
            "reported as a bad entry"
        );
        assert!(matches!(
            raw_from_text(" [\"192.0.2.1\"] "),
            RawList::Many(_)
        ));
    }

    #[test]
    fn editor_posts_become_lists() {
        let f = Form::parse(
            b"rows=3&cidr.0=192.0.2.1&note.0=a&cidr.1=192.0.2.2&remove.1=on&cidr.2=&add=198.51.100.0%2F24",
        );
        let list = edited_list(&f).unwrap();
        let nets: Vec<String> = list.entries().iter().map(|e| e.net.to_string()).collect();
        assert_eq!(nets, ["192.0.2.1/32", "198.51.100.0/24"]);
        let bad = Form::parse(b"rows=1&cidr.0=10.0.0.5/8&add=host.example");
        let p = edited_list(&bad).unwrap_err();
        assert_eq!(p.entries.len(), 2, "{p:?}");
        assert!(p.entries[0].contains("did you mean 10.0.0.0/8?"));
        assert!(p.entries[1].contains("hostnames"));
        let before = list.clone();
        let after = with_added(&before, "2001:db8::/64", "").unwrap();
        let preview = Preview::of(&before, &after, SystemTime::now()).render();
        assert!(preview.contains("+ 2001:db8::/64"), "{preview}");
        assert!(
            preview.contains("257 IPv4 and 2^64 IPv6 addresses"),
            "{preview}"
        );
        assert!(
            with_added(&after, "2001:db8::/64", "").is_err(),
            "already there"
        );
    }

    #[test]
    fn audit_diff_and_chart() {
        let d = diff(
            Some(
                &serde_json::json!({"name": "a", "ip_allow_list": ["192.0.2.1", {"cidr": "192.0.2.2", "note": "n"}]}),
            ),
            Some(&serde_json::json!({"name": "b", "ip_allow_list": ["192.0.2.1", "192.0.2.3"]})),
        );
        assert!(
            d.contains("name: &quot;a&quot; \u{2192} &quot;b&quot;"),
            "{d}"
        );
        assert!(d.contains("\u{2212} 192.0.2.2 (n)"), "{d}");
        assert!(d.contains("+ 192.0.2.3"), "{d}");
        let mut minutes = vec![(0, 0); 60];
        minutes[59] = (3, 1);
        let svg = activity(&minutes);
        assert!(svg.contains("3 allowed, 1 refused"));
        assert_eq!(svg.matches("<rect").count(), 2);
    }
}

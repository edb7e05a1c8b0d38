//! Durable key storage (SPEC §2 `store`, §6).
//!
//! Keys made through the management API live here: metadata, the SHA-256 of the
//! secret (never the secret), the allow list, and an audit row for every change,
//! written in the same transaction as the change. The audit sequence numbers
//! make a change feed: the daemon reads every key once at start
//! ([`KeyStore::snapshot`]) and then applies what [`KeyStore::changes`]
//! reports, whoever wrote it (its own API, or another writer of the store).
//!
//! [`KeyStore`] is the async seam for backends, [`open`] the factory that
//! picks one from the config; [`embedded::Embedded`] (the SQLite file of
//! [`sqlite::SqliteStore`] and its WAL checkpoints) is the default,
//! [`postgres::PgStore`] the fleet's shared database ([`fleet::Fleet`]).

pub mod embedded;
pub mod fleet;
pub mod postgres;
pub mod sqlite;

use std::{net::IpAddr, ops::Deref, sync::Arc, time::SystemTime};

use serde_json::Value;

use crate::{
    allowlist::{AllowEntry, AllowList},
    keys::{Digest, Key},
};

/// Who made a change, as recorded in the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// `admin:NAME` for a config principal, `key:ID` for an admin-scoped key.
    pub principal: String,
    pub address: IpAddr,
}

/// Fields of a key to change; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub allow: Option<AllowList>,
    pub report_only: Option<bool>,
}

/// A key as stored: the key's facts (shared with the shim's table, the
/// principals and the policy) and the store's own timestamps. Reads of the
/// facts go through `Deref` (`stored.allow`); a change builds a new [`Key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    pub key: Arc<Key>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub last_used_at: Option<SystemTime>,
    pub revoked_at: Option<SystemTime>,
}

impl Deref for StoredKey {
    type Target = Key;

    fn deref(&self) -> &Key {
        &self.key
    }
}

impl StoredKey {
    /// The key's facts, to change (copied first when they are shared).
    pub fn key_mut(&mut self) -> &mut Key {
        Arc::make_mut(&mut self.key)
    }

    #[must_use]
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }

    /// The key as the API and the audit log show it: everything but the digest.
    #[must_use]
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.view(None)).expect("a key serializes")
    }

    /// The same, written straight to text or a response (no `Value` tree:
    /// a 1,000-entry list is written on every change, twice for the audit).
    /// `source` adds that field (`api` in API answers).
    #[must_use]
    pub fn view(&self, source: Option<&'static str>) -> KeyView<'_> {
        KeyView {
            key: &self.key,
            stored: Some(self),
            source,
            enforcement: None,
            secret: None,
        }
    }
}

/// See [`StoredKey::view`] and [`KeyView::of_static`]. Fields in the order
/// `to_json` has always had (sorted), so stored audit rows and answers read
/// the same as before.
pub struct KeyView<'a> {
    key: &'a Key,
    /// The timestamps; `None` (all null) for a key of the config.
    stored: Option<&'a StoredKey>,
    source: Option<&'static str>,
    /// A write's answer: how far the fleet enforces it, in its sorted place.
    enforcement: Option<&'a fleet::Enforcement>,
    /// A create's or rotation's answer: the new secret, shown this once.
    secret: Option<&'a str>,
}

impl<'a> KeyView<'a> {
    /// A key of the config as the API shows it: `source` `config`, no timestamps.
    #[must_use]
    pub fn of_static(key: &'a Key) -> Self {
        Self {
            key,
            stored: None,
            source: Some(key.origin.label()),
            enforcement: None,
            secret: None,
        }
    }

    /// The view as a write answers it: with `enforcement` and `secret`
    /// fields when given (serialized straight to the answer, not through a
    /// `Value`: a long list is formatted once).
    #[must_use]
    pub fn answering(
        self,
        enforcement: Option<&'a fleet::Enforcement>,
        secret: Option<&'a str>,
    ) -> Self {
        Self {
            enforcement,
            secret,
            ..self
        }
    }
}

struct Time(SystemTime);

impl serde::Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(self.0))
    }
}

struct ListView<'a>(&'a AllowList);

impl serde::Serialize for ListView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap as _, SerializeSeq as _};
        struct Entry<'e>(&'e AllowEntry);
        impl serde::Serialize for Entry<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let e = self.0;
                if e.note.is_none() && e.expires_at.is_none() {
                    return s.collect_str(&e.net);
                }
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("cidr", &e.net.to_string())?;
                if let Some(t) = e.expires_at {
                    m.serialize_entry("expires_at", &Time(t))?;
                }
                if let Some(note) = &e.note {
                    m.serialize_entry("note", note)?;
                }
                m.end()
            }
        }
        let entries = self.0.entries();
        let mut seq = s.serialize_seq(Some(entries.len()))?;
        for e in &entries {
            seq.serialize_element(&Entry(e))?;
        }
        seq.end()
    }
}

impl serde::Serialize for KeyView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let k = self.key;
        let time = |t: fn(&StoredKey) -> Option<SystemTime>| self.stored.and_then(t).map(Time);
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("created_at", &time(|s| Some(s.created_at)))?;
        if let Some(enforcement) = self.enforcement {
            m.serialize_entry("enforcement", enforcement)?;
        }
        m.serialize_entry("id", &k.id)?;
        m.serialize_entry("ip_allow_list", &ListView(&k.allow))?;
        m.serialize_entry("last_used_at", &time(|s| s.last_used_at))?;
        m.serialize_entry("name", &k.name)?;
        m.serialize_entry("report_only", &k.report_only)?;
        m.serialize_entry("revoked_at", &time(|s| s.revoked_at))?;
        m.serialize_entry("scopes", &k.scopes)?;
        if let Some(secret) = self.secret {
            m.serialize_entry("secret", secret)?;
        }
        if let Some(source) = self.source {
            m.serialize_entry("source", source)?;
        }
        m.serialize_entry("tenant", &k.tenant)?;
        m.serialize_entry("updated_at", &time(|s| Some(s.updated_at)))?;
        m.end()
    }
}

/// One audit row: who changed which key, from where, and the key before and after.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    /// Increasing; page with `after`.
    pub seq: i64,
    pub at: SystemTime,
    pub principal: String,
    pub address: IpAddr,
    /// `create`, `update`, `revoke` or `rotate`; `lockout` for an
    /// [`AuditEvent`] (empty `key_id`, details in `after`).
    pub action: String,
    pub key_id: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown key id {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("key {0} is revoked")]
    Revoked(String),
    #[error(
        "the store's schema is version {found}, newer than this keyfence knows ({known}): \
         upgrade keyfence or restore a backup"
    )]
    Newer { found: i64, known: i64 },
    #[error("the store is damaged: {0}")]
    Corrupt(String),
    /// The disk (or the file's size limit) has no room for the write: SQLite's
    /// `SQLITE_FULL`, or an I/O error while the store's file system has no
    /// free space. The transaction was rolled back; reads keep working.
    #[error("the key store is full: {0}")]
    Full(String),
    /// The backend failed (a driver or database error): its message, for
    /// the log; the API answers 500.
    #[error("{0}")]
    Backend(String),
    /// An I/O failure of the backend (reading or writing its files).
    #[error("{0}")]
    Io(String),
    /// A networked store did not answer (down, unreachable, timed out):
    /// nothing was changed; the API answers 503 and enforcement goes on
    /// from memory.
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    /// The store's directory or files are not the agent's alone.
    #[error(transparent)]
    Unsafe(#[from] crate::fsguard::FsGuardError),
}

/// An audit row that is not a key change (a management lockout). It is
/// stored with an empty `key_id`, no `before`, and `details` as `after`, so
/// one key's history (`key_id = …`) never includes it.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    pub principal: String,
    pub address: IpAddr,
    pub action: &'static str,
    pub details: Value,
}

/// One key write. A backend makes it in one transaction together with its
/// audit row: it commits whole (and is durable when the call returns) or
/// changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyWrite {
    /// Store a new key (its origin is [`Origin::Store`](crate::keys::Origin)).
    Create(Key),
    /// Returns the key after the patch.
    Update {
        id: String,
        patch: KeyPatch,
    },
    Revoke {
        id: String,
    },
    /// Replace the secret's digest; id, list and everything else stay.
    Rotate {
        id: String,
        digest: Digest,
    },
}

impl KeyWrite {
    /// The audit row's `action`.
    #[must_use]
    pub fn action(&self) -> &'static str {
        match self {
            KeyWrite::Create(_) => "create",
            KeyWrite::Update { .. } => "update",
            KeyWrite::Revoke { .. } => "revoke",
            KeyWrite::Rotate { .. } => "rotate",
        }
    }
}

/// A write the store committed: the key after it, and the sequence number of
/// its audit row (its place in the change feed, [`KeyStore::changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub key: StoredKey,
    pub seq: i64,
}

/// The store's change feed from one point: every key some write changed
/// (whoever wrote it), in its state as of `upto`, the highest sequence number
/// read. Reading again from `upto` continues the feed; a key changed twice
/// appears once, in its later state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upto: i64,
    pub keys: Vec<StoredKey>,
}

/// What a [`KeyStore`] call returns: a future that may wait for the disk
/// or the network, so callers never block the runtime on it.
pub type StoreFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Durable key storage, shared by the management API (reads and writes) and
/// the daemon (the change feed, last use). Another writer of the same store
/// (another host, another process) is seen through [`KeyStore::changes`].
pub trait KeyStore: Send + Sync {
    /// All keys, revoked ones included, oldest first.
    fn keys(&self) -> StoreFuture<'_, Vec<StoredKey>>;
    fn key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, StoredKey>;
    /// Make `write` with its audit row (one transaction).
    fn write<'a>(
        &'a self,
        write: KeyWrite,
        actor: &'a Actor,
        now: SystemTime,
    ) -> StoreFuture<'a, Committed>;
    /// Audit rows with `seq > after` (of one key, when given), oldest first,
    /// at most `limit`.
    fn audit<'a>(
        &'a self,
        after: i64,
        limit: usize,
        key_id: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<AuditEntry>>;
    /// Write an audit row for `event` (its own transaction).
    fn record_event<'a>(&'a self, event: &'a AuditEvent, now: SystemTime) -> StoreFuture<'a, ()>;
    /// Record when keys were last used (not audited: it is not a change).
    fn touch_last_used<'a>(&'a self, used: &'a [(String, SystemTime)]) -> StoreFuture<'a, ()>;
    /// Every key and the feed's current position, read at one instant: where
    /// a reader of [`KeyStore::changes`] starts.
    fn snapshot(&self) -> StoreFuture<'_, Changes>;
    /// The keys changed by writes after `after_seq` (see [`Changes`]).
    fn changes(&self, after_seq: i64) -> StoreFuture<'_, Changes>;
    /// The fleet calls of a store shared by several hosts; `None` for a
    /// host's own store.
    fn fleet(&self) -> Option<&dyn fleet::Fleet> {
        None
    }
}

/// The store, shared by the API and the daemon.
pub type SharedStore = std::sync::Arc<dyn KeyStore>;

/// Open the store the config names: PostgreSQL with `store.postgres`
/// (connected and migrated), else the embedded SQLite file at `store.path`.
/// Must run inside the runtime: a backend starts its own tasks
/// (checkpoints, the notification connection).
pub async fn open(
    config: &crate::config::StoreConfig,
    fleet: &crate::config::FleetConfig,
) -> Result<SharedStore, StoreError> {
    if let Some(pg) = &config.postgres {
        return Ok(std::sync::Arc::new(
            postgres::PgStore::open(pg, fleet).await?,
        ));
    }
    Ok(std::sync::Arc::new(embedded::Embedded::open(&config.path)?))
}

/// RFC 3339, seconds.
#[must_use]
pub fn time_json(t: SystemTime) -> Value {
    Value::String(humantime::format_rfc3339_seconds(t).to_string())
}

/// An entry as the API shows it: a string, or an object when it has a note or
/// an expiry.
#[must_use]
pub fn entry_json(e: &AllowEntry) -> Value {
    if e.note.is_none() && e.expires_at.is_none() {
        return Value::String(e.net.to_string());
    }
    let mut o = serde_json::Map::new();
    o.insert("cidr".into(), Value::String(e.net.to_string()));
    if let Some(note) = &e.note {
        o.insert("note".into(), Value::String(note.clone()));
    }
    if let Some(t) = e.expires_at {
        o.insert("expires_at".into(), time_json(t));
    }
    Value::Object(o)
}

#[must_use]
pub fn list_json(list: &AllowList) -> Value {
    Value::Array(list.entries().iter().map(entry_json).collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::keys::Origin;

    /// The `Value` tree `to_json` built before it serialized directly.
    fn reference(k: &StoredKey) -> Value {
        json!({
            "id": k.id,
            "name": k.name,
            "tenant": k.tenant,
            "scopes": k.scopes,
            "ip_allow_list": list_json(&k.allow),
            "report_only": k.report_only,
            "created_at": time_json(k.created_at),
            "updated_at": time_json(k.updated_at),
            "last_used_at": k.last_used_at.map_or(Value::Null, time_json),
            "revoked_at": k.revoked_at.map_or(Value::Null, time_json),
        })
    }

    #[test]
    fn direct_serialization_matches_the_value_tree() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let mut k = StoredKey {
            key: Arc::new(Key {
                id: "key_1".into(),
                name: "ci \"runner\"".into(),
                tenant: "default".into(),
                scopes: crate::keys::Scopes::API.with(crate::keys::Scopes::ADMIN),
                digest: [7; 32],
                origin: Origin::Store,
                allow: AllowList::from_canonical(vec![
                    AllowEntry {
                        net: "192.0.2.0/24".parse().unwrap(),
                        note: None,
                        expires_at: None,
                    },
                    AllowEntry {
                        net: "2001:db8::/48".parse().unwrap(),
                        note: Some("office\nwifi".into()),
                        expires_at: Some(t(1_800_000_000)),
                    },
                    AllowEntry {
                        net: "198.51.100.7/32".parse().unwrap(),
                        note: None,
                        expires_at: Some(t(1_800_000_100)),
                    },
                ]),
                report_only: false,
            }),
            created_at: t(1_700_000_000),
            updated_at: t(1_700_000_500),
            last_used_at: None,
            revoked_at: None,
        };
        assert_eq!(k.to_json(), reference(&k));
        let text = serde_json::to_string(&k.view(None)).unwrap();
        assert_eq!(text, reference(&k).to_string(), "same text, same order");
        k.last_used_at = Some(t(1_700_000_900));
        k.revoked_at = Some(t(1_700_001_000));
        k.key_mut().report_only = true;
        k.key_mut().allow = AllowList::default();
        assert_eq!(
            serde_json::to_string(&k.view(None)).unwrap(),
            reference(&k).to_string()
        );
        let mut with_source = reference(&k);
        with_source["source"] = json!("api");
        assert_eq!(
            serde_json::to_string(&k.view(Some("api"))).unwrap(),
            with_source.to_string()
        );
        // A write's answer: what inserting into the `Value` gave, in order.
        let enforcement = fleet::Enforcement {
            applied: 2,
            hosts: 3,
            lagging: vec!["gw-3".into()],
        };
        let mut answer = with_source.clone();
        answer["enforcement"] = serde_json::to_value(&enforcement).unwrap();
        answer["secret"] = json!("kf_live_0123");
        assert_eq!(
            serde_json::to_string(
                &k.view(Some("api"))
                    .answering(Some(&enforcement), Some("kf_live_0123"))
            )
            .unwrap(),
            answer.to_string()
        );
        assert_eq!(
            serde_json::to_string(&k.view(Some("api")).answering(None, None)).unwrap(),
            with_source.to_string(),
            "no extra fields unless given"
        );
    }
}

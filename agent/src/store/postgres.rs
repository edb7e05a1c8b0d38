//! Fleet mode's store (SPEC §2 `store.postgres`, §10): one PostgreSQL
//! database shared by every gateway host, through tokio-postgres and a
//! deadpool pool, TLS by rustls when a CA file is given.
//!
//! The same rows and rules as the SQLite store (`sqlite.rs`): times in Unix
//! milliseconds, allow-list entries canonical and one row each, secrets only
//! as SHA-256, every change written with its audit row in one transaction.
//! What the fleet adds:
//!
//! - **Ordered sequence numbers.** Every write takes the transaction-scoped
//!   advisory lock [`FEED_LOCK`] before it numbers its audit row (`max + 1`),
//!   so numbers are given in commit order and a reader that sees `n` has
//!   seen everything below it: the feed never skips a change committed late.
//! - **Notifications.** The write `NOTIFY`s [`CHANGES`] with its number in
//!   the same transaction (delivered on commit); each agent `LISTEN`s on a
//!   connection of its own ([`listen`]), reconnecting with back-off, and the
//!   daemon polls the feed as a safety net.
//! - **Hosts.** `hosts` holds each agent's applied sequence and heartbeat
//!   (by the database's clock, so host clocks need not agree); a report
//!   `NOTIFY`s [`APPLIED`], which wakes writers waiting for the fleet.
//! - **Fail static.** Every call has a deadline; a database that does not
//!   answer is [`StoreError::Unavailable`] (the API answers 503), reads of
//!   keys answer from the copy of the last state this store read.
//!
//! Migrations are versioned and forward-only, run under the session advisory
//! lock [`MIGRATE_LOCK`] (two agents starting together migrate once), and
//! each names the oldest schema an agent may know and still run against it,
//! so an older agent keeps working through a rolling upgrade that only adds.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    net::IpAddr,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Row, Transaction, error::SqlState, types::ToSql};

use super::{
    Actor, AuditEntry, AuditEvent, Changes, Committed, KeyPatch, KeyStore, KeyWrite, StoreError,
    StoreFuture, StoredKey,
    fleet::{Enforcement, Fleet, FleetStatus, HostStatus},
    sqlite::{from_millis, millis, to_entry},
};
use crate::{
    allowlist::{AllowEntry, AllowList},
    config::{FleetConfig, PostgresConfig},
    keys::{Key, Origin},
    shim::sources::{SharedSource, SourceDelta},
};

/// One schema step: its SQL, and the oldest schema version an agent may
/// know and still run against a database that has this step (an additive
/// step keeps 1: older agents ignore what they do not know).
struct Migration {
    sql: &'static str,
    readers_from: i32,
}

/// Append only: a released step is never edited.
const MIGRATIONS: &[Migration] = &[
    Migration {
        // 1: keys, entries, audit (as SQLite's), hosts, the shared step-up guard.
        sql: "CREATE TABLE keys (
            id            text PRIMARY KEY,
            name          text NOT NULL,
            tenant        text NOT NULL,
            scopes        text NOT NULL,
            secret_sha256 bytea NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
            report_only   boolean NOT NULL,
            created_at    bigint NOT NULL,
            updated_at    bigint NOT NULL,
            last_used_at  bigint,
            revoked_at    bigint,
            position      bigserial NOT NULL
        );
        CREATE TABLE allow_entries (
            key_id     text NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
            cidr       text NOT NULL,
            note       text,
            expires_at bigint,
            PRIMARY KEY (key_id, cidr)
        );
        CREATE TABLE audit (
            seq       bigint PRIMARY KEY,
            at        bigint NOT NULL,
            principal text NOT NULL,
            address   text NOT NULL,
            action    text NOT NULL,
            key_id    text NOT NULL,
            before    text,
            after     text,
            host_id   text NOT NULL DEFAULT ''
        );
        CREATE INDEX audit_by_key ON audit (key_id, seq);
        CREATE TABLE hosts (
            host_id          text PRIMARY KEY,
            version          text NOT NULL,
            applied_sequence bigint NOT NULL,
            heartbeat        timestamptz NOT NULL,
            started_at       timestamptz NOT NULL
        );
        CREATE TABLE confirm_steps (
            id        integer PRIMARY KEY CHECK (id = 1),
            last_step bigint NOT NULL
        );",
        readers_from: 1,
    },
    Migration {
        // 2: per-key sources, one row per (key, address, host) (additive).
        sql: "CREATE TABLE key_sources (
            key_id    text NOT NULL,
            ip        text NOT NULL,
            host_id   text NOT NULL,
            allowed   bigint NOT NULL,
            refused   bigint NOT NULL,
            last_seen bigint NOT NULL,
            PRIMARY KEY (key_id, ip, host_id)
        );",
        readers_from: 1,
    },
];

/// The schema version this build writes.
#[expect(clippy::cast_possible_wrap, reason = "a handful of migrations")]
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Session advisory lock held while migrating.
const MIGRATE_LOCK: i64 = 0x6b66_6d69_6772_0001;
/// Transaction advisory lock every numbered write holds (commit order =
/// sequence order).
const FEED_LOCK: i64 = 0x6b66_6665_6564_0001;

/// A transaction that holds [`FEED_LOCK`]: every write that numbers a feed
/// row starts here, so sequence numbers follow commit order.
async fn feed_transaction(
    client: &mut tokio_postgres::Client,
) -> Result<Transaction<'_>, StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FEED_LOCK])
        .await
        .map_err(pg_err)?;
    Ok(tx)
}
/// `NOTIFY` channel of committed changes (payload: the sequence number).
pub const CHANGES: &str = "keyfence_changes";
/// `NOTIFY` channel of hosts' reports (payload: host id).
pub const APPLIED: &str = "keyfence_applied";

/// Every call's deadline: past it the database counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the notification connection checks that it is alive.
const LISTEN_CHECK: Duration = Duration::from_secs(2);
/// Reconnect back-off of the notification connection.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// While a write waits for the fleet, the hosts are read again at least this often.
const WAIT_RECHECK: Duration = Duration::from_millis(50);

const KEY_COLUMNS: &str = "id, name, tenant, scopes, secret_sha256, report_only, \
                           created_at, updated_at, last_used_at, revoked_at";

/// A TLS connector of either kind, so one pool type serves both.
#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

pub struct PgStore {
    pool: Pool,
    host_id: String,
    live_after: Duration,
    up: Arc<AtomicBool>,
    changed: Arc<Notify>,
    applied: Arc<Notify>,
    /// The keys as this store last read or wrote them: what reads answer
    /// while the database is away.
    cache: RwLock<BTreeMap<String, StoredKey>>,
    listener: tokio::task::AbortHandle,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// The driver's errors end here. No answer from the server (connection
/// refused, closed, timed out) is [`StoreError::Unavailable`]; a
/// uniqueness violation is a conflict; anything the server said otherwise
/// is a backend error.
#[expect(
    clippy::needless_pass_by_value,
    reason = "used as `map_err(pg_err)` on every call"
)]
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::UNIQUE_VIOLATION => {
            StoreError::Conflict("a key with this id or secret exists".into())
        }
        Some(db)
            if [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::CONNECTION_FAILURE,
                SqlState::TOO_MANY_CONNECTIONS,
            ]
            .contains(db.code()) =>
        {
            StoreError::Unavailable(db.to_string())
        }
        Some(db) => StoreError::Backend(db.to_string()),
        None => StoreError::Unavailable(e.to_string()),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A column, or the store is damaged.
fn col<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|e| corrupt(format!("column {i}: {e}")))
}

/// The connection settings: the URL, plus deadlines so that a database that
/// vanishes (a cut network drops packets silently) is noticed in seconds.
fn pg_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Backend(format!("store.postgres.url: {e}")))?;
    config
        .connect_timeout(CALL_TIMEOUT)
        .tcp_user_timeout(CALL_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(2))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3);
    if config.get_application_name().is_none() {
        config.application_name("keyfence");
    }
    Ok(config)
}

/// rustls with the CA certificates of `ca_file` as the only roots.
fn tls(ca_file: Option<&std::path::Path>) -> Result<Tls, StoreError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    use tokio_rustls::rustls;
    let Some(path) = ca_file else {
        return Ok(Tls::Plain);
    };
    let bad = |e: &dyn std::fmt::Display| {
        StoreError::Io(format!("store.postgres.ca_file {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in the file"));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
        config,
    )))
}

impl PgStore {
    /// Connect, migrate, start listening for changes.
    pub async fn open(config: &PostgresConfig, fleet: &FleetConfig) -> Result<Self, StoreError> {
        let url = config.url.resolve().map_err(StoreError::Backend)?;
        let pg = pg_config(&url)?;
        let tls = tls(config.ca_file.as_deref())?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        };
        let manager = match &tls {
            Tls::Plain => Manager::from_config(pg.clone(), tokio_postgres::NoTls, manager_config),
            Tls::Rustls(t) => Manager::from_config(pg.clone(), t.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CALL_TIMEOUT))
            .create_timeout(Some(CALL_TIMEOUT))
            .recycle_timeout(Some(CALL_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut client = timeout(pool.get()).await?.map_err(pool_err)?;
        migrate(&mut client, MIGRATIONS).await?;
        drop(client);
        let up = Arc::new(AtomicBool::new(true));
        let changed = Arc::new(Notify::new());
        let applied = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(
            pg,
            tls,
            up.clone(),
            changed.clone(),
            applied.clone(),
        ))
        .abort_handle();
        Ok(Self {
            pool,
            host_id: config.host_id.clone(),
            live_after: fleet.live_after,
            up,
            changed,
            applied,
            cache: RwLock::new(BTreeMap::new()),
            listener,
        })
    }

    /// Run `f` with the deadline, noting whether the database answered.
    fn call<'a, T: Send + 'a>(
        &'a self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        Box::pin(async move {
            let result = timeout(f).await.and_then(|r| r);
            match &result {
                Err(StoreError::Unavailable(why)) => {
                    if self.up.swap(false, Ordering::AcqRel) {
                        tracing::error!(
                            error = why,
                            "the key store is unreachable: enforcing the last state"
                        );
                    }
                }
                _ => {
                    if !self.up.swap(true, Ordering::AcqRel) {
                        tracing::info!("the key store answers again");
                    }
                }
            }
            result
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    fn remember<'k>(&self, keys: impl IntoIterator<Item = &'k StoredKey>) {
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        for k in keys {
            cache.insert(k.id.clone(), k.clone());
        }
    }

    /// The keys as last read, oldest first (reads while the database is away).
    fn cached_keys(&self) -> Vec<StoredKey> {
        let mut keys: Vec<StoredKey> = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        keys.sort_by_key(|k| k.created_at);
        keys
    }

    async fn commit(
        &self,
        write: KeyWrite,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<Committed, StoreError> {
        let mut obj = self.client().await?;
        let tx = feed_transaction(&mut obj).await?;
        let action = write.action();
        let (before, key) = match write {
            KeyWrite::Create(new) => {
                insert_key(&tx, &new, now).await?;
                (None, load(&tx, &new.id, false).await?)
            }
            KeyWrite::Update { id, patch } => {
                let before = load_active(&tx, &id).await?;
                let after = patch_key(&tx, &before, patch, now).await?;
                (Some(before), after)
            }
            KeyWrite::Revoke { id } => {
                let before = load_active(&tx, &id).await?;
                // Its sources go with it, as they do from every host's memory.
                tx.execute("DELETE FROM key_sources WHERE key_id = $1", &[&id])
                    .await
                    .map_err(pg_err)?;
                tx.execute(
                    "UPDATE keys SET revoked_at = $2, updated_at = $2 WHERE id = $1",
                    &[&id, &millis(now)],
                )
                .await
                .map_err(pg_err)?;
                (Some(before), load(&tx, &id, false).await?)
            }
            KeyWrite::Rotate { id, digest } => {
                let before = load_active(&tx, &id).await?;
                tx.execute(
                    "UPDATE keys SET secret_sha256 = $2, updated_at = $3 WHERE id = $1",
                    &[&id, &digest.as_slice(), &millis(now)],
                )
                .await
                .map_err(pg_err)?;
                (Some(before), load(&tx, &id, false).await?)
            }
        };
        let row = AuditRow {
            at: now,
            principal: &actor.principal,
            address: actor.address,
            action,
            key_id: &key.id,
            before: before.as_ref().map(json_of),
            after: Some(json_of(&key)),
        };
        let seq = self.audit_row(&tx, &row).await?;
        tx.commit().await.map_err(pg_err)?;
        self.remember([&key]);
        Ok(Committed { key, seq })
    }

    /// Number and insert an audit row (the caller holds [`FEED_LOCK`]) and
    /// announce it on commit.
    async fn audit_row(&self, tx: &Transaction<'_>, row: &AuditRow<'_>) -> Result<i64, StoreError> {
        let seq: i64 = col(
            &tx.query_one(
                "INSERT INTO audit (seq, at, principal, address, action, key_id, before, after, host_id)
                 SELECT coalesce(max(seq), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8 FROM audit
                 RETURNING seq",
                &[
                    &millis(row.at),
                    &row.principal,
                    &row.address.to_string(),
                    &row.action,
                    &row.key_id,
                    &row.before,
                    &row.after,
                    &self.host_id,
                ],
            )
            .await
            .map_err(pg_err)?,
            0,
        )?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES, &seq.to_string()])
            .await
            .map_err(pg_err)?;
        Ok(seq)
    }

    /// Every key and the head, in one snapshot.
    async fn read_snapshot(&self) -> Result<Changes, StoreError> {
        let mut obj = self.client().await?;
        let client: &mut tokio_postgres::Client = &mut obj;
        let tx = read_tx(client).await?;
        let upto = head(&tx).await?;
        let rows = tx
            .query(
                &format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY position"),
                &[],
            )
            .await
            .map_err(pg_err)?;
        let mut keys = rows.iter().map(key_row).collect::<Result<Vec<_>, _>>()?;
        let mut entries: HashMap<String, Vec<AllowEntry>> = HashMap::new();
        for row in tx
            .query(
                "SELECT key_id, cidr, note, expires_at FROM allow_entries",
                &[],
            )
            .await
            .map_err(pg_err)?
        {
            let (id, entry) = entry_row(&row)?;
            entries.entry(id).or_default().push(entry);
        }
        tx.commit().await.map_err(pg_err)?;
        for k in &mut keys {
            k.key_mut().allow =
                AllowList::from_canonical(entries.remove(&k.id).unwrap_or_default());
        }
        {
            let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
            *cache = keys.iter().map(|k| (k.id.clone(), k.clone())).collect();
        }
        Ok(Changes { upto, keys })
    }

    async fn read_changes(&self, after_seq: i64) -> Result<Changes, StoreError> {
        let mut obj = self.client().await?;
        let client: &mut tokio_postgres::Client = &mut obj;
        let tx = read_tx(client).await?;
        let upto = head(&tx).await?;
        let mut keys = Vec::new();
        if upto > after_seq {
            let ids: Vec<String> = tx
                .query(
                    "SELECT key_id FROM audit WHERE seq > $1 AND key_id <> ''
                     GROUP BY key_id ORDER BY min(seq)",
                    &[&after_seq],
                )
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| col(r, 0))
                .collect::<Result<_, _>>()?;
            let mut found = load_many(&tx, &ids).await?;
            // Keys are never deleted; a row naming none is not ours to apply.
            keys = ids.iter().filter_map(|id| found.remove(id)).collect();
        }
        tx.commit().await.map_err(pg_err)?;
        self.remember(&keys);
        Ok(Changes { upto, keys })
    }

    async fn read_key(&self, id: &str) -> Result<StoredKey, StoreError> {
        let mut obj = self.client().await?;
        let client: &mut tokio_postgres::Client = &mut obj;
        let tx = read_tx(client).await?;
        let key = load(&tx, id, false).await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(key)
    }

    async fn read_audit(
        &self,
        after: i64,
        limit: usize,
        key_id: Option<&str>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let obj = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = obj
            .query(
                "SELECT seq, at, principal, address, action, key_id, before, after FROM audit
                 WHERE seq > $1 AND ($2::text IS NULL OR key_id = $2)
                 ORDER BY seq LIMIT $3",
                &[&after, &key_id, &limit],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(audit_entry).collect()
    }

    async fn event(&self, event: &AuditEvent, now: SystemTime) -> Result<(), StoreError> {
        let mut obj = self.client().await?;
        let tx = feed_transaction(&mut obj).await?;
        let row = AuditRow {
            at: now,
            principal: &event.principal,
            address: event.address,
            action: event.action,
            key_id: "",
            before: None,
            after: Some(event.details.to_string()),
        };
        self.audit_row(&tx, &row).await?;
        tx.commit().await.map_err(pg_err)
    }

    async fn touch(&self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        let obj = self.client().await?;
        let ids: Vec<&str> = used.iter().map(|(id, _)| id.as_str()).collect();
        let times: Vec<i64> = used.iter().map(|(_, t)| millis(*t)).collect();
        obj.execute(
            "UPDATE keys SET last_used_at = greatest(coalesce(keys.last_used_at, u.t), u.t)
             FROM unnest($1::text[], $2::bigint[]) AS u(id, t) WHERE keys.id = u.id",
            &[&ids, &times],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn fleet_once(&self, seq: i64) -> Result<Enforcement, StoreError> {
        let obj = self.client().await?;
        let live_ms = i64::try_from(self.live_after.as_millis()).unwrap_or(i64::MAX);
        let rows = obj
            .query(
                "SELECT host_id, applied_sequence FROM hosts
                 WHERE heartbeat > now() - $1::bigint * interval '1 millisecond'
                 ORDER BY host_id",
                &[&live_ms],
            )
            .await
            .map_err(pg_err)?;
        // This host enforced the write before anyone asks (the API waits for
        // it first), whether or not its report has landed yet.
        let mut e = Enforcement {
            applied: 1,
            hosts: 1,
            lagging: Vec::new(),
        };
        for row in &rows {
            let host: String = col(row, 0)?;
            let applied: i64 = col(row, 1)?;
            if host == self.host_id {
                continue;
            }
            e.hosts += 1;
            if applied >= seq {
                e.applied += 1;
            } else {
                e.lagging.push(host);
            }
        }
        Ok(e)
    }

    async fn wait_fleet(&self, seq: i64, wait: Duration) -> Result<Enforcement, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Armed before the read: a report landing between the read and
            // the wait still wakes us.
            let notified = self.applied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let e = self.fleet_once(seq).await?;
            if e.lagging.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(e);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(WAIT_RECHECK) => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn read_status(&self) -> Result<FleetStatus, StoreError> {
        let obj = self.client().await?;
        let live_ms = i64::try_from(self.live_after.as_millis()).unwrap_or(i64::MAX);
        let head_row = obj
            .query_one("SELECT coalesce(max(seq), 0) FROM audit", &[])
            .await
            .map_err(pg_err)?;
        let head_sequence: i64 = col(&head_row, 0)?;
        let rows = obj
            .query(
                "SELECT host_id, version, applied_sequence,
                        (extract(epoch FROM heartbeat) * 1000)::bigint,
                        extract(epoch FROM now() - heartbeat)::float8,
                        heartbeat > now() - $1::bigint * interval '1 millisecond',
                        (SELECT min(a.at) FROM audit a WHERE a.seq > h.applied_sequence)
                 FROM hosts h ORDER BY host_id",
                &[&live_ms],
            )
            .await
            .map_err(pg_err)?;
        let now = SystemTime::now();
        let mut hosts = Vec::new();
        for row in &rows {
            let waiting: Option<i64> = col(row, 6)?;
            hosts.push(HostStatus {
                host_id: col(row, 0)?,
                version: col(row, 1)?,
                applied_sequence: col(row, 2)?,
                last_heartbeat: humantime::format_rfc3339_seconds(from_millis(col(row, 3)?))
                    .to_string(),
                heartbeat_age_seconds: col::<f64>(row, 4)?.max(0.0),
                live: col(row, 5)?,
                lag_seconds: waiting.map_or(0.0, |at| {
                    super::fleet::seconds_between(from_millis(at), now)
                }),
            });
        }
        Ok(FleetStatus {
            head_sequence,
            hosts,
        })
    }

    async fn write_report(&self, applied: i64) -> Result<(), StoreError> {
        let obj = self.client().await?;
        obj.execute(
            "WITH r AS (
                INSERT INTO hosts (host_id, version, applied_sequence, heartbeat, started_at)
                VALUES ($1, $2, $3, now(), now())
                ON CONFLICT (host_id) DO UPDATE
                SET version = EXCLUDED.version, applied_sequence = EXCLUDED.applied_sequence,
                    heartbeat = EXCLUDED.heartbeat
                RETURNING host_id)
             SELECT pg_notify($4, host_id) FROM r",
            &[
                &self.host_id,
                &env!("CARGO_PKG_VERSION"),
                &applied,
                &APPLIED,
            ],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn claim(&self, step: u64) -> Result<bool, StoreError> {
        let obj = self.client().await?;
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let rows = obj
            .query(
                "INSERT INTO confirm_steps (id, last_step) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET last_step = EXCLUDED.last_step
                 WHERE confirm_steps.last_step < EXCLUDED.last_step
                 RETURNING last_step",
                &[&step],
            )
            .await
            .map_err(pg_err)?;
        Ok(!rows.is_empty())
    }

    async fn write_sources(&self, batch: &[SourceDelta], per_key: usize) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let obj = self.client().await?;
        let ids: Vec<&str> = batch.iter().map(|d| d.key_id.as_str()).collect();
        let ips: Vec<String> = batch.iter().map(|d| d.ip.to_string()).collect();
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let allowed: Vec<i64> = batch.iter().map(|d| count(d.allowed)).collect();
        let refused: Vec<i64> = batch.iter().map(|d| count(d.refused)).collect();
        let seen: Vec<i64> = batch.iter().map(|d| millis(d.last_seen)).collect();
        let params: [&(dyn ToSql + Sync); 6] =
            [&self.host_id, &ids, &ips, &allowed, &refused, &seen];
        // Sorted by (key, address) (`take_pending`): hosts flushing at once
        // lock rows in the same order.
        obj.execute(
            "INSERT INTO key_sources (key_id, ip, host_id, allowed, refused, last_seen)
             SELECT k, i, $1, a, r, s
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
                  AS u(k, i, a, r, s)
             ON CONFLICT (key_id, ip, host_id) DO UPDATE
             SET allowed = key_sources.allowed + EXCLUDED.allowed,
                 refused = key_sources.refused + EXCLUDED.refused,
                 last_seen = greatest(key_sources.last_seen, EXCLUDED.last_seen)",
            &params,
        )
        .await
        .map_err(pg_err)?;
        // The same bound as each host's memory: the `per_key` addresses of
        // a key seen most recently (by any host) stay.
        let mut touched: Vec<&str> = ids;
        touched.dedup();
        let per_key = i64::try_from(per_key).unwrap_or(i64::MAX);
        obj.execute(
            "DELETE FROM key_sources s USING (
                SELECT key_id, ip FROM (
                    SELECT key_id, ip, row_number() OVER (
                        PARTITION BY key_id ORDER BY max(last_seen) DESC, ip) AS n
                    FROM key_sources WHERE key_id = ANY($1) GROUP BY key_id, ip) r
                WHERE n > $2) old
             WHERE s.key_id = old.key_id AND s.ip = old.ip",
            &[&touched, &per_key],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn read_sources(
        &self,
        key_id: &str,
        limit: usize,
    ) -> Result<Vec<SharedSource>, StoreError> {
        let obj = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = obj
            .query(
                "SELECT ip, sum(allowed)::bigint, sum(refused)::bigint, max(last_seen),
                        array_agg(host_id ORDER BY host_id)
                 FROM key_sources WHERE key_id = $1
                 GROUP BY ip ORDER BY max(last_seen) DESC, ip LIMIT $2",
                &[&key_id, &limit],
            )
            .await
            .map_err(pg_err)?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        rows.iter()
            .map(|r| {
                let ip: String = col(r, 0)?;
                Ok(SharedSource {
                    ip: ip
                        .parse()
                        .map_err(|_| corrupt(format!("source address {ip:?}")))?,
                    allowed: count(col(r, 1)?),
                    refused: count(col(r, 2)?),
                    last_seen: from_millis(col(r, 3)?),
                    hosts: col(r, 4)?,
                })
            })
            .collect()
    }

    /// Insert keys and audit rows copied from another store (`keyfence store
    /// copy`), keeping their ids and sequence numbers; what is there already
    /// is left alone. Returns how many keys and rows were new.
    pub async fn import(
        &self,
        keys: &[StoredKey],
        audit: &[AuditEntry],
    ) -> Result<(u64, u64), StoreError> {
        let mut obj = self.client().await?;
        let tx = feed_transaction(&mut obj).await?;
        let mut new_keys = 0;
        for k in keys {
            let scopes =
                serde_json::to_string(&k.scopes).map_err(|e| StoreError::Backend(e.to_string()))?;
            let n = tx
                .execute(
                    "INSERT INTO keys (id, name, tenant, scopes, secret_sha256, report_only,
                                       created_at, updated_at, last_used_at, revoked_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (id) DO NOTHING",
                    &[
                        &k.id,
                        &k.name,
                        &k.tenant,
                        &scopes,
                        &k.digest.as_slice(),
                        &k.report_only,
                        &millis(k.created_at),
                        &millis(k.updated_at),
                        &k.last_used_at.map(millis),
                        &k.revoked_at.map(millis),
                    ],
                )
                .await
                .map_err(pg_err)?;
            if n == 1 {
                new_keys += 1;
                write_entries(&tx, &k.id, &AllowList::default(), &k.allow).await?;
            }
        }
        let mut new_rows = 0;
        for e in audit {
            new_rows += tx
                .execute(
                    "INSERT INTO audit (seq, at, principal, address, action, key_id, before, after)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (seq) DO NOTHING",
                    &[
                        &e.seq,
                        &millis(e.at),
                        &e.principal,
                        &e.address.to_string(),
                        &e.action,
                        &e.key_id,
                        &e.before.as_ref().map(ToString::to_string),
                        &e.after.as_ref().map(ToString::to_string),
                    ],
                )
                .await
                .map_err(pg_err)?;
        }
        let head = head(&tx).await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES, &head.to_string()])
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok((new_keys, new_rows))
    }

    /// The schema version recorded in the database (tests, `store copy`).
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let obj = self.client().await?;
        let row = obj
            .query_one("SELECT coalesce(max(version), 0) FROM keyfence_schema", &[])
            .await
            .map_err(pg_err)?;
        col(&row, 0)
    }
}

/// `f`, or [`StoreError::Unavailable`] once [`CALL_TIMEOUT`] has passed.
async fn timeout<T>(f: impl Future<Output = T>) -> Result<T, StoreError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| StoreError::Unavailable("the database did not answer in time".into()))
}

/// A read-only transaction whose statements share one snapshot.
async fn read_tx(client: &mut tokio_postgres::Client) -> Result<Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_err)
}

/// Apply the steps of `migrations` the database lacks, under
/// [`MIGRATE_LOCK`], each in its own transaction with its version row. A
/// database with a step this build does not know is accepted when that step
/// says agents of this schema may still run against it.
async fn migrate(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS keyfence_schema (
                version      integer PRIMARY KEY,
                readers_from integer NOT NULL,
                applied_at   timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .or_else(|e| {
            // Two agents creating it at once: one wins, the other sees it.
            if e.as_db_error()
                .is_some_and(|d| *d.code() == SqlState::UNIQUE_VIOLATION)
            {
                Ok(())
            } else {
                Err(pg_err(e))
            }
        })?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(pg_err)?;
    let result = migrate_locked(client, migrations).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(pg_err);
    result.and(unlock.map(|_| ()))
}

async fn migrate_locked(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<(), StoreError> {
    let known = i32::try_from(migrations.len()).unwrap_or(i32::MAX);
    let rows = client
        .query("SELECT version, readers_from FROM keyfence_schema", &[])
        .await
        .map_err(pg_err)?;
    let mut applied = HashSet::new();
    for row in &rows {
        let version: i32 = col(row, 0)?;
        let readers_from: i32 = col(row, 1)?;
        if version > known && readers_from > known {
            return Err(StoreError::Newer {
                found: i64::from(version),
                known: i64::from(known),
            });
        }
        applied.insert(version);
    }
    for (i, step) in migrations.iter().enumerate() {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        if applied.contains(&version) {
            continue;
        }
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.batch_execute(step.sql).await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO keyfence_schema (version, readers_from) VALUES ($1, $2)",
            &[&version, &step.readers_from],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        tracing::info!(version, "key store schema migrated (PostgreSQL)");
    }
    Ok(())
}

/// Keep one connection that `LISTEN`s for changes and reports, for as long
/// as the store lives: reconnect with back-off whenever it drops, and wake
/// the feed after each (re)connect, since notifications sent meanwhile are
/// lost.
async fn listen(
    config: tokio_postgres::Config,
    tls: Tls,
    up: Arc<AtomicBool>,
    changed: Arc<Notify>,
    applied: Arc<Notify>,
) {
    let mut wait = RECONNECT_MIN;
    loop {
        let result = match &tls {
            Tls::Plain => listen_once(&config, tokio_postgres::NoTls, &changed, &applied).await,
            Tls::Rustls(t) => listen_once(&config, t.clone(), &changed, &applied).await,
        };
        match result {
            Ok(()) => wait = RECONNECT_MIN,
            Err(e) => {
                if up.swap(false, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "the key store's notifications stopped: reconnecting");
                }
                tracing::debug!(error = %e, "key store notification connection");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECONNECT_MAX);
    }
}

async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: T,
    changed: &Notify,
    applied: &Notify,
) -> Result<(), StoreError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = timeout(config.connect(tls)).await?.map_err(pg_err)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.channel().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let _abort = AbortOnDrop(driver.abort_handle());
    timeout(client.batch_execute(&format!("LISTEN {CHANGES}; LISTEN {APPLIED}")))
        .await?
        .map_err(pg_err)?;
    // Whatever was notified while we were away.
    changed.notify_one();
    applied.notify_waiters();
    let mut check = tokio::time::interval(LISTEN_CHECK);
    loop {
        tokio::select! {
            channel = rx.recv() => match channel.as_deref() {
                Some(CHANGES) => changed.notify_one(),
                Some(_) => applied.notify_waiters(),
                None => return Err(StoreError::Unavailable("the notification connection closed".into())),
            },
            _ = check.tick() => {
                timeout(client.simple_query("SELECT 1")).await?.map_err(pg_err)?;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct AuditRow<'a> {
    at: SystemTime,
    principal: &'a str,
    address: IpAddr,
    action: &'a str,
    key_id: &'a str,
    before: Option<String>,
    after: Option<String>,
}

fn json_of(k: &StoredKey) -> String {
    serde_json::to_string(&k.view(None)).expect("a key serializes")
}

fn key_row(r: &Row) -> Result<StoredKey, StoreError> {
    let scopes: String = col(r, 3)?;
    let digest: Vec<u8> = col(r, 4)?;
    Ok(StoredKey {
        key: Arc::new(Key {
            id: col(r, 0)?,
            name: col(r, 1)?,
            tenant: col(r, 2)?,
            scopes: serde_json::from_str(&scopes).map_err(|e| corrupt(format!("scopes: {e}")))?,
            digest: digest
                .try_into()
                .map_err(|_| corrupt("digest is not 32 bytes"))?,
            allow: AllowList::default(),
            report_only: col(r, 5)?,
            origin: Origin::Store,
        }),
        created_at: from_millis(col(r, 6)?),
        updated_at: from_millis(col(r, 7)?),
        last_used_at: col::<Option<i64>>(r, 8)?.map(from_millis),
        revoked_at: col::<Option<i64>>(r, 9)?.map(from_millis),
    })
}

fn entry_row(r: &Row) -> Result<(String, AllowEntry), StoreError> {
    let cidr: String = col(r, 1)?;
    Ok((col(r, 0)?, to_entry(&cidr, col(r, 2)?, col(r, 3)?)?))
}

fn audit_entry(r: &Row) -> Result<AuditEntry, StoreError> {
    let json = |i| -> Result<Option<serde_json::Value>, StoreError> {
        col::<Option<String>>(r, i)?
            .map(|t| serde_json::from_str(&t).map_err(|e| corrupt(format!("audit row: {e}"))))
            .transpose()
    };
    let address: String = col(r, 3)?;
    Ok(AuditEntry {
        seq: col(r, 0)?,
        at: from_millis(col(r, 1)?),
        principal: col(r, 2)?,
        address: address
            .parse()
            .map_err(|_| corrupt(format!("audit address {address:?}")))?,
        action: col(r, 4)?,
        key_id: col(r, 5)?,
        before: json(6)?,
        after: json(7)?,
    })
}

async fn head(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    col(
        &tx.query_one("SELECT coalesce(max(seq), 0) FROM audit", &[])
            .await
            .map_err(pg_err)?,
        0,
    )
}

/// One key with its list; `lock` holds its row until the transaction ends.
async fn load(tx: &Transaction<'_>, id: &str, lock: bool) -> Result<StoredKey, StoreError> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    let row = tx
        .query_opt(
            &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = $1{lock}"),
            &[&id],
        )
        .await
        .map_err(pg_err)?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    let mut key = key_row(&row)?;
    let entries = tx
        .query(
            "SELECT key_id, cidr, note, expires_at FROM allow_entries WHERE key_id = $1",
            &[&id],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| entry_row(r).map(|(_, e)| e))
        .collect::<Result<Vec<_>, _>>()?;
    key.key_mut().allow = AllowList::from_canonical(entries);
    Ok(key)
}

/// Several keys with their lists, by id.
async fn load_many(
    tx: &Transaction<'_>,
    ids: &[String],
) -> Result<HashMap<String, StoredKey>, StoreError> {
    let mut keys: HashMap<String, StoredKey> = tx
        .query(
            &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ANY($1)"),
            &[&ids],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| key_row(r).map(|k| (k.id.clone(), k)))
        .collect::<Result<_, _>>()?;
    let mut entries: HashMap<String, Vec<AllowEntry>> = HashMap::new();
    for row in tx
        .query(
            "SELECT key_id, cidr, note, expires_at FROM allow_entries WHERE key_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(pg_err)?
    {
        let (id, e) = entry_row(&row)?;
        entries.entry(id).or_default().push(e);
    }
    for k in keys.values_mut() {
        k.key_mut().allow = AllowList::from_canonical(entries.remove(&k.id).unwrap_or_default());
    }
    Ok(keys)
}

async fn load_active(tx: &Transaction<'_>, id: &str) -> Result<StoredKey, StoreError> {
    let key = load(tx, id, true).await?;
    if key.revoked_at.is_some() {
        return Err(StoreError::Revoked(id.to_owned()));
    }
    Ok(key)
}

async fn insert_key(tx: &Transaction<'_>, new: &Key, now: SystemTime) -> Result<(), StoreError> {
    let scopes =
        serde_json::to_string(&new.scopes).map_err(|e| StoreError::Backend(e.to_string()))?;
    tx.execute(
        "INSERT INTO keys (id, name, tenant, scopes, secret_sha256, report_only,
                           created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        &[
            &new.id,
            &new.name,
            &new.tenant,
            &scopes,
            &new.digest.as_slice(),
            &new.report_only,
            &millis(now),
        ],
    )
    .await
    .map_err(pg_err)?;
    write_entries(tx, &new.id, &AllowList::default(), &new.allow).await
}

async fn patch_key(
    tx: &Transaction<'_>,
    before: &StoredKey,
    patch: KeyPatch,
    now: SystemTime,
) -> Result<StoredKey, StoreError> {
    let name = patch.name.unwrap_or_else(|| before.name.clone());
    let report_only = patch.report_only.unwrap_or(before.report_only);
    tx.execute(
        "UPDATE keys SET name = $2, report_only = $3, updated_at = $4 WHERE id = $1",
        &[&before.id, &name, &report_only, &millis(now)],
    )
    .await
    .map_err(pg_err)?;
    if let Some(allow) = &patch.allow {
        write_entries(tx, &before.id, &before.allow, allow).await?;
    }
    Ok(StoredKey {
        key: Arc::new(Key {
            name,
            report_only,
            allow: patch.allow.unwrap_or_else(|| before.allow.clone()),
            ..Key::clone(before)
        }),
        updated_at: from_millis(millis(now)),
        ..before.clone()
    })
}

/// Rewrite `id`'s entries from `before` to `after`, touching only the rows
/// that differ, in two statements whatever the list's length.
async fn write_entries(
    tx: &Transaction<'_>,
    id: &str,
    before: &AllowList,
    after: &AllowList,
) -> Result<(), StoreError> {
    let (gone, changed) = before.changes_to(after);
    if !gone.is_empty() {
        let gone: Vec<String> = gone.iter().map(ToString::to_string).collect();
        tx.execute(
            "DELETE FROM allow_entries WHERE key_id = $1 AND cidr = ANY($2)",
            &[&id, &gone],
        )
        .await
        .map_err(pg_err)?;
    }
    if !changed.is_empty() {
        let cidrs: Vec<String> = changed.iter().map(|e| e.net.to_string()).collect();
        let notes: Vec<Option<&str>> = changed.iter().map(|e| e.note.as_deref()).collect();
        let expiries: Vec<Option<i64>> = changed.iter().map(|e| e.expires_at.map(millis)).collect();
        let params: [&(dyn ToSql + Sync); 4] = [&id, &cidrs, &notes, &expiries];
        tx.execute(
            "INSERT INTO allow_entries (key_id, cidr, note, expires_at)
             SELECT $1, c, n, x FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(c, n, x)
             ON CONFLICT (key_id, cidr) DO UPDATE
             SET note = EXCLUDED.note, expires_at = EXCLUDED.expires_at",
            &params,
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(())
}

impl KeyStore for PgStore {
    fn keys(&self) -> StoreFuture<'_, Vec<StoredKey>> {
        Box::pin(async move {
            match self.call(self.read_snapshot()).await {
                Ok(c) => Ok(c.keys),
                // Reads answer from memory while the database is away.
                Err(StoreError::Unavailable(_)) => Ok(self.cached_keys()),
                Err(e) => Err(e),
            }
        })
    }

    fn key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, StoredKey> {
        Box::pin(async move {
            match self.call(self.read_key(id)).await {
                Err(StoreError::Unavailable(why)) => self
                    .cache
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(id)
                    .cloned()
                    .ok_or(StoreError::Unavailable(why)),
                other => other,
            }
        })
    }

    fn write<'a>(
        &'a self,
        write: KeyWrite,
        actor: &'a Actor,
        now: SystemTime,
    ) -> StoreFuture<'a, Committed> {
        self.call(self.commit(write, actor, now))
    }

    fn audit<'a>(
        &'a self,
        after: i64,
        limit: usize,
        key_id: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<AuditEntry>> {
        self.call(self.read_audit(after, limit, key_id))
    }

    fn record_event<'a>(&'a self, event: &'a AuditEvent, now: SystemTime) -> StoreFuture<'a, ()> {
        self.call(self.event(event, now))
    }

    fn touch_last_used<'a>(&'a self, used: &'a [(String, SystemTime)]) -> StoreFuture<'a, ()> {
        self.call(self.touch(used))
    }

    fn snapshot(&self) -> StoreFuture<'_, Changes> {
        self.call(self.read_snapshot())
    }

    fn changes(&self, after_seq: i64) -> StoreFuture<'_, Changes> {
        self.call(self.read_changes(after_seq))
    }

    fn fleet(&self) -> Option<&dyn Fleet> {
        Some(self)
    }
}

impl Fleet for PgStore {
    fn host_id(&self) -> &str {
        &self.host_id
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    fn report(&self, applied: i64) -> StoreFuture<'_, ()> {
        self.call(self.write_report(applied))
    }

    fn wait_applied(&self, seq: i64, wait: Duration) -> StoreFuture<'_, Enforcement> {
        Box::pin(async move {
            // The wait has its own deadline; each read in it has the call's.
            let reads = async {
                tokio::time::timeout(wait + CALL_TIMEOUT, self.wait_fleet(seq, wait))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable("the database did not answer in time".into())
                    })?
            };
            reads.await
        })
    }

    fn status(&self) -> StoreFuture<'_, FleetStatus> {
        self.call(self.read_status())
    }

    fn claim_step(&self, step: u64) -> StoreFuture<'_, bool> {
        self.call(self.claim(step))
    }

    fn flush_sources<'a>(
        &'a self,
        batch: &'a [SourceDelta],
        per_key: usize,
    ) -> StoreFuture<'a, ()> {
        self.call(self.write_sources(batch, per_key))
    }

    fn sources<'a>(&'a self, key_id: &'a str, limit: usize) -> StoreFuture<'a, Vec<SharedSource>> {
        self.call(self.read_sources(key_id, limit))
    }
}

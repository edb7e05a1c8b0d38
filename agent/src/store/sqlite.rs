//! The embedded store: one SQLite file (bundled library), WAL journal,
//! `synchronous=FULL` so a committed change survives power loss, foreign keys
//! on, schema versioned through `PRAGMA user_version`.
//!
//! Times are Unix milliseconds. Allow-list entries are stored canonical, one
//! row each, so a list round-trips exactly.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension as _, Row, Transaction,
    TransactionBehavior, params,
};
use serde_json::Value;

use super::{
    Actor, AuditEntry, AuditEvent, Changes, Committed, KeyPatch, KeyWrite, StoreError, StoredKey,
};
use crate::allowlist::{AllowEntry, AllowList, Net};
use crate::keys::{Digest, Key, Origin};

/// Schema migrations; `user_version` is the number applied. Append only: a
/// released step is never edited.
const MIGRATIONS: &[&str] = &[
    // 1: keys, their allow-list entries, the audit log.
    "CREATE TABLE keys (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        tenant        TEXT NOT NULL,
        scopes        TEXT NOT NULL,
        secret_sha256 BLOB NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
        report_only   INTEGER NOT NULL CHECK (report_only IN (0, 1)),
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        last_used_at  INTEGER,
        revoked_at    INTEGER
    ) STRICT;
    CREATE TABLE allow_entries (
        key_id     TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        cidr       TEXT NOT NULL,
        note       TEXT,
        expires_at INTEGER,
        PRIMARY KEY (key_id, cidr)
    ) STRICT;
    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        at        INTEGER NOT NULL,
        principal TEXT NOT NULL,
        address   TEXT NOT NULL,
        action    TEXT NOT NULL,
        key_id    TEXT NOT NULL,
        before    TEXT,
        after     TEXT
    ) STRICT;",
    // 2: one key's history without scanning the whole log.
    "CREATE INDEX audit_by_key ON audit (key_id, seq);",
];

/// The schema version this build writes.
#[expect(clippy::cast_possible_wrap, reason = "a handful of migrations")]
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a write waits for another process holding the database.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// Keys as this connection last wrote them, so the next change to the same
    /// key need not read its (possibly long) list back. Valid while
    /// `PRAGMA data_version` stays the same: it moves when any other
    /// connection commits.
    written: Option<(i64, HashMap<String, Written>)>,
}

/// A key as this connection last wrote it, and its audit form (the next
/// change's `before`: a long list is not serialized twice).
#[derive(Clone)]
struct Written {
    key: StoredKey,
    audit: Arc<str>,
}

/// Keys kept in `SqliteStore::written` at most (recently changed ones).
const WRITTEN_KEYS: usize = 256;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

pub(super) fn millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub(super) fn from_millis(ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A constraint violation becomes a 409-style conflict; anything else stays.
fn conflict_on_constraint(e: rusqlite::Error, what: &str) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict(what.to_owned()),
        _ => e.into(),
    }
}

/// The driver's errors end here: callers see [`StoreError`] only. A full
/// disk (`SQLITE_FULL`, also SQLite's answer to `max_page_count`) is
/// [`StoreError::Full`]; an I/O error is [`StoreError::Io`] (a write names it
/// full when the file system has no room: `SqliteStore::name_full`).
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
            Some(ErrorCode::SystemIoFailure) => StoreError::Io(e.to_string()),
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

impl SqliteStore {
    /// Open (creating when absent) the store at `path`, migrate it to the
    /// current schema, and check it. A database written by a newer keyfence is
    /// refused untouched.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // SQLite creates `-wal` and `-shm` next to the database: whoever may
        // create files in its directory may plant them. The directory is
        // created 0700 or must be closed to others (`fsguard::store_dir`).
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::fsguard::ensure_store_dir(dir, crate::fsguard::euid())?;
        create_private(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
            written: None,
        };
        store.configure()?;
        store.migrate(MIGRATIONS)?;
        Ok(store)
    }

    /// Leave WAL checkpoints to [`checkpoint`] instead of running one inside
    /// whichever commit crosses 1,000 pages. The agent does this: a
    /// checkpoint copies and syncs the database file, which would otherwise
    /// land on one API call in every few dozen.
    pub fn defer_checkpoints(&mut self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        // Reading the header first turns "not a database" into a clear error
        // before any pragma writes.
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::NotADatabase) => {
                    corrupt(format!("{} is not a SQLite database", self.path.display()))
                }
                _ => e.into(),
            })?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Newer {
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Io(format!(
                "{}: the WAL journal is not available (journal_mode is {mode})",
                self.path.display()
            )));
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        let check: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(corrupt(format!("{}: {check}", self.path.display())));
        }
        Ok(())
    }

    /// Apply the steps of `migrations` not yet applied, each in its own
    /// transaction with the version bump.
    fn migrate(&mut self, migrations: &[&str]) -> Result<(), StoreError> {
        let known = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > known {
            return Err(StoreError::Newer {
                found: version,
                known,
            });
        }
        for (i, step) in migrations
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            tx.execute_batch(step)?;
            tx.pragma_update(
                None,
                "user_version",
                i64::try_from(i + 1).unwrap_or(i64::MAX),
            )?;
            tracing::info!(path = %self.path.display(), version = i + 1, "key store schema migrated");
        }
        tx.commit()?;
        Ok(())
    }

    /// `PRAGMA integrity_check`: empty when the database is sound.
    pub fn integrity_check(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// A pragma's current value as text (tests and `keyfence status`).
    pub fn pragma(&self, name: &str) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row(&format!("PRAGMA {name}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })?)
    }

    fn write<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            // A failed COMMIT drops `tx`, which rolls the transaction back.
            tx.commit()?;
            Ok(out)
        })();
        result.map_err(|e| self.name_full(e))
    }

    /// Name a write that failed for want of space as [`StoreError::Full`]:
    /// `SQLITE_FULL` (SQLite's own answer to `ENOSPC` on a write, and to
    /// `max_page_count`) already is; an I/O error (growing the WAL index,
    /// syncing) is too while the store's file system has no room left.
    fn name_full(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Io(inner) if no_space_left(&self.path) => {
                StoreError::Full(format!("{inner} (no space left on the device)"))
            }
            other => other,
        }
    }

    /// Create many keys in one transaction (an import): all or none, each
    /// with its audit row, one fsync instead of one per key.
    pub fn create_many(
        &mut self,
        keys: &[Key],
        actor: &Actor,
        now: SystemTime,
    ) -> Result<usize, StoreError> {
        self.write(|tx| {
            for new in keys {
                insert_key(tx, new, actor, now)?;
            }
            Ok(keys.len())
        })
    }

    /// One change of an active key in one transaction: `apply` edits the
    /// rows and returns the key after; the key before and after goes into
    /// the audit row `action`.
    fn change(
        &mut self,
        id: &str,
        actor: &Actor,
        now: SystemTime,
        action: &str,
        apply: impl FnOnce(&Transaction<'_>, &StoredKey) -> Result<StoredKey, StoreError>,
    ) -> Result<(StoredKey, StoredKey, i64), StoreError> {
        let (version, known) = self.recently_written(id)?;
        let (before, after, audit, seq) = self.write(|tx| {
            let (before, before_audit) = match known {
                Some(w) if w.key.revoked_at.is_some() => {
                    return Err(StoreError::Revoked(id.to_owned()));
                }
                Some(w) => (w.key, w.audit),
                None => {
                    let key = load_active(tx, id)?;
                    let audit = audit_json(&key);
                    (key, audit)
                }
            };
            let after = apply(tx, &before)?;
            let after_audit = audit_json(&after);
            let seq = insert_audit(
                tx,
                actor,
                now,
                action,
                id,
                Some(&before_audit),
                Some(&after_audit),
            )?;
            Ok((before, after, after_audit, seq))
        })?;
        let (v, keys) = self
            .written
            .get_or_insert_with(|| (version, HashMap::new()));
        if *v != version || keys.len() >= WRITTEN_KEYS {
            *v = version;
            keys.clear();
        }
        keys.insert(
            id.to_owned(),
            Written {
                key: after.clone(),
                audit,
            },
        );
        Ok((before, after, seq))
    }
}

/// Copy what the WAL holds into the database file, from a connection of its
/// own: `PASSIVE` neither waits for nor blocks the writer. Returns the WAL's
/// size and how much of it is now in the database, in pages.
pub fn checkpoint(path: &Path) -> Result<(i64, i64), StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let (wal, done) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })?;
    Ok((wal, done))
}

/// Below this many free bytes for unprivileged writers the file system
/// counts as full: SQLite writes whole pages (4 KiB) and WAL frames.
const NEARLY_FULL: u64 = 64 * 1024;

/// Whether the file system holding `path` is (nearly) out of space or inodes.
fn no_space_left(path: &Path) -> bool {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let free = st.blocks_available().saturating_mul(st.fragment_size());
            free < NEARLY_FULL || (st.files() > 0 && st.files_available() == 0)
        }
        Err(_) => false,
    }
}

/// Create `path` readable by its owner only when it does not exist yet (SQLite
/// gives the journal files the database's permissions), and refuse one (or a
/// `-wal`/`-shm`) someone else owns or could write (`fsguard::private_file`).
fn create_private(path: &Path) -> Result<(), StoreError> {
    crate::fsguard::ensure_store_file(path, crate::fsguard::euid())?;
    Ok(())
}

/// One new key, its entries and its audit row, inside `tx`.
fn insert_key(
    tx: &Transaction<'_>,
    new: &Key,
    actor: &Actor,
    now: SystemTime,
) -> Result<Committed, StoreError> {
    let scopes =
        serde_json::to_string(&new.scopes).map_err(|e| StoreError::Backend(e.to_string()))?;
    tx.execute(
        "INSERT INTO keys (id, name, tenant, scopes, secret_sha256, report_only,
                           created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
        params![
            new.id,
            new.name,
            new.tenant,
            scopes,
            new.digest.as_slice(),
            new.report_only,
            millis(now)
        ],
    )
    .map_err(|e| conflict_on_constraint(e, "a key with this id or secret exists"))?;
    insert_entries(tx, &new.id, &new.allow)?;
    let key = load(tx, &new.id)?;
    let seq = insert_audit(
        tx,
        actor,
        now,
        "create",
        &key.id,
        None,
        Some(&audit_json(&key)),
    )?;
    Ok(Committed { key, seq })
}

const KEY_COLUMNS: &str = "id, name, tenant, scopes, secret_sha256, report_only, \
                           created_at, updated_at, last_used_at, revoked_at";

/// A `keys` row without its allow list.
fn key_row(r: &Row<'_>) -> rusqlite::Result<StoredKey> {
    let scopes: String = r.get(3)?;
    let digest: Vec<u8> = r.get(4)?;
    Ok(StoredKey {
        key: Arc::new(Key {
            id: r.get(0)?,
            name: r.get(1)?,
            tenant: r.get(2)?,
            scopes: serde_json::from_str(&scopes).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.into())
            })?,
            digest: digest.try_into().map_err(|_| {
                rusqlite::Error::FromSqlConversionFailure(
                    4,
                    rusqlite::types::Type::Blob,
                    "digest is not 32 bytes".into(),
                )
            })?,
            allow: AllowList::default(),
            report_only: r.get(5)?,
            origin: Origin::Store,
        }),
        created_at: from_millis(r.get(6)?),
        updated_at: from_millis(r.get(7)?),
        last_used_at: r.get::<_, Option<i64>>(8)?.map(from_millis),
        revoked_at: r.get::<_, Option<i64>>(9)?.map(from_millis),
    })
}

fn entry_row(r: &Row<'_>) -> rusqlite::Result<(String, String, Option<String>, Option<i64>)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

pub(super) fn to_entry(
    cidr: &str,
    note: Option<String>,
    expires: Option<i64>,
) -> Result<AllowEntry, StoreError> {
    let net: Net = cidr
        .parse()
        .map_err(|_| corrupt(format!("stored allow-list entry {cidr:?} is not a network")))?;
    Ok(AllowEntry {
        net,
        note,
        expires_at: expires.map(from_millis),
    })
}

/// One key with its allow list, inside a transaction or not.
fn load(conn: &Connection, id: &str) -> Result<StoredKey, StoreError> {
    let mut key = conn
        .query_row(
            &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"),
            [id],
            key_row,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    let mut stmt = conn.prepare_cached(
        "SELECT key_id, cidr, note, expires_at FROM allow_entries WHERE key_id = ?1",
    )?;
    let mut entries = Vec::new();
    for row in stmt.query_map([id], entry_row)? {
        let (_, cidr, note, expires) = row?;
        entries.push(to_entry(&cidr, note, expires)?);
    }
    key.key_mut().allow = AllowList::from_canonical(entries);
    Ok(key)
}

fn insert_entries(tx: &Transaction<'_>, id: &str, allow: &AllowList) -> Result<(), StoreError> {
    replace_entries(tx, id, &AllowList::default(), allow)
}

/// Rewrite `id`'s entries from `before` to `after`, touching only the rows
/// that differ (a one-entry change to a long list is one row, not all of them).
fn replace_entries(
    tx: &Transaction<'_>,
    id: &str,
    before: &AllowList,
    after: &AllowList,
) -> Result<(), StoreError> {
    let (gone, changed) = before.changes_to(after);
    let mut delete =
        tx.prepare_cached("DELETE FROM allow_entries WHERE key_id = ?1 AND cidr = ?2")?;
    for net in gone {
        delete.execute(params![id, net.to_string()])?;
    }
    let mut upsert = tx.prepare_cached(
        "INSERT OR REPLACE INTO allow_entries (key_id, cidr, note, expires_at)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for e in changed {
        upsert.execute(params![
            id,
            e.net.to_string(),
            e.note,
            e.expires_at.map(millis)
        ])?;
    }
    Ok(())
}

/// A key as an audit row's `before` or `after` holds it.
fn audit_json(key: &StoredKey) -> Arc<str> {
    serde_json::to_string(&key.view(None))
        .expect("a key serializes")
        .into()
}

fn insert_audit(
    tx: &Transaction<'_>,
    actor: &Actor,
    now: SystemTime,
    action: &str,
    key_id: &str,
    before: Option<&str>,
    after: Option<&str>,
) -> Result<i64, StoreError> {
    tx.prepare_cached(
        "INSERT INTO audit (at, principal, address, action, key_id, before, after)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        millis(now),
        actor.principal,
        actor.address.to_string(),
        action,
        key_id,
        before,
        after,
    ])?;
    // `seq` is the table's rowid.
    Ok(tx.last_insert_rowid())
}

/// The highest audit sequence number (0 for an empty log).
fn head(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT coalesce(max(seq), 0) FROM audit", [], |r| r.get(0))?)
}

/// The key, which must exist and not be revoked.
fn load_active(tx: &Transaction<'_>, id: &str) -> Result<StoredKey, StoreError> {
    let key = load(tx, id)?;
    if key.revoked_at.is_some() {
        return Err(StoreError::Revoked(id.to_owned()));
    }
    Ok(key)
}

/// The store's calls, synchronous: [`super::embedded::Embedded`] runs them off
/// the runtime; tools and tests call them directly.
impl SqliteStore {
    /// All keys, revoked ones included, oldest first.
    pub fn keys(&mut self) -> Result<Vec<StoredKey>, StoreError> {
        Ok(self.snapshot()?.keys)
    }

    /// Every key and the highest audit sequence number, in one read
    /// transaction (so the two agree).
    pub fn snapshot(&mut self) -> Result<Changes, StoreError> {
        let tx = self.conn.transaction()?;
        let upto = head(&tx)?;
        let mut keys: Vec<StoredKey> = tx
            .prepare(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY rowid"))?
            .query_map([], key_row)?
            .collect::<Result<_, _>>()?;
        // Every entry tagged with its key's position, in one vector: a map
        // of lists by key id (a `String` per entry, lists grown one push at
        // a time) left a million small blocks scattered between the keys at
        // 100k keys × 10 entries, resident after they were freed.
        let mut entries: Vec<(usize, AllowEntry)> = Vec::new();
        {
            let at: HashMap<&str, usize> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.id.as_str(), i))
                .collect();
            let mut stmt =
                tx.prepare("SELECT key_id, cidr, note, expires_at FROM allow_entries")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let text = |i: usize| {
                    r.get_ref(i)?
                        .as_str()
                        .map_err(|e| corrupt(format!("stored allow-list entry: {e}")))
                };
                // Entries of a key that is not there cannot be enforced.
                let Some(&key) = at.get(text(0)?) else {
                    continue;
                };
                entries.push((key, to_entry(text(1)?, r.get(2)?, r.get(3)?)?));
            }
        }
        tx.finish()?;
        // Stable: each key's entries keep the order they were read in.
        entries.sort_by_key(|(key, _)| *key);
        let mut entries = entries.into_iter().peekable();
        for (i, k) in keys.iter_mut().enumerate() {
            let mut list = Vec::new();
            while let Some((_, entry)) = entries.next_if(|(key, _)| *key == i) {
                list.push(entry);
            }
            if !list.is_empty() {
                k.key_mut().allow = AllowList::from_canonical(list);
            }
        }
        Ok(Changes { upto, keys })
    }

    /// The keys that audit rows after `after_seq` name, as they are now,
    /// read in one transaction with the highest sequence number: every key
    /// change writes its audit row in its own transaction, so their state is
    /// the state as of that number.
    pub fn changes(&mut self, after_seq: i64) -> Result<Changes, StoreError> {
        let tx = self.conn.transaction()?;
        let upto = head(&tx)?;
        let mut keys = Vec::new();
        if upto > after_seq {
            let ids: Vec<String> = tx
                .prepare_cached(
                    "SELECT key_id FROM audit WHERE seq > ?1 AND key_id != ''
                     GROUP BY key_id ORDER BY min(seq)",
                )?
                .query_map([after_seq], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in ids {
                match load(&tx, &id) {
                    Ok(key) => keys.push(key),
                    // Keys are never deleted; a row naming none is not ours to apply.
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        tx.finish()?;
        Ok(Changes { upto, keys })
    }

    /// Make one write with its audit row.
    pub fn commit(
        &mut self,
        write: KeyWrite,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<Committed, StoreError> {
        let (_, key, seq) = match write {
            KeyWrite::Create(new) => return self.write(|tx| insert_key(tx, &new, actor, now)),
            KeyWrite::Update { id, patch } => self.patch(&id, patch, actor, now)?,
            KeyWrite::Revoke { id } => self.change(&id, actor, now, "revoke", |tx, _| {
                tx.execute(
                    "UPDATE keys SET revoked_at = ?2, updated_at = ?2 WHERE id = ?1",
                    params![id, millis(now)],
                )?;
                load(tx, &id)
            })?,
            KeyWrite::Rotate { id, digest } => {
                self.change(&id, actor, now, "rotate", |tx, _| {
                    tx.execute(
                        "UPDATE keys SET secret_sha256 = ?2, updated_at = ?3 WHERE id = ?1",
                        params![id, digest.as_slice(), millis(now)],
                    )
                    .map_err(|e| conflict_on_constraint(e, "a key with this secret exists"))?;
                    load(tx, &id)
                })?
            }
        };
        Ok(Committed { key, seq })
    }

    /// `PRAGMA data_version` now, and the key as this connection last
    /// wrote it if no other connection has committed since.
    fn recently_written(&self, id: &str) -> Result<(i64, Option<Written>), StoreError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let known = match &self.written {
            Some((v, keys)) if *v == version => keys.get(id).cloned(),
            _ => None,
        };
        Ok((version, known))
    }

    /// The key `id` (a write's dry run reads it before every change: a key
    /// this connection just wrote is not read back while nothing else has
    /// committed).
    pub fn key(&mut self, id: &str) -> Result<StoredKey, StoreError> {
        if let (_, Some(written)) = self.recently_written(id)? {
            return Ok(written.key);
        }
        let tx = self.conn.transaction()?;
        let key = load(&tx, id)?;
        tx.finish()?;
        Ok(key)
    }

    pub fn create(
        &mut self,
        new: Key,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        Ok(self.commit(KeyWrite::Create(new), actor, now)?.key)
    }

    /// Returns the key before and after.
    pub fn update(
        &mut self,
        id: &str,
        patch: KeyPatch,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<(StoredKey, StoredKey), StoreError> {
        let (before, after, _) = self.patch(id, patch, actor, now)?;
        Ok((before, after))
    }

    pub fn revoke(
        &mut self,
        id: &str,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        let write = KeyWrite::Revoke { id: id.to_owned() };
        Ok(self.commit(write, actor, now)?.key)
    }

    pub fn rotate(
        &mut self,
        id: &str,
        digest: Digest,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        let write = KeyWrite::Rotate {
            id: id.to_owned(),
            digest,
        };
        Ok(self.commit(write, actor, now)?.key)
    }

    fn patch(
        &mut self,
        id: &str,
        patch: KeyPatch,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<(StoredKey, StoredKey, i64), StoreError> {
        self.change(id, actor, now, "update", |tx, before| {
            tx.execute(
                "UPDATE keys SET name = ?2, report_only = ?3, updated_at = ?4 WHERE id = ?1",
                params![
                    id,
                    patch.name.as_deref().unwrap_or(&before.name),
                    patch.report_only.unwrap_or(before.report_only),
                    millis(now)
                ],
            )?;
            if let Some(allow) = &patch.allow {
                replace_entries(tx, id, &before.allow, allow)?;
            }
            // What `load` would read back, without reading a long list again.
            Ok(StoredKey {
                key: Arc::new(Key {
                    name: patch.name.unwrap_or_else(|| before.name.clone()),
                    report_only: patch.report_only.unwrap_or(before.report_only),
                    allow: patch.allow.unwrap_or_else(|| before.allow.clone()),
                    ..Key::clone(before)
                }),
                updated_at: from_millis(millis(now)),
                ..before.clone()
            })
        })
    }

    /// Audit rows with `seq > after` (of one key, when given), oldest first,
    /// at most `limit`.
    pub fn audit(
        &mut self,
        after: i64,
        limit: usize,
        key_id: Option<&str>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(if key_id.is_some() {
            "SELECT seq, at, principal, address, action, key_id, before, after
             FROM audit WHERE key_id = ?3 AND seq > ?1 ORDER BY seq LIMIT ?2"
        } else {
            "SELECT seq, at, principal, address, action, key_id, before, after
             FROM audit WHERE seq > ?1 AND ?3 IS NULL ORDER BY seq LIMIT ?2"
        })?;
        let rows = stmt
            .query_map(params![after, limit, key_id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let json = |s: Option<String>| -> Result<Option<Value>, StoreError> {
            s.map(|s| serde_json::from_str(&s).map_err(|e| corrupt(format!("audit row: {e}"))))
                .transpose()
        };
        rows.into_iter()
            .map(
                |(seq, at, principal, address, action, key_id, before, after)| {
                    Ok(AuditEntry {
                        seq,
                        at: from_millis(at),
                        principal,
                        address: address.parse::<IpAddr>().map_err(|_| {
                            corrupt(format!("audit row {seq}: address {address:?}"))
                        })?,
                        action,
                        key_id,
                        before: json(before)?,
                        after: json(after)?,
                    })
                },
            )
            .collect()
    }

    /// Write an audit row for `event` (its own transaction).
    pub fn record_event(&mut self, event: &AuditEvent, now: SystemTime) -> Result<(), StoreError> {
        let details = serde_json::to_string(&event.details)
            .map_err(|e| StoreError::Backend(format!("audit event: {e}")))?;
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO audit (at, principal, address, action, key_id, before, after)
                 VALUES (?1, ?2, ?3, ?4, '', NULL, ?5)",
            )?
            .execute(params![
                millis(now),
                event.principal,
                event.address.to_string(),
                event.action,
                details,
            ])?;
            Ok(())
        })
    }

    /// Record when keys were last used (not audited: it is not a change).
    pub fn touch_last_used(&mut self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        // The keys' last use moves under the copies `change` keeps.
        self.written = None;
        if used.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "UPDATE keys SET last_used_at = ?2
                 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
            )?;
            for (id, at) in used {
                stmt.execute(params![id, millis(*at)])?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, os::unix::fs::PermissionsExt as _};

    use super::*;
    use crate::keys::{
        credentials::{self as secret, digest},
        testing::list,
    };

    /// A directory removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let n: u64 = u64::from_ne_bytes({
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).unwrap();
                b
            });
            let dir = std::env::temp_dir().join(format!("keyfence-store-test-{n:016x}"));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("keyfence.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn actor() -> Actor {
        Actor {
            principal: "admin:ops".into(),
            address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn new_key(secret: &str, allow: &str) -> Key {
        Key {
            name: "CI runners".into(),
            ..crate::keys::testing::key(&secret::new_key_id(), secret, allow)
        }
    }

    fn audit_len(s: &mut SqliteStore) -> usize {
        s.audit(0, 10_000, None).unwrap().len()
    }

    #[test]
    fn durability_settings() {
        let dir = TempDir::new();
        let s = SqliteStore::open(&dir.db()).unwrap();
        assert_eq!(s.pragma("journal_mode").unwrap(), "wal");
        assert_eq!(s.pragma("synchronous").unwrap(), "2", "FULL");
        assert_eq!(s.pragma("foreign_keys").unwrap(), "1");
        assert_eq!(
            s.pragma("user_version").unwrap(),
            SCHEMA_VERSION.to_string()
        );
        assert!(s.integrity_check().unwrap().is_empty());
        let mode = std::fs::metadata(dir.db()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner only");
    }

    #[test]
    fn keys_round_trip_across_reopen() {
        let dir = TempDir::new();
        let mut k = new_key(
            &secret::generate(),
            "198.51.100.0/24, 203.0.113.7, 2001:db8::/48",
        );
        k.allow = AllowList::from_canonical(
            k.allow
                .entries()
                .iter()
                .cloned()
                .map(|mut e| {
                    if e.net.to_string() == "203.0.113.7/32" {
                        e.note = Some("contractor".into());
                        e.expires_at = Some(at(3600));
                    }
                    e
                })
                .collect(),
        );
        k.scopes = crate::keys::Scopes::API.with(crate::keys::Scopes::ADMIN);
        let created = {
            let mut s = SqliteStore::open(&dir.db()).unwrap();
            let created = s.create(k.clone(), &actor(), at(0)).unwrap();
            assert_eq!(created.allow, k.allow);
            assert_eq!(created.created_at, at(0));
            assert_eq!(created.updated_at, at(0));
            assert_eq!(created.last_used_at, None);
            created
        };
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        assert_eq!(s.key(&k.id).unwrap(), created);
        assert_eq!(s.keys().unwrap(), vec![created]);
        assert!(matches!(s.key("key_nope"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn create_many_is_all_or_nothing() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let keys: Vec<Key> = (0..3)
            .map(|i| new_key(&format!("import-secret-{i}-0123456789"), "192.0.2.1"))
            .collect();
        assert_eq!(s.create_many(&keys, &actor(), at(0)).unwrap(), 3);
        assert_eq!(s.keys().unwrap().len(), 3);
        assert_eq!(audit_len(&mut s), 3, "one audit row per key");
        // A batch whose last key reuses a secret: nothing of it lands.
        let mut again: Vec<Key> = (3..5)
            .map(|i| new_key(&format!("import-secret-{i}-0123456789"), "192.0.2.2"))
            .collect();
        again.push(new_key("import-secret-0-0123456789", "192.0.2.3"));
        assert!(matches!(
            s.create_many(&again, &actor(), at(1)),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.keys().unwrap().len(), 3);
        assert_eq!(audit_len(&mut s), 3);
    }

    #[test]
    fn only_the_digest_is_stored() {
        let dir = TempDir::new();
        let secret = secret::generate();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let k = new_key(&secret, "");
        s.create(k.clone(), &actor(), at(0)).unwrap();
        let rotated = secret::generate();
        s.rotate(&k.id, digest(&rotated), &actor(), at(1)).unwrap();
        let mut bytes = Vec::new();
        for name in ["keyfence.db", "keyfence.db-wal"] {
            if let Ok(b) = std::fs::read(dir.0.join(name)) {
                bytes.extend(b);
            }
        }
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(contains(&digest(&rotated)), "the digest is there");
        assert!(!contains(secret.as_bytes()), "the first secret is not");
        assert!(!contains(rotated.as_bytes()), "the rotated secret is not");
        assert!(!contains(&secret.as_bytes()[3..20]), "not even in part");
    }

    #[test]
    fn updates_write_only_changed_rows_and_answer_what_is_stored() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let k = new_key(
            &secret::generate(),
            "198.51.100.7, 203.0.113.0/24, 2001:db8::/48",
        );
        s.create(k.clone(), &actor(), at(0)).unwrap();
        let noted = AllowList::from_canonical(vec![
            AllowEntry {
                net: "198.51.100.7/32".parse().unwrap(),
                note: Some("office".into()),
                expires_at: Some(at(3600)),
            },
            AllowEntry {
                net: "2001:db8::/48".parse().unwrap(),
                note: None,
                expires_at: None,
            },
        ]);
        let patches = [
            list("198.51.100.7, 203.0.113.0/24, 2001:db8::/48, 192.0.2.1"),
            list("203.0.113.0/24"),
            noted,
            list(""),
            list("192.0.2.0/24, 198.51.100.7"),
        ];
        for (i, allow) in patches.into_iter().enumerate() {
            let (_, after) = s
                .update(
                    &k.id,
                    KeyPatch {
                        allow: Some(allow.clone()),
                        name: (i == 2).then(|| format!("renamed-{i}")),
                        ..KeyPatch::default()
                    },
                    &actor(),
                    at(10 + i as u64),
                )
                .unwrap();
            assert_eq!(after.allow, allow, "patch {i}");
            assert_eq!(s.key(&k.id).unwrap(), after, "patch {i}: answer = stored");
        }
        drop(s);
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        assert_eq!(
            s.key(&k.id).unwrap().allow,
            list("192.0.2.0/24, 198.51.100.7")
        );
    }

    #[test]
    fn changes_see_what_other_connections_and_last_use_wrote() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let k = new_key(&secret::generate(), "198.51.100.7");
        s.create(k.clone(), &actor(), at(0)).unwrap();
        let patch = |allow: &str| KeyPatch {
            allow: Some(list(allow)),
            ..KeyPatch::default()
        };
        s.update(&k.id, patch("192.0.2.1"), &actor(), at(1))
            .unwrap();
        // Another process (connection) changes the key behind our back.
        let mut other = SqliteStore::open(&dir.db()).unwrap();
        other
            .update(&k.id, patch("203.0.113.9"), &actor(), at(2))
            .unwrap();
        assert_eq!(
            s.key(&k.id).unwrap().allow,
            list("203.0.113.9"),
            "a read is not our stale copy"
        );
        let (before, _) = s
            .update(&k.id, patch("192.0.2.2"), &actor(), at(3))
            .unwrap();
        assert_eq!(before.allow, list("203.0.113.9"), "not our stale copy");
        // Read back, our own write is the one the store holds.
        let ours = s.key(&k.id).unwrap();
        assert_eq!(ours.allow, list("192.0.2.2"));
        s.written = None;
        assert_eq!(s.key(&k.id).unwrap(), ours, "the copy is what load reads");
        // A revocation elsewhere is seen too.
        other.revoke(&k.id, &actor(), at(4)).unwrap();
        assert!(matches!(
            s.update(&k.id, patch("192.0.2.3"), &actor(), at(5)),
            Err(StoreError::Revoked(_))
        ));
        // Last use recorded on this connection shows in the next change.
        let k2 = new_key(&secret::generate(), "198.51.100.8");
        s.create(k2.clone(), &actor(), at(6)).unwrap();
        s.update(&k2.id, patch("192.0.2.4"), &actor(), at(7))
            .unwrap();
        s.touch_last_used(&[(k2.id.clone(), at(8))]).unwrap();
        let (before, after) = s
            .update(&k2.id, patch("192.0.2.5"), &actor(), at(9))
            .unwrap();
        assert_eq!(before.last_used_at, Some(at(8)));
        assert_eq!(s.key(&k2.id).unwrap(), after);
    }

    #[test]
    fn deferred_checkpoints_happen_from_another_connection() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        s.defer_checkpoints().unwrap();
        assert_eq!(s.pragma("wal_autocheckpoint").unwrap(), "0");
        let long: Vec<String> = (0..1000).map(|i| format!("2001:db8:{i:x}::/48")).collect();
        let k = new_key(&secret::generate(), &long.join(","));
        s.create(k.clone(), &actor(), at(0)).unwrap();
        for i in 0..100 {
            let allow = list(&long[i..].join(","));
            s.update(
                &k.id,
                KeyPatch {
                    allow: Some(allow),
                    ..KeyPatch::default()
                },
                &actor(),
                at(1),
            )
            .unwrap();
        }
        let wal = || {
            std::fs::metadata(dir.0.join("keyfence.db-wal"))
                .unwrap()
                .len()
        };
        assert!(
            wal() > 1500 * 4096,
            "no checkpoint ran inside a commit: {} bytes",
            wal()
        );
        let (pages, copied) = checkpoint(&dir.db()).unwrap();
        assert!(pages > 1500 && copied == pages, "{copied} of {pages} pages");
        drop(s);
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        assert_eq!(s.key(&k.id).unwrap().allow, list(&long[99..].join(",")));
    }

    #[test]
    fn updates_are_audited_with_before_and_after() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let k = new_key(&secret::generate(), "198.51.100.7");
        s.create(k.clone(), &actor(), at(0)).unwrap();
        let (before, after) = s
            .update(
                &k.id,
                KeyPatch {
                    allow: Some(list("198.51.100.7, 203.0.113.9")),
                    ..KeyPatch::default()
                },
                &actor(),
                at(5),
            )
            .unwrap();
        assert_eq!(before.allow, list("198.51.100.7"));
        assert_eq!(after.allow, list("198.51.100.7, 203.0.113.9"));
        assert_eq!(after.name, before.name, "unpatched fields stay");
        assert_eq!(after.updated_at, at(5));
        assert_eq!(after.created_at, at(0));
        let renamed = s
            .update(
                &k.id,
                KeyPatch {
                    name: Some("renamed".into()),
                    report_only: Some(true),
                    ..KeyPatch::default()
                },
                &actor(),
                at(6),
            )
            .unwrap()
            .1;
        assert_eq!(
            renamed.allow, after.allow,
            "a patch without a list keeps it"
        );
        assert!(renamed.report_only);
        let log = s.audit(0, 100, None).unwrap();
        let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["create", "update", "update"]);
        assert_eq!(log[1].principal, "admin:ops");
        assert_eq!(log[1].address.to_string(), "192.0.2.10");
        assert_eq!(log[1].at, at(5));
        assert_eq!(log[1].key_id, k.id);
        assert_eq!(
            log[1].before.as_ref().unwrap()["ip_allow_list"],
            serde_json::json!(["198.51.100.7/32"])
        );
        assert_eq!(
            log[1].after.as_ref().unwrap()["ip_allow_list"],
            serde_json::json!(["198.51.100.7/32", "203.0.113.9/32"])
        );
        assert!(log[0].before.is_none());
        // The second update's `before` is the first one's `after` (kept
        // from that write, not read back) and what a fresh read shows.
        assert_eq!(log[2].before, log[1].after);
        let fresh = |k: &StoredKey| serde_json::to_value(k.view(None)).unwrap();
        assert_eq!(log[2].before.as_ref(), Some(&fresh(&after)));
        s.written = None;
        assert_eq!(log[2].after.as_ref(), Some(&fresh(&s.key(&k.id).unwrap())));
        assert!(
            log.iter()
                .all(|e| !e.after.as_ref().unwrap().to_string().contains("sha256"))
        );
        // Paging.
        assert_eq!(s.audit(log[0].seq, 1, None).unwrap()[0].seq, log[1].seq);
        assert!(s.audit(log[2].seq, 10, None).unwrap().is_empty());
        assert_eq!(s.audit(0, 10, Some(&k.id)).unwrap().len(), 3);
        assert!(s.audit(0, 10, Some("key_other")).unwrap().is_empty());
    }

    #[test]
    fn refused_writes_change_nothing() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let secret = secret::generate();
        let k = new_key(&secret, "198.51.100.7");
        s.create(k.clone(), &actor(), at(0)).unwrap();
        let snapshot = s.keys().unwrap();
        let log = audit_len(&mut s);

        let patch = KeyPatch {
            allow: Some(list("203.0.113.0/24")),
            ..KeyPatch::default()
        };
        assert!(matches!(
            s.update("key_unknown", patch.clone(), &actor(), at(1)),
            Err(StoreError::NotFound(_))
        ));
        let mut dup = new_key(&secret, "");
        assert!(
            matches!(
                s.create(dup.clone(), &actor(), at(1)),
                Err(StoreError::Conflict(_))
            ),
            "same secret"
        );
        dup.id.clone_from(&k.id);
        dup.digest = digest(&secret::generate());
        assert!(
            matches!(s.create(dup, &actor(), at(1)), Err(StoreError::Conflict(_))),
            "same id"
        );
        assert_eq!(s.keys().unwrap(), snapshot);
        assert_eq!(audit_len(&mut s), log);

        s.revoke(&k.id, &actor(), at(2)).unwrap();
        let snapshot = s.keys().unwrap();
        let log = audit_len(&mut s);
        assert!(snapshot[0].revoked_at == Some(at(2)));
        assert!(matches!(
            s.update(&k.id, patch, &actor(), at(3)),
            Err(StoreError::Revoked(_))
        ));
        assert!(matches!(
            s.revoke(&k.id, &actor(), at(3)),
            Err(StoreError::Revoked(_))
        ));
        assert!(matches!(
            s.rotate(&k.id, digest("x"), &actor(), at(3)),
            Err(StoreError::Revoked(_))
        ));
        assert_eq!(s.keys().unwrap(), snapshot);
        assert_eq!(audit_len(&mut s), log);
    }

    #[test]
    fn rotation_keeps_id_and_list() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let k = new_key(&secret::generate(), "198.51.100.0/24");
        let created = s.create(k.clone(), &actor(), at(0)).unwrap();
        let new_digest = digest(&secret::generate());
        let rotated = s.rotate(&k.id, new_digest, &actor(), at(9)).unwrap();
        assert_eq!(rotated.digest, new_digest);
        assert_ne!(rotated.digest, created.digest);
        assert_eq!(rotated.id, created.id);
        assert_eq!(rotated.allow, created.allow);
        assert_eq!(rotated.updated_at, at(9));
    }

    #[test]
    fn last_used_only_moves_forward() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let k = new_key(&secret::generate(), "");
        s.create(k.clone(), &actor(), at(0)).unwrap();
        s.touch_last_used(&[(k.id.clone(), at(20)), ("key_gone".into(), at(20))])
            .unwrap();
        s.touch_last_used(&[(k.id.clone(), at(10))]).unwrap();
        assert_eq!(s.key(&k.id).unwrap().last_used_at, Some(at(20)));
        assert_eq!(audit_len(&mut s), 1, "use is not a change");
    }

    #[test]
    fn migrates_an_older_schema_in_place() {
        let dir = TempDir::new();
        let k = new_key(&secret::generate(), "198.51.100.7");
        {
            // A store as the first schema left it.
            create_private(&dir.db()).unwrap();
            let mut s = SqliteStore {
                conn: Connection::open(dir.db()).unwrap(),
                path: dir.db(),
                written: None,
            };
            s.configure().unwrap();
            s.migrate(&MIGRATIONS[..1]).unwrap();
            assert_eq!(s.pragma("user_version").unwrap(), "1");
            s.create(k.clone(), &actor(), at(0)).unwrap();
        }
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        assert_eq!(
            s.pragma("user_version").unwrap(),
            SCHEMA_VERSION.to_string()
        );
        let index: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'audit_by_key'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 1);
        assert_eq!(s.key(&k.id).unwrap().allow, list("198.51.100.7"));
        assert_eq!(audit_len(&mut s), 1);
    }

    #[test]
    fn a_newer_schema_is_refused_untouched() {
        let dir = TempDir::new();
        {
            let s = SqliteStore::open(&dir.db()).unwrap();
            s.conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = SqliteStore::open(&dir.db()).unwrap_err();
        assert!(matches!(err, StoreError::Newer { found: 99, .. }), "{err}");
        assert!(err.to_string().contains("upgrade keyfence"), "{err}");
        let conn = Connection::open(dir.db()).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 99);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = TempDir::new();
        std::fs::write(
            dir.db(),
            b"this is not a database, just some text that is long enough",
        )
        .unwrap();
        let err = SqliteStore::open(&dir.db()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("not a SQLite database"), "{err}");
    }

    /// A list of `n` distinct /32s in 198.18.0.0/15 (benchmark space, never
    /// routed; only stored here).
    fn long_list(n: u32) -> AllowList {
        let text: Vec<String> = (0..n)
            .map(|i| Ipv4Addr::from(0xC612_0000 + i).to_string())
            .collect();
        list(&text.join(","))
    }

    #[test]
    fn a_full_store_is_named_and_rolls_back() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let kept = s
            .create(new_key("kf_kept", "192.0.2.10"), &actor(), at(1))
            .unwrap();
        // No page beyond the ones in use: the next write that needs one meets
        // SQLITE_FULL, as on a full disk.
        let pages = s.pragma("page_count").unwrap();
        s.conn
            .pragma_update(None, "max_page_count", &pages)
            .unwrap();
        let mut big = new_key("kf_big", "");
        big.allow = long_list(1000);
        let err = s.create(big.clone(), &actor(), at(2)).unwrap_err();
        assert!(matches!(err, StoreError::Full(_)), "{err:?}");
        assert!(err.to_string().contains("full"), "{err}");
        let mut patch = KeyPatch {
            allow: Some(long_list(1000)),
            ..KeyPatch::default()
        };
        let err = s
            .update(&kept.id, patch.clone(), &actor(), at(3))
            .unwrap_err();
        assert!(matches!(err, StoreError::Full(_)), "{err:?}");
        // Nothing changed, and reads keep working.
        assert_eq!(s.keys().unwrap(), vec![kept.clone()]);
        assert_eq!(s.key(&kept.id).unwrap(), kept);
        assert_eq!(audit_len(&mut s), 1);
        // With room again the same writes succeed.
        s.conn
            .pragma_update(None, "max_page_count", 1_000_000_000)
            .unwrap();
        s.create(big, &actor(), at(4)).unwrap();
        patch.name = Some("grown".into());
        let (_, after) = s.update(&kept.id, patch, &actor(), at(5)).unwrap();
        assert_eq!(after.allow.entries().len(), 1000);
        assert_eq!(audit_len(&mut s), 3);
        assert_eq!(s.integrity_check().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn other_errors_are_not_called_full() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        s.create(new_key("kf_a", "192.0.2.10"), &actor(), at(1))
            .unwrap();
        let dup = s.create(new_key("kf_a", "192.0.2.11"), &actor(), at(2));
        assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
        // The temp directory has room: an I/O error there is not "full".
        assert!(!no_space_left(&dir.db()));
    }

    #[test]
    fn events_are_audited_outside_key_histories() {
        let dir = TempDir::new();
        let mut s = SqliteStore::open(&dir.db()).unwrap();
        let k = s
            .create(new_key("kf_a", "192.0.2.10"), &actor(), at(1))
            .unwrap();
        let event = AuditEvent {
            principal: "admin:ops".into(),
            address: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
            action: "lockout",
            details: serde_json::json!({"reason": "confirm", "scope": "address"}),
        };
        s.record_event(&event, at(2)).unwrap();
        let log = s.audit(0, 10, None).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[1].action, "lockout");
        assert_eq!(log[1].key_id, "");
        assert_eq!(log[1].address, event.address);
        assert_eq!(log[1].before, None);
        assert_eq!(log[1].after, Some(event.details));
        assert_eq!(log[1].at, at(2));
        assert_eq!(
            s.audit(0, 10, Some(&k.id)).unwrap().len(),
            1,
            "not in the key's history"
        );
    }

    #[test]
    fn times_round_trip_in_milliseconds() {
        for t in [
            at(0),
            at(0) + Duration::from_millis(123),
            UNIX_EPOCH - Duration::from_secs(5),
        ] {
            assert_eq!(from_millis(millis(t)), t);
        }
    }
}

//! The embedded default backend: the SQLite file of [`SqliteStore`] behind
//! the async [`KeyStore`] interface. Calls run one at a time on one
//! connection, on tokio's blocking pool (`synchronous=FULL` waits for the
//! disk). WAL checkpoints are this backend's own task: on a timer, from a
//! connection of their own, never inside a commit on an API call's path.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use super::{
    Actor, AuditEntry, AuditEvent, Changes, Committed, KeyStore, KeyWrite, StoreError, StoreFuture,
    StoredKey,
    sqlite::{SqliteStore, checkpoint},
};

/// How often the WAL is copied into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

pub struct Embedded {
    store: Arc<Mutex<SqliteStore>>,
    /// The checkpoint task, stopped with the store.
    checkpoints: tokio::task::AbortHandle,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded").finish_non_exhaustive()
    }
}

impl Embedded {
    /// Open (creating when absent) the store at `path` and start its
    /// checkpoints. Must run inside the tokio runtime.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut store = SqliteStore::open(path)?;
        store.defer_checkpoints()?;
        let checkpoints = tokio::spawn(checkpoints(path.to_path_buf())).abort_handle();
        Ok(Self {
            store: Arc::new(Mutex::new(store)),
            checkpoints,
        })
    }

    /// Run `f` on the connection, off the runtime's workers.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqliteStore) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let store = self.store.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                f(&mut store.lock().unwrap_or_else(PoisonError::into_inner))
            })
            .await
            .map_err(|e| StoreError::Backend(format!("the key store's task failed: {e}")))?
        })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.checkpoints.abort();
    }
}

/// Checkpoint `path` every [`CHECKPOINT_INTERVAL`]; `PASSIVE`, so it never
/// waits for nor blocks the writer.
async fn checkpoints(path: PathBuf) {
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    loop {
        tick.tick().await;
        let path = path.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || checkpoint(&path)).await {
            tracing::warn!(error = %e, "checkpointing the key store");
        }
    }
}

impl KeyStore for Embedded {
    fn keys(&self) -> StoreFuture<'_, Vec<StoredKey>> {
        self.run(SqliteStore::keys)
    }

    fn key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, StoredKey> {
        let id = id.to_owned();
        self.run(move |s| s.key(&id))
    }

    fn write<'a>(
        &'a self,
        write: KeyWrite,
        actor: &'a Actor,
        now: SystemTime,
    ) -> StoreFuture<'a, Committed> {
        let actor = actor.clone();
        self.run(move |s| s.commit(write, &actor, now))
    }

    fn audit<'a>(
        &'a self,
        after: i64,
        limit: usize,
        key_id: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<AuditEntry>> {
        let key_id = key_id.map(ToOwned::to_owned);
        self.run(move |s| s.audit(after, limit, key_id.as_deref()))
    }

    fn record_event<'a>(&'a self, event: &'a AuditEvent, now: SystemTime) -> StoreFuture<'a, ()> {
        let event = event.clone();
        self.run(move |s| s.record_event(&event, now))
    }

    fn touch_last_used<'a>(&'a self, used: &'a [(String, SystemTime)]) -> StoreFuture<'a, ()> {
        let used = used.to_vec();
        self.run(move |s| s.touch_last_used(&used))
    }

    fn snapshot(&self) -> StoreFuture<'_, Changes> {
        self.run(SqliteStore::snapshot)
    }

    fn changes(&self, after_seq: i64) -> StoreFuture<'_, Changes> {
        self.run(move |s| s.changes(after_seq))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        keys::{Key, credentials as secret, testing},
        store::KeyPatch,
    };

    fn actor() -> Actor {
        Actor {
            principal: "admin:ops".into(),
            address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        }
    }

    fn new_key(allow: &str) -> Key {
        testing::key(&secret::new_key_id(), &secret::generate(), allow)
    }

    /// The feed reports what any writer committed: this store's writes and
    /// another connection's, each key once, in its latest state.
    #[tokio::test]
    async fn the_feed_carries_every_writers_changes() {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let dir =
            std::env::temp_dir().join(format!("keyfence-feed-{:016x}", u64::from_ne_bytes(b)));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("k.db");
        let store = Embedded::open(&db).unwrap();
        let now = SystemTime::now();
        let start = store.snapshot().await.unwrap();
        assert_eq!(start, Changes::default(), "an empty store, an empty log");

        let a = store
            .write(KeyWrite::Create(new_key("192.0.2.1")), &actor(), now)
            .await
            .unwrap();
        assert!(a.seq > start.upto);
        let event = AuditEvent {
            principal: "unauthenticated".into(),
            address: actor().address,
            action: "lockout",
            details: serde_json::json!({}),
        };
        store.record_event(&event, now).await.unwrap();
        // Another writer of the same file.
        let mut other = SqliteStore::open(&db).unwrap();
        let b = other
            .create(new_key("198.51.100.0/24"), &actor(), now)
            .unwrap();
        other
            .update(
                &a.key.id,
                KeyPatch {
                    report_only: Some(true),
                    ..KeyPatch::default()
                },
                &actor(),
                now,
            )
            .unwrap();
        other.revoke(&b.id, &actor(), now).unwrap();

        let feed = store.changes(start.upto).await.unwrap();
        assert_eq!(feed.upto, 5, "create, lockout, create, update, revoke");
        let ids: Vec<&str> = feed.keys.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, [a.key.id.as_str(), b.id.as_str()], "each key once");
        assert!(feed.keys[0].report_only, "in its latest state");
        assert!(!feed.keys[1].is_active());
        assert_eq!(store.changes(feed.upto).await.unwrap().keys, []);
        // Only what came after the given point.
        let later = store.changes(a.seq).await.unwrap();
        assert_eq!(later.upto, feed.upto);
        assert_eq!(later.keys.len(), 2);
        let snapshot = store.snapshot().await.unwrap();
        assert_eq!(snapshot.upto, feed.upto);
        assert_eq!(snapshot.keys, feed.keys);
        drop((store, other));
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! A dry run of one management write: the handler's store call runs against
//! [`Preview`], which answers with the key as it would be stored and records
//! the call instead of making it. The API asks the daemon whether the
//! datapath can hold that key, and only then replays the recorded call on the
//! real store (one transaction, as always): a write the datapath cannot
//! enforce is never committed.

use std::time::SystemTime;

use crate::{
    keys::{Digest, Key, Origin},
    store::{Actor, AuditEntry, AuditEvent, KeyPatch, KeyStore, StoreError, StoredKey},
};

/// The write a handler asked for, to make for real once it is known to fit.
#[derive(Clone, Debug)]
pub enum Call {
    Create(Key),
    Update(String, KeyPatch),
    Revoke(String),
    Rotate(String, Digest),
}

impl Call {
    /// Make the write on `store`: the store validates it as it always does.
    pub fn replay(
        self,
        store: &mut dyn KeyStore,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        match self {
            Call::Create(new) => store.create(new, actor, now),
            Call::Update(id, patch) => store.update(&id, patch, actor, now).map(|(_, k)| k),
            Call::Revoke(id) => store.revoke(&id, actor, now),
            Call::Rotate(id, digest) => store.rotate(&id, digest, actor, now),
        }
    }
}

/// Reads go to the store; writes are recorded and answered with the key they
/// would store (the fields the policy depends on are exact; timestamps are
/// the call's `now`).
pub struct Preview<'a> {
    inner: &'a mut dyn KeyStore,
    call: Option<Call>,
}

impl<'a> Preview<'a> {
    pub fn new(inner: &'a mut dyn KeyStore) -> Self {
        Self { inner, call: None }
    }

    /// The write the handler made, if any.
    #[must_use]
    pub fn into_call(self) -> Option<Call> {
        self.call
    }

    /// The current, not revoked, key `id` (the store refuses changes to a
    /// revoked key with the same error).
    fn active(&mut self, id: &str) -> Result<StoredKey, StoreError> {
        let key = self.inner.key(id)?;
        if key.is_active() {
            Ok(key)
        } else {
            Err(StoreError::Revoked(id.to_owned()))
        }
    }
}

impl KeyStore for Preview<'_> {
    fn keys(&mut self) -> Result<Vec<StoredKey>, StoreError> {
        self.inner.keys()
    }

    fn key(&mut self, id: &str) -> Result<StoredKey, StoreError> {
        self.inner.key(id)
    }

    fn create(
        &mut self,
        new: Key,
        _actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        let key = StoredKey {
            key: std::sync::Arc::new(Key {
                origin: Origin::Store,
                ..new.clone()
            }),
            created_at: now,
            updated_at: now,
            last_used_at: None,
            revoked_at: None,
        };
        self.call = Some(Call::Create(new));
        Ok(key)
    }

    fn update(
        &mut self,
        id: &str,
        patch: KeyPatch,
        _actor: &Actor,
        now: SystemTime,
    ) -> Result<(StoredKey, StoredKey), StoreError> {
        let before = self.active(id)?;
        let mut after = before.clone();
        let facts = after.key_mut();
        if let Some(name) = &patch.name {
            facts.name.clone_from(name);
        }
        if let Some(allow) = &patch.allow {
            facts.allow = allow.clone();
        }
        if let Some(report_only) = patch.report_only {
            facts.report_only = report_only;
        }
        after.updated_at = now;
        self.call = Some(Call::Update(id.to_owned(), patch));
        Ok((before, after))
    }

    fn revoke(
        &mut self,
        id: &str,
        _actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        let mut key = self.active(id)?;
        key.revoked_at = Some(now);
        key.updated_at = now;
        self.call = Some(Call::Revoke(id.to_owned()));
        Ok(key)
    }

    fn rotate(
        &mut self,
        id: &str,
        digest: Digest,
        _actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        let mut key = self.active(id)?;
        key.key_mut().digest = digest;
        key.updated_at = now;
        self.call = Some(Call::Rotate(id.to_owned(), digest));
        Ok(key)
    }

    fn audit(
        &mut self,
        after: i64,
        limit: usize,
        key_id: Option<&str>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit(after, limit, key_id)
    }

    /// Events (lockouts) are audit rows of their own, never part of a key
    /// write, so nothing replays them: they go straight to the store.
    fn record_event(&mut self, event: &AuditEvent, now: SystemTime) -> Result<(), StoreError> {
        self.inner.record_event(event, now)
    }

    fn touch_last_used(&mut self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        self.inner.touch_last_used(used)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;
    use crate::{
        keys::{credentials as secret, testing::list},
        store::sqlite::SqliteStore,
    };

    fn store() -> (SqliteStore, std::path::PathBuf) {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let dir =
            std::env::temp_dir().join(format!("keyfence-preview-{:016x}", u64::from_ne_bytes(b)));
        std::fs::create_dir_all(&dir).unwrap();
        (SqliteStore::open(&dir.join("k.db")).unwrap(), dir)
    }

    fn actor() -> Actor {
        Actor {
            principal: "admin:ops".into(),
            address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        }
    }

    #[test]
    fn a_preview_writes_nothing_and_its_replay_stores_what_it_answered() {
        let (mut s, dir) = store();
        let now = UNIX_EPOCH + Duration::from_hours(500_000);
        let new = Key {
            name: "ci".into(),
            digest: [1; 32],
            ..crate::keys::testing::key(&secret::new_key_id(), "", "198.51.100.7")
        };
        let mut preview = Preview::new(&mut s);
        let would_be = preview.create(new.clone(), &actor(), now).unwrap();
        let call = preview.into_call().expect("recorded");
        assert!(s.keys().unwrap().is_empty(), "nothing stored");
        assert!(s.audit(0, 10, None).unwrap().is_empty(), "nothing audited");
        let stored = call.replay(&mut s, &actor(), now).unwrap();
        assert_eq!(stored, would_be);

        // An update: the patched key answered, the stored one unchanged.
        let patch = KeyPatch {
            allow: Some(list("198.51.100.0/24, 203.0.113.9")),
            report_only: Some(true),
            ..KeyPatch::default()
        };
        let later = now + Duration::from_secs(5);
        let mut preview = Preview::new(&mut s);
        let (before, after) = preview.update(&new.id, patch, &actor(), later).unwrap();
        let call = preview.into_call().expect("recorded");
        assert_eq!(before, stored);
        assert_eq!(s.key(&new.id).unwrap(), stored, "not written");
        let written = call.replay(&mut s, &actor(), later).unwrap();
        assert_eq!(
            (written.allow.clone(), written.report_only),
            (after.allow.clone(), true)
        );

        // Revoked: the preview refuses changes as the store does.
        let mut preview = Preview::new(&mut s);
        let revoked = preview.revoke(&new.id, &actor(), later).unwrap();
        assert!(!revoked.is_active());
        preview
            .into_call()
            .unwrap()
            .replay(&mut s, &actor(), later)
            .unwrap();
        let mut preview = Preview::new(&mut s);
        assert!(matches!(
            preview.rotate(&new.id, [2; 32], &actor(), later),
            Err(StoreError::Revoked(_))
        ));
        assert!(preview.into_call().is_none());
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! A dry run of one management write: the handler's store call runs against
//! [`Preview`], which answers with the key as it would be stored and records
//! the call instead of making it. The API asks the daemon whether the
//! datapath can hold that key, and only then replays the recorded call on the
//! real store (one transaction, as always): a write the datapath cannot
//! enforce is never committed.

use std::time::SystemTime;

use crate::store::{Actor, AuditEntry, KeyPatch, KeyStore, NewKey, StoreError, StoredKey};

/// The write a handler asked for, to make for real once it is known to fit.
#[derive(Clone, Debug)]
pub enum Call {
    Create(NewKey),
    Update(String, KeyPatch),
    Revoke(String),
    Rotate(String, [u8; 32]),
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
        new: NewKey,
        _actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        let key = StoredKey {
            id: new.id.clone(),
            name: new.name.clone(),
            tenant: new.tenant.clone(),
            scopes: new.scopes.clone(),
            digest: new.digest,
            allow: new.allow.clone(),
            report_only: new.report_only,
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
        if let Some(name) = &patch.name {
            after.name.clone_from(name);
        }
        if let Some(allow) = &patch.allow {
            after.allow = allow.clone();
        }
        if let Some(report_only) = patch.report_only {
            after.report_only = report_only;
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
        digest: [u8; 32],
        _actor: &Actor,
        now: SystemTime,
    ) -> Result<StoredKey, StoreError> {
        let mut key = self.active(id)?;
        key.digest = digest;
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

    fn touch_last_used(&mut self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        self.inner.touch_last_used(used)
    }
}

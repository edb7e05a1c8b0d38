//! The store's change feed → enforcement. Every key change reaches the
//! daemon here, whoever wrote it: the API's own writes (applied before the API
//! answers, `Apply::Upto`) and another writer's (the event loop polls). A key
//! changes the shim's table first (the authority), then the management
//! principals, then the policy and the maps.

use std::{
    sync::{Arc, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use super::Daemon;
use crate::{
    management::api::{ApiState, EnforceError},
    policy::PolicyState,
    shim::runtime::Shim,
    store::StoredKey,
};

/// A feed batch with more keys than this is applied as one full policy apply
/// instead of key by key.
const BATCH_FULL: usize = 32;

impl Daemon {
    /// Answer a write committed at `seq` once the feed is enforced up to it.
    /// `written` is the key as that write committed it (an embedded store's
    /// write: one writer, one sequence): when `seq` is the only change after
    /// what is applied, it is the feed's state at `seq`, so it is applied
    /// without reading the key back.
    pub(super) async fn enforce_upto(
        &mut self,
        seq: i64,
        written: Option<StoredKey>,
        shim: &Shim,
        api: &ApiState,
    ) -> Result<Duration, EnforceError> {
        let started = Instant::now();
        // A failed apply is remembered in `feed_failure`, answered below.
        match written {
            Some(key) if seq == self.applied + 1 => {
                let result = self.apply_key(key, shim, api);
                self.applied_upto(seq..=seq, result);
            }
            _ if seq > self.applied => self.follow_feed(shim, api).await?,
            _ => {}
        }
        if self
            .feed_failure
            .as_ref()
            .is_some_and(|(range, _)| range.contains(&seq))
            && let Some((_, e)) = self.feed_failure.take()
        {
            return Err(e);
        }
        if seq > self.applied {
            return Err(EnforceError::Behind {
                seq,
                applied: self.applied,
            });
        }
        Ok(started.elapsed())
    }

    /// Enforce what the feed holds after `self.applied`. A failed read
    /// changes nothing (the next poll reads again); a failed apply is logged
    /// and remembered for the write waiting on it.
    pub(super) async fn follow_feed(
        &mut self,
        shim: &Shim,
        api: &ApiState,
    ) -> Result<(), EnforceError> {
        let changes = self
            .store
            .changes(self.applied)
            .await
            .map_err(EnforceError::Feed)?;
        if changes.upto <= self.applied {
            return Ok(());
        }
        let range = self.applied + 1..=changes.upto;
        let result = if changes.keys.len() > BATCH_FULL {
            self.apply_keys(changes.keys, shim, api)
        } else {
            changes
                .keys
                .into_iter()
                .map(|key| self.apply_key(key, shim, api))
                .fold(Ok(()), Result::and)
        };
        self.applied_upto(range, result);
        Ok(())
    }

    /// The feed is applied up to the end of `range`, with `result`.
    fn applied_upto(
        &mut self,
        range: std::ops::RangeInclusive<i64>,
        result: Result<(), EnforceError>,
    ) {
        self.applied = *range.end();
        self.progress.send_replace(self.applied);
        match result {
            Ok(()) => self.feed_failure = None,
            Err(e) => {
                tracing::error!(error = %e, "a change from the store is not fully enforced");
                self.feed_failure = Some((range, e));
            }
        }
    }

    /// Many changed keys at once (an import by another writer): one key
    /// table, one principals rebuild, one full policy apply. As for a single
    /// key, the policy follows the shim whatever the maps do.
    fn apply_keys(
        &mut self,
        keys: Vec<StoredKey>,
        shim: &Shim,
        api: &ApiState,
    ) -> Result<(), EnforceError> {
        let started = Instant::now();
        let count = keys.len();
        for key in keys {
            self.stored.set(key);
        }
        shim.set_keys(self.key_table());
        *api.principals
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            Arc::new(self.principals().map_err(EnforceError::Principals)?);
        self.policy =
            PolicyState::build(&self.config.listeners, &self.key_facts(), SystemTime::now());
        if let Err(e) = self.enforce() {
            self.datapath_failed(&e).map_err(EnforceError::Datapath)?;
        }
        self.record_policy(started);
        tracing::info!(keys = count, "store changes applied as one policy");
        Ok(())
    }

    /// Enforce one key's new state: the shim's key table, the management
    /// principals, the policy and the BPF maps.
    fn apply_key(
        &mut self,
        key: StoredKey,
        shim: &Shim,
        api: &ApiState,
    ) -> Result<(), EnforceError> {
        let started = Instant::now();
        let id = key.id.clone();
        let old = self.stored.set(key);
        // The shim first: it is the authority, and changing its table cannot
        // fail for want of map space.
        let new = self.stored.get(&id);
        shim.replace_key(old.as_deref(), new.cloned());
        // Principals are the config's admins and admin-scoped keys: rebuilt
        // only when such a key changes.
        if old.as_ref().is_some_and(|k| k.is_admin()) || new.is_some_and(|k| k.is_admin()) {
            *api.principals
                .write()
                .unwrap_or_else(PoisonError::into_inner) =
                Arc::new(self.principals().map_err(EnforceError::Principals)?);
        }
        let now = SystemTime::now();
        // The policy follows the shim whatever the maps do: it is what the
        // datapath must pass, and what a reconcile writes.
        let full = if self.policy.next_change().is_some_and(|t| now >= t) {
            // An entry expired since the last compile: start over.
            self.policy = PolicyState::build(&self.config.listeners, &self.key_facts(), now);
            true
        } else {
            let new = self.stored.get(&id);
            let change = self
                .policy
                .change_key(old.as_deref(), new.map(AsRef::as_ref), now);
            // Out of sync, only a full apply catches the maps up.
            change.reshaped
                || self.reconcile.is_some()
                || match self.write_changes(&change.restricted) {
                    Ok(written) => !written,
                    Err(e) => {
                        self.datapath_failed(&e).map_err(EnforceError::Datapath)?;
                        false
                    }
                }
        };
        if full && let Err(e) = self.enforce() {
            self.datapath_failed(&e).map_err(EnforceError::Datapath)?;
        }
        self.record_policy(started);
        Ok(())
    }

    /// Write keys' last-use times (seen by the shim) to the store.
    pub(super) async fn flush_last_used(&self, sources: &crate::shim::sources::Sources) {
        let used: Vec<(String, SystemTime)> = sources
            .last_used()
            .into_iter()
            .filter(|(id, _)| self.stored.contains(id))
            .collect();
        if used.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch_last_used(&used).await {
            tracing::warn!(error = %e, "recording keys' last use");
        }
    }
}

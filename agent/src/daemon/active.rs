//! The store's keys as the daemon keeps them: the active ones only, each
//! the one shared [`Key`] record the shim's table, the principals and the
//! policy read too. Names, timestamps and revoked keys stay in the store,
//! which the API and the console read; nothing the daemon enforces needs
//! them (at 100k keys the copies with their timestamps cost 12 MiB).

use std::{
    borrow::Borrow,
    collections::HashSet,
    hash::{Hash, Hasher},
    sync::Arc,
};

use crate::{keys::Key, store::StoredKey};

/// Active stored keys by id.
#[derive(Debug, Default)]
pub(super) struct ActiveKeys {
    by_id: HashSet<ById>,
}

/// A key, equal to another and hashed by its id alone, and found by it.
#[derive(Debug)]
struct ById(Arc<Key>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl Hash for ById {
    // As `str` hashes: `Borrow` requires the same hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.as_str().hash(state);
    }
}

impl ActiveKeys {
    /// The active keys of `rows` (a snapshot of the store).
    pub(super) fn new(rows: impl IntoIterator<Item = StoredKey>) -> Self {
        let mut keys = Self::default();
        for row in rows {
            keys.set(row);
        }
        keys
    }

    /// Take `row` as its key's new state; the key's previous state if it
    /// was active.
    pub(super) fn set(&mut self, row: StoredKey) -> Option<Arc<Key>> {
        let old = self.by_id.take(row.id.as_str()).map(|k| k.0);
        if row.is_active() {
            self.by_id.insert(ById(row.key));
        }
        old
    }

    pub(super) fn get(&self, id: &str) -> Option<&Arc<Key>> {
        self.by_id.get(id).map(|k| &k.0)
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.by_id.contains(id)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.by_id.iter().map(|k| &k.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::keys::testing::key;

    fn row(id: &str, allow: &str, revoked: bool) -> StoredKey {
        let now = SystemTime::UNIX_EPOCH;
        StoredKey {
            key: Arc::new(key(id, &format!("secret-{id}-0000000000000"), allow)),
            created_at: now,
            updated_at: now,
            last_used_at: None,
            revoked_at: revoked.then_some(now),
        }
    }

    #[test]
    fn only_active_keys_are_kept_and_a_change_hands_back_the_old_state() {
        let mut keys =
            ActiveKeys::new([row("a", "192.0.2.1", false), row("gone", "192.0.2.2", true)]);
        assert_eq!(keys.len(), 1);
        assert!(keys.contains("a") && !keys.contains("gone"));
        let changed = row("a", "192.0.2.3", false);
        let shared = changed.key.clone();
        let old = keys.set(changed).expect("a was active");
        assert_eq!(old.allow, crate::keys::testing::list("192.0.2.1"));
        assert!(
            Arc::ptr_eq(keys.get("a").unwrap(), &shared),
            "one record, shared"
        );
        assert!(keys.set(row("b", "", false)).is_none());
        let revoked = keys.set(row("a", "192.0.2.3", true));
        assert!(revoked.is_some());
        assert!(!keys.contains("a"));
        assert_eq!(
            keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert!(
            keys.set(row("a", "192.0.2.3", true)).is_none(),
            "revoked twice"
        );
    }
}

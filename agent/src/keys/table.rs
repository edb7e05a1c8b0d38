//! Lookup by secret digest: the shim's listener keys and the management
//! principals are the same kind of table. A presented secret is hashed and
//! looked up by its digest, so lookup time does not depend on how much of a
//! stored secret the presented one shares.

use std::{borrow::Borrow, collections::HashSet, hash::Hash, sync::Arc};

use super::{Digest, Key, credentials::digest};

/// What a [`Table`] holds: something a secret's digest names.
pub trait Credentialed {
    fn digest(&self) -> &Digest;
}

impl Credentialed for Key {
    fn digest(&self) -> &Digest {
        &self.digest
    }
}

/// Rows by secret digest; rows are shared (`Arc`) with whoever built them.
/// A set of the rows themselves, hashed by the digest they hold: 8 bytes a
/// slot, where a map from a copy of the digest took 40 (4 MiB more at 100k
/// keys, for every table).
#[derive(Debug)]
pub struct Table<T> {
    by_digest: HashSet<ByDigest<T>>,
}

/// A row, equal to another and hashed by its digest alone, and found by it.
#[derive(Debug)]
struct ByDigest<T>(Arc<T>);

impl<T> Clone for ByDigest<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Credentialed> Borrow<Digest> for ByDigest<T> {
    fn borrow(&self) -> &Digest {
        self.0.digest()
    }
}

impl<T: Credentialed> PartialEq for ByDigest<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.digest() == other.0.digest()
    }
}

impl<T: Credentialed> Eq for ByDigest<T> {}

impl<T: Credentialed> Hash for ByDigest<T> {
    // As `Digest` hashes: `Borrow` requires the same hash.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.digest().hash(state);
    }
}

/// The shim's keys: static and active stored keys.
pub type KeyTable = Table<Key>;

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            by_digest: HashSet::new(),
        }
    }
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Self {
            by_digest: self.by_digest.clone(),
        }
    }
}

impl<T: Credentialed> Table<T> {
    #[must_use]
    pub fn new(rows: impl IntoIterator<Item = Arc<T>>) -> Self {
        Self {
            by_digest: rows.into_iter().map(ByDigest).collect(),
        }
    }

    /// Put one row's new state in place of its old one (`new`: `None` when it
    /// is gone). Costs the same at any size.
    pub fn replace(&mut self, old: Option<&T>, new: Option<Arc<T>>) {
        if let Some(old) = old {
            self.by_digest.remove(old.digest());
        }
        if let Some(new) = new {
            self.by_digest.replace(ByDigest(new));
        }
    }

    /// The row of a presented secret.
    #[must_use]
    pub fn lookup(&self, secret: &str) -> Option<&Arc<T>> {
        self.lookup_digest(&digest(secret))
    }

    /// The row of a secret known by its digest (a console session keeps the
    /// digest, never the token).
    #[must_use]
    pub fn lookup_digest(&self, digest: &Digest) -> Option<&Arc<T>> {
        self.by_digest.get(digest).map(|row| &row.0)
    }
}

impl<T> Table<T> {
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::testing::key;

    #[test]
    fn rows_are_found_by_secret_and_replaced_in_place() {
        let a = Arc::new(key("a", "secret-a-0000000000000", ""));
        let mut t = KeyTable::new([a.clone()]);
        assert_eq!(t.len(), 1);
        assert!(Arc::ptr_eq(t.lookup("secret-a-0000000000000").unwrap(), &a));
        assert!(t.lookup("secret-b-0000000000000").is_none());
        let rotated = Arc::new(key("a", "secret-b-0000000000000", ""));
        t.replace(Some(&a), Some(rotated));
        assert!(t.lookup("secret-a-0000000000000").is_none());
        assert_eq!(t.lookup("secret-b-0000000000000").unwrap().id, "a");
        t.replace(Some(&key("a", "secret-b-0000000000000", "")), None);
        assert!(t.is_empty());
    }
}

//! A dry run of one management write: what the key would become if
//! [`KeyWrite`] were committed now, read from the store but written nowhere.
//! The API asks the daemon whether the datapath can hold that key, and only
//! then makes the write on the store (one transaction, as always): a write the
//! datapath cannot enforce is never committed.

use std::time::SystemTime;

use crate::{
    keys::{Key, Origin},
    store::{KeyStore, KeyWrite, StoreError, StoredKey},
};

/// The key `write` would store at `now`: the fields the policy depends on are
/// exact; timestamps are `now`. Refused as the store would refuse it (an
/// unknown or revoked key); a conflict (a duplicate id or secret) only shows
/// when the write is made.
pub async fn would_be(
    store: &dyn KeyStore,
    write: &KeyWrite,
    now: SystemTime,
) -> Result<StoredKey, StoreError> {
    let key = match write {
        KeyWrite::Create(new) => {
            return Ok(StoredKey {
                key: std::sync::Arc::new(Key {
                    origin: Origin::Store,
                    ..new.clone()
                }),
                created_at: now,
                updated_at: now,
                last_used_at: None,
                revoked_at: None,
            });
        }
        KeyWrite::Update { id, patch } => {
            let mut key = active(store, id).await?;
            let facts = key.key_mut();
            if let Some(name) = &patch.name {
                facts.name.clone_from(name);
            }
            if let Some(allow) = &patch.allow {
                facts.allow = allow.clone();
            }
            if let Some(report_only) = patch.report_only {
                facts.report_only = report_only;
            }
            key
        }
        KeyWrite::Revoke { id } => {
            let mut key = active(store, id).await?;
            key.revoked_at = Some(now);
            key
        }
        KeyWrite::Rotate { id, digest } => {
            let mut key = active(store, id).await?;
            key.key_mut().digest = *digest;
            key
        }
    };
    Ok(StoredKey {
        updated_at: now,
        ..key
    })
}

/// The current, not revoked, key `id` (the store refuses changes to a
/// revoked key with the same error).
async fn active(store: &dyn KeyStore, id: &str) -> Result<StoredKey, StoreError> {
    let key = store.key(id).await?;
    if key.is_active() {
        Ok(key)
    } else {
        Err(StoreError::Revoked(id.to_owned()))
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
        store::{Actor, KeyPatch, embedded::Embedded},
    };

    fn store() -> (Embedded, std::path::PathBuf) {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let dir =
            std::env::temp_dir().join(format!("keyfence-preview-{:016x}", u64::from_ne_bytes(b)));
        std::fs::create_dir_all(&dir).unwrap();
        (Embedded::open(&dir.join("k.db")).unwrap(), dir)
    }

    fn actor() -> Actor {
        Actor {
            principal: "admin:ops".into(),
            address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        }
    }

    #[tokio::test]
    async fn a_preview_writes_nothing_and_the_write_stores_what_it_answered() {
        let (s, dir) = store();
        let now = UNIX_EPOCH + Duration::from_hours(500_000);
        let new = Key {
            name: "ci".into(),
            digest: [1; 32],
            ..crate::keys::testing::key(&secret::new_key_id(), "", "198.51.100.7")
        };
        let create = KeyWrite::Create(new.clone());
        let would_be = would_be(&s, &create, now).await.unwrap();
        assert!(s.keys().await.unwrap().is_empty(), "nothing stored");
        assert!(
            s.audit(0, 10, None).await.unwrap().is_empty(),
            "nothing audited"
        );
        let stored = s.write(create, &actor(), now).await.unwrap().key;
        assert_eq!(stored, would_be);

        // An update: the patched key answered, the stored one unchanged.
        let update = KeyWrite::Update {
            id: new.id.clone(),
            patch: KeyPatch {
                allow: Some(list("198.51.100.0/24, 203.0.113.9")),
                report_only: Some(true),
                ..KeyPatch::default()
            },
        };
        let later = now + Duration::from_secs(5);
        let after = super::would_be(&s, &update, later).await.unwrap();
        assert_eq!(s.key(&new.id).await.unwrap(), stored, "not written");
        let written = s.write(update, &actor(), later).await.unwrap().key;
        assert_eq!(written, after);

        // Revoked: the preview refuses changes as the store does.
        let revoke = KeyWrite::Revoke { id: new.id.clone() };
        let revoked = super::would_be(&s, &revoke, later).await.unwrap();
        assert!(!revoked.is_active());
        assert_eq!(s.write(revoke, &actor(), later).await.unwrap().key, revoked);
        let rotate = KeyWrite::Rotate {
            id: new.id.clone(),
            digest: [2; 32],
        };
        assert!(matches!(
            super::would_be(&s, &rotate, later).await,
            Err(StoreError::Revoked(_))
        ));
        let unknown = KeyWrite::Revoke {
            id: "key_unknown".into(),
        };
        assert!(matches!(
            super::would_be(&s, &unknown, later).await,
            Err(StoreError::NotFound(_))
        ));
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! The keys domain: what a key is, wherever it comes from and whoever reads it.
//!
//! [`Key`] is the one fact type. A static key of the config becomes one when
//! its secret is resolved ([`statics`]); a stored key holds one
//! (`store::StoredKey`). The shim's table, the management principals, the
//! policy compiler, the store and the API all read the same shared, immutable
//! value: a change makes a new `Key`, never edits one in place.
//!
//! - [`validate`]: the rules for names, tenants, scopes and ids that the config
//!   loader and the API both apply;
//! - [`credentials`]: secrets (generated, digested, read from `*_env`) and the
//!   credential of a request (`Authorization: Bearer`, the key header);
//! - [`table`]: the lookup by secret digest shared by listener keys and principals.

pub mod credentials;
pub mod scopes;
pub mod table;
pub mod validate;

use std::sync::Arc;

use crate::{allowlist::AllowList, config::StaticKey};

pub use credentials::Digest;
pub use scopes::Scopes;
pub use table::{KeyTable, Table};

/// The scope a key needs to be usable on listeners (SPEC §6).
pub const API_SCOPE: &str = "api";
/// The scope that makes a stored key a management principal.
pub const ADMIN_SCOPE: &str = "admin";
/// The tenant of a key that names none.
pub const DEFAULT_TENANT: &str = "default";

/// Where a key is defined, and so where it may be changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The config's `keys`: read-only through the API.
    Config,
    /// The store (made through the API).
    Store,
}

impl Origin {
    /// The `source` field of the API's key objects.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Store => "api",
        }
    }
}

/// One key: everything any part of keyfence decides with. Validated before it
/// is built (see [`validate`]); the secret itself is never kept, only its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub name: String,
    pub tenant: String,
    /// Of [`API_SCOPE`] and [`ADMIN_SCOPE`].
    pub scopes: Scopes,
    /// SHA-256 of the secret.
    pub digest: Digest,
    /// Empty = unrestricted.
    pub allow: AllowList,
    pub report_only: bool,
    pub origin: Origin,
}

impl Key {
    #[must_use]
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    /// A management principal (the `admin` scope).
    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.has_scope(ADMIN_SCOPE)
    }

    /// Usable on listeners (the `api` scope).
    #[must_use]
    pub fn is_api(&self) -> bool {
        self.has_scope(API_SCOPE)
    }
}

/// The config's static keys as keys: each `secret_env` is read now; a missing
/// or short one is an error naming the key.
pub fn statics(keys: &[StaticKey]) -> anyhow::Result<Arc<[Arc<Key>]>> {
    keys.iter()
        .map(|k| {
            Ok(Arc::new(Key {
                id: k.id.clone(),
                name: k.name.clone(),
                tenant: k.tenant.clone(),
                scopes: k.scopes,
                digest: credentials::resolve(&k.secret, &format!("key {}", k.id))?,
                allow: k.allow.clone(),
                report_only: k.report_only,
                origin: Origin::Config,
            }))
        })
        .collect()
}

#[cfg(test)]
pub mod testing {
    //! Builders shared by the unit tests of every room that handles keys.

    use super::{DEFAULT_TENANT, Key, Origin, credentials::digest};
    use crate::{
        allowlist::{DEFAULT_MAX_ENTRIES, RawList, parse_list},
        config::{ClientIp, ClientIpSource, ListenerConfig, ListenerMode},
    };

    /// An allow list in the grammar of SPEC §3 (`"a, b/24"`); panics when invalid.
    #[must_use]
    pub fn list(s: &str) -> crate::allowlist::AllowList {
        parse_list(&RawList::One(s.into()), DEFAULT_MAX_ENTRIES).unwrap()
    }

    /// A stored-origin `api` key of tenant `default` whose secret is `secret`.
    #[must_use]
    pub fn key(id: &str, secret: &str, allow: &str) -> Key {
        Key {
            id: id.into(),
            name: id.into(),
            tenant: DEFAULT_TENANT.into(),
            scopes: super::Scopes::API,
            digest: digest(secret),
            allow: list(allow),
            report_only: false,
            origin: Origin::Store,
        }
    }

    /// An auth-mode listener on `[::]:port`, peer addresses, early drop, every tenant.
    #[must_use]
    pub fn listener(name: &str, port: u16) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            bind: format!("[::]:{port}").parse().unwrap(),
            mode: ListenerMode::Auth,
            upstream: None,
            upstream_timeout: crate::config::DEFAULT_UPSTREAM_TIMEOUT,
            upstream_ca: None,
            tls: None,
            client_ip: ClientIp {
                source: ClientIpSource::Peer,
                trusted_proxies: vec![],
                hops: 1,
            },
            early_drop: true,
            tenants: None,
            key_header: None,
            connections: crate::conn::ConnLimits::default(),
            forward_credential: true,
        }
    }
}

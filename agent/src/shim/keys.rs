//! The shim's view of keys: a table indexed by the SHA-256 of the secret, and
//! the per-request decision (SPEC §5). Secrets are never kept: a presented key
//! is hashed and looked up by its digest, so lookup time does not depend on how
//! much of a stored secret the presented one shares.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::SystemTime};

use sha2::{Digest as _, Sha256};

use crate::{
    allowlist::{AllowList, fold_ip},
    config::ListenerConfig,
    policy::{KeyAccess, accepts},
};

/// A key as the shim needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimKey {
    pub id: String,
    pub tenant: String,
    pub scopes: Vec<String>,
    pub allow: AllowList,
    pub report_only: bool,
}

impl ShimKey {
    /// The key `id` with the access facts of a static or stored key.
    #[must_use]
    pub fn new(id: &str, access: KeyAccess<'_>) -> Self {
        Self {
            id: id.to_owned(),
            tenant: access.tenant.to_owned(),
            scopes: access.scopes.to_vec(),
            allow: access.allow.clone(),
            report_only: access.report_only,
        }
    }

    fn access(&self) -> KeyAccess<'_> {
        KeyAccess {
            tenant: &self.tenant,
            scopes: &self.scopes,
            allow: &self.allow,
            report_only: self.report_only,
        }
    }
}

/// SHA-256 of a presented secret.
#[must_use]
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Keys by secret digest; immutable, swapped whole on change.
#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    by_digest: HashMap<[u8; 32], Arc<ShimKey>>,
}

impl KeyTable {
    #[must_use]
    pub fn new(keys: impl IntoIterator<Item = ([u8; 32], ShimKey)>) -> Self {
        Self {
            by_digest: keys.into_iter().map(|(d, k)| (d, Arc::new(k))).collect(),
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Put one key's new state in place of its old one (`old`: the digest it
    /// had; `new`: `None` when it is revoked). Costs the same at any size.
    pub fn replace(&mut self, old: Option<[u8; 32]>, new: Option<([u8; 32], ShimKey)>) {
        if let Some(digest) = old {
            self.by_digest.remove(&digest);
        }
        if let Some((digest, key)) = new {
            self.by_digest.insert(digest, Arc::new(key));
        }
    }

    #[must_use]
    pub fn lookup(&self, secret: &str) -> Option<&Arc<ShimKey>> {
        self.by_digest.get(&digest(secret))
    }
}

/// What the shim does with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No key, an unknown or revoked one, or one this listener does not accept.
    InvalidKey,
    /// The key is valid but the client address is outside its list (or unknown).
    IpNotAllowed {
        key: Arc<ShimKey>,
        ip: Option<IpAddr>,
    },
    /// Would be refused, but the key only reports.
    ReportOnly {
        key: Arc<ShimKey>,
        ip: Option<IpAddr>,
    },
    Allowed {
        key: Arc<ShimKey>,
    },
}

/// Decide one request. `client` is `None` when the client address could not be
/// established (a malformed `X-Forwarded-For`): only an unrestricted key passes.
#[must_use]
pub fn decide(
    listener: &ListenerConfig,
    table: &KeyTable,
    presented: Option<&str>,
    client: Option<IpAddr>,
    now: SystemTime,
) -> Verdict {
    let Some(key) = presented.and_then(|s| table.lookup(s)) else {
        return Verdict::InvalidKey;
    };
    if !accepts(listener, &key.access()) {
        return Verdict::InvalidKey;
    }
    let client = client.map(fold_ip);
    let allowed = key.allow.is_unrestricted() || client.is_some_and(|ip| key.allow.allows(ip, now));
    match (allowed, key.report_only) {
        (true, _) => Verdict::Allowed { key: key.clone() },
        (false, true) => Verdict::ReportOnly {
            key: key.clone(),
            ip: client,
        },
        (false, false) => Verdict::IpNotAllowed {
            key: key.clone(),
            ip: client,
        },
    }
}

/// The header that carried a request's API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialHeader {
    Authorization,
    /// The listener's `key_header`.
    KeyHeader,
}

/// The API key credential of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// Neither `Authorization` nor the listener's `key_header`.
    Absent,
    /// Exactly one credential header. `key` is `None` when its value cannot
    /// be a key: another scheme than `Bearer`, bytes that are not UTF-8, or
    /// nothing after trimming.
    One {
        header: CredentialHeader,
        key: Option<&'a str>,
    },
    /// More than one credential header: refused, because the shim would check
    /// one and the upstream might read another.
    Several,
}

impl<'a> Credential<'a> {
    /// The key to check, if the request carries exactly one readable one.
    #[must_use]
    pub fn key(&self) -> Option<&'a str> {
        match self {
            Credential::One { key, .. } => *key,
            Credential::Absent | Credential::Several => None,
        }
    }
}

/// The credential of a request from the raw values of its `Authorization`
/// headers and of the listener's `key_header` (empty when the listener has
/// none). Every value counts, readable or not, and whatever its scheme: a
/// value the shim cannot read must not let another header be the one checked.
#[must_use]
pub fn credential<'a>(authorization: &[&'a [u8]], key_header: &[&'a [u8]]) -> Credential<'a> {
    match (authorization, key_header) {
        ([], []) => Credential::Absent,
        ([value], []) => Credential::One {
            header: CredentialHeader::Authorization,
            key: bearer(value),
        },
        ([], [value]) => Credential::One {
            header: CredentialHeader::KeyHeader,
            key: std::str::from_utf8(value)
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty()),
        },
        _ => Credential::Several,
    }
}

/// The key of `Authorization: Bearer <key>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&str> {
    let (scheme, rest) = std::str::from_utf8(value).ok()?.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        allowlist::AllowEntry,
        config::{ClientIp, ClientIpSource, ListenerMode},
    };

    fn listener(tenants: Option<Vec<String>>) -> ListenerConfig {
        ListenerConfig {
            name: "api".into(),
            bind: "[::]:8443".parse().unwrap(),
            mode: ListenerMode::Auth,
            upstream: None,
            tls: None,
            client_ip: ClientIp {
                source: ClientIpSource::Peer,
                trusted_proxies: vec![],
                hops: 1,
            },
            early_drop: true,
            tenants,
            key_header: None,
            connections: crate::conn::ConnLimits::default(),
            forward_credential: true,
        }
    }

    fn key(id: &str, nets: &[&str]) -> ShimKey {
        ShimKey {
            id: id.into(),
            tenant: "default".into(),
            scopes: vec!["api".into()],
            allow: AllowList::from_canonical(
                nets.iter()
                    .map(|n| AllowEntry {
                        net: n.parse().unwrap(),
                        note: None,
                        expires_at: None,
                    })
                    .collect(),
            ),
            report_only: false,
        }
    }

    fn table(keys: Vec<(&str, ShimKey)>) -> KeyTable {
        KeyTable::new(keys.into_iter().map(|(s, k)| (digest(s), k)))
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    #[expect(
        clippy::unnecessary_wraps,
        reason = "every call site passes an Option<IpAddr>"
    )]
    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_seed_cases() {
        let t = table(vec![
            (
                "kf_prod_secret_0000000000",
                key("prod", &["203.0.113.100/32", "198.51.100.0/24"]),
            ),
            ("kf_dev_secret_00000000000", key("dev", &[])),
            ("kf_v6_secret_000000000000", key("v6", &["2001:db8:1::/48"])),
        ]);
        let l = listener(None);
        let d = |s, c| decide(&l, &t, s, c, T0);
        assert!(matches!(
            d(Some("kf_prod_secret_0000000000"), ip("203.0.113.100")),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            d(Some("kf_prod_secret_0000000000"), ip("198.51.100.77")),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            d(Some("kf_prod_secret_0000000000"), ip("203.0.113.101")),
            Verdict::IpNotAllowed { ip: Some(_), .. }
        ));
        assert!(matches!(
            d(
                Some("kf_prod_secret_0000000000"),
                ip("::ffff:203.0.113.100")
            ),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            d(Some("kf_dev_secret_00000000000"), ip("192.0.2.1")),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            d(Some("kf_dev_secret_00000000000"), None),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            d(Some("kf_v6_secret_000000000000"), ip("2001:db8:1:2::3")),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            d(Some("kf_v6_secret_000000000000"), ip("2001:db8:2::3")),
            Verdict::IpNotAllowed { .. }
        ));
        assert!(matches!(
            d(Some("kf_prod_secret_0000000000"), None),
            Verdict::IpNotAllowed { ip: None, .. }
        ));
        assert_eq!(d(Some("nope"), ip("203.0.113.100")), Verdict::InvalidKey);
        assert_eq!(d(None, ip("203.0.113.100")), Verdict::InvalidKey);
    }

    #[test]
    fn tenants_scopes_and_report_only() {
        let mut other = key("other", &[]);
        other.tenant = "acme".into();
        let mut admin_only = key("adm", &[]);
        admin_only.scopes = vec!["admin".into()];
        let mut report = key("rep", &["192.0.2.1/32"]);
        report.report_only = true;
        let t = table(vec![
            ("s-other-000000000000000", other),
            ("s-adm-000000000000000000", admin_only),
            ("s-rep-000000000000000000", report),
        ]);
        let default_only = listener(Some(vec!["default".into()]));
        assert_eq!(
            decide(
                &default_only,
                &t,
                Some("s-other-000000000000000"),
                ip("192.0.2.1"),
                T0
            ),
            Verdict::InvalidKey
        );
        assert_eq!(
            decide(
                &listener(None),
                &t,
                Some("s-adm-000000000000000000"),
                ip("192.0.2.1"),
                T0
            ),
            Verdict::InvalidKey
        );
        assert!(matches!(
            decide(
                &listener(None),
                &t,
                Some("s-rep-000000000000000000"),
                ip("192.0.2.9"),
                T0
            ),
            Verdict::ReportOnly { .. }
        ));
        assert!(matches!(
            decide(
                &listener(None),
                &t,
                Some("s-rep-000000000000000000"),
                ip("192.0.2.1"),
                T0
            ),
            Verdict::Allowed { .. }
        ));
    }

    #[test]
    fn one_key_changes_in_place() {
        let mut t = table(vec![(
            "kf_prod_secret_0000000000",
            key("prod", &["192.0.2.1/32"]),
        )]);
        let l = listener(None);
        let ip = |s: &str| Some(s.parse().unwrap());
        let (a, b) = ("kf_prod_secret_0000000000", "kf_rotated_secret_000000");
        // The list changes.
        t.replace(
            Some(digest(a)),
            Some((digest(a), key("prod", &["198.51.100.0/24"]))),
        );
        assert!(matches!(
            decide(&l, &t, Some(a), ip("198.51.100.9"), T0),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            decide(&l, &t, Some(a), ip("192.0.2.1"), T0),
            Verdict::IpNotAllowed { .. }
        ));
        // Rotation: the old secret stops working, the new one works.
        t.replace(
            Some(digest(a)),
            Some((digest(b), key("prod", &["198.51.100.0/24"]))),
        );
        assert!(matches!(
            decide(&l, &t, Some(a), ip("198.51.100.9"), T0),
            Verdict::InvalidKey
        ));
        assert!(matches!(
            decide(&l, &t, Some(b), ip("198.51.100.9"), T0),
            Verdict::Allowed { .. }
        ));
        // Revocation.
        t.replace(Some(digest(b)), None);
        assert!(matches!(
            decide(&l, &t, Some(b), ip("198.51.100.9"), T0),
            Verdict::InvalidKey
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn expiry_is_enforced_on_time() {
        let exp = T0 + Duration::from_secs(100);
        let mut k = key("k", &[]);
        k.allow = AllowList::from_canonical(vec![AllowEntry {
            net: "192.0.2.0/24".parse().unwrap(),
            note: None,
            expires_at: Some(exp),
        }]);
        let t = table(vec![("secret-secret-secret-1", k)]);
        let l = listener(None);
        assert!(matches!(
            decide(
                &l,
                &t,
                Some("secret-secret-secret-1"),
                ip("192.0.2.5"),
                exp - Duration::from_secs(1)
            ),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            decide(&l, &t, Some("secret-secret-secret-1"), ip("192.0.2.5"), exp),
            Verdict::IpNotAllowed { .. }
        ));
    }

    #[test]
    fn one_credential_is_read() {
        let auth = |v: &'static [u8]| credential(&[v], &[]).key();
        assert_eq!(auth(b"Bearer abc"), Some("abc"));
        assert_eq!(auth(b"bearer   abc  "), Some("abc"));
        assert_eq!(auth(b"BEARER abc"), Some("abc"));
        assert_eq!(auth(b"Basic abc"), None);
        assert_eq!(auth(b"Bearer "), None);
        assert_eq!(auth(b"Bearer"), None);
        assert_eq!(auth(b"Bearer ab\xffc"), None);
        assert_eq!(
            credential(&[b"Bearer abc"], &[]),
            Credential::One {
                header: CredentialHeader::Authorization,
                key: Some("abc")
            }
        );
        assert_eq!(
            credential(&[], &[b" xyz "]),
            Credential::One {
                header: CredentialHeader::KeyHeader,
                key: Some("xyz")
            }
        );
        assert_eq!(credential(&[], &[b"  "]).key(), None);
        assert_eq!(credential(&[], &[b"x\xffz"]).key(), None);
        assert_eq!(credential(&[], &[]), Credential::Absent);
        assert_eq!(Credential::Absent.key(), None);
    }

    #[test]
    fn more_than_one_credential_is_several_whatever_the_values() {
        let several = [
            // Two Authorization headers, both bearer, either unreadable.
            credential(&[b"Bearer mine", b"Bearer stolen"], &[]),
            credential(&[b"Bearer mine", b"Basic c3RvbGVu"], &[]),
            credential(&[b"Bearer \xff", b"Bearer stolen"], &[]),
            // Authorization and the key header: the one keyfence would not
            // check is the one an upstream may read.
            credential(&[b"Bearer mine"], &[b"stolen"]),
            credential(&[b"Basic abc"], &[b"stolen"]),
            // An unreadable Authorization must not let the key header win.
            credential(&[b"Bearer \xff\xfe"], &[b"mine"]),
            credential(&[b""], &[b"mine"]),
            // Two key header values.
            credential(&[], &[b"mine", b"stolen"]),
        ];
        for c in several {
            assert_eq!(c, Credential::Several);
            assert_eq!(c.key(), None);
        }
    }
}

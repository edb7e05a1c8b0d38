//! The shim's decision for one request (SPEC §5): the presented key is looked
//! up in the [`KeyTable`] by its digest, checked against the listener (tenant
//! and scope) and the client address against its allow list.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use crate::{
    allowlist::ClientAddr,
    config::ListenerConfig,
    keys::{Key, KeyTable},
    policy::accepts,
};

/// What the shim does with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No key, an unknown or revoked one, or one this listener does not accept.
    InvalidKey,
    /// The key is valid but the client address is outside its list (or unknown).
    IpNotAllowed {
        key: Arc<Key>,
        ip: Option<IpAddr>,
    },
    /// Would be refused, but the key only reports.
    ReportOnly {
        key: Arc<Key>,
        ip: Option<IpAddr>,
    },
    Allowed {
        key: Arc<Key>,
    },
}

/// Decide one request. `client` is `None` when the client address could not be
/// established (a malformed `X-Forwarded-For`): only an unrestricted key passes.
#[must_use]
pub fn decide(
    listener: &ListenerConfig,
    table: &KeyTable,
    presented: Option<&str>,
    client: Option<ClientAddr>,
    now: SystemTime,
) -> Verdict {
    let Some(key) = presented.and_then(|s| table.lookup(s)) else {
        return Verdict::InvalidKey;
    };
    if !accepts(listener, key) {
        return Verdict::InvalidKey;
    }
    let allowed = key.allow.is_unrestricted() || client.is_some_and(|ip| key.allow.allows(ip, now));
    match (allowed, key.report_only) {
        (true, _) => Verdict::Allowed { key: key.clone() },
        (false, true) => Verdict::ReportOnly {
            key: key.clone(),
            ip: client.map(ClientAddr::ip),
        },
        (false, false) => Verdict::IpNotAllowed {
            key: key.clone(),
            ip: client.map(ClientAddr::ip),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        allowlist::{AllowEntry, AllowList},
        keys::{credentials::digest, testing},
    };

    fn listener(tenants: Option<Vec<String>>) -> ListenerConfig {
        ListenerConfig {
            tenants,
            ..testing::listener("api", 8443)
        }
    }

    fn key(id: &str, nets: &[&str]) -> Key {
        testing::key(id, id, &nets.join(", "))
    }

    /// Each key with the digest of its secret.
    fn keyed(secret: &str, key: Key) -> Arc<Key> {
        Arc::new(Key {
            digest: digest(secret),
            ..key
        })
    }

    fn table(keys: Vec<(&str, Key)>) -> KeyTable {
        KeyTable::new(keys.into_iter().map(|(s, k)| keyed(s, k)))
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    #[expect(
        clippy::unnecessary_wraps,
        reason = "every call site passes an Option<ClientAddr>"
    )]
    fn ip(s: &str) -> Option<ClientAddr> {
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
        admin_only.scopes = crate::keys::Scopes::ADMIN;
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
        let (a, b) = ("kf_prod_secret_0000000000", "kf_rotated_secret_000000");
        // The list changes.
        let before = keyed(a, key("prod", &["192.0.2.1/32"]));
        let listed = keyed(a, key("prod", &["198.51.100.0/24"]));
        t.replace(Some(&before), Some(listed.clone()));
        assert!(matches!(
            decide(&l, &t, Some(a), ip("198.51.100.9"), T0),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            decide(&l, &t, Some(a), ip("192.0.2.1"), T0),
            Verdict::IpNotAllowed { .. }
        ));
        // Rotation: the old secret stops working, the new one works.
        let rotated = keyed(b, key("prod", &["198.51.100.0/24"]));
        t.replace(Some(&listed), Some(rotated.clone()));
        assert!(matches!(
            decide(&l, &t, Some(a), ip("198.51.100.9"), T0),
            Verdict::InvalidKey
        ));
        assert!(matches!(
            decide(&l, &t, Some(b), ip("198.51.100.9"), T0),
            Verdict::Allowed { .. }
        ));
        // Revocation.
        t.replace(Some(&rotated), None);
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
}

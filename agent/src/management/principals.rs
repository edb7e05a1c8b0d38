//! Who may call the management API (SPEC §6): the config's `management.admins`
//! and stored keys whose scopes include `admin`, each with its own allow list,
//! authenticated by `Authorization: Bearer`. Also the self-lockout rule: a write
//! must not leave the caller's own list without the address it calls from.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use crate::{
    allowlist::{AllowList, ClientAddr},
    keys::{Digest, Key, Table, table::Credentialed},
};

/// Who calls the management API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// One of the config's `management.admins`: read-only through the API.
    ConfigAdmin {
        name: String,
        /// SHA-256 of the token.
        digest: Digest,
        allow: AllowList,
    },
    /// A stored key with the `admin` scope.
    Key(Arc<Key>),
}

impl Principal {
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Principal::ConfigAdmin { name, .. } => name,
            Principal::Key(k) => &k.name,
        }
    }

    #[must_use]
    pub fn allow(&self) -> &AllowList {
        match self {
            Principal::ConfigAdmin { allow, .. } => allow,
            Principal::Key(k) => &k.allow,
        }
    }

    /// As the audit log names it: `admin:NAME` or `key:ID`.
    #[must_use]
    pub fn label(&self) -> String {
        match self {
            Principal::ConfigAdmin { name, .. } => format!("admin:{name}"),
            Principal::Key(k) => format!("key:{}", k.id),
        }
    }

    /// Is this the key `id` itself?
    #[must_use]
    pub fn is_key(&self, id: &str) -> bool {
        matches!(self, Principal::Key(k) if k.id == id)
    }
}

impl Credentialed for Principal {
    fn digest(&self) -> &Digest {
        match self {
            Principal::ConfigAdmin { digest, .. } => digest,
            Principal::Key(k) => &k.digest,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401: no token, or an unknown one.
    #[error("invalid management token")]
    Unauthenticated,
    /// 403: a valid token from outside its principal's allow list.
    #[error("IP address not allowed")]
    AddressNotAllowed,
}

/// Principals indexed by token digest.
pub type Principals = Table<Principal>;

impl Table<Principal> {
    /// The principal presenting `token` from `client`.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        client: ClientAddr,
        now: SystemTime,
    ) -> Result<&Principal, AuthError> {
        let principal = token
            .and_then(|t| self.lookup(t))
            .ok_or(AuthError::Unauthenticated)?;
        if principal.allow().allows(client, now) {
            Ok(principal)
        } else {
            Err(AuthError::AddressNotAllowed)
        }
    }
}

/// 409: the change would lock the caller out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this change would lock you out: {ip} would no longer be allowed to use this key")]
pub struct LockOut {
    pub ip: IpAddr,
}

/// Refuse a change of key `target`'s allow list to `new_list` when the caller
/// is that very key and `new_list` would exclude the address it calls from.
pub fn check_self_lockout(
    caller: &Principal,
    caller_ip: ClientAddr,
    target: &str,
    new_list: &AllowList,
    now: SystemTime,
) -> Result<(), LockOut> {
    if caller.is_key(target) && !new_list.allows(caller_ip, now) {
        Err(LockOut { ip: caller_ip.ip() })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{
        credentials::digest,
        testing::{key, list},
    };

    fn ip(s: &str) -> ClientAddr {
        s.parse().unwrap()
    }

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    fn principals() -> Principals {
        Principals::new([
            Arc::new(Principal::ConfigAdmin {
                name: "ops".into(),
                digest: digest("ops-token-0123456789abcdef"),
                allow: list("127.0.0.1, 198.51.100.0/24"),
            }),
            Arc::new(Principal::Key(Arc::new(Key {
                name: "ci-admin".into(),
                scopes: crate::keys::Scopes::ADMIN,
                ..key("k1", "kf_admin_key_0123456789abcdef", "")
            }))),
        ])
    }

    #[test]
    fn tokens_and_addresses() {
        let p = principals();
        assert_eq!(
            p.authenticate(Some("ops-token-0123456789abcdef"), ip("198.51.100.7"), NOW)
                .unwrap()
                .name(),
            "ops"
        );
        assert_eq!(
            p.authenticate(
                Some("ops-token-0123456789abcdef"),
                ip("::ffff:127.0.0.1"),
                NOW
            )
            .unwrap()
            .name(),
            "ops"
        );
        assert_eq!(
            p.authenticate(Some("ops-token-0123456789abcdef"), ip("203.0.113.1"), NOW),
            Err(AuthError::AddressNotAllowed)
        );
        assert_eq!(
            p.authenticate(Some("nope"), ip("127.0.0.1"), NOW),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            p.authenticate(None, ip("127.0.0.1"), NOW),
            Err(AuthError::Unauthenticated)
        );
        assert!(
            p.authenticate(
                Some("kf_admin_key_0123456789abcdef"),
                ip("203.0.113.1"),
                NOW
            )
            .is_ok(),
            "an empty list is unrestricted"
        );
    }

    #[test]
    fn self_lockout() {
        let p = principals();
        let key_admin = p
            .authenticate(
                Some("kf_admin_key_0123456789abcdef"),
                ip("203.0.113.1"),
                NOW,
            )
            .unwrap()
            .clone();
        let from = ip("203.0.113.1");
        let err =
            check_self_lockout(&key_admin, from, "k1", &list("198.51.100.0/24"), NOW).unwrap_err();
        assert_eq!(err.ip, from.ip());
        assert!(err.to_string().contains("203.0.113.1"));
        assert!(check_self_lockout(&key_admin, from, "k1", &list("203.0.113.0/24"), NOW).is_ok());
        assert!(check_self_lockout(&key_admin, from, "k1", &list(""), NOW).is_ok());
        assert!(
            check_self_lockout(&key_admin, from, "k2", &list("198.51.100.0/24"), NOW).is_ok(),
            "other keys are not the caller's own list"
        );
        let ops = p
            .authenticate(Some("ops-token-0123456789abcdef"), ip("127.0.0.1"), NOW)
            .unwrap()
            .clone();
        assert!(
            check_self_lockout(&ops, ip("127.0.0.1"), "k1", &list("198.51.100.0/24"), NOW).is_ok()
        );
        let mapped = check_self_lockout(
            &key_admin,
            ip("::ffff:203.0.113.1"),
            "k1",
            &list("198.51.100.0/24"),
            NOW,
        )
        .unwrap_err();
        assert_eq!(mapped.ip, from.ip(), "named in its folded form");
    }
}

//! The management API (SPEC §6): principals, confirmation and key changes that
//! take effect before the answer is sent.

pub mod api;
pub mod preview;
pub mod principals;
pub mod throttle;

use principals::{ADMIN_SCOPE, Principal, PrincipalKind, Principals};

use crate::{config::Admin, shim::runtime::secret_digest, store::StoredKey};

/// The principals of the config's `management.admins` and of the active
/// stored keys with the `admin` scope. `token_env` variables are read here.
pub fn principals<'a>(
    admins: &[Admin],
    stored: impl IntoIterator<Item = &'a StoredKey>,
) -> anyhow::Result<Principals> {
    let mut rows = Vec::new();
    for a in admins {
        rows.push((
            secret_digest(&a.token, &format!("management admin {}", a.name))?,
            Principal {
                name: a.name.clone(),
                kind: PrincipalKind::ConfigAdmin,
                allow: a.allow.clone(),
            },
        ));
    }
    rows.extend(
        stored
            .into_iter()
            .filter(|k| k.is_active() && k.scopes.iter().any(|s| s == ADMIN_SCOPE))
            .map(|k| {
                (
                    k.digest,
                    Principal {
                        name: k.name.clone(),
                        kind: PrincipalKind::Key(k.id.clone()),
                        allow: k.allow.clone(),
                    },
                )
            }),
    );
    Ok(Principals::new(rows))
}

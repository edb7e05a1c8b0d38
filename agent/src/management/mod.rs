//! The management API (SPEC §6): principals, confirmation and key changes that
//! take effect before the answer is sent.

pub mod api;
pub mod preview;
pub mod principals;
pub mod throttle;

use std::sync::Arc;

use principals::{Principal, Principals};

use crate::{
    config::Admin,
    keys::{Key, credentials},
};

/// The principals of the config's `management.admins` and of the active
/// stored keys with the `admin` scope. `token_env` variables are read here.
pub fn principals<'a>(
    admins: &[Admin],
    stored: impl IntoIterator<Item = &'a Arc<Key>>,
) -> anyhow::Result<Principals> {
    let mut rows = Vec::new();
    for a in admins {
        rows.push(Arc::new(Principal::ConfigAdmin {
            name: a.name.clone(),
            digest: credentials::resolve(&a.token, &format!("management admin {}", a.name))?,
            allow: a.allow.clone(),
        }));
    }
    rows.extend(
        stored
            .into_iter()
            .filter(|k| k.is_admin())
            .map(|k| Arc::new(Principal::Key(k.clone()))),
    );
    Ok(Principals::new(rows))
}

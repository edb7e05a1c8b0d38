//! The variables a config names for its secrets (`keys[].secret_env`,
//! `management.admins[].token_env`, `management.confirm.totp_secret_env`):
//! one reading with one set of rules, used by `run` (which takes the value)
//! and by `keyfence check` (which reports, located, what `run` would refuse).

use crate::confirm::{BadSecret, Confirmer};

/// Minimum length of a static key's secret or an admin's token (SPEC §2).
pub const MIN_SECRET: usize = 20;

/// What a variable must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvSecret {
    /// A static key's secret or an admin's token: at least [`MIN_SECRET`]
    /// characters.
    Secret,
    /// A TOTP secret: base32 of at least 16 bytes ([`Confirmer::from_base32`]).
    Totp,
}

/// Why a variable cannot be used; each names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// Unset, or not valid UTF-8.
    #[error("environment variable {0} is not set")]
    Unset(String),
    #[error("the secret in {0} is shorter than {MIN_SECRET} characters")]
    TooShort(String),
    #[error("{0}: {BadSecret}")]
    BadTotp(String),
}

/// The value of `var`, if it holds what `kind` needs.
pub fn read(var: &str, kind: EnvSecret) -> Result<String, EnvError> {
    let value = std::env::var(var).ok();
    check(var, value.as_deref(), kind)?;
    Ok(value.unwrap_or_default())
}

/// The rules of [`read`] for `value` (`None`: unset) of `var`.
pub fn check(var: &str, value: Option<&str>, kind: EnvSecret) -> Result<(), EnvError> {
    let value = value.ok_or_else(|| EnvError::Unset(var.to_owned()))?;
    match kind {
        EnvSecret::Secret if value.len() < MIN_SECRET => Err(EnvError::TooShort(var.to_owned())),
        EnvSecret::Totp if Confirmer::from_base32(value).is_err() => {
            Err(EnvError::BadTotp(var.to_owned()))
        }
        EnvSecret::Secret | EnvSecret::Totp => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{EnvError, EnvSecret, check, read};

    #[test]
    fn unset_short_and_bad_values_name_the_variable() {
        assert_eq!(
            read("KF_TEST_SECRET_ENV_NEVER_SET", EnvSecret::Secret),
            Err(EnvError::Unset("KF_TEST_SECRET_ENV_NEVER_SET".into()))
        );
        assert_eq!(
            check("V", None, EnvSecret::Totp).unwrap_err().to_string(),
            "environment variable V is not set"
        );
        assert!(check("V", Some("twenty-characters-ok"), EnvSecret::Secret).is_ok());
        assert_eq!(
            check("V", Some("nineteen-characters"), EnvSecret::Secret)
                .unwrap_err()
                .to_string(),
            "the secret in V is shorter than 20 characters"
        );
        assert!(
            check(
                "V",
                Some("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"),
                EnvSecret::Totp
            )
            .is_ok()
        );
        assert_eq!(
            check("V", Some("GEZDGNBV"), EnvSecret::Totp)
                .unwrap_err()
                .to_string(),
            "V: the TOTP secret is not valid base32 of at least 16 bytes"
        );
        assert!(check("V", Some("not base32!"), EnvSecret::Totp).is_err());
    }
}

//! Secrets and the credentials that carry them, in one place.
//!
//! - Generated secrets: `kf_` + 32 random bytes in base62 (43 characters, fixed
//!   width) + the CRC-32 of those 43 characters in base62 (6 characters). The
//!   prefix lets secret scanners find leaked keys; the checksum lets them (and
//!   the CLI) tell a real key from a typo or a random match without asking the
//!   server. Only the SHA-256 of the whole string is ever stored.
//! - Configured secrets (`secret_env`, `token_env`, `totp_secret_env`): read
//!   from the environment when the config is applied, never kept.
//! - Presented secrets: the one credential of a request, `Authorization:
//!   Bearer` (the scheme matched case-insensitively, RFC 6750 §2.1 with RFC
//!   9110 §11.1) or the listener's key header, for the shim and the API alike.

use anyhow::anyhow;
use sha2::{Digest as _, Sha256};

use crate::{
    config::{KeySecret, ManagementConfig},
    confirm::Confirmer,
    secret_env::{self, EnvSecret},
};

/// SHA-256 of a secret: what tables and the store hold instead of it.
pub type Digest = [u8; 32];

/// SHA-256 of a presented or generated secret.
#[must_use]
pub fn digest(secret: &str) -> Digest {
    Sha256::digest(secret.as_bytes()).into()
}

/// The digest of a configured secret; `secret_env` is read now, with the
/// rules `keyfence check` reports ([`crate::secret_env`]). `what` names the
/// owner in errors ("key ci", "management admin ops").
pub fn resolve(secret: &KeySecret, what: &str) -> anyhow::Result<Digest> {
    match secret {
        KeySecret::Sha256(d) => Ok(*d),
        KeySecret::Env(var) => {
            let secret =
                secret_env::read(var, EnvSecret::Secret).map_err(|e| anyhow!("{what}: {e}"))?;
            Ok(digest(&secret))
        }
    }
}

/// The step-up confirmer, when `management.confirm.totp_secret_env` is set;
/// the variable is read now.
pub fn confirmer(management: &ManagementConfig) -> anyhow::Result<Option<Confirmer>> {
    let Some(var) = &management.confirm_totp_env else {
        return Ok(None);
    };
    let secret = secret_env::read(var, EnvSecret::Totp)
        .map_err(|e| anyhow!("management.confirm.totp_secret_env: {e}"))?;
    let confirmer = Confirmer::from_base32(&secret)
        .map_err(|e| anyhow!("management.confirm.totp_secret_env: {var}: {e}"))?;
    Ok(Some(confirmer))
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

/// The token of `Authorization: Bearer <token>`: the scheme is matched
/// case-insensitively (RFC 6750 §2.1, RFC 9110 §11.1), surrounding blanks are
/// trimmed. `None` for another scheme, bytes that are not UTF-8, or no token.
#[must_use]
pub fn bearer(value: &[u8]) -> Option<&str> {
    let (scheme, rest) = std::str::from_utf8(value).ok()?.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty())
}

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The prefix of every generated secret.
pub const PREFIX: &str = "kf_";
/// Base62 characters carrying the 32 random bytes.
const BODY_LEN: usize = 43;
/// Base62 characters carrying the CRC-32.
const CHECK_LEN: usize = 6;
/// Total length of a generated secret.
pub const SECRET_LEN: usize = PREFIX.len() + BODY_LEN + CHECK_LEN;
/// Random base62 characters in a key id after `key_`.
const ID_LEN: usize = 16;

/// Random bytes from the kernel. A machine that cannot provide them cannot
/// create keys safely, so failure is fatal rather than degraded.
fn random<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the kernel's random source failed");
    buf
}

/// `bytes` as a big-endian number in base62, left-padded with `0` to `width`.
fn base62(bytes: &[u8], width: usize) -> String {
    let mut num = bytes.to_vec();
    let mut digits = Vec::with_capacity(width);
    while num.iter().any(|b| *b != 0) {
        // Long division of `num` by 62.
        let mut rem = 0u32;
        for b in &mut num {
            let acc = (rem << 8) | u32::from(*b);
            *b = u8::try_from(acc / 62).unwrap_or(u8::MAX);
            rem = acc % 62;
        }
        digits.push(ALPHABET[rem as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and `GitHub`'s token checksums).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

fn checksum(body: &str) -> String {
    base62(&crc32(body.as_bytes()).to_be_bytes(), CHECK_LEN)
}

/// A new secret: `kf_` + 43 base62 characters + 6 checksum characters.
#[must_use]
pub fn generate() -> String {
    let body = base62(&random::<32>(), BODY_LEN);
    let check = checksum(&body);
    format!("{PREFIX}{body}{check}")
}

/// Is `s` a secret keyfence generated, intact (prefix, length, alphabet, checksum)?
#[must_use]
pub fn is_well_formed(s: &str) -> bool {
    let Some(rest) = s.strip_prefix(PREFIX) else {
        return false;
    };
    if rest.len() != BODY_LEN + CHECK_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (body, check) = rest.split_at(BODY_LEN);
    checksum(body) == check
}

/// A new key id: `key_` + 16 base62 characters (88 random bits).
#[must_use]
pub fn new_key_id() -> String {
    format!("key_{}", base62(&random::<11>(), ID_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn configured_secrets_are_read_from_the_environment() {
        let d = [9; 32];
        assert_eq!(resolve(&KeySecret::Sha256(d), "key k").unwrap(), d);
        let unset = resolve(
            &KeySecret::Env("KEYFENCE_TEST_SURELY_UNSET".into()),
            "key k",
        );
        assert!(
            unset
                .unwrap_err()
                .to_string()
                .contains("key k: environment variable KEYFENCE_TEST_SURELY_UNSET is not set")
        );
    }

    #[test]
    fn crc32_check_value() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn base62_fixed_width() {
        assert_eq!(base62(&[0], 3), "000");
        assert_eq!(base62(&[61], 2), "0z");
        assert_eq!(base62(&[62], 2), "10");
        assert_eq!(
            base62(&[0xff; 32], BODY_LEN).len(),
            BODY_LEN,
            "2^256 fits 43 digits"
        );
        assert_eq!(base62(&u32::MAX.to_be_bytes(), CHECK_LEN).len(), CHECK_LEN);
    }

    #[test]
    fn generated_secrets_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        for s in [&a, &b] {
            assert_eq!(s.len(), SECRET_LEN);
            assert!(s.starts_with("kf_"));
            assert!(is_well_formed(s), "{s}");
        }
    }

    #[test]
    fn typos_fail_the_checksum() {
        let s = generate();
        // Every single-character substitution in the body is caught.
        for i in PREFIX.len()..SECRET_LEN {
            let mut bytes = s.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).unwrap();
            assert!(!is_well_formed(&typo), "position {i}: {typo}");
        }
        assert!(!is_well_formed(&s[..SECRET_LEN - 1]), "truncated");
        assert!(!is_well_formed(&format!("{s}0")), "too long");
        assert!(!is_well_formed(&s.replacen("kf_", "kx_", 1)), "prefix");
        assert!(!is_well_formed(&s.replacen('_', "-", 1)));
        assert!(!is_well_formed(""));
    }

    #[test]
    fn key_ids() {
        let id = new_key_id();
        assert!(id.starts_with("key_"));
        assert_eq!(id.len(), 4 + ID_LEN);
        assert!(id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(id, new_key_id());
    }
}

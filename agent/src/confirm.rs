//! Step-up confirmation for writes that change an allow list (SPEC §6): a
//! current RFC 6238 code (HMAC-SHA1, 30 s, 6 digits, one step of clock skew)
//! in `X-Keyfence-Confirm`. A code is accepted once: after a success, codes of
//! that time step or earlier are refused, so a captured code cannot be replayed.

use std::sync::Mutex;

use totp_rs::{Algorithm, Secret, TOTP};

pub const STEP_SECONDS: u64 = 30;
pub const DIGITS: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    #[error("confirmation required")]
    Missing,
    #[error("confirmation code is wrong or expired")]
    Wrong,
    #[error("confirmation code was already used")]
    Replayed,
}

#[derive(Debug, thiserror::Error)]
#[error("the TOTP secret is not valid base32 of at least 16 bytes")]
pub struct BadSecret;

pub struct Confirmer {
    totp: TOTP,
    /// The highest time step accepted so far.
    last_step: Mutex<Option<u64>>,
}

impl std::fmt::Debug for Confirmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Confirmer")
    }
}

impl Confirmer {
    /// From the base32 secret authenticator apps use (spaces and case ignored).
    pub fn from_base32(secret: &str) -> Result<Self, BadSecret> {
        let cleaned: String = secret
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_uppercase();
        let bytes = Secret::Encoded(cleaned).to_bytes().map_err(|_| BadSecret)?;
        if bytes.len() < 16 {
            return Err(BadSecret);
        }
        Ok(Self::from_bytes(bytes))
    }

    #[must_use]
    pub fn from_bytes(secret: Vec<u8>) -> Self {
        Self {
            totp: TOTP::new_unchecked(Algorithm::SHA1, DIGITS, 1, STEP_SECONDS, secret),
            last_step: Mutex::new(None),
        }
    }

    /// The code for `unix_time` (tests and the CLI's helper use it).
    #[must_use]
    pub fn code_at(&self, unix_time: u64) -> String {
        self.totp.generate(unix_time)
    }

    /// Check `code` at `unix_time`, consuming it on success.
    pub fn verify(&self, code: Option<&str>, unix_time: u64) -> Result<(), ConfirmError> {
        self.verify_step(code, unix_time).map(|_| ())
    }

    /// [`Self::verify`], answering the time step the code belongs to (a
    /// fleet claims it in the shared store too, so no other host takes it).
    pub fn verify_step(&self, code: Option<&str>, unix_time: u64) -> Result<u64, ConfirmError> {
        let code = code.map(str::trim).filter(|c| !c.is_empty());
        let Some(code) = code else {
            return Err(ConfirmError::Missing);
        };
        let now = unix_time / STEP_SECONDS;
        // Constant-time comparison against each step in the skew window.
        let matched = [now.saturating_sub(1), now, now + 1]
            .into_iter()
            .filter(|step| {
                let expected = self.totp.generate(step * STEP_SECONDS);
                expected.len() == code.len()
                    && expected
                        .bytes()
                        .zip(code.bytes())
                        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                        == 0
            })
            .max();
        let Some(step) = matched else {
            return Err(ConfirmError::Wrong);
        };
        let mut last = self
            .last_step
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|l| step <= l) {
            return Err(ConfirmError::Replayed);
        }
        *last = Some(step);
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 secret "12345678901234567890" (8-digit
    /// vectors; the 6-digit code is their last six digits).
    const RFC_VECTORS: [(u64, &str); 6] = [
        (59, "94287082"),
        (1_111_111_109, "07081804"),
        (1_111_111_111, "14050471"),
        (1_234_567_890, "89005924"),
        (2_000_000_000, "69279037"),
        (20_000_000_000, "65353130"),
    ];

    fn rfc() -> Confirmer {
        Confirmer::from_bytes(b"12345678901234567890".to_vec())
    }

    #[test]
    fn rfc_6238_vectors() {
        let c = rfc();
        for (t, eight) in RFC_VECTORS {
            assert_eq!(c.code_at(t), eight[2..], "t={t}");
        }
    }

    #[test]
    fn valid_once_then_replay_refused() {
        let c = rfc();
        let t = 1_111_111_111;
        let code = c.code_at(t);
        assert_eq!(c.verify(Some(&code), t), Ok(()));
        assert_eq!(c.verify(Some(&code), t), Err(ConfirmError::Replayed));
        // The previous step's code (still inside the skew window) is refused too.
        let previous = c.code_at(t - STEP_SECONDS);
        assert_eq!(c.verify(Some(&previous), t), Err(ConfirmError::Replayed));
        // The next step's code works once.
        let next = c.code_at(t + STEP_SECONDS);
        assert_eq!(c.verify(Some(&next), t + STEP_SECONDS), Ok(()));
    }

    #[test]
    fn missing_wrong_and_expired() {
        let c = rfc();
        let t = 1_234_567_890;
        assert_eq!(c.verify(None, t), Err(ConfirmError::Missing));
        assert_eq!(c.verify(Some("  "), t), Err(ConfirmError::Missing));
        assert_eq!(c.verify(Some("000000"), t), Err(ConfirmError::Wrong));
        assert_eq!(c.verify(Some("12345"), t), Err(ConfirmError::Wrong));
        let old = c.code_at(t - 5 * STEP_SECONDS);
        assert_eq!(c.verify(Some(&old), t), Err(ConfirmError::Wrong));
        // One step of skew either way is accepted.
        let skewed = c.code_at(t + STEP_SECONDS);
        assert_eq!(c.verify(Some(&skewed), t), Ok(()));
    }

    #[test]
    fn base32_secrets() {
        // "12345678901234567890" in base32.
        let c = Confirmer::from_base32("gezd gnbv gy3t qojq gezd gnbv gy3t qojq").unwrap();
        assert_eq!(c.code_at(59), "287082");
        assert!(Confirmer::from_base32("not base32!").is_err());
        assert!(Confirmer::from_base32("GEZDGNBV").is_err(), "too short");
    }
}

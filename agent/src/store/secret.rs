//! Secrets and ids keyfence generates.
//!
//! A secret is `kf_` + 32 random bytes in base62 (43 characters, fixed width) +
//! the CRC-32 of those 43 characters in base62 (6 characters). The prefix lets
//! secret scanners find leaked keys; the checksum lets them (and the CLI) tell a
//! real key from a typo or a random match without asking the server. Only the
//! SHA-256 of the whole string is ever stored.

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

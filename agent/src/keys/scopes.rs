//! A key's scopes as a set of the two there are, in one byte: the list of
//! strings it replaced cost 88 bytes a key (8.4 MiB at 100k keys).

use serde::{Deserialize, Deserializer, Serialize, Serializer, ser::SerializeSeq as _};

use super::{ADMIN_SCOPE, API_SCOPE};

/// Sorted by name, as the API lists them: `admin` before `api`.
const ALL: [(&str, u8); 2] = [(ADMIN_SCOPE, 2), (API_SCOPE, 1)];

/// Some of [`API_SCOPE`] and [`ADMIN_SCOPE`]. Serialized as the sorted list
/// of their names (the store's column, the API's `scopes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

impl Scopes {
    /// `[api]`: usable on the listeners.
    pub const API: Self = Self(1);
    /// `[admin]`: a management principal.
    pub const ADMIN: Self = Self(2);

    /// The set of `names`; the first one that is neither scope is the error.
    pub fn from_names<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Self, String> {
        let mut bits = 0;
        for name in names {
            let name = name.as_ref();
            let (_, bit) = ALL
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| name.to_owned())?;
            bits |= bit;
        }
        Ok(Self(bits))
    }

    #[must_use]
    pub fn contains(self, scope: &str) -> bool {
        ALL.iter().any(|(n, bit)| *n == scope && self.0 & bit != 0)
    }

    /// The names, sorted.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        ALL.into_iter()
            .filter(move |(_, bit)| self.0 & bit != 0)
            .map(|(n, _)| n)
    }

    #[must_use]
    pub fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    #[must_use]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.names().count()))?;
        for name in self.names() {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        Self::from_names(&names)
            .map_err(|bad| serde::de::Error::custom(format!("unknown scope {bad:?}")))
    }
}

impl PartialEq<[&str]> for Scopes {
    fn eq(&self, names: &[&str]) -> bool {
        self.names().eq(names.iter().copied())
    }
}

impl<const N: usize> PartialEq<[&str; N]> for Scopes {
    fn eq(&self, names: &[&str; N]) -> bool {
        self == names.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sorted_and_round_trip_through_json() {
        let both = Scopes::API.with(Scopes::ADMIN);
        assert_eq!(both, ["admin", "api"]);
        assert_eq!(serde_json::to_string(&both).unwrap(), r#"["admin","api"]"#);
        assert_eq!(
            serde_json::from_str::<Scopes>(r#"["api","admin","api"]"#).unwrap(),
            both
        );
        assert_eq!(serde_json::to_string(&Scopes::API).unwrap(), r#"["api"]"#);
        assert!(both.contains("admin") && both.contains("api"));
        assert!(!Scopes::API.contains("admin") && !Scopes::API.contains("read"));
    }

    #[test]
    fn an_unknown_scope_is_refused() {
        assert_eq!(Scopes::from_names(["api", "read"]), Err("read".to_owned()));
        let err = serde_json::from_str::<Scopes>(r#"["write"]"#).unwrap_err();
        assert!(
            err.to_string().contains(r#"unknown scope "write""#),
            "{err}"
        );
    }
}

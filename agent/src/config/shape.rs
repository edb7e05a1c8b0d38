//! The first pass over a config file: its shape. Unknown fields, a list where a
//! mapping belongs, `maybe` where a boolean belongs, missing required fields:
//! every such mistake in the file is reported at once, each with its line,
//! column and field path. serde stops at the first one and names no path, so
//! the value pass after it reads only the parts whose shape is right
//! ([`Skip`]): a file's shape and value mistakes are reported together.

use std::{collections::BTreeSet, fmt};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

/// A YAML value with the position of every part.
pub(super) enum Node {
    Map(Vec<(Spanned<String>, Spanned<Self>)>),
    List(Vec<Spanned<Self>>),
    Text,
    Int(i128),
    Float,
    Bool,
    Null,
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Self::Map(_) => "a mapping",
            Self::List(_) => "a list",
            Self::Text => "text",
            Self::Int(_) => "a number",
            Self::Float => "a decimal number",
            Self::Bool => "a boolean",
            Self::Null => "nothing",
        }
    }

    const fn is_scalar(&self) -> bool {
        matches!(self, Self::Text | Self::Int(_) | Self::Float | Self::Bool)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Bool)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
                Ok(Node::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Float)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Text)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a config value must look like.
pub(super) enum Shape {
    /// Fields: name, required, shape.
    Map(&'static [(&'static str, bool, Self)]),
    List(&'static Self),
    /// A scalar read as text (`name: 2024` is the text "2024").
    Text,
    /// An allow list: text (`"a, b"`) or a list of entries, each text or a
    /// mapping (`{ cidr, note, expires_at }`).
    AllowList,
    /// A whole number in `0..=max`.
    Int(u32),
    Bool,
}

/// One allow-list entry written as a mapping.
const ENTRY: Shape = Shape::Map(&[
    ("cidr", true, Shape::Text),
    ("note", false, Shape::Text),
    ("expires_at", false, Shape::Text),
]);
const TLS: Shape = Shape::Map(&[("cert", true, Shape::Text), ("key", true, Shape::Text)]);
const CLIENT_IP: Shape = Shape::Map(&[
    ("source", false, Shape::Text),
    ("trusted_proxies", false, Shape::List(&Shape::Text)),
    ("hops", false, Shape::Int(u32::MAX)),
]);
const LISTENER: Shape = Shape::Map(&[
    ("name", true, Shape::Text),
    ("bind", true, Shape::Text),
    ("mode", true, Shape::Text),
    ("upstream", false, Shape::Text),
    ("upstream_timeout", false, Shape::Text),
    ("upstream_ca", false, Shape::Text),
    ("tls", false, TLS),
    ("client_ip", false, CLIENT_IP),
    ("early_drop", false, Shape::Bool),
    ("tenants", false, Shape::List(&Shape::Text)),
    ("key_header", false, Shape::Text),
    ("forward_credential", false, Shape::Bool),
    ("connections", false, CONNECTIONS),
]);
const CONNECTIONS: Shape = Shape::Map(&[
    ("header_timeout", false, Shape::Text),
    ("idle_timeout", false, Shape::Text),
    ("max_per_source", false, Shape::Int(u32::MAX)),
]);
const KEY: Shape = Shape::Map(&[
    ("id", true, Shape::Text),
    // Optional: a static key's name defaults to its id.
    ("name", false, Shape::Text),
    ("tenant", false, Shape::Text),
    ("scopes", false, Shape::List(&Shape::Text)),
    ("secret_sha256", false, Shape::Text),
    ("secret_env", false, Shape::Text),
    ("ip_allow_list", false, Shape::AllowList),
    ("report_only", false, Shape::Bool),
]);
const ADMIN: Shape = Shape::Map(&[
    ("name", true, Shape::Text),
    ("token_sha256", false, Shape::Text),
    ("token_env", false, Shape::Text),
    ("ip_allow_list", false, Shape::AllowList),
]);

/// The whole file. The `Raw*` types in `load.rs` describe it too; a test
/// checks that both know the same fields at every mapping.
pub(super) const CONFIG: Shape = Shape::Map(&[
    (
        "store",
        false,
        Shape::Map(&[
            ("path", false, Shape::Text),
            (
                "postgres",
                false,
                Shape::Map(&[
                    ("url", false, Shape::Text),
                    ("url_env", false, Shape::Text),
                    ("ca_file", false, Shape::Text),
                    ("host_id", false, Shape::Text),
                ]),
            ),
        ]),
    ),
    (
        "datapath",
        false,
        Shape::Map(&[
            ("interfaces", false, Shape::List(&Shape::Text)),
            ("mode", false, Shape::Text),
            ("pin_path", false, Shape::Text),
            (
                "capacity",
                false,
                Shape::Map(&[
                    ("exact", false, Shape::Int(u32::MAX)),
                    ("prefixes", false, Shape::Int(u32::MAX)),
                ]),
            ),
            ("unparsed", false, Shape::Text),
            ("tc_attach", false, Shape::Text),
        ]),
    ),
    ("listeners", false, Shape::List(&LISTENER)),
    ("keys", false, Shape::List(&KEY)),
    (
        "rejection",
        false,
        Shape::Map(&[
            ("status", false, Shape::Int(u16::MAX as u32)),
            ("body", false, Shape::Text),
        ]),
    ),
    (
        "management",
        false,
        Shape::Map(&[
            ("bind", false, Shape::Text),
            ("admins", false, Shape::List(&ADMIN)),
            (
                "confirm",
                false,
                Shape::Map(&[("totp_secret_env", true, Shape::Text)]),
            ),
            ("tls", false, TLS),
            (
                "console",
                false,
                Shape::Map(&[
                    ("idle_timeout", false, Shape::Text),
                    ("max_age", false, Shape::Text),
                ]),
            ),
        ]),
    ),
    (
        "metrics",
        false,
        Shape::Map(&[("bind", false, Shape::Text)]),
    ),
    (
        "shim",
        false,
        Shape::Map(&[("workers", false, Shape::Int(u32::MAX))]),
    ),
    (
        "fleet",
        false,
        Shape::Map(&[
            ("live_after", false, Shape::Text),
            ("wait_timeout", false, Shape::Text),
            ("poll", false, Shape::Text),
        ]),
    ),
]);

/// One shape mistake: where, which field, what.
pub(super) struct Mistake {
    pub at: Location,
    pub path: String,
    pub message: String,
}

/// The parts of a file the value pass leaves out because a shape mistake
/// lies in them: whole top-level sections, single listeners and single keys
/// (a part as large as it must be, as small as a list item of those two).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Skip {
    sections: BTreeSet<String>,
    pub listeners: BTreeSet<usize>,
    pub keys: BTreeSet<usize>,
}

impl Skip {
    /// The parts holding `mistakes`; `None` when the file is not even a
    /// mapping (nothing is left to check).
    pub fn of(mistakes: &[Mistake]) -> Option<Self> {
        let mut skip = Self::default();
        for m in mistakes {
            if m.path == "(top)" {
                return None;
            }
            let item = |list: &str| {
                m.path
                    .strip_prefix(list)
                    .and_then(|rest| rest.strip_prefix('['))
                    .and_then(|rest| rest.split_once(']'))
                    .and_then(|(index, _)| index.parse::<usize>().ok())
            };
            if let Some(i) = item("listeners") {
                skip.listeners.insert(i);
            } else if let Some(i) = item("keys") {
                skip.keys.insert(i);
            } else {
                let end = m.path.find(['.', '[']).unwrap_or(m.path.len());
                skip.sections.insert(m.path[..end].to_owned());
            }
        }
        Some(skip)
    }

    /// Whether the top-level field `name` is left out whole.
    pub fn section(&self, name: &str) -> bool {
        self.sections.contains(name)
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// Every place where `node` departs from `shape`. An empty value (`null`) is
/// left to the value checks: it is how YAML writes an optional field unset.
pub(super) fn check(node: &Spanned<Node>, shape: &Shape, path: &str, out: &mut Vec<Mistake>) {
    match (shape, &node.value) {
        // An empty value is how YAML writes an optional field unset; whether
        // the field may be unset is the value checks' business.
        (_, Node::Null) => {}
        (Shape::Map(fields), Node::Map(entries)) => {
            for (key, value) in entries {
                let here = join(path, &key.value);
                if let Some((_, _, inner)) = fields.iter().find(|(name, _, _)| *name == key.value) {
                    check(value, inner, &here, out);
                    continue;
                }
                let known: Vec<&str> = fields.iter().map(|(name, _, _)| *name).collect();
                out.push(Mistake {
                    at: key.referenced,
                    path: here,
                    message: format!(
                        "unknown field `{}`, expected one of {}",
                        key.value,
                        known.join(", ")
                    ),
                });
            }
            for (name, required, _) in *fields {
                let present = entries
                    .iter()
                    .any(|(k, v)| k.value == *name && !matches!(v.value, Node::Null));
                if *required && !present {
                    out.push(Mistake {
                        at: node.referenced,
                        path: join(path, name),
                        message: format!("missing field `{name}`"),
                    });
                }
            }
        }
        (Shape::List(inner), Node::List(items)) => {
            for (i, item) in items.iter().enumerate() {
                check(item, inner, &format!("{path}[{i}]"), out);
            }
        }
        (Shape::AllowList, Node::List(items)) => {
            for (i, item) in items.iter().enumerate() {
                let here = format!("{path}[{i}]");
                if let Node::Map(_) = item.value {
                    check(item, &ENTRY, &here, out);
                } else {
                    check(item, &Shape::Text, &here, out);
                }
            }
        }
        (shape, value) => {
            let (fits, expected) = match shape {
                Shape::Map(_) => (false, "a mapping".to_owned()),
                Shape::List(_) => (false, "a list".to_owned()),
                Shape::Text => (value.is_scalar(), "text".to_owned()),
                Shape::AllowList => (value.is_scalar(), "text or a list".to_owned()),
                Shape::Int(max) => (
                    matches!(value, Node::Int(v) if (0..=i128::from(*max)).contains(v)),
                    format!("a whole number from 0 to {max}"),
                ),
                Shape::Bool => (matches!(value, Node::Bool), "true or false".to_owned()),
            };
            if !fits {
                out.push(Mistake {
                    at: node.referenced,
                    path: if path.is_empty() {
                        "(top)".into()
                    } else {
                        path.to_owned()
                    },
                    message: format!("expected {expected}, found {}", value.kind()),
                });
            }
        }
    }
}

/// The field names of the mapping at `path` (list levels are stepped through).
#[cfg(test)]
pub(super) fn fields_at(path: &[&str]) -> Vec<&'static str> {
    let mut shape = &CONFIG;
    for step in path {
        while let Shape::List(inner) = shape {
            shape = inner;
        }
        let Shape::Map(fields) = shape else {
            panic!("{path:?}: not a mapping");
        };
        shape = &fields
            .iter()
            .find(|(name, _, _)| name == step)
            .unwrap_or_else(|| panic!("{path:?}: no field {step}"))
            .2;
    }
    while let Shape::List(inner) = shape {
        shape = inner;
    }
    match shape {
        Shape::Map(fields) => fields.iter().map(|(name, _, _)| *name).collect(),
        _ => panic!("{path:?}: not a mapping"),
    }
}

#[cfg(test)]
mod tests {
    use super::{Mistake, Skip};

    fn mistakes(paths: &[&str]) -> Vec<Mistake> {
        paths
            .iter()
            .map(|p| Mistake {
                at: serde_saphyr::Location::UNKNOWN,
                path: (*p).to_owned(),
                message: String::new(),
            })
            .collect()
    }

    #[test]
    fn a_mistake_leaves_out_its_listener_key_or_section() {
        let skip = Skip::of(&mistakes(&[
            "listeners[2].client_ip.hops",
            "keys[0].ip_allow_list[1].cidr",
            "keys[3]",
            "management.admins[0].name",
            "datapath",
            "listners",
        ]))
        .expect("a mapping");
        assert_eq!(skip.listeners.iter().copied().collect::<Vec<_>>(), [2]);
        assert_eq!(skip.keys.iter().copied().collect::<Vec<_>>(), [0, 3]);
        for section in ["management", "datapath", "listners"] {
            assert!(skip.section(section), "{section}");
        }
        assert!(!skip.section("listeners") && !skip.section("keys"));
        assert!(
            Skip::of(&mistakes(&["listeners"]))
                .expect("a mapping")
                .section("listeners")
        );
        assert_eq!(Skip::of(&mistakes(&["(top)"])), None);
    }
}

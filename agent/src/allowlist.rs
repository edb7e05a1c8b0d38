//! IP allow lists: the one grammar used by config, API and CLI (SPEC §3), and
//! the matching rules every layer shares.
//!
//! Canonical form: IPv4-mapped IPv6 folded to IPv4, host bits clear (a CIDR with
//! host bits set is an error, not silently masked), duplicates removed, sorted.
//! An empty list means the key is unrestricted; a list whose entries have all
//! expired allows nobody.

use std::{fmt, net::IpAddr, ops::Deref, sync::Arc, time::SystemTime};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

/// Default cap on entries per key (SPEC §3).
pub const DEFAULT_MAX_ENTRIES: usize = 1000;

/// A network in canonical form: IPv4-mapped IPv6 folded to IPv4, host bits
/// clear. Made once, by the allow-list grammar ([`parse_entry`], `FromStr`) or
/// the checked [`Net::new`]; every later stage (policy compiler, prefix sets,
/// map writer, trusted proxies) takes it as it is and never canonicalises again.
/// Orders like the `IpNet` it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net(IpNet);

/// [`Net::new`] refused a network: it is not in canonical form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{given} is not canonical; its canonical form is {canonical}")]
pub struct NotCanonical {
    pub given: IpNet,
    pub canonical: IpNet,
}

impl Net {
    /// `net` if it is canonical (folded, host bits clear), else why not.
    pub fn new(net: IpNet) -> Result<Self, NotCanonical> {
        let canonical = fold_net(net.trunc());
        if canonical == net {
            Ok(Self(net))
        } else {
            Err(NotCanonical {
                given: net,
                canonical,
            })
        }
    }

    #[must_use]
    pub fn get(self) -> IpNet {
        self.0
    }

    /// The maximal aligned blocks of the union of `nets`, sorted. Canonical
    /// in, canonical out: merging siblings never crosses a family, and a block
    /// inside `::ffff:0:0/96` could only come from networks inside it, which
    /// are folded to IPv4.
    #[must_use]
    pub fn aggregate(nets: &[Net]) -> Vec<Net> {
        let raw: Vec<IpNet> = nets.iter().map(|n| n.0).collect();
        IpNet::aggregate(&raw).into_iter().map(Self).collect()
    }

    /// A network derived from canonical ones by a step that keeps the form
    /// (a supernet, a sibling, an aggregate); checked in debug builds.
    pub(crate) fn derived(net: IpNet) -> Self {
        debug_assert!(Self::new(net).is_ok(), "{net} derived but not canonical");
        Self(net)
    }
}

impl Deref for Net {
    type Target = IpNet;

    fn deref(&self) -> &IpNet {
        &self.0
    }
}

impl From<Net> for IpNet {
    fn from(n: Net) -> Self {
        n.0
    }
}

impl TryFrom<IpNet> for Net {
    type Error = NotCanonical;

    fn try_from(net: IpNet) -> Result<Self, NotCanonical> {
        Self::new(net)
    }
}

impl std::str::FromStr for Net {
    type Err = EntryErrorKind;

    /// The allow-list grammar for one entry ([`parse_entry`]).
    fn from_str(s: &str) -> Result<Self, EntryErrorKind> {
        parse_entry(s)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One canonical entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowEntry {
    pub net: Net,
    pub note: Option<String>,
    /// The entry stops matching at this instant.
    pub expires_at: Option<SystemTime>,
}

impl AllowEntry {
    #[must_use]
    pub fn is_active(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// A canonical allow list. Construct through the grammar (`parse_*`) so every
/// instance is canonical. Immutable and shared: a clone (the shim's key table,
/// the principals) is a reference count, not a copy of every entry.
///
/// Stored compactly, because a gateway may hold a million entries: the
/// networks alone (18 bytes each), and notes and expiry times only for the
/// entries that have them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Sorted, distinct.
    nets: Arc<[Net]>,
    /// `(index into nets, note, expiry)` of the entries that have either, by index.
    extra: Option<Arc<[Extra]>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Extra {
    index: usize,
    note: Option<String>,
    expires_at: Option<SystemTime>,
}

impl AllowList {
    /// Build from canonical entries (their `Net`s are): sorts and removes duplicate networks (the first note/expiry wins).
    #[must_use]
    pub fn from_canonical(mut entries: Vec<AllowEntry>) -> Self {
        entries.sort_by_key(|e| e.net);
        entries.dedup_by(|later, first| later.net == first.net);
        let extra: Vec<Extra> = entries
            .iter_mut()
            .enumerate()
            .filter(|(_, e)| e.note.is_some() || e.expires_at.is_some())
            .map(|(index, e)| Extra {
                index,
                note: e.note.take(),
                expires_at: e.expires_at,
            })
            .collect();
        Self {
            nets: entries.into_iter().map(|e| e.net).collect(),
            extra: (!extra.is_empty()).then(|| extra.into()),
        }
    }

    /// The entries, in order (built on demand: for the API, the store and the
    /// CLI, not for matching).
    #[must_use]
    pub fn entries(&self) -> Vec<AllowEntry> {
        let mut out: Vec<AllowEntry> = self
            .nets
            .iter()
            .map(|&net| AllowEntry {
                net,
                note: None,
                expires_at: None,
            })
            .collect();
        for x in self.extra.iter().flat_map(|x| x.iter()) {
            out[x.index].note.clone_from(&x.note);
            out[x.index].expires_at = x.expires_at;
        }
        out
    }

    /// What the stored rows need to go from `self` to `after`: the networks
    /// `after` no longer lists, and the entries that are new or whose note or
    /// expiry changed (a one-entry change to a long list is one row each way).
    #[must_use]
    /// One merge of the two sorted lists.
    pub fn changes_to(&self, after: &Self) -> (Vec<Net>, Vec<AllowEntry>) {
        let (mut gone, mut changed) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        loop {
            match (self.nets.get(i), after.nets.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    if self.extra_at(i) != after.extra_at(j) {
                        changed.push(after.entry_at(j));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    gone.push(*a);
                    i += 1;
                }
                (Some(a), None) => {
                    gone.push(*a);
                    i += 1;
                }
                (_, Some(_)) => {
                    changed.push(after.entry_at(j));
                    j += 1;
                }
                (None, None) => break,
            }
        }
        (gone, changed)
    }

    /// The note and expiry of entry `index`.
    fn extra_at(&self, index: usize) -> (Option<&str>, Option<SystemTime>) {
        self.extra
            .as_deref()
            .and_then(|x| {
                x.binary_search_by_key(&index, |x| x.index)
                    .ok()
                    .map(|at| (x[at].note.as_deref(), x[at].expires_at))
            })
            .unwrap_or((None, None))
    }

    fn entry_at(&self, index: usize) -> AllowEntry {
        let (note, expires_at) = self.extra_at(index);
        AllowEntry {
            net: self.nets[index],
            note: note.map(str::to_owned),
            expires_at,
        }
    }

    /// Number of entries.
    #[must_use]
    pub fn entry_count(&self) -> usize {
        self.nets.len()
    }

    /// No entries configured: the key works from anywhere.
    #[must_use]
    pub fn is_unrestricted(&self) -> bool {
        self.nets.is_empty()
    }

    /// Networks in force at `now`. Allocates nothing (it runs per request).
    pub fn active_nets(&self, now: SystemTime) -> impl Iterator<Item = Net> + '_ {
        self.nets
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.is_active(*i, now))
            .map(|(_, n)| *n)
    }

    fn is_active(&self, index: usize, now: SystemTime) -> bool {
        let Some(extra) = &self.extra else {
            return true;
        };
        extra
            .binary_search_by_key(&index, |x| x.index)
            .map_or(true, |at| extra[at].expires_at.is_none_or(|t| now < t))
    }

    /// Does this list let `client` use the key at `now`? Both are canonical,
    /// so nothing is folded here.
    #[must_use]
    pub fn allows(&self, client: ClientAddr, now: SystemTime) -> bool {
        if self.is_unrestricted() {
            return true;
        }
        let ip = client.ip();
        self.active_nets(now).any(|net| net.contains(&ip))
    }

    /// The earliest expiry still in the future, when the policy must be recompiled.
    #[must_use]
    pub fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        self.extra
            .iter()
            .flat_map(|x| x.iter())
            .filter_map(|x| x.expires_at)
            .filter(|t| *t > now)
            .min()
    }
}

/// A client address in canonical form (IPv4-mapped IPv6 folded to IPv4), the
/// form allow lists hold. Made once where an address enters keyfence (the
/// accepted peer, a PROXY header's source, an `X-Forwarded-For` entry, the
/// management API's peer); every later stage takes it as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientAddr(IpAddr);

impl ClientAddr {
    /// `ip`, folded.
    #[must_use]
    pub fn new(ip: IpAddr) -> Self {
        Self(fold_ip(ip))
    }

    #[must_use]
    pub fn ip(self) -> IpAddr {
        self.0
    }
}

impl From<IpAddr> for ClientAddr {
    fn from(ip: IpAddr) -> Self {
        Self::new(ip)
    }
}

impl From<ClientAddr> for IpAddr {
    fn from(c: ClientAddr) -> Self {
        c.0
    }
}

impl std::str::FromStr for ClientAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self::new)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes IPv4; everything else is unchanged.
#[must_use]
pub fn fold_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// `::ffff:a.b.c.d/(96+n)` becomes `a.b.c.d/n`; other networks are unchanged.
/// (Host bits are checked separately; this only changes the family.) Private:
/// only the grammar and [`Net::new`] fold networks.
fn fold_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// An allow list as written: one comma/newline-separated string, or an array of
/// entries (strings or `{cidr, note, expires_at}` objects). YAML and JSON alike.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawList {
    One(String),
    Many(Vec<RawEntry>),
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawEntry {
    Text(String),
    Object {
        cidr: String,
        note: Option<String>,
        expires_at: Option<String>,
    },
}

/// Why an entry was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryErrorKind {
    #[error("empty entry")]
    Empty,
    #[error("zone ids (%iface) are not allowed")]
    ZoneId,
    #[error("ranges (a-b) are not supported; write CIDR prefixes")]
    Range,
    #[error("hostnames are not allowed; write IP addresses or CIDR prefixes")]
    Hostname,
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    #[error("prefix length {0:?} is not a number")]
    BadPrefix(String),
    #[error("prefix length {len} out of range (0-{max})")]
    PrefixOutOfRange { len: u8, max: u8 },
    #[error("host bits set; did you mean {canonical}?")]
    HostBitsSet { canonical: IpNet },
    #[error("not an IP address or CIDR prefix")]
    Syntax,
    #[error("expires_at is not an RFC 3339 time: {0}")]
    BadExpiry(String),
    #[error("{count} distinct entries; at most {limit} per key")]
    TooMany { count: usize, limit: usize },
}

/// A refused entry: its 1-based position in the list as written, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryError {
    pub position: usize,
    pub entry: String,
    pub reason: EntryErrorKind,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "entry {} {:?}: {}",
            self.position, self.entry, self.reason
        )
    }
}

impl std::error::Error for EntryError {}

/// One entry: an address or a CIDR prefix, canonical, or refused with the reason.
/// Never resolves names.
pub fn parse_entry(text: &str) -> Result<Net, EntryErrorKind> {
    let s = text.trim();
    if s.is_empty() {
        return Err(EntryErrorKind::Empty);
    }
    if s.contains('%') {
        return Err(EntryErrorKind::ZoneId);
    }
    if let Some((addr, len)) = s.split_once('/') {
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| EntryErrorKind::BadAddress(addr.trim().to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len_text = len.trim();
        if len_text.is_empty() || !len_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EntryErrorKind::BadPrefix(len_text.to_string()));
        }
        let len: u8 = len_text
            .parse()
            .map_err(|_| EntryErrorKind::PrefixOutOfRange { len: u8::MAX, max })?;
        if len > max {
            return Err(EntryErrorKind::PrefixOutOfRange { len, max });
        }
        let net =
            IpNet::new(addr, len).map_err(|_| EntryErrorKind::PrefixOutOfRange { len, max })?;
        if net.trunc() != net {
            return Err(EntryErrorKind::HostBitsSet {
                canonical: fold_net(net.trunc()),
            });
        }
        return Ok(Net(fold_net(net)));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Net(IpNet::from(fold_ip(ip))));
    }
    if s.contains('-') && s.split('-').all(|p| p.trim().parse::<IpAddr>().is_ok()) {
        return Err(EntryErrorKind::Range);
    }
    if s.chars().any(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return Err(EntryErrorKind::Hostname);
    }
    Err(EntryErrorKind::Syntax)
}

/// Split a comma- and/or newline-separated list. Blank lines and a comma that
/// ends a line (before another line) are separators, not entries; any other
/// empty piece (`a,,b`, a leading comma, a trailing comma at the very end) is
/// kept so that it is reported as an empty entry.
fn split_list(s: &str) -> Vec<&str> {
    let lines: Vec<&str> = s
        .trim_end_matches(['\n', '\r', ' ', '\t'])
        .split('\n')
        .collect();
    let mut out = Vec::new();
    for (li, line) in lines.iter().enumerate() {
        let segs: Vec<&str> = line.split(',').collect();
        for (si, seg) in segs.iter().enumerate() {
            let blank = seg.trim().is_empty();
            let blank_line = segs.len() == 1;
            let line_continuation = si == segs.len() - 1 && li + 1 < lines.len();
            if blank && (blank_line || line_continuation) {
                continue;
            }
            out.push(*seg);
        }
    }
    out
}

/// Parse a whole list in either form, reporting every bad entry (not only the
/// first). An empty string or array is the empty (unrestricted) list.
pub fn parse_list(raw: &RawList, max_entries: usize) -> Result<AllowList, Vec<EntryError>> {
    let items: Vec<(&str, Option<&String>, Option<&String>)> = match raw {
        RawList::One(s) => split_list(s).into_iter().map(|e| (e, None, None)).collect(),
        RawList::Many(v) => v
            .iter()
            .map(|e| match e {
                RawEntry::Text(t) => (t.as_str(), None, None),
                RawEntry::Object {
                    cidr,
                    note,
                    expires_at,
                } => (cidr.as_str(), note.as_ref(), expires_at.as_ref()),
            })
            .collect(),
    };
    let mut problems = Vec::new();
    let mut entries = Vec::new();
    for (i, (text, note, expires)) in items.into_iter().enumerate() {
        let problem = |reason| EntryError {
            position: i + 1,
            entry: text.trim().to_string(),
            reason,
        };
        let net = match parse_entry(text) {
            Ok(n) => n,
            Err(reason) => {
                problems.push(problem(reason));
                continue;
            }
        };
        let expires_at = match expires.map(|e| humantime::parse_rfc3339_weak(e.trim())) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                problems.push(problem(EntryErrorKind::BadExpiry(e.to_string())));
                continue;
            }
        };
        entries.push(AllowEntry {
            net,
            note: note.cloned(),
            expires_at,
        });
    }
    let list = AllowList::from_canonical(entries);
    if list.entry_count() > max_entries {
        problems.push(EntryError {
            position: max_entries + 1,
            entry: String::new(),
            reason: EntryErrorKind::TooMany {
                count: list.entry_count(),
                limit: max_entries,
            },
        });
    }
    if problems.is_empty() {
        Ok(list)
    } else {
        Err(problems)
    }
}

/// The canonical text of a list: `a, b, c` (parses back to the same list).
#[must_use]
pub fn to_canonical_string(list: &AllowList) -> String {
    list.nets
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn one(s: &str) -> Result<AllowList, Vec<EntryError>> {
        parse_list(&RawList::One(s.into()), DEFAULT_MAX_ENTRIES)
    }

    #[test]
    fn changes_to_names_only_the_rows_that_differ() {
        let entry = |net: &str, note: Option<&str>| AllowEntry {
            net: net.parse().unwrap(),
            note: note.map(Into::into),
            expires_at: None,
        };
        let before = AllowList::from_canonical(vec![
            entry("192.0.2.1/32", None),
            entry("192.0.2.2/32", Some("office")),
            entry("2001:db8::/64", None),
        ]);
        assert_eq!(before.changes_to(&before), (vec![], vec![]));
        let after = AllowList::from_canonical(vec![
            entry("192.0.2.1/32", None),
            entry("192.0.2.2/32", Some("home")),
            entry("198.51.100.0/24", None),
        ]);
        let (gone, changed) = before.changes_to(&after);
        assert_eq!(gone, vec!["2001:db8::/64".parse().unwrap()]);
        assert_eq!(
            changed,
            vec![
                entry("192.0.2.2/32", Some("home")),
                entry("198.51.100.0/24", None)
            ]
        );
        let (gone, changed) = before.changes_to(&AllowList::default());
        assert_eq!(gone.len(), 3);
        assert!(changed.is_empty());
    }

    proptest! {
        /// The merge names what a plain comparison of the two lists does.
        #[test]
        fn changes_to_agrees_with_comparing_every_entry(
            before in prop::collection::vec((0..24_u32, prop::option::of(0..3_u8)), 0..16),
            after in prop::collection::vec((0..24_u32, prop::option::of(0..3_u8)), 0..16),
        ) {
            let list = |raw: &[(u32, Option<u8>)]| AllowList::from_canonical(
                raw.iter()
                    .map(|&(host, note)| AllowEntry {
                        net: format!("192.0.2.{host}/32").parse().unwrap(),
                        note: note.map(|n| format!("note {n}")),
                        expires_at: None,
                    })
                    .collect(),
            );
            let (before, after) = (list(&before), list(&after));
            let old = before.entries();
            let new = after.entries();
            let gone: Vec<Net> = old
                .iter()
                .filter(|o| !new.iter().any(|n| n.net == o.net))
                .map(|o| o.net)
                .collect();
            let changed: Vec<AllowEntry> =
                new.iter().filter(|n| !old.contains(n)).cloned().collect();
            prop_assert_eq!(before.changes_to(&after), (gone, changed));
        }
    }

    #[test]
    fn net_new_takes_only_canonical_networks() {
        let raw = |s: &str| -> IpNet { s.parse().unwrap() };
        for ok in [
            "192.0.2.0/24",
            "2001:db8::/32",
            "0.0.0.0/0",
            "::/0",
            "::fffe:0:0/96",
        ] {
            assert_eq!(Net::new(raw(ok)).unwrap().to_string(), ok);
        }
        for (bad, canonical) in [
            ("192.0.2.1/24", "192.0.2.0/24"),
            ("::ffff:198.51.100.0/120", "198.51.100.0/24"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("2001:db8::1/32", "2001:db8::/32"),
        ] {
            let e = Net::new(raw(bad)).unwrap_err();
            assert_eq!(e.canonical, raw(canonical), "{bad}");
        }
        // The grammar and `Net::new` agree on what canonical is.
        assert_eq!(
            "::ffff:198.51.100.0/120".parse::<Net>().unwrap(),
            Net::new(raw("198.51.100.0/24")).unwrap()
        );
    }

    #[test]
    fn good_entries_are_canonical() {
        let ok = |s: &str| parse_entry(s).unwrap().to_string();
        assert_eq!(ok(" 203.0.113.42 "), "203.0.113.42/32");
        assert_eq!(ok("2001:db8::1"), "2001:db8::1/128");
        assert_eq!(ok("2001:DB8::1"), "2001:db8::1/128");
        assert_eq!(ok("198.51.100.0/24"), "198.51.100.0/24");
        assert_eq!(ok("2001:db8::/32"), "2001:db8::/32");
        assert_eq!(ok("::ffff:203.0.113.7"), "203.0.113.7/32");
        assert_eq!(ok("::ffff:203.0.113.0/120"), "203.0.113.0/24");
        assert_eq!(ok("::ffff:0:0/96"), "0.0.0.0/0");
        assert_eq!(ok("0.0.0.0/0"), "0.0.0.0/0");
        assert_eq!(ok("::/0"), "::/0");
        assert_eq!(ok("192.0.2.1/32"), "192.0.2.1/32");
        assert_eq!(ok("192.0.2.0 / 24"), "192.0.2.0/24");
    }

    /// (input, expected reason substring). At least 40 kinds and shapes of bad input.
    const BAD: &[(&str, &str)] = &[
        ("", "empty"),
        ("   ", "empty"),
        ("\t", "empty"),
        ("10.0.0.5/8", "did you mean 10.0.0.0/8?"),
        ("192.0.2.1/24", "did you mean 192.0.2.0/24?"),
        ("203.0.113.101/30", "did you mean 203.0.113.100/30?"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("2001:db8:1:2::/48", "did you mean 2001:db8:1::/48?"),
        ("::ffff:203.0.113.7/120", "did you mean 203.0.113.0/24?"),
        ("0.0.0.1/0", "did you mean 0.0.0.0/0?"),
        ("::1/0", "did you mean ::/0?"),
        ("192.0.2.0/33", "out of range (0-32)"),
        ("2001:db8::/129", "out of range (0-128)"),
        ("192.0.2.0/999", "out of range"),
        ("192.0.2.0/99999999999", "out of range"),
        ("192.0.2.0/", "is not a number"),
        ("192.0.2.0/x", "is not a number"),
        ("192.0.2.0/-1", "is not a number"),
        ("192.0.2.0/+8", "is not a number"),
        ("192.0.2.0/2 4", "is not a number"),
        ("192.0.2.0/24/24", "is not a number"),
        ("/24", "is not an IP address"),
        ("fe80::1%eth0", "zone ids"),
        ("fe80::%1/64", "zone ids"),
        ("192.0.2.1-192.0.2.9", "ranges"),
        ("2001:db8::1-2001:db8::9", "ranges"),
        ("example.com", "hostnames"),
        ("localhost", "hostnames"),
        ("api-gateway", "hostnames"),
        ("example.com/24", "is not an IP address"),
        ("192.0.2", "not an IP address or CIDR"),
        ("192.0.2.256", "not an IP address or CIDR"),
        ("192.0.2.1.5", "not an IP address or CIDR"),
        ("300.0.0.0/8", "is not an IP address"),
        ("1.2.3.4 5.6.7.8", "not an IP address or CIDR"),
        ("*", "not an IP address or CIDR"),
        ("192.0.2.*", "not an IP address or CIDR"),
        ("2001:db8:::1", "not an IP address or CIDR"),
        ("2001:db8::g", "not an IP address or CIDR"),
        ("[2001:db8::1]", "not an IP address or CIDR"),
        ("192.0.2.1:80", "not an IP address or CIDR"),
        ("0x7f000001", "hostnames"),
        ("'192.0.2.1'", "not an IP address or CIDR"),
        ("192.0.2.1;", "not an IP address or CIDR"),
    ];

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        assert!(BAD.len() >= 40, "{} bad inputs", BAD.len());
        for (input, why) in BAD {
            let err = parse_entry(input).expect_err(input).to_string();
            assert!(
                err.contains(why),
                "{input:?}: {err:?} should contain {why:?}"
            );
        }
    }

    #[test]
    fn every_bad_entry_of_a_list_is_reported_with_its_position() {
        let errs = one("192.0.2.1, 10.0.0.5/8, example.com,, 2001:db8::/129").unwrap_err();
        let got: Vec<(usize, &str)> = errs
            .iter()
            .map(|e| (e.position, e.entry.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "10.0.0.5/8"),
                (3, "example.com"),
                (4, ""),
                (5, "2001:db8::/129")
            ]
        );
        assert_eq!(
            errs[0].to_string(),
            "entry 2 \"10.0.0.5/8\": host bits set; did you mean 10.0.0.0/8?"
        );
    }

    #[test]
    fn separators_trimming_and_empties() {
        assert!(one("").unwrap().is_unrestricted());
        assert!(one(" \n ").unwrap().is_unrestricted());
        assert_eq!(
            one("192.0.2.1,\n198.51.100.0/24\n\n2001:db8::1\n")
                .unwrap()
                .entries()
                .len(),
            3
        );
        assert_eq!(one(",192.0.2.1").unwrap_err()[0].position, 1);
        assert_eq!(
            one("192.0.2.1,").unwrap_err()[0].reason,
            EntryErrorKind::Empty
        );
        assert_eq!(one("192.0.2.1,,192.0.2.2").unwrap_err()[0].position, 2);
    }

    #[test]
    fn duplicates_folding_and_order_do_not_matter() {
        let a = one("203.0.113.1, ::ffff:203.0.113.1, 198.51.100.0/24, 203.0.113.1").unwrap();
        let b = parse_list(
            &RawList::Many(vec![
                RawEntry::Text("198.51.100.0/24".into()),
                RawEntry::Text(" 203.0.113.1 ".into()),
            ]),
            DEFAULT_MAX_ENTRIES,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(to_canonical_string(&a), "198.51.100.0/24, 203.0.113.1/32");
    }

    #[test]
    fn notes_and_expiries_stay_with_their_entries() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let entry = |net: &str, note: Option<&str>, exp: Option<u64>| AllowEntry {
            net: net.parse().unwrap(),
            note: note.map(Into::into),
            expires_at: exp.map(t),
        };
        let given = vec![
            entry("203.0.113.0/24", None, Some(50)),
            entry("192.0.2.1/32", Some("office"), None),
            entry("2001:db8::/48", None, None),
            entry("198.51.100.7/32", Some("vpn"), Some(100)),
            entry("192.0.2.9/32", None, None),
        ];
        let list = AllowList::from_canonical(given.clone());
        let mut sorted = given;
        sorted.sort_by_key(|e| e.net);
        assert_eq!(list.entries(), sorted);
        assert_eq!(list.entry_count(), 5);
        let active = |at| {
            list.active_nets(t(at))
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(active(10).len(), 5);
        assert_eq!(
            active(60),
            [
                "192.0.2.1/32",
                "192.0.2.9/32",
                "198.51.100.7/32",
                "2001:db8::/48"
            ]
        );
        assert_eq!(
            active(100),
            ["192.0.2.1/32", "192.0.2.9/32", "2001:db8::/48"]
        );
        assert_eq!(list.next_expiry(t(10)), Some(t(50)));
        assert_eq!(list.next_expiry(t(50)), Some(t(100)));
        assert_eq!(list.next_expiry(t(100)), None);
        assert!(!list.allows("203.0.113.5".parse().unwrap(), t(60)));
        assert!(list.allows("203.0.113.5".parse().unwrap(), t(49)));
    }

    #[test]
    fn limit_counts_distinct_entries() {
        let five = RawList::Many(
            (0..5)
                .map(|i| RawEntry::Text(format!("192.0.2.{i}")))
                .collect(),
        );
        let err = parse_list(&five, 4).unwrap_err();
        assert_eq!(
            err[0].reason,
            EntryErrorKind::TooMany { count: 5, limit: 4 }
        );
        let dups = RawList::Many((0..5).map(|_| RawEntry::Text("192.0.2.1".into())).collect());
        assert!(parse_list(&dups, 1).is_ok());
    }

    #[test]
    fn object_form_with_note_and_expiry() {
        let obj = RawList::Many(vec![
            RawEntry::Object {
                cidr: "203.0.113.0/24".into(),
                note: Some("office".into()),
                expires_at: Some("2027-01-01T00:00:00Z".into()),
            },
            RawEntry::Object {
                cidr: "198.51.100.0/24".into(),
                note: None,
                expires_at: Some("next tuesday".into()),
            },
        ]);
        let err = parse_list(&obj, 10).unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(matches!(err[0].reason, EntryErrorKind::BadExpiry(_)));
        let ok = parse_list(&RawList::Many(vec![obj_entry()]), 10).unwrap();
        let entries = ok.entries();
        let e = &entries[0];
        assert_eq!(e.note.as_deref(), Some("office"));
        let t = e.expires_at.unwrap();
        assert!(ok.allows(
            "203.0.113.9".parse().unwrap(),
            t - std::time::Duration::from_secs(1)
        ));
        assert!(!ok.allows("203.0.113.9".parse().unwrap(), t));
        assert_eq!(
            ok.next_expiry(t - std::time::Duration::from_secs(1)),
            Some(t)
        );
    }

    fn obj_entry() -> RawEntry {
        RawEntry::Object {
            cidr: "203.0.113.0/24".into(),
            note: Some("office".into()),
            expires_at: Some("2027-01-01T00:00:00Z".into()),
        }
    }

    #[test]
    fn yaml_and_json_forms_deserialize() {
        let from_json: RawList =
            serde_json::from_str(r#"["192.0.2.1", {"cidr": "198.51.100.0/24", "note": "x"}]"#)
                .unwrap();
        assert_eq!(parse_list(&from_json, 10).unwrap().entries().len(), 2);
        let from_str: RawList = serde_json::from_str(r#""192.0.2.1, 198.51.100.0/24""#).unwrap();
        assert_eq!(parse_list(&from_str, 10).unwrap().entries().len(), 2);
    }

    #[test]
    fn matching_folds_the_client() {
        let l = one("203.0.113.0/24, 2001:db8::/32").unwrap();
        let now = SystemTime::UNIX_EPOCH;
        assert!(l.allows("::ffff:203.0.113.7".parse().unwrap(), now));
        assert!(l.allows("2001:db8::7".parse().unwrap(), now));
        assert!(!l.allows("198.51.100.7".parse().unwrap(), now));
        assert!(
            one("")
                .unwrap()
                .allows("198.51.100.7".parse().unwrap(), now)
        );
        let v6_any = one("::/0").unwrap();
        assert!(
            !v6_any.allows("198.51.100.7".parse().unwrap(), now),
            "::/0 is IPv6 only"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics_on_arbitrary_text(s in ".{0,80}") {
            let _ = one(&s);
        }

        #[test]
        fn canonical_text_round_trips(
            nets in prop::collection::vec(
                prop_oneof![
                    (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a.into(), l).unwrap().trunc())),
                    (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::V6(ipnet::Ipv6Net::new(a.into(), l).unwrap().trunc())),
                ],
                0..20,
            )
        ) {
            let text = nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",\n");
            let first = one(&text).unwrap();
            let again = one(&to_canonical_string(&first)).unwrap();
            prop_assert_eq!(first, again);
        }
    }
}

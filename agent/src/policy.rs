//! The pure policy compiler: keys and listeners in, per-listener packet-level
//! access out (SPEC §7). Both layers compile from the same snapshot: the datapath
//! drops only what the shim would refuse anyway, for every key the listener accepts.
//!
//! For each listener with `early_drop`:
//! - the keys it accepts are all keys, or only those of its `tenants`, holding the
//!   `api` scope;
//! - one accepted key that is unrestricted (empty list) or `report_only` opens it;
//! - otherwise its allow set is the union of the accepted keys' active entries,
//!   widened by where the TCP peer may legitimately come from: `x_forwarded_for`
//!   adds `trusted_proxies` (their peers speak for clients), `proxy_protocol`
//!   *is* `trusted_proxies` (the shim closes every other peer before reading a key);
//! - duplicates and covered prefixes are collapsed.

use std::{net::SocketAddr, time::SystemTime};

use crate::{
    allowlist::Net,
    config::{ClientIpSource, ListenerConfig},
    keys::Key,
    prefixset::{Change, PrefixSet},
};

/// What the datapath enforces for every listener.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub listeners: Vec<ListenerPolicy>,
    /// When an entry expires next: the policy must be compiled again then.
    pub next_change: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerPolicy {
    pub name: String,
    pub bind: SocketAddr,
    pub access: Access,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Every source passes at packet level; the shim decides alone.
    Open,
    /// Only sources inside these prefixes (canonical, collapsed) pass.
    Restricted(Vec<Net>),
}

impl Access {
    /// Number of prefixes the datapath holds for this listener.
    #[must_use]
    pub fn prefix_count(&self) -> usize {
        match self {
            Access::Open => 0,
            Access::Restricted(nets) => nets.len(),
        }
    }
}

/// Does `listener` accept `key` at all (tenant and scope)?
#[must_use]
pub fn accepts(listener: &ListenerConfig, key: &Key) -> bool {
    key.is_api()
        && listener
            .tenants
            .as_ref()
            .is_none_or(|tenants| tenants.contains(&key.tenant))
}

/// Compile the packet-level policy of every listener at `now`.
#[must_use]
pub fn compile(listeners: &[ListenerConfig], keys: &[&Key], now: SystemTime) -> CompiledPolicy {
    PolicyState::build(listeners, keys, now).compiled()
}

/// What one key change did to the packet-level policy.
#[derive(Clone, Debug, Default)]
pub struct KeyChange {
    /// Some listener opened or closed: the datapath needs a full apply.
    pub reshaped: bool,
    /// Restricted listeners whose prefixes changed, and how.
    pub restricted: Vec<(String, Change)>,
}

/// The compiled policy kept between changes, so that a change to one key
/// costs work in proportion to that key's list, not to every list.
#[derive(Clone, Debug, Default)]
pub struct PolicyState {
    listeners: Vec<(ListenerConfig, Rule)>,
    next_change: Option<SystemTime>,
}

#[derive(Clone, Debug)]
enum Rule {
    /// `early_drop: false`.
    Open,
    /// `proxy_protocol`: only the trusted proxies, whatever the keys.
    Proxies(Vec<Net>),
    /// The union of the accepted keys' lists.
    Keys {
        /// Accepted keys that open the listener (unrestricted or report-only).
        openers: usize,
        /// Active entries of the other accepted keys, plus trusted proxies
        /// for `x_forwarded_for`, collapsed; the set counts each network's
        /// contributions (a key's entry, a trusted proxy), so a network
        /// stays while anything else still lists it.
        nets: PrefixSet,
    },
}

impl Rule {
    /// Prefixes of a restricted listener; `None` when it is open.
    fn restricted_len(&self) -> Option<usize> {
        match self {
            Rule::Open | Rule::Keys { openers: 1.., .. } => None,
            Rule::Proxies(nets) => Some(nets.len()),
            Rule::Keys { nets, .. } => Some(nets.len()),
        }
    }
}

fn opens(key: &Key) -> bool {
    key.report_only || key.allow.is_unrestricted()
}

/// What `key` adds to a `Rule::Keys` listener's union at `now`.
fn contribution<'k>(
    listener: &ListenerConfig,
    key: &'k Key,
    now: SystemTime,
) -> impl Iterator<Item = Net> + 'k {
    let counts = accepts(listener, key) && !opens(key);
    // Allow lists are canonical: host bits are already clear.
    key.allow
        .active_nets(now)
        .take(if counts { usize::MAX } else { 0 })
}

/// The networks of `new` that `old` lacks, and of `old` that `new` lacks;
/// both sorted and distinct, as an allow list's networks are.
fn sorted_difference(
    new: impl Iterator<Item = Net>,
    old: impl Iterator<Item = Net>,
) -> (Vec<Net>, Vec<Net>) {
    let (mut new, mut old) = (new.peekable(), old.peekable());
    let (mut came, mut went) = (Vec::new(), Vec::new());
    loop {
        match (new.peek(), old.peek()) {
            (Some(a), Some(b)) => match a.cmp(b) {
                std::cmp::Ordering::Less => came.extend(new.next()),
                std::cmp::Ordering::Greater => went.extend(old.next()),
                std::cmp::Ordering::Equal => {
                    new.next();
                    old.next();
                }
            },
            (Some(_), None) => came.extend(new.by_ref()),
            (None, Some(_)) => went.extend(old.by_ref()),
            (None, None) => break,
        }
    }
    debug_assert!(came.is_sorted_by(|a, b| a < b) && went.is_sorted_by(|a, b| a < b));
    (came, went)
}

impl PolicyState {
    /// Compile from scratch.
    #[must_use]
    pub fn build(listeners: &[ListenerConfig], keys: &[&Key], now: SystemTime) -> Self {
        let next_change = keys.iter().filter_map(|k| k.allow.next_expiry(now)).min();
        let listeners = listeners
            .iter()
            .map(|listener| (listener.clone(), rule(listener, keys, now)))
            .collect();
        Self {
            listeners,
            next_change,
        }
    }

    /// When an entry expires next: the policy must be built again then, and
    /// [`Self::change_key`] must not be used from that instant.
    #[must_use]
    pub fn next_change(&self) -> Option<SystemTime> {
        self.next_change
    }

    /// Account for one key going from `old` to `new` (`None`: absent or
    /// revoked). Valid only before [`Self::next_change`]: until then no
    /// entry's activity changes. Costs work in proportion to the two lists.
    pub fn change_key(
        &mut self,
        old: Option<&Key>,
        new: Option<&Key>,
        now: SystemTime,
    ) -> KeyChange {
        let mut out = KeyChange::default();
        for (listener, rule) in &mut self.listeners {
            let Rule::Keys { openers, nets } = rule else {
                continue;
            };
            let accepted_opener =
                |k: Option<&Key>| k.is_some_and(|k| accepts(listener, k) && opens(k));
            let was_open = *openers > 0;
            *openers -= usize::from(accepted_opener(old));
            *openers += usize::from(accepted_opener(new));
            out.reshaped |= was_open != (*openers > 0);
            let mut change = Change::default();
            // Only the networks one version holds and the other not move a
            // count: a one-entry change to a long list is one update.
            let (came, went) = sorted_difference(
                new.into_iter().flat_map(|k| contribution(listener, k, now)),
                old.into_iter().flat_map(|k| contribution(listener, k, now)),
            );
            nets.update(came, went, &mut change);
            if *openers == 0 && !change.is_empty() {
                out.restricted.push((listener.name.clone(), change));
            }
        }
        if let Some(expiry) = new.and_then(|k| k.allow.next_expiry(now)) {
            self.next_change = Some(self.next_change.map_or(expiry, |t| t.min(expiry)));
        }
        out
    }

    /// What [`Self::change_key`] of `old` → `new` would do: `f` sees the
    /// state as it would be and the change; afterwards the state is as it
    /// was (the change is undone key for key, which costs the same as
    /// making it). The API asks this before it commits, to refuse a change
    /// the datapath cannot hold.
    pub fn preview_key<R>(
        &mut self,
        old: Option<&Key>,
        new: Option<&Key>,
        now: SystemTime,
        f: impl FnOnce(&Self, &KeyChange) -> R,
    ) -> R {
        let next_change = self.next_change;
        let change = self.change_key(old, new, now);
        let out = f(self, &change);
        self.change_key(new, old, now);
        self.next_change = next_change;
        out
    }

    /// Restricted listeners whose union is empty: every packet to them drops.
    pub fn unreachable(&self) -> impl Iterator<Item = &str> {
        self.listeners
            .iter()
            .filter(|(_, rule)| rule.restricted_len() == Some(0))
            .map(|(listener, _)| listener.name.as_str())
    }

    /// Prefixes the datapath holds for each listener (0 for an open one).
    pub fn prefix_counts(&self) -> impl Iterator<Item = (&str, usize)> {
        self.listeners
            .iter()
            .map(|(listener, rule)| (listener.name.as_str(), rule.restricted_len().unwrap_or(0)))
    }

    /// What the datapath enforces now.
    #[must_use]
    pub fn compiled(&self) -> CompiledPolicy {
        let listeners = self
            .listeners
            .iter()
            .map(|(listener, rule)| ListenerPolicy {
                name: listener.name.clone(),
                bind: listener.bind,
                access: match rule {
                    Rule::Open | Rule::Keys { openers: 1.., .. } => Access::Open,
                    Rule::Proxies(nets) => Access::Restricted(nets.clone()),
                    Rule::Keys { nets, .. } => Access::Restricted(nets.iter().copied().collect()),
                },
            })
            .collect();
        CompiledPolicy {
            listeners,
            next_change: self.next_change,
        }
    }
}

fn rule(listener: &ListenerConfig, keys: &[&Key], now: SystemTime) -> Rule {
    if !listener.early_drop {
        return Rule::Open;
    }
    // Canonical already (the config parses them with the allow-list grammar),
    // like allow-list entries: the datapath writer takes changes as is.
    let trusted = listener.client_ip.trusted_proxies.iter().copied();
    match listener.client_ip.source {
        ClientIpSource::ProxyProtocol => {
            Rule::Proxies(PrefixSet::from_nets(trusted).iter().copied().collect())
        }
        source @ (ClientIpSource::Peer | ClientIpSource::XForwardedFor) => {
            let trusted = trusted.filter(|_| source == ClientIpSource::XForwardedFor);
            let openers = keys
                .iter()
                .filter(|k| accepts(listener, k) && opens(k))
                .count();
            // Counted in bulk (see `PrefixSet::from_nets`): one insert at a
            // time left the nodes ~60% full, 21 MiB more at 100k keys × 10
            // entries.
            Rule::Keys {
                openers,
                nets: PrefixSet::from_nets(
                    keys.iter()
                        .flat_map(|k| contribution(listener, k, now))
                        .chain(trusted),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        allowlist::{AllowEntry, AllowList},
        keys::testing::listener,
    };

    fn key(id: &str, nets: &[&str]) -> Key {
        crate::keys::testing::key(id, id, &nets.join(", "))
    }

    fn nets(v: &[&str]) -> Access {
        Access::Restricted(v.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn compile_now(listeners: &[ListenerConfig], keys: &[Key]) -> CompiledPolicy {
        compile(
            listeners,
            &keys.iter().collect::<Vec<_>>(),
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn union_of_accepted_keys_collapsed() {
        let keys = [
            key("a", &["203.0.113.100/32", "203.0.113.101/32"]),
            key("b", &["203.0.113.0/24", "2001:db8:1::/48"]),
            key("c", &["198.51.100.7/32"]),
        ];
        let p = compile_now(&[listener("api", 8443)], &keys);
        assert_eq!(
            p.listeners[0].access,
            nets(&["198.51.100.7/32", "203.0.113.0/24", "2001:db8:1::/48"])
        );
    }

    #[test]
    fn adjacent_prefixes_merge() {
        let keys = [key("a", &["192.0.2.0/25"]), key("b", &["192.0.2.128/25"])];
        let p = compile_now(&[listener("api", 1)], &keys);
        assert_eq!(p.listeners[0].access, nets(&["192.0.2.0/24"]));
    }

    #[test]
    fn one_unrestricted_key_opens_the_listener() {
        let keys = [key("a", &["192.0.2.1/32"]), key("dev", &[])];
        let p = compile_now(&[listener("api", 1)], &keys);
        assert_eq!(p.listeners[0].access, Access::Open);
    }

    #[test]
    fn report_only_key_opens_the_listener() {
        let mut k = key("a", &["192.0.2.1/32"]);
        k.report_only = true;
        let p = compile_now(&[listener("api", 1)], &[k]);
        assert_eq!(p.listeners[0].access, Access::Open);
    }

    #[test]
    fn early_drop_off_is_open() {
        let mut l = listener("api", 1);
        l.early_drop = false;
        let p = compile_now(&[l], &[key("a", &["192.0.2.1/32"])]);
        assert_eq!(p.listeners[0].access, Access::Open);
    }

    #[test]
    fn tenants_limit_the_keys_a_listener_accepts() {
        let mut public = listener("public", 2);
        public.tenants = Some(vec!["public".into()]);
        let mut open_key = key("anyone", &[]);
        open_key.tenant = "public".into();
        let keys = [key("prod", &["192.0.2.10/32"]), open_key];
        let p = compile_now(&[listener("api", 1), public], &keys);
        // `api` accepts every key, so the unrestricted one opens it too.
        assert_eq!(p.listeners[0].access, Access::Open);
        assert_eq!(p.listeners[1].access, Access::Open);

        let mut only_default = listener("internal", 3);
        only_default.tenants = Some(vec!["default".into()]);
        let p = compile_now(&[only_default], &keys);
        assert_eq!(p.listeners[0].access, nets(&["192.0.2.10/32"]));
    }

    #[test]
    fn keys_without_api_scope_do_not_count() {
        let mut admin = key("admin", &[]);
        admin.scopes = crate::keys::Scopes::ADMIN;
        let p = compile_now(&[listener("api", 1)], &[admin, key("a", &["192.0.2.1/32"])]);
        assert_eq!(p.listeners[0].access, nets(&["192.0.2.1/32"]));
    }

    #[test]
    fn no_keys_means_nothing_passes() {
        let p = compile_now(&[listener("api", 1)], &[]);
        assert_eq!(p.listeners[0].access, nets(&[]));
    }

    #[test]
    fn forwarded_for_admits_trusted_proxies() {
        let mut l = listener("api", 1);
        l.client_ip.source = ClientIpSource::XForwardedFor;
        l.client_ip.trusted_proxies = vec!["198.51.100.0/28".parse().unwrap()];
        let p = compile_now(&[l], &[key("a", &["203.0.113.5/32"])]);
        assert_eq!(
            p.listeners[0].access,
            nets(&["198.51.100.0/28", "203.0.113.5/32"])
        );
    }

    #[test]
    fn proxy_protocol_admits_only_trusted_proxies() {
        let mut l = listener("api", 1);
        l.client_ip.source = ClientIpSource::ProxyProtocol;
        l.client_ip.trusted_proxies = vec!["198.51.100.0/28".parse().unwrap()];
        // Even an unrestricted key does not open it: the peer must be a proxy.
        let p = compile_now(&[l], &[key("a", &["203.0.113.5/32"]), key("dev", &[])]);
        assert_eq!(p.listeners[0].access, nets(&["198.51.100.0/28"]));
    }

    #[test]
    fn expired_entries_leave_the_union_and_expiry_is_scheduled() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let expiry = t0 + Duration::from_mins(1);
        let mut k = key("a", &["192.0.2.1/32"]);
        k.allow = AllowList::from_canonical(vec![
            AllowEntry {
                net: "192.0.2.1/32".parse().unwrap(),
                note: None,
                expires_at: None,
            },
            AllowEntry {
                net: "198.51.100.0/24".parse().unwrap(),
                note: Some("contractor".into()),
                expires_at: Some(expiry),
            },
        ]);
        let keys = [k];
        let before = compile(&[listener("api", 1)], &keys.iter().collect::<Vec<_>>(), t0);
        assert_eq!(
            before.listeners[0].access,
            nets(&["192.0.2.1/32", "198.51.100.0/24"])
        );
        assert_eq!(before.next_change, Some(expiry));
        let after = compile(
            &[listener("api", 1)],
            &keys.iter().collect::<Vec<_>>(),
            expiry,
        );
        assert_eq!(after.listeners[0].access, nets(&["192.0.2.1/32"]));
        assert_eq!(after.next_change, None);
    }

    #[test]
    fn fully_expired_list_is_not_unrestricted() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let k = Key {
            allow: AllowList::from_canonical(vec![AllowEntry {
                net: "192.0.2.1/32".parse().unwrap(),
                note: None,
                expires_at: Some(t0),
            }]),
            ..key("a", &[])
        };
        let p = compile(&[listener("api", 1)], &[&k], t0);
        assert_eq!(p.listeners[0].access, nets(&[]));
    }

    const POOL: [&str; 10] = [
        "192.0.2.0/25",
        "192.0.2.128/25",
        "192.0.2.1/32",
        "192.0.2.0/24",
        "198.51.100.7/32",
        "198.51.100.6/32",
        "203.0.113.0/24",
        "2001:db8::/33",
        "2001:db8:8000::/33",
        "2001:db8::1/128",
    ];

    fn arb_key() -> impl Strategy<Value = Key> {
        (
            prop::sample::subsequence(POOL.to_vec(), 0..5),
            prop::sample::select(vec!["default", "other"]),
            any::<bool>(),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(nets, tenant, api, report_only)| {
                let mut k = key("k", &nets);
                k.tenant = tenant.into();
                if !api {
                    k.scopes = crate::keys::Scopes::ADMIN;
                }
                k.report_only = report_only;
                k
            })
    }

    fn arb_listeners() -> impl Strategy<Value = Vec<ListenerConfig>> {
        (any::<bool>(), any::<bool>(), prop::bool::weighted(0.2)).prop_map(
            |(tenant_only, forwarded, open)| {
                let mut all = listener("all", 1);
                all.early_drop = !open;
                let mut some = listener("some", 2);
                if tenant_only {
                    some.tenants = Some(vec!["default".into()]);
                }
                if forwarded {
                    some.client_ip.source = ClientIpSource::XForwardedFor;
                    some.client_ip.trusted_proxies = vec!["192.0.2.0/26".parse().unwrap()];
                }
                let mut proxied = listener("proxied", 3);
                proxied.client_ip.source = ClientIpSource::ProxyProtocol;
                proxied.client_ip.trusted_proxies = vec!["203.0.113.0/25".parse().unwrap()];
                vec![all, some, proxied]
            },
        )
    }

    proptest! {
        /// Any sequence of key changes applied one by one gives exactly what
        /// compiling every key from scratch gives.
        #[test]
        fn changes_match_a_full_compile(
            listeners in arb_listeners(),
            start in prop::collection::vec(prop::option::of(arb_key()), 4),
            steps in prop::collection::vec((0..4_usize, prop::option::of(arb_key())), 1..10),
        ) {
            let now = SystemTime::UNIX_EPOCH;
            let mut keys = start;
            let accesses = |keys: &[Option<Key>]| -> Vec<Key> {
                keys.iter().flatten().cloned().collect()
            };
            let current = accesses(&keys);
            let mut state = PolicyState::build(
                &listeners,
                &current.iter().collect::<Vec<_>>(),
                now,
            );
            for (i, new) in steps {
                let old = keys[i].take();
                keys[i] = new;
                let after = accesses(&keys);
                let after_access: Vec<&Key> = after.iter().collect();
                let before = state.compiled();
                let previewed = state.preview_key(
                    old.as_ref(),
                    keys[i].as_ref(),
                    now,
                    |s, _| s.compiled(),
                );
                prop_assert_eq!(&previewed, &compile(&listeners, &after_access, now));
                prop_assert_eq!(&state.compiled(), &before, "a preview changes nothing");
                let change = state.change_key(
                    old.as_ref(),
                    keys[i].as_ref(),
                    now,
                );
                let compiled = state.compiled();
                prop_assert_eq!(&compiled, &compile(&listeners, &after_access, now));
                let counts: Vec<usize> = state.prefix_counts().map(|(_, c)| c).collect();
                let want: Vec<usize> = compiled.listeners.iter().map(|l| l.access.prefix_count()).collect();
                prop_assert_eq!(counts, want);
                let unreachable: Vec<&str> = state.unreachable().collect();
                let want: Vec<&str> = compiled
                    .listeners
                    .iter()
                    .filter(|l| l.access == Access::Restricted(Vec::new()))
                    .map(|l| l.name.as_str())
                    .collect();
                prop_assert_eq!(unreachable, want);
                if change.reshaped {
                    continue;
                }
                // Without a reshape, the reported changes take every listener
                // from its old prefixes to its new ones.
                for (was, is) in before.listeners.iter().zip(&compiled.listeners) {
                    let moved = change.restricted.iter().find(|(n, _)| *n == is.name);
                    match (&was.access, &is.access, moved) {
                        (Access::Restricted(was), Access::Restricted(is), Some((_, c))) => {
                            let mut nets: std::collections::BTreeSet<Net> =
                                was.iter().copied().collect();
                            for n in &c.removed {
                                prop_assert!(nets.remove(n));
                            }
                            nets.extend(&c.added);
                            prop_assert_eq!(nets.into_iter().collect::<Vec<_>>(), is.clone());
                        }
                        (was, is, None) => prop_assert_eq!(was, is),
                        (was, is, Some(_)) => {
                            prop_assert!(false, "a change reported for {:?} -> {:?}", was, is);
                        }
                    }
                }
            }
        }
    }
}

//! How many addresses a list covers, in words a person reads at a glance:
//! "256 addresses", "2^64 IPv6 addresses". Overlapping entries count once.

use std::fmt;

use ipnet::IpNet;

/// The addresses a set of networks covers, IPv4 and IPv6 apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub v4: u64,
    /// `None` is all of IPv6 (2^128 does not fit a `u128`).
    pub v6: Option<u128>,
}

impl Coverage {
    /// Of `nets`, merged first so that an address in two entries counts once.
    pub fn of(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let nets: Vec<IpNet> = nets.into_iter().collect();
        let mut out = Self { v4: 0, v6: Some(0) };
        for net in IpNet::aggregate(&nets) {
            match net {
                IpNet::V4(n) => out.v4 += 1u64 << (32 - u32::from(n.prefix_len())),
                IpNet::V6(n) => {
                    let bits = 128 - u32::from(n.prefix_len());
                    out.v6 = match (out.v6, 1u128.checked_shl(bits).filter(|_| bits < 128)) {
                        (Some(sum), Some(add)) => sum.checked_add(add),
                        _ => None,
                    };
                }
            }
        }
        out
    }

    /// The addresses of one network.
    #[must_use]
    pub fn net(net: IpNet) -> Self {
        Self::of([net])
    }
}

/// `1,024` for small counts, `2^k` (or `about 2^k`) for large ones.
fn count(n: u128) -> String {
    if n < 1 << 40 {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if n.is_power_of_two() {
        format!("2^{}", n.trailing_zeros())
    } else {
        format!("about 2^{}", n.ilog2())
    }
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = match self.v6 {
            None => Some("2^128".to_string()),
            Some(0) => None,
            Some(n) => Some(count(n)),
        };
        let noun = |n: u128| if n == 1 { "address" } else { "addresses" };
        match (self.v4, v6) {
            (0, None) => f.write_str("no addresses"),
            (v4, None) => write!(f, "{} {}", count(v4.into()), noun(v4.into())),
            (0, Some(v6)) => write!(f, "{v6} IPv6 {}", noun(self.v6.map_or(2, |n| n))),
            (v4, Some(v6)) => write!(f, "{} IPv4 and {v6} IPv6 addresses", count(v4.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cover(nets: &[&str]) -> String {
        Coverage::of(nets.iter().map(|n| n.parse::<IpNet>().unwrap())).to_string()
    }

    #[test]
    fn counts_read_as_words() {
        assert_eq!(cover(&[]), "no addresses");
        assert_eq!(cover(&["203.0.113.7/32"]), "1 address");
        assert_eq!(
            cover(&["203.0.113.0/24", "203.0.113.128/25"]),
            "256 addresses"
        );
        assert_eq!(cover(&["10.0.0.0/8"]), "16,777,216 addresses");
        assert_eq!(cover(&["0.0.0.0/0"]), "4,294,967,296 addresses");
        assert_eq!(cover(&["2001:db8::1/128"]), "1 IPv6 address");
        assert_eq!(cover(&["2001:db8::/64"]), "2^64 IPv6 addresses");
        assert_eq!(cover(&["::/0"]), "2^128 IPv6 addresses");
        assert_eq!(
            cover(&["2001:db8::/64", "2001:db8:1::/64"]),
            "2^65 IPv6 addresses"
        );
        assert_eq!(
            cover(&["2001:db8::/64", "2001:db8:1::/65"]),
            "about 2^64 IPv6 addresses"
        );
        assert_eq!(
            cover(&["198.51.100.0/24", "2001:db8::/120"]),
            "256 IPv4 and 256 IPv6 addresses"
        );
    }
}

//! The SSRF guard: webhook URLs come from users, so the sender refuses to
//! connect to addresses inside the network it runs in.
//!
//! The check runs on the addresses a host name resolves to, right before
//! connecting, so a public name that resolves to `10.0.0.1` is refused as
//! surely as the literal. Refused are loopback, private (RFC 1918),
//! shared (CGNAT), link-local, unique-local, multicast, broadcast,
//! unspecified, documentation, benchmarking and reserved ranges, and IPv6
//! forms that embed such an IPv4 address (mapped, NAT64, 6to4). An
//! [`AllowList`] lets chosen networks through (a test's `127.0.0.1`, an
//! internal service).
//!
//! ```
//! use std::net::IpAddr;
//! use watchtower_webhook::ssrf::{is_public, AllowList};
//!
//! assert!(is_public("93.184.215.14".parse::<IpAddr>()?));
//! assert!(!is_public("10.1.2.3".parse::<IpAddr>()?));
//! assert!(!is_public("::ffff:127.0.0.1".parse::<IpAddr>()?));
//!
//! let allow = AllowList::new().with("127.0.0.1")?.with("10.20.0.0/16")?;
//! assert!(allow.contains("10.20.3.4".parse()?));
//! assert!(!allow.contains("10.21.0.1".parse()?));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use watchtower::Error;

/// Whether `ip` is a public, globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network"
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // TEST-NET-1
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 192 && b == 168)
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // NAT64 well-known prefix 64:ff9b::/96 reaches the embedded IPv4 address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    // 6to4 2002::/16 embeds the IPv4 address of its relay target.
    if s[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || s[0..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated)
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (s[0] & 0xff00) == 0xff00 // multicast
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] == 0) // Teredo
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard-only 100::/64
}

/// Networks the guard lets through although they are not public.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    nets: Vec<(IpAddr, u8)>,
}

impl AllowList {
    /// An empty list: only public addresses pass.
    pub fn new() -> AllowList {
        AllowList::default()
    }

    /// Adds an address (`127.0.0.1`, `::1`) or a network in CIDR form
    /// (`10.0.0.0/8`, `fd00::/8`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) if `net` is
    /// neither.
    pub fn with(mut self, net: &str) -> Result<AllowList, Error> {
        self.add(net)?;
        Ok(self)
    }

    /// Adds an address or network in place; see [`AllowList::with`].
    ///
    /// # Errors
    ///
    /// As [`AllowList::with`].
    pub fn add(&mut self, net: &str) -> Result<(), Error> {
        let bad = || Error::config(format!("{net:?} is not an IP address or CIDR network"));
        let (addr, prefix) = match net.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().map_err(|_| bad())?)),
            None => (net, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        self.nets.push((addr, prefix));
        Ok(())
    }

    /// Adds one address.
    pub fn add_ip(&mut self, ip: IpAddr) {
        self.nets.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
    }

    /// Whether `ip` is in one of the listed networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|&(net, prefix)| match (net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), prefix),
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|ip| prefix_eq(&net.octets(), &ip.octets(), prefix)),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        })
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.nets.iter().map(|(ip, p)| format!("{ip}/{p}")))
            .finish()
    }
}

/// The guard: public addresses and the allow-list pass.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    allow: Arc<AllowList>,
}

impl Guard {
    pub(crate) fn new(allow: AllowList) -> Guard {
        Guard {
            allow: Arc::new(allow),
        }
    }

    pub(crate) fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allow.contains(ip)
    }
}

/// A host whose every address the guard refused.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) host: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} resolves only to non-public addresses, refused by the SSRF guard",
            self.host
        )
    }
}

impl std::error::Error for Refused {}

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let permitted: Vec<SocketAddr> = resolved.filter(|addr| guard.permits(addr.ip())).collect();
            if permitted.is_empty() {
                return Err(Box::new(Refused { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for s in [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "2001:db8::1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(s)), "{s} should not be public");
        }
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(ip(s)), "{s} should be public");
        }
    }

    #[test]
    fn allow_list_matches_prefixes() {
        let allow = AllowList::new()
            .with("127.0.0.1")
            .unwrap()
            .with("10.0.0.0/9")
            .unwrap()
            .with("fd00::/8")
            .unwrap();
        assert!(allow.contains(ip("127.0.0.1")));
        assert!(!allow.contains(ip("127.0.0.2")));
        assert!(allow.contains(ip("10.127.0.1")));
        assert!(!allow.contains(ip("10.128.0.1")));
        assert!(allow.contains(ip("fd99::1")));
        assert!(allow.contains(ip("::ffff:127.0.0.1")));
        assert!(!allow.contains(ip("fe80::1")));
        assert!(AllowList::new().with("10.0.0.0/33").is_err());
        assert!(AllowList::new().with("example.com").is_err());
    }
}

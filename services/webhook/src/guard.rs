//! The SSRF guard's address checks, allow-list and resolver; see
//! [`crate::ssrf`].

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
    if let Some(embedded) = embedded_ipv4(ip) {
        return match embedded {
            Embedded::One(v4) => is_public_v4(v4),
            Embedded::Teredo { server, client } => is_public_v4(server) && is_public_v4(client),
            Embedded::Unknown => false,
        };
    }
    let s = ip.segments();
    !((s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (s[0] & 0xff00) == 0xff00 // multicast ff00::/8
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation 2001:db8::/32
        || (s[0] & 0xfff0) == 0x3ff0 // documentation 3fff::/20
        || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // benchmarking 2001:2::/48
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0020) // ORCHIDv2 2001:20::/28
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010) // ORCHID 2001:10::/28 (deprecated)
        || s[0] == 0x5f00 // SRv6 SIDs 5f00::/16
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard-only 100::/64
}

/// The IPv4 address an IPv6 address carries, by the forms that route to
/// or stand for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Embedded {
    /// Mapped, translated, compatible, NAT64 well-known prefix, 6to4.
    One(Ipv4Addr),
    /// Teredo: the server's address, and the client's (stored inverted).
    Teredo { server: Ipv4Addr, client: Ipv4Addr },
    /// A range that embeds an IPv4 address at a place only its operator
    /// knows (local-use NAT64, RFC 8215, whose prefix length RFC 6052 lets
    /// the network choose), or a reserved part of the NAT64 range.
    Unknown,
}

fn v4(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
}

/// Which IPv6 ranges embed an IPv4 address, and where.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Embedded> {
    let s = ip.segments();
    let last = v4(s[6], s[7]);
    match s {
        // IPv4-mapped ::ffff:0:0/96.
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(Embedded::One(last)),
        // IPv4-translated ::ffff:0:0:0/96 (SIIT, RFC 2765).
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(Embedded::One(last)),
        // IPv4-compatible ::/96 (deprecated); `::` and `::1` land on
        // 0.0.0.0 and 0.0.0.1, "this network", refused with it.
        [0, 0, 0, 0, 0, 0, _, _] => Some(Embedded::One(last)),
        // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(Embedded::One(last)),
        // Local-use NAT64 64:ff9b:1::/48 (RFC 8215) and the rest of
        // 64:ff9b::/32, which is reserved.
        [0x64, 0xff9b, ..] => Some(Embedded::Unknown),
        // 6to4 2002::/16: the 32 bits after the prefix.
        [0x2002, hi, lo, ..] => Some(Embedded::One(v4(hi, lo))),
        // Teredo 2001::/32 (RFC 4380): the server in bits 32–63, the
        // client's address inverted in the last 32 bits.
        [0x2001, 0, hi, lo, _, _, chi, clo] => Some(Embedded::Teredo {
            server: v4(hi, lo),
            client: v4(!chi, !clo),
        }),
        _ => None,
    }
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

    /// (address, public?, why).
    const TABLE: &[(&str, bool, &str)] = &[
        // IPv4.
        ("0.0.0.0", false, "this network"),
        ("127.0.0.1", false, "loopback"),
        ("10.0.0.1", false, "private"),
        ("172.16.0.1", false, "private"),
        ("172.31.255.255", false, "private"),
        ("192.168.1.1", false, "private"),
        ("169.254.169.254", false, "link-local, cloud metadata"),
        ("100.64.0.1", false, "shared (CGNAT)"),
        ("224.0.0.1", false, "multicast"),
        ("255.255.255.255", false, "broadcast"),
        ("240.0.0.1", false, "reserved"),
        ("192.0.2.1", false, "documentation"),
        ("198.18.0.1", false, "benchmarking"),
        ("8.8.8.8", true, "public"),
        ("1.1.1.1", true, "public"),
        ("172.32.0.1", true, "just past 172.16/12"),
        ("100.128.0.1", true, "just past 100.64/10"),
        // Plain IPv6.
        ("::", false, "unspecified"),
        ("::1", false, "loopback"),
        ("fc00::1", false, "unique local"),
        ("fd12:3456::1", false, "unique local"),
        ("fe80::1", false, "link-local"),
        ("fec0::1", false, "site-local"),
        ("ff02::1", false, "multicast"),
        ("2001:db8::1", false, "documentation"),
        ("3fff::1", false, "documentation"),
        ("2001:2::1", false, "benchmarking"),
        ("2001:20::1", false, "ORCHIDv2"),
        ("5f00::1", false, "SRv6 SID"),
        ("100::1", false, "discard-only"),
        ("2606:4700:4700::1111", true, "public"),
        ("2a00:1450:4001::200e", true, "public"),
        // IPv4-mapped ::ffff:0:0/96.
        ("::ffff:10.0.0.1", false, "mapped private"),
        ("::ffff:127.0.0.1", false, "mapped loopback"),
        ("::ffff:169.254.169.254", false, "mapped metadata"),
        ("::ffff:8.8.8.8", true, "mapped public"),
        // IPv4-translated ::ffff:0:0:0/96.
        ("::ffff:0:7f00:1", false, "translated loopback"),
        ("::ffff:0:a00:1", false, "translated private"),
        ("::ffff:0:a9fe:a9fe", false, "translated metadata"),
        ("::ffff:0:808:808", true, "translated public"),
        // IPv4-compatible ::/96.
        ("::127.0.0.1", false, "compatible loopback"),
        ("::10.0.0.1", false, "compatible private"),
        ("::8.8.8.8", true, "compatible public"),
        // NAT64 64:ff9b::/96.
        ("64:ff9b::a00:1", false, "NAT64 private"),
        ("64:ff9b::7f00:1", false, "NAT64 loopback"),
        ("64:ff9b::808:808", true, "NAT64 public"),
        // Local-use NAT64 64:ff9b:1::/48 and the rest of 64:ff9b::/32.
        ("64:ff9b:1::a00:1", false, "local-use NAT64, /96 position"),
        ("64:ff9b:1:a00:1::", false, "local-use NAT64, /48 position"),
        ("64:ff9b:1::808:808", false, "local-use NAT64, even public"),
        ("64:ff9b:2::808:808", false, "reserved part of 64:ff9b::/32"),
        // 6to4 2002::/16.
        ("2002:c0a8:101::1", false, "6to4 of 192.168.1.1"),
        ("2002:7f00:1::1", false, "6to4 of loopback"),
        ("2002:a9fe:a9fe::1", false, "6to4 of metadata"),
        ("2002:808:808::1", true, "6to4 of 8.8.8.8"),
        // Teredo 2001::/32: server, then the client inverted.
        (
            "2001:0:4136:e378:8000:63bf:f5ff:fffe",
            false,
            "Teredo client 10.0.0.1",
        ),
        (
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            false,
            "Teredo client 127.0.0.1",
        ),
        (
            "2001:0:a00:1:8000:63bf:f7f7:f7f7",
            false,
            "Teredo server 10.0.0.1",
        ),
        (
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
            true,
            "Teredo server 65.54.227.120, client 8.8.8.8",
        ),
    ];

    #[test]
    fn every_range_is_judged_as_the_table_says() {
        for &(addr, public, why) in TABLE {
            assert_eq!(is_public(ip(addr)), public, "{addr} ({why})");
        }
    }

    #[test]
    fn embedded_addresses_are_found_where_each_form_puts_them() {
        let one = |s: &str| Some(Embedded::One(s.parse().unwrap()));
        assert_eq!(embedded_ipv4("::ffff:1.2.3.4".parse().unwrap()), one("1.2.3.4"));
        assert_eq!(embedded_ipv4("::ffff:0:102:304".parse().unwrap()), one("1.2.3.4"));
        assert_eq!(embedded_ipv4("::1.2.3.4".parse().unwrap()), one("1.2.3.4"));
        assert_eq!(embedded_ipv4("64:ff9b::1.2.3.4".parse().unwrap()), one("1.2.3.4"));
        assert_eq!(embedded_ipv4("2002:102:304::".parse().unwrap()), one("1.2.3.4"));
        assert_eq!(
            embedded_ipv4("2001:0:102:304:0:0:fefd:fcfb".parse().unwrap()),
            Some(Embedded::Teredo {
                server: "1.2.3.4".parse().unwrap(),
                client: "1.2.3.4".parse().unwrap(),
            })
        );
        assert_eq!(embedded_ipv4("2606:4700::1".parse().unwrap()), None);
    }

    #[test]
    fn the_guard_refuses_what_is_not_public_unless_allowed() {
        let guard = Guard::new(AllowList::new().with("127.0.0.1").unwrap());
        assert!(guard.permits(ip("127.0.0.1")));
        assert!(guard.permits(ip("::ffff:127.0.0.1")));
        assert!(!guard.permits(ip("::ffff:0:7f00:1")));
        assert!(!guard.permits(ip("64:ff9b:1::7f00:1")));
        assert!(guard.permits(ip("8.8.8.8")));
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

//! The SSRF guard: webhook URLs come from users, so the sender refuses to
//! connect to addresses inside the network it runs in.
//!
//! The check runs on the addresses a host name resolves to, right before
//! connecting, so a public name that resolves to `10.0.0.1` is refused as
//! surely as the literal. Refused are loopback, private (RFC 1918),
//! shared (CGNAT), link-local, unique-local, multicast, broadcast,
//! unspecified, documentation, benchmarking and reserved ranges.
//!
//! IPv6 addresses that embed an IPv4 address are judged by the embedded
//! address, since that is where the packets end up: IPv4-mapped
//! (`::ffff:0:0/96`), IPv4-translated (`::ffff:0:0:0/96`), IPv4-compatible
//! (`::/96`), NAT64 (`64:ff9b::/96`), 6to4 (`2002::/16`, the 32 bits after
//! the prefix) and Teredo (`2001::/32`: both the server and the
//! de-obfuscated client address must be public). The local-use NAT64
//! prefix `64:ff9b:1::/48` and the rest of `64:ff9b::/32` are refused
//! outright: where the IPv4 address sits there depends on a prefix length
//! only the network's operator knows (RFC 6052, RFC 8215). An
//! [`AllowList`](crate::AllowList) lets chosen networks through (a test's `127.0.0.1`, an
//! internal service).
//!
//! ```
//! use std::net::IpAddr;
//! use watchtower_webhook::AllowList;
//! use watchtower_webhook::ssrf::is_public;
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

pub use crate::guard::is_public;

//! [`PeerId`]: who a datagram came from, as far as the CoAP layers care.
//!
//! RFC 7252 §4.5 / §5.3.2 match duplicates and responses per *endpoint*. On
//! plain UDP an endpoint is its transport address; over DTLS (RFC 7252 §9.1)
//! it is the security association, whatever address its records currently
//! arrive from. `PeerId` is the opaque per-shard handle for either, so the
//! exchange layer and the LwM2M layers above it never look at sockets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// Three words: the address (IPv4 in the low word), then port, family,
/// transport and IPv6 scope. Compared and hashed word by word: it is the key
/// of the per-shard tables every datagram probes (duplicate detection,
/// registrations by address), where comparing `SocketAddr` enums field by
/// field showed up in profiles (5% of a NON point), and 24 bytes instead of
/// 36 in every table that holds one. The IPv6 flow label is not part of a
/// peer's identity (datagrams are sent with none).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    hi: u64,
    lo: u64,
    /// port | V6 << 16 | DTLS << 17 | scope_id << 32.
    meta: u64,
}

const V6: u64 = 1 << 16;
const DTLS: u64 = 1 << 17;

impl PeerId {
    fn new(addr: SocketAddr, dtls: bool) -> PeerId {
        let kind = if dtls { DTLS } else { 0 };
        match addr {
            SocketAddr::V4(a) => PeerId {
                hi: 0,
                lo: u32::from(*a.ip()) as u64,
                meta: a.port() as u64 | kind,
            },
            SocketAddr::V6(a) => {
                let ip = u128::from(*a.ip());
                PeerId {
                    hi: (ip >> 64) as u64,
                    lo: ip as u64,
                    meta: a.port() as u64 | V6 | kind | (a.scope_id() as u64) << 32,
                }
            }
        }
    }

    pub fn udp(addr: SocketAddr) -> PeerId {
        PeerId::new(addr, false)
    }

    pub fn dtls(addr: SocketAddr) -> PeerId {
        PeerId::new(addr, true)
    }

    /// The transport address datagrams to this peer go to.
    pub fn addr(&self) -> SocketAddr {
        let port = self.meta as u16;
        if self.meta & V6 != 0 {
            let ip = Ipv6Addr::from(((self.hi as u128) << 64) | self.lo as u128);
            SocketAddr::V6(SocketAddrV6::new(ip, port, 0, (self.meta >> 32) as u32))
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(self.lo as u32)), port)
        }
    }

    /// True for a DTLS session.
    pub fn is_dtls(&self) -> bool {
        self.meta & DTLS != 0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_dtls() {
            write!(f, "coaps://{}", self.addr())
        } else {
            write!(f, "{}", self.addr())
        }
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_dtls() { "dtls" } else { "udp" };
        write!(f, "{kind}:{}", self.addr())
    }
}

impl From<SocketAddr> for PeerId {
    fn from(a: SocketAddr) -> PeerId {
        PeerId::udp(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_distinguishes() {
        let addrs: Vec<SocketAddr> = [
            "127.0.0.1:5683",
            "10.1.2.3:65535",
            "0.0.0.0:0",
            "[::1]:5683",
            "[::ffff:127.0.0.1]:5683",
            "[fe80::1%7]:40000",
            "[2001:db8::ffff:ffff:ffff:ffff]:1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut seen = std::collections::HashSet::new();
        for a in &addrs {
            for p in [PeerId::udp(*a), PeerId::dtls(*a)] {
                assert_eq!(p.addr(), *a);
                assert_eq!(p.is_dtls(), p == PeerId::dtls(*a));
                assert!(seen.insert(p), "{p:?} collides");
            }
        }
        assert_eq!(PeerId::udp(addrs[0]).to_string(), "127.0.0.1:5683");
        assert_eq!(PeerId::dtls(addrs[3]).to_string(), "coaps://[::1]:5683");
        assert_eq!(
            format!("{:?}", PeerId::dtls(addrs[0])),
            "dtls:127.0.0.1:5683"
        );
        // IPv4 and its IPv4-mapped IPv6 form are different peers, as
        // SocketAddr has them.
        assert_ne!(PeerId::udp(addrs[0]), PeerId::udp(addrs[4]));
        assert_eq!(std::mem::size_of::<PeerId>(), 24);
    }
}

//! [`PeerId`]: who a datagram came from, as far as the CoAP layers care.
//!
//! RFC 7252 §4.5 / §5.3.2 match duplicates and responses per *endpoint*. On
//! plain UDP an endpoint is its transport address; over DTLS (RFC 7252 §9.1)
//! it is the security association, whatever address its records currently
//! arrive from. `PeerId` is the opaque per-shard handle for either, so the
//! exchange layer and the LwM2M layers above it never look at sockets.

use std::fmt;
use std::net::SocketAddr;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(Inner);

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Inner {
    /// Plain CoAP over UDP: the peer is its address.
    Udp(SocketAddr),
    /// CoAP over DTLS: the session with this address on this shard (RFC
    /// 7252 §9.1: the security association is the endpoint; without
    /// Connection IDs a session is bound to its address).
    Dtls(SocketAddr),
}

impl PeerId {
    pub fn udp(addr: SocketAddr) -> PeerId {
        PeerId(Inner::Udp(addr))
    }

    pub fn dtls(addr: SocketAddr) -> PeerId {
        PeerId(Inner::Dtls(addr))
    }

    /// The transport address datagrams to this peer go to.
    pub fn addr(&self) -> SocketAddr {
        match self.0 {
            Inner::Udp(a) | Inner::Dtls(a) => a,
        }
    }

    /// True for a DTLS session.
    pub fn is_dtls(&self) -> bool {
        matches!(self.0, Inner::Dtls(_))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Inner::Udp(a) => write!(f, "{a}"),
            Inner::Dtls(a) => write!(f, "coaps://{a}"),
        }
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Inner::Udp(a) => write!(f, "udp:{a}"),
            Inner::Dtls(a) => write!(f, "dtls:{a}"),
        }
    }
}

impl From<SocketAddr> for PeerId {
    fn from(a: SocketAddr) -> PeerId {
        PeerId::udp(a)
    }
}

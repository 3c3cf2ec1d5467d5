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
}

impl PeerId {
    pub fn udp(addr: SocketAddr) -> PeerId {
        PeerId(Inner::Udp(addr))
    }

    /// The transport address datagrams to this peer go to.
    pub fn addr(&self) -> SocketAddr {
        match self.0 {
            Inner::Udp(a) => a,
        }
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Inner::Udp(a) => write!(f, "{a}"),
        }
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Inner::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

impl From<SocketAddr> for PeerId {
    fn from(a: SocketAddr) -> PeerId {
        PeerId::udp(a)
    }
}

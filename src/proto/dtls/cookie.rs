//! Stateless cookies for the HelloVerifyRequest exchange (RFC 6347 §4.2.1).
//!
//! "The server then verifies the cookie and proceeds with the handshake
//! only if it is valid. This mechanism forces the attacker/client to be
//! able to receive the cookie, which makes DoS attacks with spoofed IP
//! addresses difficult." The cookie is
//! `HMAC-SHA256(secret, client address ‖ client_version ‖ random ‖
//! session_id ‖ cipher_suites ‖ compression_methods)`, every variable field
//! length-prefixed. A first ClientHello costs one HMAC and allocates
//! nothing: no per-peer state exists until a hello comes back with a valid
//! cookie. The secret rotates (RFC 6347 §4.2.1: "the secret [should be]
//! changed frequently"); a cookie made with the current or the previous
//! secret is accepted, so a rotation between the two hellos is harmless.
//!
//! The random secret is the caller's input (sans-IO: no entropy source
//! here).

use super::crypto::{ct_eq, HmacKey};
use super::handshake::ClientHello;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub const COOKIE_LEN: usize = 32;

pub struct CookieJar {
    current: HmacKey,
    previous: Option<HmacKey>,
    rotated_at: Instant,
    every: Duration,
}

impl CookieJar {
    pub fn new(now: Instant, secret: [u8; 32], every: Duration) -> CookieJar {
        CookieJar {
            current: HmacKey::new(&secret),
            previous: None,
            rotated_at: now,
            every,
        }
    }

    /// When the secret should next rotate.
    pub fn rotation_due(&self) -> Instant {
        self.rotated_at + self.every
    }

    /// Installs a new secret; the old one stays valid for one more period.
    pub fn rotate(&mut self, now: Instant, secret: [u8; 32]) {
        let old = std::mem::replace(&mut self.current, HmacKey::new(&secret));
        self.previous = Some(old);
        self.rotated_at = now;
    }

    fn compute(key: &HmacKey, peer: SocketAddr, h: &ClientHello<'_>) -> [u8; COOKIE_LEN] {
        let mut m = key.mac();
        match peer.ip() {
            IpAddr::V4(a) => m.update(&a.octets()),
            IpAddr::V6(a) => m.update(&a.octets()),
        }
        m.update(&peer.port().to_be_bytes());
        m.update(&h.client_version.to_be_bytes());
        m.update(h.random);
        for f in [h.session_id, h.cipher_suites, h.compression_methods] {
            m.update(&(f.len() as u32).to_be_bytes());
            m.update(f);
        }
        m.finish()
    }

    /// The cookie to send to `peer` for this hello.
    pub fn cookie(&self, peer: SocketAddr, h: &ClientHello<'_>) -> [u8; COOKIE_LEN] {
        Self::compute(&self.current, peer, h)
    }

    /// True when the hello carries a cookie this jar made for `peer` (with
    /// the current or the previous secret). Constant time in the cookie.
    pub fn verify(&self, peer: SocketAddr, h: &ClientHello<'_>) -> bool {
        if h.cookie.len() != COOKIE_LEN {
            return false;
        }
        if ct_eq(&Self::compute(&self.current, peer, h), h.cookie) {
            return true;
        }
        self.previous
            .as_ref()
            .is_some_and(|p| ct_eq(&Self::compute(p, peer, h), h.cookie))
    }
}

#[cfg(test)]
mod tests {
    use super::super::handshake::{client_hello, testing};
    use super::*;

    #[test]
    fn cookie_binds_address_and_hello_and_survives_one_rotation() {
        let t = Instant::now();
        let mut jar = CookieJar::new(t, [1; 32], Duration::from_secs(60));
        let a: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let first = testing::client_hello(0, 0, &[], &[0xc0a8]);
        let c = jar.cookie(a, &client_hello(&first).unwrap());
        let second = testing::client_hello(1, 1, &c, &[0xc0a8]);
        let h2 = client_hello(&second).unwrap();
        assert!(jar.verify(a, &h2));
        // Another port, another address: refused.
        assert!(!jar.verify("10.0.0.1:4001".parse().unwrap(), &h2));
        assert!(!jar.verify("10.0.0.2:4000".parse().unwrap(), &h2));
        // Other suites offered in the second hello: refused.
        let other = testing::client_hello(1, 1, &c, &[0xc0a8, 0x00ae]);
        assert!(!jar.verify(a, &client_hello(&other).unwrap()));
        // One rotation: still valid; two: expired.
        jar.rotate(t, [2; 32]);
        assert!(jar.verify(a, &h2));
        jar.rotate(t, [3; 32]);
        assert!(!jar.verify(a, &h2));
        // A flipped bit and a short cookie are refused.
        let mut bad = c;
        bad[0] ^= 1;
        let b = testing::client_hello(1, 1, &bad, &[0xc0a8]);
        assert!(!jar.verify(a, &client_hello(&b).unwrap()));
        let s = testing::client_hello(1, 1, &c[..16], &[0xc0a8]);
        assert!(!jar.verify(a, &client_hello(&s).unwrap()));
    }
}

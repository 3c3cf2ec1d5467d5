//! The keyed hashes the DTLS layer computes itself: HMAC-SHA256 (RFC 2104)
//! over OpenSSL's SHA-256, allocation-free, and the TLS 1.2 PRF
//! (RFC 5246 §5) with the key expansion of §6.3.

use openssl::sha::{sha256, Sha256};

/// HMAC-SHA256 with the inner and outer pads absorbed once per key, so
/// each MAC clones two hash states (no allocation).
#[derive(Clone)]
pub struct HmacKey {
    inner: Sha256,
    outer: Sha256,
}

impl HmacKey {
    pub fn new(key: &[u8]) -> HmacKey {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&sha256(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for i in 0..64 {
            ipad[i] ^= k[i];
            opad[i] ^= k[i];
        }
        let mut inner = Sha256::new();
        inner.update(&ipad);
        let mut outer = Sha256::new();
        outer.update(&opad);
        HmacKey { inner, outer }
    }

    /// Starts a MAC.
    pub fn mac(&self) -> Hmac {
        Hmac {
            inner: self.inner.clone(),
            outer: self.outer.clone(),
        }
    }

    /// MAC of the concatenation of `parts`.
    pub fn digest(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.mac();
        for p in parts {
            m.update(p);
        }
        m.finish()
    }
}

pub struct Hmac {
    inner: Sha256,
    outer: Sha256,
}

impl Hmac {
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
    }
    pub fn finish(self) -> [u8; 32] {
        let h = self.inner.finish();
        let mut o = self.outer;
        o.update(&h);
        o.finish()
    }
}

/// TLS 1.2 PRF with SHA-256 (RFC 5246 §5):
/// `PRF(secret, label, seed) = P_SHA256(secret, label + seed)`, where
/// `P_hash(secret, seed) = HMAC(secret, A(1) + seed) + HMAC(secret, A(2) + seed) + …`
/// and `A(0) = seed`, `A(i) = HMAC(secret, A(i-1))`.
pub fn prf_sha256(secret: &[u8], label: &[u8], seed: &[&[u8]], out: &mut [u8]) {
    let key = HmacKey::new(secret);
    let mut a = {
        let mut m = key.mac();
        m.update(label);
        for s in seed {
            m.update(s);
        }
        m.finish()
    };
    let mut off = 0;
    while off < out.len() {
        let mut m = key.mac();
        m.update(&a);
        m.update(label);
        for s in seed {
            m.update(s);
        }
        let block = m.finish();
        let n = (out.len() - off).min(32);
        out[off..off + n].copy_from_slice(&block[..n]);
        off += n;
        a = key.digest(&[&a]);
    }
}

/// Constant-time equality of two byte strings of equal length.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && openssl::memcmp::eq(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        crate::proto::lwm2m::endpoint::decode_hex(s).unwrap()
    }

    #[test]
    fn hmac_rfc4231() {
        // RFC 4231 §4.2 (test case 1) and §4.7 (key longer than a block).
        let k = HmacKey::new(&[0x0b; 20]);
        assert_eq!(
            k.digest(&[b"Hi ", b"There"]).to_vec(),
            hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        );
        let k = HmacKey::new(&[0xaa; 131]);
        assert_eq!(
            k.digest(&[b"Test Using Larger Than Block-Size Key - Hash Key First"])
                .to_vec(),
            hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
        );
        // Against OpenSSL's own HMAC.
        let pk = openssl::pkey::PKey::hmac(b"cookie secret").unwrap();
        let mut s =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pk).unwrap();
        s.update(b"abc").unwrap();
        assert_eq!(
            HmacKey::new(b"cookie secret")
                .digest(&[b"a", b"bc"])
                .to_vec(),
            s.sign_to_vec().unwrap()
        );
    }

    #[test]
    fn prf_known_answer() {
        // The TLS 1.2 PRF (SHA-256) test vector circulated on the IETF TLS
        // list and used by most TLS stacks' test suites.
        let secret = hex("9b be 43 6b a9 40 f0 17 b1 76 52 84 9a 71 db 35");
        let seed = hex("a0 ba 9f 93 6c da 31 18 27 a6 f7 96 ff d5 19 8c");
        let mut out = [0u8; 100];
        prf_sha256(&secret, b"test label", &[&seed], &mut out);
        assert_eq!(
            out.to_vec(),
            hex("e3 f2 29 ba 72 7b e1 7b 8d 12 26 20 55 7c d4 53 c2 aa b2 1d 07 c3 d4 95 32 9b 52 d4 e6 1e db 5a
                 6b 30 17 91 e9 0d 35 c9 c9 a4 6b 4e 14 ba f9 af 0f a0 22 f7 07 7d ef 17 ab fd 37 97 c0 56 4b
                 ab 4f bc 91 66 6e 9d ef 9b 97 fc e3 4f 79 67 89 ba a4 80 82 d1 22 ee 42 c5 a7 2e 5a 51 10 ff
                 f7 01 87 34 7b 66")
        );
    }
}

//! Record protection after the handshake: the cipher suites LwM2M devices
//! use, their key block (RFC 5246 §6.3), and the record ciphers applied in
//! place in the datagram buffer.
//!
//! * AEAD suites, AES-128-CCM / CCM-8 (RFC 6655 §3, RFC 7251 §2) and
//!   AES-128-GCM (RFC 5288 §3): `nonce = write_IV[4] ‖ nonce_explicit[8]`
//!   with the explicit part the record's epoch and sequence number (RFC 7251
//!   §2: "the nonce_explicit MUST be ... the 64-bit sequence number" — DTLS:
//!   epoch ‖ seq); the fragment is `nonce_explicit ‖ ciphertext ‖ tag`;
//!   `additional_data = seq_num(8) ‖ type ‖ version ‖ length(plaintext)`
//!   (RFC 5246 §6.2.3.3, RFC 6347 §4.1.2.1).
//! * CBC with HMAC-SHA256 (RFC 5246 §6.2.3.2, TLS_PSK_WITH_AES_128_CBC_SHA256
//!   of RFC 5487): MAC-then-encrypt, explicit IV per record. The MAC check
//!   does the same number of hash blocks whatever the padding (the Lucky13
//!   countermeasure), and any failure is the same silent drop (RFC 6347
//!   §4.1.2.7).
//!
//! OpenSSL's EVP ciphers do the AES; one `CipherCtx` per shard is re-keyed
//! per record (AES-NI key expansion is tens of nanoseconds), so an idle
//! session holds only key bytes.

use super::crypto::{ct_eq, prf_sha256, HmacKey};
use super::record::{self, HEADER_LEN};
use foreign_types::ForeignTypeRef;
use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The cipher suites the gateway negotiates (IANA values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Suite {
    /// TLS_PSK_WITH_AES_128_CCM_8 (0xC0A8, RFC 6655): LwM2M's mandatory PSK suite.
    PskAes128Ccm8,
    /// TLS_PSK_WITH_AES_128_CCM (0xC0A4).
    PskAes128Ccm,
    /// TLS_PSK_WITH_AES_128_GCM_SHA256 (0x00A8, RFC 5487).
    PskAes128Gcm,
    /// TLS_PSK_WITH_AES_128_CBC_SHA256 (0x00AE, RFC 5487).
    PskAes128CbcSha256,
    /// TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (0xC0AE, RFC 7251): LwM2M's
    /// mandatory certificate suite.
    EcdheEcdsaAes128Ccm8,
    /// TLS_ECDHE_ECDSA_WITH_AES_128_CCM (0xC0AC).
    EcdheEcdsaAes128Ccm,
    /// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (0xC02B, RFC 5289).
    EcdheEcdsaAes128Gcm,
    /// TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256 (0xC023, RFC 5289).
    EcdheEcdsaAes128CbcSha256,
}

/// How a suite protects records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    Ccm { tag: usize },
    Gcm,
    CbcSha256,
}

impl Suite {
    pub const ALL: [Suite; 8] = [
        Suite::PskAes128Ccm8,
        Suite::PskAes128Ccm,
        Suite::PskAes128Gcm,
        Suite::PskAes128CbcSha256,
        Suite::EcdheEcdsaAes128Ccm8,
        Suite::EcdheEcdsaAes128Ccm,
        Suite::EcdheEcdsaAes128Gcm,
        Suite::EcdheEcdsaAes128CbcSha256,
    ];

    pub fn id(self) -> u16 {
        match self {
            Suite::PskAes128Ccm8 => 0xc0a8,
            Suite::PskAes128Ccm => 0xc0a4,
            Suite::PskAes128Gcm => 0x00a8,
            Suite::PskAes128CbcSha256 => 0x00ae,
            Suite::EcdheEcdsaAes128Ccm8 => 0xc0ae,
            Suite::EcdheEcdsaAes128Ccm => 0xc0ac,
            Suite::EcdheEcdsaAes128Gcm => 0xc02b,
            Suite::EcdheEcdsaAes128CbcSha256 => 0xc023,
        }
    }

    pub fn from_id(id: u16) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.id() == id)
    }

    /// OpenSSL's name for the suite (its cipher-string syntax).
    pub fn openssl_name(self) -> &'static str {
        match self {
            Suite::PskAes128Ccm8 => "PSK-AES128-CCM8",
            Suite::PskAes128Ccm => "PSK-AES128-CCM",
            Suite::PskAes128Gcm => "PSK-AES128-GCM-SHA256",
            Suite::PskAes128CbcSha256 => "PSK-AES128-CBC-SHA256",
            Suite::EcdheEcdsaAes128Ccm8 => "ECDHE-ECDSA-AES128-CCM8",
            Suite::EcdheEcdsaAes128Ccm => "ECDHE-ECDSA-AES128-CCM",
            Suite::EcdheEcdsaAes128Gcm => "ECDHE-ECDSA-AES128-GCM-SHA256",
            Suite::EcdheEcdsaAes128CbcSha256 => "ECDHE-ECDSA-AES128-SHA256",
        }
    }

    pub fn from_openssl_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.openssl_name() == name)
    }

    pub fn is_psk(self) -> bool {
        matches!(
            self,
            Suite::PskAes128Ccm8
                | Suite::PskAes128Ccm
                | Suite::PskAes128Gcm
                | Suite::PskAes128CbcSha256
        )
    }

    pub fn protection(self) -> Protection {
        match self {
            Suite::PskAes128Ccm8 | Suite::EcdheEcdsaAes128Ccm8 => Protection::Ccm { tag: 8 },
            Suite::PskAes128Ccm | Suite::EcdheEcdsaAes128Ccm => Protection::Ccm { tag: 16 },
            Suite::PskAes128Gcm | Suite::EcdheEcdsaAes128Gcm => Protection::Gcm,
            Suite::PskAes128CbcSha256 | Suite::EcdheEcdsaAes128CbcSha256 => Protection::CbcSha256,
        }
    }

    /// Bytes a record grows by beyond the 13-byte header.
    pub fn overhead(self) -> usize {
        match self.protection() {
            Protection::Ccm { tag } => 8 + tag,
            Protection::Gcm => 8 + 16,
            // IV + MAC + at most one block of padding.
            Protection::CbcSha256 => 16 + 32 + 16,
        }
    }
}

/// Which side's write keys protect a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// The key block of a session (RFC 5246 §6.3). AEAD suites use no MAC
/// keys; CBC suites no fixed IVs (TLS 1.2 CBC IVs are explicit).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keys {
    pub suite: Suite,
    /// CBC suites: encrypt-then-MAC was negotiated (RFC 7366).
    #[serde(default)]
    pub etm: bool,
    mac: Option<Box<[[u8; 32]; 2]>>,
    key: [[u8; 16]; 2],
    iv: [[u8; 4]; 2],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({:?}, <redacted>)", self.suite)
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Best effort: do not leave key bytes in freed memory.
        for k in &mut self.key {
            k.fill(0);
        }
        if let Some(m) = &mut self.mac {
            m[0].fill(0);
            m[1].fill(0);
        }
    }
}

impl Keys {
    /// `key_block = PRF(master_secret, "key expansion", server_random +
    /// client_random)`, split into client/server MAC keys, write keys and
    /// fixed IVs in that order (RFC 5246 §6.3).
    pub fn derive(suite: Suite, master: &[u8], client_random: &[u8], server_random: &[u8]) -> Keys {
        let cbc = suite.protection() == Protection::CbcSha256;
        let mac_len = if cbc { 32 } else { 0 };
        let iv_len = if cbc { 0 } else { 4 };
        let mut block = [0u8; 2 * 32 + 2 * 16 + 2 * 4];
        let len = 2 * mac_len + 2 * 16 + 2 * iv_len;
        prf_sha256(
            master,
            b"key expansion",
            &[server_random, client_random],
            &mut block[..len],
        );
        let mut k = Keys {
            suite,
            etm: false,
            mac: None,
            key: [[0; 16]; 2],
            iv: [[0; 4]; 2],
        };
        let mut off = 0;
        if cbc {
            let mut m = Box::new([[0u8; 32]; 2]);
            m[0].copy_from_slice(&block[0..32]);
            m[1].copy_from_slice(&block[32..64]);
            k.mac = Some(m);
            off = 64;
        }
        k.key[0].copy_from_slice(&block[off..off + 16]);
        k.key[1].copy_from_slice(&block[off + 16..off + 32]);
        off += 32;
        if !cbc {
            k.iv[0].copy_from_slice(&block[off..off + 4]);
            k.iv[1].copy_from_slice(&block[off + 4..off + 8]);
        }
        block.fill(0);
        k
    }

    /// Marks encrypt-then-MAC (RFC 7366) as negotiated (CBC suites).
    pub fn with_encrypt_then_mac(mut self, etm: bool) -> Keys {
        self.etm = etm && self.suite.protection() == Protection::CbcSha256;
        self
    }

    fn idx(side: Side) -> usize {
        match side {
            Side::Client => 0,
            Side::Server => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("record too short for its cipher")]
    Short,
    #[error("record failed authentication")]
    BadRecord,
    #[error("cipher failure")]
    Cipher,
}

/// The shard's record cipher: one EVP context, re-keyed per record.
pub struct RecordCipher {
    ctx: CipherCtx,
}

fn aad(epoch_seq: u64, content_type: u8, version: u16, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&epoch_seq.to_be_bytes());
    a[8] = content_type;
    a[9..11].copy_from_slice(&version.to_be_bytes());
    a[11..13].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

fn cipher_of(p: Protection) -> &'static CipherRef {
    match p {
        Protection::Ccm { .. } => Cipher::aes_128_ccm(),
        Protection::Gcm => Cipher::aes_128_gcm(),
        Protection::CbcSha256 => Cipher::aes_128_cbc(),
    }
}

impl RecordCipher {
    pub fn new() -> Result<RecordCipher, CryptoError> {
        Ok(RecordCipher {
            ctx: CipherCtx::new().map_err(|_| CryptoError::Cipher)?,
        })
    }

    /// Decrypts and authenticates, in place, the fragment of a record
    /// written by `from`; returns the plaintext's range within `fragment`.
    /// `header` is the record's 13 header bytes.
    pub fn open(
        &mut self,
        keys: &Keys,
        from: Side,
        header: &[u8; HEADER_LEN],
        fragment: &mut [u8],
    ) -> Result<Range<usize>, CryptoError> {
        let s = Keys::idx(from);
        let content_type = header[0];
        let version = u16::from_be_bytes([header[1], header[2]]);
        let mut es = [0u8; 8];
        es.copy_from_slice(&header[3..11]);
        let epoch_seq = u64::from_be_bytes(es);
        let p = keys.suite.protection();
        match p {
            Protection::Ccm { .. } | Protection::Gcm => {
                let tag_len = match p {
                    Protection::Ccm { tag } => tag,
                    _ => 16,
                };
                if fragment.len() < 8 + tag_len {
                    return Err(CryptoError::Short);
                }
                let pt_len = fragment.len() - 8 - tag_len;
                let mut nonce = [0u8; 12];
                nonce[..4].copy_from_slice(&keys.iv[s]);
                nonce[4..].copy_from_slice(&fragment[..8]);
                let a = aad(epoch_seq, content_type, version, pt_len);
                let (body, tag) = fragment[8..].split_at_mut(pt_len);
                self.aead(p, false, &keys.key[s], &nonce, &a, body, tag)?;
                Ok(8..8 + pt_len)
            }
            Protection::CbcSha256 => {
                self.open_cbc(keys, s, epoch_seq, content_type, version, fragment)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn aead(
        &mut self,
        p: Protection,
        encrypt: bool,
        key: &[u8; 16],
        nonce: &[u8; 12],
        aad: &[u8],
        body: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), CryptoError> {
        let c = &mut self.ctx;
        let e = |_| CryptoError::Cipher;
        let cipher = cipher_of(p);
        if encrypt {
            c.encrypt_init(Some(cipher), None, None).map_err(e)?;
        } else {
            c.decrypt_init(Some(cipher), None, None).map_err(e)?;
        }
        c.set_iv_length(12).map_err(e)?;
        if let Protection::Ccm { .. } = p {
            // CCM takes the tag (decrypt) or its length (encrypt) before the
            // key, and the message length before any data.
            if encrypt {
                c.set_tag_length(tag.len()).map_err(e)?;
            } else {
                c.set_tag(tag).map_err(e)?;
            }
        }
        if encrypt {
            c.encrypt_init(None, Some(key), Some(nonce)).map_err(e)?;
        } else {
            c.decrypt_init(None, Some(key), Some(nonce)).map_err(e)?;
        }
        if let Protection::Ccm { .. } = p {
            c.set_data_len(body.len()).map_err(e)?;
        }
        c.cipher_update(aad, None).map_err(e)?;
        let n = body.len();
        let r = c.cipher_update_inplace(body, n);
        if let Protection::Ccm { .. } = p {
            // CCM decryption authenticates in the update.
            r.map_err(|_| CryptoError::BadRecord)?;
            if encrypt {
                c.cipher_final(&mut []).map_err(e)?;
                c.tag(tag).map_err(e)?;
            }
            return Ok(());
        }
        r.map_err(e)?;
        if encrypt {
            c.cipher_final(&mut []).map_err(e)?;
            c.tag(tag).map_err(e)?;
        } else {
            c.set_tag(tag).map_err(e)?;
            c.cipher_final(&mut [])
                .map_err(|_| CryptoError::BadRecord)?;
        }
        Ok(())
    }

    /// AES-128-CBC without padding over `data` (a multiple of 16), in place.
    fn cbc(
        &mut self,
        encrypt: bool,
        key: &[u8; 16],
        iv: &[u8],
        data: &mut [u8],
    ) -> Result<(), CryptoError> {
        let c = &mut self.ctx;
        let e = |_| CryptoError::Cipher;
        if encrypt {
            c.encrypt_init(Some(Cipher::aes_128_cbc()), Some(key), Some(iv))
                .map_err(e)?;
        } else {
            c.decrypt_init(Some(Cipher::aes_128_cbc()), Some(key), Some(iv))
                .map_err(e)?;
        }
        c.set_padding(false);
        let mut outl: std::ffi::c_int = 0;
        let len = std::ffi::c_int::try_from(data.len()).map_err(|_| CryptoError::Short)?;
        // SAFETY: CBC without padding writes exactly `len` bytes for a
        // block-aligned input; in-place operation (out == in) is supported
        // by EVP for block ciphers.
        let r = unsafe {
            openssl_sys::EVP_CipherUpdate(
                c.as_ptr(),
                data.as_mut_ptr(),
                &mut outl,
                data.as_ptr(),
                len,
            )
        };
        if r <= 0 || outl != len {
            return Err(CryptoError::Cipher);
        }
        Ok(())
    }

    fn open_cbc(
        &mut self,
        keys: &Keys,
        s: usize,
        epoch_seq: u64,
        content_type: u8,
        version: u16,
        fragment: &mut [u8],
    ) -> Result<Range<usize>, CryptoError> {
        let mac_key = keys.mac.as_ref().ok_or(CryptoError::Cipher)?;
        if keys.etm {
            // RFC 7366 §3: MAC(seq ‖ type ‖ version ‖ length(IV ‖ ciphertext)
            // ‖ IV ‖ ciphertext), checked before anything is decrypted.
            if fragment.len() < 16 + 16 + 32 || (fragment.len() - 32) % 16 != 0 {
                return Err(CryptoError::Short);
            }
            let n = fragment.len() - 32;
            let hk = HmacKey::new(&mac_key[s]);
            let a = aad(epoch_seq, content_type, version, n);
            let mac = hk.digest(&[&a, &fragment[..n]]);
            if !ct_eq(&mac, &fragment[n..]) {
                return Err(CryptoError::BadRecord);
            }
            let (iv, body) = fragment[..n].split_at_mut(16);
            self.cbc(false, &keys.key[s], iv, body)?;
            let pad = body[body.len() - 1] as usize;
            if pad + 1 > body.len()
                || body[body.len() - 1 - pad..]
                    .iter()
                    .any(|b| *b as usize != pad)
            {
                return Err(CryptoError::BadRecord);
            }
            return Ok(16..16 + body.len() - pad - 1);
        }
        // IV, then at least one block holding MAC + padding length byte.
        if fragment.len() < 16 + 48 || fragment.len() % 16 != 0 {
            return Err(CryptoError::Short);
        }
        let (iv, body) = fragment.split_at_mut(16);
        self.cbc(false, &keys.key[s], iv, body)?;
        let n = body.len();
        let pad = body[n - 1] as usize;
        // Padding bytes all equal `pad` (checked over the largest possible
        // padding, masked, so the time does not depend on `pad`).
        let mut good = (pad + 1 + 32 <= n) as u8;
        let max_check = 256.min(n);
        for i in 0..max_check {
            let b = body[n - 1 - i];
            let in_pad = (i <= pad) as u8;
            good &= !in_pad | (b == pad as u8) as u8;
        }
        let pad = if good == 1 { pad } else { 0 };
        let pt_len = n - pad - 1 - 32;
        let hk = HmacKey::new(&mac_key[s]);
        let a = aad(epoch_seq, content_type, version, pt_len);
        let mac = hk.digest(&[&a, &body[..pt_len]]);
        // Lucky13: hash as many extra bytes as the padding removed, so the
        // number of SHA-256 blocks does not reveal the padding length.
        let mut dummy = hk.mac();
        dummy.update(&body[..(pad + 1).min(n)]);
        let _ = dummy.finish();
        let ok = ct_eq(&mac, &body[pt_len..pt_len + 32]) & (good == 1);
        if !ok {
            return Err(CryptoError::BadRecord);
        }
        Ok(16..16 + pt_len)
    }

    /// Appends one protected record to `out`: header, then the
    /// plaintext encrypted in place where it lands.
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        &mut self,
        keys: &Keys,
        from: Side,
        content_type: u8,
        epoch: u16,
        seq: u64,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let s = Keys::idx(from);
        let epoch_seq = ((epoch as u64) << 48) | (seq & 0xffff_ffff_ffff);
        let version = record::DTLS1_2;
        let start = out.len();
        let p = keys.suite.protection();
        match p {
            Protection::Ccm { .. } | Protection::Gcm => {
                let tag_len = match p {
                    Protection::Ccm { tag } => tag,
                    _ => 16,
                };
                record::write_header(
                    out,
                    content_type,
                    version,
                    epoch,
                    seq,
                    8 + plaintext.len() + tag_len,
                );
                out.extend_from_slice(&epoch_seq.to_be_bytes());
                let body_at = out.len();
                out.extend_from_slice(plaintext);
                out.resize(body_at + plaintext.len() + tag_len, 0);
                let mut nonce = [0u8; 12];
                nonce[..4].copy_from_slice(&keys.iv[s]);
                nonce[4..].copy_from_slice(&epoch_seq.to_be_bytes());
                let a = aad(epoch_seq, content_type, version, plaintext.len());
                let (body, tag) = out[body_at..].split_at_mut(plaintext.len());
                let r = self.aead(p, true, &keys.key[s], &nonce, &a, body, tag);
                if r.is_err() {
                    out.truncate(start);
                }
                r
            }
            Protection::CbcSha256 if keys.etm => {
                let mac_key = keys.mac.as_ref().ok_or(CryptoError::Cipher)?;
                let unpadded = plaintext.len() + 1;
                let pad = (16 - unpadded % 16) % 16;
                let body_len = unpadded + pad;
                record::write_header(out, content_type, version, epoch, seq, 16 + body_len + 32);
                let iv_at = out.len();
                out.resize(iv_at + 16, 0);
                openssl::rand::rand_bytes(&mut out[iv_at..]).map_err(|_| CryptoError::Cipher)?;
                out.extend_from_slice(plaintext);
                out.resize(out.len() + pad + 1, pad as u8);
                let (iv, body) = out[iv_at..].split_at_mut(16);
                let iv = <[u8; 16]>::try_from(&*iv).map_err(|_| CryptoError::Cipher)?;
                if let Err(e) = self.cbc(true, &keys.key[s], &iv, body) {
                    out.truncate(start);
                    return Err(e);
                }
                let hk = HmacKey::new(&mac_key[s]);
                let a = aad(epoch_seq, content_type, version, 16 + body_len);
                let mac = hk.digest(&[&a, &out[iv_at..]]);
                out.extend_from_slice(&mac);
                Ok(())
            }
            Protection::CbcSha256 => {
                let mac_key = keys.mac.as_ref().ok_or(CryptoError::Cipher)?;
                let hk = HmacKey::new(&mac_key[s]);
                let a = aad(epoch_seq, content_type, version, plaintext.len());
                let mac = hk.digest(&[&a, plaintext]);
                let unpadded = plaintext.len() + 32 + 1;
                let pad = (16 - unpadded % 16) % 16;
                let body_len = unpadded + pad;
                record::write_header(out, content_type, version, epoch, seq, 16 + body_len);
                let iv_at = out.len();
                out.resize(iv_at + 16, 0);
                openssl::rand::rand_bytes(&mut out[iv_at..]).map_err(|_| CryptoError::Cipher)?;
                out.extend_from_slice(plaintext);
                out.extend_from_slice(&mac);
                out.resize(out.len() + pad + 1, pad as u8);
                let (iv, body) = out[iv_at..].split_at_mut(16);
                let iv = <[u8; 16]>::try_from(&*iv).map_err(|_| CryptoError::Cipher)?;
                let r = self.cbc(true, &keys.key[s], &iv, body);
                if r.is_err() {
                    out.truncate(start);
                }
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        crate::proto::lwm2m::endpoint::decode_hex(s).unwrap()
    }

    #[test]
    fn ccm8_known_answer_sp800_38c_example_3() {
        // NIST SP 800-38C Appendix C, Example 3: 96-bit nonce, 64-bit tag,
        // the CCM-8 parameters of RFC 6655.
        let key: [u8; 16] = hex("404142434445464748494a4b4c4d4e4f").try_into().unwrap();
        let nonce: [u8; 12] = hex("101112131415161718191a1b").try_into().unwrap();
        let aad = hex("000102030405060708090a0b0c0d0e0f10111213");
        let mut body = hex("202122232425262728292a2b2c2d2e2f3031323334353637");
        let mut tag = [0u8; 8];
        let mut c = RecordCipher::new().unwrap();
        c.aead(
            Protection::Ccm { tag: 8 },
            true,
            &key,
            &nonce,
            &aad,
            &mut body,
            &mut tag,
        )
        .unwrap();
        assert_eq!(
            body,
            hex("e3b201a9f5b71a7a9b1ceaeccd97e70b6176aad9a4428aa5")
        );
        assert_eq!(tag.to_vec(), hex("484392fbc1b09951"));
        c.aead(
            Protection::Ccm { tag: 8 },
            false,
            &key,
            &nonce,
            &aad,
            &mut body,
            &mut tag,
        )
        .unwrap();
        assert_eq!(
            body,
            hex("202122232425262728292a2b2c2d2e2f3031323334353637")
        );
        tag[0] ^= 1;
        assert_eq!(
            c.aead(
                Protection::Ccm { tag: 8 },
                false,
                &key,
                &nonce,
                &aad,
                &mut body,
                &mut tag
            ),
            Err(CryptoError::BadRecord)
        );
    }

    #[test]
    fn gcm_known_answer_mcgrew_viega_test_case_4() {
        let key: [u8; 16] = hex("feffe9928665731c6d6a8f9467308308").try_into().unwrap();
        let nonce: [u8; 12] = hex("cafebabefacedbaddecaf888").try_into().unwrap();
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let pt = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let mut body = pt.clone();
        let mut tag = [0u8; 16];
        let mut c = RecordCipher::new().unwrap();
        c.aead(
            Protection::Gcm,
            true,
            &key,
            &nonce,
            &aad,
            &mut body,
            &mut tag,
        )
        .unwrap();
        assert_eq!(
            body,
            hex("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091")
        );
        assert_eq!(tag.to_vec(), hex("5bc94fbc3221a5db94fae95ae7121a47"));
        c.aead(
            Protection::Gcm,
            false,
            &key,
            &nonce,
            &aad,
            &mut body,
            &mut tag,
        )
        .unwrap();
        assert_eq!(body, pt);
        body[0] ^= 1;
        assert_eq!(
            c.aead(
                Protection::Gcm,
                false,
                &key,
                &nonce,
                &aad,
                &mut body,
                &mut tag
            ),
            Err(CryptoError::BadRecord)
        );
    }

    #[test]
    fn seal_then_open_every_suite() {
        let mut c = RecordCipher::new().unwrap();
        for (suite, etm) in Suite::ALL
            .into_iter()
            .map(|s| (s, false))
            .chain([(Suite::PskAes128CbcSha256, true)])
        {
            let keys =
                Keys::derive(suite, &[5u8; 48], &[1u8; 32], &[2u8; 32]).with_encrypt_then_mac(etm);
            for len in [0usize, 1, 15, 16, 17, 100, 1200] {
                let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut out = Vec::new();
                c.seal(&keys, Side::Server, 23, 1, 42, &pt, &mut out)
                    .unwrap();
                assert!(
                    out.len() <= HEADER_LEN + len + suite.overhead(),
                    "{suite:?}"
                );
                let (rec, _) = record::parse(&out).unwrap();
                assert_eq!((rec.epoch, rec.seq), (1, 42));
                let header: [u8; 13] = out[..13].try_into().unwrap();
                let mut frag = out[13..].to_vec();
                // The client's keys do not open the server's records.
                let mut f2 = frag.clone();
                assert!(
                    c.open(&keys, Side::Client, &header, &mut f2).is_err(),
                    "{suite:?}"
                );
                let r = c.open(&keys, Side::Server, &header, &mut frag).unwrap();
                assert_eq!(&frag[r], &pt[..], "{suite:?}");
                // A changed header byte (the AAD) fails.
                let mut h2 = header;
                h2[10] ^= 1;
                let mut f3 = out[13..].to_vec();
                assert!(
                    c.open(&keys, Side::Server, &h2, &mut f3).is_err(),
                    "{suite:?}"
                );
                // Truncations fail, never panic.
                for cut in 0..out.len().min(70) {
                    let mut f = out[13..out.len() - cut.min(out.len() - 13)].to_vec();
                    let _ = c.open(&keys, Side::Server, &header, &mut f);
                }
            }
        }
    }
}

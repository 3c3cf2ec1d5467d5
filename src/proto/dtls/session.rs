//! An established DTLS session as the gateway keeps it once OpenSSL is
//! done: the key block, sequence state, the replay window and the identity
//! the handshake proved. A few hundred bytes, plain data (it is what the
//! encrypted session snapshot stores).

use super::cipher::Keys;
use crate::proto::lwm2m::endpoint::Identity;
use serde::{Deserialize, Serialize};

/// The anti-replay window of RFC 6347 §4.1.2.6: "a window size of 64 is
/// preferred". Records left of the window, or already seen in it, are
/// dropped; the window moves only after a record authenticates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayWindow {
    /// Highest sequence number accepted, plus one (0: none yet).
    top: u64,
    /// Bit i set: `top - 1 - i` was received.
    bits: u64,
}

impl ReplayWindow {
    /// True when `seq` is new and not too old.
    pub fn check(&self, seq: u64) -> bool {
        if seq >= self.top {
            return true;
        }
        let back = self.top - 1 - seq;
        back < 64 && self.bits & (1 << back) == 0
    }

    /// Records `seq` as received (after it authenticated).
    pub fn mark(&mut self, seq: u64) {
        if seq >= self.top {
            let shift = seq + 1 - self.top;
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.top = seq + 1;
        } else {
            let back = self.top - 1 - seq;
            if back < 64 {
                self.bits |= 1 << back;
            }
        }
    }

    /// The highest sequence number accepted.
    pub fn highest(&self) -> Option<u64> {
        self.top.checked_sub(1)
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent close_notify.
    CloseNotify,
    /// The client sent a fatal alert.
    FatalAlert(u8),
    /// No record within the idle timeout.
    Idle,
    /// A new handshake from the same address completed (RFC 6347 §4.2.8).
    Replaced,
    /// The gateway ended it (credentials changed, endpoint removed).
    Revoked,
    /// Its registration moved to another address or shard.
    Retired,
}

impl CloseReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::CloseNotify => "close_notify",
            CloseReason::FatalAlert(_) => "fatal_alert",
            CloseReason::Idle => "idle",
            CloseReason::Replaced => "replaced",
            CloseReason::Revoked => "revoked",
            CloseReason::Retired => "retired",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub keys: Keys,
    pub identity: Identity,
    /// The epoch application data uses (1 after the first handshake).
    pub epoch: u16,
    /// Next sequence number the gateway writes in `epoch`.
    pub write_seq: u64,
    pub replay: ReplayWindow,
    /// Wall-clock milliseconds of the last authenticated record (kept as
    /// wall time so it survives a restart).
    pub last_rx_ms: i64,
    /// The server's last handshake flight (ChangeCipherSpec + Finished),
    /// length-prefixed datagrams, kept until the first application record
    /// shows the client has it (RFC 6347 §4.2.4: the client retransmits its
    /// final flight when the server's Finished is lost).
    #[serde(skip)]
    pub final_flight: Option<Box<[u8]>>,
    /// The credentials used (see `endpoint::credential_tag`).
    #[serde(default)]
    pub cred_tag: u64,
    /// Idle timeout of this session in seconds (its registration's lifetime
    /// plus grace); 0: the configured `idle_timeout`.
    #[serde(default)]
    pub idle_s: u32,
}

impl Session {
    /// Iterates the kept final-flight datagrams.
    pub fn final_flight(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest: &[u8] = self.final_flight.as_deref().unwrap_or(&[]);
        std::iter::from_fn(move || {
            if rest.len() < 2 {
                return None;
            }
            let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            let d = rest.get(2..2 + n)?;
            rest = &rest[2 + n..];
            Some(d)
        })
    }
}

/// Packs datagrams as a final flight (`u16` length prefixes).
pub fn pack_flight<'a>(datagrams: impl Iterator<Item = &'a [u8]>) -> Box<[u8]> {
    let mut v = Vec::new();
    for d in datagrams {
        v.extend_from_slice(&(d.len().min(u16::MAX as usize) as u16).to_be_bytes());
        v.extend_from_slice(&d[..d.len().min(u16::MAX as usize)]);
    }
    v.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(w.check(0) && w.highest().is_none());
        w.mark(0);
        assert!(!w.check(0));
        w.mark(5);
        assert!(w.check(3) && !w.check(5) && !w.check(0));
        w.mark(3);
        assert!(!w.check(3) && w.check(4));
        w.mark(100);
        // 100 - 63 = 37 is the oldest still in the window.
        assert!(!w.check(36) && w.check(37) && !w.check(100) && w.check(101));
        w.mark(37);
        assert!(!w.check(37));
        w.mark(1000);
        assert_eq!(w.highest(), Some(1000));
        assert!(!w.check(100) && w.check(999));
    }

    #[test]
    fn flights_round_trip() {
        let f = pack_flight([&b"ab"[..], &b""[..], &b"xyz"[..]].into_iter());
        let s = Session {
            keys: Keys::derive(
                super::super::cipher::Suite::PskAes128Ccm8,
                &[0; 48],
                &[0; 32],
                &[0; 32],
            ),
            identity: Identity::Psk("x".into()),
            epoch: 1,
            write_seq: 1,
            replay: ReplayWindow::default(),
            last_rx_ms: 0,
            final_flight: Some(f),
            cred_tag: 0,
            idle_s: 0,
        };
        let got: Vec<&[u8]> = s.final_flight().collect();
        assert_eq!(got, vec![&b"ab"[..], &b""[..], &b"xyz"[..]]);
    }
}

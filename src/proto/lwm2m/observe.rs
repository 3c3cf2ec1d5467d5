//! Observe sequence ordering (RFC 7641 §3.4).
//!
//! A notification is fresher than the last one accepted when its 24-bit
//! sequence number is "newer" in serial-number arithmetic, or when more than
//! 128 seconds passed since the last accepted notification. Stale ones are
//! discarded by the caller (and counted).

use std::time::{Duration, Instant};

/// RFC 7641 §3.4: 128 seconds.
pub const FRESHNESS_WINDOW: Duration = Duration::from_secs(128);

#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveOrder {
    last: Option<(u32, Instant)>,
}

impl ObserveOrder {
    /// Returns true and records the notification when it is fresher than the
    /// previous one (RFC 7641 §3.4 formula).
    pub fn handle_notification(&mut self, now: Instant, v2: u32) -> bool {
        let v2 = v2 & 0xff_ffff;
        let fresh = match self.last {
            None => true,
            Some((v1, t1)) => {
                (v1 < v2 && v2 - v1 < (1 << 23))
                    || (v1 > v2 && v1 - v2 > (1 << 23))
                    || now > t1 + FRESHNESS_WINDOW
            }
        };
        if fresh {
            self.last = Some((v2, now));
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering() {
        let t = Instant::now();
        let mut o = ObserveOrder::default();
        assert!(o.handle_notification(t, 5));
        assert!(!o.handle_notification(t, 5));
        assert!(!o.handle_notification(t, 4));
        assert!(o.handle_notification(t, 6));
        // Wrap-around: 0xffffff then 1 is newer.
        let mut o = ObserveOrder::default();
        assert!(o.handle_notification(t, 0xff_ffff));
        assert!(o.handle_notification(t, 1));
        // A stale number after 128 s is accepted anyway.
        assert!(!o.handle_notification(t, 0));
        assert!(o.handle_notification(t + Duration::from_secs(129), 0));
    }
}

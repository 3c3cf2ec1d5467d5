//! Observations (RFC 7641; LwM2M TS 1.1 Core §5.4.2 Information Reporting):
//! the server side's table of established observations and the ordering of
//! their notifications.
//!
//! **Ordering.** RFC 7641 §3.4 orders notifications by their 24-bit Observe
//! sequence number in serial-number arithmetic, with a 128-second escape for
//! numbers that wrapped or restarted. A cache keeps only the freshest
//! representation; a telemetry pipeline wants every *distinct* sample once.
//! [`ObserveWindow`] therefore keeps, like an anti-replay window, the highest
//! number accepted plus a bitmap of the [`WINDOW`] numbers below it: a newer
//! number is fresh, an older one not yet seen is a reordered sample (still
//! published), a number seen before is a duplicate (a retransmission that got
//! past MID deduplication, e.g. from a new source port), and anything older
//! than the window is stale. Duplicates and stale ones are acknowledged but
//! not published.

use super::content::ResourcePath;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// RFC 7641 §3.4: 128 seconds.
pub const FRESHNESS_WINDOW: Duration = Duration::from_secs(128);
/// Sequence numbers remembered below the highest one.
pub const WINDOW: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Newer than anything seen (or the first, or after 128 s).
    Fresh,
    /// Older than the newest but within the window and not seen yet.
    Reordered,
    /// Seen before.
    Duplicate,
    /// Older than the window.
    Stale,
}

impl Freshness {
    pub fn publish(self) -> bool {
        matches!(self, Freshness::Fresh | Freshness::Reordered)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveWindow {
    /// Highest number accepted and when.
    last: Option<(u32, Instant)>,
    /// Bit i set: number `last - 1 - i` was seen.
    seen: u64,
}

/// RFC 7641 §3.4: V2 is newer than V1.
fn newer(v1: u32, v2: u32) -> bool {
    (v1 < v2 && v2 - v1 < (1 << 23)) || (v1 > v2 && v1 - v2 > (1 << 23))
}

impl ObserveWindow {
    pub fn check(&self, now: Instant, seq: u32) -> Freshness {
        let seq = seq & 0xff_ffff;
        let Some((last, t)) = self.last else {
            return Freshness::Fresh;
        };
        if seq == last {
            return Freshness::Duplicate;
        }
        if newer(last, seq) || now > t + FRESHNESS_WINDOW {
            return Freshness::Fresh;
        }
        let back = last.wrapping_sub(seq) & 0xff_ffff;
        if back > WINDOW {
            Freshness::Stale
        } else if self.seen & (1u64 << (back - 1)) != 0 {
            Freshness::Duplicate
        } else {
            Freshness::Reordered
        }
    }

    /// Records `seq` (call only when `check` said to publish it).
    pub fn record(&mut self, now: Instant, seq: u32) {
        let seq = seq & 0xff_ffff;
        match self.check(now, seq) {
            Freshness::Fresh => {
                let shift = match self.last {
                    Some((last, t)) if newer(last, seq) && now <= t + FRESHNESS_WINDOW => {
                        seq.wrapping_sub(last) & 0xff_ffff
                    }
                    _ => u32::MAX,
                };
                self.seen = match (self.last, shift) {
                    (Some(_), s) if s <= WINDOW => {
                        self.seen.checked_shl(s).unwrap_or(0) | (1u64 << (s - 1))
                    }
                    _ => 0,
                };
                self.last = Some((seq, now));
            }
            Freshness::Reordered => {
                if let Some((last, _)) = self.last {
                    let back = last.wrapping_sub(seq) & 0xff_ffff;
                    self.seen |= 1u64 << (back - 1);
                }
            }
            Freshness::Duplicate | Freshness::Stale => {}
        }
    }

    pub fn to_state(&self, now: Instant) -> WindowState {
        WindowState {
            last: self.last.map(|(s, _)| s),
            age_ms: self
                .last
                .map(|(_, t)| now.saturating_duration_since(t).as_millis() as u64),
            seen: self.seen,
        }
    }

    pub fn from_state(s: &WindowState, now: Instant) -> ObserveWindow {
        let t = s
            .age_ms
            .and_then(|a| now.checked_sub(Duration::from_millis(a)))
            .unwrap_or(now);
        ObserveWindow {
            last: s.last.map(|l| (l & 0xff_ffff, t)),
            seen: s.seen,
        }
    }
}

/// [`ObserveWindow`] as plain data (snapshots, moves between shards).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    pub last: Option<u32>,
    pub age_ms: Option<u64>,
    pub seen: u64,
}

/// An established observation.
#[derive(Debug, Clone)]
pub struct Observation {
    pub reg: u64,
    pub path: ResourcePath,
    pub window: ObserveWindow,
    /// Set up by an RPC (kept when the profile changes; ended by
    /// `cancel_observe`), not by the profile.
    pub rpc: bool,
    /// The multi-step RPC (firmware update) its notifications go to.
    pub owner: Option<std::sync::Arc<str>>,
}

/// [`Observation`] as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservationState {
    pub token: u64,
    pub path: String,
    pub window: WindowState,
    #[serde(default)]
    pub rpc: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The paths of a composite observation (Observe-Composite).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub composite: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordering() {
        let t = Instant::now();
        let mut o = ObserveWindow::default();
        let feed = |o: &mut ObserveWindow, s: u32| {
            let f = o.check(t, s);
            if f.publish() {
                o.record(t, s);
            }
            f
        };
        assert_eq!(feed(&mut o, 5), Freshness::Fresh);
        assert_eq!(feed(&mut o, 5), Freshness::Duplicate);
        assert_eq!(feed(&mut o, 4), Freshness::Reordered);
        assert_eq!(feed(&mut o, 4), Freshness::Duplicate);
        assert_eq!(feed(&mut o, 8), Freshness::Fresh);
        assert_eq!(feed(&mut o, 6), Freshness::Reordered);
        assert_eq!(feed(&mut o, 7), Freshness::Reordered);
        assert_eq!(feed(&mut o, 6), Freshness::Duplicate);
        assert_eq!(feed(&mut o, 5), Freshness::Duplicate);
        assert_eq!(feed(&mut o, 200), Freshness::Fresh);
        assert_eq!(feed(&mut o, 100), Freshness::Stale);
        // Wrap-around: 0xffffff then 1 is newer.
        let mut o = ObserveWindow::default();
        assert_eq!(feed(&mut o, 0xff_ffff), Freshness::Fresh);
        assert_eq!(feed(&mut o, 1), Freshness::Fresh);
        assert_eq!(feed(&mut o, 0), Freshness::Reordered);
        assert_eq!(feed(&mut o, 0xff_ffff), Freshness::Duplicate);
        // After 128 s anything is fresh again (device restarted its counter).
        let mut o = ObserveWindow::default();
        o.record(t, 1000);
        assert_eq!(o.check(t, 3), Freshness::Stale);
        let later = t + Duration::from_secs(129);
        assert_eq!(o.check(later, 3), Freshness::Fresh);
        o.record(later, 3);
        assert_eq!(o.check(later, 1000), Freshness::Fresh);
    }

    #[test]
    fn state_roundtrip() {
        let t = Instant::now() + Duration::from_secs(1000);
        let mut o = ObserveWindow::default();
        for s in [10, 12, 13] {
            o.record(t, s);
        }
        let st = o.to_state(t + Duration::from_secs(3));
        let back = ObserveWindow::from_state(&st, t + Duration::from_secs(3));
        assert_eq!(back.check(t, 12), Freshness::Duplicate);
        assert_eq!(back.check(t, 11), Freshness::Reordered);
        assert_eq!(back.check(t, 14), Freshness::Fresh);
    }

    proptest! {
        /// Any delivery order of distinct numbers within the window: each is
        /// published exactly once, every copy after the first is a duplicate.
        #[test]
        fn each_sample_published_once(order in Just((0u32..40).collect::<Vec<_>>()).prop_shuffle(),
                                      dups in proptest::collection::vec(0usize..40, 0..20)) {
            let t = Instant::now();
            let mut o = ObserveWindow::default();
            let mut seq: Vec<u32> = order.iter().map(|v| v + 1000).collect();
            for d in dups { let v = seq[d]; seq.insert(d, v); }
            let mut published = Vec::new();
            for s in seq {
                if o.check(t, s).publish() {
                    o.record(t, s);
                    published.push(s);
                }
            }
            published.sort();
            let want: Vec<u32> = (1000..1040).collect();
            prop_assert_eq!(published, want);
        }
    }
}

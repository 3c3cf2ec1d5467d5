//! Live telemetry of a few watched devices, for `corem-ctl telemetry tail`
//! and the web console: the shards' sinks offer each TelemetryPoint they
//! published for a watched device (the JSON as it went to Kafka); the
//! admin API long-polls the ring of that device.
//!
//! Costs nothing while nobody watches: one relaxed load per point; while
//! some device is watched, a lock-free look at the (short) list of watched
//! ids, and the lock only for their points. A ring holds the last [`RING`]
//! points of its device and is forgotten [`IDLE`] after its last poll.

use arc_swap::ArcSwap;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Points kept per watched device.
pub const RING: usize = 256;
/// A device nobody polled for this long is no longer watched.
pub const IDLE: Duration = Duration::from_secs(60);
/// Devices watched at once at most (more watch requests are refused).
pub const MAX_WATCHED: usize = 64;

#[derive(Default)]
pub struct Tap {
    active: AtomicBool,
    /// The watched device ids (a copy of `inner.devices`' keys).
    watched: ArcSwap<Vec<Box<str>>>,
    inner: Mutex<Inner>,
    more: Condvar,
    /// Set at shutdown: polls answer at once instead of waiting.
    closed: AtomicBool,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    devices: HashMap<String, Ring>,
}

struct Ring {
    points: VecDeque<(u64, Box<[u8]>)>,
    polled: Instant,
}

/// What a poll returns: points after the cursor, and the next cursor.
#[derive(Debug, Default, PartialEq)]
pub struct Polled {
    pub points: Vec<Box<[u8]>>,
    pub next: u64,
}

impl Tap {
    /// True while some device is watched (checked per published point).
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// A point published for `device_id` (its JSON).
    pub fn offer(&self, device_id: &str, json: &[u8]) {
        if !self.watched.load().iter().any(|d| &**d == device_id) {
            return;
        }
        let Ok(mut g) = self.inner.lock() else { return };
        let g = &mut *g;
        let Some(r) = g.devices.get_mut(device_id) else {
            return;
        };
        g.next_seq += 1;
        if r.points.len() == RING {
            r.points.pop_front();
        }
        r.points.push_back((g.next_seq, json.into()));
        self.more.notify_all();
    }

    /// Starts or keeps watching `device_id` and waits up to `wait` for
    /// points after `after` (0: only what arrives from now on, unless the
    /// ring already holds some). None when too many devices are watched.
    pub fn poll(&self, device_id: &str, after: u64, wait: Duration) -> Option<Polled> {
        let deadline = Instant::now() + wait;
        let mut g = self.inner.lock().ok()?;
        let now = Instant::now();
        let before = g.devices.len();
        g.devices.retain(|_, r| now.duration_since(r.polled) < IDLE);
        let mut changed = g.devices.len() != before;
        if !g.devices.contains_key(device_id) {
            if g.devices.len() >= MAX_WATCHED {
                self.publish(&g);
                return None;
            }
            g.devices.insert(
                device_id.to_string(),
                Ring {
                    points: VecDeque::new(),
                    polled: now,
                },
            );
            changed = true;
        }
        if changed {
            self.publish(&g);
        }
        loop {
            let seq = g.next_seq;
            let r = g.devices.get_mut(device_id)?;
            r.polled = Instant::now();
            let points: Vec<Box<[u8]>> = r
                .points
                .iter()
                .filter(|(s, _)| *s > after)
                .map(|(_, p)| p.clone())
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if !points.is_empty() || left.is_zero() || self.closed.load(Ordering::Relaxed) {
                let next = r.points.back().map_or(seq, |(s, _)| *s).max(after);
                return Some(Polled { points, next });
            }
            g = self.more.wait_timeout(g, left).ok()?.0;
        }
    }

    /// Wakes every waiting poll and makes later ones answer at once: the
    /// gateway is stopping, and a long poll must not hold up SIGTERM.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        // Under the lock, so a poll between its check and its wait cannot
        // miss the wake-up.
        let _g = self.inner.lock();
        self.more.notify_all();
    }

    /// Forgets devices not polled for [`IDLE`]; turns the tap off when none
    /// is left. Called now and then by the gateway's main thread.
    pub fn sweep(&self) {
        if let Ok(mut g) = self.inner.lock() {
            let now = Instant::now();
            let before = g.devices.len();
            g.devices.retain(|_, r| now.duration_since(r.polled) < IDLE);
            if g.devices.len() != before {
                self.publish(&g);
            }
        }
    }

    /// Makes the watched set visible to [`Tap::offer`] (under the lock).
    fn publish(&self, g: &Inner) {
        self.watched.store(std::sync::Arc::new(
            g.devices.keys().map(|k| k.as_str().into()).collect(),
        ));
        self.active.store(!g.devices.is_empty(), Ordering::Relaxed);
    }

    /// Devices watched now.
    pub fn watched(&self) -> usize {
        self.inner.lock().map(|g| g.devices.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn points_of_watched_devices_only_reach_the_poller() {
        let t = Arc::new(Tap::default());
        assert!(!t.active());
        t.offer("a", b"{}");
        // Watch "a": nothing yet.
        let p = t.poll("a", 0, Duration::ZERO).unwrap();
        assert!(p.points.is_empty());
        assert!(t.active());
        t.offer("a", b"{\"v\":1}");
        t.offer("b", b"{\"v\":2}");
        t.offer("a", b"{\"v\":3}");
        let p = t.poll("a", p.next, Duration::ZERO).unwrap();
        assert_eq!(p.points.len(), 2);
        assert_eq!(&*p.points[0], b"{\"v\":1}");
        assert_eq!(&*p.points[1], b"{\"v\":3}");
        // The cursor moves past them.
        let q = t.poll("a", p.next, Duration::ZERO).unwrap();
        assert!(q.points.is_empty());
        assert_eq!(q.next, p.next);

        // A waiting poll wakes on the next point.
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.poll("a", q.next, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        t.offer("a", b"{\"v\":4}");
        let r = h.join().unwrap().unwrap();
        assert_eq!(r.points.len(), 1);
        assert_eq!(&*r.points[0], b"{\"v\":4}");
    }

    #[test]
    fn close_wakes_a_waiting_poll_at_once() {
        let t = Arc::new(Tap::default());
        let t2 = t.clone();
        let started = Instant::now();
        let h = std::thread::spawn(move || t2.poll("a", 0, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        t.close();
        let p = h.join().unwrap().unwrap();
        assert!(p.points.is_empty());
        assert!(started.elapsed() < Duration::from_secs(10));
        // Later polls do not wait either.
        let p = t.poll("a", p.next, Duration::from_secs(30)).unwrap();
        assert!(p.points.is_empty());
    }

    #[test]
    fn the_ring_is_bounded_and_watchers_are_capped() {
        let t = Tap::default();
        t.poll("a", 0, Duration::ZERO).unwrap();
        for i in 0..(RING + 10) {
            t.offer("a", format!("{i}").as_bytes());
        }
        let p = t.poll("a", 0, Duration::ZERO).unwrap();
        assert_eq!(p.points.len(), RING);
        assert_eq!(&*p.points[0], b"10");
        for i in 1..MAX_WATCHED {
            assert!(t.poll(&format!("d{i}"), 0, Duration::ZERO).is_some());
        }
        assert!(t.poll("one-too-many", 0, Duration::ZERO).is_none());
        assert_eq!(t.watched(), MAX_WATCHED);
    }
}

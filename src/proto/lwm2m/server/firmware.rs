//! Firmware images served to devices for a pull update (LwM2M TS 1.1 Core
//! §E.6: the device downloads the Package URI written to /5/0/1 itself):
//! `GET /fw/{name}` answered in Block2 blocks (RFC 7959 §2.4), any block
//! number the device asks for, in the device's block size when it is
//! smaller than ours, so a download that stopped (sleep, new address,
//! reboot) resumes where the device wants.
//!
//! The control plane hands images to the shards by message
//! ([`ControlMsg::Firmware`]) before it writes a Package URI; a shard never
//! reads the image store. Every response carries an ETag (the first 8
//! bytes of the image's SHA-256, RFC 7252 §5.10.6) so a device notices an
//! image replaced mid-download (§2.4).
//!
//! Blocks go only to peers this shard knows: a registration at that
//! address, or an authenticated DTLS session. An unknown plain-UDP sender
//! gets 4.01 with no payload: a spoofed 20-byte GET must not draw a
//! 1 KiB block at a victim (RFC 7252 §11.3, amplification).

use super::*;
use crate::proto::coap::block::{block2_slice, MAX_SZX};
use crate::proto::coap::opt;

/// How far a registration got downloading an image.
pub(super) struct Download {
    name: Arc<str>,
    /// The end of the highest block served.
    end: u64,
    reported: u64,
    reported_at: Option<Instant>,
    /// A throttled report is due at this time (the trailing one).
    flush_at: Option<Instant>,
}

/// Downloads tracked per shard at most (a flood of registrations each
/// fetching a block must not grow the table without bound).
const MAX_DOWNLOADS: usize = 100_000;

impl Server {
    /// Installs (or, with `None`, removes) an image under `name`.
    pub(super) fn set_firmware(&mut self, name: Arc<str>, image: Option<FwImage>) {
        match image {
            Some(i) => {
                self.images.insert(name, i);
            }
            None => {
                self.images.remove(&*name);
            }
        }
    }

    /// `GET /fw/{name}` (with or without Block2).
    pub(super) fn serve_firmware(
        &mut self,
        now: Now,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        name: &[u8],
        protected: bool,
    ) {
        if !(protected || identity.is_some()) {
            ShardMetrics::inc(&self.metrics.firmware_refused);
            let r = MessageBuilder::new(MsgType::Ack, Code::UNAUTHORIZED).token(msg.token);
            return self.ex.respond(now.instant, peer, msg, r, true, false);
        }
        let image = std::str::from_utf8(name)
            .ok()
            .and_then(|n| self.images.get(n))
            .cloned();
        let Some(image) = image else {
            ShardMetrics::inc(&self.metrics.requests_not_found);
            return self.reply_error(now, peer, msg, Code::NOT_FOUND, "no such image", true);
        };
        let max_szx = self.cfg.block_szx.min(MAX_SZX);
        let Some((range, block)) = block2_slice(image.bytes.len(), msg.block2(), max_szx) else {
            // RFC 7959 §2.4: a block past the end is a bad option.
            ShardMetrics::inc(&self.metrics.firmware_refused);
            return self.reply_error(now, peer, msg, Code::BAD_OPTION, "block past the end", true);
        };
        if let Some(reg) = self.regs.by_peer(&peer) {
            self.download_progress(
                now,
                reg,
                name_arc(&self.images, name),
                range.end as u64,
                image.bytes.len() as u64,
            );
        }
        ShardMetrics::inc(&self.metrics.firmware_blocks_served);
        ShardMetrics::add(
            &self.metrics.firmware_bytes_served,
            (range.end - range.start) as u64,
        );
        let mut r = MessageBuilder::new(MsgType::Ack, Code::CONTENT)
            .token(msg.token)
            .option(opt::ETAG, &image.etag)
            .content_format(crate::proto::lwm2m::content::CF_OPAQUE)
            .block2(block);
        if block.num == 0 {
            // §4: Size2 tells the device the whole size up front.
            r = r.size2(image.bytes.len() as u32);
        }
        let r = r.payload(&image.bytes[range]);
        // Not kept for duplicate detection: a retransmitted GET is served
        // again (RFC 7252 §4.5 lets a server relax this for idempotent
        // requests); caching every 1 KiB block of a 2 MiB download for
        // EXCHANGE_LIFETIME would cost 2 MiB per device.
        self.ex.respond(now.instant, peer, msg, r, false, true);
    }

    /// Reports how far registration `reg` got downloading `name`: at most
    /// every 500 ms, and when it has the last block.
    fn download_progress(
        &mut self,
        now: Now,
        reg: RegId,
        name: Option<Arc<str>>,
        end: u64,
        total: u64,
    ) {
        let Some(name) = name else { return };
        let Some(device_id) = self.regs.get(reg).map(|r| r.entry.device_id.clone()) else {
            return;
        };
        if self.downloads.len() >= MAX_DOWNLOADS && !self.downloads.contains_key(&reg) {
            self.downloads.clear();
        }
        let d = self.downloads.entry(reg).or_insert_with(|| Download {
            name: name.clone(),
            end: 0,
            reported: 0,
            reported_at: None,
            flush_at: None,
        });
        if d.name != name {
            *d = Download {
                name: name.clone(),
                end: 0,
                reported: 0,
                reported_at: None,
                flush_at: None,
            };
        }
        d.end = d.end.max(end);
        let complete = d.end >= total;
        let due = d
            .reported_at
            .is_none_or(|t| now.instant >= t + Duration::from_millis(500));
        if d.end > d.reported && (due || complete) {
            d.reported = d.end;
            d.reported_at = Some(now.instant);
            d.flush_at = None;
            let bytes = d.end;
            if complete {
                self.downloads.remove(&reg);
            }
            self.rpc_events.push_back(RpcEvent::Progress {
                device_id,
                rpc_id: None,
                image: Some(name),
                bytes,
            });
        } else if d.end > d.reported && d.flush_at.is_none() {
            // Throttled: the bytes are reported when the 500 ms are up,
            // even if the device stops asking (it sleeps, it went silent).
            let at = d
                .reported_at
                .map_or(now.instant, |t| t + Duration::from_millis(500));
            d.flush_at = Some(at);
            self.download_timers.push(Reverse((at, reg)));
        }
    }

    /// The next trailing download report.
    pub(super) fn next_download_timer(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, reg))) = self.download_timers.peek().copied() {
            if self
                .downloads
                .get(&reg)
                .is_some_and(|d| d.flush_at == Some(at))
            {
                return Some(at);
            }
            self.download_timers.pop();
        }
        None
    }

    /// Trailing download reports that are due.
    pub(super) fn download_timeouts(&mut self, now: Now) {
        while let Some(Reverse((at, reg))) = self.download_timers.peek().copied() {
            if at > now.instant {
                break;
            }
            self.download_timers.pop();
            let Some(d) = self.downloads.get_mut(&reg) else {
                continue;
            };
            if d.flush_at != Some(at) {
                continue;
            }
            d.flush_at = None;
            if d.end <= d.reported {
                continue;
            }
            d.reported = d.end;
            d.reported_at = Some(now.instant);
            let (bytes, name) = (d.end, d.name.clone());
            let Some(device_id) = self.regs.get(reg).map(|r| r.entry.device_id.clone()) else {
                self.downloads.remove(&reg);
                continue;
            };
            self.rpc_events.push_back(RpcEvent::Progress {
                device_id,
                rpc_id: None,
                image: Some(name),
                bytes,
            });
        }
    }
}

/// The image's shared name (the key of the images table).
fn name_arc(images: &FastMap<Arc<str>, FwImage>, name: &[u8]) -> Option<Arc<str>> {
    let n = std::str::from_utf8(name).ok()?;
    images.get_key_value(n).map(|(k, _)| k.clone())
}

//! The simulated device's Firmware Update object (LwM2M TS 1.1 Core E.6,
//! object 5), client side: a Package URI written to /5/0/1 is downloaded
//! with Block2 GETs in the device's block size (RFC 7959 §2.4, resuming
//! from the block it lacks after a timeout or a 4.01); a Package written to
//! /5/0/0 in Block1 blocks is kept; State and Update Result change as E.6
//! says and are notified to their observers; Execute /5/0/2 starts the
//! update, which the test completes with [`SimDevice::fw_reboot`].

use super::sim::SimDevice;
use crate::proto::coap::{block, opt, Block, Code, Message, MessageBuilder};
use crate::proto::lwm2m::content::ResourcePath;
use crate::proto::lwm2m::encode::WriteValue;
use std::time::{Duration, Instant};

const STATE: ResourcePath = ResourcePath::resource(5, 0, 3);
const RESULT: ResourcePath = ResourcePath::resource(5, 0, 5);
const URI: ResourcePath = ResourcePath::resource(5, 0, 1);
const VERSION: ResourcePath = ResourcePath::resource(3, 0, 3);

/// A download in progress (pull).
#[derive(Debug, Clone)]
pub struct SimDownload {
    pub path: Vec<String>,
    /// The next block to ask for, in `szx` units.
    pub next: u32,
    pub szx: u8,
    pub body: Vec<u8>,
    pub size: Option<u32>,
    /// The GET on the wire (resent on timeout) and when it was sent.
    pending: Option<(u16, Vec<u8>, Option<Instant>)>,
    token: [u8; 4],
}

/// How the simulated device behaves during an update.
#[derive(Debug, Clone, Default)]
pub struct SimFirmware {
    pub state: u8,
    pub result: u8,
    /// The package received (pull or push).
    pub image: Vec<u8>,
    pub download: Option<SimDownload>,
    /// Report this Update Result once the package is complete, instead of
    /// State 2 (5: integrity check failure).
    pub fail_download: Option<u8>,
    /// Stop downloading (and answer nothing) once this many bytes are in.
    pub stall_at: Option<usize>,
    /// Drop pushed blocks once this many bytes of a push are in (the
    /// device went away mid-push).
    pub push_stall_at: Option<usize>,
    /// Pushes started (block 0 received).
    pub pushes_started: u32,
    /// The Update Result a reboot reports (1 when unset).
    pub reboot_result: Option<u8>,
    /// GETs sent for blocks (retransmissions included).
    pub block_requests: u32,
    /// Block numbers received, in order (to see a resumed download).
    pub blocks: Vec<u32>,
    /// The SZX of each pushed block accepted.
    pub push_szx: Vec<u8>,
    /// Pushed blocks refused with 4.13 (larger than the device's size).
    pub refused_large: u32,
}

impl SimDevice {
    /// Gives the device object 5 (Idle, result 0) and firmware `version`.
    pub fn enable_firmware(&mut self, version: &str) {
        self.fw = Some(SimFirmware::default());
        self.store.insert(STATE, WriteValue::Int(0));
        self.store.insert(RESULT, WriteValue::Int(0));
        self.store.insert(URI, WriteValue::Str(String::new()));
        self.store.insert(VERSION, WriteValue::Str(version.into()));
        if !self.objects.iter().any(|o| o == "/5/0") {
            self.objects.push("/5/0".into());
        }
    }

    /// Sets State / Update Result and notifies their observers (NON).
    pub(crate) fn fw_set(&mut self, state: u8, result: u8, out: &mut Vec<Vec<u8>>) {
        let Some(fw) = self.fw.as_mut() else { return };
        let (s0, r0) = (fw.state, fw.result);
        fw.state = state;
        fw.result = result;
        self.store.insert(STATE, WriteValue::Int(state as i64));
        self.store.insert(RESULT, WriteValue::Int(result as i64));
        // E.6: notifications of both when either changes.
        if s0 != state || r0 != result {
            for p in [STATE, RESULT] {
                if let Some(n) = self.notify_typed(p) {
                    out.push(n);
                }
            }
        }
    }

    /// A NON notification of `p` with its typed value (text).
    fn notify_typed(&mut self, p: ResourcePath) -> Option<Vec<u8>> {
        let idx = self.observations.iter().position(|o| o.path == p)?;
        let text = match self.store.get(&p)? {
            WriteValue::Int(i) => i.to_string(),
            WriteValue::Str(s) => s.clone(),
            _ => return None,
        };
        let mid = self.next_mid();
        let o = &mut self.observations[idx];
        o.seq = (o.seq + 1) & 0xff_ffff;
        let n = MessageBuilder::request(Code::CONTENT, false)
            .mid(mid)
            .token(&o.token)
            .observe(o.seq)
            .content_format(crate::proto::lwm2m::content::CF_TEXT)
            .payload(text.as_bytes())
            .to_vec();
        Some(n)
    }

    /// A Package URI was written: start downloading it (empty: reset).
    pub(crate) fn fw_uri_written(&mut self, out: &mut Vec<Vec<u8>>) {
        let uri = match self.store.get(&URI) {
            Some(WriteValue::Str(s)) => s.clone(),
            _ => String::new(),
        };
        if self.fw.is_none() {
            return;
        }
        if uri.is_empty() {
            if let Some(fw) = self.fw.as_mut() {
                fw.download = None;
                fw.image.clear();
            }
            return self.fw_set(0, 0, out);
        }
        // coap(s)://host:port/a/b → ["a", "b"]; other schemes: 9.
        let rest = uri
            .strip_prefix("coap://")
            .or_else(|| uri.strip_prefix("coaps://"));
        let Some(rest) = rest else {
            return self.fw_set(0, 9, out);
        };
        let path: Vec<String> = rest
            .split_once('/')
            .map(|(_, p)| p.split('/').map(str::to_string).collect())
            .unwrap_or_default();
        let szx = self.block_szx;
        let token = self.next_mid().to_be_bytes();
        if let Some(fw) = self.fw.as_mut() {
            fw.image.clear();
            fw.blocks.clear();
            fw.download = Some(SimDownload {
                path,
                next: 0,
                szx,
                body: Vec::new(),
                size: None,
                pending: None,
                token: [b'f', b'w', token[0], token[1]],
            });
        }
        self.fw_set(1, 0, out);
        if let Some(g) = self.fw_next_get(None) {
            out.push(g);
        }
    }

    /// The GET for the next block (sent now: `at` is stamped by the
    /// caller's clock on the first tick).
    fn fw_next_get(&mut self, now: Option<Instant>) -> Option<Vec<u8>> {
        let mid = self.next_mid();
        let fw = self.fw.as_mut()?;
        let d = fw.download.as_mut()?;
        if fw.stall_at.is_some_and(|s| d.body.len() >= s) {
            return None;
        }
        let mut m = MessageBuilder::request(Code::GET, true)
            .mid(mid)
            .token(&d.token);
        for s in &d.path {
            m = m.path_segment(s.as_bytes());
        }
        // RFC 7959 §2.4: Block2 in the request sets the size from block 0.
        let m = m
            .block2(Block {
                num: d.next,
                more: false,
                szx: d.szx,
            })
            .to_vec();
        d.pending = Some((mid, m.clone(), now));
        fw.block_requests += 1;
        Some(m)
    }

    /// Resends the block GET when unanswered for a second (a lost
    /// datagram, or the gateway said 4.01 before it knew the address).
    pub fn fw_tick(&mut self, now: Instant) -> Option<Vec<u8>> {
        let fw = self.fw.as_mut()?;
        if fw
            .stall_at
            .is_some_and(|s| fw.download.as_ref().is_some_and(|d| d.body.len() >= s))
        {
            return None;
        }
        let d = fw.download.as_mut()?;
        match &mut d.pending {
            Some((_, _, at @ None)) => {
                *at = Some(now);
                None
            }
            Some((_, m, Some(at))) if now >= *at + Duration::from_millis(1000) => {
                *at = now;
                fw.block_requests += 1;
                Some(m.clone())
            }
            Some(_) => None,
            None => self.fw_next_get(Some(now)),
        }
    }

    /// A response to one of our block GETs; `true` when it was one.
    pub(crate) fn fw_response(&mut self, m: &Message<'_>, out: &mut Vec<Vec<u8>>) -> bool {
        let Some(d) = self.fw.as_mut().and_then(|f| f.download.as_mut()) else {
            return false;
        };
        if m.token != d.token {
            return false;
        }
        match &d.pending {
            Some((mid, _, _)) if *mid == m.message_id => {}
            _ => return true, // a duplicate or late answer
        }
        if m.code == Code::UNAUTHORIZED {
            // Not known at this address yet (it moved): try again later.
            if let Some((_, _, at)) = &mut d.pending {
                *at = at.or(Some(Instant::now()));
            }
            return true;
        }
        if m.code != Code::CONTENT {
            let r = if m.code == Code::NOT_FOUND { 7 } else { 4 };
            if let Some(fw) = self.fw.as_mut() {
                fw.download = None;
            }
            self.fw_set(0, r, out);
            return true;
        }
        let b2 = m.block2().unwrap_or(Block {
            num: 0,
            more: false,
            szx: block::MAX_SZX,
        });
        let size = block::block_size(b2.szx);
        let off = b2.num as usize * size;
        if off != d.body.len() {
            // Not the block we lack: ask again for ours.
            d.pending = None;
            return true;
        }
        if let Some(s) = m.option(opt::SIZE2).and_then(|o| o.as_uint()) {
            d.size = Some(s);
        }
        d.body.extend_from_slice(m.payload);
        d.szx = b2.szx;
        d.next = (d.body.len() / size) as u32;
        d.pending = None;
        let num = b2.num;
        if let Some(fw) = self.fw.as_mut() {
            fw.blocks.push(num);
        }
        if b2.more {
            if let Some(g) = self.fw_next_get(None) {
                out.push(g);
            }
            return true;
        }
        let body = self
            .fw
            .as_mut()
            .and_then(|f| f.download.take())
            .map(|d| d.body)
            .unwrap_or_default();
        self.fw_package_complete(body, out);
        true
    }

    /// The whole package is in (downloaded or pushed).
    pub(crate) fn fw_package_complete(&mut self, body: Vec<u8>, out: &mut Vec<Vec<u8>>) {
        let Some(fw) = self.fw.as_mut() else { return };
        fw.image = body;
        match fw.fail_download {
            Some(r) => self.fw_set(0, r, out),
            None => self.fw_set(2, 0, out),
        }
    }

    /// Execute /5/0/2: updating when Downloaded, else 4.05 (E.6).
    pub(crate) fn fw_update(&mut self, out: &mut Vec<Vec<u8>>) -> Code {
        match self.fw.as_ref().map(|f| f.state) {
            Some(2) => {
                self.fw_set(3, 0, out);
                Code::CHANGED
            }
            Some(_) => Code::METHOD_NOT_ALLOWED,
            None => Code::NOT_FOUND,
        }
    }

    /// The update ran and the device rebooted into `version`: observations
    /// and registration are gone; State 0 with the reboot's Update Result.
    /// The test registers again.
    pub fn fw_reboot(&mut self, version: &str) {
        let r = self.fw.as_ref().and_then(|f| f.reboot_result).unwrap_or(1);
        self.observations.clear();
        self.location = None;
        let mut ignore = Vec::new();
        self.fw_set(0, r, &mut ignore);
        if r == 1 {
            self.store.insert(VERSION, WriteValue::Str(version.into()));
        }
    }

    /// The package the device holds.
    pub fn fw_image(&self) -> &[u8] {
        self.fw.as_ref().map_or(&[][..], |f| &f.image[..])
    }
}

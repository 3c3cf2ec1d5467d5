//! LwM2M Registration interface parameters (LwM2M TS 1.1 Core §5.3, Transport
//! §6.2.1 Table 6.2.1-1 / TS 1.2 Transport §6.2.1).
//!
//! `POST /rd?ep={Endpoint}&lt={Lifetime}&lwm2m={Version}&b={Binding}&Q&sms=..`
//! registers; `POST /rd/{location}?lt=..&b=..` updates; `DELETE /rd/{location}`
//! de-registers.
//!
//! This module turns those requests into typed values ([`RegisterRequest`],
//! [`UpdateRequest`]) or a [`RegError`] with its CoAP code, and holds the
//! shard's registrations ([`Registry`]): by id, endpoint and peer, with
//! their lifetime deadlines. A registration is plain data that can move to
//! another shard or into a snapshot ([`RegistrationState`]).
//!
//! **Identifiers.** A registration id is 64 bits from the shard's CSPRNG with
//! the top 8 bits replaced by the *home* shard, the shard that created it; its
//! location is the id in 16 hex digits (`/rd/0a3f…`). Any shard can read the
//! home shard off a location and ask it where the registration lives now
//! (see `server`), so an Update from a new source address lands wherever the
//! kernel's reuseport hash sends it and still finds its registration.
//!
//! **Newest wins.** Every registration carries an [`Epoch`]: a Lamport
//! counter (raised to the wall clock in µs, and past every epoch seen from
//! other shards) and the shard number as tie-break. When two shards hold a
//! registration for one endpoint, the one with the larger epoch survives
//! everywhere, whatever order the shards hear about each other in.

use super::content::ResourcePath;
use super::endpoint::EndpointEntry;
use super::link_format::{self, RegistrationLinks};
use super::observe::ObservationState;
use crate::proto::coap::{Code, Message, PeerId};
use crate::proto::FastMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default lifetime when `lt` is absent (TS Core §E.2, Server object resource 1
/// default: 86400 s).
pub const DEFAULT_LIFETIME_S: u32 = 86_400;
/// Maximum endpoint name length we accept; longer names are rejected with 4.00.
pub const MAX_ENDPOINT_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegisterParams {
    pub endpoint: String,
    pub lifetime_s: u32,
    pub version: String,
    pub binding: String,
    /// Queue mode (`Q` parameter, LwM2M 1.1).
    pub queue_mode: bool,
    pub sms: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateParams {
    pub lifetime_s: Option<u32>,
    pub binding: Option<String>,
    pub sms: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("missing mandatory parameter {0}")]
    Missing(&'static str),
    #[error("invalid value for parameter {0}")]
    Invalid(&'static str),
    #[error("query parameter is not UTF-8")]
    NotUtf8,
    #[error("unsupported LwM2M version {0}")]
    UnsupportedVersion(String),
}

fn split(q: &[u8]) -> Result<(&str, Option<&str>), ParamError> {
    let s = std::str::from_utf8(q).map_err(|_| ParamError::NotUtf8)?;
    Ok(match s.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (s, None),
    })
}

fn lifetime(v: Option<&str>) -> Result<u32, ParamError> {
    v.and_then(|v| v.parse::<u32>().ok())
        .filter(|v| *v > 0)
        .ok_or(ParamError::Invalid("lt"))
}

fn binding(v: Option<&str>) -> Result<String, ParamError> {
    // TS 1.1 Transport §6.2.1.1: binding modes U, S, N, T (and LwM2M 1.0's
    // UQ/SQ/UQS queue-mode variants).
    let v = v.ok_or(ParamError::Invalid("b"))?;
    if v.is_empty() || v.len() > 8 || !v.chars().all(|c| "USNTQ".contains(c)) {
        return Err(ParamError::Invalid("b"));
    }
    Ok(v.to_string())
}

/// Parses the Register request's Uri-Query options.
pub fn parse_register<'a>(
    queries: impl Iterator<Item = &'a [u8]>,
) -> Result<RegisterParams, ParamError> {
    let mut p = RegisterParams {
        lifetime_s: DEFAULT_LIFETIME_S,
        version: "1.0".to_string(),
        binding: "U".to_string(),
        ..Default::default()
    };
    let mut have_ep = false;
    for q in queries {
        let (k, v) = split(q)?;
        match k {
            "ep" => {
                let v = v.ok_or(ParamError::Invalid("ep"))?;
                if v.is_empty() || v.len() > MAX_ENDPOINT_LEN || v.chars().any(|c| c.is_control()) {
                    return Err(ParamError::Invalid("ep"));
                }
                p.endpoint = v.to_string();
                have_ep = true;
            }
            "lt" => p.lifetime_s = lifetime(v)?,
            "lwm2m" => {
                let v = v.ok_or(ParamError::Invalid("lwm2m"))?;
                // The enabler version is major.minor (TS 1.1 Core §6.2.1);
                // some clients (npm coap-node) send a patch level too,
                // "1.0.0": taken as its major.minor.
                let mm = match v.match_indices('.').nth(1) {
                    Some((i, _))
                        if v[i + 1..].bytes().all(|b| b.is_ascii_digit()) && i + 1 < v.len() =>
                    {
                        &v[..i]
                    }
                    _ => v,
                };
                if !matches!(mm, "1.0" | "1.1" | "1.2") {
                    return Err(ParamError::UnsupportedVersion(v.chars().take(16).collect()));
                }
                p.version = mm.to_string();
            }
            "b" => {
                let b = binding(v)?;
                if b.contains('Q') {
                    p.queue_mode = true;
                }
                p.binding = b;
            }
            "Q" => p.queue_mode = true,
            "sms" => p.sms = v.map(str::to_string),
            // Unknown parameters are ignored for forward compatibility.
            _ => {}
        }
    }
    if !have_ep {
        // TS 1.1: the endpoint name is mandatory unless it is learned from the
        // DTLS identity; over plain CoAP it must be present.
        return Err(ParamError::Missing("ep"));
    }
    Ok(p)
}

/// Parses the Update request's Uri-Query options.
pub fn parse_update<'a>(
    queries: impl Iterator<Item = &'a [u8]>,
) -> Result<UpdateParams, ParamError> {
    let mut p = UpdateParams::default();
    for q in queries {
        let (k, v) = split(q)?;
        match k {
            "lt" => p.lifetime_s = Some(lifetime(v)?),
            "b" => p.binding = Some(binding(v)?),
            "sms" => p.sms = v.map(str::to_string),
            _ => {}
        }
    }
    Ok(p)
}

// ------------------------------------------------------------------ typed requests

/// Why a registration request is refused, with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    /// Bad parameters or payload (TS 1.1 Transport §6.2.1: 4.00).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Endpoint not provisioned, de-provisioned, or not authorized (4.03).
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// No such registration (§6.2.2: 4.04, the client registers again).
    #[error("unknown registration")]
    NotFound,
}

impl RegError {
    pub fn code(&self) -> Code {
        match self {
            RegError::BadRequest(_) => Code::BAD_REQUEST,
            RegError::Forbidden(_) => Code::FORBIDDEN,
            RegError::NotFound => Code::NOT_FOUND,
        }
    }
    pub fn diagnostic(&self) -> &'static str {
        match self {
            RegError::BadRequest(d) | RegError::Forbidden(d) => d,
            RegError::NotFound => "unknown registration",
        }
    }
}

/// LwM2M enabler version of a client (`lwm2m=` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Version {
    #[serde(rename = "1.0")]
    V1_0,
    #[serde(rename = "1.1")]
    V1_1,
    #[serde(rename = "1.2")]
    V1_2,
}

impl Version {
    pub fn parse(s: &str) -> Version {
        match s {
            "1.2" => Version::V1_2,
            "1.1" => Version::V1_1,
            _ => Version::V1_0,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }
}

/// A Register request, validated.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    pub params: RegisterParams,
    pub links: RegistrationLinks,
}

/// An Update request, validated. `links` is `None` when the object list did
/// not change (empty payload).
#[derive(Debug, Clone)]
pub struct UpdateRequest {
    pub params: UpdateParams,
    pub links: Option<RegistrationLinks>,
}

/// TS 1.1 Transport §6.2.1: parameters in the Uri-Query, the object links in
/// a link-format (40) payload.
pub fn parse_register_request(msg: &Message<'_>) -> Result<RegisterRequest, RegError> {
    let params = parse_register(msg.uri_query())
        .map_err(|_| RegError::BadRequest("invalid registration parameters"))?;
    if msg
        .content_format()
        .is_some_and(|cf| cf != super::content::CF_LINK)
    {
        return Err(RegError::BadRequest(
            "registration payload must be link-format",
        ));
    }
    let links = link_format::parse_registration(msg.payload)
        .map_err(|_| RegError::BadRequest("invalid link-format payload"))?;
    Ok(RegisterRequest { params, links })
}

/// TS 1.1 Transport §6.2.2.
pub fn parse_update_request(msg: &Message<'_>) -> Result<UpdateRequest, RegError> {
    let params = parse_update(msg.uri_query())
        .map_err(|_| RegError::BadRequest("invalid update parameters"))?;
    let links = if msg.payload.is_empty() {
        None
    } else {
        if msg
            .content_format()
            .is_some_and(|cf| cf != super::content::CF_LINK)
        {
            return Err(RegError::BadRequest("update payload must be link-format"));
        }
        Some(
            link_format::parse_registration(msg.payload)
                .map_err(|_| RegError::BadRequest("invalid link-format payload"))?,
        )
    };
    Ok(UpdateRequest { params, links })
}

// ------------------------------------------------------------------ identifiers

/// A registration id (see the module documentation).
pub type RegId = u64;

/// The shard that created `id`.
pub fn home_shard(id: RegId) -> u16 {
    (id >> 56) as u16
}

/// An id for `home` from 64 random bits.
pub fn make_id(home: u16, random: u64) -> RegId {
    ((home as u64 & 0xff) << 56) | (random & 0x00ff_ffff_ffff_ffff)
}

/// The location path segment of `id`: 16 lower-case hex digits.
pub fn location(id: RegId) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        let nib = ((id >> (60 - 4 * i)) & 0xf) as u8;
        *b = if nib < 10 {
            b'0' + nib
        } else {
            b'a' + nib - 10
        };
    }
    out
}

/// Parses a location segment back into an id.
pub fn parse_location(seg: &[u8]) -> Option<RegId> {
    if seg.len() != 16 {
        return None;
    }
    let mut v = 0u64;
    for c in seg {
        let d = (*c as char).to_digit(16)?;
        v = (v << 4) | d as u64;
    }
    Some(v)
}

/// Orders registrations of one endpoint across shards (newest wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch {
    pub counter: u64,
    pub shard: u16,
}

// ------------------------------------------------------------------ state

/// One registration (TS 1.1 Core §6.2.1).
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: RegId,
    pub endpoint: Arc<str>,
    pub entry: Arc<EndpointEntry>,
    pub peer: PeerId,
    pub lifetime_s: u32,
    pub binding: Box<str>,
    pub version: Version,
    pub queue_mode: bool,
    /// Alternate path from `</path>;rt="oma.lwm2m"`, `/` by default.
    pub root_path: Box<str>,
    pub objects: Box<[(u16, Option<u16>)]>,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
    pub expires_at: Instant,
    pub epoch: Epoch,
    /// Times the registration moved between shards.
    pub moves: u32,
    /// Status events published for it so far; the next one carries this
    /// number (orders a device's events when they come from several shards'
    /// producers).
    /// (u32 keeps the registration in a smaller allocation class; 4 billion
    /// status events per registration do not happen.)
    pub status_seq: u32,
    /// Tokens of its established observations.
    pub observations: SmallVec<[u64; 2]>,
    /// The content format the device announced first (`ct=` on its root
    /// link, TS 1.1 Transport §6.2.1).
    pub preferred_cf: Option<u16>,
    /// Queue mode (TS 1.1 Transport §6.5): requests go to the device only
    /// until this instant after it last sent something.
    pub awake_until: Option<Instant>,
}

impl Registration {
    /// True when the device declared `object` (and `instance`, if given).
    pub fn has_object(&self, object: u16, instance: Option<u16>) -> bool {
        self.objects.iter().any(|(o, i)| {
            *o == object
                && match (instance, i) {
                    (None, _) | (Some(_), None) => true,
                    (Some(a), Some(b)) => a == *b,
                }
        })
    }

    pub fn location(&self) -> [u8; 16] {
        location(self.id)
    }

    pub fn object_links(&self) -> Vec<String> {
        self.objects
            .iter()
            .map(|(o, i)| match i {
                Some(i) => format!("/{o}/{i}"),
                None => format!("/{o}"),
            })
            .collect()
    }

    /// As plain data, with times relative to `now`.
    pub fn to_state(&self, now: Instant, observations: Vec<ObservationState>) -> RegistrationState {
        RegistrationState {
            id: self.id,
            endpoint: self.endpoint.to_string(),
            address: self.peer.addr(),
            dtls: self.peer.is_dtls(),
            lifetime_s: self.lifetime_s,
            binding: self.binding.to_string(),
            version: self.version,
            queue_mode: self.queue_mode,
            root_path: self.root_path.to_string(),
            objects: self.objects.to_vec(),
            registered_at_ms: self.registered_at_ms,
            last_seen_ms: self.last_seen_ms,
            expires_in_ms: self.expires_at.saturating_duration_since(now).as_millis() as u64,
            epoch: self.epoch,
            moves: self.moves,
            status_seq: self.status_seq as u64,
            observations,
            preferred_cf: self.preferred_cf,
        }
    }

    /// Back from plain data; `entry` is looked up afresh by the caller.
    pub fn from_state(
        s: &RegistrationState,
        entry: Arc<EndpointEntry>,
        now: Instant,
    ) -> Registration {
        Registration {
            id: s.id,
            endpoint: Arc::from(s.endpoint.as_str()),
            entry,
            peer: if s.dtls {
                PeerId::dtls(s.address)
            } else {
                PeerId::udp(s.address)
            },
            lifetime_s: s.lifetime_s,
            binding: s.binding.clone().into_boxed_str(),
            version: s.version,
            queue_mode: s.queue_mode,
            root_path: s.root_path.clone().into_boxed_str(),
            objects: s.objects.clone().into_boxed_slice(),
            registered_at_ms: s.registered_at_ms,
            last_seen_ms: s.last_seen_ms,
            expires_at: now + Duration::from_millis(s.expires_in_ms),
            epoch: s.epoch,
            moves: s.moves,
            status_seq: u32::try_from(s.status_seq).unwrap_or(u32::MAX),
            observations: SmallVec::new(),
            preferred_cf: s.preferred_cf,
            awake_until: None,
        }
    }

    /// True when a request can be sent to the device now (always, unless
    /// it is in queue mode and asleep).
    pub fn reachable(&self, now: Instant) -> bool {
        !self.queue_mode || self.awake_until.is_some_and(|t| t > now)
    }
}

/// A registration with its observations as plain data: what moves between
/// shards and what registration snapshots hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationState {
    pub id: RegId,
    pub endpoint: String,
    pub address: SocketAddr,
    /// Registered over a DTLS session (its keys live in the DTLS layer).
    #[serde(default)]
    pub dtls: bool,
    pub lifetime_s: u32,
    pub binding: String,
    pub version: Version,
    pub queue_mode: bool,
    pub root_path: String,
    pub objects: Vec<(u16, Option<u16>)>,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
    pub expires_in_ms: u64,
    pub epoch: Epoch,
    pub moves: u32,
    #[serde(default)]
    pub status_seq: u64,
    pub observations: Vec<ObservationState>,
    #[serde(default)]
    pub preferred_cf: Option<u16>,
}

/// The registrations of one shard.
#[derive(Default)]
pub struct Registry {
    /// Boxed: the table's buckets stay small (an entry is 16 bytes however
    /// big a registration grows) and a storm's spare capacity costs little.
    regs: FastMap<RegId, Box<Registration>>,
    by_endpoint: FastMap<Arc<str>, RegId>,
    by_peer: FastMap<PeerId, RegId>,
    expiry: BinaryHeap<Reverse<(Instant, RegId)>>,
}

impl Registry {
    /// Approximate heap bytes, by structure.
    pub fn heap_estimate(&self, out: &mut Vec<(&'static str, usize)>) {
        use crate::proto::heap;
        out.push((
            "registrations: table + boxed entries",
            heap::map(&self.regs),
        ));
        let inner: usize = self
            .regs
            .values()
            .map(|r| {
                std::mem::size_of::<Registration>()
                    + r.binding.len()
                    + r.root_path.len()
                    + heap::buf::<(u16, Option<u16>)>(r.objects.len())
                    + if r.observations.spilled() {
                        heap::buf::<u64>(r.observations.capacity())
                    } else {
                        0
                    }
            })
            .sum();
        out.push(("registrations: strings and object lists", inner));
        out.push((
            "registrations: indexes",
            heap::map(&self.by_endpoint) + heap::map(&self.by_peer),
        ));
        out.push((
            "registrations: expiry heap",
            heap::buf::<Reverse<(Instant, RegId)>>(self.expiry.capacity()),
        ));
    }

    pub fn len(&self) -> usize {
        self.regs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }
    pub fn get(&self, id: RegId) -> Option<&Registration> {
        self.regs.get(&id).map(|r| &**r)
    }
    pub fn get_mut(&mut self, id: RegId) -> Option<&mut Registration> {
        self.regs.get_mut(&id).map(|r| &mut **r)
    }
    pub fn contains(&self, id: RegId) -> bool {
        self.regs.contains_key(&id)
    }
    pub fn by_endpoint(&self, endpoint: &str) -> Option<RegId> {
        self.by_endpoint.get(endpoint).copied()
    }
    pub fn by_peer(&self, peer: &PeerId) -> Option<RegId> {
        self.by_peer.get(peer).copied()
    }
    pub fn ids(&self) -> Vec<RegId> {
        self.regs.keys().copied().collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.regs.values().map(|r| &**r)
    }

    /// Adds a registration. The caller removed any other registration of
    /// the same endpoint or peer first.
    pub fn insert(&mut self, reg: Registration) {
        self.expiry.push(Reverse((reg.expires_at, reg.id)));
        self.by_endpoint.insert(reg.endpoint.clone(), reg.id);
        self.by_peer.insert(reg.peer, reg.id);
        self.regs.insert(reg.id, Box::new(reg));
    }

    pub fn remove(&mut self, id: RegId) -> Option<Registration> {
        let reg = *self.regs.remove(&id)?;
        if self.by_endpoint.get(&reg.endpoint) == Some(&id) {
            self.by_endpoint.remove(&reg.endpoint);
        }
        if self.by_peer.get(&reg.peer) == Some(&id) {
            self.by_peer.remove(&reg.peer);
        }
        Some(reg)
    }

    /// The device talks from a new address now. Returns the old one.
    pub fn rebind(&mut self, id: RegId, peer: PeerId) -> Option<PeerId> {
        let reg = self.regs.get_mut(&id)?;
        let old = reg.peer;
        if old == peer {
            return Some(old);
        }
        if self.by_peer.get(&old) == Some(&id) {
            self.by_peer.remove(&old);
        }
        reg.peer = peer;
        self.by_peer.insert(peer, id);
        Some(old)
    }

    /// Moves the lifetime deadline.
    pub fn set_expiry(&mut self, id: RegId, at: Instant) {
        if let Some(r) = self.regs.get_mut(&id) {
            r.expires_at = at;
            self.expiry.push(Reverse((at, id)));
        }
    }

    /// The earliest lifetime deadline.
    pub fn next_expiry(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.expiry.peek().copied() {
            match self.regs.get(&id) {
                Some(r) if r.expires_at == at => return Some(at),
                _ => {
                    self.expiry.pop();
                }
            }
        }
        None
    }

    /// The id of a registration whose lifetime passed (still held: the
    /// caller ends it).
    pub fn next_expired(&mut self, now: Instant) -> Option<RegId> {
        let at = self.next_expiry()?;
        if at > now {
            return None;
        }
        let Reverse((_, id)) = self.expiry.pop()?;
        Some(id)
    }
}

/// A path as the device's root path plus an LwM2M path, for Uri-Path.
pub fn root_segments(root: &str) -> impl Iterator<Item = &str> {
    root.split('/').filter(|s| !s.is_empty())
}

/// [`ResourcePath`] ids in order.
pub fn path_ids(p: &ResourcePath) -> impl Iterator<Item = u16> {
    std::iter::once(p.object).chain(
        [p.instance, p.resource, p.resource_instance]
            .into_iter()
            .flatten(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_locations() {
        let id = make_id(3, 0xdead_beef_0123_4567);
        assert_eq!(home_shard(id), 3);
        let loc = location(id);
        assert_eq!(&loc, b"03adbeef01234567");
        assert_eq!(parse_location(&loc), Some(id));
        assert_eq!(parse_location(b"03adbeef0123456"), None);
        assert_eq!(parse_location(b"03adbeef0123456x"), None);
        assert!(
            Epoch {
                counter: 5,
                shard: 0
            } < Epoch {
                counter: 5,
                shard: 1
            }
        );
        assert!(
            Epoch {
                counter: 6,
                shard: 0
            } > Epoch {
                counter: 5,
                shard: 1
            }
        );
    }

    fn q(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn register_params() {
        let v = q(&["ep=urn:imei:123", "lt=300", "lwm2m=1.1", "b=U"]);
        let p = parse_register(v.iter().map(|x| x.as_slice())).unwrap();
        assert_eq!(p.endpoint, "urn:imei:123");
        assert_eq!(p.lifetime_s, 300);
        assert_eq!(p.version, "1.1");
        assert!(!p.queue_mode);
        let v = q(&["ep=a", "Q"]);
        let p = parse_register(v.iter().map(|x| x.as_slice())).unwrap();
        assert_eq!(p.lifetime_s, DEFAULT_LIFETIME_S);
        assert!(p.queue_mode);
        // A patch level (npm coap-node sends "1.0.0") counts as major.minor.
        let v = q(&["ep=a", "lwm2m=1.0.0", "mac=unknown"]);
        let p = parse_register(v.iter().map(|x| x.as_slice())).unwrap();
        assert_eq!(p.version, "1.0");
    }

    #[test]
    fn register_errors() {
        for bad in [
            vec!["lt=30"],
            vec!["ep="],
            vec!["ep=a", "lt=x"],
            vec!["ep=a", "lt=0"],
            vec!["ep=a", "b=XYZ"],
            vec!["ep=a", "lwm2m=9.9"],
            vec!["ep=a", "lwm2m=1.0."],
            vec!["ep=a", "lwm2m=1.0.x"],
            vec!["ep=a", "lwm2m=1.3.0"],
        ] {
            let v = q(&bad);
            assert!(
                parse_register(v.iter().map(|x| x.as_slice())).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn update_params() {
        let v = q(&["lt=60", "b=UQ"]);
        let p = parse_update(v.iter().map(|x| x.as_slice())).unwrap();
        assert_eq!(p.lifetime_s, Some(60));
        assert_eq!(p.binding.as_deref(), Some("UQ"));
        assert!(parse_update(q(&["lt=-1"]).iter().map(|x| x.as_slice())).is_err());
    }
}

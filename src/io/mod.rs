//! Socket plumbing: SO_REUSEPORT UDP sockets with large buffers, and batched
//! receive / send with `recvmmsg(2)` / `sendmmsg(2)`.
//!
//! Buffers are allocated once per shard and reused for every batch; received
//! datagrams are handed to the engine as slices of that buffer (no copy, no
//! allocation per datagram). All calls use `MSG_DONTWAIT`: readiness is awaited
//! elsewhere (glommio's io_uring receive), so nothing here ever blocks.

pub mod dtls;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Creates a UDP socket bound to `addr` with SO_REUSEPORT, so each shard binds
/// its own socket on the same port and the kernel's 4-tuple hash spreads
/// devices across shards with affinity (a device's datagrams keep landing on
/// the same shard while its address is stable).
pub fn bind_reuseport(addr: SocketAddr, rcvbuf: usize, sndbuf: usize) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false).ok();
    }
    // The kernel caps these at net.core.{r,w}mem_max; tuning/apply raises them.
    if let Err(e) = s.set_recv_buffer_size(rcvbuf) {
        tracing::warn!(%e, "SO_RCVBUF not applied");
    }
    if let Err(e) = s.set_send_buffer_size(sndbuf) {
        tracing::warn!(%e, "SO_SNDBUF not applied");
    }
    s.bind(&SockAddr::from(addr))?;
    Ok(s)
}

/// Reusable state for `recvmmsg`.
///
/// Each slot holds `max_datagram + 1` bytes, so a datagram larger than the
/// limit is recognised (the kernel also sets `MSG_TRUNC`) and reported as
/// truncated instead of being handed on cut short.
pub struct RecvBatch {
    bufs: Vec<u8>,
    /// Slot size: the datagram limit plus one.
    max: usize,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

impl RecvBatch {
    pub fn new(batch: usize, max_datagram: usize) -> RecvBatch {
        let batch = batch.max(1);
        let slot = max_datagram + 1;
        RecvBatch {
            bufs: vec![0u8; batch * slot],
            max: slot,
            lens: vec![0; batch],
            truncated: vec![false; batch],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs
            // for which all-zero bytes are a valid value.
            addrs: vec![unsafe { zeroed() }; batch],
            addr_lens: vec![0; batch],
            iovs: vec![unsafe { zeroed() }; batch],
            hdrs: vec![unsafe { zeroed() }; batch],
            count: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// One non-blocking `recvmmsg`; returns how many datagrams were read
    /// (0 when none was waiting).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.lens.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * self.max..].as_mut_ptr().cast(),
                iov_len: self.max,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `self` that live
        // for the duration of the call, with correct lengths.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.count = 0;
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let r = r as usize;
        for i in 0..r {
            let len = self.hdrs[i].msg_len as usize;
            self.addr_lens[i] = self.hdrs[i].msg_hdr.msg_namelen;
            // Larger than the limit: the slot (limit + 1) filled up, or the
            // kernel cut it (MSG_TRUNC).
            let trunc = len >= self.max || self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.truncated[i] = trunc;
            self.lens[i] = if trunc { self.max - 1 } else { len };
        }
        self.count = r;
        Ok(r)
    }

    /// The i-th datagram of the last batch: sender, bytes (at most the
    /// limit), and whether it was larger than the limit.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8], bool)> {
        if i >= self.count {
            return None;
        }
        let sa = storage_to_addr(&self.addrs[i], self.addr_lens[i])?;
        Some((
            sa,
            &self.bufs[i * self.max..i * self.max + self.lens[i]],
            self.truncated[i],
        ))
    }
}

impl RecvBatch {
    /// Like [`RecvBatch::get`], with the bytes writable (DTLS decrypts in
    /// place).
    pub fn get_mut(&mut self, i: usize) -> Option<(SocketAddr, &mut [u8], bool)> {
        if i >= self.count {
            return None;
        }
        let sa = storage_to_addr(&self.addrs[i], self.addr_lens[i])?;
        let (start, len) = (i * self.max, self.lens[i]);
        Some((sa, &mut self.bufs[start..start + len], self.truncated[i]))
    }
}

fn storage_to_addr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length say this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), u16::from_be(a.sin6_port)),
                None => SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)),
            })
        }
        _ => None,
    }
}

/// Reusable state for `sendmmsg`: the address, iovec and header arrays are
/// kept between calls, so sending a batch allocates nothing.
pub struct SendBatch {
    addrs: Vec<SockAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs` / `hdrs` are only meaningful during a
// `send` call, which rebuilds them; between calls they are stale values that
// are never dereferenced.
unsafe impl Send for SendBatch {}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    /// Datagrams per `sendmmsg` call.
    pub const CHUNK: usize = 64;

    pub fn new() -> SendBatch {
        SendBatch {
            addrs: Vec::with_capacity(Self::CHUNK),
            iovs: Vec::with_capacity(Self::CHUNK),
            hdrs: Vec::with_capacity(Self::CHUNK),
        }
    }

    /// Sends the given datagrams with as few `sendmmsg` calls as possible.
    /// Returns (sent, failed). Never blocks: a full socket buffer drops the
    /// rest (server-initiated CON requests are retransmitted by the exchange
    /// layer; replies are re-sent when the device retransmits).
    pub fn send<'a>(
        &mut self,
        fd: RawFd,
        items: impl Iterator<Item = (SocketAddr, &'a [u8])>,
    ) -> (usize, usize) {
        let mut sent = 0;
        let mut failed = 0;
        let mut items = items.peekable();
        while items.peek().is_some() {
            self.addrs.clear();
            self.iovs.clear();
            self.hdrs.clear();
            for (a, d) in items.by_ref().take(Self::CHUNK) {
                self.addrs.push(SockAddr::from(a));
                self.iovs.push(libc::iovec {
                    iov_base: d.as_ptr() as *mut libc::c_void,
                    iov_len: d.len(),
                });
            }
            // The vectors do not reallocate below (capacity CHUNK), so the
            // pointers taken here stay valid for the calls.
            for i in 0..self.iovs.len() {
                // SAFETY: zeroed mmsghdr is a valid value.
                let mut h: libc::mmsghdr = unsafe { zeroed() };
                h.msg_hdr.msg_name = self.addrs[i].as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = self.addrs[i].len();
                h.msg_hdr.msg_iov = &mut self.iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                self.hdrs.push(h);
            }
            let mut off = 0;
            while off < self.hdrs.len() {
                // SAFETY: headers point into `addrs` / `iovs` and the caller's
                // slices, all alive for the duration of the call.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.hdrs[off..].as_mut_ptr(),
                        (self.hdrs.len() - off) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // Skip the failing datagram (bad address, full buffer).
                    failed += 1;
                    off += 1;
                    continue;
                }
                sent += r as usize;
                off += r as usize;
            }
        }
        (sent, failed)
    }
}

/// CPUs this process may run on (sched_getaffinity), in ascending order. In a
/// container with a cpuset these are not necessarily 0..N.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bitmask; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

/// Raises RLIMIT_MEMLOCK (io_uring buffers) as far as allowed; returns the limit.
pub fn raise_memlock(want: u64) -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur >= want {
            return r.rlim_cur;
        }
        let new = libc::rlimit {
            rlim_cur: want.max(r.rlim_cur),
            rlim_max: want.max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) == 0 {
            return want;
        }
        let soft = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &soft);
        r.rlim_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn reuseport_batch_roundtrip() {
        let a = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1 << 20, 1 << 20).unwrap();
        let addr = a.local_addr().unwrap().as_socket().unwrap();
        // A second socket on the same port is allowed (SO_REUSEPORT).
        let _b = bind_reuseport(addr, 1 << 20, 1 << 20).unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let data: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        let (sent, failed) =
            SendBatch::new().send(c.as_raw_fd(), data.iter().map(|d| (addr, d.as_slice())));
        assert_eq!((sent, failed), (5, 0));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut rb = RecvBatch::new(8, 64);
        let mut got = 0;
        for _ in 0..2 {
            // Datagrams may land on either reuseport socket.
            got += rb.recv(a.as_raw_fd()).unwrap();
            got += rb.recv(_b.as_raw_fd()).unwrap();
        }
        assert_eq!(got, 5);
    }

    #[test]
    fn oversized_datagrams_are_flagged() {
        let a = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1 << 20, 1 << 20).unwrap();
        let addr = a.local_addr().unwrap().as_socket().unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.send_to(&[1u8; 64], addr).unwrap();
        c.send_to(&[2u8; 65], addr).unwrap();
        c.send_to(&[3u8; 5000], addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut rb = RecvBatch::new(8, 64);
        assert_eq!(rb.recv(a.as_raw_fd()).unwrap(), 3);
        let (_, d, t) = rb.get(0).unwrap();
        assert_eq!((d.len(), t), (64, false));
        let (_, d, t) = rb.get(1).unwrap();
        assert_eq!((d.len(), t), (64, true));
        let (_, d, t) = rb.get(2).unwrap();
        assert_eq!((d.len(), t, d[0]), (64, true, 3));
    }
}

//! UDP datagrams in and out in batches (`recvmmsg`, `sendmmsg`): under
//! load, one system call carries up to [`BATCH`] queries and one their
//! answers, instead of two calls per query. Under light load a batch is a
//! single datagram, as with `recvfrom`.
//!
//! Only the system calls are here; what the datagrams hold is hickory's
//! business (see `respond`).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::SockAddr;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;

/// The largest query read: a larger datagram is cut (and reported as
/// such), which no DNS query needs to be.
const DATAGRAM: usize = 4096;

/// Receive buffers, the addresses they came from, and the headers that
/// point the kernel at both. The headers hold pointers into the buffers'
/// heap storage, which never moves: an `Inbox` is built once per thread
/// and never resized.
pub(crate) struct Inbox {
    buffers: Vec<[u8; DATAGRAM]>,
    addresses: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        let mut inbox = Inbox {
            buffers: vec![[0u8; DATAGRAM]; BATCH],
            // SAFETY: sockaddr_storage is plain data; all-zero is valid.
            addresses: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovecs: Vec::with_capacity(BATCH),
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            headers: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
        };
        for b in inbox.buffers.iter_mut() {
            inbox.iovecs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: DATAGRAM,
            });
        }
        for (i, h) in inbox.headers.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut inbox.addresses[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_iov = &mut inbox.iovecs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        inbox
    }

    /// Waits for at least one datagram (or the socket's read timeout) and
    /// takes every one already queued, up to [`BATCH`]. Returns how many.
    pub(crate) fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        for h in self.headers.iter_mut() {
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at a live buffer of DATAGRAM bytes
        // and a sockaddr_storage owned by `self`, borrowed mutably here.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last batch: its bytes, whether it was cut, and
    /// its sender.
    pub(crate) fn datagram(&self, i: usize) -> (&[u8], bool, Option<SocketAddr>) {
        let h = &self.headers[i];
        let len = (h.msg_len as usize).min(DATAGRAM);
        let cut = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let from = socket_addr(&self.addresses[i], h.msg_hdr.msg_namelen);
        (&self.buffers[i][..len], cut, from)
    }
}

/// The IP socket address the kernel wrote into `storage`, if it is one.
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is aligned for every address type.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                u32::from_be(a.sin6_flowinfo),
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Replies gathered during a batch, sent with one call.
pub(crate) struct Outbox {
    bytes: Vec<u8>,
    /// (start, end, destination) of each reply in `bytes`.
    replies: Vec<(usize, usize, SockAddr)>,
}

impl Outbox {
    pub(crate) fn new() -> Outbox {
        Outbox {
            bytes: Vec::with_capacity(BATCH * 512),
            replies: Vec::with_capacity(BATCH),
        }
    }

    pub(crate) fn push(&mut self, reply: &[u8], to: SocketAddr) {
        if reply.is_empty() {
            return;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(reply);
        self.replies
            .push((start, self.bytes.len(), SockAddr::from(to)));
    }

    /// Sends every reply gathered. A reply the kernel refuses is dropped,
    /// as a lost datagram would be: the client asks again.
    pub(crate) fn flush(&mut self, socket: &UdpSocket) {
        let mut sent = 0;
        while sent < self.replies.len() {
            let mut iovecs: Vec<libc::iovec> = self.replies[sent..]
                .iter()
                .map(|(s, e, _)| libc::iovec {
                    iov_base: self.bytes[*s..].as_ptr() as *mut libc::c_void,
                    iov_len: e - s,
                })
                .collect();
            // SAFETY: as in `receive`.
            let mut headers: Vec<libc::mmsghdr> = (0..iovecs.len())
                .map(|_| unsafe { std::mem::zeroed() })
                .collect();
            for (i, h) in headers.iter_mut().enumerate() {
                let to = &self.replies[sent + i].2;
                // sendmmsg only reads the address and the data.
                h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = to.len();
                h.msg_hdr.msg_iov = &mut iovecs[i];
                h.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: every header points at live reply bytes and a live
            // address for the duration of the call.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    headers.as_mut_ptr(),
                    headers.len() as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                if n < 0 {
                    tracing::debug!("udp send: {}", io::Error::last_os_error());
                }
                // Skip the reply that failed and go on with the rest.
                sent += 1;
            } else {
                sent += n as usize;
            }
        }
        self.bytes.clear();
        self.replies.clear();
    }
}

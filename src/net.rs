//! The socket shell: interface discovery, multicast sockets and batched datagram I/O.
//!
//! The socket paths' `unsafe` code lives here (interface ioctls, sendmmsg with UDP GSO
//! control messages, recvmmsg, poll(2) and eventfd through libc), and the protocol modules
//! work on byte slices; elsewhere `unsafe` is kept to a few system calls beside their use,
//! each with its SAFETY note (the MLD socket's own, process and terminal calls).
//!
//! Receivers set `IPV6_MULTICAST_ALL` to 0, so a socket sees only the groups it joined
//! itself, and demultiplex by the tag in each packet. Unicast to the port (from any local
//! user, through `[::1]`) still reaches a socket bound to `[::]`, so every datagram comes
//! with its [`Envelope`] (`IPV6_PKTINFO`: destination and interface) and receivers act only
//! on multicast to the group a packet's tag belongs to, on their interface. Senders keep
//! multicast loop on, so that serve and mount work on one host over a veth pair.

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Bytes of IPv6 and UDP headers in front of every payload.
pub const IP_UDP_HEADERS: usize = 48;
/// Bytes a datagram adds on an Ethernet link: its IPv6 and UDP headers and the Ethernet
/// header, which traffic shapers and link rates count too.
pub const WIRE_OVERHEAD: usize = IP_UDP_HEADERS + 14;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no multicast-capable network interface is up; bring one up and pass --iface NAME")]
    NoInterface,
    #[error("several multicast-capable interfaces are up ({}): pass --iface NAME to choose one", .0.join(", "))]
    Ambiguous(Vec<String>),
    #[error("there is no network interface named {name:?} (interfaces that could carry lcfs: {})", list(.candidates))]
    Unknown {
        name: String,
        candidates: Vec<String>,
    },
    #[error("interface {0} is down: bring it up with `ip link set {0} up`")]
    Down(String),
    #[error("interface {0} cannot carry multicast (it is loopback or lacks the MULTICAST flag); lo carries no multicast: use a veth pair (see the README)")]
    NotMulticast(String),
    #[error("{what} on interface {iface}: {source}")]
    Socket {
        what: &'static str,
        iface: String,
        source: io::Error,
    },
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// A network interface lcfs sends or receives on.
#[derive(Clone, Debug)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub mtu: usize,
}

impl Iface {
    /// The largest UDP payload that leaves this interface unfragmented.
    pub fn max_payload(&self) -> usize {
        self.mtu.saturating_sub(IP_UDP_HEADERS).max(1232)
    }
}

// Interface facts come from the kernel through a socket (ioctl) and `if_nameindex`
// (netlink), both of which answer for the calling thread's network namespace.
// `/sys/class/net` does not: under `nsenter --net` it still shows the namespace sysfs
// was mounted in.

/// `SIOCGIFFLAGS` / `SIOCGIFMTU` on a throwaway socket; None if there is no such interface.
fn ifreq_ioctl(name: &str, request: libc::c_ulong) -> Option<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let sock = Socket::new(Domain::IPV6, Type::DGRAM, None)
        .or_else(|_| Socket::new(Domain::IPV4, Type::DGRAM, None))
        .ok()?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the fd is a valid socket and req a valid ifreq the kernel fills in.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut req) };
    (r == 0).then_some(req)
}

fn flags(name: &str) -> u32 {
    ifreq_ioctl(name, libc::SIOCGIFFLAGS)
        // SAFETY: SIOCGIFFLAGS fills ifru_flags.
        .map(|r| unsafe { r.ifr_ifru.ifru_flags } as u16 as u32)
        .unwrap_or(0)
}

fn mtu(name: &str) -> Option<usize> {
    ifreq_ioctl(name, libc::SIOCGIFMTU)
        // SAFETY: SIOCGIFMTU fills ifru_mtu.
        .map(|r| unsafe { r.ifr_ifru.ifru_mtu })
        .and_then(|m| usize::try_from(m).ok())
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn multicast_capable(name: &str) -> bool {
    let f = flags(name);
    f & libc::IFF_MULTICAST as u32 != 0 && f & libc::IFF_LOOPBACK as u32 == 0
}

pub(crate) fn is_up(name: &str) -> bool {
    flags(name) & libc::IFF_UP as u32 != 0
}

fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry (or NULL), which
    // we read and then free exactly once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            if let Ok(n) = std::ffi::CStr::from_ptr((*p).if_name).to_str() {
                names.push(n.to_owned());
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    names.dedup();
    names
}

/// Resolves `--iface`, or picks the only up, multicast-capable interface when none is named.
pub fn resolve_iface(name: Option<&str>) -> Result<Iface, NetError> {
    let candidates: Vec<String> = interface_names()
        .into_iter()
        .filter(|n| multicast_capable(n) && is_up(n))
        .collect();
    let name = match name {
        Some(n) => n.to_owned(),
        None => match candidates.as_slice() {
            [] => return Err(NetError::NoInterface),
            [one] => one.clone(),
            _ => return Err(NetError::Ambiguous(candidates)),
        },
    };
    let Some(index) = ifindex(&name) else {
        return Err(NetError::Unknown { name, candidates });
    };
    if !multicast_capable(&name) {
        return Err(NetError::NotMulticast(name));
    }
    if !is_up(&name) {
        return Err(NetError::Down(name));
    }
    let mtu = mtu(&name).unwrap_or(1500);
    Ok(Iface { name, index, mtu })
}

fn sock_err<'a>(what: &'static str, iface: &'a Iface) -> impl FnOnce(io::Error) -> NetError + 'a {
    move |source| NetError::Socket {
        what,
        iface: iface.name.clone(),
        source,
    }
}

fn udp_socket(iface: &Iface) -> Result<Socket, NetError> {
    Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))
        .map_err(sock_err("creating a UDP socket", iface))
}

/// A socket that sends multicast datagrams out of `iface`.
pub fn sender_socket(iface: &Iface, hops: u32) -> Result<Socket, NetError> {
    let s = udp_socket(iface)?;
    s.set_multicast_if_v6(iface.index)
        .map_err(sock_err("choosing the multicast interface", iface))?;
    s.set_multicast_hops_v6(hops)
        .map_err(sock_err("setting the multicast hop limit", iface))?;
    s.set_multicast_loop_v6(true)
        .map_err(sock_err("enabling multicast loop", iface))?;
    let _ = s.set_send_buffer_size(4 << 20);
    Ok(s)
}

/// A socket bound to `port` that receives the groups it joins on `iface`, and only those.
pub fn receiver_socket(iface: &Iface, port: u16) -> Result<Socket, NetError> {
    let s = udp_socket(iface)?;
    s.set_reuse_address(true)
        .map_err(sock_err("setting SO_REUSEADDR", iface))?;
    s.set_only_v6(true)
        .map_err(sock_err("setting IPV6_V6ONLY", iface))?;
    set_multicast_all(&s, false).map_err(sock_err("clearing IPV6_MULTICAST_ALL", iface))?;
    // Bursts of symbols outrun a reader briefly; a deep queue avoids loss in the socket.
    if set_rcvbuf_force(&s, 32 << 20).is_err() {
        let _ = s.set_recv_buffer_size(32 << 20);
    }
    let addr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    s.bind(&addr.into())
        .map_err(sock_err("binding the receive port", iface))?;
    // A busy reader waits in the receive call itself, for 5 ms at most; an idle one in
    // [`wait_readable`], where another thread can wake it.
    s.set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(sock_err("setting a receive timeout", iface))?;
    set_recv_pktinfo(&s).map_err(sock_err("setting IPV6_RECVPKTINFO", iface))?;
    // Best effort (Linux 5.0): without it each run is cut up again on the way in.
    let _ = set_int_opt(&s, SOL_UDP, UDP_GRO, 1);
    Ok(s)
}

fn set_int_opt(s: &Socket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and the length passed is exactly its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_multicast_all(s: &Socket, on: bool) -> io::Result<()> {
    set_int_opt(s, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_ALL, on as i32)
}

fn set_rcvbuf_force(s: &Socket, bytes: i32) -> io::Result<()> {
    set_int_opt(s, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
}

/// Sends datagram `packets[i]` to `dests[i]`, for every i, with as few system calls as
/// possible. Returns how many were sent; a full socket buffer ends the batch early.
pub fn send_batch(s: &Socket, dests: &[SocketAddrV6], packets: &[Vec<u8>]) -> io::Result<usize> {
    let addrs: Vec<SockAddr> = dests.iter().map(|d| SockAddr::from(*d)).collect();
    let mut iovs: Vec<libc::iovec> = packets
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(&addrs)
        .map(|(iov, addr)| {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = addr.len();
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    sendmmsg_all(s, &mut msgs)
}

/// Hands `msgs` to the kernel with as few sendmmsg calls as it takes; returns how many
/// messages went. A full socket buffer ends early; an error is returned only when nothing
/// went.
///
/// Every header must point at iovecs, an address and control data that outlive the call.
fn sendmmsg_all(s: &Socket, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < msgs.len() {
        // SAFETY: the caller's headers point at memory that lives until it returns.
        let rc = unsafe {
            libc::sendmmsg(
                s.as_raw_fd(),
                msgs[sent..].as_mut_ptr(),
                (msgs.len() - sent) as u32,
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Ok(sent),
                _ if sent > 0 => Ok(sent),
                _ => Err(e),
            };
        }
        sent += rc as usize;
    }
    Ok(sent)
}

/// `SOL_UDP`, and Linux's `UDP_GRO` socket option (`include/uapi/linux/udp.h`, Linux 5.0):
/// a run of same-sized datagrams (a GSO send of ours, or what a NIC's GRO merged) reaches the
/// socket as one datagram, with its segment size in a control message, instead of being cut
/// into single datagrams, each with its own buffer and queueing, on the way in. A receiver
/// of a tree of small files spent a third of its time per datagram in the kernel.
const SOL_UDP: libc::c_int = 17;
const UDP_GRO: libc::c_int = 104;

/// Linux's `UDP_SEGMENT` socket option (`include/uapi/linux/udp.h`, Linux 4.18), which the
/// libc crate defines for few targets.
const UDP_SEGMENT: libc::c_int = 103;
/// Segments in one GSO send at most (the kernel's `UDP_MAX_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 64;
/// Payload bytes of one GSO send at most: the UDP length field and the IPv6 payload length.
const GSO_MAX_BYTES: usize = 65_000;
/// Room for one control message carrying a u16, 8-byte aligned.
type Control = [u64; 4];

/// As [`send_batch`], with UDP generic segmentation offload (`UDP_SEGMENT`): each run of
/// packets of equal length to one destination goes to the kernel as one datagram that it
/// cuts into the same datagrams on the wire, so the stack is walked once per run, not once
/// per packet. A round of one object is such a run. Returns how many packets were sent;
/// an error means nothing of this call went out, and the caller may fall back to
/// [`send_batch`] (kernels and devices without UDP GSO answer EIO or EINVAL).
pub fn send_batch_gso(
    s: &Socket,
    dests: &[SocketAddrV6],
    packets: &[Vec<u8>],
) -> io::Result<usize> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < packets.len() {
        let len = packets[i].len().max(1);
        let most = (GSO_MAX_BYTES / len).clamp(1, GSO_MAX_SEGMENTS);
        let mut j = i + 1;
        while j < packets.len() && j - i < most && dests[j] == dests[i] && packets[j].len() == len {
            j += 1;
        }
        runs.push((i, j - i));
        i = j;
    }
    let addrs: Vec<SockAddr> = runs
        .iter()
        .map(|&(i, _)| SockAddr::from(dests[i]))
        .collect();
    let mut iovs: Vec<libc::iovec> = packets
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut controls: Vec<Control> = vec![[0; 4]; runs.len()];
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    let (space, len) = unsafe {
        let payload = std::mem::size_of::<u16>() as u32;
        (
            libc::CMSG_SPACE(payload) as usize,
            libc::CMSG_LEN(payload) as usize,
        )
    };
    debug_assert!(space <= std::mem::size_of::<Control>());
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(runs.len());
    for (r, &(start, count)) in runs.iter().enumerate() {
        // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_name = addrs[r].as_ptr() as *mut libc::c_void;
        m.msg_hdr.msg_namelen = addrs[r].len();
        m.msg_hdr.msg_iov = iovs[start..].as_mut_ptr();
        m.msg_hdr.msg_iovlen = count;
        if count > 1 {
            m.msg_hdr.msg_control = controls[r].as_mut_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_controllen = space;
            // SAFETY: the control buffer is `space` bytes, 8-byte aligned, and lives until
            // we return; CMSG_FIRSTHDR of a header with room for one message is not null.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = len;
                let size = packets[start].len() as u16;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, size);
            }
        }
        msgs.push(m);
    }
    let sent_msgs = sendmmsg_all(s, &mut msgs)?;
    Ok(runs[..sent_msgs].iter().map(|&(_, n)| n).sum())
}

/// Where a received datagram came from and where it was addressed, as the kernel saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The sender's address (attacker-chosen on a shared link: a hint, never a proof).
    pub from: Ipv6Addr,
    /// The destination address (`IPV6_PKTINFO`): a multicast group, or one of our own unicast
    /// addresses. `None` if the kernel gave no packet information.
    pub to: Option<Ipv6Addr>,
    /// The interface the datagram arrived on (0 if unknown).
    pub ifindex: u32,
}

impl Envelope {
    /// Whether this datagram was multicast to `group` and arrived on interface `ifindex`:
    /// the only datagrams a receiver may act on. Unicast, loopback and other interfaces are
    /// refused, so that no local user can feed a receiver through `[::1]:4242`.
    pub fn is_group(&self, group: &Ipv6Addr, ifindex: u32) -> bool {
        self.to.as_ref() == Some(group) && group.is_multicast() && self.ifindex == ifindex
    }
}

/// Control-message room for one `IPV6_PKTINFO` and one `UDP_GRO` (and slack for anything
/// else the kernel adds).
const CMSG_ROOM: usize = 128;

/// Reusable buffers for [`recv_batch`]. Buffers of 64 KiB take whole merged runs (`UDP_GRO`);
/// smaller ones drop them as truncated.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    /// Segment size of a merged run (`UDP_GRO`), 0 for a single datagram.
    segments: Vec<usize>,
    sources: Vec<libc::sockaddr_in6>,
    /// Control buffers as u64 words, so that the cmsg headers in them are aligned.
    controls: Vec<[u64; CMSG_ROOM / 8]>,
    envelopes: Vec<Envelope>,
}

impl RecvBatch {
    pub fn new(count: usize, size: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![vec![0; size]; count],
            lens: vec![0; count],
            segments: vec![0; count],
            // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
            sources: vec![unsafe { std::mem::zeroed() }; count],
            controls: vec![[0; CMSG_ROOM / 8]; count],
            envelopes: vec![
                Envelope {
                    from: Ipv6Addr::UNSPECIFIED,
                    to: None,
                    ifindex: 0,
                };
                count
            ],
        }
    }

    /// The datagrams received by the last call with their envelopes, as mutable slices
    /// (decryption is in place); a merged run is given as the datagrams it was made of.
    pub fn datagrams(&mut self) -> impl Iterator<Item = (Envelope, &mut [u8])> {
        self.bufs
            .iter_mut()
            .zip(&self.lens)
            .zip(&self.segments)
            .zip(&self.envelopes)
            .filter(|(((_, &n), _), _)| n > 0)
            .flat_map(|(((b, &n), &seg), env)| {
                let step = if seg > 0 { seg } else { n };
                b[..n].chunks_mut(step).map(|d| (*env, d))
            })
    }
}

/// Asks the kernel to tell, for every datagram `s` receives, its destination address and
/// arrival interface ([`Envelope`]).
pub fn set_recv_pktinfo(s: &Socket) -> io::Result<()> {
    set_int_opt(s, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
}

/// The `IPV6_PKTINFO` among the control messages of `m`, as (destination, interface), and
/// the segment size of a merged run (`UDP_GRO`; 0 if none).
fn control(m: &libc::msghdr) -> (Option<(Ipv6Addr, u32)>, usize) {
    let (mut info, mut segment) = (None, 0);
    // SAFETY: `m` was filled in by recvmmsg; its control pointer and length describe a buffer
    // we own, and the CMSG_* macros stay within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            let h = &*c;
            let fits = |len: usize| h.cmsg_len as usize >= libc::CMSG_LEN(len as u32) as usize;
            if h.cmsg_level == libc::IPPROTO_IPV6
                && h.cmsg_type == libc::IPV6_PKTINFO
                && fits(std::mem::size_of::<libc::in6_pktinfo>())
            {
                let i: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                info = Some((Ipv6Addr::from(i.ipi6_addr.s6_addr), i.ipi6_ifindex));
            } else if h.cmsg_level == SOL_UDP
                && h.cmsg_type == UDP_GRO
                && fits(std::mem::size_of::<libc::c_int>())
            {
                let n = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                segment = usize::try_from(n).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    (info, segment)
}

/// Receives up to a batch of datagrams, waiting at most the socket's read timeout for the
/// first. Returns how many arrived (0 on timeout).
pub fn recv_batch(s: &Socket, batch: &mut RecvBatch) -> io::Result<usize> {
    batch.lens.iter_mut().for_each(|n| *n = 0);
    let mut iovs: Vec<libc::iovec> = batch
        .bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(batch.sources.iter_mut())
        .zip(batch.controls.iter_mut())
        .map(|((iov, src), ctl)| {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (src as *mut libc::sockaddr_in6).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            m.msg_hdr.msg_control = ctl.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = CMSG_ROOM as _;
            m
        })
        .collect();
    // SAFETY: the headers point at buffers, addresses and control buffers owned by `batch`,
    // which outlive the call.
    let rc = unsafe {
        libc::recvmmsg(
            s.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as u32,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(0)
            }
            _ => Err(e),
        };
    }
    for (i, m) in msgs.iter().take(rc as usize).enumerate() {
        // A truncated datagram cannot be a whole packet: drop it rather than parse a prefix.
        batch.lens[i] = if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            0
        } else {
            m.msg_len as usize
        };
        let (info, segment) = control(&m.msg_hdr);
        batch.segments[i] = segment;
        batch.envelopes[i] = Envelope {
            from: Ipv6Addr::from(batch.sources[i].sin6_addr.s6_addr),
            to: info.map(|(to, _)| to),
            ifindex: info.map_or(0, |(_, i)| i),
        };
    }
    Ok(rc as usize)
}

/// Wakes a thread in [`wait_readable`] from another thread. An eventfd: a wake that comes
/// before the wait still ends it, so a waker never races the waiter.
#[derive(Debug)]
pub struct Wakeup(OwnedFd);

impl Wakeup {
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: eventfd takes no pointers; a descriptor it returns is ours alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Wakeup(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes the 8 bytes of `one`, which outlives the call. It fails only when
        // the counter is full, and a full counter is a wake still pending.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n`, which outlives the call.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// Waits until `s` has a datagram, `wake` is woken (which this clears), or `timeout`
/// passed, whichever comes first. True when `s` has a datagram (or an error to report).
pub fn wait_readable(s: &Socket, wake: Option<&Wakeup>, timeout: Duration) -> io::Result<bool> {
    let ready = poll_readable([Some(s.as_fd()), wake.map(|w| w.0.as_fd())], Some(timeout))?;
    if let Some(w) = wake.filter(|_| ready[1] & libc::POLLIN != 0) {
        w.clear();
    }
    // An error or hang-up on the socket counts as readable: the receive then reports it,
    // where a wait that saw only that would come back at once, again and again.
    Ok(ready[0] & (libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0)
}

/// poll(2) for reading on up to two descriptors (None: skipped) until one is ready or
/// `timeout` passed (None: no limit). Gives each one's `revents`: all zero when the time ran
/// out or a signal ended the wait, so callers look again.
pub fn poll_readable(
    fds: [Option<BorrowedFd<'_>>; 2],
    timeout: Option<Duration>,
) -> io::Result<[i16; 2]> {
    // poll skips a negative descriptor.
    let mut polled = fds.map(|fd| libc::pollfd {
        fd: fd.map_or(-1, |fd| fd.as_raw_fd()),
        events: libc::POLLIN,
        revents: 0,
    });
    // Rounded up: a wait that ended before its deadline would only come back to wait again.
    let ms = timeout.map_or(-1, |t| {
        t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
    });
    // SAFETY: `polled` is an array of two pollfd, valid for the call.
    let rc = unsafe { libc::poll(polled.as_mut_ptr(), 2, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        return Ok([0, 0]);
    }
    Ok(polled.map(|p| p.revents))
}

/// Joins or leaves `group` on `iface` for socket `s`.
pub fn set_membership(s: &Socket, group: &Ipv6Addr, iface: u32, join: bool) -> io::Result<()> {
    if join {
        s.join_multicast_v6(group, iface)
    } else {
        s.leave_multicast_v6(group, iface)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_refused_with_advice() {
        let e = resolve_iface(Some("lo")).unwrap_err();
        assert!(matches!(e, NetError::NotMulticast(_)));
        assert!(e.to_string().contains("veth"));
    }

    #[test]
    fn unknown_interface_names_itself() {
        let e = resolve_iface(Some("nosuchif0")).unwrap_err();
        assert!(e.to_string().contains("nosuchif0"), "{e}");
    }

    /// A receiving socket on lo, a sending one, and the receiver's address.
    fn loopback_pair() -> (Socket, Socket, SocketAddrV6) {
        let lo = Iface {
            name: "lo".into(),
            index: 1,
            mtu: 65536,
        };
        let rx = receiver_socket(&lo, 0).unwrap();
        let port = rx.local_addr().unwrap().as_socket_ipv6().unwrap().port();
        let tx = udp_socket(&lo).unwrap();
        (rx, tx, SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0))
    }

    /// The watcher's use: a descriptor with events, another that hangs up, one left out,
    /// and a wait whose time runs out.
    #[test]
    fn poll_readable_tells_which_descriptor_is_ready() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, d) = UnixStream::pair().unwrap();
        let short = Some(Duration::from_micros(1));
        assert_eq!(
            poll_readable([Some(b.as_fd()), None], short).unwrap(),
            [0, 0]
        );
        a.write_all(b"x").unwrap();
        let ready = poll_readable([Some(b.as_fd()), Some(d.as_fd())], None).unwrap();
        assert_ne!(ready[0] & libc::POLLIN, 0);
        assert_eq!(ready[1], 0);
        drop(c);
        let ready = poll_readable([None, Some(d.as_fd())], Some(Duration::ZERO)).unwrap();
        assert_eq!(ready[0], 0, "a left-out descriptor reports nothing");
        assert_ne!(ready[1], 0, "a hang-up is reported");
    }

    #[test]
    fn batch_round_trip_on_loopback_unicast() {
        let (rx, tx, dest) = loopback_pair();
        let packets: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100]).collect();
        assert_eq!(send_batch(&tx, &[dest; 5], &packets).unwrap(), 5);
        let mut batch = RecvBatch::new(8, 2048);
        let mut got = Vec::new();
        while got.len() < 5 {
            assert!(wait_readable(&rx, None, Duration::from_secs(5)).unwrap());
            assert!(recv_batch(&rx, &mut batch).unwrap() > 0);
            got.extend(batch.datagrams().map(|(env, d)| {
                assert_eq!(env.from, Ipv6Addr::LOCALHOST);
                // Unicast to ::1 on lo: never a group on our interface.
                assert_eq!(env.to, Some(Ipv6Addr::LOCALHOST));
                assert_eq!(env.ifindex, 1);
                assert!(!env.is_group(&Ipv6Addr::LOCALHOST, 1));
                d.to_vec()
            }));
        }
        assert_eq!(got, packets);
    }

    #[test]
    fn gso_batch_arrives_as_the_same_datagrams() {
        let (rx, tx, dest) = loopback_pair();
        // Runs of equal length (cut by the kernel), a change of length, a run longer than
        // one GSO send may carry, and a last odd one.
        let mut packets: Vec<Vec<u8>> = Vec::new();
        for i in 0..5u8 {
            packets.push(vec![i; 1200]);
        }
        for i in 0..3u8 {
            packets.push(vec![10 + i; 50]);
        }
        for i in 0..70u8 {
            packets.push(vec![100 + i; 900]);
        }
        packets.push(vec![255; 7]);
        let dests = vec![dest; packets.len()];
        assert_eq!(
            send_batch_gso(&tx, &dests, &packets).unwrap(),
            packets.len()
        );
        let mut batch = RecvBatch::new(16, 65536);
        let (mut got, mut calls) = (Vec::new(), 0);
        while got.len() < packets.len() {
            calls += recv_batch(&rx, &mut batch).unwrap();
            got.extend(batch.datagrams().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(got, packets);
        // The receiver asked for UDP_GRO: runs arrived merged, and were cut up again.
        assert!(
            calls < packets.len(),
            "{calls} datagrams for {} packets",
            packets.len()
        );
    }
}

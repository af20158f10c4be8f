//! The IO shell: a raw ICMPv6 socket on one interface and the thread that feeds MLD messages
//! to the [`ListenerTracker`] and the [`Querier`], sends the querier's queries and forwards
//! [`GroupEvent`]s to the server.
//!
//! The socket:
//! - `socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)`; EPERM/EACCES becomes [`MldError::Permission`].
//! - Bound to the interface (`SO_BINDTOIFINDEX`), so only that link's messages are seen.
//! - `ICMP6_FILTER` passes only types 130, 131, 132 and 143 (best effort; the parser also
//!   rejects everything else).
//! - Asks for each message's hop limit and hop-by-hop header: only messages with a link-local
//!   (or, for reports, `::`) source, hop limit 1 and a Router Alert option are believed
//!   ([`super::envelope`], RFC 3810 section 5); the others are counted in
//!   [`MldStats::untrusted`].
//! - A receive buffer of [`RECV_BUFFER`] bytes (best effort), so that a burst of reports queues
//!   while the thread is off the CPU rather than pushing real reports out.
//! - Joins `ff02::16` (where MLDv2 reports go) and `ff02::2` (where MLDv1 dones go). The kernel
//!   delivers a multicast packet only if the host is a member of its destination, so MLDv1
//!   reports (sent to the group itself) from other hosts are seen only for groups this host
//!   has joined too; Linux hosts speak MLDv2 unless an MLDv1 querier is on the link.
//! - Sends with hop limit 1 and a Router Alert hop-by-hop option (`IPV6_HOPOPTS`), to
//!   `ff02::1` on the interface; the kernel fills in the checksum and picks the link-local
//!   source (the destination is link-scoped). Queries wait until the interface has a
//!   non-tentative link-local address. The tracker's last-listener queries go to the group
//!   they ask about (RFC 3810 5.1.15), whenever the tracker hands one out.
//!
//! The thread wakes at least every `tick` (recv timeout) to check `shutdown` and run timers.
//! Own addresses are re-read from `/proc/net/if_inet6` every second. Malformed packets are
//! counted and logged at debug level, never fatal. What the tracker refuses is counted in
//! [`MldStats`] and said once at warning level, never per packet. The thread ends on
//! `shutdown` or when the event receiver is dropped.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, MaybeUninitSlice, MsgHdrMut, Protocol, SockAddr, Socket, Type};
use tracing::{debug, warn};

use super::envelope::{self, Checks, Distrust, Envelope};
use super::parse::{encode_query, encode_report, parse, GroupRecord, MldMessage, Query};
use super::parse::{RecordType, MLDV1_DONE, MLDV1_REPORT};
use super::parse::{MLDV2_REPORT, MLD_QUERY};
use super::querier::{Querier, QuerierConfig};
use super::tracker::{GroupEvent, ListenerTracker, TrackerConfig};
use super::MldError;

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ALL_MLDV2_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
/// `ICMP6_FILTER` from `<netinet/icmp6.h>` (level `IPPROTO_ICMPV6`); not in the libc crate.
const ICMP6_FILTER: libc::c_int = 1;
/// Hop-by-hop header: next header (kernel fills), length 0 (8 bytes), Router Alert (type 5,
/// length 2, value 0 = MLD), PadN (type 1, length 0).
const ROUTER_ALERT_HOPOPTS: [u8; 8] = [0, 0, 5, 2, 0, 0, 1, 0];
/// `IFA_F_TENTATIVE | IFA_F_DADFAILED` in `/proc/net/if_inet6`: not usable as a source.
const UNUSABLE_ADDR_FLAGS: u32 = 0x40 | 0x08;
const ADDRESS_REFRESH: Duration = Duration::from_secs(1);
const RECV_BUF: usize = 65536;
/// Control messages of one message: hop limit, and a hop-by-hop header of up to 2048 bytes.
const CONTROL_BUF: usize = 2304;
/// Socket receive buffer: about a thousand queued reports, 25 ms of a 40 000 a second flood.
const RECV_BUFFER: usize = 1 << 20;

/// Settings of the MLD listener thread.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Query timing; the tracker's listener expiry is derived from the same numbers.
    pub querier: QuerierConfig,
    /// Limits and last-listener queries of the tracker; its timing comes from `querier`.
    pub tracker: TrackerConfig,
    /// Receive timeout: the granularity of timers and of the shutdown check.
    pub tick: Duration,
    /// Counters, shared with whoever wants to read them.
    pub stats: Arc<MldStats>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            querier: QuerierConfig::default(),
            tracker: TrackerConfig::default(),
            tick: Duration::from_millis(50),
            stats: Arc::default(),
        }
    }
}

/// Counters of the MLD listener thread.
#[derive(Debug, Default)]
pub struct MldStats {
    /// MLDv1 reports and dones and MLDv2 reports received.
    pub reports: AtomicU64,
    /// Queries received (ours looped back included).
    pub queries_received: AtomicU64,
    /// General queries sent.
    pub queries_sent: AtomicU64,
    /// MLD messages that did not parse.
    pub malformed: AtomicU64,
    /// Packets ignored: not MLD, or from a source that is neither link-local nor `::`.
    pub ignored: AtomicU64,
    /// Queries the kernel refused to send.
    pub send_errors: AtomicU64,
    /// Messages dropped by the RFC 3810 section 5 checks (source, hop limit, Router Alert).
    pub untrusted: AtomicU64,
    /// Last-listener (multicast-address-specific) queries sent.
    pub specific_queries_sent: AtomicU64,
    /// Last-listener queries not sent because their rate limit was reached.
    pub specific_queries_limited: AtomicU64,
    /// New listeners refused because their group or the tracker was full.
    pub refused_listeners: AtomicU64,
    /// New groups refused because the tracker tracked as many as it may.
    pub refused_groups: AtomicU64,
    /// Groups some listener wants, as of the last census (about once a second).
    pub wanted_groups: AtomicU64,
    /// Distinct hosts listening to any group, as of the last census.
    pub listeners: AtomicU64,
}

impl MldStats {
    /// One line for the server's log.
    pub fn summary(&self) -> String {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "MLD: {} reports, {} queries received, {} general and {} last-listener queries sent \
             ({} rate limited); dropped {} malformed, {} ignored, {} untrusted; refused {} new \
             listeners and {} new groups (limits)",
            n(&self.reports),
            n(&self.queries_received),
            n(&self.queries_sent),
            n(&self.specific_queries_sent),
            n(&self.specific_queries_limited),
            n(&self.malformed),
            n(&self.ignored),
            n(&self.untrusted),
            n(&self.refused_listeners),
            n(&self.refused_groups),
        )
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Start the MLD thread on interface `iface` (an ifindex). `interest` says which groups are
/// objects of ours; transitions of those groups are sent on `events`. The thread ends when
/// `shutdown` is set (within one `config.tick`) or `events` is disconnected.
pub fn spawn_listener(
    iface: u32,
    config: ListenerConfig,
    interest: Arc<dyn Fn(&Ipv6Addr) -> bool + Send + Sync>,
    events: Sender<GroupEvent>,
    shutdown: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, MldError> {
    let name = iface_name(iface)?;
    let (sock, checks) = open_socket(iface, &name, config.tick)?;
    let now = Instant::now();
    let tracker_config = TrackerConfig {
        timing: config.querier.timing(),
        ..config.tracker
    };
    let tracker = ListenerTracker::new(tracker_config, Box::new(move |group| interest(group)));
    let shell = Shell {
        sock,
        checks,
        iface,
        name: name.clone(),
        tracker,
        querier: Querier::new(config.querier, now),
        tick: config.tick,
        stats: config.stats,
        events,
        shutdown,
        next_address_refresh: now,
        limits_reported: false,
        next_census: Instant::now(),
    };
    std::thread::Builder::new()
        .name(format!("lcfs-mld-{name}"))
        .spawn(move || shell.run())
        .map_err(io_error(&name, "starting the MLD thread"))
}

fn io_error<'a>(iface: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> MldError + 'a {
    move |source| MldError::Io {
        iface: iface.to_owned(),
        what,
        source,
    }
}

/// Checks that this process may open the raw ICMPv6 socket MLD needs, before any long work.
pub fn check_permission() -> Result<(), MldError> {
    match Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(MldError::Permission(e)),
        Err(_) => Ok(()),
    }
}

/// Records in one report: what fits the IPv6 minimum MTU (1280 bytes, less 40 of IPv6
/// header, 8 of hop-by-hop options and 8 of report header) at 20 bytes a record.
const RECORDS_PER_REPORT: usize = 60;

/// A receiver's own MLDv2 reports of its membership changes.
///
/// Linux sends the state-change report of a join or a leave two jiffies after the
/// interface's last membership change (8 to 15 ms measured here at HZ=250), and every further
/// change re-arms that timer. The server sends nothing before it hears of a join, and goes on
/// sending until it hears of the leave: every cold read paid the delay once per round trip,
/// and a busy receiver's leaves came 40 to 160 ms late. Sending the same reports ourselves,
/// right after the change, takes both delays out; the kernel's own reports follow and say the
/// same.
///
/// A leave is not reported for a group that another socket of this host also listens to
/// (another lcfs process on the same channel), which only the kernel knows: `/proc/net/igmp6`
/// lists each group's users. Formatting that file costs a tenth of a receiver's time if read
/// on every change, so it is read at most every [`SHARED_REFRESH`]; a group that became
/// shared since then is reported left, and the other process's stall rejoin (with its own
/// report) restores it within a stall period.
pub struct Reporter {
    sock: Socket,
    dest: SockAddr,
    iface: u32,
    /// Users of each group of the interface, and when that was read.
    users: std::sync::Mutex<(Option<Instant>, HashMap<Ipv6Addr, u32>)>,
}

/// How often [`Reporter`] rereads `/proc/net/igmp6`.
const SHARED_REFRESH: Duration = Duration::from_secs(1);

impl Reporter {
    /// A raw ICMPv6 socket that sends on interface `iface` and receives nothing. Needs
    /// CAP_NET_RAW ([`MldError::Permission`] without it).
    pub fn open(iface: u32) -> Result<Reporter, MldError> {
        let name = iface_name(iface)?;
        let sock = raw_sender(iface, &name)?;
        // This socket only sends: pass no type, so nothing queues up on it.
        set_icmp6_filter(&sock, &[]).map_err(io_error(&name, "setting ICMP6_FILTER"))?;
        let dest = SockAddr::from(SocketAddrV6::new(ALL_MLDV2_ROUTERS, 0, 0, iface));
        Ok(Reporter {
            sock,
            dest,
            iface,
            users: std::sync::Mutex::new((None, HashMap::new())),
        })
    }

    /// Reports `joined` as joined (CHANGE_TO_EXCLUDE_MODE, no sources) and those of `left`
    /// that this host no longer listens to as left (CHANGE_TO_INCLUDE_MODE, no sources), in
    /// as many reports as they need. Call it after the memberships changed.
    pub fn report(&self, joined: &[Ipv6Addr], left: &[Ipv6Addr]) -> io::Result<()> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        // Read now, after our leaves, one user left means another socket; read earlier,
        // while we were still joined, it takes two.
        let mut others = 2;
        if !left.is_empty() && users.0.is_none_or(|t| t.elapsed() >= SHARED_REFRESH) {
            let groups = std::fs::read_to_string("/proc/net/igmp6")
                .map(|t| group_users(&t, self.iface))
                .unwrap_or_default();
            *users = (Some(Instant::now()), groups);
            others = 1;
        }
        let shared = |g: &Ipv6Addr| users.1.get(g).is_some_and(|&n| n >= others);
        let records: Vec<GroupRecord> = joined
            .iter()
            .map(|&group| (RecordType::ChangeToExclude, group))
            .chain(
                left.iter()
                    .filter(|g| !shared(g))
                    .map(|&group| (RecordType::ChangeToInclude, group)),
            )
            .map(|(record_type, group)| GroupRecord {
                record_type,
                group,
                sources: Vec::new(),
            })
            .collect();
        for chunk in records.chunks(RECORDS_PER_REPORT) {
            self.sock.send_to(&encode_report(chunk), &self.dest)?;
        }
        Ok(())
    }
}

/// The groups that `/proc/net/igmp6` lists for interface `iface`, with their users (lines
/// of index, name, 32 hex digits of group, users, flags, timer).
fn group_users(igmp6: &str, iface: u32) -> HashMap<Ipv6Addr, u32> {
    igmp6
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let index: u32 = f.next()?.parse().ok()?;
            let hex = f.nth(1)?;
            let users: u32 = f.next()?.parse().ok()?;
            if index != iface || hex.len() != 32 {
                return None;
            }
            let group = u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)?;
            Some((group, users))
        })
        .collect()
}

/// A raw ICMPv6 socket bound to interface `iface` that sends MLD messages as RFC 3810 wants
/// them: hop limit 1, Router Alert, out of that interface.
fn raw_sender(iface: u32, name: &str) -> Result<Socket, MldError> {
    let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(|e| match e
        .kind()
    {
        io::ErrorKind::PermissionDenied => MldError::Permission(e),
        _ => io_error(name, "opening a raw ICMPv6 socket")(e),
    })?;
    sock.bind_device_by_index_v6(NonZeroU32::new(iface))
        .map_err(io_error(name, "binding the socket to the interface"))?;
    sock.set_multicast_if_v6(iface)
        .map_err(io_error(name, "setting IPV6_MULTICAST_IF"))?;
    sock.set_multicast_hops_v6(1)
        .map_err(io_error(name, "setting IPV6_MULTICAST_HOPS"))?;
    set_bytes_opt(
        &sock,
        libc::IPPROTO_IPV6,
        libc::IPV6_HOPOPTS,
        &ROUTER_ALERT_HOPOPTS,
    )
    .map_err(io_error(name, "setting the Router Alert option"))?;
    Ok(sock)
}

fn open_socket(iface: u32, name: &str, tick: Duration) -> Result<(Socket, Checks), MldError> {
    let sock = raw_sender(iface, name)?;
    let checks = ask_for_envelopes(&sock, name);
    raise_recv_buffer(&sock, name);
    let mld = [MLD_QUERY, MLDV1_REPORT, MLDV1_DONE, MLDV2_REPORT];
    if let Err(e) = set_icmp6_filter(&sock, &mld) {
        debug!(
            iface = name,
            "ICMP6_FILTER not set, parser filters instead: {e}"
        );
    }
    for group in [ALL_MLDV2_ROUTERS, ALL_ROUTERS] {
        sock.join_multicast_v6(&group, iface)
            .map_err(io_error(name, "joining ff02::16 and ff02::2"))?;
    }
    sock.set_read_timeout(Some(tick.max(Duration::from_millis(1))))
        .map_err(io_error(name, "setting the receive timeout"))?;
    Ok((sock, checks))
}

/// [`RECV_BUFFER`] bytes of receive buffer: past `net.core.rmem_max` with CAP_NET_ADMIN
/// (`SO_RCVBUFFORCE`), else as much as that limit allows.
fn raise_recv_buffer(sock: &Socket, name: &str) {
    let size = libc::c_int::try_from(RECV_BUFFER).unwrap_or(libc::c_int::MAX);
    let forced = set_bytes_opt(
        sock,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        &size.to_ne_bytes(),
    );
    if forced.is_err() {
        let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    }
    debug!(iface = name, size = ?sock.recv_buffer_size(), "MLD receive buffer");
}

/// Asks the kernel for each message's hop limit and hop-by-hop header; a check whose option
/// it refuses cannot be made.
fn ask_for_envelopes(sock: &Socket, name: &str) -> Checks {
    let on = 1 as libc::c_int;
    let enable = |opt, what| {
        let ok = set_bytes_opt(sock, libc::IPPROTO_IPV6, opt, &on.to_ne_bytes()).is_ok();
        if !ok {
            debug!(iface = name, "{what} refused: that MLD check is not made");
        }
        ok
    };
    Checks {
        hop_limit: enable(libc::IPV6_RECVHOPLIMIT, "IPV6_RECVHOPLIMIT"),
        router_alert: enable(libc::IPV6_RECVHOPOPTS, "IPV6_RECVHOPOPTS"),
    }
}

/// Passes only the ICMPv6 types in `pass`. Linux semantics: a set bit blocks that type.
fn set_icmp6_filter(sock: &Socket, pass: &[u8]) -> io::Result<()> {
    let mut words = [u32::MAX; 8];
    for &t in pass {
        if let Some(word) = words.get_mut(usize::from(t >> 5)) {
            *word &= !(1u32 << (t & 31));
        }
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    set_bytes_opt(sock, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &bytes)
}

fn set_bytes_opt(
    sock: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the fd is an open socket owned by `sock` for the whole call, and `value` points
    // to `len` readable bytes that the kernel only reads.
    let rc = unsafe { libc::setsockopt(sock.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn iface_name(index: u32) -> Result<String, MldError> {
    let mut buf: [libc::c_char; libc::IF_NAMESIZE] = [0; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write, NUL included.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return Err(MldError::NoInterface(index));
    }
    // SAFETY: a non-null result means `buf` now holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// The state machines and the socket, owned by the thread.
struct Shell {
    sock: Socket,
    /// Which RFC 3810 section 5 checks the socket lets us make.
    checks: Checks,
    iface: u32,
    name: String,
    tracker: ListenerTracker,
    querier: Querier,
    tick: Duration,
    stats: Arc<MldStats>,
    events: Sender<GroupEvent>,
    shutdown: Arc<AtomicBool>,
    next_address_refresh: Instant,
    /// The tracker's limits were reached and that was logged (once per run).
    limits_reported: bool,
    /// When to count groups and listeners again for [`MldStats`].
    next_census: Instant,
}

impl Shell {
    fn run(mut self) {
        let mut buf = vec![0u8; RECV_BUF];
        let mut control = vec![0u8; CONTROL_BUF];
        while !self.shutdown.load(Ordering::Relaxed) {
            if !self.on_timers(Instant::now()) {
                return;
            }
            let keep_going = match recv_envelope(&self.sock, &mut buf, &mut control) {
                Ok((len, envelope)) => {
                    let bytes = buf.get(..len).unwrap_or(&[]);
                    self.on_packet(Instant::now(), &envelope, bytes)
                }
                Err(e) => self.on_recv_error(&e),
            };
            if !keep_going {
                return;
            }
        }
        debug!(iface = %self.name, "MLD thread shut down");
    }

    /// Timers: address refresh, listener expiry, queries. False when events are unwanted.
    fn on_timers(&mut self, now: Instant) -> bool {
        if now >= self.next_address_refresh {
            self.next_address_refresh = now + ADDRESS_REFRESH;
            if !self.refresh_addresses() {
                return false;
            }
        }
        let expired = self.tracker.poll_expired(now);
        if !self.emit(expired) {
            return false;
        }
        if let Some(query) = self.querier.poll_transmit(now) {
            self.send_query(&query, ALL_NODES);
        }
        self.send_specific_queries();
        self.tracker.set_timing(self.querier.timing());
        self.publish_stats();
        true
    }

    /// The tracker's last-listener queries, each to the group it asks about. They carry our
    /// own robustness and query interval, like our general queries.
    fn send_specific_queries(&mut self) {
        let c = self.querier.config();
        let delay = self.tracker.config().last_listener_interval;
        while let Some(group) = self.tracker.poll_query() {
            let query = Query::address_specific(group, delay, c.robustness, c.query_interval);
            if self.send_query(&query, group) {
                bump(&self.stats.specific_queries_sent);
            }
        }
    }

    /// Copies the tracker's counters out, and says once that its limits were reached.
    fn publish_stats(&mut self) {
        let t = self.tracker.stats();
        let s = &self.stats;
        s.refused_listeners
            .store(t.refused_listeners, Ordering::Relaxed);
        s.refused_groups.store(t.refused_groups, Ordering::Relaxed);
        s.specific_queries_limited
            .store(t.specific_queries_limited, Ordering::Relaxed);
        let now = Instant::now();
        if now >= self.next_census {
            self.next_census = now + Duration::from_secs(1);
            let (wanted, listeners) = self.tracker.census();
            s.wanted_groups.store(wanted as u64, Ordering::Relaxed);
            s.listeners.store(listeners as u64, Ordering::Relaxed);
        }
        if !self.limits_reported && t.refused_listeners + t.refused_groups > 0 {
            self.limits_reported = true;
            let c = self.tracker.config();
            warn!(
                iface = %self.name,
                "MLD listener limits reached ({} per group, {} in all, {} groups): new \
                 listeners are refused and counted, the ones known are kept",
                c.max_listeners_per_group, c.max_listeners, c.max_groups
            );
        }
    }

    fn refresh_addresses(&mut self) -> bool {
        let text = match std::fs::read_to_string("/proc/net/if_inet6") {
            Ok(text) => text,
            Err(e) => {
                debug!(iface = %self.name, "reading /proc/net/if_inet6: {e}");
                String::new()
            }
        };
        let own = usable_addresses(&text, self.iface);
        let link_local = own.iter().copied().find(Ipv6Addr::is_unicast_link_local);
        self.querier.set_own_address(link_local);
        let events = self.tracker.set_own_addresses(&own);
        self.emit(events)
    }

    fn on_packet(&mut self, now: Instant, envelope: &Envelope, bytes: &[u8]) -> bool {
        let from = match envelope::check(envelope, self.checks) {
            Ok(from) => from,
            Err(why) => {
                self.on_untrusted(envelope, why);
                return true;
            }
        };
        match parse(bytes) {
            Ok(MldMessage::Query(query)) => {
                bump(&self.stats.queries_received);
                self.querier.handle_query(now, from, &query);
                self.tracker.set_timing(self.querier.timing());
                true
            }
            Ok(msg) => {
                bump(&self.stats.reports);
                let events = self.tracker.handle_message(now, from, &msg);
                self.emit(events)
            }
            Err(e) => {
                self.on_parse_error(from, &e);
                true
            }
        }
    }

    fn on_untrusted(&self, envelope: &Envelope, why: Distrust) {
        if why == Distrust::Source {
            // Not MLD's business at all (our socket sees every ICMPv6 type it lets through).
            bump(&self.stats.ignored);
        } else {
            bump(&self.stats.untrusted);
        }
        debug!(iface = %self.name, ?envelope, ?why, "MLD message not believed");
    }

    fn on_parse_error(&self, from: Ipv6Addr, e: &MldError) {
        if let MldError::NotMld(_) = e {
            bump(&self.stats.ignored);
        } else {
            bump(&self.stats.malformed);
            debug!(iface = %self.name, %from, "malformed MLD message: {e}");
        }
    }

    fn on_recv_error(&self, e: &io::Error) -> bool {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {}
            _ => {
                warn!(iface = %self.name, "MLD receive failed: {e}");
                std::thread::sleep(self.tick);
            }
        }
        true
    }

    /// Sends `query` to `to`; false if the kernel refused (counted, and logged at warning
    /// level for general queries only: specific ones follow leaves anyone can forge).
    fn send_query(&self, query: &Query, to: Ipv6Addr) -> bool {
        let bytes = encode_query(query);
        let dst = SockAddr::from(SocketAddrV6::new(to, 0, 0, self.iface));
        match self.sock.send_to(&bytes, &dst) {
            Ok(_) if query.is_general() => {
                bump(&self.stats.queries_sent);
                true
            }
            Ok(_) => true,
            Err(e) if query.is_general() => {
                bump(&self.stats.send_errors);
                warn!(iface = %self.name, "sending MLD query failed: {e}");
                false
            }
            Err(e) => {
                bump(&self.stats.send_errors);
                debug!(iface = %self.name, %to, "sending MLD query failed: {e}");
                false
            }
        }
    }

    /// Forward events; false when the receiver is gone.
    fn emit(&self, events: Vec<GroupEvent>) -> bool {
        for event in events {
            debug!(iface = %self.name, ?event, "MLD group transition");
            if self.events.send(event).is_err() {
                debug!(iface = %self.name, "event receiver dropped, MLD thread ends");
                return false;
            }
        }
        true
    }
}

/// Receives one message into `buf`, with what the kernel says about it.
fn recv_envelope(
    sock: &Socket,
    buf: &mut [u8],
    control: &mut [u8],
) -> io::Result<(usize, Envelope)> {
    // SAFETY: MaybeUninit<u8> has the layout of u8, and recvmsg only ever writes initialized
    // bytes into these slices, so `buf` and `control` stay initialized.
    let data = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    // SAFETY: as above.
    let ctrl = unsafe { &mut *(control as *mut [u8] as *mut [MaybeUninit<u8>]) };
    let mut addr = SockAddr::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
    let mut bufs = [MaybeUninitSlice::new(data)];
    let mut msg = MsgHdrMut::new()
        .with_addr(&mut addr)
        .with_buffers(&mut bufs)
        .with_control(ctrl);
    let len = sock.recvmsg(&mut msg, 0)?;
    let control_len = msg.control_len();
    let (hop_limit, router_alert) =
        envelope::parse_control(control.get(..control_len).unwrap_or(&[]));
    let from = addr.as_socket_ipv6().map(|a| *a.ip());
    let envelope = Envelope {
        from,
        hop_limit,
        router_alert,
    };
    Ok((len, envelope))
}

/// The non-tentative addresses of interface `iface` in `/proc/net/if_inet6` text
/// (`address ifindex prefixlen scope flags name`, hexadecimal fields).
fn usable_addresses(if_inet6: &str, iface: u32) -> Vec<Ipv6Addr> {
    if_inet6
        .lines()
        .filter_map(parse_if_inet6_line)
        .filter(|&(_, index, flags)| index == iface && flags & UNUSABLE_ADDR_FLAGS == 0)
        .map(|(addr, _, _)| addr)
        .collect()
}

fn parse_if_inet6_line(line: &str) -> Option<(Ipv6Addr, u32, u32)> {
    let mut fields = line.split_whitespace();
    let hex = fields.next().filter(|h| h.len() == 32)?;
    let addr = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
    let index = u32::from_str_radix(fields.next()?, 16).ok()?;
    let _prefix_len = fields.next()?;
    let _scope = fields.next()?;
    let flags = u32::from_str_radix(fields.next()?, 16).ok()?;
    Some((addr, index, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_group_users_of_one_interface() {
        let text = "1    lo              ff020000000000000000000000000001     1 0000000C 0\n\
                    2    lc0             ff1e8530e7978c2f4115c11888ce8b0c     2 00000004 0\n\
                    2    lc0             ff020000000000000000000000000001     1 0000000C 0\n\
                    3    eth0            ff1e8530e7978c2f4115c11888ce8b0c     1 00000004 0\n\
                    2    lc0             not-hex\n";
        let g: Ipv6Addr = "ff1e:8530:e797:8c2f:4115:c118:88ce:8b0c".parse().unwrap();
        let users = group_users(text, 2);
        assert_eq!(users.len(), 2);
        assert_eq!((users[&g], users[&ALL_NODES]), (2, 1));
        assert!(group_users(text, 9).is_empty());
    }

    #[test]
    fn if_inet6_parsing() {
        let text = "\
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fe800000000000000000000000000009 104 40 20 c0     veth9
fe80000000000000000000000000000a 04 40 20 c0     eth0
garbage line
fe80 04 40 20 80 short";
        let eth0 = usable_addresses(text, 4);
        assert_eq!(
            eth0,
            [
                "fd00::2".parse::<Ipv6Addr>().unwrap(),
                "fe80::fc:ff:fe00:1".parse().unwrap(),
            ],
            "the tentative fe80::a is left out"
        );
        assert!(usable_addresses(text, 0x104).is_empty(), "tentative only");
        assert!(usable_addresses("", 4).is_empty());
    }

    #[test]
    fn missing_interface_is_an_error() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let r = spawn_listener(
            0,
            ListenerConfig::default(),
            Arc::new(|_| true),
            tx,
            Arc::default(),
        );
        assert!(matches!(r, Err(MldError::NoInterface(0))));
    }

    /// Real-socket smoke test: the listener's whole lifecycle against the kernel's own MLD,
    /// local and remote. Needs root (as CI has: `tools/test` runs as root), creates its own veth
    /// pair `lcm0`/`lcm1` (the peer in network namespace `lcm-mld`) and deletes them
    /// afterwards; sends only on `lcm0`. Watch with `tcpdump -ni lcm0 icmp6`.
    #[test]
    fn smoke_veth() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test creates a veth pair and a network namespace: run the tests as root (tools/test)"
        );
        let _lab = Lab::create();
        let ifindex = Lab::ifindex("lcm0");
        let group: Ipv6Addr = "ff1e::1234".parse().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let shutdown = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(MldStats::default());
        let querier = QuerierConfig {
            query_interval: Duration::from_secs(2),
            max_response_delay: Duration::from_millis(500),
            startup_query_interval: Duration::from_millis(500),
            ..QuerierConfig::default()
        };
        let config = ListenerConfig {
            querier,
            stats: stats.clone(),
            ..ListenerConfig::default()
        };
        let interest = Arc::new(move |g: &Ipv6Addr| *g == group);
        let handle = spawn_listener(ifindex, config, interest, tx, shutdown.clone()).unwrap();
        let wait = |what: &str| {
            let got = rx.recv_timeout(Duration::from_secs(5));
            eprintln!("{what}: {got:?} after stats {stats:?}");
            got.unwrap()
        };

        // Same host, multicast loop: join on lcm0 itself.
        let local = Socket::new(Domain::IPV6, Type::DGRAM, None).unwrap();
        local.join_multicast_v6(&group, ifindex).unwrap();
        assert_eq!(wait("local join"), GroupEvent::Active(group));
        let reports = stats.reports.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(7)); // > listener interval of 4.5 s
        assert!(
            rx.try_recv().is_err(),
            "queries keep the local listener alive"
        );
        eprintln!(
            "reports during 7 s: {}",
            stats.reports.load(Ordering::Relaxed) - reports
        );
        drop(local);
        assert_eq!(wait("local leave"), GroupEvent::Leaving(group));
        assert_eq!(wait("no answer"), GroupEvent::Inactive(group));

        // Another host: a process in the peer namespace joins on lcm1.
        let mut remote = Lab::remote_joiner("lcm1", group);
        assert_eq!(wait("remote join"), GroupEvent::Active(group));
        std::thread::sleep(Duration::from_secs(7));
        assert!(
            rx.try_recv().is_err(),
            "queries keep the remote listener alive"
        );
        remote.kill().unwrap();
        remote.wait().unwrap();
        assert_eq!(wait("remote leave"), GroupEvent::Leaving(group));
        assert_eq!(wait("no answer"), GroupEvent::Inactive(group));

        shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        eprintln!("final stats {stats:?}");
        assert!(stats.queries_sent.load(Ordering::Relaxed) >= 4);
        assert!(stats.specific_queries_sent.load(Ordering::Relaxed) >= 2);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
        assert_eq!(
            stats.untrusted.load(Ordering::Relaxed),
            0,
            "real MLD messages pass the RFC 3810 section 5 checks"
        );
    }

    /// The veth pair and namespace of the smoke test, removed on drop.
    struct Lab;

    impl Lab {
        fn create() -> Self {
            Self::cleanup();
            let lab = Lab;
            for cmd in [
                "ip netns add lcm-mld",
                "ip link add lcm0 type veth peer name lcm1",
                "ip link set lcm1 netns lcm-mld",
                "sysctl -qw net.ipv6.conf.lcm0.accept_dad=0",
                "ip netns exec lcm-mld sysctl -qw net.ipv6.conf.lcm1.accept_dad=0",
                "ip link set lcm0 up",
                "ip netns exec lcm-mld ip link set lcm1 up",
            ] {
                Self::sh(cmd);
            }
            std::thread::sleep(Duration::from_millis(300));
            lab
        }

        fn sh(cmd: &str) {
            let args: Vec<&str> = cmd.split_whitespace().collect();
            let status = std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap();
            assert!(status.success(), "{cmd} failed");
        }

        fn ifindex(name: &str) -> u32 {
            let path = format!("/sys/class/net/{name}/ifindex");
            std::fs::read_to_string(path)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }

        fn remote_joiner(iface: &str, group: Ipv6Addr) -> std::process::Child {
            let script = format!(
                "import socket,struct,time\n\
                 s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
                 m=socket.inet_pton(socket.AF_INET6,'{group}')+struct.pack('@I',socket.if_nametoindex('{iface}'))\n\
                 s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_JOIN_GROUP,m)\n\
                 time.sleep(60)\n"
            );
            std::process::Command::new("ip")
                .args(["netns", "exec", "lcm-mld", "python3", "-c", &script])
                .spawn()
                .unwrap()
        }

        fn cleanup() {
            for cmd in [
                ["ip", "link", "del", "lcm0"],
                ["ip", "netns", "del", "lcm-mld"],
            ] {
                let _ = std::process::Command::new(cmd[0])
                    .args(&cmd[1..])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            Self::cleanup();
        }
    }
}

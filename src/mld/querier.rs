//! The MLD querier state machine (RFC 3810 section 7.6, simplified to general queries).
//!
//! lcfs queries so that listeners that vanish without a done expire, and so that MLD-snooping
//! switches (which forward reports only towards queriers) forward reports to the server.
//!
//! - At start: `startup_query_count` general queries `startup_query_interval` apart, then one
//!   every `query_interval`. The first one is due at once.
//! - A query from a numerically lower link-local address than ours means another querier wins
//!   the election: we stay quiet until [`MldTiming::other_querier_present_interval`] passes
//!   without one, then query again at once. Queries from our own address (multicast loop),
//!   from higher addresses and from non-link-local sources are ignored.
//! - While another querier is present, its timing (QRV, QQIC and max response delay of its
//!   general queries; RFC defaults of 2 and 125 s for an MLDv1 querier) is the effective timing
//!   returned by [`Querier::timing`]: the tracker must expire listeners by the querier that
//!   actually asks them, not by ours.
//! - Adopted timers are clamped ([`clamp_adopted`]): anyone on the link can send a query from
//!   `fe80::1`, and one announcing the largest QRV (7), QQIC (31744 s) and response delay
//!   (8387 s) would otherwise keep every listener, forged ones included, for 61 hours and
//!   silence our queries as long. The ceilings are RFC 3810's defaults (9.1, 9.2, 9.3:
//!   robustness 2, query interval 125 s, response delay 10 s), what real routers announce: a
//!   listener is kept at most 2 * 125 + 10 = 260 s after its last report, and a lower querier
//!   silences ours at most 2 * 125 + 5 = 255 s after its last query, computed from the
//!   clamped values. The floors are our own values, so that a query announcing tiny timers
//!   cannot expire real listeners before anyone asked them again.
//! - Only queries that passed the shell's checks reach [`Querier::handle_query`] (a
//!   link-local source, hop limit 1 and a Router Alert option, RFC 3810 section 5).
//! - Without a known own link-local address nothing is sent (queries must come from one) and
//!   every other querier is deferred to.
//!
//! Sans-IO: `now` is a parameter; inputs `handle_query`, outputs `poll_transmit`, `poll_timeout`.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::parse::Query;
use super::tracker::TrackerConfig;
use super::MldTiming;

/// RFC 2710 default query interval, assumed for an MLDv1 querier (its queries carry no QQIC).
const MLDV1_QUERY_INTERVAL: Duration = Duration::from_secs(125);

/// The largest timing adopted from another querier: RFC 3810's defaults.
const MAX_ADOPTED: MldTiming = MldTiming {
    robustness: 2,
    query_interval: Duration::from_secs(125),
    max_response_delay: Duration::from_secs(10),
};

/// `timing` announced by another querier, held between `ours` and the larger of `ours` and
/// [`MAX_ADOPTED`].
pub fn clamp_adopted(timing: MldTiming, ours: MldTiming) -> MldTiming {
    fn within<T: Ord + Copy>(v: T, lo: T, hi: T) -> T {
        v.clamp(lo, hi.max(lo))
    }
    MldTiming {
        robustness: within(timing.robustness, ours.robustness, MAX_ADOPTED.robustness),
        query_interval: within(
            timing.query_interval,
            ours.query_interval,
            MAX_ADOPTED.query_interval,
        ),
        max_response_delay: within(
            timing.max_response_delay,
            ours.max_response_delay,
            MAX_ADOPTED.max_response_delay,
        ),
    }
}

/// Querier settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuerierConfig {
    /// Interval between general queries (far below the RFC's 125 s, so listeners expire fast).
    pub query_interval: Duration,
    /// Maximum response delay asked for in general queries; must be below `query_interval`.
    pub max_response_delay: Duration,
    /// Robustness variable: queries a listener may miss, and the QRV we announce.
    pub robustness: u8,
    /// General queries sent at start, `startup_query_interval` apart.
    pub startup_query_count: u32,
    /// Interval between the startup queries.
    pub startup_query_interval: Duration,
}

impl Default for QuerierConfig {
    fn default() -> Self {
        let timing = MldTiming::default();
        Self {
            query_interval: timing.query_interval,
            max_response_delay: timing.max_response_delay,
            robustness: timing.robustness,
            startup_query_count: 2,
            startup_query_interval: timing.query_interval / 4,
        }
    }
}

impl QuerierConfig {
    /// The timing these settings give; the tracker's listener expiry must use the same.
    pub fn timing(&self) -> MldTiming {
        MldTiming {
            robustness: self.robustness,
            query_interval: self.query_interval,
            max_response_delay: self.max_response_delay,
        }
    }

    /// A tracker configuration whose listener expiry matches these query settings.
    pub fn tracker_config(&self) -> TrackerConfig {
        TrackerConfig {
            timing: self.timing(),
            ..TrackerConfig::default()
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct OtherQuerier {
    addr: Ipv6Addr,
    expires: Instant,
    timing: MldTiming,
}

/// Decides when to send general queries.
#[derive(Debug)]
pub struct Querier {
    config: QuerierConfig,
    own: Option<Ipv6Addr>,
    startup_left: u32,
    next_query: Instant,
    other: Option<OtherQuerier>,
}

impl Querier {
    /// A querier starting at `now`, its first query due at once (once the own address is known).
    pub fn new(config: QuerierConfig, now: Instant) -> Self {
        Self {
            config,
            own: None,
            startup_left: config.startup_query_count,
            next_query: now,
            other: None,
        }
    }

    /// The settings this querier was made with.
    pub fn config(&self) -> &QuerierConfig {
        &self.config
    }

    /// Our link-local address on the link, or `None` while it is unknown.
    pub fn set_own_address(&mut self, own: Option<Ipv6Addr>) {
        self.own = own;
    }

    /// A query received from `from`.
    pub fn handle_query(&mut self, now: Instant, from: Ipv6Addr, query: &Query) {
        if !from.is_unicast_link_local() || Some(from) == self.own {
            return;
        }
        if self.own.is_some_and(|own| from > own) {
            return;
        }
        let previous = self.other.map(|o| o.timing);
        let timing = self.adopted_timing(query, previous);
        self.other = Some(OtherQuerier {
            addr: from,
            expires: now + timing.other_querier_present_interval(),
            timing,
        });
    }

    /// A general query to send now, if one is due and we are the querier.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Query> {
        self.expire_other(now);
        if self.other.is_some() || self.own.is_none() || now < self.next_query {
            return None;
        }
        self.startup_left = self.startup_left.saturating_sub(1);
        let wait = if self.startup_left > 0 {
            self.config.startup_query_interval
        } else {
            self.config.query_interval
        };
        self.next_query = now + wait;
        let c = &self.config;
        Some(Query::general(
            c.max_response_delay,
            c.robustness,
            c.query_interval,
        ))
    }

    /// When `poll_transmit` should next be called; `None` while nothing can happen (no own
    /// address and no other querier to expire).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.other, self.own) {
            (Some(other), _) => Some(other.expires),
            (None, Some(_)) => Some(self.next_query),
            (None, None) => None,
        }
    }

    /// True when no other querier is present and we would send queries.
    pub fn is_querier(&self) -> bool {
        self.other.is_none() && self.own.is_some()
    }

    /// The other querier we defer to, if one is present.
    pub fn other_querier(&self) -> Option<Ipv6Addr> {
        self.other.map(|o| o.addr)
    }

    /// The effective timing on the link: the other querier's while one is present, else ours.
    pub fn timing(&self) -> MldTiming {
        self.other.map_or(self.config.timing(), |o| o.timing)
    }

    fn expire_other(&mut self, now: Instant) {
        if let Some(other) = self.other {
            if now >= other.expires {
                self.other = None;
                self.next_query = self.next_query.min(now);
            }
        }
    }

    /// RFC 3810 9.1/9.2: adopt QRV and QQI of the querier's general queries when non-zero,
    /// clamped. Address-specific queries keep what was adopted before.
    fn adopted_timing(&self, query: &Query, previous: Option<MldTiming>) -> MldTiming {
        let ours = self.config.timing();
        if !query.is_general() {
            return previous.unwrap_or(ours);
        }
        let (robustness, query_interval) = match &query.v2 {
            Some(v2) => (
                if v2.qrv == 0 { ours.robustness } else { v2.qrv },
                match v2.query_interval() {
                    Duration::ZERO => ours.query_interval,
                    qi => qi,
                },
            ),
            None => (ours.robustness, MLDV1_QUERY_INTERVAL),
        };
        let announced = MldTiming {
            robustness,
            query_interval,
            max_response_delay: query.max_response_delay(),
        };
        clamp_adopted(announced, ours)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x50);
    const LOWER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
    const HIGHER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x90);
    const GLOBAL_LOWER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn querier(now: Instant) -> Querier {
        let mut q = Querier::new(QuerierConfig::default(), now);
        q.set_own_address(Some(OWN));
        q
    }

    /// Times (seconds after `start`) at which queries go out, polling every 10 ms until `end`.
    fn send_times(q: &mut Querier, start: Instant, end: f64) -> Vec<f64> {
        let mut out = Vec::new();
        for tick in 0..=(end * 100.0) as u32 {
            let now = start + Duration::from_millis(u64::from(tick) * 10);
            if q.poll_transmit(now).is_some() {
                out.push((now - start).as_secs_f64());
            }
        }
        out
    }

    fn general_v2(qrv: u8, qi_secs: u64) -> Query {
        Query::general(Duration::from_secs(2), qrv, Duration::from_secs(qi_secs))
    }

    #[test]
    fn startup_then_interval() {
        let start = Instant::now();
        let mut q = querier(start);
        assert_eq!(q.poll_timeout(), Some(start));
        let sent = q.poll_transmit(start).unwrap();
        assert!(sent.is_general());
        assert_eq!(sent.max_response_delay(), Duration::from_secs(1));
        let v2 = sent.v2.unwrap();
        assert_eq!((v2.qrv, v2.query_interval()), (2, Duration::from_secs(5)));
        assert_eq!(q.poll_timeout(), Some(start + secs(1.25)));
        assert_eq!(send_times(&mut q, start, 17.0), [1.25, 6.25, 11.25, 16.25]);
    }

    #[test]
    fn nothing_without_own_address() {
        let start = Instant::now();
        let mut q = Querier::new(QuerierConfig::default(), start);
        assert_eq!(q.poll_timeout(), None);
        assert!(q.poll_transmit(start).is_none());
        q.set_own_address(Some(OWN));
        assert!(q.poll_transmit(start + secs(3.0)).is_some());
    }

    #[test]
    fn lower_querier_suppresses_until_it_expires() {
        let start = Instant::now();
        let mut q = querier(start);
        assert!(q.poll_transmit(start).is_some());
        q.handle_query(start + secs(0.5), LOWER, &general_v2(0, 0));
        assert!(!q.is_querier());
        assert_eq!(q.other_querier(), Some(LOWER));
        // QRV and QQIC 0: our 2 and 5 s; its max response delay 2 s: 2 * 5 + 2 / 2 = 11 s.
        assert_eq!(q.poll_timeout(), Some(start + secs(11.5)));
        assert_eq!(send_times(&mut q, start, 20.0), [11.5, 16.5]);
        assert!(q.is_querier());
    }

    #[test]
    fn repeated_lower_queries_keep_us_quiet() {
        let start = Instant::now();
        let mut q = querier(start);
        for i in 0..6 {
            q.handle_query(start + secs(f64::from(i) * 5.0), LOWER, &general_v2(0, 0));
        }
        // Quiet until 25 + 11 s; the startup queries we never sent then follow.
        assert_eq!(send_times(&mut q, start, 40.0), [36.0, 37.25]);
    }

    #[test]
    fn own_higher_and_global_queries_are_ignored() {
        let start = Instant::now();
        let mut q = querier(start);
        for from in [OWN, HIGHER, GLOBAL_LOWER, Ipv6Addr::UNSPECIFIED] {
            q.handle_query(start, from, &general_v2(2, 5));
        }
        assert!(q.is_querier());
        assert_eq!(send_times(&mut q, start, 7.0), [0.0, 1.25, 6.25]);
    }

    #[test]
    fn unknown_own_address_defers_to_anyone() {
        let start = Instant::now();
        let mut q = Querier::new(QuerierConfig::default(), start);
        q.handle_query(start, HIGHER, &general_v2(2, 5));
        assert_eq!(q.other_querier(), Some(HIGHER));
    }

    #[test]
    fn timing_is_adopted_from_the_other_querier() {
        let start = Instant::now();
        let mut q = querier(start);
        assert_eq!(q.timing(), QuerierConfig::default().timing());
        q.handle_query(start, LOWER, &general_v2(3, 60));
        let adopted = MldTiming {
            robustness: 2,
            query_interval: Duration::from_secs(60),
            max_response_delay: Duration::from_secs(2),
        };
        assert_eq!(q.timing(), adopted, "QRV 3 is held to 2");
        assert_eq!(q.poll_timeout(), Some(start + secs(121.0)));
        let specific = Query::address_specific(
            Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 1),
            Duration::from_millis(100),
            2,
            Duration::from_secs(5),
        );
        q.handle_query(start + secs(1.0), LOWER, &specific);
        assert_eq!(q.timing(), adopted, "specific queries refresh, not adopt");
        assert!(q.poll_transmit(start + secs(122.0)).is_some());
        assert_eq!(q.timing(), QuerierConfig::default().timing());
    }

    /// The forged query: the largest timers MLD can carry, from below our address.
    #[test]
    fn forged_timers_are_clamped() {
        let start = Instant::now();
        let mut q = querier(start);
        let forged = Query {
            max_response_code: 0xffff,
            group: Ipv6Addr::UNSPECIFIED,
            v2: Some(crate::mld::QueryV2 {
                suppress_router_side: false,
                qrv: 7,
                qqic: 0xff,
                sources: Vec::new(),
            }),
        };
        assert!(forged.max_response_delay() > Duration::from_secs(8000));
        assert_eq!(forged.v2.as_ref().unwrap().query_interval(), secs(31744.0));
        assert!(q.poll_transmit(start).is_some());
        q.handle_query(start, LOWER, &forged);
        assert_eq!(q.timing(), MAX_ADOPTED);
        assert_eq!(q.timing().listener_interval(), secs(260.0));
        assert_eq!(q.poll_timeout(), Some(start + secs(255.0)));
        assert!(q.poll_transmit(start + secs(254.9)).is_none());
        assert!(
            q.poll_transmit(start + secs(255.0)).is_some(),
            "we query again"
        );
    }

    #[test]
    fn tiny_timers_are_raised_to_ours() {
        let start = Instant::now();
        let mut q = querier(start);
        let tiny = Query::general(Duration::ZERO, 1, Duration::from_secs(1));
        q.handle_query(start, LOWER, &tiny);
        assert_eq!(q.timing(), QuerierConfig::default().timing());
    }

    #[test]
    fn mldv1_querier_gets_rfc_defaults() {
        let start = Instant::now();
        let mut q = querier(start);
        let v1 = Query {
            max_response_code: 10_000,
            group: Ipv6Addr::UNSPECIFIED,
            v2: None,
        };
        q.handle_query(start, LOWER, &v1);
        assert_eq!(q.timing().query_interval, Duration::from_secs(125));
        assert_eq!(q.timing().listener_interval(), Duration::from_secs(260));
    }
}

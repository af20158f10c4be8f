//! MLD (Multicast Listener Discovery, RFC 2710 and RFC 3810): how the server learns who listens.
//!
//! The server sends an object only while some host on the link has joined that object's group.
//! It never receives requests; MLD reports are its only input. This module turns reports into
//! [`GroupEvent`]s and keeps the link's listeners honest by acting as MLD querier.
//!
//! Layout, sans-IO core plus a thin IO shell (quinn-proto style: `now` is always a parameter,
//! inputs are `handle_*`, outputs are `poll_*`):
//! - [`parse`]: ICMPv6 bytes to [`MldMessage`] and back ([`encode_query`],
//!   [`encode_report`]). Never panics.
//! - [`tracker`]: explicit tracking of listeners per group per reporting address, within
//!   fixed limits, with last-listener queries before a leave is believed.
//! - [`envelope`]: the RFC 3810 section 5 checks (link-local source, hop limit 1, Router
//!   Alert) every received message must pass.
//! - [`querier`]: when to send general queries, and when to stay quiet for another querier.
//! - [`socket`]: the raw ICMPv6 socket and the thread that feeds the two state machines, and
//!   a receiver's [`Reporter`].
//!
//! Invariant: listener expiry and query timing come from one [`MldTiming`]. The querier owns
//! the effective timing (its own, or the one adopted from another querier it defers to) and the
//! shell copies it into the tracker after every query, so a listener is never expired sooner
//! than the link's querier would ask it again. What is adopted from another querier is
//! clamped ([`querier::clamp_adopted`]), so no query can make the tracker keep a listener
//! longer than 260 s after its last report.

pub mod envelope;
pub mod parse;
pub mod querier;
pub mod socket;
pub mod tracker;

use std::io;
use std::time::Duration;

pub use parse::{
    encode_query, encode_report, parse, GroupRecord, MldMessage, Query, QueryV2, RecordType,
};
pub use querier::{Querier, QuerierConfig};
pub use socket::{spawn_listener, ListenerConfig, MldStats, Reporter};
pub use tracker::{GroupEvent, Interest, ListenerTracker, TrackerConfig, TrackerStats};

/// Errors of the MLD module: decoding received bytes, and opening the socket.
#[derive(Debug, thiserror::Error)]
pub enum MldError {
    /// The message ended before a field it announced.
    #[error("MLD message truncated: {needed} more bytes needed at offset {offset}")]
    Truncated {
        /// Offset of the field that did not fit.
        offset: usize,
        /// Bytes that field needed.
        needed: usize,
    },
    /// An ICMPv6 type that is not an MLD message.
    #[error("ICMPv6 type {0} is not an MLD message")]
    NotMld(u8),
    /// RFC 3810 8.1: a query of 25 to 27 bytes is neither MLDv1 nor MLDv2.
    #[error("MLD query of {0} bytes is neither MLDv1 (24 bytes) nor MLDv2 (28 or more)")]
    BadQueryLength(usize),
    /// Creating the raw socket was refused.
    #[error(
        "opening a raw ICMPv6 socket for MLD needs CAP_NET_RAW: \
         run as root or `setcap cap_net_raw+ep $(which lcfs)`"
    )]
    Permission(#[source] io::Error),
    /// The interface index names no interface.
    #[error("MLD: no network interface with index {0}")]
    NoInterface(u32),
    /// Any other socket error, with the interface it concerned.
    #[error("MLD socket on interface {iface}: {what}: {source}")]
    Io {
        /// Interface name.
        iface: String,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The numbers that tie listener expiry to query timing (RFC 3810 section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MldTiming {
    /// Robustness variable: how many queries a listener may miss before it expires.
    pub robustness: u8,
    /// Interval between general queries of the link's querier.
    pub query_interval: Duration,
    /// Maximum response delay asked for in general queries.
    pub max_response_delay: Duration,
}

impl Default for MldTiming {
    fn default() -> Self {
        Self {
            robustness: 2,
            query_interval: Duration::from_secs(5),
            max_response_delay: Duration::from_secs(1),
        }
    }
}

impl MldTiming {
    /// Multicast Address Listening Interval: robustness * query interval + max response delay.
    /// A listener not heard from for this long is gone.
    pub fn listener_interval(&self) -> Duration {
        self.query_interval
            .saturating_mul(u32::from(self.robustness.max(1)))
            .saturating_add(self.max_response_delay)
    }

    /// Other Querier Present Interval: robustness * query interval + max response delay / 2.
    /// A querier not heard from for this long is gone.
    pub fn other_querier_present_interval(&self) -> Duration {
        self.query_interval
            .saturating_mul(u32::from(self.robustness.max(1)))
            .saturating_add(self.max_response_delay / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_intervals() {
        let t = MldTiming::default();
        assert_eq!(t.listener_interval(), Duration::from_secs(11));
        assert_eq!(
            t.other_querier_present_interval(),
            Duration::from_millis(10_500)
        );
    }

    #[test]
    fn querier_and_tracker_defaults_agree() {
        assert_eq!(QuerierConfig::default().timing(), MldTiming::default());
        assert_eq!(TrackerConfig::default().timing, MldTiming::default());
        assert_eq!(
            QuerierConfig::default().tracker_config(),
            TrackerConfig::default()
        );
    }
}

//! The fetch engine: one per channel, shared by `copy`, `prefetch` and the mount.
//!
//! A fetch of an object joins its group, feeds arriving symbols to an [`ObjectFetch`](object::ObjectFetch), and on
//! a verified decode stores the object in the cache, leaves the group and wakes every waiter.
//! Concurrent requests for one object share one fetch. Demand reads join at once; other
//! requests share a window of `max_joined` groups (the kernel's cost per received packet
//! grows with the groups joined) and wait in order. While some wait, the engine listens to
//! the server's beacon and lets the objects it lists as on air go first, so that a receiver
//! that started late shares the rounds under way. Membership changes are reported by the
//! engine itself when it may ([`crate::mld::Reporter`]), else by the kernel in batches
//! ([`membership`]). Packets that do not parse, do not authenticate or belong to no pending
//! object are dropped and counted. Nothing hangs: a fetch that sees no useful symbol for
//! `timeout` fails with an error naming the channel.
//!
//! A mount also follows the channel's publisher ([`follow`]): it keeps hearing root records,
//! accepts each exactly as the first one was accepted ([`trust`]), and moves to higher
//! generations; fetches that may belong only to the generation left behind are put in doubt
//! and fail as stale within `stale_after` when the server no longer sends them.
//!
//! One receive thread owns the socket's receive side and all timers; callers are async.

mod engine;
pub mod follow;
pub mod membership;
pub mod object;
pub mod state;
#[cfg(test)]
mod state_tests;
pub mod tree;
pub mod trust;

pub use engine::{
    FetchConfig, FetchStats, Fetcher, Freshness, HeardRoot, Priority, RootWatcher, ROOT_WAIT,
};
pub use tree::Tree;
pub use trust::RootPolicy;

use crate::packet::PacketError;

#[derive(Debug, thiserror::Error, Clone)]
pub enum FetchError {
    /// `hint` says what to check: the interface when it is down, else the server (and, on
    /// an encrypted channel, the key).
    #[error(
        "channel {channel:?}: nothing received for {what} in {secs} s on interface {iface}.{hint}"
    )]
    Timeout {
        channel: String,
        what: String,
        secs: u64,
        iface: String,
        hint: String,
    },
    #[error("channel {channel:?}: no root record heard in {secs:.0} s on interface {iface} ({seen}).{advice}")]
    NoRoot {
        channel: String,
        iface: String,
        secs: f64,
        seen: String,
        advice: String,
    },
    #[error("channel {channel:?}: {what} belongs to a generation the server has moved past; it no longer sends it")]
    Stale { channel: String, what: String },
    #[error("the fetch engine stopped")]
    Closed,
    #[error("cache: {0}")]
    Cache(String),
    #[error("channel {channel:?}: {what} is invalid: {reason}")]
    Invalid {
        channel: String,
        what: String,
        reason: String,
    },
    #[error("channel {channel:?}: {reason}")]
    Untrusted { channel: String, reason: String },
    #[error("{0}")]
    NotFound(String),
}

impl From<PacketError> for FetchError {
    fn from(e: PacketError) -> Self {
        FetchError::Invalid {
            channel: String::new(),
            what: "packet".into(),
            reason: e.to_string(),
        }
    }
}

/// The advice appended to timeouts on an encrypted channel.
pub(crate) const KEY_HINT: &str =
    " This channel is encrypted: if a server is running, the key or password may be wrong.";

/// The advice appended to every timeout while the interface is up.
pub(crate) const SERVER_HINT: &str = " Is `lcfs serve` running for this channel on this link?";

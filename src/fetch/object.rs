//! The receiver's state for one object in flight (sans-IO).
//!
//! Symbols are fed in as they arrive; the first symbols decide the symbol size, but a few
//! decoders of different sizes may coexist so that forged symbols of a wrong size cannot lock
//! out the real ones. A decode is verified against the object's hash before it is returned;
//! a decode that does not verify (forged symbols on a clear channel) is thrown away and the
//! fetch goes on. Timers: after `stall` without a useful symbol the caller should leave and
//! rejoin the group (a fresh MLD report); after `timeout` without one the fetch fails.

use std::time::{Duration, Instant};

use lcfs_cache::Verified;

use crate::fec::{Decoded, ObjectDecoder};
use crate::object::ObjectRef;

const MAX_DECODERS: usize = 3;

/// What the I/O shell should do for this object now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Wait,
    Rejoin,
    Fail,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SymbolStats {
    pub accepted: u64,
    pub ignored: u64,
    pub forged_decodes: u64,
}

pub struct ObjectFetch {
    want: ObjectRef,
    decoders: Vec<ObjectDecoder>,
    last_progress: Instant,
    last_join: Instant,
    pub stats: SymbolStats,
}

impl ObjectFetch {
    pub fn new(now: Instant, want: ObjectRef) -> ObjectFetch {
        ObjectFetch {
            want,
            decoders: Vec::new(),
            last_progress: now,
            last_join: now,
            stats: SymbolStats::default(),
        }
    }

    pub fn want(&self) -> &ObjectRef {
        &self.want
    }

    /// Feeds one symbol. Returns the verified object once it decodes.
    pub fn handle_symbol(&mut self, now: Instant, esi: u32, data: &[u8]) -> Option<Verified> {
        let Some(i) = self.decoder_for(data.len()) else {
            self.stats.ignored += 1;
            return None;
        };
        match self.decoders[i].push(esi, data) {
            Decoded::Ignored => {
                self.stats.ignored += 1;
                None
            }
            Decoded::Pending => {
                self.stats.accepted += 1;
                self.last_progress = now;
                if self.decoders[i].saturated() {
                    self.decoders.swap_remove(i);
                }
                None
            }
            Decoded::Done(bytes) => {
                self.stats.accepted += 1;
                self.last_progress = now;
                self.verify(i, bytes)
            }
        }
    }

    fn verify(&mut self, i: usize, bytes: Vec<u8>) -> Option<Verified> {
        match Verified::new(&self.want.hash, bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!("discarding a decode that does not verify: {e}");
                self.stats.forged_decodes += 1;
                self.decoders.swap_remove(i);
                None
            }
        }
    }

    fn decoder_for(&mut self, size: usize) -> Option<usize> {
        if let Some(i) = self.decoders.iter().position(|d| d.symbol_size() == size) {
            return Some(i);
        }
        if self.decoders.len() >= MAX_DECODERS {
            // Drop the decoder that made the least progress to make room.
            let worst = (0..self.decoders.len()).min_by_key(|&i| self.decoders[i].kept())?;
            self.decoders.swap_remove(worst);
        }
        let d = ObjectDecoder::new(self.want.len as u64, size).ok()?;
        self.decoders.push(d);
        Some(self.decoders.len() - 1)
    }

    pub fn handle_joined(&mut self, now: Instant) {
        self.last_join = now;
    }

    /// Restarts the timers, when the object (re)enters the joined window.
    pub fn handle_started(&mut self, now: Instant) {
        self.last_progress = now;
        self.last_join = now;
    }

    pub fn poll_action(&self, now: Instant, stall: Duration, timeout: Duration) -> Action {
        let quiet = now.saturating_duration_since(self.last_progress);
        if quiet >= timeout {
            Action::Fail
        } else if quiet >= stall && now.saturating_duration_since(self.last_join) >= stall {
            Action::Rejoin
        } else {
            Action::Wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fec::ObjectEncoder;
    use crate::object::object_ref;

    fn setup(len: usize) -> (Vec<u8>, ObjectEncoder, ObjectFetch, Instant) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let enc = ObjectEncoder::new(&data, 500).unwrap();
        let now = Instant::now();
        let f = ObjectFetch::new(now, object_ref(&data));
        (data, enc, f, now)
    }

    #[test]
    fn decodes_and_verifies() {
        let (data, enc, mut f, now) = setup(5000);
        let mut buf = Vec::new();
        let mut got = None;
        for esi in 3..40 {
            enc.symbol(esi, &mut buf);
            if let Some(v) = f.handle_symbol(now, esi, &buf) {
                got = Some(v);
                break;
            }
        }
        assert_eq!(&got.unwrap()[..], &data[..]);
    }

    #[test]
    fn forged_symbols_never_produce_wrong_bytes() {
        let (data, enc, mut f, now) = setup(3000);
        // Forged source symbols with the right size decode to something that fails the hash.
        for esi in 0..6 {
            assert!(f.handle_symbol(now, esi, &[0xAA; 500]).is_none());
        }
        assert_eq!(f.stats.forged_decodes, 1);
        let mut buf = Vec::new();
        let mut got = None;
        for esi in 10..40 {
            enc.symbol(esi, &mut buf);
            got = got.or(f.handle_symbol(now, esi, &buf));
        }
        assert_eq!(&got.unwrap()[..], &data[..]);
    }

    #[test]
    fn wrong_sized_flood_does_not_lock_out() {
        let (data, enc, mut f, now) = setup(3000);
        for size in [1usize, 7, 99, 1400] {
            f.handle_symbol(now, 0, &vec![1; size]);
        }
        let mut buf = Vec::new();
        let mut got = None;
        for esi in 0..20 {
            enc.symbol(esi, &mut buf);
            got = got.or(f.handle_symbol(now, esi, &buf));
        }
        assert_eq!(&got.unwrap()[..], &data[..]);
    }

    #[test]
    fn timers() {
        let (_, _, f, t0) = setup(100);
        let stall = Duration::from_millis(300);
        let timeout = Duration::from_secs(2);
        assert_eq!(f.poll_action(t0, stall, timeout), Action::Wait);
        assert_eq!(f.poll_action(t0 + stall, stall, timeout), Action::Rejoin);
        assert_eq!(f.poll_action(t0 + timeout, stall, timeout), Action::Fail);
    }
}

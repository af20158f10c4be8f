//! Which process is fetching which object, so that processes sharing a cache fetch an object
//! they all want once: the first claims it and fetches, the others wait for it to be stored.
//!
//! Invariants: a claim is held by one holder (the owner process, or one client connection)
//! until that holder releases it, the object is stored by anyone, or the holder's connection
//! ends (a process that dies releases everything it held). The table is bounded: when full,
//! claims are granted without being recorded, which costs a duplicate fetch, never a wait.

use std::collections::HashMap;

use blake3::Hash;
use parking_lot::Mutex;

/// Who holds a claim: [`OWNER`], or the owner's client connection of that number.
pub(crate) type Holder = u64;

/// The owner process itself.
pub(crate) const OWNER: Holder = 0;

/// Claims recorded at most (a window of 32 objects per process leaves room for thousands).
const MAX_CLAIMS: usize = 65536;

#[derive(Default)]
pub(crate) struct Claims {
    held: Mutex<HashMap<Hash, Holder>>,
}

impl Claims {
    /// Claims `hash` for `holder`: false if another holder is fetching it.
    pub(crate) fn claim(&self, hash: &Hash, holder: Holder) -> bool {
        let mut held = self.held.lock();
        match held.get(hash) {
            Some(&other) => other == holder,
            None => {
                if held.len() < MAX_CLAIMS {
                    held.insert(*hash, holder);
                }
                true
            }
        }
    }

    /// Drops `holder`'s claim on `hash`, if it has it.
    pub(crate) fn release(&self, hash: &Hash, holder: Holder) {
        let mut held = self.held.lock();
        if held.get(hash) == Some(&holder) {
            held.remove(hash);
        }
    }

    /// The object is stored: whoever fetched it is done.
    pub(crate) fn stored(&self, hash: &Hash) {
        self.held.lock().remove(hash);
    }

    /// Drops every claim of a holder that went away.
    pub(crate) fn release_all(&self, holder: Holder) {
        self.held.lock().retain(|_, h| *h != holder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> Hash {
        blake3::hash(&[n])
    }

    #[test]
    fn the_first_claim_wins_until_released_stored_or_gone() {
        let c = Claims::default();
        assert!(c.claim(&h(1), 1));
        assert!(c.claim(&h(1), 1), "claiming again is still ours");
        assert!(!c.claim(&h(1), 2) && !c.claim(&h(1), OWNER));
        c.release(&h(1), 2);
        assert!(!c.claim(&h(1), 2), "only the holder releases");
        c.release(&h(1), 1);
        assert!(c.claim(&h(1), 2));
        c.stored(&h(1));
        assert!(c.claim(&h(1), 3));
        assert!(c.claim(&h(2), 3) && !c.claim(&h(2), 1));
        c.release_all(3);
        assert!(c.claim(&h(1), 1) && c.claim(&h(2), 1));
    }

    #[test]
    fn a_full_table_grants_without_recording() {
        let c = Claims::default();
        for i in 0..MAX_CLAIMS as u32 {
            assert!(c.claim(&blake3::hash(&i.to_le_bytes()), 1));
        }
        assert!(c.claim(&h(1), 2));
        assert!(
            c.claim(&h(1), 3),
            "not recorded: nobody waits on a claim nobody holds"
        );
    }
}

//! The server: `lcfs serve PATH` publishes a directory (or one file) as content-addressed
//! objects and sends each object's symbols on its own group while somebody listens
//! (DESIGN.md section 3).
//!
//! [`index`] turns the tree into objects and remembers where each one's bytes are; the leaf
//! cache lets a restart skip reading unchanged files.

pub mod index;
mod leafcache;
pub mod sched;
pub mod sender;
pub mod server;
pub mod table;
pub mod watch;

//! The wire: everything two machines must agree on, and nothing that does I/O.
//!
//! - [`object`]: the content-addressed objects (blocks, file indexes, directories, bundles
//!   of small files, the root record) and their BLAKE3 hashes;
//! - [`fec`]: RaptorQ coding of an object into symbols, and decoding them back;
//! - [`packet`]: one symbol's datagram, sealed on a private channel;
//! - [`channel`]: a channel's name, its multicast groups and tags;
//! - [`keys`]: channel keys and publisher signatures.
//!
//! The publisher ([`crate::serve`]) and the receiver ([`crate::fetch`]) stand on this and
//! on each other never.

pub mod channel;
pub mod fec;
pub mod keys;
pub mod object;
pub mod packet;

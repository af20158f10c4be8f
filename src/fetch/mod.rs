//! The fetch engine: one per channel, shared by `copy`, `prefetch` and the mount.
//!
//! A fetch of an object joins its group, feeds arriving symbols to an [`ObjectFetch`](object::ObjectFetch), and on
//! a verified decode stores the object in the cache, leaves the group and wakes every waiter.
//! Concurrent requests for one object share one fetch. Demand reads join at once; other
//! requests share a window of `max_joined` groups (the kernel's cost per received packet
//! grows with the groups joined; a receiver that measures loss in bursts joins four times as
//! many) and wait in order. While some wait, the engine listens to
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
//!
//! Failures are [`FetchError`]s: each keeps its cause as its source, and names what failed
//! with a [`Subject`] (the object, and where the caller knew them the [`Part`] of the tree
//! it is, such as block N, and the file's path), its own type so that every caller adds
//! what it knows in the same words. [`InvalidReason`] says why an object was refused.

pub mod config;
mod engine;
pub mod follow;
pub mod intent;
pub mod loss;
pub mod membership;
pub mod object;
pub mod state;
#[cfg(test)]
mod state_tests;
pub mod tree;
pub mod trust;

pub use config::{FetchConfig, FetchStats, Freshness, HeardRoot, KeepMembers, Priority, ROOT_WAIT};
pub use engine::{Fetcher, RootWatcher};
pub use tree::Tree;
pub use trust::RootPolicy;

use std::fmt;
use std::sync::Arc;

use crate::wire::object::{BlockIndex, ObjectError, ObjectRef};
use tree::MAX_FILE_BLOCKS;

/// Why a fetch failed (a [`Subject`] is boxed: it would double the size of every `Result`
/// that carries this error). Errors that have a cause keep it as their [`source`]
/// (`std::error::Error::source`), and their own message leaves it out, so that `{:#}` (as
/// `lcfs:` prints errors) says each part once; [`FetchError::report`] gives the same text
/// where only a string can go. The mount turns these into errno values in one place
/// (`crate::mountfs`, through `lcfs_mount::SourceError`).
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error, Clone)]
pub enum FetchError {
    /// `hint` says what to check: the interface when it is down, else the server (and, on
    /// an encrypted channel, the key).
    #[error(
        "channel {channel:?}: nothing received for {what} in {secs} s on interface {iface}.{hint}"
    )]
    Timeout {
        channel: String,
        what: Box<Subject>,
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
    Stale { channel: String, what: Box<Subject> },
    #[error("the fetch engine stopped")]
    Closed,
    /// The cache failed while doing `doing` (which names the object when there is one).
    #[error("cache: cannot {doing}")]
    Cache {
        doing: String,
        #[source]
        source: Arc<lcfs_cache::CacheError>,
    },
    #[error("channel {channel:?}: {what} is invalid")]
    Invalid {
        channel: String,
        what: Box<Subject>,
        #[source]
        reason: InvalidReason,
    },
    #[error("channel {channel:?}: root record refused")]
    Untrusted {
        channel: String,
        #[source]
        reason: trust::Refusal,
    },
    #[error("{0}")]
    NotFound(String),
}

/// Why a fetched object, or the entry that referred to it, was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InvalidReason {
    /// It did not decode.
    #[error(transparent)]
    Decode(#[from] ObjectError),
    #[error(
        "it claims {blocks} blocks of {block_size} bytes, more than the {MAX_FILE_BLOCKS} a \
         receiver indexes (serve such files with a larger --block-size)"
    )]
    TooManyBlocks { blocks: u64, block_size: u64 },
    #[error("one block reference for a file of several blocks")]
    OneBlockForSeveral,
    #[error("length does not fit the file size")]
    IndexLength,
    #[error("not a page of leaves")]
    NotAPage,
    /// A walk passed one of its limits (`tree::WalkLimits`), named here.
    #[error("refused to walk it: {0}")]
    TooBig(String),
}

/// What a fetch error is about: the object, and where the caller knew them, what part of
/// the tree it is and the file (or directory) it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub part: Part,
    pub object: Option<ObjectRef>,
    /// The path within the channel, when the caller knew it.
    pub path: Option<String>,
}

/// The part of the tree an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Not known (the engine fetches objects without knowing what they are).
    Object,
    Directory,
    FileIndex,
    IndexPage,
    Block(BlockIndex),
    /// A file's entry, for errors about what it claims (no object fetched yet).
    File,
    /// The tree below a directory, for a walk.
    Tree,
}

impl Subject {
    /// An object of unknown part.
    pub fn object(r: ObjectRef) -> Subject {
        Subject::part(Part::Object, r)
    }

    pub fn part(part: Part, r: ObjectRef) -> Subject {
        Subject {
            part,
            object: Some(r),
            path: None,
        }
    }

    /// A file's entry.
    pub fn file() -> Subject {
        Subject {
            part: Part::File,
            object: None,
            path: None,
        }
    }

    /// The tree a walk was asked for.
    pub fn tree() -> Subject {
        Subject {
            part: Part::Tree,
            object: None,
            path: None,
        }
    }
}

/// `object 0123456789abcdef (65536 bytes)`, `block 3 of "a/b.bin" (0123456789abcdef, 65536
/// bytes)`, `directory "a" (…)`, `file "a/b.bin"`, `the tree at "a"`.
impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.part {
            Part::Object => f.write_str("object")?,
            Part::Directory => f.write_str("directory")?,
            Part::FileIndex => f.write_str("file index")?,
            Part::IndexPage => f.write_str("index page")?,
            Part::Block(i) => write!(f, "block {i}")?,
            Part::File => f.write_str("file")?,
            Part::Tree => f.write_str("the tree")?,
        }
        match (&self.path, self.part) {
            (Some(p), Part::Directory | Part::File) => write!(f, " {p:?}")?,
            (Some(p), Part::Tree) => write!(f, " at {p:?}")?,
            (Some(p), _) => write!(f, " of {p:?}")?,
            (None, _) => {}
        }
        match (&self.object, &self.path) {
            (Some(r), None) => write!(f, " {r}"),
            (Some(r), Some(_)) => write!(f, " ({}, {} bytes)", r.hash.short(), r.len),
            (None, _) => Ok(()),
        }
    }
}

impl FetchError {
    /// The message followed by its sources, `: `-separated, as `lcfs:` prints an error: for
    /// logs and for the mount, which passes errors on as text. A source whose text is already
    /// there is left out (`lcfs_cache::CacheError` messages quote their own source).
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            let text = e.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            next = e.source();
        }
        out
    }

    /// Says what part of the tree the object was, when the error did not know.
    pub fn as_part(mut self, part: Part) -> FetchError {
        if let Some(s) = self.subject_mut().filter(|s| s.part == Part::Object) {
            s.part = part;
        }
        self
    }

    /// Says which file (or directory) of the channel the object belongs to, when the error
    /// did not know.
    pub fn in_file(mut self, path: impl fmt::Display) -> FetchError {
        if let Some(s) = self.subject_mut().filter(|s| s.path.is_none()) {
            s.path = Some(path.to_string());
        }
        self
    }

    fn subject_mut(&mut self) -> Option<&mut Subject> {
        match self {
            FetchError::Timeout { what, .. }
            | FetchError::Stale { what, .. }
            | FetchError::Invalid { what, .. } => Some(&mut **what),
            _ => None,
        }
    }

    /// A cache failure while doing `doing`.
    pub fn cache(doing: impl Into<String>, source: lcfs_cache::CacheError) -> FetchError {
        FetchError::Cache {
            doing: doing.into(),
            source: Arc::new(source),
        }
    }
}

/// The advice appended to timeouts on an encrypted channel.
pub(crate) const KEY_HINT: &str =
    " This channel is encrypted: if a server is running, the key or password may be wrong.";

/// The advice appended to every timeout while the interface is up.
pub(crate) const SERVER_HINT: &str = " Is `lcfs serve` running for this channel on this link?";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::object::ObjectHash;
    use std::error::Error;

    fn r() -> ObjectRef {
        ObjectRef {
            hash: ObjectHash::from_bytes([0xab; 32]),
            len: 65536,
        }
    }

    fn stale(what: Subject) -> FetchError {
        FetchError::Stale {
            channel: "c".into(),
            what: Box::new(what),
        }
    }

    #[test]
    fn subjects_name_the_object_and_where_known_the_block_and_the_file() {
        let obj = "abababababababab";
        assert_eq!(
            Subject::object(r()).to_string(),
            format!("object {obj} (65536 bytes)")
        );
        let e = stale(Subject::object(r()))
            .as_part(Part::Block(BlockIndex(3)))
            .in_file("a/b.bin");
        assert_eq!(
            e.to_string(),
            format!(
                "channel \"c\": block 3 of \"a/b.bin\" ({obj}, 65536 bytes) belongs to a \
                 generation the server has moved past; it no longer sends it"
            )
        );
        // What a caller knew first stays: the part and the path are set once.
        let e = stale(Subject::part(Part::Directory, r()))
            .as_part(Part::Block(BlockIndex(1)))
            .in_file("a")
            .in_file("elsewhere");
        assert!(
            e.to_string()
                .contains(&format!("directory \"a\" ({obj}, 65536 bytes)")),
            "{e}"
        );
        assert_eq!(Subject::file().to_string(), "file");
        let mut walk = Subject::tree();
        walk.path = Some("a".into());
        assert_eq!(walk.to_string(), "the tree at \"a\"");
    }

    #[test]
    fn invalid_keeps_its_reason_as_the_source_and_reports_it_once() {
        let e = FetchError::Invalid {
            channel: "c".into(),
            what: Box::new(Subject::part(Part::FileIndex, r())),
            reason: ObjectError::Trailing(3).into(),
        };
        let head = "channel \"c\": file index abababababababab (65536 bytes) is invalid";
        assert_eq!(e.to_string(), head);
        let source = e.source().and_then(|s| s.downcast_ref::<InvalidReason>());
        assert_eq!(
            source,
            Some(&InvalidReason::Decode(ObjectError::Trailing(3)))
        );
        assert_eq!(
            e.report(),
            format!("{head}: 3 trailing bytes after the encoding")
        );
    }

    #[test]
    fn cache_failures_keep_the_cache_error() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let cache = lcfs_cache::CacheError::Io {
            path: "/c/objects".into(),
            source: io,
        };
        let e = FetchError::cache(format!("pin object {}", r()), cache);
        let source = e
            .source()
            .and_then(|s| s.downcast_ref::<Arc<lcfs_cache::CacheError>>());
        assert!(matches!(
            source.map(|a| &**a),
            Some(lcfs_cache::CacheError::Io { .. })
        ));
        let report = e.report();
        assert!(
            report.starts_with(
                "cache: cannot pin object abababababababab (65536 bytes): cache file /c/objects: "
            ),
            "{report}"
        );
        assert_eq!(report.matches("os error 28").count(), 1, "{report}");
    }
}

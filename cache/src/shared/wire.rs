//! The frames a cache's clients and its owner exchange on `DIR/cache.sock` (sans-IO).
//!
//! A frame is a 4-byte big-endian length, at most [`MAX_FRAME`], then its body. A request body
//! is an op byte and the op's fields; a reply body is a status byte and its payload. Hashes
//! and channel ids are 32 raw bytes, variable fields a 4-byte length and the bytes.
//!
//! Invariant: decoding never panics and never allocates more than the frame it was given;
//! anything truncated, oversized, unknown or with bytes left over is a [`WireError`]. Both
//! ends are processes of one user (peer credentials are checked), but a bug or a stale
//! peer must still give an error, not a crash.

use blake3::Hash;

use crate::{Status, Usage};

/// The largest frame either side sends or accepts. Batches of touches and commits are the
/// largest requests (a commit takes about 60 bytes an object); root records are a few
/// hundred bytes.
pub(crate) const MAX_FRAME: usize = 1 << 20;

/// The most hashes one `Touched` frame carries.
pub(crate) const MAX_TOUCHED: usize = (MAX_FRAME - 5) / 32;

/// The most objects one `Commit` frame carries (temp names are under 45 bytes).
pub(crate) const MAX_COMMIT: usize = 8192;

/// What a client asks of the owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// Index each fully written file `tmp/<name>` as the object `hash` (a batch: a client
    /// storing what it fetched sends everything waiting in one request).
    Commit(Vec<(Hash, String)>),
    /// The client read these objects (for the LRU order).
    Touched(Vec<Hash>),
    /// The client found this object's file damaged: check it again, delete it if bad.
    Check(Hash),
    Pin(Hash),
    Unpin(Hash),
    UnpinAll,
    SetRoot {
        channel: [u8; 32],
        record: Vec<u8>,
    },
    GetRoot([u8; 32]),
    SetPublisher {
        channel: [u8; 32],
        identity: Vec<u8>,
    },
    GetPublisher([u8; 32]),
    Usage,
    Flush,
    /// The client is about to fetch this object: is another process fetching it already?
    Claim(Hash),
    /// The client no longer fetches this object (it failed, or it stored it as present).
    Release(Hash),
    /// Usage, quota and remembered root records (`lcfs cache status`).
    Status,
    /// Evict unpinned objects down to this many bytes of disk use (`lcfs cache gc`).
    Evict(u64),
}

/// The owner's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Done,
    Bytes(Option<Vec<u8>>),
    Usage(Usage),
    /// Whether a `Claim` is granted (false: another process is fetching the object).
    Claimed(bool),
    /// `Pin` of an object the index does not list.
    NotCached(Hash),
    /// The owner's error, as text (it names the path and the remedy).
    Failed(String),
    /// The answer to `Status`.
    Status(Status),
}

/// Why a frame could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLong(usize),
    #[error("frame is truncated")]
    Truncated,
    #[error("unknown op or status {0}")]
    Unknown(u8),
    #[error("{0} bytes left over after the frame")]
    Trailing(usize),
    #[error("temp file name is not UTF-8")]
    BadName,
}

/// The length of the frame whose 4-byte header is `header`, if acceptable.
pub(crate) fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len));
    }
    Ok(len)
}

/// Prefixes `body` with its length.
fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

impl Request {
    /// The request as one frame, header included.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Request::Commit(objects) => {
                b.push(1);
                b.extend_from_slice(&(objects.len() as u32).to_be_bytes());
                for (hash, temp) in objects {
                    b.extend_from_slice(hash.as_bytes());
                    put_bytes(&mut b, temp.as_bytes());
                }
            }
            Request::Touched(hashes) => {
                b.push(2);
                b.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
                hashes
                    .iter()
                    .for_each(|h| b.extend_from_slice(h.as_bytes()));
            }
            Request::Check(h) => put_hash(&mut b, 3, h),
            Request::Pin(h) => put_hash(&mut b, 4, h),
            Request::Unpin(h) => put_hash(&mut b, 5, h),
            Request::UnpinAll => b.push(6),
            Request::SetRoot { channel, record } => put_pair(&mut b, 7, channel, record),
            Request::GetRoot(c) => put_id(&mut b, 8, c),
            Request::SetPublisher { channel, identity } => put_pair(&mut b, 9, channel, identity),
            Request::GetPublisher(c) => put_id(&mut b, 10, c),
            Request::Usage => b.push(11),
            Request::Flush => b.push(12),
            Request::Claim(h) => put_hash(&mut b, 13, h),
            Request::Release(h) => put_hash(&mut b, 14, h),
            Request::Status => b.push(15),
            Request::Evict(limit) => {
                b.push(16);
                b.extend_from_slice(&limit.to_be_bytes());
            }
        }
        frame(b)
    }

    /// Decodes a request body (the frame without its header).
    pub(crate) fn decode(body: &[u8]) -> Result<Request, WireError> {
        let mut r = Reader(body);
        let req = match r.u8()? {
            1 => {
                let n = r.u32()? as usize;
                // Each takes at least 36 bytes: checked before allocating.
                if n > r.0.len() / 36 {
                    return Err(WireError::Truncated);
                }
                let mut objects = Vec::with_capacity(n);
                for _ in 0..n {
                    let hash = r.hash()?;
                    let name = String::from_utf8(r.bytes()?.to_vec());
                    objects.push((hash, name.map_err(|_| WireError::BadName)?));
                }
                Request::Commit(objects)
            }
            2 => {
                let n = r.u32()? as usize;
                // Checked against what is there before allocating.
                if n > r.0.len() / 32 {
                    return Err(WireError::Truncated);
                }
                Request::Touched((0..n).map(|_| r.hash()).collect::<Result<_, _>>()?)
            }
            3 => Request::Check(r.hash()?),
            4 => Request::Pin(r.hash()?),
            5 => Request::Unpin(r.hash()?),
            6 => Request::UnpinAll,
            7 => Request::SetRoot {
                channel: r.id()?,
                record: r.bytes()?.to_vec(),
            },
            8 => Request::GetRoot(r.id()?),
            9 => Request::SetPublisher {
                channel: r.id()?,
                identity: r.bytes()?.to_vec(),
            },
            10 => Request::GetPublisher(r.id()?),
            11 => Request::Usage,
            12 => Request::Flush,
            13 => Request::Claim(r.hash()?),
            14 => Request::Release(r.hash()?),
            15 => Request::Status,
            16 => Request::Evict(r.u64()?),
            op => return Err(WireError::Unknown(op)),
        };
        r.end()?;
        Ok(req)
    }
}

impl Reply {
    /// The reply as one frame, header included. A reply that would not fit (it cannot: the
    /// bytes it carries came in a request) becomes a `Failed`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Reply::Done => b.push(0),
            Reply::Bytes(None) => b.push(1),
            Reply::Bytes(Some(bytes)) if bytes.len() + 9 > MAX_FRAME => {
                return Reply::Failed("reply too large".into()).encode()
            }
            Reply::Bytes(Some(bytes)) => {
                b.push(2);
                put_bytes(&mut b, bytes);
            }
            Reply::Usage(u) => {
                b.push(3);
                for n in [u.objects, u.disk_bytes, u.pinned_bytes] {
                    b.extend_from_slice(&n.to_be_bytes());
                }
            }
            Reply::NotCached(h) => put_hash(&mut b, 4, h),
            Reply::Claimed(granted) => b.extend_from_slice(&[6, u8::from(*granted)]),
            Reply::Status(status) => put_status(&mut b, status),
            Reply::Failed(msg) => {
                b.push(5);
                let cut = msg.len().min(MAX_FRAME / 2);
                let cut = (0..=cut)
                    .rev()
                    .find(|&i| msg.is_char_boundary(i))
                    .unwrap_or(0);
                put_bytes(&mut b, &msg.as_bytes()[..cut]);
            }
        }
        frame(b)
    }

    /// Decodes a reply body (the frame without its header).
    pub(crate) fn decode(body: &[u8]) -> Result<Reply, WireError> {
        let mut r = Reader(body);
        let reply = match r.u8()? {
            0 => Reply::Done,
            1 => Reply::Bytes(None),
            2 => Reply::Bytes(Some(r.bytes()?.to_vec())),
            3 => Reply::Usage(Usage {
                objects: r.u64()?,
                disk_bytes: r.u64()?,
                pinned_bytes: r.u64()?,
            }),
            4 => Reply::NotCached(r.hash()?),
            5 => Reply::Failed(String::from_utf8_lossy(r.bytes()?).into_owned()),
            6 => match r.u8()? {
                0 => Reply::Claimed(false),
                1 => Reply::Claimed(true),
                other => return Err(WireError::Unknown(other)),
            },
            7 => Reply::Status(read_status(&mut r)?),
            status => return Err(WireError::Unknown(status)),
        };
        r.end()?;
        Ok(reply)
    }
}

/// A `Status` reply: usage, an optional quota, then as many root records as fit a frame
/// (root records are a few hundred bytes: thousands of channels fit).
fn put_status(b: &mut Vec<u8>, status: &Status) {
    b.push(7);
    let u = &status.usage;
    for n in [u.objects, u.disk_bytes, u.pinned_bytes] {
        b.extend_from_slice(&n.to_be_bytes());
    }
    match status.quota {
        None => b.push(0),
        Some(q) => {
            b.push(1);
            b.extend_from_slice(&q.to_be_bytes());
        }
    }
    let count_at = b.len();
    b.extend_from_slice(&[0; 4]);
    let mut count = 0u32;
    for (id, record) in &status.roots {
        if b.len() + 36 + record.len() > MAX_FRAME {
            break;
        }
        b.extend_from_slice(id);
        put_bytes(b, record);
        count += 1;
    }
    b[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
}

fn read_status(r: &mut Reader<'_>) -> Result<Status, WireError> {
    let usage = Usage {
        objects: r.u64()?,
        disk_bytes: r.u64()?,
        pinned_bytes: r.u64()?,
    };
    let quota = match r.u8()? {
        0 => None,
        1 => Some(r.u64()?),
        other => return Err(WireError::Unknown(other)),
    };
    let n = r.u32()? as usize;
    // Each takes at least 36 bytes: checked before allocating.
    if n > r.0.len() / 36 {
        return Err(WireError::Truncated);
    }
    let mut roots = Vec::with_capacity(n);
    for _ in 0..n {
        roots.push((r.id()?, r.bytes()?.to_vec()));
    }
    Ok(Status {
        usage,
        quota,
        roots,
    })
}

fn put_bytes(b: &mut Vec<u8>, bytes: &[u8]) {
    b.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    b.extend_from_slice(bytes);
}

fn put_hash(b: &mut Vec<u8>, op: u8, hash: &Hash) {
    b.push(op);
    b.extend_from_slice(hash.as_bytes());
}

fn put_id(b: &mut Vec<u8>, op: u8, id: &[u8; 32]) {
    b.push(op);
    b.extend_from_slice(id);
}

fn put_pair(b: &mut Vec<u8>, op: u8, id: &[u8; 32], bytes: &[u8]) {
    put_id(b, op, id);
    put_bytes(b, bytes);
}

/// Reads fields off the front of a body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn hash(&mut self) -> Result<Hash, WireError> {
        Ok(Hash::from_bytes(self.array()?))
    }

    fn id(&mut self) -> Result<[u8; 32], WireError> {
        self.array()
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn end(&self) -> Result<(), WireError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(n: u8) -> Hash {
        blake3::hash(&[n])
    }

    fn requests() -> Vec<Request> {
        vec![
            Request::Commit(vec![(h(1), "123-4".into()), (h(2), "123-5".into())]),
            Request::Commit(vec![]),
            Request::Touched(vec![h(1), h(2), h(3)]),
            Request::Touched(vec![]),
            Request::Check(h(4)),
            Request::Pin(h(5)),
            Request::Unpin(h(6)),
            Request::UnpinAll,
            Request::SetRoot {
                channel: [7; 32],
                record: vec![1, 2, 3],
            },
            Request::GetRoot([8; 32]),
            Request::SetPublisher {
                channel: [9; 32],
                identity: vec![],
            },
            Request::GetPublisher([10; 32]),
            Request::Usage,
            Request::Flush,
            Request::Claim(h(11)),
            Request::Release(h(12)),
            Request::Status,
            Request::Evict(0),
            Request::Evict(u64::MAX),
        ]
    }

    fn replies() -> Vec<Reply> {
        vec![
            Reply::Done,
            Reply::Bytes(None),
            Reply::Bytes(Some(vec![1, 2])),
            Reply::Usage(Usage {
                objects: 1,
                disk_bytes: 2,
                pinned_bytes: 3,
            }),
            Reply::NotCached(h(1)),
            Reply::Claimed(true),
            Reply::Claimed(false),
            Reply::Failed("cache file /x: disk full".into()),
            Reply::Status(Status::default()),
            Reply::Status(Status {
                usage: Usage {
                    objects: 4,
                    disk_bytes: 5,
                    pinned_bytes: 6,
                },
                quota: Some(7),
                roots: vec![([1; 32], vec![1, 2, 3]), ([2; 32], vec![])],
            }),
        ]
    }

    fn body(frame: &[u8]) -> &[u8] {
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn every_request_and_reply_round_trips() {
        for req in requests() {
            assert_eq!(Request::decode(body(&req.encode())), Ok(req));
        }
        for reply in replies() {
            assert_eq!(Reply::decode(body(&reply.encode())), Ok(reply));
        }
    }

    #[test]
    fn truncated_and_padded_frames_are_errors() {
        for req in requests() {
            let frame = req.encode();
            let b = body(&frame);
            for cut in 0..b.len() {
                assert!(Request::decode(&b[..cut]).is_err(), "{req:?} cut at {cut}");
            }
            let mut padded = b.to_vec();
            padded.push(0);
            assert_eq!(Request::decode(&padded), Err(WireError::Trailing(1)));
        }
        for reply in replies() {
            let frame = reply.encode();
            let b = body(&frame);
            for cut in 0..b.len() {
                assert!(Reply::decode(&b[..cut]).is_err(), "{reply:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn oversized_frames_and_counts_are_refused() {
        let too_long = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(frame_len(too_long), Err(WireError::TooLong(MAX_FRAME + 1)));
        // A touch count far beyond the bytes that follow is refused before allocating.
        let mut b = vec![2];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Request::decode(&b), Err(WireError::Truncated));
        assert_eq!(Request::decode(&[99]), Err(WireError::Unknown(99)));
        assert_eq!(Reply::decode(&[99]), Err(WireError::Unknown(99)));
    }

    #[test]
    fn a_status_with_too_many_roots_keeps_what_fits_a_frame() {
        let status = Status {
            roots: (0..20_000u32)
                .map(|n| ([n as u8; 32], vec![0; 100]))
                .collect(),
            ..Status::default()
        };
        let frame = Reply::Status(status).encode();
        assert!(frame.len() <= MAX_FRAME + 4);
        let Ok(Reply::Status(back)) = Reply::decode(body(&frame)) else {
            panic!("a cut status does not decode");
        };
        assert!(back.roots.len() > 1000 && back.roots.len() < 20_000);
        // A count beyond the bytes that follow is refused before allocating.
        let mut b = vec![7];
        b.extend_from_slice(&[0; 25]);
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Reply::decode(&b), Err(WireError::Truncated));
    }

    #[test]
    fn a_long_error_message_is_cut_on_a_character_boundary() {
        let msg = "é".repeat(MAX_FRAME);
        let frame = Reply::Failed(msg).encode();
        assert!(frame.len() <= MAX_FRAME + 4);
        assert!(matches!(Reply::decode(body(&frame)), Ok(Reply::Failed(m)) if m.starts_with('é')));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }

        #[test]
        fn bit_flips_give_an_error_or_another_valid_message(i in 0usize..64, bit in 0u8..8) {
            for req in requests() {
                let mut frame = req.encode();
                let n = 4 + i % (frame.len() - 4);
                frame[n] ^= 1 << bit;
                if let Ok(other) = Request::decode(&frame[4..]) {
                    prop_assert_eq!(Request::decode(&other.encode()[4..]), Ok(other));
                }
            }
        }
    }
}

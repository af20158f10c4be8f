//! A client's connection to the owner of its cache directory.
//!
//! Invariant: a request either gets its reply, or the caller learns that the owner is gone
//! ([`CallError::Gone`]: the connection closed; whoever takes the lock next is the new owner)
//! or that it failed for good ([`CallError::Failed`], naming the owner's pid and what to do).
//! An owner that stops answering (stopped, hung) fails the request after [`ANSWER_WITHIN`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::wire::{frame_len, Reply, Request};
use super::{euid, peer, SockAddr};
use crate::CacheError;

/// How long a request may wait for the owner's answer. The owner answers in microseconds
/// (an eviction of thousands of objects in a few hundred milliseconds); one that takes
/// seconds is stopped or hung, and every lcfs process of the machine would wait with it.
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_secs(5);

pub(crate) struct Client {
    stream: UnixStream,
    dir: PathBuf,
    /// The owner's pid, for messages.
    pub(crate) owner: i32,
    /// A request failed halfway (timeout, garbled answer): the stream is out of step, so
    /// the next request connects again.
    broken: bool,
}

/// Why a connection could not be made.
pub(crate) enum ConnectError {
    /// Nobody listens (yet): the owner is starting, or died and its lock is about to be free.
    NotListening,
    /// The socket is not ours, or its peer is another user: never retried.
    Refused(CacheError),
}

/// Why a request did not get a reply.
pub(crate) enum CallError {
    Gone,
    /// The owner did not answer within [`ANSWER_WITHIN`].
    Stuck(CacheError),
    Failed(CacheError),
}

impl Client {
    pub(crate) fn connect(dir: &Path, addr: &SockAddr) -> Result<Client, ConnectError> {
        match addr.check_owner() {
            Ok(true) => {}
            Ok(false) => return Err(ConnectError::NotListening),
            Err(e) => return Err(ConnectError::Refused(e)),
        }
        let stream = match UnixStream::connect(&addr.addr) {
            Ok(s) => s,
            Err(e) if is_not_listening(&e) => return Err(ConnectError::NotListening),
            Err(e) => return Err(ConnectError::Refused(CacheError::io(&addr.path, e))),
        };
        let refused = |e| ConnectError::Refused(CacheError::io(&addr.path, e));
        let (uid, owner) = peer(&stream).map_err(refused)?;
        if uid != euid() {
            return Err(ConnectError::Refused(CacheError::ForeignSocket {
                path: addr.path.clone(),
                owner: uid,
                euid: euid(),
            }));
        }
        stream
            .set_read_timeout(Some(ANSWER_WITHIN))
            .and_then(|()| stream.set_write_timeout(Some(ANSWER_WITHIN)))
            .map_err(refused)?;
        Ok(Client {
            stream,
            dir: dir.to_owned(),
            owner,
            broken: false,
        })
    }

    /// Sends one request and reads its reply.
    pub(crate) fn call(&mut self, request: &Request) -> Result<Reply, CallError> {
        if self.broken {
            return Err(CallError::Gone);
        }
        let exchanged = self
            .stream
            .write_all(&request.encode())
            .and_then(|()| self.read_reply());
        match exchanged {
            Ok(reply) => Ok(reply),
            Err(e) if is_gone(&e) => Err(CallError::Gone),
            Err(e) => {
                self.broken = true;
                let stuck = matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
                let err = self.failed(e);
                Err(if stuck {
                    CallError::Stuck(err)
                } else {
                    CallError::Failed(err)
                })
            }
        }
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        let mut header = [0; 4];
        self.stream.read_exact(&mut header)?;
        let len = frame_len(header).map_err(io::Error::other)?;
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body)?;
        Reply::decode(&body).map_err(io::Error::other)
    }

    fn failed(&self, e: io::Error) -> CacheError {
        let message = if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!(
                "it did not answer within {} s (stopped or hung? `kill {}` hands the cache \
                 to the next lcfs process)",
                ANSWER_WITHIN.as_secs(),
                self.owner
            )
        } else {
            format!("garbled answer: {e}")
        };
        self.owner_error(message)
    }

    /// An error the owner reported, or one about the owner.
    pub(crate) fn owner_error(&self, message: String) -> CacheError {
        CacheError::Owner {
            dir: self.dir.clone(),
            pid: self.owner,
            message,
        }
    }
}

fn is_not_listening(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

//! The owner's side of `DIR/cache.sock`: a thread accepting clients and one thread per client
//! answering its requests against the [`Owned`] cache.
//!
//! Invariants: only peers with our uid are served; a client's bad frame ends its connection,
//! never the owner; stopping the service (on drop) ends every thread before returning, so the
//! owned cache is closed (and its clean mark written) by the process that owned it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tracing::{debug, warn};

use super::claims::Holder;
use super::wire::{frame_len, Reply, Request};
use super::{euid, peer, SockAddr};
use crate::owned::Owned;
use crate::CacheError;

/// The running service; dropping it stops it.
pub(crate) struct Service {
    stop: Arc<AtomicBool>,
    conns: Arc<Conns>,
    accept: Option<JoinHandle<()>>,
    /// The write end of a pipe the accept loop also waits on: closing it wakes the loop at
    /// once. (It polled for the stop flag every 200 ms, and every `lcfs copy` that owned
    /// its cache waited on average half of that to exit.)
    wake: Option<OwnedFd>,
}

/// The connections being served, so that a stop can end them.
#[derive(Default)]
struct Conns {
    next: AtomicU64,
    open: Mutex<HashMap<u64, UnixStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Service {
    /// Binds the socket (replacing a stale one: the caller holds the directory lock, so its
    /// last owner is gone) and starts answering.
    pub(crate) fn start(owned: Arc<Owned>, addr: &SockAddr) -> Result<Service, CacheError> {
        addr.check_owner()?;
        match std::fs::remove_file(&addr.addr) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(CacheError::io(&addr.path, e))
            }
            _ => {}
        }
        let listener = UnixListener::bind(&addr.addr).map_err(|e| CacheError::io(&addr.path, e))?;
        // Non-blocking, so that a client gone between poll and accept cannot hold up a stop.
        listener
            .set_nonblocking(true)
            .map_err(|e| CacheError::io(&addr.path, e))?;
        // The directory is 0700 already; this keeps the socket private if it ever is not.
        std::fs::set_permissions(&addr.addr, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| CacheError::io(&addr.path, e))?;
        let (woken, wake) = pipe().map_err(|e| CacheError::io(&addr.path, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Conns::default());
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::Builder::new()
                .name("lcfs-cache-owner".into())
                .spawn(move || accept_loop(&listener, &woken, &owned, &stop, &conns))
                .map_err(|e| CacheError::io(&addr.path, e))?
        };
        Ok(Service {
            stop,
            conns,
            accept: Some(accept),
            wake: Some(wake),
        })
    }
}

impl Service {
    /// How many client processes are connected now.
    pub(crate) fn clients(&self) -> usize {
        self.conns.open.lock().len()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.wake.take());
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for (_, conn) in self.conns.open.lock().drain() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.conns.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    woken: &OwnedFd,
    owned: &Arc<Owned>,
    stop: &AtomicBool,
    conns: &Arc<Conns>,
) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd(), woken.as_raw_fd()) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!("cache socket accept: {e}");
                continue;
            }
        };
        match peer(&stream) {
            Ok((uid, _)) if uid == euid() => {}
            Ok((uid, pid)) => {
                warn!(
                    uid,
                    pid, "refused a connection to the cache socket from another user"
                );
                continue;
            }
            Err(e) => {
                debug!("cache socket peer: {e}");
                continue;
            }
        }
        if let Err(e) = serve_client(stream, owned.clone(), conns) {
            warn!("cannot serve a cache client: {e}");
        }
    }
}

/// Waits for a connection on `fd`, or for `woken` to be readable or hung up (the service
/// stops); true for a connection.
fn readable(fd: i32, woken: i32) -> bool {
    let mut pfds = [fd, woken].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: two valid pollfds for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
    n > 0 && pfds[0].revents & libc::POLLIN != 0
}

/// A pipe's (read, write) ends.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn serve_client(stream: UnixStream, owned: Arc<Owned>, conns: &Arc<Conns>) -> io::Result<()> {
    // Holder 0 is the owner itself.
    let id = conns.next.fetch_add(1, Ordering::Relaxed) + 1;
    conns.open.lock().insert(id, stream.try_clone()?);
    let mine = conns.clone();
    let thread = std::thread::Builder::new()
        .name("lcfs-cache-client".into())
        .spawn(move || {
            if let Err(e) = answer_all(stream, &owned, id) {
                debug!("cache client connection ended: {e}");
            }
            // A client that went away fetches nothing any more.
            owned.claims.release_all(id);
            mine.open.lock().remove(&id);
        })?;
    let mut threads = conns.threads.lock();
    threads.retain(|t| !t.is_finished());
    threads.push(thread);
    Ok(())
}

/// Answers one client's requests until it hangs up or sends a bad frame.
fn answer_all(mut stream: UnixStream, owned: &Owned, holder: Holder) -> io::Result<()> {
    loop {
        let mut header = [0; 4];
        match stream.read_exact(&mut header) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        }
        let len = frame_len(header).map_err(io::Error::other)?;
        let mut body = vec![0; len];
        stream.read_exact(&mut body)?;
        let request = Request::decode(&body).map_err(io::Error::other)?;
        stream.write_all(&answer(owned, holder, request).encode())?;
    }
}

/// What the owner answers a request of a client.
fn answer(owned: &Owned, holder: Holder, request: Request) -> Reply {
    let done = |r: Result<(), CacheError>| match r {
        Ok(()) => Reply::Done,
        Err(CacheError::NotCached { hash, .. }) => Reply::NotCached(hash),
        Err(e) => Reply::Failed(e.to_string()),
    };
    let bytes = |r: Result<Option<Vec<u8>>, CacheError>| match r {
        Ok(b) => Reply::Bytes(b),
        Err(e) => Reply::Failed(e.to_string()),
    };
    match request {
        Request::Commit(objects) => {
            // Each is committed on its own; the first failure is the answer.
            let results = objects
                .iter()
                .map(|(hash, temp)| owned.commit_temp(temp, hash));
            done(results.fold(Ok(()), Result::and))
        }
        Request::Touched(hashes) => {
            owned.touch_all(&hashes);
            Reply::Done
        }
        Request::Check(hash) => done(owned.check(&hash)),
        Request::Pin(hash) => done(owned.pin(&hash)),
        Request::Unpin(hash) => done(owned.unpin(&hash)),
        Request::UnpinAll => done(owned.unpin_all()),
        Request::SetRoot { channel, record } => done(owned.set_root(&channel, &record)),
        Request::GetRoot(channel) => bytes(owned.get_root(&channel)),
        Request::SetPublisher { channel, identity } => {
            done(owned.set_publisher(&channel, &identity))
        }
        Request::GetPublisher(channel) => bytes(owned.get_publisher(&channel)),
        Request::Usage => Reply::Usage(owned.usage()),
        Request::Flush => done(owned.flush()),
        Request::Claim(hash) => Reply::Claimed(owned.claims.claim(&hash, holder)),
        Request::Release(hash) => {
            owned.claims.release(&hash, holder);
            Reply::Done
        }
        Request::Status => match owned.status() {
            Ok(status) => Reply::Status(status),
            Err(e) => Reply::Failed(e.to_string()),
        },
        Request::Evict(limit) => match owned.evict_to(limit) {
            Ok(usage) => Reply::Usage(usage),
            Err(e) => Reply::Failed(e.to_string()),
        },
    }
}

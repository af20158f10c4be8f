//! The fuser adaptor: forwards each kernel request to the core in `fs.rs`, logs failures and
//! replies. It holds no state of its own beyond the reply settings.
//!
//! Operations that may need the source run as futures. [`FuseFs::complete`] polls such a future
//! once on the session thread (a cached listing or cached block answers at once); if it is not
//! done, the future and the reply move to a task on the tokio runtime, so the session thread
//! never waits on the network. fuser ignores FUSE_INTERRUPT: a stuck fetch is ended by the
//! source's own timeout, and the task then replies EIO.
//!
//! Every write operation answers EROFS (the mount is also read-only at the VFS level, so most
//! never get here).

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::attr::{file_type, AttrStyle, BLOCK, NAME_MAX};
use crate::error::FsError;
use crate::fs::{Fs, Xattr};
use crate::session::{Census, Ended, MountConfig};
use crate::source::Source;

/// The errno for `e`, logged: source failures are worth a warning, the rest is routine.
fn errno(op: &str, e: &FsError) -> Errno {
    match e {
        FsError::Source(_) => warn!(op, error = %e, "request failed"),
        _ => debug!(op, error = %e, "request failed"),
    }
    Errno::from_i32(e.errno())
}

/// The filesystem as fuser sees it.
pub(crate) struct FuseFs<S: Source> {
    fs: Arc<Fs<S>>,
    runtime: Handle,
    style: AttrStyle,
    max_readahead: u32,
    /// See [`MountConfig::xattrs`].
    xattrs: bool,
    ended: Arc<Ended>,
}

impl<S: Source> FuseFs<S> {
    pub(crate) fn new(
        source: Arc<S>,
        config: &MountConfig,
        runtime: Handle,
        ended: Arc<Ended>,
    ) -> FuseFs<S> {
        let (uid, gid) = if config.keep_ownership {
            (0, 0)
        } else {
            // SAFETY: getuid and getgid cannot fail and touch no memory.
            unsafe { (libc::getuid(), libc::getgid()) }
        };
        FuseFs {
            fs: Arc::new(Fs::new(source, config.min_readahead, config.max_readahead)),
            runtime,
            style: AttrStyle {
                ttl: config.attr_ttl,
                uid,
                gid,
            },
            max_readahead: u32::try_from(config.max_readahead)
                .unwrap_or(u32::MAX)
                .max(1),
            xattrs: config.xattrs,
            ended,
        }
    }

    /// The filesystem's counters.
    pub(crate) fn census(&self) -> Arc<dyn Census> {
        self.fs.clone()
    }

    /// The filesystem core, for the task that follows the source's versions.
    pub(crate) fn core(&self) -> Arc<Fs<S>> {
        self.fs.clone()
    }

    /// Runs `fut` to completion and passes its output to `done`: at once if a first poll
    /// finishes it, else from a task on the runtime.
    fn complete<T, F>(&self, fut: F, done: impl FnOnce(T) + Send + 'static)
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let _in_runtime = self.runtime.enter();
        let mut fut = Box::pin(fut);
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(out) => done(out),
            Poll::Pending => {
                self.runtime.spawn(async move { done(fut.await) });
            }
        }
    }
}

impl<S: Source> Drop for FuseFs<S> {
    fn drop(&mut self) {
        self.ended.set();
    }
}

impl<S: Source> Filesystem for FuseFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            // ACLs through the kernel's own cache: it asks for system.posix_acl_* once per
            // inode and remembers that there is none, where `ls -l` otherwise sent two
            // getxattr requests per file shown, each time (issue 13).
            | InitFlags::FUSE_POSIX_ACL;
        let _ = config.add_capabilities(wanted & config.capabilities());
        // The kernel offers its bdi readahead as the most it takes; ask for up to that.
        if let Err(nearest) = config.set_max_readahead(self.max_readahead) {
            let _ = config.set_max_readahead(nearest);
        }
        // max_write stays at fuser's 16 MiB: it also sizes max_pages, which caps read requests.
        debug!(capabilities = ?config.capabilities(), "FUSE session initialised");
        Ok(())
    }

    fn destroy(&mut self) {
        self.ended.set();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (fs, name, style) = (self.fs.clone(), name.to_owned(), self.style);
        self.complete(
            async move { fs.lookup(parent.0, &name).await },
            move |r| match r {
                Ok(e) => reply.entry(&style.ttl, &style.file_attr(e.ino, &e.attr), Generation(0)),
                Err(e) => reply.error(errno("lookup", &e)),
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.style.ttl, &self.style.file_attr(ino.0, &a)),
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno("readlink", &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno("open", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(read) => self.complete(read, move |r| match r {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => reply.error(errno("read", &e)),
            }),
            Err(e) => reply.error(errno("read", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// Directory handles carry nothing here, and the VFS itself refuses to open a file as a
    /// directory or a directory for writing. After ENOSYS the kernel opens directories
    /// without asking, keeps their listings cached (`FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR`,
    /// its default then) and sends no releasedir: a walk of a warm tree sends no request at
    /// all, where it sent an opendir and a releasedir per directory (issue 13).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = self.fs.clone();
        self.complete(async move { fs.dir(ino.0).await }, move |r| match r {
            Ok(view) => {
                for item in view.items(offset) {
                    if reply.add(
                        INodeNo(item.ino),
                        item.offset,
                        file_type(item.attr.kind),
                        item.name,
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", &e)),
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (fs, fs2, style) = (self.fs.clone(), self.fs.clone(), self.style);
        self.complete(async move { fs.dir(ino.0).await }, move |r| match r {
            Ok(view) => {
                let mut handed_out = Vec::new();
                for item in view.items(offset) {
                    let attr = style.file_attr(item.ino, item.attr);
                    if reply.add(
                        INodeNo(item.ino),
                        item.offset,
                        item.name,
                        &style.ttl,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                    handed_out.extend(item.index);
                }
                // Count the lookups before the kernel can learn of them.
                match fs2.remember(&view, &handed_out) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(errno("readdirplus", &e)),
                }
            }
            Err(e) => reply.error(errno("readdirplus", &e)),
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let totals = self.fs.totals();
        let blocks = totals.bytes.div_ceil(u64::from(BLOCK));
        reply.statfs(blocks, 0, 0, totals.files, 0, BLOCK, NAME_MAX, BLOCK);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.getxattr(ino.0, name, size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(value)) => reply.data(&value),
            Err(e) => reply.error(errno("getxattr", &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.listxattr(ino.0, size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(names)) => reply.data(&names),
            Err(e) => reply.error(errno("listxattr", &e)),
        }
    }

    /// No ioctl applies to these files: ENOTTY, as for any regular file. Python's `open()`
    /// asks TCGETS of every file it opens; fuser's default answer logged a warning for each
    /// (22 MB of log in six minutes of a soak run).
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.fs.access(ino.0, mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("access", &e)),
        }
    }

    // Everything below would change the filesystem: EROFS.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(errno("setattr", &FsError::ReadOnly));
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno("mknod", &FsError::ReadOnly));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno("mkdir", &FsError::ReadOnly));
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno("unlink", &FsError::ReadOnly));
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno("rmdir", &FsError::ReadOnly));
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _target: &Path, reply: ReplyEntry) {
        reply.error(errno("symlink", &FsError::ReadOnly));
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _newp: INodeNo,
        _newn: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno("rename", &FsError::ReadOnly));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newp: INodeNo,
        _newn: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno("link", &FsError::ReadOnly));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(errno("write", &FsError::ReadOnly));
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(errno("create", &FsError::ReadOnly));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno("setxattr", &FsError::ReadOnly));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno("removexattr", &FsError::ReadOnly));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno("fallocate", &FsError::ReadOnly));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(errno("copy_file_range", &FsError::ReadOnly));
    }
}

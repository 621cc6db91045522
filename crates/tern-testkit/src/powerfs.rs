//! A FUSE filesystem that forgets what was never synced, in the spirit of
//! Jepsen's LazyFS: a passthrough over a backing directory that holds only
//! what is *durable*.
//!
//! Why: a `kill -9` keeps the page cache, so a crash test built on it passes
//! even when a `fdatasync` is missing. Here file content reaches the backing
//! directory only through `fsync`/`fdatasync` of that file, and
//! [`PowerFs::cut`] throws away everything else, as a power cut would.
//!
//! The model:
//! * Writes, truncates, size-extending `fallocate` and hole punches
//!   (`PUNCH_HOLE|KEEP_SIZE`) go to an in-memory overlay per file (4 KiB
//!   pages holding the file's content as the application sees it, plus the
//!   file's size); reads merge the overlay over the backing file.
//! * `fsync`/`fdatasync` of a file applies its overlay to the backing file
//!   and syncs that. Closing a file does not (close is not a sync).
//! * A cut drops every overlay: each file is left as of its last sync,
//!   nothing of an unsynced write survives (not even part of it).
//! * Directory operations (create, mkdir, rename, unlink, rmdir) and
//!   permissions are applied to the backing directory at once. So this
//!   models lost file *content*, not lost directory entries: a created file
//!   survives the cut (empty if never synced), a rename survives whether or
//!   not its directory was synced. Missing directory fsyncs go unnoticed.
//! * Space reservations (`fallocate` with `KEEP_SIZE`) are passed straight
//!   through, so ENOSPC is reported as the backing filesystem would.
//! * `statfs` passes through; `lseek(SEEK_DATA/SEEK_HOLE)`, locks and
//!   reflinks are left to the kernel's fallbacks for filesystems without
//!   them (all data, local locks, a plain copy).

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PAGE: u64 = 4096;
/// Attribute and entry cache time: every change goes through this mount,
/// so the kernel's cache cannot go stale.
const TTL: Duration = Duration::from_secs(1);

/// What a cut threw away.
#[derive(Debug, Default, Clone, Copy)]
pub struct CutReport {
    /// Files that had unsynced changes.
    pub files: u64,
    /// Unsynced pages dropped (written or punched).
    pub pages: u64,
    /// Files whose unsynced size differed from their synced one.
    pub resized: u64,
    /// Unsynced pages written back anyway (by [`PowerFs::cut_keeping_some`]).
    pub kept: u64,
}

/// One file's unsynced state over its backing file.
struct FileData {
    file: File,
    /// Length of the backing file (what is durable).
    backing_len: u64,
    /// Backing bytes at or past this offset are not part of the file any
    /// more (it was truncated below them since the last sync).
    visible: u64,
    /// The file's size as the application sees it.
    size: u64,
    /// Pages changed since the last sync: their whole content (None: all
    /// zero, a punched hole). Bytes past `size` are always zero.
    pages: BTreeMap<u64, Option<Box<[u8]>>>,
    opens: u32,
}

impl FileData {
    fn open(path: &Path) -> io::Result<FileData> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(FileData {
            file,
            backing_len: len,
            visible: len,
            size: len,
            pages: BTreeMap::new(),
            opens: 0,
        })
    }

    fn clean(&self) -> bool {
        self.pages.is_empty() && self.visible == self.backing_len && self.size == self.backing_len
    }

    /// Reads `buf.len()` bytes of the backing file at `off` as far as they
    /// are visible; zeros elsewhere.
    fn read_backing(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let end = self.visible.min(self.backing_len);
        if off >= end {
            return Ok(());
        }
        let n = ((end - off) as usize).min(buf.len());
        let mut done = 0;
        while done < n {
            match self.file.read_at(&mut buf[done..n], off + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The page's current content, made dirty.
    fn page_mut(&mut self, p: u64) -> io::Result<&mut [u8]> {
        if !matches!(self.pages.get(&p), Some(Some(_))) {
            let mut b = vec![0u8; PAGE as usize].into_boxed_slice();
            if !self.pages.contains_key(&p) {
                self.read_backing(p * PAGE, &mut b)?;
            }
            self.pages.insert(p, Some(b));
        }
        Ok(self
            .pages
            .get_mut(&p)
            .and_then(|x| x.as_deref_mut())
            .expect("page"))
    }

    fn read(&self, off: u64, len: u32) -> io::Result<Vec<u8>> {
        if off >= self.size {
            return Ok(Vec::new());
        }
        let end = (off + len as u64).min(self.size);
        let mut buf = vec![0u8; (end - off) as usize];
        self.read_backing(off, &mut buf)?;
        for (&p, page) in self.pages.range(off / PAGE..end.div_ceil(PAGE)) {
            let (a, b) = ((p * PAGE).max(off), ((p + 1) * PAGE).min(end));
            let dst = &mut buf[(a - off) as usize..(b - off) as usize];
            match page {
                Some(d) => {
                    dst.copy_from_slice(&d[(a - p * PAGE) as usize..(b - p * PAGE) as usize])
                }
                None => dst.fill(0),
            }
        }
        Ok(buf)
    }

    fn write(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        let end = off + data.len() as u64;
        for p in off / PAGE..end.div_ceil(PAGE) {
            let (a, b) = ((p * PAGE).max(off), ((p + 1) * PAGE).min(end));
            let src = &data[(a - off) as usize..(b - off) as usize];
            if b - a == PAGE {
                // A whole page: no need to read what it replaces.
                self.pages.insert(p, Some(src.to_vec().into_boxed_slice()));
            } else {
                let pg = self.page_mut(p)?;
                pg[(a - p * PAGE) as usize..(b - p * PAGE) as usize].copy_from_slice(src);
            }
        }
        self.size = self.size.max(end);
        Ok(())
    }

    /// Zeroes `[off, off+len)` within the file, size unchanged.
    fn punch(&mut self, off: u64, len: u64) -> io::Result<()> {
        let end = (off + len).min(self.size);
        if off >= end {
            return Ok(());
        }
        for p in off / PAGE..end.div_ceil(PAGE) {
            let (a, b) = ((p * PAGE).max(off), ((p + 1) * PAGE).min(end));
            if a == p * PAGE && (b == (p + 1) * PAGE || b == self.size) {
                self.pages.insert(p, None);
            } else {
                let pg = self.page_mut(p)?;
                pg[(a - p * PAGE) as usize..(b - p * PAGE) as usize].fill(0);
            }
        }
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        if len < self.size {
            let first_gone = len.div_ceil(PAGE);
            self.pages.retain(|&p, _| p < first_gone);
            if !len.is_multiple_of(PAGE) && self.pages.contains_key(&(len / PAGE)) {
                let pg = self.page_mut(len / PAGE)?;
                pg[(len % PAGE) as usize..].fill(0);
            }
            self.visible = self.visible.min(len);
        }
        self.size = len;
        Ok(())
    }

    /// Writes back a random part of what is unsynced, as the kernel's
    /// writeback may have before the power went: the truncation and the
    /// size change each with even odds, then each page with even odds.
    /// Returns the pages written.
    fn write_back_some(&mut self, rng: &mut impl rand::Rng) -> io::Result<u64> {
        if self.visible < self.backing_len && rng.random_bool(0.5) {
            self.file.set_len(self.visible)?;
            self.backing_len = self.visible;
        }
        if self.size > self.backing_len && rng.random_bool(0.5) {
            self.file.set_len(self.size)?;
            self.backing_len = self.size;
        }
        let mut kept = 0;
        for (p, page) in &self.pages {
            let off = p * PAGE;
            if off >= self.size || !rng.random_bool(0.5) {
                continue;
            }
            let n = (self.size - off).min(PAGE) as usize;
            match page {
                Some(d) => self.file.write_all_at(&d[..n], off)?,
                None => punch_backing(&self.file, off, n as u64)?,
            }
            kept += 1;
        }
        Ok(kept)
    }

    /// Makes the file as the application sees it durable: the backing file
    /// gets the overlay, then is synced.
    fn sync(&mut self, datasync: bool) -> io::Result<()> {
        if self.visible < self.backing_len {
            self.file.set_len(self.visible)?;
        }
        if self.size != self.visible.min(self.backing_len) {
            self.file.set_len(self.size)?;
        }
        let pages = std::mem::take(&mut self.pages);
        for (p, page) in &pages {
            let off = p * PAGE;
            if off >= self.size {
                continue;
            }
            let n = (self.size - off).min(PAGE) as usize;
            match page {
                Some(d) => self.file.write_all_at(&d[..n], off)?,
                None => punch_backing(&self.file, off, n as u64)?,
            }
        }
        if datasync {
            self.file.sync_data()?;
        } else {
            self.file.sync_all()?;
        }
        self.backing_len = self.size;
        self.visible = self.size;
        Ok(())
    }
}

fn punch_backing(f: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        // A backing filesystem without hole punching: zeros read the same.
        f.write_all_at(&vec![0u8; len as usize], off)
    }
}

#[derive(Default)]
struct Nodes {
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    files: HashMap<u64, Arc<Mutex<FileData>>>,
    next: u64,
}

impl Nodes {
    fn ino(&mut self, path: &Path) -> u64 {
        if let Some(&i) = self.inos.get(path) {
            return i;
        }
        // 1 is the root's.
        self.next = self.next.max(INodeNo::ROOT.0) + 1;
        let i = self.next;
        self.paths.insert(i, path.to_path_buf());
        self.inos.insert(path.to_path_buf(), i);
        i
    }

    fn forget_path(&mut self, path: &Path) {
        if let Some(i) = self.inos.remove(path) {
            self.paths.remove(&i);
            // Unreachable now; drop its content unless it is still open
            // (an open unlinked file can still be written and synced).
            if self
                .files
                .get(&i)
                .is_some_and(|f| f.lock().expect("file").opens == 0)
            {
                self.files.remove(&i);
            }
        }
    }
}

struct State {
    backing: PathBuf,
    nodes: Mutex<Nodes>,
    /// Set at the cut: nothing may reach the backing directory after it.
    cut: AtomicBool,
}

fn err(e: io::Error) -> Errno {
    let n = e.raw_os_error().unwrap_or(libc::EIO);
    Errno::from_i32(n)
}

fn kind(m: &std::fs::Metadata) -> FileType {
    FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile)
}

fn time(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

impl State {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(self.backing.clone());
        }
        self.nodes
            .lock()
            .expect("nodes")
            .paths
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn ino_of(&self, path: &Path) -> u64 {
        if path == self.backing {
            return INodeNo::ROOT.0;
        }
        self.nodes.lock().expect("nodes").ino(path)
    }

    fn file(&self, ino: INodeNo) -> Option<Arc<Mutex<FileData>>> {
        self.nodes.lock().expect("nodes").files.get(&ino.0).cloned()
    }

    /// The file's overlay, opening its backing file if needed.
    fn file_open(&self, ino: INodeNo) -> Result<Arc<Mutex<FileData>>, Errno> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(Errno::EIO);
        }
        let path = self.path(ino)?;
        let mut n = self.nodes.lock().expect("nodes");
        if let Some(f) = n.files.get(&ino.0) {
            return Ok(f.clone());
        }
        let f = Arc::new(Mutex::new(FileData::open(&path).map_err(err)?));
        n.files.insert(ino.0, f.clone());
        Ok(f)
    }

    fn attr(&self, ino: u64, path: &Path) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(path).map_err(err)?;
        let mut size = m.len();
        if let Some(f) = self.file(INodeNo(ino)) {
            size = f.lock().expect("file").size;
        }
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: m.blocks().max(size.div_ceil(512)),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind(&m),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn entry(&self, path: &Path) -> Result<FileAttr, Errno> {
        let ino = self.ino_of(path);
        self.attr(ino, path)
    }
}

struct PowerFsImpl(Arc<State>);

impl Filesystem for PowerFsImpl {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.0.child(parent, name).and_then(|p| {
            std::fs::symlink_metadata(&p).map_err(err)?;
            self.0.entry(&p)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.path(ino).and_then(|p| self.0.attr(ino.0, &p)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
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
        let r = (|| {
            let path = self.0.path(ino)?;
            if let Some(m) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m & 0o7777))
                    .map_err(err)?;
            }
            if let Some(len) = size {
                let f = self.0.file_open(ino)?;
                f.lock().expect("file").truncate(len).map_err(err)?;
            }
            self.0.attr(ino.0, &path)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.0.child(parent, name).and_then(|p| {
            std::fs::create_dir(&p).map_err(err)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & !umask & 0o7777))
                .map_err(err)?;
            self.0.entry(&p)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.0.child(parent, name).and_then(|p| {
            std::fs::remove_file(&p).map_err(err)?;
            self.0.nodes.lock().expect("nodes").forget_path(&p);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.0.child(parent, name).and_then(|p| {
            std::fs::remove_dir(&p).map_err(err)?;
            self.0.nodes.lock().expect("nodes").forget_path(&p);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let from = self.0.child(parent, name)?;
            let to = self.0.child(newparent, newname)?;
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                if std::fs::symlink_metadata(&to).is_ok() {
                    return Err(Errno::EEXIST);
                }
            } else if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            let mut n = self.0.nodes.lock().expect("nodes");
            std::fs::rename(&from, &to).map_err(err)?;
            if from != to {
                n.forget_path(&to);
                // The moved node and, for a directory, everything below it.
                let moved: Vec<(u64, PathBuf)> = n
                    .paths
                    .iter()
                    .filter_map(|(&i, p)| {
                        p.strip_prefix(&from).ok().map(|rest| {
                            let q = if rest.as_os_str().is_empty() {
                                to.clone()
                            } else {
                                to.join(rest)
                            };
                            (i, q)
                        })
                    })
                    .collect();
                for (i, q) in moved {
                    if let Some(old) = n.paths.insert(i, q.clone()) {
                        n.inos.remove(&old);
                    }
                    n.inos.insert(q, i);
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.0.file_open(ino).and_then(|f| {
            let mut f = f.lock().expect("file");
            f.opens += 1;
            if flags.0 & libc::O_TRUNC != 0 {
                f.truncate(0).map_err(err)?;
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            if self.0.cut.load(Ordering::SeqCst) {
                return Err(Errno::EIO);
            }
            let p = self.0.child(parent, name)?;
            // Never truncate the backing file here: O_TRUNC of an existing
            // file is a change of content, made in the overlay below.
            OpenOptions::new()
                .write(true)
                .create(true)
                .create_new(flags & libc::O_EXCL != 0)
                .mode(mode & !umask & 0o7777)
                .open(&p)
                .map_err(err)?;
            let ino = self.0.ino_of(&p);
            let f = self.0.file_open(INodeNo(ino))?;
            {
                let mut f = f.lock().expect("file");
                f.opens += 1;
                if flags & libc::O_TRUNC != 0 {
                    f.truncate(0).map_err(err)?;
                }
            }
            self.0.attr(ino, &p)
        })();
        match r {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(a.ino.0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let r = self
            .0
            .file_open(ino)
            .and_then(|f| f.lock().expect("file").read(offset, size).map_err(err));
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self
            .0
            .file_open(ino)
            .and_then(|f| f.lock().expect("file").write(offset, data).map_err(err));
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a sync: the overlay stays.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut n = self.0.nodes.lock().expect("nodes");
        let drop_it = n.files.get(&ino.0).is_some_and(|f| {
            let mut f = f.lock().expect("file");
            f.opens = f.opens.saturating_sub(1);
            // A clean closed file needs no overlay (and no descriptor);
            // an unreachable one can never be synced.
            f.opens == 0 && f.clean()
        });
        if drop_it || (!n.paths.contains_key(&ino.0) && ino != INodeNo::ROOT) {
            n.files.remove(&ino.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = match self.0.file(ino) {
            None => Ok(()),
            Some(f) => {
                let mut f = f.lock().expect("file");
                // Checked under the file's lock: a cut takes every file's
                // lock after setting it, so no sync lands after the cut.
                if self.0.cut.load(Ordering::SeqCst) {
                    Err(Errno::EIO)
                } else {
                    f.sync(datasync).map_err(err)
                }
            }
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = (|| {
            let dir = self.0.path(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, OsStr::new(".").to_os_string()),
                (ino.0, FileType::Directory, OsStr::new("..").to_os_string()),
            ];
            let mut names: Vec<_> = std::fs::read_dir(&dir)
                .map_err(err)?
                .flatten()
                .filter_map(|e| {
                    let t = e.file_type().ok()?;
                    Some((e.file_name(), t))
                })
                .collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, t) in names {
                let i = self.0.ino_of(&dir.join(&name));
                let k = FileType::from_std(t).unwrap_or(FileType::RegularFile);
                entries.push((i, k, name));
            }
            Ok(entries)
        })();
        match r {
            Ok(entries) => {
                for (k, (i, t, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(i), k as u64 + 1, t, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory entries are applied at once (see the module comment).
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let c = std::ffi::CString::new(self.0.backing.as_os_str().as_encoded_bytes())
            .expect("path without NUL");
        // SAFETY: statvfs fills the zeroed struct we pass; c is a valid C string.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.error(err(io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.0.file_open(ino).and_then(|f| {
            let mut f = f.lock().expect("file");
            if mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE {
                return f.punch(offset, length).map_err(err);
            }
            if mode != 0 && mode != libc::FALLOC_FL_KEEP_SIZE {
                return Err(Errno::from_i32(libc::EOPNOTSUPP));
            }
            // Reserve the space in the backing file (ENOSPC as it would be
            // reported); a size change is content, kept in the overlay.
            // SAFETY: fallocate on an fd we own; no memory is passed.
            let r = unsafe {
                libc::fallocate(
                    f.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            if r != 0 {
                return Err(err(io::Error::last_os_error()));
            }
            if mode == 0 && offset + length > f.size {
                f.size = offset + length;
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted [`PowerFs`]: `mountpoint` shows `backing` plus everything not
/// yet synced.
pub struct PowerFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    state: Arc<State>,
    session: Option<BackgroundSession>,
}

/// Whether this process can mount FUSE filesystems; the reason if not.
pub fn fuse_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("power-loss tests mount FUSE filesystems and must run as root".into());
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Err(format!("/dev/fuse: {e} (modprobe fuse)"));
    }
    if which("fusermount3").is_none() {
        return Err("fusermount3 missing: install fuse3 (scripts/deps.sh)".into());
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.exists())
    })
}

/// Whether `path` is the root of a FUSE mount (statfs magic).
pub fn is_fuse_mount(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass; c is a valid C string.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut s) }) == 0 && s.f_type == 0x6573_5546
}

/// Moves the calling thread into a mount namespace of its own (once),
/// so that what it mounts, and the processes it starts, see the mount and
/// nobody else does; the mount goes with the namespace when the test
/// process and its children are gone, even if the test is killed.
pub fn private_mount_namespace() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if DONE.with(|d| d.get()) {
        return;
    }
    // SAFETY: plain syscalls on a valid NUL-terminated string; the new
    // namespace belongs to this thread (and the threads and processes it
    // starts).
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNS),
            0,
            "unshare(CLONE_NEWNS): {}",
            io::Error::last_os_error()
        );
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0,
            "making / private: {}",
            io::Error::last_os_error()
        );
    }
    DONE.with(|d| d.set(true));
}

impl PowerFs {
    /// Mounts a power-loss filesystem at `mountpoint` over `backing` (both
    /// existing directories).
    /// The mount is made in a private mount namespace of the calling
    /// thread ([`private_mount_namespace`]): use it from that thread and
    /// the threads and processes it starts.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerFs> {
        private_mount_namespace();
        let mut fs = PowerFs {
            backing: backing.canonicalize()?,
            mountpoint: mountpoint.to_path_buf(),
            state: Arc::new(State {
                backing: PathBuf::new(),
                nodes: Mutex::new(Nodes::default()),
                cut: AtomicBool::new(false),
            }),
            session: None,
        };
        fs.mount_again()?;
        Ok(fs)
    }

    fn mount_again(&mut self) -> io::Result<()> {
        self.state = Arc::new(State {
            backing: self.backing.clone(),
            nodes: Mutex::new(Nodes::default()),
            cut: AtomicBool::new(false),
        });
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("tern-powerfs".into()), MountOption::RW];
        // ternd issues I/O from many threads; one server thread would make
        // every fdatasync wait behind every write.
        config.n_threads = Some(4);
        let s = fuser::spawn_mount(PowerFsImpl(self.state.clone()), &self.mountpoint, &config)?;
        self.session = Some(s);
        let ok = crate::wait_until(Duration::from_secs(10), || is_fuse_mount(&self.mountpoint));
        if !ok {
            return Err(io::Error::other("FUSE mount did not appear within 10 s"));
        }
        Ok(())
    }

    /// Unsynced content now held in memory: (files, pages).
    pub fn dirty(&self) -> (u64, u64) {
        let n = self.state.nodes.lock().expect("nodes");
        let mut r = (0, 0);
        for f in n.files.values() {
            let f = f.lock().expect("file");
            if !f.clean() {
                r.0 += 1;
                r.1 += f.pages.len() as u64;
            }
        }
        r
    }

    /// The power cut: every unsynced change is dropped and the filesystem
    /// is mounted again over what is durable. Whoever uses the mount must
    /// be dead already (its requests would fail with EIO, or find the
    /// mount gone).
    pub fn cut(&mut self) -> io::Result<CutReport> {
        let report = self.drop_all(None);
        self.unmount()?;
        self.mount_again()?;
        Ok(report)
    }

    /// [`Self::cut`], but first a random part (seeded by `seed`) of the
    /// unsynced pages is written back, in no particular order, as the
    /// kernel may have done on its own: unsynced writes may survive in part
    /// (a journal's tail with holes, a header without its data).
    pub fn cut_keeping_some(&mut self, seed: u64) -> io::Result<CutReport> {
        let report = self.drop_all(Some(seed));
        self.unmount()?;
        self.mount_again()?;
        Ok(report)
    }

    fn drop_all(&mut self, keep_seed: Option<u64>) -> CutReport {
        use rand::SeedableRng;
        let mut rng = keep_seed.map(rand_chacha::ChaCha8Rng::seed_from_u64);
        self.state.cut.store(true, Ordering::SeqCst);
        let mut report = CutReport::default();
        let mut n = self.state.nodes.lock().expect("nodes");
        for (_, f) in n.files.drain() {
            // Taking each lock waits for a sync in progress to finish; the
            // flag set above stops any later one.
            let mut f = f.lock().expect("file");
            if !f.clean() {
                if let Some(rng) = rng.as_mut() {
                    match f.write_back_some(rng) {
                        Ok(n) => report.kept += n,
                        Err(e) => eprintln!("powerfs: partial write-back: {e}"),
                    }
                }
                report.files += 1;
                report.pages += f.pages.len() as u64;
                if f.size != f.backing_len {
                    report.resized += 1;
                }
            }
        }
        report
    }

    fn unmount(&mut self) -> io::Result<()> {
        if let Some(s) = self.session.take()
            && let Err(e) = s.umount_and_join()
        {
            // Busy (a file still open): detach it, so that the mount does
            // not outlive us, and say so.
            if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2 on a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            return Err(e);
        }
        let ok = crate::wait_until(Duration::from_secs(10), || !is_fuse_mount(&self.mountpoint));
        if !ok {
            return Err(io::Error::other(format!(
                "{} still mounted 10 s after unmount",
                self.mountpoint.display()
            )));
        }
        Ok(())
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        self.drop_all(None);
        if let Err(e) = self.unmount() {
            eprintln!("powerfs: unmount of {}: {e}", self.mountpoint.display());
        }
    }
}

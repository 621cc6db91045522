//! Object files: opening (validating or writing the header), hole punching,
//! allocation queries and directory scans. No locking here; `image.rs`
//! decides who may call what when.

use crate::header::{
    EXT_END, EXT_OFF, FIXED_LEN, HEADER_SIZE, HeaderError, INCOMPAT_SNAP, ObjectHeader, SnapExt,
};
use parking_lot::Mutex;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tern_types::ImageId;

/// The in-memory copy of an object's snapshot extension. Its mutex is also
/// the per-object lock that makes concurrent first writers clone once and
/// write the intent once.
#[derive(Debug)]
pub struct ObjMeta {
    pub ext: SnapExt,
    /// `ext` has changes the file does not have yet (written by flush).
    pub dirty: bool,
    /// The file predates the extension: persisting must also set the
    /// incompatible bit in the fixed part.
    pub legacy: bool,
}

/// An open object file (head or clone). Counts itself in the store's
/// open-fd total for as long as it lives, so the fd cap sees fds held by
/// dirty sets too.
#[derive(Debug)]
pub struct ObjectFile {
    pub file: File,
    pub no: u64,
    pub hdr: Mutex<ObjMeta>,
    open_fds: Arc<AtomicUsize>,
}

impl ObjectFile {
    pub fn new(file: File, no: u64, meta: ObjMeta, open_fds: Arc<AtomicUsize>) -> ObjectFile {
        open_fds.fetch_add(1, Ordering::Relaxed);
        ObjectFile {
            file,
            no,
            hdr: Mutex::new(meta),
            open_fds,
        }
    }
}

/// Writes the extension (and, for an old file, the fixed part with the new
/// incompatible bit) into the header page. Not synced.
pub fn persist_ext(file: &File, image_id: &ImageId, no: u64, meta: &mut ObjMeta) -> io::Result<()> {
    if meta.legacy {
        file.write_all_at(&ObjectHeader::new(image_id, no).encode(), 0)?;
        meta.legacy = false;
    }
    file.write_all_at(&meta.ext.encode(), EXT_OFF as u64)?;
    meta.dirty = false;
    Ok(())
}

impl Drop for ObjectFile {
    fn drop(&mut self) {
        self.open_fds.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn object_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016x}"))
}

/// Clone `id` of object `no`: the object as it was before the first
/// mutation in epoch `id`.
pub fn clone_path(dir: &Path, no: u64, id: u64) -> PathBuf {
    dir.join(format!("{no:016x}.{id:016x}"))
}

/// A clone being written; renamed into place once durable.
pub fn clone_tmp_path(dir: &Path, no: u64, id: u64) -> PathBuf {
    dir.join(format!("{no:016x}.{id:016x}.tmp"))
}

/// What a directory entry of an image is.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Head(u64),
    Clone(u64, u64),
    /// An unfinished clone (a crash during copy-on-write): garbage.
    Tmp,
}

pub fn parse_entry(name: &str) -> Option<Entry> {
    let mut parts = name.split('.');
    let no = parse_object_name(parts.next()?)?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some(Entry::Head(no)),
        (Some(id), None, _) => Some(Entry::Clone(no, parse_object_name(id)?)),
        (Some(id), Some("tmp"), None) => parse_object_name(id).map(|_| Entry::Tmp),
        _ => None,
    }
}

fn parse_object_name(name: &str) -> Option<u64> {
    if name.len() != 16 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(name, 16).ok()
}

pub enum OpenError {
    Io(io::Error),
    Header(HeaderError),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

/// What [`open_object`] found.
pub struct Opened {
    pub file: File,
    /// The header was written now (new file, or one whose creation a crash
    /// interrupted): the file and its directory entry are not yet durable.
    pub initialised: bool,
    pub meta: ObjMeta,
    /// The map's checksum failed (torn write): the map is zeros and must
    /// be treated as "every chunk changed".
    pub map_torn: bool,
}

/// Opens object `no` of the image whose data lives in `dir`. Without
/// `create`, a missing file is `Ok(None)` (all zeros). With `create`, the
/// image directory is made on demand, and a new header gets `born` and a
/// map of `chunks` entries. Callers serialise calls for one image so a
/// half-initialised header is never seen.
pub fn open_object(
    dir: &Path,
    image_id: &ImageId,
    no: u64,
    create: bool,
    chunks: usize,
    born: u64,
) -> Result<Option<Opened>, OpenError> {
    let path = object_path(dir, no);
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)
    };
    let file = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // The data directory is made lazily, so an image whose metadata
            // commit raced a crash never has one to clean up. Its entry in
            // objects/ must be durable before any flush of data inside it.
            match fs::create_dir(dir) {
                Ok(()) => {
                    if let Some(parent) = dir.parent() {
                        fsync_dir(parent)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
            open()?
        }
        Err(e) => return Err(e.into()),
    };
    load_header(file, image_id, no, chunks, Some(born)).map(Some)
}

/// Opens clone `id` of object `no` read-only; `Ok(None)` if it is gone.
pub fn open_clone(
    dir: &Path,
    image_id: &ImageId,
    no: u64,
    id: u64,
    chunks: usize,
) -> Result<Option<Opened>, OpenError> {
    match File::open(clone_path(dir, no, id)) {
        Ok(f) => load_header(f, image_id, no, chunks, None).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Decodes (or, for a file whose header never reached the disk and with
/// `init_born`, writes) the header page.
fn load_header(
    file: File,
    image_id: &ImageId,
    no: u64,
    chunks: usize,
    init_born: Option<u64>,
) -> Result<Opened, OpenError> {
    let mut page = vec![0u8; EXT_END];
    read_full_at(&file, &mut page, 0)?;
    let fixed: &[u8; FIXED_LEN] = page[..FIXED_LEN].try_into().expect("fixed part");
    match ObjectHeader::decode(fixed).map_err(OpenError::Header)? {
        Some(h) => {
            h.check_identity(image_id, no).map_err(OpenError::Header)?;
            if h.incompat & INCOMPAT_SNAP == 0 {
                return Ok(Opened {
                    file,
                    initialised: false,
                    meta: ObjMeta {
                        ext: SnapExt::new(0, chunks),
                        dirty: false,
                        legacy: true,
                    },
                    map_torn: false,
                });
            }
            let d = SnapExt::decode(&page, chunks).map_err(OpenError::Header)?;
            Ok(Opened {
                file,
                initialised: false,
                meta: ObjMeta {
                    ext: d.ext,
                    dirty: false,
                    legacy: false,
                },
                map_torn: !d.map_ok,
            })
        }
        None => {
            // Data is only ever written after an intent that was synced
            // together with this header, so a zero header means the file
            // holds nothing acknowledged: a fresh object.
            let Some(born) = init_born else {
                return Err(OpenError::Header(HeaderError::BadMagic { found: [0; 8] }));
            };
            let meta = ObjMeta {
                ext: SnapExt::new(born, chunks),
                dirty: false,
                legacy: false,
            };
            let mut page = vec![0u8; HEADER_SIZE as usize];
            page[..FIXED_LEN].copy_from_slice(&ObjectHeader::new(image_id, no).encode());
            page[EXT_OFF..EXT_END].copy_from_slice(&meta.ext.encode());
            file.write_all_at(&page, 0)?;
            Ok(Opened {
                file,
                initialised: true,
                meta,
                map_torn: false,
            })
        }
    }
}

/// Makes `dst` (a new file) a copy of `src`, sharing blocks by reflink
/// where the filesystem can, else copying only the data ranges so holes
/// stay holes. Not synced.
pub fn copy_file(src: &File, dst: &Path) -> io::Result<File> {
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)?;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are ours.
    let r = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        return Ok(out);
    }
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    for (a, b) in data_ranges(src, 0, len)? {
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(buf.len() as u64) as usize;
            let got = read_full_at(src, &mut buf[..n], pos)?;
            out.write_all_at(&buf[..got], pos)?;
            if got < n {
                break;
            }
            pos += n as u64;
        }
    }
    out.set_len(len)?;
    Ok(out)
}

/// Reads as much of `buf` as the file holds at `off`; returns the count.
/// Bytes past the end of the file are the caller's to zero.
pub fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Deallocates `[off, off+len)` of the file (file offsets) so it reads as
/// zeros and uses no space.
pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    let size = file.metadata()?.len();
    if off >= size || len == 0 {
        return Ok(()); // past EOF already reads as zeros
    }
    let len = len.min(size - off);
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    // A filesystem without hole punching still gets the semantics, if not
    // the space back.
    let zeros = vec![0u8; 1 << 20];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], pos)?;
        pos += n;
    }
    Ok(())
}

/// File ranges `[a, b)` inside `[start, end)` that hold data, by
/// SEEK_DATA/SEEK_HOLE: no data is read. A filesystem without them reports
/// everything up to EOF as data, which is a safe over-approximation.
pub fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on an fd we own. The file position it moves is never
        // used: all I/O is positioned.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) => {
                    let len = file.metadata()?.len();
                    if len > start {
                        out.push((start, end.min(len)));
                    }
                    Ok(out)
                }
                _ => Err(e),
            };
        }
        let d = d as u64;
        if d >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d as libc::off_t, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(io::Error::last_os_error());
        }
        let h = (h as u64).min(end);
        out.push((d, h));
        pos = h;
    }
    Ok(out)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Object numbers present in an image directory (none if it does not exist).
pub fn list_objects(dir: &Path) -> io::Result<Vec<u64>> {
    Ok(list_dir(dir)?.heads)
}

/// One listing of an image directory.
#[derive(Debug, Default)]
pub struct Listing {
    /// Head object numbers, sorted.
    pub heads: Vec<u64>,
    /// `(object no, clone id)`, sorted.
    pub clones: Vec<(u64, u64)>,
    pub tmps: Vec<PathBuf>,
}

pub fn list_dir(dir: &Path) -> io::Result<Listing> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
        Err(e) => return Err(e),
    };
    let mut out = Listing::default();
    for entry in rd {
        let entry = entry?;
        match entry.file_name().to_str().and_then(parse_entry) {
            Some(Entry::Head(no)) => out.heads.push(no),
            Some(Entry::Clone(no, id)) => out.clones.push((no, id)),
            Some(Entry::Tmp) => out.tmps.push(entry.path()),
            None => {}
        }
    }
    out.heads.sort_unstable();
    out.clones.sort_unstable();
    Ok(out)
}

/// On-disk bytes (allocated blocks, clones included) and number of head
/// object files of an image directory.
pub fn dir_usage(dir: &Path) -> io::Result<(u64, u64)> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let (mut bytes, mut count) = (0, 0);
    for entry in rd {
        let entry = entry?;
        let Some(kind) = entry.file_name().to_str().and_then(parse_entry) else {
            continue;
        };
        match entry.metadata() {
            Ok(m) => {
                bytes += m.blocks() * 512;
                count += u64::from(matches!(kind, Entry::Head(_)));
            }
            // Deleted by a concurrent discard between readdir and stat.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok((bytes, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_object_name("00000000000000ff"), Some(255));
        assert_eq!(parse_object_name("ff"), None);
        assert_eq!(parse_object_name("000000000000000g"), None);
        assert_eq!(
            object_path(Path::new("/d"), 255),
            PathBuf::from("/d/00000000000000ff")
        );
        assert_eq!(
            clone_path(Path::new("/d"), 255, 3),
            PathBuf::from("/d/00000000000000ff.0000000000000003")
        );
        assert_eq!(
            parse_entry("00000000000000ff.0000000000000003"),
            Some(Entry::Clone(255, 3))
        );
        assert_eq!(
            parse_entry("00000000000000ff.0000000000000003.tmp"),
            Some(Entry::Tmp)
        );
        assert_eq!(parse_entry("00000000000000ff"), Some(Entry::Head(255)));
        assert_eq!(parse_entry("00000000000000ff.x"), None);
    }

    #[test]
    fn create_reopen_and_reject() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        let id = ImageId::parse("abc").unwrap();
        assert!(
            open_object(&dir, &id, 3, false, 4, 0)
                .ok()
                .unwrap()
                .is_none()
        );
        let o = open_object(&dir, &id, 3, true, 4, 0).ok().unwrap().unwrap();
        assert!(o.initialised);
        assert_eq!(o.file.metadata().unwrap().len(), HEADER_SIZE);
        let o = open_object(&dir, &id, 3, false, 4, 0)
            .ok()
            .unwrap()
            .unwrap();
        assert!(!o.initialised);
        // A file moved to the wrong object number is caught.
        fs::rename(object_path(&dir, 3), object_path(&dir, 4)).unwrap();
        assert!(matches!(
            open_object(&dir, &id, 4, false, 4, 0),
            Err(OpenError::Header(HeaderError::WrongObject { .. }))
        ));
        // Garbage is caught.
        fs::write(object_path(&dir, 5), b"hello world").unwrap();
        assert!(matches!(
            open_object(&dir, &id, 5, false, 4, 0),
            Err(OpenError::Header(HeaderError::BadMagic { .. }))
        ));
        // An empty file (creation interrupted by a crash) is re-initialised.
        fs::write(object_path(&dir, 6), b"").unwrap();
        assert!(
            open_object(&dir, &id, 6, false, 4, 0)
                .ok()
                .unwrap()
                .unwrap()
                .initialised
        );
    }

    #[test]
    fn holes() {
        let t = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(t.path().join("f"))
            .unwrap();
        f.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
        let r = data_ranges(&f, 0, 4 << 20).unwrap();
        assert_eq!(r, vec![(1 << 20, (1 << 20) + 8192)]);
        punch_hole(&f, 1 << 20, 4096).unwrap();
        let r = data_ranges(&f, 0, 4 << 20).unwrap();
        assert_eq!(r, vec![((1 << 20) + 4096, (1 << 20) + 8192)]);
        let mut b = [9u8; 4096];
        read_full_at(&f, &mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
}

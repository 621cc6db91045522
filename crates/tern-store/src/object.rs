//! Object files: opening (validating or writing the header), hole punching,
//! allocation queries and directory scans. No locking here; `image.rs`
//! decides who may call what when.

use crate::header::{FIXED_LEN, HEADER_SIZE, HeaderError, ObjectHeader};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tern_types::ImageId;

/// An open object file. Counts itself in the store's open-fd total for as
/// long as it lives, so the fd cap sees fds held by dirty sets too.
#[derive(Debug)]
pub struct ObjectFile {
    pub file: File,
    pub no: u64,
    open_fds: Arc<AtomicUsize>,
}

impl ObjectFile {
    pub fn new(file: File, no: u64, open_fds: Arc<AtomicUsize>) -> ObjectFile {
        open_fds.fetch_add(1, Ordering::Relaxed);
        ObjectFile { file, no, open_fds }
    }
}

impl Drop for ObjectFile {
    fn drop(&mut self) {
        self.open_fds.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn object_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016x}"))
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
}

/// Opens object `no` of the image whose data lives in `dir`. Without
/// `create`, a missing file is `Ok(None)` (all zeros). With `create`, the
/// image directory is made on demand. Callers serialise calls for one image
/// so a half-initialised header is never seen.
pub fn open_object(
    dir: &Path,
    image_id: &ImageId,
    no: u64,
    create: bool,
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
    let mut fixed = [0u8; FIXED_LEN];
    read_full_at(&file, &mut fixed, 0)?;
    let initialised = match ObjectHeader::decode(&fixed).map_err(OpenError::Header)? {
        Some(h) => {
            h.check_identity(image_id, no).map_err(OpenError::Header)?;
            false
        }
        None => {
            let mut page = vec![0u8; HEADER_SIZE as usize];
            page[..FIXED_LEN].copy_from_slice(&ObjectHeader::new(image_id, no).encode());
            file.write_all_at(&page, 0)?;
            true
        }
    };
    Ok(Some(Opened { file, initialised }))
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
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in rd {
        if let Some(no) = entry?.file_name().to_str().and_then(parse_object_name) {
            out.push(no);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// On-disk bytes (allocated blocks) and number of object files of an image
/// directory.
pub fn dir_usage(dir: &Path) -> io::Result<(u64, u64)> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let (mut bytes, mut count) = (0, 0);
    for entry in rd {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .and_then(parse_object_name)
            .is_none()
        {
            continue;
        }
        match entry.metadata() {
            Ok(m) => {
                bytes += m.blocks() * 512;
                count += 1;
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
    }

    #[test]
    fn create_reopen_and_reject() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        let id = ImageId::parse("abc").unwrap();
        assert!(open_object(&dir, &id, 3, false).ok().unwrap().is_none());
        let o = open_object(&dir, &id, 3, true).ok().unwrap().unwrap();
        assert!(o.initialised);
        assert_eq!(o.file.metadata().unwrap().len(), HEADER_SIZE);
        let o = open_object(&dir, &id, 3, false).ok().unwrap().unwrap();
        assert!(!o.initialised);
        // A file moved to the wrong object number is caught.
        fs::rename(object_path(&dir, 3), object_path(&dir, 4)).unwrap();
        assert!(matches!(
            open_object(&dir, &id, 4, false),
            Err(OpenError::Header(HeaderError::WrongObject { .. }))
        ));
        // Garbage is caught.
        fs::write(object_path(&dir, 5), b"hello world").unwrap();
        assert!(matches!(
            open_object(&dir, &id, 5, false),
            Err(OpenError::Header(HeaderError::BadMagic { .. }))
        ));
        // An empty file (creation interrupted by a crash) is re-initialised.
        fs::write(object_path(&dir, 6), b"").unwrap();
        assert!(
            open_object(&dir, &id, 6, false)
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

//! Segment files: naming, creation and sequential scanning.
//!
//! A journal directory holds `<segno, 16 hex>.jseg` files. Each starts with
//! a [`SegmentHeader`]; entries follow back to back. Only the newest
//! segment is ever appended to, and it is synced before the next one is
//! created, so only the newest can end in a torn entry.

use super::format::{ENTRY_HEADER_LEN, FormatError, JournalEntry, SEG_HEADER_LEN, SegmentHeader};
use crate::object::{fsync_dir, read_full_at};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const SEG_SUFFIX: &str = ".jseg";

pub fn seg_path(dir: &Path, segno: u64) -> PathBuf {
    dir.join(format!("{segno:016x}{SEG_SUFFIX}"))
}

/// Segment numbers present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEG_SUFFIX)) else {
            continue;
        };
        if stem.len() == 16
            && let Ok(n) = u64::from_str_radix(stem, 16)
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Creates segment `segno` holding no entries yet, durably (file, header
/// and directory entry), and returns it open for appending.
pub fn create(dir: &Path, header: &SegmentHeader) -> io::Result<File> {
    let path = seg_path(dir, header.segno);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    f.write_all_at(&header.encode(), 0)?;
    f.sync_data()?;
    // The entry in the directory must survive before any entry in the file
    // is reported durable.
    fsync_dir(dir)?;
    Ok(f)
}

pub const SPARE_SUFFIX: &str = ".jspare";

pub fn spare_path(dir: &Path, k: u64) -> PathBuf {
    dir.join(format!("{k:016x}{SPARE_SUFFIX}"))
}

/// Spare (trimmed, kept for reuse) segment files in `dir`; deletes
/// half-prepared ones.
pub fn list_spares(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.ends_with(".jspare.tmp")) {
            // Gone already is as good as deleted.
            match fs::remove_file(entry.path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => continue,
            }
        }
        if let Some(k) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SPARE_SUFFIX))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
        {
            out.push(k);
        }
    }
    Ok(out)
}

/// Writes spare `k`: `size` bytes of zeros, durable, then named a spare
/// (a crash before leaves a `.tmp` file, deleted at the next open).
pub fn prepare_spare(dir: &Path, k: u64, size: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{k:016x}{SPARE_SUFFIX}.tmp"));
    let r = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        f.sync_data()?;
        fs::rename(&tmp, spare_path(dir, k))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Makes spare `k` segment `header.segno`: the new header is durable
/// before the file takes the segment's name (a crash in between leaves a
/// spare). What follows the header is old entries, which a scan tells
/// apart by their tids.
pub fn reuse(dir: &Path, k: u64, header: &SegmentHeader) -> io::Result<File> {
    let spare = spare_path(dir, k);
    let r = (|| {
        let f = OpenOptions::new().read(true).write(true).open(&spare)?;
        f.write_all_at(&header.encode(), 0)?;
        f.sync_data()?;
        fs::rename(&spare, seg_path(dir, header.segno))?;
        fsync_dir(dir)?;
        Ok(f)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&spare);
    }
    r
}

/// Allocates `[off, off+len)` of a segment without changing its length,
/// so that writing there cannot meet a full disk. Filesystems without
/// `fallocate` are left as they are.
pub fn allocate(f: &File, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}

pub fn open_rw(dir: &Path, segno: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg_path(dir, segno))
}

pub fn open_ro(dir: &Path, segno: u64) -> io::Result<File> {
    File::open(seg_path(dir, segno))
}

pub fn read_header(f: &File) -> io::Result<Result<SegmentHeader, FormatError>> {
    let mut b = [0u8; SEG_HEADER_LEN];
    let n = read_full_at(f, &mut b, 0)?;
    Ok(SegmentHeader::decode(&b[..n]))
}

/// Where and why a scan stopped.
#[derive(Debug)]
pub struct ScanEnd {
    /// File offset just past the last good entry.
    pub end: u64,
    /// `None`: the file ended exactly after an entry. Otherwise the reason
    /// the bytes from `end` on are not an entry (a torn tail, or damage).
    pub stop: Option<FormatError>,
}

/// Reads entries of a segment sequentially from file offset `off` (an
/// entry boundary) to `limit` (at most the file length), calling `visit`
/// with each entry's offset, the entry and its length. `visit` returns
/// false to stop early. Reads in large chunks; one entry is never split
/// over two reads.
pub fn scan(
    f: &File,
    mut off: u64,
    limit: u64,
    mut visit: impl FnMut(u64, JournalEntry, usize) -> bool,
) -> io::Result<ScanEnd> {
    const CHUNK: usize = 1 << 20;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_off = off;
    // Makes `buf` hold `[off, off + need)` if the file has it; returns the
    // bytes available from `off`.
    let fill = |buf: &mut Vec<u8>, buf_off: &mut u64, off: u64, need: usize| -> io::Result<usize> {
        let have_end = *buf_off + buf.len() as u64;
        if off >= *buf_off && off + need as u64 <= have_end {
            return Ok(need);
        }
        let want = need.max(CHUNK).min((limit.saturating_sub(off)) as usize);
        buf.resize(want, 0);
        let n = read_full_at(f, buf, off)?;
        buf.truncate(n);
        *buf_off = off;
        Ok(n.min(need))
    };
    loop {
        if off >= limit {
            return Ok(ScanEnd {
                end: off,
                stop: None,
            });
        }
        let got = fill(&mut buf, &mut buf_off, off, ENTRY_HEADER_LEN)?;
        let at = (off - buf_off) as usize;
        let total = match JournalEntry::check_header(&buf[at..at + got]) {
            Ok(t) => t,
            Err(e) => {
                return Ok(ScanEnd {
                    end: off,
                    stop: Some(e),
                });
            }
        };
        let got = fill(&mut buf, &mut buf_off, off, total)?;
        let at = (off - buf_off) as usize;
        match JournalEntry::decode(&buf[at..at + got]) {
            Ok((e, n)) => {
                if !visit(off, e, n) {
                    return Ok(ScanEnd {
                        end: off + n as u64,
                        stop: None,
                    });
                }
                off += n as u64;
            }
            Err(e) => {
                return Ok(ScanEnd {
                    end: off,
                    stop: Some(e),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::JournalOp;
    use tern_types::ImageId;

    #[test]
    fn names_and_scan() {
        let t = tempfile::tempdir().unwrap();
        let id = ImageId::parse("abc").unwrap();
        assert_eq!(
            seg_path(Path::new("/j"), 0x1f),
            PathBuf::from("/j/000000000000001f.jseg")
        );
        let f = create(t.path(), &SegmentHeader::new(&id, 2, 10)).unwrap();
        fs::write(t.path().join("junk"), b"x").unwrap();
        assert_eq!(list_segments(t.path()).unwrap(), vec![2]);
        let mut bytes = Vec::new();
        for tid in 10..20 {
            JournalEntry {
                tid,
                timestamp_us: 0,
                op: JournalOp::Write {
                    offset: tid,
                    data: vec![tid as u8; 700_000],
                },
            }
            .encode_into(&mut bytes);
        }
        f.write_all_at(&bytes, SEG_HEADER_LEN as u64).unwrap();
        // A torn tail: half an entry.
        let len = SEG_HEADER_LEN as u64 + bytes.len() as u64;
        f.write_all_at(&bytes[..100], len).unwrap();
        assert_eq!(read_header(&f).unwrap().unwrap().first_tid, 10);
        let mut tids = Vec::new();
        let end = scan(&f, SEG_HEADER_LEN as u64, len + 100, |_, e, _| {
            tids.push(e.tid);
            true
        })
        .unwrap();
        assert_eq!(tids, (10..20).collect::<Vec<_>>());
        assert_eq!(end.end, len);
        assert!(matches!(end.stop, Some(FormatError::Short { .. })));
    }
}

//! rbd's export-diff stream formats, "rbd diff v1" and "rbd diff v2"
//! (Ceph's doc/dev/rbd-diff.rst), and the "rbd image v2" full export
//! (doc/dev/rbd-export.rst), so deltas move between Ceph and tern both ways.
//!
//! v1: after the banner, each record is a tag byte and a fixed payload:
//! `f`/`t` (le32 length + snapshot name), `s` (le64 size), `w` (le64 offset,
//! le64 length, data), `z` (le64 offset, le64 length), `e` (end, no payload).
//! v2: the same tags, but every record except `e` carries a le64 payload
//! length after the tag, so readers can skip tags they do not know.
//!
//! The reader trusts nothing: lengths are bounded, unknown v1 tags and
//! missing end records are errors, and data is handed out in pieces so a
//! hostile length cannot make it allocate.

use std::fmt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const BANNER_V1: &[u8] = b"rbd diff v1\n";
pub const BANNER_V2: &[u8] = b"rbd diff v2\n";
pub const IMAGE_BANNER_V2: &[u8] = b"rbd image v2\n";
pub const IMAGE_DIFFS_BANNER_V2: &[u8] = b"rbd image diffs v2\n";
const MAX_NAME: u32 = 4096;
/// Largest image a stream may declare: the store's limit.
const MAX_SIZE: u64 = 1 << 60;

#[derive(Debug)]
pub enum DiffError {
    Io(std::io::Error),
    /// The stream ended before its end record.
    Truncated(&'static str),
    Malformed(String),
}

impl fmt::Display for DiffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiffError::Io(e) => write!(f, "reading the diff stream: {e}"),
            DiffError::Truncated(what) => {
                write!(
                    f,
                    "the diff stream is truncated ({what}): it has no end record"
                )
            }
            DiffError::Malformed(m) => write!(f, "malformed diff stream: {m}"),
        }
    }
}

impl std::error::Error for DiffError {}

fn eof_to_truncated(e: std::io::Error, what: &'static str) -> DiffError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        DiffError::Truncated(what)
    } else {
        DiffError::Io(e)
    }
}

/// One record, with `Write` data left in the stream for [`DiffReader::read_data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    FromSnap(String),
    ToSnap(String),
    Size(u64),
    /// Snapshot protection status (export format 2).
    Protected(bool),
    Write {
        offset: u64,
        length: u64,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    End,
}

pub struct DiffReader<R> {
    r: R,
    pub version: u8,
    data_left: u64,
}

impl<R: AsyncRead + Unpin> DiffReader<R> {
    /// Reads and checks the banner.
    pub async fn new(mut r: R) -> Result<Self, DiffError> {
        let mut b = [0u8; 12];
        r.read_exact(&mut b)
            .await
            .map_err(|e| eof_to_truncated(e, "banner"))?;
        let version = match &b[..] {
            x if x == BANNER_V1 => 1,
            x if x == BANNER_V2 => 2,
            _ => {
                return Err(DiffError::Malformed(format!(
                    "unknown banner {:?}: not an rbd export-diff stream",
                    String::from_utf8_lossy(&b)
                )));
            }
        };
        Ok(DiffReader {
            r,
            version,
            data_left: 0,
        })
    }

    /// Continues on a stream whose banner the caller already consumed
    /// (the diffs inside an "rbd image v2" export).
    pub fn with_version(r: R, version: u8) -> Self {
        DiffReader {
            r,
            version,
            data_left: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    async fn u8(&mut self, what: &'static str) -> Result<u8, DiffError> {
        self.r
            .read_u8()
            .await
            .map_err(|e| eof_to_truncated(e, what))
    }
    async fn u32(&mut self, what: &'static str) -> Result<u32, DiffError> {
        self.r
            .read_u32_le()
            .await
            .map_err(|e| eof_to_truncated(e, what))
    }
    async fn u64(&mut self, what: &'static str) -> Result<u64, DiffError> {
        self.r
            .read_u64_le()
            .await
            .map_err(|e| eof_to_truncated(e, what))
    }

    async fn name(&mut self, what: &'static str) -> Result<String, DiffError> {
        let n = self.u32(what).await?;
        if n == 0 || n > MAX_NAME {
            return Err(DiffError::Malformed(format!(
                "{what} name length {n} out of range"
            )));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .await
            .map_err(|e| eof_to_truncated(e, what))?;
        String::from_utf8(b).map_err(|_| DiffError::Malformed(format!("{what} name is not UTF-8")))
    }

    async fn skip(&mut self, mut n: u64, what: &'static str) -> Result<(), DiffError> {
        let mut buf = [0u8; 4096];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.r
                .read_exact(&mut buf[..k])
                .await
                .map_err(|e| eof_to_truncated(e, what))?;
            n -= k as u64;
        }
        Ok(())
    }

    /// The next record. The data of a `Write` must be consumed with
    /// [`read_data`](Self::read_data) before calling this again.
    pub async fn next(&mut self) -> Result<Record, DiffError> {
        if self.data_left != 0 {
            return Err(DiffError::Malformed(
                "data of the previous write record not consumed".into(),
            ));
        }
        loop {
            let tag = self.u8("record tag").await?;
            if tag == b'e' {
                return Ok(Record::End);
            }
            let len = if self.version == 2 {
                Some(self.u64("record length").await?)
            } else {
                None
            };
            let expect = |want: u64| -> Result<(), DiffError> {
                match len {
                    Some(l) if l != want => Err(DiffError::Malformed(format!(
                        "record '{}' has length {l}, expected {want}",
                        tag as char
                    ))),
                    _ => Ok(()),
                }
            };
            let rec = match tag {
                b'f' | b't' => {
                    let name = self
                        .name(if tag == b'f' { "from snap" } else { "to snap" })
                        .await?;
                    expect(4 + name.len() as u64)?;
                    if tag == b'f' {
                        Record::FromSnap(name)
                    } else {
                        Record::ToSnap(name)
                    }
                }
                b's' => {
                    expect(8)?;
                    let size = self.u64("size").await?;
                    if size > MAX_SIZE {
                        return Err(DiffError::Malformed(format!(
                            "image size {size} is too large"
                        )));
                    }
                    Record::Size(size)
                }
                b'p' if self.version == 2 => {
                    // Ceph 16.2 writes a length of 8 before the single status byte,
                    // later releases 1: read the byte either way.
                    let v = self.u8("protection status").await?;
                    Record::Protected(v != 0)
                }
                b'w' | b'z' => {
                    let offset = self.u64("extent offset").await?;
                    let length = self.u64("extent length").await?;
                    if offset.checked_add(length).is_none_or(|e| e > MAX_SIZE) {
                        return Err(DiffError::Malformed(format!(
                            "extent {offset}+{length} out of range"
                        )));
                    }
                    if tag == b'w' {
                        expect(16 + length)?;
                        self.data_left = length;
                        Record::Write { offset, length }
                    } else {
                        expect(16)?;
                        Record::Zero { offset, length }
                    }
                }
                other => match len {
                    // v2 lets readers skip what they do not know.
                    Some(l) => {
                        self.skip(l, "unknown record").await?;
                        continue;
                    }
                    None => {
                        return Err(DiffError::Malformed(format!(
                            "unknown record tag {other:#04x}"
                        )));
                    }
                },
            };
            return Ok(rec);
        }
    }

    /// Reads up to `buf.len()` bytes of the current write record's data;
    /// returns 0 when it is all consumed.
    pub async fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DiffError> {
        let n = (buf.len() as u64).min(self.data_left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.r
            .read_exact(&mut buf[..n])
            .await
            .map_err(|e| eof_to_truncated(e, "write data"))?;
        self.data_left -= n as u64;
        Ok(n)
    }
}

/// The image-level header of an export-format 2 ("rbd image v2") stream,
/// as Ceph's `rbd export --export-format 2` writes it
/// (`src/tools/rbd/action/Export.cc`): the banner; metadata records, each a
/// tag, a le64 length and the value (`O` order, `T` features, `U` stripe
/// unit, `C` stripe count as le64, `M` one image-meta key and value as
/// le32-length strings); `E`; the "rbd image diffs v2" banner; and the
/// le64 number of "rbd diff v2" streams that follow (one per snapshot,
/// then the head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeaderV2 {
    /// Object size as a power of two (`O`); 22 when absent.
    pub order: u64,
    /// rbd feature bits (`T`), if recorded.
    pub features: Option<u64>,
    pub stripe_unit: u64,
    pub stripe_count: u64,
    /// Image metadata (`M`), in the order of the stream.
    pub meta: Vec<(String, String)>,
    pub diffs: u64,
}

/// Largest metadata record of an image header, and most diffs in one
/// export: bounds on what a hostile header can make the reader allocate.
const MAX_META_RECORD: u64 = 1 << 20;
const MAX_DIFFS: u64 = 1 << 20;

/// Splits an `M` record's value into its two le32-length strings.
fn image_meta(v: &[u8]) -> Option<(String, String)> {
    let mut rest = v;
    let mut take = || {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let s = String::from_utf8(rest.get(4..4 + n)?.to_vec()).ok()?;
        rest = &rest[4 + n..];
        Some(s)
    };
    let kv = (take()?, take()?);
    rest.is_empty().then_some(kv)
}

impl ImageHeaderV2 {
    /// Reads and checks the header, banners included. Unknown metadata
    /// records are skipped by their length, as Ceph's reader does. Streams
    /// from tern before 0.1 (no diffs banner after `E`) are still read.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<ImageHeaderV2, DiffError> {
        let t = |e| eof_to_truncated(e, "image header");
        let mut banner = [0u8; IMAGE_BANNER_V2.len()];
        r.read_exact(&mut banner).await.map_err(t)?;
        if banner != IMAGE_BANNER_V2 {
            return Err(DiffError::Malformed(
                "not an rbd export-format 2 stream (no 'rbd image v2' banner)".into(),
            ));
        }
        let mut h = ImageHeaderV2 {
            order: 22,
            features: None,
            stripe_unit: 0,
            stripe_count: 0,
            meta: Vec::new(),
            diffs: 0,
        };
        loop {
            let tag = r.read_u8().await.map_err(t)?;
            if tag == b'E' {
                break;
            }
            let len = r.read_u64_le().await.map_err(t)?;
            if len > MAX_META_RECORD {
                return Err(DiffError::Malformed(format!(
                    "metadata record '{}' of {len} bytes is too large",
                    tag.escape_ascii()
                )));
            }
            let mut v = vec![0u8; len as usize];
            r.read_exact(&mut v).await.map_err(t)?;
            let num = || {
                v.get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            };
            match tag {
                b'O' => h.order = num().unwrap_or(22),
                b'T' => h.features = num(),
                b'U' => h.stripe_unit = num().unwrap_or(0),
                b'C' => h.stripe_count = num().unwrap_or(0),
                b'M' => {
                    h.meta.push(image_meta(&v).ok_or_else(|| {
                        DiffError::Malformed("malformed image-meta record".into())
                    })?)
                }
                _ => {}
            }
        }
        let mut count = [0u8; 8];
        r.read_exact(&mut count).await.map_err(t)?;
        if count == IMAGE_DIFFS_BANNER_V2[..8] {
            let mut rest = [0u8; IMAGE_DIFFS_BANNER_V2.len() - 8];
            r.read_exact(&mut rest).await.map_err(t)?;
            if rest != IMAGE_DIFFS_BANNER_V2[8..] {
                return Err(DiffError::Malformed(
                    "no 'rbd image diffs v2' banner after the image header".into(),
                ));
            }
            r.read_exact(&mut count).await.map_err(t)?;
        }
        h.diffs = u64::from_le_bytes(count);
        if h.diffs == 0 || h.diffs > MAX_DIFFS {
            return Err(DiffError::Malformed(format!(
                "export declares {} diffs",
                h.diffs
            )));
        }
        Ok(h)
    }

    /// Writes the header byte for byte as Ceph 16.2 does.
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(IMAGE_BANNER_V2).await?;
        let mut recs = vec![(b'O', self.order)];
        if let Some(f) = self.features {
            recs.push((b'T', f));
        }
        recs.extend([(b'U', self.stripe_unit), (b'C', self.stripe_count)]);
        for (tag, v) in recs {
            w.write_u8(tag).await?;
            w.write_u64_le(8).await?;
            w.write_u64_le(v).await?;
        }
        for (k, v) in &self.meta {
            w.write_u8(b'M').await?;
            w.write_u64_le(8 + k.len() as u64 + v.len() as u64).await?;
            for s in [k, v] {
                w.write_u32_le(s.len() as u32).await?;
                w.write_all(s.as_bytes()).await?;
            }
        }
        w.write_u8(b'E').await?;
        w.write_all(IMAGE_DIFFS_BANNER_V2).await?;
        w.write_u64_le(self.diffs).await
    }
}

pub struct DiffWriter<W> {
    w: W,
    version: u8,
}

impl<W: AsyncWrite + Unpin> DiffWriter<W> {
    pub async fn new(mut w: W, version: u8) -> std::io::Result<Self> {
        w.write_all(if version == 2 { BANNER_V2 } else { BANNER_V1 })
            .await?;
        Ok(DiffWriter { w, version })
    }

    async fn len(&mut self, n: u64) -> std::io::Result<()> {
        if self.version == 2 {
            self.w.write_u64_le(n).await?;
        }
        Ok(())
    }

    pub async fn snap(&mut self, from: bool, name: &str) -> std::io::Result<()> {
        self.w.write_u8(if from { b'f' } else { b't' }).await?;
        self.len(4 + name.len() as u64).await?;
        self.w.write_u32_le(name.len() as u32).await?;
        self.w.write_all(name.as_bytes()).await
    }

    pub async fn size(&mut self, size: u64) -> std::io::Result<()> {
        self.w.write_u8(b's').await?;
        self.len(8).await?;
        self.w.write_u64_le(size).await
    }

    /// Ceph 16.2 declares 8 bytes and writes one; so does this, so the
    /// stream is the one Ceph writes.
    pub async fn protected(&mut self, p: bool) -> std::io::Result<()> {
        self.w.write_u8(b'p').await?;
        self.len(8).await?;
        self.w.write_u8(p as u8).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.w.write_u8(b'w').await?;
        self.len(16 + data.len() as u64).await?;
        self.w.write_u64_le(offset).await?;
        self.w.write_u64_le(data.len() as u64).await?;
        self.w.write_all(data).await
    }

    pub async fn zero(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        self.w.write_u8(b'z').await?;
        self.len(16).await?;
        self.w.write_u64_le(offset).await?;
        self.w.write_u64_le(length).await
    }

    pub async fn end(mut self) -> std::io::Result<W> {
        self.w.write_u8(b'e').await?;
        self.w.flush().await?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn roundtrip(version: u8) {
        let mut w = DiffWriter::new(Vec::new(), version).await.unwrap();
        w.snap(true, "a").await.unwrap();
        w.snap(false, "b").await.unwrap();
        w.size(1 << 20).await.unwrap();
        w.write(4096, &[7u8; 100]).await.unwrap();
        w.zero(8192, 4096).await.unwrap();
        let bytes = w.end().await.unwrap();
        let mut r = DiffReader::new(&bytes[..]).await.unwrap();
        assert_eq!(r.version, version);
        assert_eq!(r.next().await.unwrap(), Record::FromSnap("a".into()));
        assert_eq!(r.next().await.unwrap(), Record::ToSnap("b".into()));
        assert_eq!(r.next().await.unwrap(), Record::Size(1 << 20));
        assert_eq!(
            r.next().await.unwrap(),
            Record::Write {
                offset: 4096,
                length: 100
            }
        );
        let mut buf = [0u8; 64];
        assert_eq!(r.read_data(&mut buf).await.unwrap(), 64);
        assert_eq!(r.read_data(&mut buf).await.unwrap(), 36);
        assert_eq!(r.read_data(&mut buf).await.unwrap(), 0);
        assert_eq!(
            r.next().await.unwrap(),
            Record::Zero {
                offset: 8192,
                length: 4096
            }
        );
        assert_eq!(r.next().await.unwrap(), Record::End);
        // Every truncation is detected as such.
        for cut in 0..bytes.len() - 1 {
            let mut r = match DiffReader::new(&bytes[..cut]).await {
                Ok(r) => r,
                Err(DiffError::Truncated(_)) => continue,
                Err(e) => panic!("cut {cut}: {e}"),
            };
            let mut buf = [0u8; 200];
            let err = loop {
                match r.next().await {
                    Ok(Record::End) => panic!("cut {cut}: end found"),
                    Ok(Record::Write { .. }) => {
                        if let Err(e) = async {
                            while r.read_data(&mut buf).await? > 0 {}
                            Ok::<_, DiffError>(())
                        }
                        .await
                        {
                            break e;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e,
                }
            };
            assert!(matches!(err, DiffError::Truncated(_)), "cut {cut}: {err}");
        }
    }

    #[tokio::test]
    async fn v1_and_v2_roundtrip_and_detect_truncation() {
        roundtrip(1).await;
        roundtrip(2).await;
    }

    /// Bytes laid out by hand from the published v1 description.
    #[tokio::test]
    async fn reads_hand_made_v1() {
        let mut b = b"rbd diff v1\n".to_vec();
        b.push(b't');
        b.extend(2u32.to_le_bytes());
        b.extend(b"s1");
        b.push(b's');
        b.extend(65536u64.to_le_bytes());
        b.push(b'w');
        b.extend(512u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend([1, 2, 3]);
        b.push(b'e');
        let mut r = DiffReader::new(&b[..]).await.unwrap();
        assert_eq!(r.next().await.unwrap(), Record::ToSnap("s1".into()));
        assert_eq!(r.next().await.unwrap(), Record::Size(65536));
        assert_eq!(
            r.next().await.unwrap(),
            Record::Write {
                offset: 512,
                length: 3
            }
        );
        let mut d = [0u8; 3];
        r.read_data(&mut d).await.unwrap();
        assert_eq!(d, [1, 2, 3]);
        assert_eq!(r.next().await.unwrap(), Record::End);
    }

    #[tokio::test]
    async fn rejects_garbage() {
        assert!(matches!(
            DiffReader::new(&b"rbd diff v9\n"[..]).await,
            Err(DiffError::Malformed(_))
        ));
        let mut b = BANNER_V1.to_vec();
        b.push(b'Q');
        let mut r = DiffReader::new(&b[..]).await.unwrap();
        assert!(matches!(r.next().await, Err(DiffError::Malformed(_))));
        let mut b = BANNER_V1.to_vec();
        b.push(b'f');
        b.extend(u32::MAX.to_le_bytes());
        let mut r = DiffReader::new(&b[..]).await.unwrap();
        assert!(matches!(r.next().await, Err(DiffError::Malformed(_))));
        let mut b = BANNER_V1.to_vec();
        b.push(b'w');
        b.extend(u64::MAX.to_le_bytes());
        b.extend(10u64.to_le_bytes());
        let mut r = DiffReader::new(&b[..]).await.unwrap();
        assert!(matches!(r.next().await, Err(DiffError::Malformed(_))));
        // v2 skips unknown tags by length.
        let mut b = BANNER_V2.to_vec();
        b.push(b'X');
        b.extend(3u64.to_le_bytes());
        b.extend([9, 9, 9]);
        b.push(b'e');
        let mut r = DiffReader::new(&b[..]).await.unwrap();
        assert_eq!(r.next().await.unwrap(), Record::End);
    }
}

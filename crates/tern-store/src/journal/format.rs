//! Byte layouts of the journal: segment headers and entries.
//!
//! # Segment header ([`SEG_HEADER_LEN`] bytes, little-endian, fixed offsets)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"TERNJSEG"` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | incompatible feature bits: a reader refuses bits it does not know |
//! | 16 | 4 | compatible feature bits: a reader ignores bits it does not know |
//! | 20 | 4 | header length (96): entries start here |
//! | 24 | 8 | segment number |
//! | 32 | 8 | tid of the first entry this segment holds (or will hold) |
//! | 40 | 32 | image id, ASCII, zero padded |
//! | 72 | 20 | reserved, zero |
//! | 92 | 4 | crc32c of bytes 0..92 |
//!
//! # Entry ([`ENTRY_HEADER_LEN`] bytes of header, then the payload)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"TJEN"` |
//! | 4 | 4 | payload length |
//! | 8 | 8 | tid |
//! | 16 | 8 | timestamp, unix microseconds |
//! | 24 | 2 | op code (see below) |
//! | 26 | 2 | flags, zero (a reader refuses unknown flags) |
//! | 28 | 4 | crc32c of the payload followed by bytes 0..28 |
//! | 32 | len | payload |
//!
//! Payloads by op code (all integers u64 unless noted):
//!
//! | code | op | payload |
//! | --- | --- | --- |
//! | 1 | write | offset, then the data (the rest) |
//! | 2 | discard | offset, length |
//! | 3 | write-zeroes | offset, length |
//! | 4 | resize | size |
//! | 5 | snap create | id, name length (u16), name (UTF-8), namespace as JSON (the rest; empty = user) |
//! | 6 | snap remove | id |
//! | 7 | snap rollback | id |
//! | 8 | flush | (empty) |
//! | 9 | marker | kind length (u16), kind (UTF-8), payload (the rest) |
//!
//! An entry whose bytes are short, whose magic is wrong or whose crc does
//! not match is where the readable journal ends: after a crash that is the
//! torn tail of the last segment.

use crate::types::SnapNamespace;
use tern_types::ImageId;

pub const SEG_MAGIC: [u8; 8] = *b"TERNJSEG";
pub const SEG_VERSION: u32 = 1;
/// Incompatible bits this version understands (none defined yet).
pub const SEG_KNOWN_INCOMPAT: u32 = 0;
pub const SEG_HEADER_LEN: usize = 96;
const SEG_CRC_OFF: usize = 92;
const ID_LEN: usize = 32;

pub const ENTRY_MAGIC: [u8; 4] = *b"TJEN";
pub const ENTRY_HEADER_LEN: usize = 32;
const ENTRY_CRC_OFF: usize = 28;
/// No entry payload is larger: bounds what a reader allocates for a
/// length field it cannot trust yet (writes are split well below this).
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// Why journal bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic {found:02x?}: not a tern journal segment")]
    BadSegmentMagic { found: Vec<u8> },
    #[error("segment header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadSegmentChecksum { stored: u32, computed: u32 },
    #[error(
        "journal format version {found} is newer than this tern understands ({SEG_VERSION}): upgrade tern"
    )]
    UnknownVersion { found: u32 },
    #[error(
        "unknown incompatible journal feature bits {bits:#x}: written by a newer tern, upgrade tern"
    )]
    UnknownIncompat { bits: u32 },
    #[error("segment header is {found} bytes, expected at least {SEG_HEADER_LEN}")]
    ShortSegmentHeader { found: usize },
    #[error("segment belongs to image '{found}', expected '{expected}'")]
    WrongImage { found: String, expected: String },
    #[error("segment file is number {found}, its header says {expected}")]
    WrongSegment { found: u64, expected: u64 },
    #[error("entry is cut short: {have} of {need} bytes")]
    Short { have: usize, need: usize },
    #[error("bad entry magic {found:02x?}")]
    BadEntryMagic { found: [u8; 4] },
    #[error("entry payload length {len} exceeds the limit {MAX_PAYLOAD}")]
    TooLong { len: u32 },
    #[error("entry checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadEntryChecksum { stored: u32, computed: u32 },
    #[error("unknown entry op code {code}: written by a newer tern, upgrade tern")]
    UnknownOp { code: u16 },
    #[error("unknown entry flags {flags:#x}: written by a newer tern, upgrade tern")]
    UnknownFlags { flags: u16 },
    #[error("entry payload of op {code} is malformed: {reason}")]
    BadPayload { code: u16, reason: &'static str },
    #[error("entry tid {found} follows tid {prev}: tids must increase by one")]
    TidGap { prev: u64, found: u64 },
}

/// The header at the start of every segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u32,
    pub incompat: u32,
    pub compat: u32,
    pub segno: u64,
    pub first_tid: u64,
    pub image_id: String,
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"))
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl SegmentHeader {
    pub fn new(image_id: &ImageId, segno: u64, first_tid: u64) -> SegmentHeader {
        SegmentHeader {
            version: SEG_VERSION,
            incompat: 0,
            compat: 0,
            segno,
            first_tid,
            image_id: image_id.as_str().to_string(),
        }
    }

    pub fn encode(&self) -> [u8; SEG_HEADER_LEN] {
        let mut b = [0u8; SEG_HEADER_LEN];
        b[0..8].copy_from_slice(&SEG_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.incompat.to_le_bytes());
        b[16..20].copy_from_slice(&self.compat.to_le_bytes());
        b[20..24].copy_from_slice(&(SEG_HEADER_LEN as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.segno.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_tid.to_le_bytes());
        let id = self.image_id.as_bytes();
        let n = id.len().min(ID_LEN);
        b[40..40 + n].copy_from_slice(&id[..n]);
        let crc = crc32c::crc32c(&b[..SEG_CRC_OFF]);
        b[SEG_CRC_OFF..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header; `b` may be longer (the whole file start).
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FormatError> {
        if b.len() < SEG_HEADER_LEN {
            return Err(FormatError::ShortSegmentHeader { found: b.len() });
        }
        if b[0..8] != SEG_MAGIC {
            return Err(FormatError::BadSegmentMagic {
                found: b[0..8].to_vec(),
            });
        }
        let stored = le32(b, SEG_CRC_OFF);
        let computed = crc32c::crc32c(&b[..SEG_CRC_OFF]);
        if stored != computed {
            return Err(FormatError::BadSegmentChecksum { stored, computed });
        }
        // Version dispatch: only version 1 exists.
        let version = le32(b, 8);
        if version != SEG_VERSION {
            return Err(FormatError::UnknownVersion { found: version });
        }
        let incompat = le32(b, 12);
        if incompat & !SEG_KNOWN_INCOMPAT != 0 {
            return Err(FormatError::UnknownIncompat {
                bits: incompat & !SEG_KNOWN_INCOMPAT,
            });
        }
        let id = &b[40..40 + ID_LEN];
        let id_len = id.iter().position(|&x| x == 0).unwrap_or(ID_LEN);
        Ok(SegmentHeader {
            version,
            incompat,
            compat: le32(b, 16),
            segno: le64(b, 24),
            first_tid: le64(b, 32),
            image_id: String::from_utf8_lossy(&id[..id_len]).into_owned(),
        })
    }
}

/// One mutation of an image, as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Resize {
        size: u64,
    },
    SnapCreate {
        id: u64,
        name: String,
        /// So that a replay after a crash recreates a mirror snapshot as
        /// one, not as a user snapshot.
        namespace: SnapNamespace,
    },
    SnapRemove {
        id: u64,
    },
    SnapRollback {
        id: u64,
    },
    Flush,
    /// Opaque to the store: mirroring records demote/promote here.
    Marker {
        kind: String,
        payload: Vec<u8>,
    },
}

impl JournalOp {
    pub fn code(&self) -> u16 {
        match self {
            JournalOp::Write { .. } => 1,
            JournalOp::Discard { .. } => 2,
            JournalOp::WriteZeroes { .. } => 3,
            JournalOp::Resize { .. } => 4,
            JournalOp::SnapCreate { .. } => 5,
            JournalOp::SnapRemove { .. } => 6,
            JournalOp::SnapRollback { .. } => 7,
            JournalOp::Flush => 8,
            JournalOp::Marker { .. } => 9,
        }
    }

    /// A short name, for counts in `journal inspect`.
    pub fn name(&self) -> &'static str {
        match self {
            JournalOp::Write { .. } => "write",
            JournalOp::Discard { .. } => "discard",
            JournalOp::WriteZeroes { .. } => "write_zeroes",
            JournalOp::Resize { .. } => "resize",
            JournalOp::SnapCreate { .. } => "snap_create",
            JournalOp::SnapRemove { .. } => "snap_remove",
            JournalOp::SnapRollback { .. } => "snap_rollback",
            JournalOp::Flush => "flush",
            JournalOp::Marker { .. } => "marker",
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            JournalOp::Write { data, .. } => 8 + data.len(),
            JournalOp::Discard { .. } | JournalOp::WriteZeroes { .. } => 16,
            JournalOp::Resize { .. }
            | JournalOp::SnapRemove { .. }
            | JournalOp::SnapRollback { .. } => 8,
            JournalOp::SnapCreate {
                name, namespace, ..
            } => 10 + name.len() + ns_json(namespace).len(),
            JournalOp::Flush => 0,
            JournalOp::Marker { kind, payload } => 2 + kind.len() + payload.len(),
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            JournalOp::Write { offset, data } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(data);
            }
            JournalOp::Discard { offset, len } | JournalOp::WriteZeroes { offset, len } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            JournalOp::Resize { size: v }
            | JournalOp::SnapRemove { id: v }
            | JournalOp::SnapRollback { id: v } => out.extend_from_slice(&v.to_le_bytes()),
            JournalOp::SnapCreate {
                id,
                name,
                namespace,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&(name.len() as u16).to_le_bytes());
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&ns_json(namespace));
            }
            JournalOp::Flush => {}
            JournalOp::Marker { kind, payload } => {
                out.extend_from_slice(&(kind.len() as u16).to_le_bytes());
                out.extend_from_slice(kind.as_bytes());
                out.extend_from_slice(payload);
            }
        }
    }

    fn decode_payload(code: u16, p: &[u8]) -> Result<JournalOp, FormatError> {
        let bad = |reason| FormatError::BadPayload { code, reason };
        let exact = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(bad("wrong payload length"))
            }
        };
        let string =
            |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad("a name is not valid UTF-8"));
        Ok(match code {
            1 => {
                if p.len() < 8 {
                    return Err(bad("write without an offset"));
                }
                JournalOp::Write {
                    offset: le64(p, 0),
                    data: p[8..].to_vec(),
                }
            }
            2 | 3 => {
                exact(16)?;
                let (offset, len) = (le64(p, 0), le64(p, 8));
                if code == 2 {
                    JournalOp::Discard { offset, len }
                } else {
                    JournalOp::WriteZeroes { offset, len }
                }
            }
            4 => {
                exact(8)?;
                JournalOp::Resize { size: le64(p, 0) }
            }
            5 => {
                if p.len() < 10 {
                    return Err(bad("snapshot create too short"));
                }
                let n = le16(p, 8) as usize;
                if p.len() < 10 + n {
                    return Err(bad("snapshot name runs past the payload"));
                }
                let ns = &p[10 + n..];
                let namespace = if ns.is_empty() {
                    SnapNamespace::User
                } else {
                    serde_json::from_slice(ns).map_err(|_| bad("snapshot namespace"))?
                };
                JournalOp::SnapCreate {
                    id: le64(p, 0),
                    name: string(&p[10..10 + n])?,
                    namespace,
                }
            }
            6 | 7 => {
                exact(8)?;
                let id = le64(p, 0);
                if code == 6 {
                    JournalOp::SnapRemove { id }
                } else {
                    JournalOp::SnapRollback { id }
                }
            }
            8 => {
                exact(0)?;
                JournalOp::Flush
            }
            9 => {
                if p.len() < 2 {
                    return Err(bad("marker too short"));
                }
                let n = le16(p, 0) as usize;
                if p.len() < 2 + n {
                    return Err(bad("marker kind runs past the payload"));
                }
                JournalOp::Marker {
                    kind: string(&p[2..2 + n])?,
                    payload: p[2 + n..].to_vec(),
                }
            }
            _ => return Err(FormatError::UnknownOp { code }),
        })
    }
}

fn ns_json(ns: &SnapNamespace) -> Vec<u8> {
    match ns {
        SnapNamespace::User => Vec::new(),
        m => serde_json::to_vec(m).expect("namespaces serialize"),
    }
}

/// A journal entry as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub tid: u64,
    /// Unix microseconds when the entry was appended.
    pub timestamp_us: u64,
    pub op: JournalOp,
}

impl JournalEntry {
    /// Bytes the entry takes in a segment.
    pub fn encoded_len(&self) -> usize {
        ENTRY_HEADER_LEN + self.op.payload_len()
    }

    /// Appends the framed entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        Self::encode_op_into(self.tid, self.timestamp_us, &self.op, out);
    }

    /// [`Self::encode_into`] for an entry the caller does not own.
    pub fn encode_op_into(tid: u64, timestamp_us: u64, op: &JournalOp, out: &mut Vec<u8>) {
        let start = out.len();
        let len = op.payload_len();
        out.reserve(ENTRY_HEADER_LEN + len);
        push_header(out, tid, timestamp_us, op.code(), len);
        op.encode_payload(out);
        debug_assert_eq!(out.len() - start, ENTRY_HEADER_LEN + len);
        let crc = entry_crc(
            &out[start..start + ENTRY_CRC_OFF],
            &out[start + ENTRY_HEADER_LEN..],
        );
        out[start + ENTRY_CRC_OFF..start + ENTRY_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Checks the fixed header of an entry at the start of `b` and returns
    /// the whole entry's length, so a reader knows how much to fetch.
    pub fn check_header(b: &[u8]) -> Result<usize, FormatError> {
        if b.len() < ENTRY_HEADER_LEN {
            return Err(FormatError::Short {
                have: b.len(),
                need: ENTRY_HEADER_LEN,
            });
        }
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != ENTRY_MAGIC {
            return Err(FormatError::BadEntryMagic { found: magic });
        }
        let len = le32(b, 4);
        if len > MAX_PAYLOAD {
            return Err(FormatError::TooLong { len });
        }
        Ok(ENTRY_HEADER_LEN + len as usize)
    }

    /// Decodes the entry at the start of `b`; returns it and its length.
    /// The crc is checked before anything in the payload is trusted.
    pub fn decode(b: &[u8]) -> Result<(JournalEntry, usize), FormatError> {
        let total = Self::check_header(b)?;
        if b.len() < total {
            return Err(FormatError::Short {
                have: b.len(),
                need: total,
            });
        }
        let stored = le32(b, ENTRY_CRC_OFF);
        let computed = entry_crc(&b[..ENTRY_CRC_OFF], &b[ENTRY_HEADER_LEN..total]);
        if stored != computed {
            return Err(FormatError::BadEntryChecksum { stored, computed });
        }
        let flags = le16(b, 26);
        if flags != 0 {
            return Err(FormatError::UnknownFlags { flags });
        }
        let op = JournalOp::decode_payload(le16(b, 24), &b[ENTRY_HEADER_LEN..total])?;
        Ok((
            JournalEntry {
                tid: le64(b, 8),
                timestamp_us: le64(b, 16),
                op,
            },
            total,
        ))
    }
}

/// The entry header with a zero crc field, which the caller fills in.
fn push_header(out: &mut Vec<u8>, tid: u64, timestamp_us: u64, code: u16, len: usize) {
    out.extend_from_slice(&ENTRY_MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&tid.to_le_bytes());
    out.extend_from_slice(&timestamp_us.to_le_bytes());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
}

pub(crate) fn payload_len(op: &JournalOp) -> usize {
    op.payload_len()
}

/// A write's entry, encoded in two steps so that the journal's writer lock
/// covers only a copy: the payload crc is computed before the tid and
/// timestamp are known, and finished under the lock by appending just the
/// header's bytes.
pub(crate) struct WritePayload;

impl WritePayload {
    /// The crc of a write's payload (offset, then data).
    pub fn crc(offset: u64, data: &[u8]) -> u32 {
        crc32c::crc32c_append(crc32c::crc32c(&offset.to_le_bytes()), data)
    }

    /// Same bytes as [`JournalEntry::encode_into`] of the equivalent entry.
    pub fn encode(
        offset: u64,
        data: &[u8],
        payload_crc: u32,
        tid: u64,
        timestamp_us: u64,
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        let plen = 8 + data.len();
        out.reserve(ENTRY_HEADER_LEN + plen);
        push_header(out, tid, timestamp_us, 1, plen);
        let crc = crc32c::crc32c_append(payload_crc, &out[start..start + ENTRY_CRC_OFF]);
        out[start + ENTRY_CRC_OFF..start + ENTRY_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(data);
    }
}

/// The payload comes first so that a write's crc can be computed before
/// its tid and timestamp are known, and finished under the writer lock by
/// appending just the header (combining two crcs costs far more).
fn entry_crc(head: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(payload), head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_golden_bytes() {
        let h = SegmentHeader::new(&ImageId::parse("10226b8b4567").unwrap(), 3, 0x0102);
        let b = h.encode();
        #[rustfmt::skip]
        let expected: [u8; 92] = [
            b'T', b'E', b'R', b'N', b'J', b'S', b'E', b'G',     // magic
            1, 0, 0, 0,                                         // version
            0, 0, 0, 0,                                         // incompat
            0, 0, 0, 0,                                         // compat
            96, 0, 0, 0,                                        // header length
            3, 0, 0, 0, 0, 0, 0, 0,                             // segment number
            0x02, 0x01, 0, 0, 0, 0, 0, 0,                       // first tid
            b'1', b'0', b'2', b'2', b'6', b'b', b'8', b'b',     // image id
            b'4', b'5', b'6', b'7', 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                       // reserved
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&b[..92], &expected[..]);
        assert_eq!(le32(&b, 92), crc32c::crc32c(&expected));
        // Pinned so that a change of checksum algorithm is caught.
        // Computed independently (bitwise CRC-32C, poly 0x82F63B78).
        assert_eq!(&b[92..], &[0x58, 0xbf, 0x60, 0x47]);
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn segment_header_damage() {
        let h = SegmentHeader::new(&ImageId::parse("abc").unwrap(), 0, 1);
        let good = h.encode();
        let mut b = good;
        b[33] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(FormatError::BadSegmentChecksum { .. })
        ));
        assert!(matches!(
            SegmentHeader::decode(&good[..50]),
            Err(FormatError::ShortSegmentHeader { found: 50 })
        ));
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(FormatError::BadSegmentMagic { .. })
        ));
        let reseal = |f: &dyn Fn(&mut SegmentHeader)| {
            let mut h = h.clone();
            f(&mut h);
            h.encode()
        };
        assert_eq!(
            SegmentHeader::decode(&reseal(&|h| h.incompat = 2)),
            Err(FormatError::UnknownIncompat { bits: 2 })
        );
        assert_eq!(
            SegmentHeader::decode(&reseal(&|h| h.version = 2)),
            Err(FormatError::UnknownVersion { found: 2 })
        );
        assert!(SegmentHeader::decode(&reseal(&|h| h.compat = 8)).is_ok());
    }

    #[test]
    fn entry_golden_bytes() {
        let e = JournalEntry {
            tid: 7,
            timestamp_us: 0x1122_3344_5566_7788,
            op: JournalOp::Write {
                offset: 0x1000,
                data: b"hi".to_vec(),
            },
        };
        let b = e.encode();
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            b'T', b'J', b'E', b'N',                             // magic
            10, 0, 0, 0,                                        // payload length
            7, 0, 0, 0, 0, 0, 0, 0,                             // tid
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,     // timestamp
            1, 0,                                               // op: write
            0, 0,                                               // flags
            0xfb, 0xa1, 0xae, 0x5c,                             // crc32c (computed independently)
            0, 0x10, 0, 0, 0, 0, 0, 0,                          // offset
            b'h', b'i',                                         // data
        ];
        assert_eq!(b, expected);
        let mut crc_in = expected[32..].to_vec();
        crc_in.extend_from_slice(&expected[..28]);
        assert_eq!(le32(&b, 28), crc32c::crc32c(&crc_in));
        assert_eq!(JournalEntry::decode(&b).unwrap(), (e, 42));

        // A snapshot create in the user namespace and a marker.
        let e = JournalEntry {
            tid: 1,
            timestamp_us: 0,
            op: JournalOp::SnapCreate {
                id: 2,
                name: "s".into(),
                namespace: SnapNamespace::User,
            },
        };
        let b = e.encode();
        assert_eq!(&b[4..8], &[11, 0, 0, 0]);
        assert_eq!(&b[32..], &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, b's']);
        let e = JournalEntry {
            tid: 1,
            timestamp_us: 0,
            op: JournalOp::Marker {
                kind: "demote".into(),
                payload: vec![9],
            },
        };
        let b = e.encode();
        assert_eq!(&b[24..26], &[9, 0]);
        assert_eq!(&b[32..], &[6, 0, b'd', b'e', b'm', b'o', b't', b'e', 9]);
    }

    #[test]
    fn write_fast_path_matches() {
        for n in [0usize, 1, 4096, 70_000] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let e = JournalEntry {
                tid: 99,
                timestamp_us: 1234,
                op: JournalOp::Write {
                    offset: 777,
                    data: data.clone(),
                },
            };
            let mut fast = vec![1, 2, 3];
            WritePayload::encode(
                777,
                &data,
                WritePayload::crc(777, &data),
                99,
                1234,
                &mut fast,
            );
            assert_eq!(&fast[3..], &e.encode()[..]);
        }
    }

    #[test]
    fn every_op_round_trips() {
        let ops = vec![
            JournalOp::Write {
                offset: 5,
                data: vec![1, 2, 3],
            },
            JournalOp::Discard { offset: 1, len: 2 },
            JournalOp::WriteZeroes { offset: 3, len: 4 },
            JournalOp::Resize { size: 99 },
            JournalOp::SnapCreate {
                id: 4,
                name: "snap".into(),
                namespace: SnapNamespace::Mirror(crate::types::MirrorSnap {
                    complete: true,
                    ..Default::default()
                }),
            },
            JournalOp::SnapRemove { id: 4 },
            JournalOp::SnapRollback { id: 3 },
            JournalOp::Flush,
            JournalOp::Marker {
                kind: "promote".into(),
                payload: vec![],
            },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            let e = JournalEntry {
                tid: i as u64 + 1,
                timestamp_us: 42,
                op,
            };
            let b = e.encode();
            assert_eq!(b.len(), e.encoded_len());
            assert_eq!(JournalEntry::decode(&b).unwrap(), (e, b.len()));
        }
    }

    #[test]
    fn entry_damage_is_detected() {
        let e = JournalEntry {
            tid: 1,
            timestamp_us: 2,
            op: JournalOp::Write {
                offset: 0,
                data: vec![7; 100],
            },
        };
        let good = e.encode();
        // Every single-bit flip anywhere is caught (by magic, length or crc).
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(JournalEntry::decode(&b).is_err(), "flip at {i}");
        }
        // Every truncation is caught.
        for n in 0..good.len() {
            assert!(
                matches!(
                    JournalEntry::decode(&good[..n]),
                    Err(FormatError::Short { .. } | FormatError::BadEntryMagic { .. })
                ),
                "cut at {n}"
            );
        }
        assert!(matches!(
            JournalEntry::decode(&[0; 40]),
            Err(FormatError::BadEntryMagic { .. })
        ));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            JournalEntry::decode(&b),
            Err(FormatError::TooLong { .. })
        ));
    }
}

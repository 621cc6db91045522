//! The header page at the start of every object file.
//!
//! Byte layout (little-endian, fixed offsets):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"TERNOBJ\0"` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | incompatible feature bits: a reader refuses bits it does not know |
//! | 16 | 4 | compatible feature bits: a reader ignores bits it does not know |
//! | 20 | 8 | object number |
//! | 28 | 32 | image id, ASCII, zero padded |
//! | 60 | 4 | crc32c of bytes 0..60 |
//! | 64 | 8 | `snap_seq`: image snap_seq when this object was last considered for cloning |
//! | 72 | 8 | `born`: image snap_seq when the file was created; snapshots with id <= born see zeros |
//! | 80 | 4 | `intent_epoch`: E+1 while mutations of epoch E may be unflushed, else 0 |
//! | 84 | 4 | number of chunks in the map |
//! | 88 | 4 | `intent_gen`: store generation (one per open) that wrote the intent |
//! | 92 | 4 | crc32c of bytes 64..92 |
//! | 96 | 416 | reserved, zero |
//! | 512 | 2048 | chunk epoch map: 512 u32, (epoch+1) of the chunk's last mutation, 0 = unwritten |
//! | 2560 | 4 | crc32c of bytes 512..2560 |
//! | 2564 | 1532 | reserved, zero |
//!
//! The whole page is [`HEADER_SIZE`] bytes so object data stays block aligned:
//! data byte `k` of the object lives at file offset `HEADER_SIZE + k`.
//!
//! Bytes 64.. (the "snapshot extension", see [`SnapExt`]) exist only when the
//! incompatible bit [`INCOMPAT_SNAP`] is set: an older tern must not write to
//! such a file without keeping the epoch map, or a diff would miss its
//! writes. A file without the bit (written before snapshots existed) reads
//! as `snap_seq = born = 0` with an all-zero map, which is exact: nothing in
//! it was written after any snapshot. The fixed part (0..64) and the
//! extension have separate checksums because only the extension is
//! rewritten; the fixed part is written once (and once more to set the bit
//! on such an old file).

use tern_types::ImageId;

pub const HEADER_SIZE: u64 = 4096;
pub const MAGIC: [u8; 8] = *b"TERNOBJ\0";
pub const VERSION: u32 = 1;
/// Incompatible bit: the page holds the snapshot extension (bytes 64..).
pub const INCOMPAT_SNAP: u32 = 1;
/// Incompatible feature bits this version understands.
pub const KNOWN_INCOMPAT: u32 = INCOMPAT_SNAP;
/// Entries in the chunk epoch map (at most; objects may use fewer chunks).
pub const MAP_ENTRIES: usize = 512;
/// File range holding the extension; written in one `pwrite`.
pub const EXT_OFF: usize = 64;
pub const EXT_END: usize = MAP_OFF + MAP_ENTRIES * 4 + 4;
const EXT_CRC_OFF: usize = 92;
const MAP_OFF: usize = 512;
/// Length of the checksummed fixed part, crc included.
pub const FIXED_LEN: usize = 64;
const CRC_OFF: usize = 60;
const ID_LEN: usize = 32;

/// Why an object header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic {found:02x?}: not a tern object file")]
    BadMagic { found: [u8; 8] },
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum { stored: u32, computed: u32 },
    #[error(
        "object format version {found} is newer than this tern understands ({VERSION}): upgrade tern"
    )]
    UnknownVersion { found: u32 },
    #[error("unknown incompatible feature bits {bits:#x}: written by a newer tern, upgrade tern")]
    UnknownIncompat { bits: u32 },
    #[error("snapshot header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadExtChecksum { stored: u32, computed: u32 },
    #[error("chunk map has {found} chunks, expected {expected}")]
    BadChunkCount { found: u32, expected: u32 },
    #[error(
        "header belongs to object {found_no} of image '{found_image}', expected object {expected_no} of image '{expected_image}'"
    )]
    WrongObject {
        found_no: u64,
        found_image: String,
        expected_no: u64,
        expected_image: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHeader {
    pub version: u32,
    pub incompat: u32,
    pub compat: u32,
    pub object_no: u64,
    pub image_id: String,
}

impl ObjectHeader {
    pub fn new(image_id: &ImageId, object_no: u64) -> ObjectHeader {
        ObjectHeader {
            version: VERSION,
            incompat: INCOMPAT_SNAP,
            compat: 0,
            object_no,
            image_id: image_id.as_str().to_string(),
        }
    }

    /// The checksummed fixed part; the rest of the header page is zeros.
    pub fn encode(&self) -> [u8; FIXED_LEN] {
        let mut b = [0u8; FIXED_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.incompat.to_le_bytes());
        b[16..20].copy_from_slice(&self.compat.to_le_bytes());
        b[20..28].copy_from_slice(&self.object_no.to_le_bytes());
        let id = self.image_id.as_bytes();
        let n = id.len().min(ID_LEN);
        b[28..28 + n].copy_from_slice(&id[..n]);
        let crc = crc32c::crc32c(&b[..CRC_OFF]);
        b[CRC_OFF..FIXED_LEN].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes the fixed part. `Ok(None)` means the bytes are all zero: the
    /// file was created but its header never reached the disk (a crash right
    /// after creation), so it holds no acknowledged data and may be
    /// re-initialised.
    pub fn decode(b: &[u8; FIXED_LEN]) -> Result<Option<ObjectHeader>, HeaderError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != MAGIC {
            return Err(HeaderError::BadMagic { found: magic });
        }
        let stored = u32::from_le_bytes(b[CRC_OFF..FIXED_LEN].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&b[..CRC_OFF]);
        if stored != computed {
            return Err(HeaderError::BadChecksum { stored, computed });
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        // Version dispatch: only version 1 exists.
        let version = u32_at(8);
        if version != VERSION {
            return Err(HeaderError::UnknownVersion { found: version });
        }
        let incompat = u32_at(12);
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(HeaderError::UnknownIncompat {
                bits: incompat & !KNOWN_INCOMPAT,
            });
        }
        let id_bytes = &b[28..28 + ID_LEN];
        let id_len = id_bytes.iter().position(|&x| x == 0).unwrap_or(ID_LEN);
        Ok(Some(ObjectHeader {
            version,
            incompat,
            compat: u32_at(16),
            object_no: u64::from_le_bytes(b[20..28].try_into().expect("8 bytes")),
            image_id: String::from_utf8_lossy(&id_bytes[..id_len]).into_owned(),
        }))
    }

    /// Checks that a decoded header names the object the caller opened, so a
    /// file copied or renamed into the wrong place is caught.
    pub fn check_identity(&self, image_id: &ImageId, object_no: u64) -> Result<(), HeaderError> {
        if self.object_no != object_no || self.image_id != image_id.as_str() {
            return Err(HeaderError::WrongObject {
                found_no: self.object_no,
                found_image: self.image_id.clone(),
                expected_no: object_no,
                expected_image: image_id.to_string(),
            });
        }
        Ok(())
    }
}

/// The snapshot extension of the header page: what copy-on-write and dirty
/// tracking need to know about one object file (head or clone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapExt {
    pub snap_seq: u64,
    pub born: u64,
    pub intent_epoch: u32,
    /// Which opening of the store wrote `intent_epoch`: an intent left by an
    /// earlier process that did not shut down cleanly may cover lost map
    /// updates; one written by the current process does not.
    pub intent_gen: u32,
    /// One entry per chunk of the object (`map.len()` = chunk count).
    pub map: Vec<u32>,
}

/// What [`SnapExt::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedExt {
    pub ext: SnapExt,
    /// The map's checksum matched. When it did not (a torn header write),
    /// the map is all zeros and the caller must assume every chunk changed.
    pub map_ok: bool,
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl SnapExt {
    pub fn new(born: u64, chunks: usize) -> SnapExt {
        SnapExt {
            snap_seq: born,
            born,
            intent_epoch: 0,
            intent_gen: 0,
            map: vec![0; chunks],
        }
    }

    /// Bytes `EXT_OFF..EXT_END` of the header page.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.map.len() <= MAP_ENTRIES, "chunk map too large");
        let mut page = vec![0u8; EXT_END];
        page[64..72].copy_from_slice(&self.snap_seq.to_le_bytes());
        page[72..80].copy_from_slice(&self.born.to_le_bytes());
        page[80..84].copy_from_slice(&self.intent_epoch.to_le_bytes());
        page[84..88].copy_from_slice(&(self.map.len() as u32).to_le_bytes());
        page[88..92].copy_from_slice(&self.intent_gen.to_le_bytes());
        let crc = crc32c::crc32c(&page[EXT_OFF..EXT_CRC_OFF]);
        page[EXT_CRC_OFF..EXT_CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
        for (i, v) in self.map.iter().enumerate() {
            page[MAP_OFF + i * 4..][..4].copy_from_slice(&v.to_le_bytes());
        }
        let map_end = MAP_OFF + MAP_ENTRIES * 4;
        let crc = crc32c::crc32c(&page[MAP_OFF..map_end]);
        page[map_end..EXT_END].copy_from_slice(&crc.to_le_bytes());
        page.split_off(EXT_OFF)
    }

    /// Decodes the extension from a whole header page (at least `EXT_END`
    /// bytes) of an object with `chunks` chunks.
    pub fn decode(page: &[u8], chunks: usize) -> Result<DecodedExt, HeaderError> {
        let stored = le32(page, EXT_CRC_OFF);
        let computed = crc32c::crc32c(&page[EXT_OFF..EXT_CRC_OFF]);
        if stored != computed {
            return Err(HeaderError::BadExtChecksum { stored, computed });
        }
        let n = le32(page, 84);
        if n as usize != chunks {
            return Err(HeaderError::BadChunkCount {
                found: n,
                expected: chunks as u32,
            });
        }
        let map_end = MAP_OFF + MAP_ENTRIES * 4;
        let map_ok = le32(page, map_end) == crc32c::crc32c(&page[MAP_OFF..map_end]);
        let map = if map_ok {
            (0..chunks).map(|i| le32(page, MAP_OFF + i * 4)).collect()
        } else {
            vec![0; chunks]
        };
        Ok(DecodedExt {
            ext: SnapExt {
                snap_seq: le64(page, 64),
                born: le64(page, 72),
                intent_epoch: le32(page, 80),
                intent_gen: le32(page, 88),
                map,
            },
            map_ok,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ObjectHeader {
        ObjectHeader::new(
            &ImageId::parse("10226b8b4567").unwrap(),
            0x0102_0304_0506_0708,
        )
    }

    #[test]
    fn golden_bytes() {
        let b = sample().encode();
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            b'T', b'E', b'R', b'N', b'O', b'B', b'J', 0,        // magic
            1, 0, 0, 0,                                         // version
            1, 0, 0, 0,                                         // incompat: INCOMPAT_SNAP
            0, 0, 0, 0,                                         // compat
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,     // object_no
            b'1', b'0', b'2', b'2', b'6', b'b', b'8', b'b',     // image id
            b'4', b'5', b'6', b'7', 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&b[..60], &expected[..]);
        assert_eq!(
            u32::from_le_bytes(b[60..64].try_into().unwrap()),
            crc32c::crc32c(&expected)
        );
        // Pin the checksum too, so a change of crc algorithm is caught.
        assert_eq!(&b[60..64], &GOLDEN_CRC);
        assert_eq!(ObjectHeader::decode(&b).unwrap(), Some(sample()));
    }

    // Computed independently (bitwise CRC-32C, poly 0x82F63B78) over the 60 bytes above.
    const GOLDEN_CRC: [u8; 4] = [0x1f, 0xb0, 0xc9, 0x9a];

    #[test]
    fn ext_golden_bytes() {
        let ext = SnapExt {
            snap_seq: 5,
            born: 2,
            intent_epoch: 6,
            intent_gen: 9,
            map: vec![0, 1, 3, 6],
        };
        let b = ext.encode();
        assert_eq!(b.len(), EXT_END - EXT_OFF);
        #[rustfmt::skip]
        let head: [u8; 32] = [
            5, 0, 0, 0, 0, 0, 0, 0,     // snap_seq
            2, 0, 0, 0, 0, 0, 0, 0,     // born
            6, 0, 0, 0,                 // intent_epoch
            4, 0, 0, 0,                 // chunks
            9, 0, 0, 0,                 // intent_gen
            0x86, 0xd1, 0xed, 0x15,                         // crc32c of the 28 bytes above
        ];
        assert_eq!(&b[..32], &head[..]);
        assert!(b[32..448].iter().all(|&x| x == 0), "reserved");
        // Map at page offset 512 = extension offset 448.
        #[rustfmt::skip]
        let map: [u8; 16] = [0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 6, 0, 0, 0];
        assert_eq!(&b[448..464], &map[..]);
        assert!(b[464..448 + 2048].iter().all(|&x| x == 0));
        // Computed independently (bitwise CRC-32C) over the 2048 map bytes.
        assert_eq!(&b[448 + 2048..], &[0x9b, 0xee, 0x76, 0x62]);

        let mut page = vec![0u8; HEADER_SIZE as usize];
        page[EXT_OFF..EXT_END].copy_from_slice(&b);
        let d = SnapExt::decode(&page, 4).unwrap();
        assert!(d.map_ok);
        assert_eq!(d.ext, ext);
        assert!(matches!(
            SnapExt::decode(&page, 8),
            Err(HeaderError::BadChunkCount { .. })
        ));
        // A torn map is reported, not trusted.
        page[600] ^= 1;
        let d = SnapExt::decode(&page, 4).unwrap();
        assert!(!d.map_ok);
        assert_eq!(d.ext.map, vec![0; 4]);
        page[70] ^= 1;
        assert!(matches!(
            SnapExt::decode(&page, 4),
            Err(HeaderError::BadExtChecksum { .. })
        ));
    }

    #[test]
    fn rejects_damage() {
        let good = sample().encode();
        assert_eq!(ObjectHeader::decode(&[0; FIXED_LEN]).unwrap(), None);

        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            ObjectHeader::decode(&b),
            Err(HeaderError::BadMagic { .. })
        ));

        let mut b = good;
        b[21] ^= 1;
        assert!(matches!(
            ObjectHeader::decode(&b),
            Err(HeaderError::BadChecksum { .. })
        ));

        let reseal = |mut h: ObjectHeader, f: &dyn Fn(&mut ObjectHeader)| {
            f(&mut h);
            h.encode()
        };
        let b = reseal(sample(), &|h| h.incompat = 4 | INCOMPAT_SNAP);
        assert_eq!(
            ObjectHeader::decode(&b),
            Err(HeaderError::UnknownIncompat { bits: 4 })
        );
        let b = reseal(sample(), &|h| h.version = 2);
        assert_eq!(
            ObjectHeader::decode(&b),
            Err(HeaderError::UnknownVersion { found: 2 })
        );
        // Unknown compatible bits are fine.
        let b = reseal(sample(), &|h| h.compat = 0x8000_0000);
        assert!(ObjectHeader::decode(&b).unwrap().is_some());

        let h = ObjectHeader::decode(&good).unwrap().unwrap();
        let id = ImageId::parse("10226b8b4567").unwrap();
        assert!(h.check_identity(&id, 0x0102_0304_0506_0708).is_ok());
        assert!(h.check_identity(&id, 1).is_err());
    }
}

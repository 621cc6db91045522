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
//! | 64 | 4032 | reserved, zero |
//!
//! The whole page is [`HEADER_SIZE`] bytes so object data stays block aligned:
//! data byte `k` of the object lives at file offset `HEADER_SIZE + k`. The
//! reserved part is where per-chunk epoch maps (snapshots, dirty tracking)
//! will go; they will carry their own checksums and an incompatible feature
//! bit, so this fixed part never changes meaning.

use tern_types::ImageId;

pub const HEADER_SIZE: u64 = 4096;
pub const MAGIC: [u8; 8] = *b"TERNOBJ\0";
pub const VERSION: u32 = 1;
/// Incompatible feature bits this version understands (none yet).
pub const KNOWN_INCOMPAT: u32 = 0;
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
            incompat: 0,
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
            0, 0, 0, 0,                                         // incompat
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
    const GOLDEN_CRC: [u8; 4] = [0x1b, 0xad, 0xe0, 0x86];

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
        let b = reseal(sample(), &|h| h.incompat = 4);
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

//! The journal's small persistent state: the applied checkpoint and the
//! registered clients with their committed positions.
//!
//! File `state` in the journal directory (little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"TERNJST\0"` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | incompatible feature bits (none known) |
//! | 16 | 4 | compatible feature bits |
//! | 20 | 4 | body length |
//! | 24 | 4 | crc32c of bytes 0..24 followed by the body |
//! | 28 | n | body: JSON [`PersistState`] (new fields must be `#[serde(default)]`) |
//!
//! Replaced atomically: written to `state.tmp`, synced, renamed over
//! `state`, directory synced. A crash leaves the old or the new state.

use crate::object::{fsync_dir, read_full_at};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const STATE_FILE: &str = "state";
const STATE_TMP: &str = "state.tmp";
const MAGIC: [u8; 8] = *b"TERNJST\0";
const VERSION: u32 = 1;
const HEADER: usize = 28;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistState {
    /// Every entry with tid <= this is applied to the object files durably.
    pub checkpoint: u64,
    #[serde(default)]
    pub clients: Vec<ClientRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub id: String,
    /// The client has processed every entry with tid <= this.
    pub commit: u64,
    #[serde(default)]
    pub disconnected: bool,
    /// Unix seconds.
    #[serde(default)]
    pub registered: u64,
}

pub fn encode(s: &PersistState) -> Vec<u8> {
    let body = serde_json::to_vec(s).expect("state serializes");
    let mut b = Vec::with_capacity(HEADER + body.len());
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b), &body);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&body);
    b
}

/// Decodes a state file; the error is a sentence for a `Corrupt` report.
pub fn decode(b: &[u8]) -> Result<PersistState, String> {
    if b.len() < HEADER || b[..8] != MAGIC {
        return Err("not a tern journal state file (bad magic or too short)".into());
    }
    let u = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    if u(8) != VERSION {
        return Err(format!(
            "journal state version {} is newer than this tern understands ({VERSION}): upgrade tern",
            u(8)
        ));
    }
    if u(12) != 0 {
        return Err(format!(
            "unknown incompatible journal state bits {:#x}: upgrade tern",
            u(12)
        ));
    }
    let len = u(20) as usize;
    if b.len() != HEADER + len {
        return Err(format!(
            "journal state body is {} bytes, header says {len}",
            b.len() - HEADER
        ));
    }
    let body = &b[HEADER..];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..24]), body);
    if computed != u(24) {
        return Err("journal state checksum mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("journal state body: {e}"))
}

pub fn load(dir: &Path) -> io::Result<Result<PersistState, String>> {
    let f = File::open(dir.join(STATE_FILE))?;
    let len = f.metadata()?.len() as usize;
    let mut b = vec![0u8; len];
    let n = read_full_at(&f, &mut b, 0)?;
    b.truncate(n);
    Ok(decode(&b))
}

pub fn store(dir: &Path, s: &PersistState) -> io::Result<()> {
    let tmp = dir.join(STATE_TMP);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all_at(&encode(s), 0)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_and_damage() {
        let s = PersistState {
            checkpoint: 5,
            clients: vec![ClientRecord {
                id: "peer".into(),
                commit: 3,
                disconnected: false,
                registered: 1,
            }],
        };
        let b = encode(&s);
        assert_eq!(&b[..8], b"TERNJST\0");
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[12..20], &[0; 8]);
        let body = br#"{"checkpoint":5,"clients":[{"id":"peer","commit":3,"disconnected":false,"registered":1}]}"#;
        assert_eq!(&b[20..24], &(body.len() as u32).to_le_bytes());
        assert_eq!(&b[28..], &body[..]);
        assert_eq!(decode(&b).unwrap(), s);
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 4;
            assert!(decode(&d).is_err(), "flip at {i}");
        }
        assert!(decode(&b[..b.len() - 1]).is_err());
        let t = tempfile::tempdir().unwrap();
        store(t.path(), &s).unwrap();
        assert_eq!(load(t.path()).unwrap().unwrap(), s);
    }
}

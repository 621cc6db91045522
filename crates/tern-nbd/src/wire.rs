//! NBD wire constants and codecs: pure functions over bytes, no I/O.
//!
//! Everything on the wire is big-endian ("network byte order"). Layouts follow
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>; the
//! golden-byte tests at the bottom pin them.

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// NBD_INFO_* items inside NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

// Error values (the protocol's own numbering, equal to Linux errno).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Largest READ/WRITE payload we accept, and what NBD_INFO_BLOCK_SIZE advertises.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
pub const PREFERRED_BLOCK: u32 = 4096;
/// The spec caps strings (names, messages) at 4096 bytes.
pub const MAX_STRING: usize = 4096;

pub const REQUEST_LEN: usize = 28;
pub const OPTION_HEADER_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("option payload truncated or malformed")]
    Malformed,
    #[error("string is not valid UTF-8 or is longer than {MAX_STRING} bytes")]
    BadString,
}

/// One transmission-phase request header (the WRITE payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    /// Opaque to the server; echoed in every reply chunk (the spec's "handle"/"cookie").
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(WireError::RequestMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Returns (option, data length).
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), WireError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(WireError::OptionMagic(magic));
    }
    Ok((
        u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
        u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
    ))
}

pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes
/// unless the client negotiated NO_ZEROES.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let name = truncate(name);
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(truncate(description).as_bytes());
    b
}

pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

pub fn encode_info_string(info: u16, s: &str) -> Vec<u8> {
    let s = truncate(s);
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(truncate(name).as_bytes());
    b
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO: export name and requested NBD_INFO_* items.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), WireError> {
    let mut c = Cursor(data);
    let name = c.string_u32()?;
    let n = c.u16()? as usize;
    let mut infos = Vec::with_capacity(n.min(c.0.len() / 2));
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    c.end()?;
    Ok((name, infos))
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name and queries.
pub fn parse_meta_context_request(data: &[u8]) -> Result<(String, Vec<String>), WireError> {
    let mut c = Cursor(data);
    let name = c.string_u32()?;
    let n = c.u32()? as usize;
    // Each query needs at least its 4-byte length, so this bounds the allocation.
    let mut queries = Vec::with_capacity(n.min(c.0.len() / 4));
    for _ in 0..n {
        queries.push(c.string_u32()?);
    }
    c.end()?;
    Ok((name, queries))
}

pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn encode_chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Header plus the 8-byte offset of an OFFSET_DATA chunk; the data follows separately
/// so large reads are not copied.
pub fn encode_offset_data_prefix(flags: u16, cookie: u64, offset: u64, data_len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + data_len,
    ));
    b.extend_from_slice(&offset.to_be_bytes());
    b
}

pub fn encode_offset_hole(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// NBD_REPLY_TYPE_ERROR, or NBD_REPLY_TYPE_ERROR_OFFSET when `offset` is known.
/// Always the final chunk: we never continue a reply after an error.
pub fn encode_error_chunk(cookie: u64, errno: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let msg = truncate(message);
    let kind = if offset.is_some() {
        REPLY_TYPE_ERROR_OFFSET
    } else {
        REPLY_TYPE_ERROR
    };
    let len = 6 + msg.len() + if offset.is_some() { 8 } else { 0 };
    let mut b = Vec::with_capacity(20 + len);
    b.extend_from_slice(&encode_chunk_header(
        REPLY_FLAG_DONE,
        kind,
        cookie,
        len as u32,
    ));
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    if let Some(o) = offset {
        b.extend_from_slice(&o.to_be_bytes());
    }
    b
}

pub fn encode_block_status(
    flags: u16,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(20 + len);
    b.extend_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    ));
    b.extend_from_slice(&context_id.to_be_bytes());
    for &(l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// Cuts a string to the spec's 4096-byte limit on a char boundary.
pub fn truncate(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// "Check, then parse": every read is length-checked so hostile payloads
/// produce `Malformed`, never a panic or an oversized allocation.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn string_u32(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(WireError::BadString);
        }
        let raw = self.take(n)?;
        let s = std::str::from_utf8(raw).map_err(|_| WireError::BadString)?;
        if s.contains('\0') {
            return Err(WireError::BadString);
        }
        Ok(s.to_owned())
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_golden() {
        // "NBDMAGIC" "IHAVEOPT" then flags FIXED_NEWSTYLE|NO_ZEROES.
        let mut want = b"NBDMAGICIHAVEOPT".to_vec();
        want.extend_from_slice(&[0x00, 0x03]);
        assert_eq!(encode_greeting().to_vec(), want);
    }

    #[test]
    fn request_golden_roundtrip() {
        let bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // type: WRITE
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
            0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // offset 1 MiB
            0x00, 0x00, 0x10, 0x00, // length 4096
        ];
        let r = parse_request(&bytes).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 1 << 20,
                length: 4096
            }
        );
        assert_eq!(encode_request(&r), bytes);
    }

    #[test]
    fn request_bad_magic() {
        let mut bytes = [0u8; 28];
        bytes[0] = 0x67;
        assert!(matches!(
            parse_request(&bytes),
            Err(WireError::RequestMagic(_))
        ));
    }

    #[test]
    fn option_header_golden() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&[0, 0, 0, 7]);
        b[12..16].copy_from_slice(&[0, 0, 0, 6]);
        assert_eq!(parse_option_header(&b).unwrap(), (OPT_GO, 6));
        b[0] = b'X';
        assert!(parse_option_header(&b).is_err());
    }

    #[test]
    fn option_reply_golden() {
        let b = encode_option_reply(OPT_LIST, REP_ACK, &[]);
        assert_eq!(
            b,
            [
                0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // magic
                0, 0, 0, 3, // option
                0, 0, 0, 1, // ACK
                0, 0, 0, 0, // length
            ]
        );
        let e = encode_option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no");
        assert_eq!(&e[12..16], &[0x80, 0, 0, 6]);
        assert_eq!(&e[16..], &[0, 0, 0, 2, b'n', b'o']);
    }

    #[test]
    fn export_name_reply_zeroes() {
        assert_eq!(encode_export_name_reply(1, 3, false).len(), 134);
        assert_eq!(
            encode_export_name_reply(512, 0x0103, true),
            [0, 0, 0, 0, 0, 0, 2, 0, 0x01, 0x03]
        );
    }

    #[test]
    fn info_golden() {
        assert_eq!(
            encode_info_export(0x1_0000_0000, 0x0001),
            [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            encode_info_block_size(1, 4096, MAX_PAYLOAD),
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
        assert_eq!(encode_info_string(INFO_NAME, "ab"), [0, 1, b'a', b'b']);
    }

    #[test]
    fn info_request_parse() {
        let data = [0, 0, 0, 2, b'h', b'i', 0, 2, 0, 3, 0, 1];
        assert_eq!(
            parse_info_request(&data).unwrap(),
            ("hi".to_string(), vec![INFO_BLOCK_SIZE, INFO_NAME])
        );
        // Count says 3 items but only 2 follow.
        let bad = [0, 0, 0, 0, 0, 3, 0, 3, 0, 1];
        assert_eq!(parse_info_request(&bad), Err(WireError::Malformed));
        // Trailing garbage.
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 0, 9]).is_err());
        // Name longer than the payload.
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn meta_request_parse() {
        let mut d = vec![0, 0, 0, 1, b'x', 0, 0, 0, 2];
        d.extend_from_slice(&[0, 0, 0, 15]);
        d.extend_from_slice(b"base:allocation");
        d.extend_from_slice(&[0, 0, 0, 5]);
        d.extend_from_slice(b"tern:");
        let (name, q) = parse_meta_context_request(&d).unwrap();
        assert_eq!(name, "x");
        assert_eq!(q, vec!["base:allocation", "tern:"]);
        // A huge query count with no data must not allocate or panic.
        let evil = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_meta_context_request(&evil).is_err());
    }

    #[test]
    fn simple_reply_golden() {
        assert_eq!(
            encode_simple_reply(NBD_EINVAL, 0xaabb),
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb
            ]
        );
    }

    #[test]
    fn structured_chunks_golden() {
        assert_eq!(
            encode_offset_data_prefix(REPLY_FLAG_DONE, 7, 512, 4),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 12, 0, 0, 0,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(
            encode_offset_hole(0, 7, 0, 4096)[4..],
            [
                0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0x10, 0
            ]
        );
        assert_eq!(
            encode_error_chunk(1, NBD_EIO, "x", None)[4..],
            [
                0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 5, 0, 1, b'x'
            ]
        );
        let eo = encode_error_chunk(1, NBD_EIO, "", Some(9));
        assert_eq!(&eo[6..8], &[0x80, 2]);
        assert_eq!(&eo[16..20], &[0, 0, 0, 14]);
        assert_eq!(&eo[26..], &[0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(
            encode_block_status(REPLY_FLAG_DONE, 2, 1, &[(4096, STATE_HOLE | STATE_ZERO)])[4..],
            [
                0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0,
                0, 3
            ]
        );
    }

    #[test]
    fn truncate_respects_char_boundary() {
        let s = "é".repeat(3000);
        let t = truncate(&s);
        assert!(t.len() <= MAX_STRING);
        assert!(t.len() >= MAX_STRING - 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
            if data.len() >= REQUEST_LEN {
                let _ = parse_request(data[..REQUEST_LEN].try_into().unwrap());
            }
        }

        #[test]
        fn request_roundtrip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            proptest::prop_assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        }
    }
}

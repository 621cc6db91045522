//! A small blocking NBD client for tests that need what the stock clients
//! do not give: many requests in flight on one connection, FUA on chosen
//! writes, and the moment each reply arrived (a crash test's writer log).
//!
//! Fixed newstyle handshake with NBD_OPT_GO, simple replies only.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
pub const FLAG_FUA: u16 = 1;

/// A reply: the request's handle, the NBD error (0: success) and, for a
/// read, the data.
#[derive(Debug)]
pub struct Reply {
    pub handle: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

pub struct NbdClient {
    w: Arc<Mutex<TcpStream>>,
    pub size: u64,
    pub flags: u16,
    /// Lengths of reads in flight, for the reader thread.
    reads: Arc<Mutex<HashMap<u64, u32>>>,
    pub replies: mpsc::Receiver<Reply>,
    next: u64,
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A connection to `addr` that has opened `export` with NBD_OPT_GO (no
/// structured replies): the socket in transmission phase, the export size
/// and its transmission flags. For tests that drive the wire themselves.
pub fn handshake(addr: &str, export: &str) -> io::Result<(TcpStream, u64, u16)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)?;
    if &magic != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
        return Err(io::Error::other("not an NBD newstyle server"));
    }
    let _hs_flags = read_u16(&mut s)?;
    // Fixed newstyle, no zeroes.
    s.write_all(&3u32.to_be_bytes())?;
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt)?;
    let (mut size, mut flags) = (0, 0);
    loop {
        if read_u64(&mut s)? != REPLY_MAGIC {
            return Err(io::Error::other("bad option reply magic"));
        }
        let _opt = read_u32(&mut s)?;
        let typ = read_u32(&mut s)?;
        let len = read_u32(&mut s)? as usize;
        let mut body = vec![0; len];
        s.read_exact(&mut body)?;
        if typ & 0x8000_0000 != 0 {
            return Err(io::Error::other(format!(
                "NBD_OPT_GO refused ({typ:#x}): {}",
                String::from_utf8_lossy(&body)
            )));
        }
        if typ == REP_INFO && len >= 12 && body[..2] == [0, 0] {
            size = u64::from_be_bytes(body[2..10].try_into().expect("8 bytes"));
            flags = u16::from_be_bytes(body[10..12].try_into().expect("2 bytes"));
        }
        if typ == REP_ACK {
            break;
        }
    }
    Ok((s, size, flags))
}

impl NbdClient {
    /// Connects to `addr` (host:port) and opens `export`.
    pub fn connect(addr: &str, export: &str) -> io::Result<NbdClient> {
        let (s, size, flags) = handshake(addr, export)?;
        let reads = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::channel();
        let mut r = s.try_clone()?;
        let reads2 = reads.clone();
        std::thread::spawn(move || {
            loop {
                let head = (|| -> io::Result<(u32, u32, u64)> {
                    Ok((read_u32(&mut r)?, read_u32(&mut r)?, read_u64(&mut r)?))
                })();
                let Ok((magic, error, handle)) = head else {
                    return;
                };
                if magic != SIMPLE_REPLY_MAGIC {
                    return;
                }
                let len = reads2.lock().expect("reads").remove(&handle);
                let mut data = Vec::new();
                if let (Some(len), 0) = (len, error) {
                    data = vec![0; len as usize];
                    if r.read_exact(&mut data).is_err() {
                        return;
                    }
                }
                if tx
                    .send(Reply {
                        handle,
                        error,
                        data,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(NbdClient {
            w: Arc::new(Mutex::new(s)),
            size,
            flags,
            reads,
            replies: rx,
            next: 1,
        })
    }

    fn send(
        &mut self,
        flags: u16,
        typ: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next;
        self.next += 1;
        if typ == CMD_READ {
            self.reads.lock().expect("reads").insert(handle, len);
        }
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.w.lock().expect("socket").write_all(&b)?;
        Ok(handle)
    }

    /// Sends a write; returns its handle.
    pub fn send_write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u64> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.send(flags, CMD_WRITE, offset, data.len() as u32, data)
    }

    pub fn send_flush(&mut self) -> io::Result<u64> {
        self.send(0, CMD_FLUSH, 0, 0, &[])
    }

    pub fn send_read(&mut self, offset: u64, len: u32) -> io::Result<u64> {
        self.send(0, CMD_READ, offset, len, &[])
    }

    /// A read, waited for (no other request may be in flight).
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let h = self.send_read(offset, len)?;
        let r = self
            .replies
            .recv()
            .map_err(|_| io::Error::other("connection closed"))?;
        if r.handle != h || r.error != 0 {
            return Err(io::Error::other(format!("read failed: {r:?}")));
        }
        Ok(r.data)
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) {
        let _ = self.send(0, CMD_DISC, 0, 0, &[]);
    }
}

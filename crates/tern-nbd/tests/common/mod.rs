//! Test fixtures: a sparse in-memory device, an export table, a tiny raw client.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tern_nbd::wire::*;
use tern_nbd::{BlockDevice, DeviceError, Exports, MetaContext, ReadChunk};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PAGE: u64 = 4096;
pub const CHANGED_PREFIX: &str = "tern:changed-since:";

#[derive(Default)]
struct State {
    pages: BTreeMap<u64, Box<[u8]>>,
    /// snapshot name -> pages written since it was taken.
    changed: HashMap<String, BTreeSet<u64>>,
}

/// Sparse device in 4 KiB pages; absent pages are holes that read as zero.
pub struct MemDevice {
    size: u64,
    ro: bool,
    multi_conn: bool,
    st: Mutex<State>,
    /// Artificial latency so concurrent requests overlap measurably.
    pub delay: Mutex<Duration>,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub closes: AtomicUsize,
    pub fast_zero: AtomicBool,
}

struct Flight<'a>(&'a MemDevice);
impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemDevice {
    pub fn new(size: u64, ro: bool) -> Arc<Self> {
        Arc::new(MemDevice {
            size,
            ro,
            multi_conn: true,
            st: Mutex::default(),
            delay: Mutex::new(Duration::ZERO),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            closes: AtomicUsize::new(0),
            fast_zero: AtomicBool::new(true),
        })
    }

    async fn enter(&self) -> Flight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        Flight(self)
    }

    /// Starts tracking changes for `tern:changed-since:<name>`.
    pub fn snapshot(&self, name: &str) {
        self.st
            .lock()
            .unwrap()
            .changed
            .insert(name.into(), BTreeSet::new());
    }

    /// Direct access for tests (bypasses the protocol).
    pub fn put(&self, offset: u64, data: &[u8]) {
        self.st.lock().unwrap().write(offset, data);
    }

    pub fn contents(&self) -> Vec<u8> {
        self.st.lock().unwrap().read(0, self.size as usize)
    }

    pub fn allocated_pages(&self) -> usize {
        self.st.lock().unwrap().pages.len()
    }
}

impl State {
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut pos = 0usize;
        while pos < len {
            let abs = offset + pos as u64;
            let (pg, within) = (abs / PAGE, (abs % PAGE) as usize);
            let n = (PAGE as usize - within).min(len - pos);
            if let Some(p) = self.pages.get(&pg) {
                out[pos..pos + n].copy_from_slice(&p[within..within + n]);
            }
            pos += n;
        }
        out
    }

    fn touch(&mut self, pg: u64) {
        for set in self.changed.values_mut() {
            set.insert(pg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let (pg, within) = (abs / PAGE, (abs % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - pos);
            let p = self
                .pages
                .entry(pg)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[pos..pos + n]);
            self.touch(pg);
            pos += n;
        }
    }

    /// Zeroes a range, punching out whole pages when `punch`.
    fn zero(&mut self, offset: u64, len: u64, punch: bool) {
        let end = offset + len;
        let mut abs = offset;
        while abs < end {
            let (pg, within) = (abs / PAGE, abs % PAGE);
            let n = (PAGE - within).min(end - abs);
            if punch && n == PAGE {
                self.pages.remove(&pg);
            } else if let Some(p) = self.pages.get_mut(&pg) {
                p[within as usize..(within + n) as usize].fill(0);
            } else if !punch {
                self.pages
                    .insert(pg, vec![0u8; PAGE as usize].into_boxed_slice());
            }
            self.touch(pg);
            abs += n;
        }
    }

    /// Per-page flags over the range, merged into runs.
    fn extents(&self, offset: u64, len: u32, flag_of: impl Fn(u64) -> u32) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        let end = offset + u64::from(len);
        let mut abs = offset;
        while abs < end {
            let pg = abs / PAGE;
            let n = (PAGE - abs % PAGE).min(end - abs) as u32;
            let f = flag_of(pg);
            match out.last_mut() {
                Some((l, lf)) if *lf == f => *l += n,
                _ => out.push((n, f)),
            }
            abs += u64::from(n);
        }
        out
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }
    fn fast_zero(&self) -> bool {
        self.fast_zero.load(Ordering::SeqCst)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let _f = self.enter().await;
        Ok(self.st.lock().unwrap().read(offset, len as usize))
    }
    async fn read_sparse(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, DeviceError> {
        let _f = self.enter().await;
        let st = self.st.lock().unwrap();
        let mut out = Vec::new();
        let mut pos = 0u64;
        for (n, flags) in st.extents(
            offset,
            len,
            |pg| if st.pages.contains_key(&pg) { 0 } else { 3 },
        ) {
            out.push(if flags == 3 {
                ReadChunk::Zero(n)
            } else {
                ReadChunk::Data(st.read(offset + pos, n as usize))
            });
            pos += u64::from(n);
        }
        Ok(out)
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), DeviceError> {
        let _f = self.enter().await;
        self.st.lock().unwrap().write(offset, &data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        let _f = self.enter().await;
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), DeviceError> {
        let _f = self.enter().await;
        self.st.lock().unwrap().zero(offset, u64::from(len), true);
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        let _f = self.enter().await;
        self.st
            .lock()
            .unwrap()
            .zero(offset, u64::from(len), !no_hole);
        Ok(())
    }
    async fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, DeviceError> {
        let _f = self.enter().await;
        let st = self.st.lock().unwrap();
        match context {
            MetaContext::BaseAllocation => Ok(st.extents(offset, len, |pg| {
                if st.pages.contains_key(&pg) {
                    0
                } else {
                    STATE_HOLE | STATE_ZERO
                }
            })),
            MetaContext::Device(name) => {
                let snap = name
                    .strip_prefix(CHANGED_PREFIX)
                    .and_then(|s| st.changed.get(s))
                    .ok_or_else(|| {
                        DeviceError::new(NBD_EINVAL, format!("unknown context {name}"))
                    })?;
                Ok(st.extents(offset, len, |pg| u32::from(snap.contains(&pg))))
            }
        }
    }
    fn meta_contexts(&self) -> Vec<String> {
        let st = self.st.lock().unwrap();
        let mut v: Vec<String> = st
            .changed
            .keys()
            .map(|s| format!("{CHANGED_PREFIX}{s}"))
            .collect();
        v.sort();
        v
    }
    async fn close(&self) {
        self.closes.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct MemExports {
    pub devices: BTreeMap<String, Arc<MemDevice>>,
}

impl MemExports {
    pub fn with(mut self, name: &str, dev: Arc<MemDevice>) -> Self {
        self.devices.insert(name.into(), dev);
        self
    }
}

#[async_trait]
impl Exports for MemExports {
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        self.devices
            .get(name)
            .map(|d| d.clone() as Arc<dyn BlockDevice>)
            .ok_or_else(|| DeviceError::new(NBD_EINVAL, format!("no export named {name:?}")))
    }
    async fn list(&self) -> Vec<(String, String)> {
        self.devices
            .iter()
            .map(|(n, d)| (n.clone(), format!("mem device of {} bytes", d.size())))
            .collect()
    }
}

/// Minimal raw client for protocol-level tests.
pub struct RawClient<S> {
    pub io: S,
}

#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Reads the greeting and sends client flags.
    pub async fn hello(io: S) -> std::io::Result<Self> {
        let mut c = RawClient { io };
        let mut g = [0u8; 18];
        c.io.read_exact(&mut g).await?;
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        c.io.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await?;
        Ok(c)
    }

    pub async fn send_opt(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.io.write_all(&b).await
    }

    pub async fn opt_reply(&mut self) -> std::io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).await?;
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await?;
        Ok(OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            kind: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        })
    }

    /// Sends an option and collects replies up to the final one.
    pub async fn opt(&mut self, option: u32, data: &[u8]) -> std::io::Result<Vec<OptReply>> {
        self.send_opt(option, data).await?;
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply().await?;
            let done = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            out.push(r);
            if done {
                return Ok(out);
            }
        }
    }

    /// NBD_OPT_GO; returns (size, transmission flags) or the error reply type.
    pub async fn go(&mut self, name: &str) -> std::io::Result<Result<(u64, u16), u32>> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut info = None;
        for r in self.opt(OPT_GO, &d).await? {
            if r.kind & 0x8000_0000 != 0 {
                return Ok(Err(r.kind));
            }
            if r.kind == REP_INFO && r.data[..2] == [0, 0] {
                info = Some((
                    u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
                    u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
                ));
            }
        }
        Ok(Ok(info.expect("INFO_EXPORT before ACK")))
    }

    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.io.write_all(&encode_request(&r)).await?;
        self.io.write_all(payload).await
    }

    /// Reads a simple reply header: (error, cookie).
    pub async fn simple_reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.io.read_exact(&mut h).await?;
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        Ok((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    /// Reads one structured chunk: (flags, type, cookie, payload).
    pub async fn chunk(&mut self) -> std::io::Result<(u16, u16, u64, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).await?;
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.io.read_exact(&mut p).await?;
        Ok((
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            p,
        ))
    }

    /// True once the server has closed its side.
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.io.read(&mut b).await, Ok(0) | Err(_))
    }
}

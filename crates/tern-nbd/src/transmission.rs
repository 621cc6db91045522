//! Transmission phase: one reader task parses requests and spawns a handler per
//! request; one writer task serialises their replies. Replies leave in
//! completion order, matched to requests by cookie.
//!
//! Memory is bounded three times: by the number of requests in flight, by
//! the payload bytes in flight on the connection and by those in flight on
//! the whole server. The permits travel with the reply to the writer,
//! so a client that stops reading replies stops being read from, instead of
//! making the server buffer without limit.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::device::{BlockDevice, DeviceError, MetaContext, ReadChunk};
use crate::handshake::Negotiated;
use crate::server::{BoxIo, NbdError, ServerConfig, Shutdown};
use crate::wire::*;

/// Ceiling on READ/WRITE payload bytes held by one connection at once.
const MAX_BYTES_IN_FLIGHT: u32 = 256 * 1024 * 1024;
/// Block-status replies are capped (the spec allows returning fewer extents
/// than would cover the range) so a device cannot make us build a huge reply.
const MAX_EXTENTS: usize = 64 * 1024;
/// After shutdown, how long we keep trying to deliver replies to a client that
/// is not reading them.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// Permits a request holds until its reply is written: a request slot,
/// the connection's byte share and the server-wide byte budget.
type Permits = (
    OwnedSemaphorePermit,
    OwnedSemaphorePermit,
    OwnedSemaphorePermit,
);

/// One complete reply (all chunks of it), written back-to-back.
struct Frame {
    parts: Vec<Vec<u8>>,
    _permits: Option<Permits>,
}

struct Ctx {
    device: Arc<dyn BlockDevice>,
    size: u64,
    structured: bool,
    contexts: Vec<(u32, MetaContext)>,
}

pub(crate) async fn run(
    io: BoxIo,
    neg: Negotiated,
    cfg: &ServerConfig,
    mut shutdown: Shutdown,
) -> Result<(), NbdError> {
    let ctx = Arc::new(Ctx {
        size: neg.device.size(),
        device: neg.device,
        structured: neg.structured,
        contexts: neg.contexts,
    });
    info!(
        export = neg.name,
        structured = ctx.structured,
        contexts = ctx.contexts.len(),
        "nbd: transmission started"
    );
    let (r, w) = tokio::io::split(io);
    let mut r = BufReader::with_capacity(128 * 1024, r);
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    let mut writer = tokio::spawn(write_replies(
        BufWriter::with_capacity(256 * 1024, w),
        rx,
        cfg.reply_timeout,
    ));
    let requests = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    let share = MAX_BYTES_IN_FLIGHT.min(cfg.memory.per_connection);
    let bytes = Arc::new(Semaphore::new(share as usize));
    let mut tasks = JoinSet::new();
    let mut served: u64 = 0;

    let result: Result<(), NbdError> = loop {
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; REQUEST_LEN];
        tokio::select! {
            biased;
            _ = shutdown.wait() => break Ok(()),
            // The reply writer gave up on a client that stopped reading.
            _ = tx.closed() => break Err(NbdError::ReplyTimeout),
            res = r.read_exact(&mut hdr) => match res {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(NbdError::TransmissionIo(e)),
            },
        }
        let req = match parse_request(&hdr) {
            Ok(r) => r,
            // Without a valid header we cannot find the next one: hang up.
            Err(e) => break Err(NbdError::Wire(e)),
        };
        if req.command == CMD_DISC {
            debug!("nbd: client sent DISC");
            break Ok(());
        }
        let is_write = req.command == CMD_WRITE;
        if is_write && req.length > MAX_PAYLOAD {
            // We will not buffer it and cannot skip it cheaply, so the stream
            // cannot be resynchronised: answer, then close.
            let e = DeviceError::new(NBD_EINVAL, "write payload exceeds 32 MiB");
            let _ = tx.send(Frame {
                parts: ctx.error_reply(&req, &e),
                _permits: None,
            });
            break Err(NbdError::PayloadTooLarge(req.length));
        }
        let budget = match req.command {
            CMD_READ | CMD_WRITE if req.length <= MAX_PAYLOAD => req.length,
            _ => 0,
        };
        // Waiting here is the backpressure; shutdown must still be able to end it
        // when the client has stopped reading replies.
        let permits = tokio::select! {
            biased;
            _ = shutdown.wait() => break Ok(()),
            _ = tx.closed() => break Err(NbdError::ReplyTimeout),
            p = async {
                let r = requests.clone().acquire_owned().await;
                let b = bytes.clone().acquire_many_owned(budget).await;
                // Global last: a connection holds its own share before it
                // competes for the server's, so waiting for the global
                // budget never blocks a permit another connection needs.
                let g = cfg.memory.sem.clone().acquire_many_owned(budget).await;
                (r, b, g)
            } => p,
        };
        let (Ok(p_req), Ok(p_bytes), Ok(p_mem)) = permits else {
            unreachable!("semaphores are never closed");
        };
        let mut payload = Vec::new();
        if is_write {
            payload = vec![0u8; req.length as usize];
            tokio::select! {
                biased;
                _ = shutdown.wait() => break Ok(()),
                res = r.read_exact(&mut payload) => match res {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                    Err(e) => break Err(NbdError::TransmissionIo(e)),
                },
            }
        }
        served += 1;
        let ctx = ctx.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let parts = ctx.execute(&req, payload).await;
            // A send error means the writer is gone (client vanished): nothing to do.
            let _ = tx.send(Frame {
                parts,
                _permits: Some((p_req, p_bytes, p_mem)),
            });
        });
    };

    // In-flight requests complete (and are answered) before the connection ends.
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            warn!(error = %e, "nbd: request handler failed");
        }
    }
    drop(tx);
    let drained = if shutdown.is_set() {
        match tokio::time::timeout(SHUTDOWN_DRAIN, &mut writer).await {
            Ok(r) => Some(r),
            Err(_) => {
                writer.abort();
                None
            }
        }
    } else {
        Some((&mut writer).await)
    };
    if let Some(Ok(Err(e))) = drained {
        debug!(error = %e, "nbd: reply writer stopped");
    }
    info!(
        requests = served,
        ok = result.is_ok(),
        "nbd: transmission ended"
    );
    result
}

async fn write_replies(
    mut w: BufWriter<WriteHalf<BoxIo>>,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    stall: Duration,
) -> std::io::Result<()> {
    let stalled = |_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took no reply bytes in time",
        )
    };
    while let Some(frame) = rx.recv().await {
        for p in &frame.parts {
            // In pieces, so the deadline is on progress, not on a whole
            // 32 MiB reply over a slow link.
            for piece in p.chunks(256 << 10) {
                tokio::time::timeout(stall, w.write_all(piece))
                    .await
                    .map_err(stalled)??;
            }
        }
        drop(frame);
        // Coalesce replies that are already queued into one syscall.
        if rx.is_empty() {
            tokio::time::timeout(stall, w.flush())
                .await
                .map_err(stalled)??;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

impl Ctx {
    fn in_range(&self, offset: u64, len: u32) -> bool {
        offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= self.size)
    }

    async fn execute(&self, req: &Request, payload: Vec<u8>) -> Vec<Vec<u8>> {
        let res = match req.command {
            CMD_READ => return self.read(req).await,
            CMD_BLOCK_STATUS => return self.block_status(req).await,
            CMD_WRITE => self.write(req, payload).await,
            CMD_FLUSH => self.device.flush().await,
            CMD_TRIM => self.trim(req).await,
            CMD_WRITE_ZEROES => self.write_zeroes(req).await,
            CMD_CACHE => Err(DeviceError::new(NBD_EINVAL, "CACHE is not supported")),
            other => Err(DeviceError::new(
                NBD_EINVAL,
                format!("unknown command {other}"),
            )),
        };
        match res {
            Ok(()) => vec![encode_simple_reply(0, req.cookie).to_vec()],
            Err(e) => self.error_reply(req, &e),
        }
    }

    fn error_reply(&self, req: &Request, e: &DeviceError) -> Vec<Vec<u8>> {
        let errno = e.wire_errno();
        if !self.structured {
            return vec![encode_simple_reply(errno, req.cookie).to_vec()];
        }
        // ERROR_OFFSET only where the spec allows it and the offset is inside the request.
        let offset = e.offset.filter(|&o| {
            matches!(
                req.command,
                CMD_READ | CMD_WRITE | CMD_TRIM | CMD_BLOCK_STATUS
            ) && o >= req.offset
                && o - req.offset < u64::from(req.length)
        });
        vec![encode_error_chunk(req.cookie, errno, &e.message, offset)]
    }

    fn check_write(&self, req: &Request) -> Result<(), DeviceError> {
        // Asked per request: a demoted image turns read-only under a live connection.
        if self.device.read_only() {
            return Err(DeviceError::new(NBD_EPERM, "export is read-only"));
        }
        if req.offset.checked_add(u64::from(req.length)).is_none() {
            return Err(DeviceError::new(NBD_EINVAL, "offset + length overflows"));
        }
        if !self.in_range(req.offset, req.length) {
            return Err(DeviceError::new(
                NBD_ENOSPC,
                "request extends past the end of the export",
            ));
        }
        Ok(())
    }

    async fn write(&self, req: &Request, payload: Vec<u8>) -> Result<(), DeviceError> {
        self.check_write(req)?;
        if payload.is_empty() {
            return Ok(());
        }
        self.device
            .write(req.offset, payload, req.has(CMD_FLAG_FUA))
            .await
    }

    async fn trim(&self, req: &Request) -> Result<(), DeviceError> {
        if self.device.read_only() {
            return Err(DeviceError::new(NBD_EPERM, "export is read-only"));
        }
        if !self.in_range(req.offset, req.length) {
            return Err(DeviceError::new(
                NBD_EINVAL,
                "trim extends past the end of the export",
            ));
        }
        if req.length == 0 {
            return Ok(());
        }
        self.device
            .trim(req.offset, req.length, req.has(CMD_FLAG_FUA))
            .await
    }

    async fn write_zeroes(&self, req: &Request) -> Result<(), DeviceError> {
        self.check_write(req)?;
        if req.has(CMD_FLAG_FAST_ZERO) && !self.device.fast_zero() {
            // The client asked us to fail rather than be slow; it will fall back itself.
            return Err(DeviceError::new(
                NBD_ENOTSUP,
                "zeroing is not fast on this export",
            ));
        }
        if req.length == 0 {
            return Ok(());
        }
        self.device
            .write_zeroes(
                req.offset,
                req.length,
                req.has(CMD_FLAG_NO_HOLE),
                req.has(CMD_FLAG_FUA),
            )
            .await
    }

    async fn read(&self, req: &Request) -> Vec<Vec<u8>> {
        if req.length > MAX_PAYLOAD {
            return self.error_reply(req, &DeviceError::new(NBD_EINVAL, "read exceeds 32 MiB"));
        }
        if !self.in_range(req.offset, req.length) {
            return self.error_reply(
                req,
                &DeviceError::new(NBD_EINVAL, "read extends past the end of the export"),
            );
        }
        if req.length == 0 {
            return if self.structured {
                vec![encode_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0).to_vec()]
            } else {
                vec![encode_simple_reply(0, req.cookie).to_vec()]
            };
        }
        if !self.structured || req.has(CMD_FLAG_DF) {
            return match self.device.read(req.offset, req.length).await {
                Ok(d) if d.len() == req.length as usize => {
                    let head = if self.structured {
                        encode_offset_data_prefix(
                            REPLY_FLAG_DONE,
                            req.cookie,
                            req.offset,
                            req.length,
                        )
                    } else {
                        encode_simple_reply(0, req.cookie).to_vec()
                    };
                    vec![head, d]
                }
                Ok(d) => self.error_reply(req, &short_read(d.len(), req.length)),
                Err(e) => self.error_reply(req, &e),
            };
        }
        let chunks = match self.device.read_sparse(req.offset, req.length).await {
            Ok(c) => c,
            Err(e) => return self.error_reply(req, &e),
        };
        let total: u64 = chunks
            .iter()
            .map(|c| match c {
                ReadChunk::Data(d) => d.len() as u64,
                ReadChunk::Zero(n) => u64::from(*n),
            })
            .sum();
        if total != u64::from(req.length) {
            return self.error_reply(req, &short_read(total as usize, req.length));
        }
        let mut parts = Vec::with_capacity(chunks.len() * 2);
        let mut offset = req.offset;
        let last = chunks
            .iter()
            .rposition(|c| {
                !matches!(c, ReadChunk::Zero(0)) && !matches!(c, ReadChunk::Data(d) if d.is_empty())
            })
            .unwrap_or(0);
        for (i, c) in chunks.into_iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            match c {
                ReadChunk::Data(d) if !d.is_empty() => {
                    let n = d.len() as u32;
                    parts.push(encode_offset_data_prefix(flags, req.cookie, offset, n));
                    parts.push(d);
                    offset += u64::from(n);
                }
                ReadChunk::Zero(n) if n > 0 => {
                    parts.push(encode_offset_hole(flags, req.cookie, offset, n));
                    offset += u64::from(n);
                }
                _ => {}
            }
        }
        parts
    }

    async fn block_status(&self, req: &Request) -> Vec<Vec<u8>> {
        if !self.structured || self.contexts.is_empty() {
            let e = DeviceError::new(NBD_EINVAL, "no metadata context was negotiated");
            return self.error_reply(req, &e);
        }
        if req.length == 0 || !self.in_range(req.offset, req.length) {
            let e = DeviceError::new(NBD_EINVAL, "block status range is empty or past the end");
            return self.error_reply(req, &e);
        }
        let limit = if req.has(CMD_FLAG_REQ_ONE) {
            1
        } else {
            MAX_EXTENTS
        };
        let mut replies = Vec::with_capacity(self.contexts.len());
        for (id, ctx) in &self.contexts {
            let raw = match self.device.block_status(ctx, req.offset, req.length).await {
                Ok(r) => r,
                Err(e) => return self.error_reply(req, &e),
            };
            let extents = clip_extents(&raw, req.length, limit);
            if extents.is_empty() {
                let e = DeviceError::io(format!("device returned no extents for {}", ctx.name()));
                return self.error_reply(req, &e);
            }
            replies.push((*id, extents));
        }
        let n = replies.len();
        replies
            .into_iter()
            .enumerate()
            .map(|(i, (id, ext))| {
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                encode_block_status(flags, req.cookie, id, &ext)
            })
            .collect()
    }
}

fn short_read(got: usize, want: u32) -> DeviceError {
    DeviceError::io(format!(
        "device returned {got} bytes for a {want}-byte read"
    ))
}

/// Drops empty extents and trims the list so it never describes more than `len`
/// bytes or more than `limit` extents (both are protocol requirements).
pub(crate) fn clip_extents(raw: &[(u32, u32)], len: u32, limit: usize) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut left = len;
    for &(l, f) in raw {
        if left == 0 || out.len() == limit {
            break;
        }
        if l == 0 {
            continue;
        }
        let l = l.min(left);
        left -= l;
        out.push((l, f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::clip_extents;

    #[test]
    fn clip() {
        assert_eq!(
            clip_extents(&[(0, 1), (10, 1), (10, 2)], 15, 10),
            vec![(10, 1), (5, 2)]
        );
        assert_eq!(clip_extents(&[(10, 1), (10, 2)], 100, 1), vec![(10, 1)]);
        assert!(clip_extents(&[(0, 3)], 100, 1).is_empty());
    }
}

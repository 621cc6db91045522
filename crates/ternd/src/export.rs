//! Export: the read stream. Sparse-aware: holes and all-zero blocks go out
//! as zero runs, never as bytes; a diff sends only what changed. What is
//! read is charged to the API's stream budget until the client takes it.

use crate::api::{Ctx, PoolCounters};
use crate::budget::Tx;
use crate::work::blocking;
use std::sync::Arc;
use tern_proto::v1 as pb;
use tern_store::Image;
use tern_types::error::Error;
use tonic::Status;

const DATA_CHUNK: u64 = 4 << 20;

/// What a read stream sends, checked before the stream starts.
pub struct Export {
    img: Arc<Image>,
    /// The snapshot read (None: the head).
    to: Option<u64>,
    start: u64,
    end: u64,
    /// Largest data message.
    pub chunk: u64,
    /// Some: a diff, from this snapshot (None inside: from the beginning).
    diff: Option<Diff>,
    counters: Arc<PoolCounters>,
}

struct Diff {
    from: Option<u64>,
    whole_object: bool,
    /// Ranges sent as if changed, clipped to the stream's range.
    extra: Vec<(u64, u64)>,
}

impl Export {
    /// Checks a read stream request against the image (blocking).
    pub fn plan(c: &Ctx, q: pb::ReadStreamRequest) -> Result<Export, Error> {
        let r = q.image.clone().unwrap_or_default();
        let (img, snap) = c.open_at(&r)?;
        let size = snap.as_ref().map(|s| s.size).unwrap_or_else(|| img.size());
        let to = snap.as_ref().map(|s| s.id);
        let end = if q.length == 0 {
            size
        } else {
            q.offset.saturating_add(q.length).min(size)
        };
        if q.offset > size {
            return Err(Error::invalid(format!(
                "offset {} is past the end ({size})",
                q.offset
            )));
        }
        let from = if q.diff && !q.diff_from.is_empty() {
            let f = c.site.store.snap_get(&r.pool, &r.image, &q.diff_from)?;
            if to.is_some_and(|t| t < f.id) {
                return Err(Error::invalid(format!(
                    "snapshot '{}' is newer than '{}': a diff runs from an older point to a newer one",
                    q.diff_from, r.snap
                )));
            }
            Some(f.id)
        } else {
            None
        };
        let chunk = if q.chunk_size == 0 {
            DATA_CHUNK
        } else {
            (q.chunk_size as u64).clamp(4096, 8 << 20)
        };
        let diff = q.diff.then(|| Diff {
            from,
            whole_object: q.whole_object,
            extra: q
                .extra
                .iter()
                .filter(|e| e.offset < end && e.offset + e.length > q.offset)
                .map(|e| {
                    let o = e.offset.max(q.offset);
                    (o, (e.offset + e.length).min(end) - o)
                })
                .collect(),
        });
        Ok(Export {
            img,
            to,
            start: q.offset,
            end,
            chunk,
            diff,
            counters: c.counters.of(&r.pool),
        })
    }
}

/// Sends what `plan` says; a failure ends the stream with its status.
pub async fn send(plan: Export, tx: Tx<pb::DataChunk>) {
    let Export {
        img,
        to,
        start,
        end,
        chunk,
        diff,
        counters,
    } = plan;
    let res = match diff {
        Some(d) => {
            let diff = DiffRange {
                from: d.from,
                to,
                start,
                end,
                whole_object: d.whole_object,
            };
            stream_diff(img, diff, chunk, d.extra, &tx, &counters).await
        }
        None => stream_out(img, to, start, end, chunk, &tx, &counters).await,
    };
    if let Err(e) = res {
        tx.fail(e);
    }
}

/// Reads `n` bytes at `at` on the blocking pool, counted as one read.
async fn read(
    img: &Arc<Image>,
    snap: Option<u64>,
    at: u64,
    n: u64,
    c: &PoolCounters,
) -> Result<bytes::Bytes, Status> {
    let i = img.clone();
    let buf = blocking(move || {
        let mut b = vec![0u8; n as usize];
        i.read_at(snap, at, &mut b)?;
        Ok::<_, Error>(bytes::Bytes::from(b))
    })
    .await
    .map_err(crate::api::status_of)?;
    PoolCounters::count(&c.read_ops, 1);
    PoolCounters::count(&c.read_bytes, n);
    Ok(buf)
}

fn zeros(offset: u64, length: u64) -> pb::DataChunk {
    pb::DataChunk {
        offset,
        length,
        zero: true,
        data: bytes::Bytes::new(),
    }
}

/// Sends [start, end) of an image as chunks: holes and all-zero blocks as
/// zero runs (merged), data in pieces of at most `chunk` bytes.
async fn stream_out(
    img: Arc<Image>,
    snap: Option<u64>,
    start: u64,
    end: u64,
    chunk: u64,
    tx: &Tx<pb::DataChunk>,
    c: &PoolCounters,
) -> Result<(), Status> {
    // Ask for the allocation map in windows that double while they come
    // back empty: a window of more than a few hundred objects costs one
    // directory listing, so a sparse image costs what its data costs (64
    // TiB empty: a dozen listings, where fixed 1 GiB windows probed 16
    // million absent objects before the first byte went out).
    const WINDOW: u64 = 1 << 30;
    let mut window = WINDOW;
    let mut pos = start;
    let mut zero_run = 0u64; // pending zeros starting at pos - zero_run
    let gone = || Status::cancelled("the client went away");
    while pos < end {
        // A client that hung up must not keep this loop (and a core) busy
        // until the image ends: sends alone notice only when data flows.
        if tx.is_closed() {
            return Err(gone());
        }
        let wend = pos.saturating_add(window).min(end);
        let i = img.clone();
        let (p, n) = (pos, wend - pos);
        let extents = blocking(move || i.allocated_extents_at(snap, p, n))
            .await
            .map_err(crate::api::status_of)?;
        window = if extents.is_empty() {
            window.saturating_mul(2)
        } else {
            WINDOW
        };
        let mut cur = pos;
        for (eoff, elen) in extents.into_iter().chain(std::iter::once((wend, 0))) {
            if eoff > cur {
                zero_run += eoff - cur;
                cur = eoff;
            }
            let eend = eoff + elen;
            while cur < eend {
                let n = chunk.min(eend - cur);
                // Room first: what is read is charged until the client
                // has taken it.
                let mut room = tx.reserve(n as usize).await?;
                let at = cur;
                let buf = read(&img, snap, at, n, c).await?;
                if tx.is_closed() {
                    return Err(gone());
                }
                for (off, len, zero) in tern_client::transfer::zero_runs(&buf) {
                    if zero {
                        zero_run += len as u64;
                        continue;
                    }
                    if zero_run > 0 {
                        tx.push(&mut room, zeros(at + off as u64 - zero_run, zero_run));
                        zero_run = 0;
                    }
                    tx.push(
                        &mut room,
                        pb::DataChunk {
                            offset: at + off as u64,
                            length: len as u64,
                            zero: false,
                            data: buf.slice(off..off + len),
                        },
                    );
                }
                cur += n;
            }
        }
        pos = wend;
        // The hole so far goes out now rather than with the next data, so
        // the client sees progress (and its first byte) at once.
        if zero_run > 0 && pos < end {
            tx.send(zeros(pos - zero_run, zero_run)).await?;
            zero_run = 0;
        }
    }
    if zero_run > 0 {
        tx.send(zeros(end - zero_run, zero_run)).await?;
    }
    Ok(())
}

/// What changed between two points inside [start, end).
struct DiffRange {
    from: Option<u64>,
    to: Option<u64>,
    start: u64,
    end: u64,
    whole_object: bool,
}

/// Sends only what changed: changed data as data chunks, changed-to-zero
/// ranges as zero runs, and `extra` ranges as if they had changed.
async fn stream_diff(
    img: Arc<Image>,
    d: DiffRange,
    chunk: u64,
    extra: Vec<(u64, u64)>,
    tx: &Tx<pb::DataChunk>,
    c: &PoolCounters,
) -> Result<(), Status> {
    let i = img.clone();
    let to = d.to;
    let mut extents =
        blocking(move || i.diff(d.from, d.to, d.start, d.end - d.start, d.whole_object))
            .await
            .map_err(crate::api::status_of)?;
    if !extra.is_empty() {
        // Extra ranges are read like changed data (zeros in them go as
        // zero runs); where they overlap a changed extent, one read.
        let mut all: Vec<(u64, u64, bool)> = extents
            .iter()
            .map(|e| (e.offset, e.length, e.data))
            .chain(extra.into_iter().map(|(o, l)| (o, l, true)))
            .filter(|e| e.1 > 0)
            .collect();
        all.sort_unstable_by_key(|e| e.0);
        let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(all.len());
        for (o, l, d) in all {
            match merged.last_mut() {
                Some(last) if o < last.0 + last.1 || (o == last.0 + last.1 && d == last.2) => {
                    last.1 = last.1.max(o + l - last.0);
                    last.2 |= d;
                }
                _ => merged.push((o, l, d)),
            }
        }
        extents = merged
            .into_iter()
            .map(|(offset, length, data)| tern_store::DiffExtent {
                offset,
                length,
                data,
            })
            .collect();
    }
    for e in extents {
        if !e.data {
            tx.send(zeros(e.offset, e.length)).await?;
            continue;
        }
        let mut cur = e.offset;
        let eend = e.offset + e.length;
        while cur < eend {
            let n = chunk.min(eend - cur);
            let mut room = tx.reserve(n as usize).await?;
            let at = cur;
            let buf = read(&img, to, at, n, c).await?;
            for (off, len, zero) in tern_client::transfer::zero_runs(&buf) {
                let offset = at + off as u64;
                let ch = if zero {
                    zeros(offset, len as u64)
                } else {
                    pb::DataChunk {
                        offset,
                        length: len as u64,
                        zero: false,
                        data: buf.slice(off..off + len),
                    }
                };
                tx.push(&mut room, ch);
            }
            cur += n;
        }
    }
    Ok(())
}

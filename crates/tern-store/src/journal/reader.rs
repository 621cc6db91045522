//! Reading the journal back: durable entries for clients (`read_from`,
//! [`Entries`]), and what `tern journal info|inspect` report.
//!
//! Only durable entries are ever handed out, so a peer never replicates an
//! entry that a crash could still take away.

use super::clients::{ClientInfo, Clients, LOCAL_CLIENT, client_info};
use super::format::{JournalEntry, SEG_HEADER_LEN};
use super::options::JournalOptions;
use super::segment;
use super::writer::Log;
use crate::error::StoreError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use tern_types::ImageId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub segno: u64,
    pub first_tid: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// What `tern journal info|status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalInfo {
    pub image_id: ImageId,
    pub segments: Vec<SegmentInfo>,
    pub bytes: u64,
    /// Oldest tid still held (or the next tid, if the journal is empty).
    pub first_tid: u64,
    /// Last tid appended (0: none yet).
    pub last_tid: u64,
    /// Last tid on stable storage and visible to readers.
    pub durable_tid: u64,
    /// Applied checkpoint: the local image's position.
    pub applied_tid: u64,
    /// The local image first ([`LOCAL_CLIENT`]), then registered clients.
    pub clients: Vec<ClientInfo>,
    pub options: JournalOptions,
    /// fdatasyncs done by group commit since the journal was opened.
    pub syncs: u64,
}

/// What `tern journal inspect` reports: every segment and entry checked
/// from the files, independently of the in-memory state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectReport {
    pub segments: u64,
    pub entries: u64,
    pub bytes: u64,
    pub first_tid: Option<u64>,
    pub last_tid: Option<u64>,
    /// Entries per op name.
    pub counts: BTreeMap<String, u64>,
    /// One sentence per problem; empty means clean.
    pub errors: Vec<String>,
}

fn trimmed(log: &Log, tid: u64, first: u64) -> StoreError {
    StoreError::JournalTrimmed {
        spec: log.spec(),
        tid,
        first,
    }
}

/// Durable entries from `tid` on, in order, about `max_bytes` of them
/// (at least one if any exists). Empty when `tid` is past the last
/// durable entry. Fails with [`StoreError::JournalTrimmed`] if `tid` was
/// trimmed.
pub(super) fn read_from(
    log: &Log,
    tid: u64,
    max_bytes: u64,
) -> Result<Vec<JournalEntry>, StoreError> {
    let durable = log.durable_tid();
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut next = tid.max(1);
    while next <= durable && (out.is_empty() || bytes < max_bytes) {
        // Plan one segment's read under the lock, read outside it.
        let (no, start, limit, count) = {
            let w = log.w.lock();
            let first = w.first_tid();
            if next < first {
                return Err(trimmed(log, next, first));
            }
            let Some((no, s)) = w.segs.iter().rev().find(|(_, s)| s.first_tid <= next) else {
                break;
            };
            let i = (next - s.first_tid) as usize;
            if i >= s.offsets.len() {
                break;
            }
            let last_in_seg = s.first_tid + s.offsets.len() as u64 - 1;
            let upto = last_in_seg.min(durable);
            let j = (upto - s.first_tid) as usize;
            let limit = s.offsets.get(j + 1).copied().unwrap_or(s.len);
            (*no, s.offsets[i], limit, upto - next + 1)
        };
        let path = segment::seg_path(&log.dir, no);
        let f = match segment::open_ro(&log.dir, no) {
            Ok(f) => f,
            // Trimmed between the plan and the open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(trimmed(log, next, log.first_tid()));
            }
            Err(e) => return Err(log.io_err(&path, e)),
        };
        let mut got = 0u64;
        let end = segment::scan(&f, start, limit, |_, e, n| {
            if e.tid != next {
                return false;
            }
            out.push(e);
            next += 1;
            got += 1;
            bytes += n as u64;
            got < count && bytes < max_bytes
        })
        .map_err(|e| log.io_err(&path, e))?;
        if let Some(why) = end.stop {
            return Err(log.corrupt(&path, format!("at offset {}: {why}", end.end)));
        }
        if got == 0 {
            return Err(log.corrupt(&path, format!("entry {next} is not where the index says")));
        }
    }
    Ok(out)
}

/// Iterator over durable entries, read in batches (see
/// [`Journal::entries`](super::Journal::entries)).
pub struct Entries<'a> {
    log: &'a Log,
    next: u64,
    upto: u64,
    batch: VecDeque<JournalEntry>,
    done: bool,
}

impl<'a> Entries<'a> {
    /// Every durable entry from `from` on.
    pub(super) fn new(log: &'a Log, from: u64) -> Entries<'a> {
        Entries {
            log,
            next: from.max(1),
            upto: log.durable_tid(),
            batch: VecDeque::new(),
            done: false,
        }
    }
}

impl Iterator for Entries<'_> {
    type Item = Result<JournalEntry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.batch.pop_front() {
            return Some(Ok(e));
        }
        if self.done || self.next > self.upto {
            return None;
        }
        match read_from(self.log, self.next, 4 << 20) {
            Ok(v) if v.is_empty() => None,
            Ok(v) => {
                self.next = v.last().expect("non-empty").tid + 1;
                self.batch
                    .extend(v.into_iter().filter(|e| e.tid <= self.upto));
                self.batch.pop_front().map(Ok)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

pub(super) fn info(log: &Log, clients: &Clients) -> JournalInfo {
    let stats = log.stats();
    let durable = stats.durable_tid;
    let st = clients.state();
    let w = log.w.lock();
    let segments: Vec<SegmentInfo> = w
        .segs
        .iter()
        .map(|(no, s)| SegmentInfo {
            segno: *no,
            first_tid: s.first_tid,
            entries: s.offsets.len() as u64,
            bytes: s.len,
        })
        .collect();
    let mut listed = vec![ClientInfo {
        id: LOCAL_CLIENT.to_string(),
        commit_tid: st.checkpoint,
        disconnected: false,
        entries_behind: durable.saturating_sub(st.checkpoint),
    }];
    listed.extend(st.clients.iter().map(|c| client_info(c, durable)));
    JournalInfo {
        image_id: log.image_id.clone(),
        bytes: segments.iter().map(|s| s.bytes).sum(),
        first_tid: segments.first().map_or(w.next_tid, |s| s.first_tid),
        segments,
        last_tid: w.last_tid(),
        durable_tid: durable,
        applied_tid: st.checkpoint,
        clients: listed,
        options: log.options(),
        syncs: stats.syncs,
    }
}

/// Reads every segment from disk and checks headers, every entry's crc
/// and the tid sequence. Only what has been written out is checked (an
/// entry still in memory is not on disk yet).
pub(super) fn inspect(log: &Log) -> Result<InspectReport, StoreError> {
    // Each segment up to where its entries end (a recycled file holds
    // old contents after that); the current one up to what is written.
    let segs: Vec<(u64, u64)> = {
        let w = log.w.lock();
        w.segs
            .iter()
            .map(|(&no, s)| (no, if no == w.cur_no { w.buf_off } else { s.len }))
            .collect()
    };
    let mut r = InspectReport::default();
    let mut expect: Option<u64> = None;
    for (no, written) in segs {
        let path = segment::seg_path(&log.dir, no);
        let f = match segment::open_ro(&log.dir, no) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // trimmed meanwhile
            Err(e) => return Err(log.io_err(&path, e)),
        };
        r.segments += 1;
        let len = f.metadata().map_err(|e| log.io_err(&path, e))?.len();
        let limit = written.min(len);
        if len < written {
            r.errors.push(format!(
                "{}: {len} bytes, but its entries end at {written}",
                path.display()
            ));
        }
        r.bytes += limit;
        let hdr = match segment::read_header(&f).map_err(|e| log.io_err(&path, e))? {
            Ok(h) => h,
            Err(e) => {
                r.errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        if hdr.segno != no || hdr.image_id != log.image_id.as_str() {
            r.errors.push(format!(
                "{}: header names segment {} of image '{}'",
                path.display(),
                hdr.segno,
                hdr.image_id
            ));
        }
        if let Some(n) = expect
            && hdr.first_tid != n
        {
            r.errors.push(format!(
                "{}: starts at tid {}, expected {n}",
                path.display(),
                hdr.first_tid
            ));
        }
        let mut next = hdr.first_tid;
        let mut errors = Vec::new();
        let end = segment::scan(&f, SEG_HEADER_LEN as u64, limit, |off, e, _| {
            if e.tid != next {
                errors.push(format!(
                    "{}: entry at offset {off} has tid {}, expected {next}",
                    path.display(),
                    e.tid
                ));
            }
            next = e.tid + 1;
            r.entries += 1;
            r.first_tid.get_or_insert(e.tid);
            r.last_tid = Some(e.tid);
            *r.counts.entry(e.op.name().to_string()).or_default() += 1;
            true
        })
        .map_err(|e| log.io_err(&path, e))?;
        r.errors.extend(errors);
        if let Some(why) = end.stop {
            r.errors
                .push(format!("{}: at offset {}: {why}", path.display(), end.end));
            // Where the next segment should start is unknown now.
            expect = None;
        } else {
            expect = Some(next);
        }
    }
    Ok(r)
}

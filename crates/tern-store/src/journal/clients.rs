//! Who holds the journal's entries, and trimming what nobody holds.
//!
//! Two kinds of holder: the local image, through its applied checkpoint,
//! and registered clients (a peer's replayer), through the position each
//! has committed. Both live in the persisted `state` file. Segments whose
//! every entry is at or below all of them are deleted or kept as spares;
//! a client that would make the journal exceed `max_size` is disconnected
//! instead.

use super::state::{self, ClientRecord, PersistState};
use super::writer::Log;
use crate::error::StoreError;
use crate::types::now_secs;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::Arc;

/// The id under which the local image's own position (the applied
/// checkpoint) is listed among the clients; not available to others.
pub const LOCAL_CLIENT: &str = "local";

/// A client of the journal and how far it has got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub id: String,
    /// Every entry with tid <= this has been processed by the client.
    pub commit_tid: u64,
    /// Fell too far behind: it no longer holds back trimming and must resync.
    pub disconnected: bool,
    /// Durable entries after `commit_tid`.
    pub entries_behind: u64,
}

pub(super) fn client_info(c: &ClientRecord, durable: u64) -> ClientInfo {
    ClientInfo {
        id: c.id.clone(),
        commit_tid: c.commit,
        disconnected: c.disconnected,
        entries_behind: durable.saturating_sub(c.commit),
    }
}

/// The persisted positions (checkpoint and clients) of one journal.
pub(super) struct Clients {
    log: Arc<Log>,
    /// The persisted state; its lock also serialises writing the file.
    st: Mutex<PersistState>,
}

impl Clients {
    pub(super) fn new(log: Arc<Log>, st: PersistState) -> Clients {
        Clients {
            log,
            st: Mutex::new(st),
        }
    }

    /// A copy of the persisted state.
    pub(super) fn state(&self) -> PersistState {
        self.st.lock().clone()
    }

    /// The applied checkpoint: every entry up to it is in the object files
    /// durably.
    pub(super) fn checkpoint(&self) -> u64 {
        self.st.lock().checkpoint
    }

    /// Records a new checkpoint `x` (if it moves forward), durably.
    pub(super) fn record_checkpoint(&self, x: u64) -> Result<(), StoreError> {
        let mut st = self.st.lock();
        if x > st.checkpoint {
            let mut next = st.clone();
            next.checkpoint = x;
            self.persist(&mut st, next)?;
        }
        Ok(())
    }

    fn persist(&self, st: &mut PersistState, next: PersistState) -> Result<(), StoreError> {
        state::store(&self.log.dir, &next).map_err(|e| self.log.io_err(&self.log.dir, e))?;
        *st = next;
        Ok(())
    }

    /// Registers a client (a peer's replayer) at the current end of the
    /// journal: it holds back trimming of every entry after that. Idempotent
    /// for a connected client; a disconnected one is reconnected at the
    /// current end (it must have resynced).
    pub(super) fn register(&self, id: &str) -> Result<ClientInfo, StoreError> {
        if id.is_empty() || id == LOCAL_CLIENT || id.len() > 250 {
            return Err(StoreError::InvalidName {
                what: "journal client",
                name: id.to_string(),
                reason: "client ids are 1 to 250 bytes and 'local' is reserved",
            });
        }
        let end = self.log.durable_tid();
        let mut st = self.st.lock();
        let mut next = st.clone();
        match next.clients.iter_mut().find(|c| c.id == id) {
            Some(c) if !c.disconnected => {}
            Some(c) => {
                c.disconnected = false;
                c.commit = end;
            }
            None => next.clients.push(ClientRecord {
                id: id.to_string(),
                commit: end,
                disconnected: false,
                registered: now_secs(),
            }),
        }
        if next != *st {
            self.persist(&mut st, next)?;
        }
        let c = st.clients.iter().find(|c| c.id == id).expect("registered");
        Ok(client_info(c, end))
    }

    pub(super) fn unregister(&self, id: &str) -> Result<(), StoreError> {
        {
            let mut st = self.st.lock();
            if !st.clients.iter().any(|c| c.id == id) {
                return Err(self.no_client(id));
            }
            let mut next = st.clone();
            next.clients.retain(|c| c.id != id);
            self.persist(&mut st, next)?;
        }
        self.trim()
    }

    fn no_client(&self, id: &str) -> StoreError {
        StoreError::JournalClientNotFound {
            spec: self.log.spec(),
            client: id.to_string(),
        }
    }

    /// Records that `client` has processed every entry up to `tid`
    /// (persisted), then trims what nobody needs any more. Positions only
    /// move forward; an older `tid` is ignored.
    pub(super) fn commit(&self, client: &str, tid: u64) -> Result<(), StoreError> {
        let durable = self.log.durable_tid();
        {
            let mut st = self.st.lock();
            let Some(c) = st.clients.iter().find(|c| c.id == client) else {
                return Err(self.no_client(client));
            };
            if c.disconnected {
                return Err(StoreError::JournalClientDisconnected {
                    spec: self.log.spec(),
                    client: client.to_string(),
                });
            }
            if tid > durable {
                return Err(StoreError::JournalCommitAhead {
                    spec: self.log.spec(),
                    client: client.to_string(),
                    tid,
                    last: durable,
                });
            }
            if tid <= c.commit {
                return Ok(());
            }
            let mut next = st.clone();
            if let Some(c) = next.clients.iter_mut().find(|c| c.id == client) {
                c.commit = tid;
            }
            self.persist(&mut st, next)?;
        }
        self.trim()
    }

    pub(super) fn client(&self, id: &str) -> Result<ClientInfo, StoreError> {
        let end = self.log.durable_tid();
        let st = self.st.lock();
        st.clients
            .iter()
            .find(|c| c.id == id)
            .map(|c| client_info(c, end))
            .ok_or_else(|| self.no_client(id))
    }

    /// Deletes segments every holder is done with; disconnects clients that
    /// would keep the journal above `max_size`.
    pub(super) fn trim(&self) -> Result<(), StoreError> {
        let log = &*self.log;
        let mut st = self.st.lock();
        // (segno, last tid, bytes) of closed segments, oldest first, and
        // the total size.
        let (closed, total): (Vec<(u64, u64, u64)>, u64) = {
            let w = log.w.lock();
            let total = w.segs.values().map(|s| s.len).sum();
            let closed = w
                .segs
                .iter()
                .filter(|(no, _)| **no != w.cur_no)
                .map(|(no, s)| {
                    let last = (s.first_tid + s.offsets.len() as u64).saturating_sub(1);
                    (*no, last, s.len)
                })
                .collect();
            (closed, total)
        };
        let keep_from = |st: &PersistState| {
            st.clients
                .iter()
                .filter(|c| !c.disconnected)
                .map(|c| c.commit)
                .fold(st.checkpoint, u64::min)
        };
        let trimmable = |pos: u64| -> (Vec<u64>, u64) {
            let mut nos = Vec::new();
            let mut bytes = 0;
            for &(no, last, len) in &closed {
                if last > pos {
                    break;
                }
                nos.push(no);
                bytes += len;
            }
            (nos, bytes)
        };
        let (mut nos, mut freed) = trimmable(keep_from(&st));
        let mut changed = false;
        while total - freed > log.options().max_size {
            // The furthest-behind client that holds back more than the
            // local image does goes first.
            let checkpoint = st.checkpoint;
            let victim = st
                .clients
                .iter_mut()
                .filter(|c| !c.disconnected && c.commit < checkpoint)
                .min_by_key(|c| c.commit);
            let Some(v) = victim else { break };
            v.disconnected = true;
            changed = true;
            (nos, freed) = trimmable(keep_from(&st));
        }
        if changed {
            state::store(&log.dir, &st).map_err(|e| log.io_err(&log.dir, e))?;
        }
        drop(st);
        if nos.is_empty() {
            return Ok(());
        }
        // Enough to take a whole checkpoint interval's segments back, which
        // the journal held anyway just before this trim.
        let opts = log.options();
        let keep = (opts.checkpoint_bytes / opts.segment_size.max(1) + 2).min(64) as usize;
        let mut recycle = {
            let mut w = log.w.lock();
            for no in &nos {
                w.segs.remove(no);
            }
            keep.saturating_sub(w.spares.len())
        };
        for no in nos {
            let p = super::segment::seg_path(&log.dir, no);
            let r = if recycle > 0 {
                std::fs::rename(&p, super::segment::spare_path(&log.dir, no))
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) if recycle > 0 => {
                    recycle -= 1;
                    log.w.lock().spares.push(no);
                }
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(log.io_err(&p, e)),
            }
        }
        // Not strictly needed (a resurrected old segment is trimmed again),
        // but keeps the directory honest.
        crate::object::fsync_dir(&log.dir).map_err(|e| log.io_err(&log.dir, e))
    }
}

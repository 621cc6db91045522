//! Journal mode on the non-primary: applying a peer primary's journal
//! entries and recording how far replay got.

use super::*;

/// What applying a batch of the primary's journal entries did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub last_tid: u64,
    /// Unix microseconds of the last entry applied.
    pub last_timestamp_us: u64,
    pub entries: u64,
    pub bytes: u64,
    /// A demote marker was reached: the primary handed over; replay stops.
    pub demoted: bool,
}

impl Mirror {
    /// Journal mode, on the non-primary: applies the primary's entries (in
    /// the journal's own encoding, crc-checked) in order, up to and
    /// including a demote marker. Every entry is idempotent in sequence, so
    /// replaying some again after a restart changes nothing. With
    /// `persist`, the image is flushed and the position recorded.
    pub fn journal_apply(
        &self,
        pool: &str,
        name: &str,
        primary_mirror_uuid: &str,
        entries: &[u8],
        persist: bool,
        fence: (Option<u64>, u64),
    ) -> Result<Applied, Error> {
        use tern_store::journal::{JournalEntry, JournalOp};
        let id = self.store().image_info(pool, name)?.id.to_string();
        let img = self.store().open_image(pool, name)?;
        let slot = self.replay_slot(&id);
        let mut hw = slot.lock();
        // Read under the lock: a promotion holds it while it turns the
        // image primary, so no batch lands after that.
        let mut m = self.image(&id)?.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        check_fence(pool, name, &m, fence.0)?;
        if m.primary {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "'{pool}/{name}' is primary here: refusing to replay another site's journal into it"
                ),
            ));
        }
        if hw.0 != primary_mirror_uuid {
            let from = m
                .journal_pos
                .as_ref()
                .filter(|p| p.primary_mirror_uuid == primary_mirror_uuid)
                .map_or(0, |p| p.tid);
            *hw = (primary_mirror_uuid.to_string(), from);
        }
        let mut done = Applied::default();
        // Writes are queued on a journaled image and waited for together
        // (one sync for many, as the primary's writers share theirs); any
        // other entry waits for them first, so the order holds.
        let mut tickets: Vec<tern_store::Ticket> = Vec::new();
        // The position before the first write still in `tickets`: if one
        // of them fails, replay must not count them as applied.
        let mut before_queued: Option<u64> = None;
        fn drain(
            t: &mut Vec<tern_store::Ticket>,
            hw: &mut (String, u64),
            before: &mut Option<u64>,
        ) -> Result<(), Error> {
            let mut failed = None;
            for x in t.drain(..) {
                // Wait for every one even after a failure: none may still
                // be landing when the caller retries.
                if let Err(e) = x.wait() {
                    failed.get_or_insert(e);
                }
            }
            if let Some(e) = failed {
                if let Some(b) = before.take() {
                    hw.1 = b;
                }
                return Err(Error::from(e));
            }
            *before = None;
            Ok(())
        }
        let mut b = entries;
        let map_key = |rid: u64| format!("journal-snap/{id}/{primary_mirror_uuid}/{rid}");
        while !b.is_empty() {
            let (e, used) = JournalEntry::decode(b).map_err(|e| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("journal entry from the primary: {e}"),
                )
            })?;
            b = &b[used..];
            if e.tid <= hw.1 {
                // Applied already (a replayer restarted behind us).
                done.last_tid = e.tid;
                done.last_timestamp_us = e.timestamp_us;
                continue;
            }
            let (tid, timestamp_us) = (e.tid, e.timestamp_us);
            if let JournalOp::Write { offset, data } = e.op {
                // The decoded payload goes to the journal queue as it is.
                done.bytes += data.len() as u64;
                match img.try_queue_write(offset, data, false) {
                    Ok(t) => {
                        before_queued.get_or_insert(hw.1);
                        tickets.push(t?);
                    }
                    Err(data) => {
                        drain(&mut tickets, &mut hw, &mut before_queued)?;
                        img.write(offset, &data, false)?;
                    }
                }
                done.last_tid = tid;
                done.last_timestamp_us = timestamp_us;
                done.entries += 1;
                hw.1 = tid;
                continue;
            }
            drain(&mut tickets, &mut hw, &mut before_queued)?;
            match &e.op {
                JournalOp::Write { .. } => unreachable!("handled above"),
                JournalOp::Discard { offset, len } => img.discard(*offset, *len)?,
                JournalOp::WriteZeroes { offset, len } => img.write_zeroes(*offset, *len)?,
                JournalOp::Resize { size } => {
                    if img.size() != *size {
                        self.store().image_resize(pool, name, *size, true)?;
                    }
                }
                JournalOp::SnapCreate {
                    id: rid,
                    name: sname,
                    namespace,
                } => match namespace {
                    SnapNamespace::User => {
                        if self.store().snap_get(pool, name, sname).is_err() {
                            self.store()
                                .snap_create(pool, name, sname, SnapNamespace::User)?;
                        }
                        put(self.store(), &map_key(*rid), &sname.to_string())?;
                    }
                    SnapNamespace::Mirror(ms) => {
                        let have = self.mirror_snaps(pool, name)?.into_iter().any(|(_, x)| {
                            x.primary_snap_id == *rid
                                && x.primary_mirror_uuid == primary_mirror_uuid
                        });
                        if !have {
                            self.non_primary_snapshot(
                                pool,
                                name,
                                &m.global_id,
                                primary_mirror_uuid,
                                *rid,
                                ms.state == MirrorSnapState::PrimaryDemoted,
                                0,
                            )?;
                        }
                    }
                },
                JournalOp::SnapRemove { id: rid } => {
                    // Mirror snapshots here are pruned on their own.
                    if let Some(sname) = get::<String>(self.store(), &map_key(*rid))? {
                        if self.store().snap_get(pool, name, &sname).is_ok() {
                            self.store().snap_remove(pool, name, &sname, false)?;
                        }
                        let _ = self.store().kv_delete(KvTable::Mirror, &map_key(*rid));
                    }
                }
                JournalOp::SnapRollback { id: rid } => {
                    if let Some(sname) = get::<String>(self.store(), &map_key(*rid))? {
                        self.store().snap_rollback(pool, name, &sname)?;
                    }
                }
                JournalOp::Flush => img.flush()?,
                JournalOp::Marker { kind, .. } => {
                    if kind == "demote" {
                        done.demoted = true;
                    }
                }
            }
            done.last_tid = e.tid;
            done.last_timestamp_us = e.timestamp_us;
            done.entries += 1;
            hw.1 = e.tid;
            if done.demoted {
                break;
            }
        }
        drain(&mut tickets, &mut hw, &mut before_queued)?;
        if persist || done.demoted {
            img.flush()?;
            crate::testpoint::reached("journal-apply-persist");
            if hw.1 > 0 {
                m.journal_pos = Some(JournalPos {
                    primary_mirror_uuid: primary_mirror_uuid.to_string(),
                    tid: hw.1,
                    skip_to: String::new(),
                    timestamp_us: if done.last_timestamp_us > 0 {
                        done.last_timestamp_us
                    } else {
                        m.journal_pos
                            .as_ref()
                            .filter(|p| p.primary_mirror_uuid == primary_mirror_uuid)
                            .map_or(0, |p| p.timestamp_us)
                    },
                });
                m.primary_mirror_uuid = primary_mirror_uuid.to_string();
                m.demoted = false;
                if fence.1 > 0 {
                    m.primary_epoch = fence.1;
                }
                self.save_image(&id, &m)?;
            }
        }
        Ok(done)
    }

    /// Records where journal replay stands after a snapshot sync: the
    /// replayer continues from `tid` (0: no position).
    pub fn journal_pos_set(
        &self,
        pool: &str,
        name: &str,
        pos: Option<JournalPos>,
        expect_epoch: Option<u64>,
    ) -> Result<(), Error> {
        let info = self.store().image_info(pool, name)?;
        let id = info.id.to_string();
        // Read the record under the lock: read before it, a promotion in
        // between would be written back over (the image turned non-primary).
        let slot = self.replay_slot(&id);
        let mut hw = slot.lock();
        let mut m = self.image(&id)?.ok_or_else(|| {
            Error::invalid(format!("mirroring is not enabled on image '{pool}/{name}'"))
        })?;
        check_fence(pool, name, &m, expect_epoch)?;
        if m.primary {
            return Err(Error::new(
                ErrorKind::Fenced,
                format!("'{pool}/{name}' is primary here: it replays no other site's journal"),
            ));
        }
        crate::testpoint::reached("journal-position");
        *hw = pos.as_ref().map_or((String::new(), 0), |p| {
            (p.primary_mirror_uuid.clone(), p.tid)
        });
        m.journal_pos = pos;
        self.save_image(&id, &m)
    }

    pub(super) fn replay_slot(&self, image_id: &str) -> crate::site::ReplaySlot {
        self.site
            .replay
            .lock()
            .entry(image_id.to_string())
            .or_default()
            .clone()
    }
}

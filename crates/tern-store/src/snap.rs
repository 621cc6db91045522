//! Snapshot metadata operations of the store: create, list, rename,
//! protect, mirror-state updates, remove, purge and rollback.
//!
//! Each change is one metadata transaction. Changes that touch data take
//! the image's `state` lock for writing, which waits for in-flight I/O:
//! that is what makes a snapshot a point in time (no write straddles it)
//! and what lets copy-on-write decide once per object per epoch. The data
//! side lives in `cow.rs` (clones), `dirty.rs` (epoch maps) and `diff.rs`.

use crate::error::StoreError;
use crate::image::Image;
use crate::journal::JournalOp;
use crate::meta::SnapSel;
use crate::store::Store;
use crate::types::{MirrorSnap, SnapInfo, SnapNamespace, now_secs};

/// Snapshot names are unique per image, across namespaces; `@` and `/`
/// would make specs ambiguous.
fn check_snap_name(name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        "names must not be empty"
    } else if name.len() > 250 {
        "names are at most 250 bytes"
    } else if name.contains('/') || name.contains('@') || name.contains('\0') {
        "snapshot names may not contain '/', '@' or NUL"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidName {
        what: "snapshot",
        name: name.to_string(),
        reason,
    })
}

impl Store {
    /// Takes a snapshot: waits for in-flight I/O, flushes the image (data
    /// and chunk maps), then commits the snapshot in one transaction. No
    /// per-object work: objects are cloned lazily on their next mutation.
    pub fn snap_create(
        &self,
        pool: &str,
        image: &str,
        name: &str,
        ns: SnapNamespace,
    ) -> Result<SnapInfo, StoreError> {
        check_snap_name(name)?;
        let _admin = self.admin.lock();
        let img = self.open_image(pool, image)?;
        self.snap_create_on(&img, pool, image, name, ns, true)
    }

    /// [`snap_create`](Self::snap_create) on an open handle, for callers
    /// holding the admin lock (or replaying). With `record`, a journaled
    /// image journals it first; it is a checkpoint barrier.
    pub(crate) fn snap_create_on(
        &self,
        img: &Image,
        pool: &str,
        image: &str,
        name: &str,
        ns: SnapNamespace,
        record: bool,
    ) -> Result<SnapInfo, StoreError> {
        img.with_snapshots_locked(|st| {
            let mut tid = None;
            if record && st.journal.is_some() {
                // Refused creates must not reach the journal (and peers).
                if st.snaps.iter().any(|s| s.name == name) {
                    return Err(StoreError::SnapExists {
                        spec: format!("{pool}/{image}@{name}"),
                    });
                }
                let op = JournalOp::SnapCreate {
                    id: st.snap_seq + 1,
                    name: name.to_string(),
                    namespace: ns.clone(),
                };
                tid = img.journal_barrier(st, &op)?;
            }
            let r = (|| {
                img.flush_locked(st)?;
                let now = now_secs();
                let (rec, snap) = self.meta.snap_create(pool, image, |r| SnapInfo {
                    id: r.snap_seq + 1,
                    name: name.to_string(),
                    namespace: ns,
                    size: r.size,
                    created: now,
                    protected: false,
                })?;
                st.snap_seq = rec.snap_seq;
                st.snaps.push(snap.clone());
                st.info.snap_count = st.snaps.len() as u64;
                Ok(snap)
            })();
            img.end_barrier(st, tid)?;
            r
        })
    }

    /// Snapshots of the image, by id.
    pub fn snap_list(&self, pool: &str, image: &str) -> Result<Vec<SnapInfo>, StoreError> {
        let (_, rec) = self.meta.image_get(pool, image)?;
        self.meta.snap_list(&rec.id)
    }

    pub fn snap_get(&self, pool: &str, image: &str, name: &str) -> Result<SnapInfo, StoreError> {
        let all = self.snap_list(pool, image)?;
        let i = crate::meta::find_snap(&all, &SnapSel::Name(name), pool, image)?;
        Ok(all[i].clone())
    }

    pub fn snap_get_by_id(&self, pool: &str, image: &str, id: u64) -> Result<SnapInfo, StoreError> {
        let all = self.snap_list(pool, image)?;
        let i = crate::meta::find_snap(&all, &SnapSel::Id(id), pool, image)?;
        Ok(all[i].clone())
    }

    pub fn snap_rename(
        &self,
        pool: &str,
        image: &str,
        old: &str,
        new: &str,
    ) -> Result<(), StoreError> {
        check_snap_name(new)?;
        self.snap_update(pool, image, SnapSel::Name(old), |s| {
            s.name = new.to_string();
            Ok(())
        })
        .map(|_| ())
    }

    pub fn snap_set_protected(
        &self,
        pool: &str,
        image: &str,
        name: &str,
        protected: bool,
    ) -> Result<(), StoreError> {
        self.snap_update(pool, image, SnapSel::Name(name), |s| {
            s.protected = protected;
            Ok(())
        })
        .map(|_| ())
    }

    /// Changes the mirror state of mirror snapshot `id` in one transaction.
    pub fn snap_update_mirror(
        &self,
        pool: &str,
        image: &str,
        id: u64,
        f: impl FnOnce(&mut MirrorSnap),
    ) -> Result<SnapInfo, StoreError> {
        self.snap_update(pool, image, SnapSel::Id(id), |s| match &mut s.namespace {
            SnapNamespace::Mirror(m) => {
                f(m);
                Ok(())
            }
            SnapNamespace::User => Err(StoreError::InvalidName {
                what: "mirror snapshot",
                name: s.name.clone(),
                reason: "it is a user snapshot",
            }),
        })
    }

    fn snap_update(
        &self,
        pool: &str,
        image: &str,
        sel: SnapSel<'_>,
        f: impl FnOnce(&mut SnapInfo) -> Result<(), StoreError>,
    ) -> Result<SnapInfo, StoreError> {
        let _admin = self.admin.lock();
        let img = self.open_image(pool, image)?;
        img.with_snapshots_locked(|st| {
            let (snap, all) = self.meta.snap_update(pool, image, sel, f)?;
            st.snaps = all;
            Ok(snap)
        })
    }

    /// Removes a snapshot, then deletes the clones only it needed.
    pub fn snap_remove(
        &self,
        pool: &str,
        image: &str,
        name: &str,
        allow_mirror: bool,
    ) -> Result<(), StoreError> {
        self.remove_snaps(pool, image, |all| {
            let i = crate::meta::find_snap(all, &SnapSel::Name(name), pool, image)?;
            let s = &all[i];
            let spec = format!("{pool}/{image}@{name}");
            if s.protected {
                return Err(StoreError::SnapProtected { spec });
            }
            if !allow_mirror && s.namespace != SnapNamespace::User {
                return Err(StoreError::MirrorSnapshot { spec });
            }
            Ok(vec![s.id])
        })
        .map(|_| ())
    }

    /// Removes every user snapshot of the image; returns how many. Refuses
    /// (removing nothing) while any user snapshot is protected, so the
    /// outcome is all or nothing. Mirror snapshots are left alone.
    pub fn snap_purge(&self, pool: &str, image: &str) -> Result<u64, StoreError> {
        self.remove_snaps(pool, image, |all| {
            let user = all.iter().filter(|s| s.namespace == SnapNamespace::User);
            let protected: Vec<&str> = user
                .clone()
                .filter(|s| s.protected)
                .map(|s| s.name.as_str())
                .collect();
            if !protected.is_empty() {
                return Err(StoreError::ProtectedSnapshots {
                    spec: format!("{pool}/{image}"),
                    names: protected.join(", "),
                });
            }
            Ok(user.map(|s| s.id).collect())
        })
    }

    fn remove_snaps(
        &self,
        pool: &str,
        image: &str,
        pick: impl FnOnce(&[SnapInfo]) -> Result<Vec<u64>, StoreError>,
    ) -> Result<u64, StoreError> {
        let _admin = self.admin.lock();
        let img = self.open_image(pool, image)?;
        self.remove_snaps_on(&img, pool, image, pick, true)
    }

    /// The removal on an open handle (see [`Self::snap_create_on`]).
    pub(crate) fn remove_snaps_on(
        &self,
        img: &Image,
        pool: &str,
        image: &str,
        pick: impl FnOnce(&[SnapInfo]) -> Result<Vec<u64>, StoreError>,
        record: bool,
    ) -> Result<u64, StoreError> {
        img.with_snapshots_locked(|st| {
            let mut pick = Some(pick);
            let mut tids = Vec::new();
            let mut picked = Vec::new();
            if record && st.journal.is_some() {
                // Decided before journaling (nothing else changes
                // snapshots: the admin lock and `state` are held), so that
                // a refusal is never journaled.
                picked = (pick.take().expect("unused"))(&st.snaps)?;
                for &id in &picked {
                    match img.journal_barrier(st, &JournalOp::SnapRemove { id }) {
                        Ok(t) => tids.extend(t),
                        Err(e) => {
                            for t in tids {
                                img.end_barrier(st, Some(t))?;
                            }
                            return Err(e);
                        }
                    }
                }
            }
            let r = (|| {
                let (gone, kept) = self.meta.snap_remove(pool, image, |all| match pick {
                    Some(p) => p(all),
                    None => Ok(picked),
                })?;
                st.snaps = kept;
                st.info.snap_count = st.snaps.len() as u64;
                if !gone.is_empty() {
                    img.gc_clones(st)?;
                }
                Ok(gone.len() as u64)
            })();
            for t in tids {
                img.end_barrier(st, Some(t))?;
            }
            r
        })
    }

    /// Makes the head equal to the snapshot (content and size). Later
    /// snapshots keep their content: objects are cloned before they change.
    pub fn snap_rollback(&self, pool: &str, image: &str, name: &str) -> Result<(), StoreError> {
        let _admin = self.admin.lock();
        let img = self.open_image(pool, image)?;
        let snap = self.snap_get(pool, image, name)?;
        self.snap_rollback_on(&img, pool, image, &snap, true)
    }

    /// The rollback on an open handle (see [`Self::snap_create_on`]).
    pub(crate) fn snap_rollback_on(
        &self,
        img: &Image,
        pool: &str,
        image: &str,
        snap: &SnapInfo,
        record: bool,
    ) -> Result<(), StoreError> {
        img.with_snapshots_locked(|st| {
            let tid = if record {
                img.journal_barrier(st, &JournalOp::SnapRollback { id: snap.id })?
            } else {
                None
            };
            let r = (|| {
                img.rollback_locked(st, snap)?;
                img.flush_locked(st)?;
                let now = now_secs();
                let (_, r) = self.meta.image_update(pool, image, |r| {
                    r.size = snap.size;
                    r.modified = now;
                })?;
                st.info.size = r.size;
                st.info.modified = r.modified;
                Ok(())
            })();
            img.end_barrier(st, tid)?;
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MirrorSnapState;

    #[test]
    fn names_and_states() {
        assert!(check_snap_name("a.b-c_1").is_ok());
        for bad in ["", "a@b", "a/b"] {
            assert!(check_snap_name(bad).is_err(), "{bad}");
        }
        assert_eq!(MirrorSnapState::PrimaryDemoted.to_string(), "demoted");
        assert_eq!(
            MirrorSnapState::NonPrimaryDemoted.to_string(),
            "non-primary demoted"
        );
        // Old or partial records still decode.
        let s: SnapInfo = serde_json::from_str(
            r#"{"id":3,"name":"m","namespace":{"Mirror":{"complete":true}},"size":5}"#,
        )
        .unwrap();
        let SnapNamespace::Mirror(m) = s.namespace else {
            panic!("mirror")
        };
        assert!(m.complete);
        assert_eq!(m.state, MirrorSnapState::Primary);
    }
}

//! Resizing: the size change, journaled as a barrier, and cutting the
//! objects past a smaller end.

use super::{Image, State, check_size, spec_of};
use crate::error::{StoreError, data_io};
use crate::extent::object_prefix_below;
use crate::header::HEADER_SIZE;
use crate::journal::JournalOp;
use crate::object;
use crate::types::ImageInfo;

impl Image {
    /// Changes the size. `commit` records the new size in the metadata and
    /// returns the new info; it runs after the data past a new, smaller end
    /// is gone and that is durable. In that order a crash leaves either the
    /// old size with its tail zeroed (what the user asked to lose) or the
    /// new size, never a size whose tail shows stale data after a later
    /// grow.
    ///
    /// On a journaled image the resize is journaled first (with `record`;
    /// a replay passes false) and is a checkpoint barrier.
    pub(crate) fn resize(
        &self,
        new_size: u64,
        allow_shrink: bool,
        record: bool,
        commit: impl FnOnce() -> Result<ImageInfo, StoreError>,
    ) -> Result<ImageInfo, StoreError> {
        let mut st = self.state.write();
        self.check(&st, "resize", 0, 0)?;
        let spec = spec_of(&st.info);
        check_size(&spec, new_size)?;
        let old = st.info.size;
        if new_size < old && !allow_shrink {
            return Err(StoreError::ShrinkNotAllowed {
                spec,
                from: old,
                to: new_size,
            });
        }
        let tid = if record {
            self.journal_barrier(&st, &JournalOp::Resize { size: new_size })?
        } else {
            None
        };
        let r = (|| {
            if new_size < old {
                self.cut_objects(&st, &spec, old, new_size)?;
            }
            commit()
        })();
        if let Ok(info) = &r {
            st.info.size = info.size;
            st.info.modified = info.modified;
        }
        self.end_barrier(&st, tid)?;
        r.map(|_| st.info.clone())
    }

    /// Deletes objects wholly past `new_size` and truncates the one that
    /// straddles it (with striping, several), then flushes that. Lists the
    /// directory, so the cost follows the data, not the size.
    ///
    /// With snapshots, files are truncated, not deleted, after copy-on-write,
    /// and the cut chunks count as mutated now: a later grow brings the
    /// range back as zeros, and a diff must report it.
    fn cut_objects(
        &self,
        st: &State,
        spec: &str,
        old_size: u64,
        new_size: u64,
    ) -> Result<(), StoreError> {
        let mk = |spec, path, source| StoreError::Resize { spec, path, source };
        let existing = object::list_objects(&self.dir)
            .map_err(|e| data_io("resizing", spec, self.dir.clone(), e, mk))?;
        for no in existing {
            let keep = object_prefix_below(&self.layout, no, new_size);
            let was = object_prefix_below(&self.layout, no, old_size);
            let path = object::object_path(&self.dir, no);
            if keep == 0 && st.snaps.is_empty() {
                self.delete_object(no)
                    .map_err(|e| data_io("resizing", spec, path, e, mk))?;
            } else if keep < self.layout.object_size {
                let Some(f) = self.object(st, spec, no, false)? else {
                    continue;
                };
                if keep < was {
                    self.before_mutation(st, spec, &f, keep, was)?;
                }
                let r = (|| {
                    if f.file.metadata()?.len() > HEADER_SIZE + keep {
                        f.file.set_len(HEADER_SIZE + keep)?;
                    }
                    Ok(())
                })();
                self.dirty.add(&f);
                r.map_err(|e| data_io("resizing", spec, path, e, mk))?;
            }
        }
        self.flush_locked(st)
    }
}

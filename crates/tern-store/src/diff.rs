//! Reading snapshots, diffs between two points (snapshots or head) from
//! metadata only, and rollback.
//!
//! A diff never reads or compares data: it takes the chunk epoch map of the
//! `to` point's version of each object (head or clone header) and asks
//! which chunks were mutated in an epoch >= the `from` snapshot's id, then
//! splits those by SEEK_DATA/SEEK_HOLE into data and zero extents.

use crate::error::StoreError;
use crate::extent::{ObjectSpan, ObjectSpans, merge_ranges, object_range_to_image, spans_in};
use crate::header::HEADER_SIZE;
use crate::image::{Image, PROBE_LIMIT, State, spec_of};
use crate::object::{self, ObjectFile};
use crate::types::SnapInfo;
use std::collections::BTreeSet;
use std::sync::Arc;

/// One extent of a diff, in image bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub length: u64,
    /// false: the extent reads as zeros at the `to` point.
    pub data: bool,
}

impl Image {
    /// Size of the chunks dirty tracking works in (object bytes): a diff
    /// reports extra bytes only within the chunks of real changes.
    pub fn diff_granularity(&self) -> u64 {
        self.chunks.size
    }

    /// Reads at a snapshot (`Some(id)`) or the head (`None`); the range is
    /// checked against that point's size.
    pub fn read_at(&self, snap: Option<u64>, off: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let Some(s) = snap else {
            return self.read(off, buf);
        };
        self.with_state("read", |st| {
            let spec = spec_of(&st.info);
            let info = st.snap(s)?;
            check_range(
                &format!("{spec}@{}", info.name),
                "read",
                off,
                buf.len() as u64,
                info.size,
            )?;
            for e in self.layout.extents(off, buf.len() as u64) {
                let dst = &mut buf[e.buf_offset as usize..][..e.len as usize];
                let (mut h, mut c) = (None, None);
                match self.view(st, &spec, e.object_no, Some(s), &mut h, &mut c)? {
                    None => dst.fill(0),
                    Some(v) => self.read_view(&spec, &v, dst, e.offset)?,
                }
            }
            Ok(())
        })
    }

    /// Data extents at a snapshot or the head, sorted and merged.
    pub fn allocated_extents_at(
        &self,
        snap: Option<u64>,
        off: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        if snap.is_none() {
            return self.allocated_extents(off, len);
        }
        Ok(self
            .diff(None, snap, off, len, false)?
            .into_iter()
            .filter(|e| e.data)
            .map(|e| (e.offset, e.length))
            .collect())
    }

    /// Extents that may differ between `from` (None: an empty image, so
    /// everything allocated at `to`) and `to` (None: head), within
    /// `[off, off+len)` of the `to` size. From metadata only (epoch maps,
    /// listings, SEEK_DATA/SEEK_HOLE). Never misses a change; reports extra
    /// only within chunk granularity (whole objects after a crash). With
    /// `whole_object`, every extent is widened to its object. Sorted, with
    /// adjacent extents of the same kind merged.
    pub fn diff(
        &self,
        from: Option<u64>,
        to: Option<u64>,
        off: u64,
        len: u64,
        whole_object: bool,
    ) -> Result<Vec<DiffExtent>, StoreError> {
        if to.is_none() {
            self.settle(off, len)?;
        }
        self.with_state("diff", |st| {
            let spec = spec_of(&st.info);
            let (to_spec, to_size) = match to {
                None => (spec.clone(), st.info.size),
                Some(t) => {
                    let s = st.snap(t)?;
                    (format!("{spec}@{}", s.name), s.size)
                }
            };
            if let Some(f) = from {
                st.snap(f)?;
                if to.is_some_and(|t| f > t) {
                    return Err(StoreError::InvalidDiff {
                        spec,
                        reason: format!(
                            "from snapshot id {f} is newer than to snapshot id {}",
                            to.unwrap_or(0)
                        ),
                    });
                }
            }
            check_range(&to_spec, "diff", off, len, to_size)?;
            if from.is_some() && from == to {
                return Ok(Vec::new());
            }
            let mut out: Vec<(u64, u64, bool)> = Vec::new();
            let mut img = Vec::new();
            for (no, lo, hi) in self.objects_in(&spec, off, len)? {
                for (x, y, data) in
                    self.diff_object(st, &spec, no, lo, hi, from, to, whole_object)?
                {
                    img.clear();
                    object_range_to_image(&self.layout, no, x, y, &mut img);
                    out.extend(img.iter().map(|&(o, n)| (o, n, data)));
                }
            }
            out.sort_unstable();
            let mut merged: Vec<DiffExtent> = Vec::with_capacity(out.len());
            for (o, n, data) in out {
                match merged.last_mut() {
                    Some(p) if p.data == data && p.offset + p.length == o => p.length += n,
                    _ => merged.push(DiffExtent {
                        offset: o,
                        length: n,
                        data,
                    }),
                }
            }
            Ok(merged)
        })
    }

    /// Objects that may hold data in image `[off, off+len)` at any point:
    /// probed one by one for small ranges, else listed (heads and clones).
    fn objects_in(&self, spec: &str, off: u64, len: u64) -> Result<Vec<ObjectSpan>, StoreError> {
        let mut v = Vec::new();
        for s in ObjectSpans::new(&self.layout, off, len) {
            v.push(s);
            if v.len() > PROBE_LIMIT {
                let heads = object::list_objects(&self.dir).map_err(|source| StoreError::Scan {
                    spec: spec.to_string(),
                    path: self.dir.clone(),
                    source,
                })?;
                let all: BTreeSet<u64> = heads
                    .into_iter()
                    .chain(self.cloned_objects(spec)?)
                    .collect();
                return Ok(spans_in(&self.layout, all, off, off + len));
            }
        }
        Ok(v)
    }

    /// The diff of one object within its bytes `[lo, hi)`: object ranges
    /// with their data flag.
    #[allow(clippy::too_many_arguments)]
    fn diff_object(
        &self,
        st: &State,
        spec: &str,
        no: u64,
        lo: u64,
        hi: u64,
        from: Option<u64>,
        to: Option<u64>,
        whole_object: bool,
    ) -> Result<Vec<(u64, u64, bool)>, StoreError> {
        // What `to` sees: born, map and data ranges, copied out so the view
        // (and any head lock) is released before `from` is looked at.
        let b = {
            let (mut h, mut c) = (None, None);
            match self.view(st, spec, no, to, &mut h, &mut c)? {
                None => None,
                Some(v) => Some((
                    v.meta.ext.born,
                    v.meta.ext.map.clone(),
                    self.data_in(spec, &v.file, lo, hi)?,
                )),
            }
        };
        let changed: Vec<(u64, u64)> = match from {
            None => b.as_ref().map(|(_, _, d)| d.clone()).unwrap_or_default(),
            Some(a) => {
                let mut ch = Vec::new();
                if let Some((born, map, _)) = &b {
                    let cs = self.chunks.size;
                    for c in self.chunks.covering(lo, hi) {
                        let v = u64::from(map[c]);
                        // Born at or after A: A saw no such object, so any
                        // write since birth is a change. Else: written in
                        // an epoch >= A (stored as epoch+1 > A).
                        let hit = if *born >= a { v != 0 } else { v > a };
                        if hit {
                            let x = (c as u64 * cs).max(lo);
                            let y = ((c as u64 + 1) * cs).min(hi);
                            ch.push((x, y - x));
                        }
                    }
                }
                if b.as_ref().is_none_or(|(born, _, _)| *born >= a) {
                    // `to` sees no object, or one born after A: whatever A
                    // saw (an older incarnation) must read as changed.
                    let (mut h, mut c) = (None, None);
                    if let Some(v) = self.view(st, spec, no, Some(a), &mut h, &mut c)? {
                        for (x, y) in self.data_in(spec, &v.file, lo, hi)? {
                            ch.push((x, y - x));
                        }
                    }
                }
                merge_ranges(ch)
                    .into_iter()
                    .map(|(x, n)| (x, x + n))
                    .collect()
            }
        };
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        if whole_object {
            return Ok(vec![(lo, hi, b.is_some())]);
        }
        if from.is_none() {
            return Ok(changed.into_iter().map(|(x, y)| (x, y, true)).collect());
        }
        let data = b.map(|(_, _, d)| d).unwrap_or_default();
        Ok(split_by_data(&changed, &data))
    }

    /// Data ranges of an object file within object bytes `[lo, hi)`.
    fn data_in(
        &self,
        spec: &str,
        f: &ObjectFile,
        lo: u64,
        hi: u64,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let r =
            object::data_ranges(&f.file, HEADER_SIZE + lo, HEADER_SIZE + hi).map_err(|source| {
                StoreError::Scan {
                    spec: spec.to_string(),
                    path: object::object_path(&self.dir, f.no),
                    source,
                }
            })?;
        Ok(r.into_iter()
            .map(|(a, b)| (a - HEADER_SIZE, b - HEADER_SIZE))
            .collect())
    }

    /// Makes the head's content equal to snapshot `snap`'s, object by
    /// object, touching only chunks mutated since the snapshot (their maps
    /// differ from the clone's). Later snapshots are preserved by the usual
    /// copy-on-write. The caller flushes and commits the size.
    pub(crate) fn rollback_locked(&self, st: &State, snap: &SnapInfo) -> Result<(), StoreError> {
        let spec = spec_of(&st.info);
        let s = snap.id;
        let heads = object::list_objects(&self.dir).map_err(|source| StoreError::Scan {
            spec: spec.clone(),
            path: self.dir.clone(),
            source,
        })?;
        let all: BTreeSet<u64> = heads
            .into_iter()
            .chain(self.cloned_objects(&spec)?)
            .collect();
        let os = self.layout.object_size;
        let cs = self.chunks.size;
        for no in all {
            let head = self.object(st, &spec, no, false)?;
            let target: Option<Arc<ObjectFile>> = match self.clone_for(&spec, no, s)? {
                None => match &head {
                    // No clone at or after S: unchanged since S, unless it
                    // was born after S.
                    Some(h) if s > h.hdr.lock().ext.born => continue,
                    Some(_) => None,
                    None => continue,
                },
                Some(id) => {
                    let cf = self.clone_file(&spec, no, id)?.ok_or_else(|| {
                        StoreError::SnapshotData {
                            spec: spec.clone(),
                            path: object::clone_path(&self.dir, no, id),
                            source: std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "clone vanished",
                            ),
                        }
                    })?;
                    let born = cf.hdr.lock().ext.born;
                    (s > born).then_some(cf)
                }
            };
            let head = match head {
                Some(h) => h,
                None if target.is_none() => continue,
                None => self
                    .object(st, &spec, no, true)?
                    .expect("created on demand"),
            };
            let (hmap, hborn) = {
                let m = head.hdr.lock();
                (m.ext.map.clone(), m.ext.born)
            };
            let touched: Vec<bool> = match &target {
                Some(cf) => {
                    let cm = cf.hdr.lock();
                    (0..self.chunks.count)
                        .map(|c| cm.ext.born != hborn || cm.ext.map[c] != hmap[c])
                        .collect()
                }
                None => {
                    let mut t: Vec<bool> = hmap.iter().map(|&v| v != 0).collect();
                    for (x, y) in self.data_in(&spec, &head, 0, os)? {
                        for c in self.chunks.covering(x, y) {
                            t[c] = true;
                        }
                    }
                    t
                }
            };
            let mut c = 0;
            while c < touched.len() {
                if !touched[c] {
                    c += 1;
                    continue;
                }
                let start = c;
                while c < touched.len() && touched[c] {
                    c += 1;
                }
                let (x, y) = (start as u64 * cs, (c as u64 * cs).min(os));
                self.before_mutation(st, &spec, &head, x, y)?;
                self.copy_range(&spec, &head, target.as_deref(), x, y)?;
            }
            self.dirty.add(&head);
        }
        Ok(())
    }

    /// Head bytes `[x, y)` := the clone's (or zeros): punch, then copy the
    /// clone's data ranges.
    fn copy_range(
        &self,
        spec: &str,
        head: &ObjectFile,
        src: Option<&ObjectFile>,
        x: u64,
        y: u64,
    ) -> Result<(), StoreError> {
        let r = (|| {
            object::punch_hole(&head.file, HEADER_SIZE + x, y - x)?;
            let Some(src) = src else {
                return Ok(());
            };
            let mut buf = Vec::new();
            for (a, b) in object::data_ranges(&src.file, HEADER_SIZE + x, HEADER_SIZE + y)? {
                buf.resize((b - a) as usize, 0);
                let n = object::read_full_at(&src.file, &mut buf, a)?;
                crate::cow::write_at(head, &buf[..n], a)?;
            }
            Ok(())
        })();
        r.map_err(|e| self.io_err("rolling back", spec, head.no, e))
    }
}

fn check_range(
    spec: &str,
    op: &'static str,
    off: u64,
    len: u64,
    size: u64,
) -> Result<(), StoreError> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange {
            op,
            spec: spec.to_string(),
            off,
            len,
            size,
        }),
    }
}

/// Splits sorted disjoint `[x, y)` ranges into pieces inside the data
/// ranges (true) and outside them (false).
fn split_by_data(changed: &[(u64, u64)], data: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    for &(x, y) in changed {
        let mut pos = x;
        for &(a, b) in data {
            if b <= pos || a >= y {
                continue;
            }
            if a > pos {
                out.push((pos, a, false));
            }
            let e = b.min(y);
            out.push((pos.max(a), e, true));
            pos = e;
            if pos >= y {
                break;
            }
        }
        if pos < y {
            out.push((pos, y, false));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split() {
        assert_eq!(
            split_by_data(&[(0, 100)], &[(10, 20), (50, 200)]),
            vec![
                (0, 10, false),
                (10, 20, true),
                (20, 50, false),
                (50, 100, true)
            ]
        );
        assert_eq!(split_by_data(&[(0, 10)], &[]), vec![(0, 10, false)]);
    }
}

//! Layout arithmetic for range operations (discard, allocation queries,
//! shrink) that must not enumerate every stripe unit of a huge range.
//!
//! Everything here rests on one fact of the Ceph striping layout: within one
//! object, image offset grows strictly with object offset. So the bytes of an
//! object that fall inside an image range form one contiguous object range,
//! found by binary search.
//!
//! Also the chunk geometry of the per-object epoch maps ([`Chunks`]).

use crate::header::{HEADER_SIZE, MAP_ENTRIES};
use tern_types::Layout;

/// Number of leading bytes of `object_no` whose image offset is below `limit`.
pub fn object_prefix_below(l: &Layout, object_no: u64, limit: u64) -> u64 {
    let (mut lo, mut hi) = (0, l.object_size);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if l.image_offset(object_no, mid) >= limit {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// The object range `[lo, hi)` of `object_no` lying inside image `[off, end)`.
pub fn object_span(l: &Layout, object_no: u64, off: u64, end: u64) -> (u64, u64) {
    (
        object_prefix_below(l, object_no, off),
        object_prefix_below(l, object_no, end),
    )
}

/// One object's share of an image range: `(object_no, lo, hi)` in object bytes.
pub type ObjectSpan = (u64, u64, u64);

/// The spans of image `[off, end)` in the given objects (those it does not
/// touch left out): for callers that already know which objects exist,
/// cheaper than walking every object a huge sparse range covers.
pub fn spans_in(
    l: &Layout,
    objects: impl IntoIterator<Item = u64>,
    off: u64,
    end: u64,
) -> Vec<ObjectSpan> {
    objects
        .into_iter()
        .filter_map(|o| {
            let (lo, hi) = object_span(l, o, off, end);
            (lo < hi).then_some((o, lo, hi))
        })
        .collect()
}

/// Lazily yields every object touched by image `[off, end)` with its span,
/// in object-number order. Costs O(objects touched + stripe_count).
pub struct ObjectSpans {
    layout: Layout,
    off: u64,
    end: u64,
    set: u64,
    pos: u64,
}

impl ObjectSpans {
    pub fn new(layout: &Layout, off: u64, len: u64) -> ObjectSpans {
        let set_bytes = layout.object_size * layout.stripe_count;
        ObjectSpans {
            layout: *layout,
            off,
            end: off + len,
            set: off / set_bytes,
            pos: 0,
        }
    }
}

impl Iterator for ObjectSpans {
    type Item = ObjectSpan;

    fn next(&mut self) -> Option<ObjectSpan> {
        let l = &self.layout;
        let set_bytes = l.object_size * l.stripe_count;
        loop {
            let set_start = self.set.checked_mul(set_bytes)?;
            if set_start >= self.end {
                return None;
            }
            if self.pos == l.stripe_count {
                self.set += 1;
                self.pos = 0;
                continue;
            }
            let o = self.set * l.stripe_count + self.pos;
            self.pos += 1;
            let a = self.off.max(set_start);
            let b = self.end.min(set_start + set_bytes);
            let (lo, hi) = object_span(l, o, a, b);
            if lo < hi {
                return Some((o, lo, hi));
            }
        }
    }
}

/// Image ranges `(offset, len)` holding the object bytes `[lo, hi)`: one per
/// stripe unit crossed, since consecutive units of an object are not
/// adjacent in the image when striped.
pub fn object_range_to_image(
    l: &Layout,
    object_no: u64,
    lo: u64,
    hi: u64,
    out: &mut Vec<(u64, u64)>,
) {
    let su = l.stripe_unit;
    let mut x = lo;
    while x < hi {
        let n = hi.min((x / su + 1) * su) - x;
        let img = l.image_offset(object_no, x);
        match out.last_mut() {
            Some((o, len)) if *o + *len == img => *len += n,
            _ => out.push((img, n)),
        }
        x += n;
    }
}

/// Sorts and merges touching or overlapping ranges.
pub fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, n) in v {
        if n == 0 {
            continue;
        }
        match out.last_mut() {
            Some((po, pn)) if *po + *pn >= o => *pn = (*pn).max(o + n - *po),
            _ => out.push((o, n)),
        }
    }
    out
}

/// The chunk geometry of an image: `max(4096, object_size / 512)` bytes,
/// so the map always fits the header page (8 KiB for 4 MiB objects).
#[derive(Debug, Clone, Copy)]
pub struct Chunks {
    pub size: u64,
    pub count: usize,
}

impl Chunks {
    pub fn new(object_size: u64) -> Chunks {
        let size = (object_size / MAP_ENTRIES as u64).max(HEADER_SIZE);
        Chunks {
            size,
            count: object_size.div_ceil(size) as usize,
        }
    }

    /// Chunk indexes covering object bytes `[lo, hi)`.
    pub fn covering(&self, lo: u64, hi: u64) -> std::ops::Range<usize> {
        if lo >= hi {
            return 0..0;
        }
        (lo / self.size) as usize..hi.div_ceil(self.size) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        #[test]
        fn spans_match_layout_extents(
            su_shift in 0u32..3, sc in 1u64..5, off in 0u64..300_000, len in 1u64..200_000
        ) {
            let l = Layout::new(16384, Some(16384 >> su_shift), Some(sc)).unwrap();
            // Per object, the union of Layout::extents pieces must equal our span.
            let mut expect: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            for e in l.extents(off, len) {
                let r = expect.entry(e.object_no).or_insert((u64::MAX, 0));
                r.0 = r.0.min(e.offset);
                r.1 = r.1.max(e.offset + e.len);
            }
            let mut total = 0;
            let got: Vec<ObjectSpan> = ObjectSpans::new(&l, off, len).collect();
            for &(o, lo, hi) in &got {
                prop_assert_eq!(expect.get(&o).copied(), Some((lo, hi)));
                total += hi - lo;
            }
            prop_assert_eq!(total, len);
            prop_assert_eq!(got.len(), expect.len());

            // Mapping spans back to the image reproduces exactly the range.
            let mut img = Vec::new();
            for &(o, lo, hi) in &got {
                object_range_to_image(&l, o, lo, hi, &mut img);
            }
            prop_assert_eq!(merge_ranges(img), vec![(off, len)]);
        }
    }

    #[test]
    fn merge() {
        assert_eq!(
            merge_ranges(vec![(10, 5), (0, 5), (5, 2), (20, 1), (12, 1)]),
            vec![(0, 7), (10, 5), (20, 1)]
        );
    }
}

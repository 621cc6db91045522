use crate::error::Error;
use serde::{Deserialize, Serialize};

/// How image bytes map onto objects: rbd's striping (`--object-size`,
/// `--stripe-unit`, `--stripe-count`). With the defaults (stripe unit =
/// object size, count 1) byte `o` lives in object `o / object_size`.
///
/// With fancy striping, consecutive stripe units go round-robin across
/// `stripe_count` objects of one object set; when those objects are full the
/// next object set begins. This is the Ceph file layout, so a stream written
/// by rbd maps to the same objects here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub object_size: u64,
    pub stripe_unit: u64,
    pub stripe_count: u64,
}

/// A piece of an image range that lies in one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectExtent {
    pub object_no: u64,
    /// Offset inside the object.
    pub offset: u64,
    pub len: u64,
    /// Offset of this piece inside the caller's buffer (image offset − start).
    pub buf_offset: u64,
}

pub const MIN_OBJECT_SIZE: u64 = 4096;
pub const MAX_OBJECT_SIZE: u64 = 1 << 30;

impl Layout {
    pub fn simple(object_size: u64) -> Layout {
        Layout {
            object_size,
            stripe_unit: object_size,
            stripe_count: 1,
        }
    }

    pub fn new(
        object_size: u64,
        stripe_unit: Option<u64>,
        stripe_count: Option<u64>,
    ) -> Result<Layout, Error> {
        if !object_size.is_power_of_two()
            || !(MIN_OBJECT_SIZE..=MAX_OBJECT_SIZE).contains(&object_size)
        {
            return Err(Error::invalid(format!(
                "object size {object_size} must be a power of two between 4 KiB and 1 GiB (--order 12..30)"
            )));
        }
        let su = stripe_unit.unwrap_or(object_size);
        let sc = stripe_count.unwrap_or(1);
        if su == 0 || su > object_size || !object_size.is_multiple_of(su) {
            return Err(Error::invalid(format!(
                "stripe unit {su} must divide the object size {object_size}"
            )));
        }
        if su < 4096 && su != object_size {
            return Err(Error::invalid(format!(
                "stripe unit {su} must be at least 4 KiB"
            )));
        }
        if sc == 0 || sc > 4096 {
            return Err(Error::invalid(format!(
                "stripe count {sc} must be between 1 and 4096"
            )));
        }
        Ok(Layout {
            object_size,
            stripe_unit: su,
            stripe_count: sc,
        })
    }

    pub fn is_striped(&self) -> bool {
        self.stripe_unit != self.object_size || self.stripe_count != 1
    }

    pub fn order(&self) -> u32 {
        self.object_size.trailing_zeros()
    }

    /// Maps one image byte offset to (object number, offset in object).
    pub fn map_offset(&self, off: u64) -> (u64, u64) {
        let su = self.stripe_unit;
        let sc = self.stripe_count;
        let stripes_per_object = self.object_size / su;
        let block = off / su;
        let stripe_no = block / sc;
        let stripe_pos = block % sc;
        let object_set = stripe_no / stripes_per_object;
        let object_no = object_set * sc + stripe_pos;
        let block_in_object = stripe_no % stripes_per_object;
        (object_no, block_in_object * su + off % su)
    }

    /// Inverse of [`map_offset`](Self::map_offset).
    pub fn image_offset(&self, object_no: u64, obj_off: u64) -> u64 {
        let su = self.stripe_unit;
        let sc = self.stripe_count;
        let stripes_per_object = self.object_size / su;
        let object_set = object_no / sc;
        let stripe_pos = object_no % sc;
        let block_in_object = obj_off / su;
        let stripe_no = object_set * stripes_per_object + block_in_object;
        let block = stripe_no * sc + stripe_pos;
        block * su + obj_off % su
    }

    /// Splits the image range `[off, off+len)` into per-object pieces, in
    /// image order. Pieces never cross a stripe unit.
    pub fn extents(&self, off: u64, len: u64) -> Vec<ObjectExtent> {
        let mut out = Vec::new();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let (object_no, obj_off) = self.map_offset(pos);
            let unit_left = self.stripe_unit - pos % self.stripe_unit;
            let n = unit_left.min(end - pos);
            match out.last_mut() {
                // Without striping consecutive units land contiguously in one object.
                Some(ObjectExtent {
                    object_no: o,
                    offset,
                    len,
                    ..
                }) if *o == object_no && *offset + *len == obj_off => *len += n,
                _ => out.push(ObjectExtent {
                    object_no,
                    offset: obj_off,
                    len: n,
                    buf_offset: pos - off,
                }),
            }
            pos += n;
        }
        out
    }

    /// Number of objects an image of `size` bytes spans.
    pub fn object_count(&self, size: u64) -> u64 {
        if size == 0 {
            return 0;
        }
        let su = self.stripe_unit;
        let sc = self.stripe_count;
        let set_bytes = self.object_size * sc;
        let full_sets = size / set_bytes;
        let rem = size % set_bytes;
        let rem_objects = if rem == 0 {
            0
        } else {
            (rem.div_ceil(su)).min(sc)
        };
        full_sets * sc + rem_objects
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_mapping() {
        let l = Layout::simple(4 << 20);
        assert_eq!(l.map_offset(0), (0, 0));
        assert_eq!(l.map_offset((4 << 20) + 5), (1, 5));
        let e = l.extents((4 << 20) - 10, 20);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            ObjectExtent {
                object_no: 0,
                offset: (4 << 20) - 10,
                len: 10,
                buf_offset: 0
            }
        );
        assert_eq!(
            e[1],
            ObjectExtent {
                object_no: 1,
                offset: 0,
                len: 10,
                buf_offset: 10
            }
        );
    }

    #[test]
    fn striped_mapping() {
        // 4 objects of 16K each, 4K units, 2 per stripe.
        let l = Layout::new(16384, Some(4096), Some(2)).unwrap();
        assert_eq!(l.map_offset(0), (0, 0));
        assert_eq!(l.map_offset(4096), (1, 0));
        assert_eq!(l.map_offset(8192), (0, 4096));
        assert_eq!(l.map_offset(32768), (2, 0));
        assert_eq!(l.object_count(32768), 2);
        assert_eq!(l.object_count(32769), 3);
        assert!(Layout::new(4096 * 3, None, None).is_err());
        assert!(Layout::new(16384, Some(3000), None).is_err());
    }

    proptest! {
        #[test]
        fn mapping_roundtrips(order in 12u32..24, su_shift in 0u32..6, sc in 1u64..9, off in 0u64..(1u64 << 34)) {
            let os = 1u64 << order;
            let su = (os >> su_shift).max(4096);
            let l = Layout::new(os, Some(su), Some(sc)).unwrap();
            let (o, oo) = l.map_offset(off);
            prop_assert!(oo < os);
            prop_assert_eq!(l.image_offset(o, oo), off);
        }

        #[test]
        fn extents_cover_range(su_shift in 0u32..3, sc in 1u64..4, off in 0u64..200_000, len in 1u64..100_000) {
            let l = Layout::new(16384, Some(16384 >> su_shift), Some(sc)).unwrap();
            let ex = l.extents(off, len);
            let mut covered = 0;
            for e in &ex {
                prop_assert_eq!(e.buf_offset, covered);
                for i in [0, e.len - 1] {
                    prop_assert_eq!(l.map_offset(off + e.buf_offset + i), (e.object_no, e.offset + i));
                }
                covered += e.len;
            }
            prop_assert_eq!(covered, len);
        }
    }
}

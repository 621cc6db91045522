//! Structured mutations of byte strings, for the fuzz targets of every
//! parser that takes untrusted bytes (NBD requests, rbd diffs, export
//! format 2, journal segments, bootstrap tokens). A generator (proptest in
//! the tests) draws [`Mutation`]s from plain numbers; [`apply`] turns a
//! valid input into the near-miss a hostile peer would send: a flipped
//! bit, a cut, a length field set to a boundary value.

/// One edit of a byte string. Positions are taken modulo the length, so
/// any drawn number is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    Truncate {
        at: usize,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    Insert {
        at: usize,
        value: u8,
    },
    Delete {
        at: usize,
    },
    /// A 4-byte field set to `value`, little- or big-endian.
    SetU32 {
        at: usize,
        value: u32,
        big: bool,
    },
    /// An 8-byte field set to `value`, little- or big-endian.
    SetU64 {
        at: usize,
        value: u64,
        big: bool,
    },
}

/// Values a length or offset field is most likely to mishandle.
const BOUNDARIES: [u64; 10] = [
    0,
    1,
    7,
    0x7f,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX,
];

impl Mutation {
    /// A mutation from three drawn numbers: the kind, a position, a value.
    pub fn from_parts(kind: u8, at: usize, value: u64) -> Mutation {
        // Half the values are boundaries, the rest as drawn.
        let v = if value & 1 == 0 {
            BOUNDARIES[(value >> 1) as usize % BOUNDARIES.len()]
        } else {
            value >> 1
        };
        match kind % 8 {
            0 | 1 => Mutation::FlipBit {
                at,
                bit: (value % 8) as u8,
            },
            2 => Mutation::Truncate { at },
            3 => Mutation::SetByte { at, value: v as u8 },
            4 => Mutation::Insert {
                at,
                value: value as u8,
            },
            5 => Mutation::Delete { at },
            6 => Mutation::SetU32 {
                at,
                value: v as u32,
                big: value & 2 != 0,
            },
            _ => Mutation::SetU64 {
                at,
                value: v,
                big: value & 2 != 0,
            },
        }
    }
}

/// Applies `muts` in order to a copy of `input`.
pub fn apply(input: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = input.to_vec();
    for m in muts {
        let len = b.len();
        let pos = |at: usize| if len == 0 { 0 } else { at % len };
        match *m {
            Mutation::FlipBit { at, bit } if len > 0 => b[pos(at)] ^= 1 << (bit % 8),
            Mutation::Truncate { at } => b.truncate(pos(at)),
            Mutation::SetByte { at, value } if len > 0 => b[pos(at)] = value,
            Mutation::Insert { at, value } => {
                b.insert(if len == 0 { 0 } else { at % (len + 1) }, value)
            }
            Mutation::Delete { at } if len > 0 => {
                b.remove(pos(at));
            }
            Mutation::SetU32 { at, value, big } if len >= 4 => {
                let p = at % (len - 3);
                let v = if big {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                b[p..p + 4].copy_from_slice(&v);
            }
            Mutation::SetU64 { at, value, big } if len >= 8 => {
                let p = at % (len - 7);
                let v = if big {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                b[p..p + 8].copy_from_slice(&v);
            }
            _ => {}
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits() {
        let b = [0u8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(apply(&b, &[Mutation::Truncate { at: 3 }]), [0, 1, 2]);
        assert_eq!(apply(&b, &[Mutation::FlipBit { at: 10, bit: 0 }])[1], 0);
        assert_eq!(apply(&[], &[Mutation::Insert { at: 5, value: 9 }]), vec![9]);
        let v = apply(
            &b,
            &[Mutation::SetU32 {
                at: 1,
                value: 0xdead_beef,
                big: true,
            }],
        );
        assert_eq!(&v[1..5], &[0xde, 0xad, 0xbe, 0xef]);
        // Nothing panics on tiny inputs.
        for k in 0..8 {
            for len in 0..10 {
                apply(&b[..len], &[Mutation::from_parts(k, 1000, 12345)]);
            }
        }
    }
}

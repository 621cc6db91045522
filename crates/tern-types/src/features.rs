use crate::error::Error;
use serde::{Deserialize, Serialize};

/// Image feature bits, numbered as rbd numbers them so `features` values in
/// JSON output mean the same thing to Ceph tooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Features(pub u64);

const NAMES: [(&str, u64); 11] = [
    ("layering", 1),
    ("striping", 2),
    ("exclusive-lock", 4),
    ("object-map", 8),
    ("fast-diff", 16),
    ("deep-flatten", 32),
    ("journaling", 64),
    ("data-pool", 128),
    ("operations", 256),
    ("migrating", 512),
    ("non-primary", 1024),
];

impl Features {
    pub const LAYERING: u64 = 1;
    pub const STRIPING: u64 = 2;
    pub const EXCLUSIVE_LOCK: u64 = 4;
    pub const OBJECT_MAP: u64 = 8;
    pub const FAST_DIFF: u64 = 16;
    pub const DEEP_FLATTEN: u64 = 32;
    pub const JOURNALING: u64 = 64;
    pub const NON_PRIMARY: u64 = 1024;

    /// rbd's default: layering, exclusive-lock, object-map, fast-diff, deep-flatten.
    pub const DEFAULT: Features = Features(1 | 4 | 8 | 16 | 32);

    /// Features a user may ask for at create time.
    const USER_SETTABLE: u64 = 1 | 2 | 4 | 8 | 16 | 32 | 64;

    pub fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }

    /// Parses rbd's `--image-feature` values: names separated by commas (the
    /// option may also be repeated by the caller), or a numeric bit mask.
    pub fn parse_list(items: &[String]) -> Result<Features, Error> {
        let mut bits = 0u64;
        for item in items {
            for name in item.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if let Ok(n) = name.parse::<u64>() {
                    bits |= n;
                    continue;
                }
                match NAMES.iter().find(|(n, _)| *n == name) {
                    Some((_, b)) => bits |= b,
                    None => {
                        return Err(Error::invalid(format!(
                            "unknown image feature '{name}': known features are {}",
                            NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
            }
        }
        if bits & !Self::USER_SETTABLE != 0 {
            return Err(Error::invalid(format!(
                "image features {} cannot be set by a user",
                Features(bits & !Self::USER_SETTABLE).names().join(", ")
            )));
        }
        Ok(Features(bits))
    }

    /// The dependency rules of rbd, with its wording.
    pub fn validate(self) -> Result<(), Error> {
        if self.has(Self::OBJECT_MAP) && !self.has(Self::EXCLUSIVE_LOCK) {
            return Err(Error::invalid(
                "object-map requires exclusive-lock: add --image-feature exclusive-lock",
            ));
        }
        if self.has(Self::FAST_DIFF) && !self.has(Self::OBJECT_MAP) {
            return Err(Error::invalid(
                "fast-diff requires object-map: add --image-feature object-map",
            ));
        }
        if self.has(Self::JOURNALING) && !self.has(Self::EXCLUSIVE_LOCK) {
            return Err(Error::invalid(
                "journaling requires exclusive-lock: add --image-feature exclusive-lock",
            ));
        }
        Ok(())
    }

    pub fn names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(_, b)| self.0 & b != 0)
            .map(|(n, _)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let f = |s: &str| Features::parse_list(&[s.to_string()]).unwrap();
        assert!(f("journaling").validate().is_err());
        assert!(f("exclusive-lock,journaling").validate().is_ok());
        assert!(f("fast-diff,exclusive-lock").validate().is_err());
        assert!(Features::parse_list(&["bogus".into()]).is_err());
        assert!(Features::parse_list(&["non-primary".into()]).is_err());
        assert_eq!(Features::DEFAULT.0, 61);
        assert_eq!(
            f("layering,exclusive-lock").names(),
            vec!["layering", "exclusive-lock"]
        );
    }
}

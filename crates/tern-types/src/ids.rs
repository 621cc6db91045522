use serde::{Deserialize, Serialize};
use std::fmt;

/// A site's identity, like Ceph's fsid: a uuid chosen at `site init`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SiteId(String);

impl SiteId {
    pub fn parse(s: &str) -> Result<SiteId, crate::error::Error> {
        let ok = s.len() == 36
            && s.chars().enumerate().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        if !ok {
            return Err(crate::error::Error::invalid(format!(
                "'{s}' is not a site id (a uuid)"
            )));
        }
        Ok(SiteId(s.to_ascii_lowercase()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pool's numeric id inside one site (like a Ceph pool id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PoolId(pub u64);

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An image's id inside its site: hex like rbd's (`10226b8b4567`). It names
/// the image's data directory, so a rename never moves data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageId(String);

impl ImageId {
    pub fn generate() -> ImageId {
        let v: u64 = rand::random::<u64>() & 0xffff_ffff_ffff;
        ImageId(format!("{v:012x}"))
    }
    pub fn parse(s: &str) -> Result<ImageId, crate::error::Error> {
        if s.is_empty() || s.len() > 32 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(crate::error::Error::invalid(format!(
                "'{s}' is not an image id"
            )));
        }
        Ok(ImageId(s.to_ascii_lowercase()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

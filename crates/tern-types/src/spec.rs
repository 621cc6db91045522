use crate::error::Error;
use std::fmt;

/// The pool used when a spec names no pool, as in rbd.
pub const DEFAULT_POOL: &str = "rbd";

/// Pool, image and snapshot names: visible characters only (a name that
/// draws as another, or as nothing, would make listings lie), minus the
/// characters that would make a spec ambiguous.
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    crate::text::validate_visible(&format!("{what} name"), name, 250)?;
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '@')) {
        return Err(Error::invalid(format!(
            "{what} name '{}' contains '{c}': names may not contain '/' or '@'",
            crate::text::escaped(name)
        )));
    }
    if name.starts_with('.') {
        return Err(Error::invalid(format!(
            "{what} name '{}' may not start with '.'",
            crate::text::escaped(name)
        )));
    }
    Ok(())
}

/// `pool/image` or `pool/image@snap`, as rbd writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    pub pool: String,
    pub image: String,
    pub snap: Option<String>,
}

impl ImageSpec {
    pub fn new(pool: &str, image: &str) -> ImageSpec {
        ImageSpec {
            pool: pool.into(),
            image: image.into(),
            snap: None,
        }
    }

    /// The same image's head (no snapshot).
    pub fn head(&self) -> ImageSpec {
        self.at(None)
    }

    /// The same image at `snap` (none: the head).
    pub fn at(&self, snap: Option<&str>) -> ImageSpec {
        ImageSpec {
            pool: self.pool.clone(),
            image: self.image.clone(),
            snap: snap.map(String::from),
        }
    }

    /// Parses `[pool/]image[@snap]`; a missing pool is `default_pool`.
    pub fn parse_with_default(s: &str, default_pool: &str) -> Result<ImageSpec, Error> {
        let (rest, snap) = match s.split_once('@') {
            Some((r, snap)) => (r, Some(snap)),
            None => (s, None),
        };
        let (pool, image) = match rest.split_once('/') {
            Some((p, i)) => (p, i),
            None => (default_pool, rest),
        };
        if image.contains('/') {
            return Err(Error::invalid(format!(
                "'{s}' is not an image spec: use pool/image or pool/image@snap (namespaces are not supported)"
            )));
        }
        validate_name("pool", pool)?;
        validate_name("image", image)?;
        if let Some(snap) = snap {
            // Reads may name mirroring's own snapshots (`.mirror.…`); creating
            // a snapshot still refuses a leading dot (validate_name).
            validate_name(
                "snapshot",
                snap.strip_prefix('.')
                    .filter(|r| !r.is_empty())
                    .unwrap_or(snap),
            )?;
        }
        Ok(ImageSpec {
            pool: pool.into(),
            image: image.into(),
            snap: snap.map(String::from),
        })
    }

    pub fn parse(s: &str) -> Result<ImageSpec, Error> {
        Self::parse_with_default(s, DEFAULT_POOL)
    }

    /// The spec without its snapshot part.
    pub fn image_only(&self) -> ImageSpec {
        ImageSpec {
            pool: self.pool.clone(),
            image: self.image.clone(),
            snap: None,
        }
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = ImageSpec::parse("p/i@s").unwrap();
        assert_eq!(
            (s.pool.as_str(), s.image.as_str(), s.snap.as_deref()),
            ("p", "i", Some("s"))
        );
        assert_eq!(ImageSpec::parse("img").unwrap().pool, "rbd");
        assert_eq!(ImageSpec::parse("p/i").unwrap().to_string(), "p/i");
        assert!(ImageSpec::parse("p/a/b").is_err());
        assert!(ImageSpec::parse("p/").is_err());
        assert!(ImageSpec::parse("p/i@").is_err());
        assert!(ImageSpec::parse("p/i@a@b").is_err());
        assert!(validate_name("pool", "a/b").is_err());
        assert!(validate_name("pool", "a@b").is_err());
        assert!(validate_name("pool", "ok-name_1").is_ok());
        assert!(validate_name("image", "k\"z").is_ok());
        assert!(validate_name("image", "a\u{202e}b").is_err());
        assert!(validate_name("image", "a\u{200d}b").is_err());
    }
}

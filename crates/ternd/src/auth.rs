//! Users and capabilities, as in cephx: an entity (`client.NAME`) has a key
//! and caps in Ceph's syntax, which we reduce to one of a few profiles.
//!
//! Keys are never stored: each key is derived from the site's master secret
//! (`master.key`, readable only by ternd) and the entity's generation, and
//! only its SHA-256 goes into the metadata database. So a leaked database
//! reveals no key, yet `auth get` can still show an admin the key, as Ceph does.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tern_types::ErrorKind;
use tern_types::error::Error;

/// What an entity may do. Ordered from most to least powerful for display only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Everything, including pools, users and config.
    Admin,
    /// Read and write images (create, resize, remove) in its pools.
    Rbd,
    /// Read images, list and inspect.
    RbdReadOnly,
    /// The local mirror daemon: like rbd, plus mirror bookkeeping.
    RbdMirror,
    /// A remote site's mirror daemon: read images, snapshots and journals,
    /// report peer status; never write image data.
    RbdMirrorPeer,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Admin => "admin",
            Profile::Rbd => "rbd",
            Profile::RbdReadOnly => "rbd-read-only",
            Profile::RbdMirror => "rbd-mirror",
            Profile::RbdMirrorPeer => "rbd-mirror-peer",
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Site-wide read: status, pool list.
    SiteRead,
    /// Pools, users, config changes.
    Admin,
    /// Read images of a pool.
    Read(&'a str),
    /// Change images of a pool.
    Write(&'a str),
    /// The local mirror daemon's work: adopt non-primary images, write syncs into them.
    MirrorDaemon(&'a str),
    /// What a peer site's daemon may do here: report status, acknowledge
    /// snapshots, register the reverse peer. Never writes image data.
    MirrorPeer(&'a str),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub entity: String,
    pub generation: u64,
    pub created: u64,
    pub key_sha256: String,
    pub caps: BTreeMap<String, String>,
    pub profile: Profile,
    /// Pools the caps name (`pool=X`); None is every pool.
    #[serde(default)]
    pub pools: Option<Vec<String>>,
}

impl UserRecord {
    pub fn allows(&self, need: Need<'_>) -> bool {
        let pool_ok = |p: &str| {
            self.pools
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|x| x == p))
        };
        match (self.profile, need) {
            (Profile::Admin, _) => true,
            (_, Need::Admin) => false,
            (_, Need::SiteRead) => true,
            (_, Need::Read(p)) => pool_ok(p),
            (Profile::Rbd | Profile::RbdMirror, Need::Write(p)) => pool_ok(p),
            (Profile::RbdReadOnly | Profile::RbdMirrorPeer, Need::Write(_)) => false,
            (Profile::RbdMirror, Need::MirrorDaemon(p) | Need::MirrorPeer(p)) => pool_ok(p),
            (Profile::RbdMirrorPeer, Need::MirrorPeer(p)) => pool_ok(p),
            (_, Need::MirrorDaemon(_) | Need::MirrorPeer(_)) => false,
        }
    }

    pub fn denial(&self, need: Need<'_>) -> Error {
        let what = match need {
            Need::SiteRead => "read site status".to_string(),
            Need::Admin => "change pools, users or config (needs mon 'allow *')".to_string(),
            Need::Read(p) => format!("read images in pool '{p}'"),
            Need::Write(p) => format!("write images in pool '{p}'"),
            Need::MirrorDaemon(p) => {
                format!("act as the mirror daemon for pool '{p}' (needs mon 'profile rbd-mirror')")
            }
            Need::MirrorPeer(p) => {
                format!("act as a mirror peer for pool '{p}' (needs mon 'profile rbd-mirror-peer')")
            }
        };
        Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} (profile {}) may not {what}: ask an admin to grant it with `tern auth caps`",
                self.entity,
                self.profile.as_str()
            ),
        )
    }
}

pub fn validate_entity(entity: &str) -> Result<(), Error> {
    let name = entity.strip_prefix("client.").ok_or_else(|| {
        Error::invalid(format!("entity '{entity}' must be of the form client.NAME"))
    })?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::invalid(format!(
            "entity '{entity}': NAME may hold letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Reduces Ceph caps (`mon 'profile rbd' osd 'profile rbd pool=x'`) to a
/// profile and a pool list. Unknown forms are refused rather than guessed.
pub fn parse_caps(
    caps: &BTreeMap<String, String>,
) -> Result<(Profile, Option<Vec<String>>), Error> {
    for svc in caps.keys() {
        if !matches!(svc.as_str(), "mon" | "osd" | "mgr" | "mds") {
            return Err(Error::invalid(format!(
                "unknown cap service '{svc}': use mon, osd or mgr"
            )));
        }
    }
    let mon = caps.get("mon").map(|s| s.trim()).unwrap_or("");
    let osd = caps.get("osd").map(|s| s.trim()).unwrap_or("");
    let mut pools: Vec<String> = Vec::new();
    let mut osd_profile: Option<Profile> = None;
    for clause in osd.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut words = clause.split_whitespace();
        let p = match (words.next(), words.next()) {
            (Some("allow"), Some("*")) => Profile::Admin,
            (Some("allow"), Some("r")) => Profile::RbdReadOnly,
            (Some("allow"), Some("rw" | "rwx")) => Profile::Rbd,
            (Some("profile"), Some("rbd")) => Profile::Rbd,
            (Some("profile"), Some("rbd-read-only")) => Profile::RbdReadOnly,
            _ => return Err(Error::invalid(format!("unsupported osd cap '{clause}'"))),
        };
        for w in words {
            match w.strip_prefix("pool=") {
                Some(pool) if !pool.is_empty() => pools.push(pool.to_string()),
                _ => return Err(Error::invalid(format!("unsupported osd cap '{clause}'"))),
            }
        }
        osd_profile = Some(match (osd_profile, p) {
            (None, p) => p,
            (Some(a), b) if a == b => a,
            _ => return Err(Error::invalid("osd caps mix profiles; use one")),
        });
    }
    let mon_profile = match mon {
        "" => None,
        "allow *" => Some(Profile::Admin),
        "allow r" | "profile rbd" => None,
        "profile rbd-mirror" => Some(Profile::RbdMirror),
        "profile rbd-mirror-peer" => Some(Profile::RbdMirrorPeer),
        other => return Err(Error::invalid(format!("unsupported mon cap '{other}'"))),
    };
    let profile = match (mon_profile, osd_profile) {
        (Some(Profile::Admin), Some(Profile::Admin)) => Profile::Admin,
        (Some(Profile::Admin), None) if osd.is_empty() && caps.len() == 1 => Profile::Admin,
        (Some(Profile::RbdMirror), Some(Profile::Rbd) | None) => Profile::RbdMirror,
        (Some(Profile::RbdMirrorPeer), _) => Profile::RbdMirrorPeer,
        (None, Some(p)) if p != Profile::Admin => p,
        _ => {
            return Err(Error::invalid(format!(
                "unsupported cap combination mon '{mon}' osd '{osd}': use one of \
                 mon 'allow *' osd 'allow *' (admin), mon 'profile rbd' osd 'profile rbd[ pool=P]', \
                 osd 'profile rbd-read-only', mon 'profile rbd-mirror' osd 'profile rbd', \
                 mon 'profile rbd-mirror-peer' osd 'profile rbd'"
            )));
        }
    };
    Ok((profile, if pools.is_empty() { None } else { Some(pools) }))
}

/// Caps for the admin entity that a new site creates.
pub fn admin_caps() -> BTreeMap<String, String> {
    ["mon", "osd", "mgr"]
        .iter()
        .map(|s| (s.to_string(), "allow *".to_string()))
        .collect()
}

/// Derives an entity's key in Ceph's format: base64 of a little-endian
/// header (type 1 = AES, created secs and nsecs, length 16) and 16 secret
/// bytes. Deterministic in (master, entity, generation, created).
pub fn derive_key(master: &[u8], entity: &str, generation: u64, created: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(master).expect("hmac takes any key length");
    mac.update(b"tern-key-v1\0");
    mac.update(entity.as_bytes());
    mac.update(&generation.to_le_bytes());
    let secret = mac.finalize().into_bytes();
    let mut raw = Vec::with_capacity(28);
    raw.extend_from_slice(&1u16.to_le_bytes());
    raw.extend_from_slice(&(created as u32).to_le_bytes());
    raw.extend_from_slice(&0u32.to_le_bytes());
    raw.extend_from_slice(&16u16.to_le_bytes());
    raw.extend_from_slice(&secret[..16]);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Constant-time comparison of two hex digests.
pub fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn profiles_from_ceph_caps() {
        assert_eq!(parse_caps(&admin_caps()).unwrap().0, Profile::Admin);
        let (p, pools) = parse_caps(&caps(&[
            ("mon", "profile rbd"),
            ("osd", "profile rbd pool=images"),
        ]))
        .unwrap();
        assert_eq!(p, Profile::Rbd);
        assert_eq!(pools, Some(vec!["images".to_string()]));
        assert_eq!(
            parse_caps(&caps(&[("osd", "profile rbd-read-only")]))
                .unwrap()
                .0,
            Profile::RbdReadOnly
        );
        assert_eq!(
            parse_caps(&caps(&[
                ("mon", "profile rbd-mirror"),
                ("osd", "profile rbd")
            ]))
            .unwrap()
            .0,
            Profile::RbdMirror
        );
        assert_eq!(
            parse_caps(&caps(&[
                ("mon", "profile rbd-mirror-peer"),
                ("osd", "profile rbd")
            ]))
            .unwrap()
            .0,
            Profile::RbdMirrorPeer
        );
        assert!(parse_caps(&caps(&[("osd", "allow *")])).is_err());
        assert!(parse_caps(&caps(&[("mon", "profile bogus")])).is_err());
        assert!(parse_caps(&caps(&[("foo", "allow *")])).is_err());
    }

    #[test]
    fn permissions() {
        let mut u = UserRecord {
            entity: "client.x".into(),
            generation: 1,
            created: 0,
            key_sha256: String::new(),
            caps: BTreeMap::new(),
            profile: Profile::RbdReadOnly,
            pools: None,
        };
        assert!(u.allows(Need::Read("a")));
        assert!(!u.allows(Need::Write("a")));
        u.profile = Profile::Rbd;
        u.pools = Some(vec!["a".into()]);
        assert!(u.allows(Need::Write("a")));
        assert!(!u.allows(Need::Write("b")));
        assert!(!u.allows(Need::Admin));
        u.profile = Profile::RbdMirrorPeer;
        assert!(!u.allows(Need::Write("a")));
    }

    #[test]
    fn keys_look_like_ceph_keys() {
        let k = derive_key(b"master", "client.admin", 1, 1_700_000_000);
        assert!(k.starts_with("AQ"), "{k}");
        assert_eq!(k.len(), 40);
        assert_ne!(k, derive_key(b"master", "client.admin", 2, 1_700_000_000));
        assert!(same_hash(&key_hash(&k), &key_hash(&k)));
    }
}

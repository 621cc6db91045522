//! Users and capabilities, as in cephx: an entity (`client.NAME`) has a key
//! and caps in Ceph's syntax, which we reduce to one of a few profiles.
//!
//! Keys are never stored: each key is derived from the site's master secret
//! (`master.key`, readable only by ternd), the entity and a random nonce
//! drawn at each creation, and only its SHA-256 goes into the metadata
//! database. So a leaked database reveals no key, `auth get` can still show
//! an admin the key, as Ceph does, and a removed and re-created entity never
//! gets its old key back.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tern_types::ErrorKind;
use tern_types::error::Error;

pub use tern_types::site::Profile;

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
    /// 16 random bytes (hex) drawn when the entity is created, so every
    /// creation derives a different key. Empty in records written before
    /// nonces existed: their keys stay as they were.
    #[serde(default)]
    pub nonce: String,
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
        let (what, caps) = match need {
            Need::SiteRead => (
                "read site status".to_string(),
                "mon 'profile rbd' osd 'profile rbd-read-only'".to_string(),
            ),
            Need::Admin => (
                "change pools, users or config".to_string(),
                "mon 'allow *' osd 'allow *'".to_string(),
            ),
            Need::Read(p) => (
                format!("read images in pool '{p}'"),
                format!("mon 'profile rbd' osd 'profile rbd-read-only pool={p}'"),
            ),
            Need::Write(p) => (
                format!("write images in pool '{p}'"),
                format!("mon 'profile rbd' osd 'profile rbd pool={p}'"),
            ),
            Need::MirrorDaemon(p) => (
                format!("act as the mirror daemon for pool '{p}'"),
                "mon 'profile rbd-mirror' osd 'profile rbd'".to_string(),
            ),
            Need::MirrorPeer(p) => (
                format!("act as a mirror peer for pool '{p}'"),
                "mon 'profile rbd-mirror-peer' osd 'profile rbd'".to_string(),
            ),
        };
        Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} (profile {}) may not {what}: ask an admin to grant it, e.g. `tern auth caps {} {caps}` (the key stays the same)",
                self.entity,
                self.profile.as_str(),
                self.entity,
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

/// A fresh creation nonce: 128 random bits never repeat in practice, so
/// no counter has to survive `auth rm` or a restart.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Derives an entity's key in Ceph's format: base64 of a little-endian
/// header (type 1 = AES, created secs and nsecs, length 16) and 16 secret
/// bytes. Deterministic in (master, entity, generation, nonce, created).
pub fn derive_key(
    master: &[u8],
    entity: &str,
    generation: u64,
    nonce: &str,
    created: u64,
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(master).expect("hmac takes any key length");
    if nonce.is_empty() {
        mac.update(b"tern-key-v1\0");
    } else {
        mac.update(b"tern-key-v2\0");
    }
    mac.update(entity.as_bytes());
    mac.update(&generation.to_le_bytes());
    if !nonce.is_empty() {
        mac.update(b"\0");
        mac.update(nonce.as_bytes());
    }
    let secret = mac.finalize().into_bytes();
    let mut raw = Vec::with_capacity(28);
    raw.extend_from_slice(&1u16.to_le_bytes());
    raw.extend_from_slice(&(created as u32).to_le_bytes());
    raw.extend_from_slice(&0u32.to_le_bytes());
    raw.extend_from_slice(&16u16.to_le_bytes());
    raw.extend_from_slice(&secret[..16]);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Failed logins are counted per source address. The first
/// [`FREE_FAILURES`] within [`FORGET_AFTER`] cost nothing (a mistyped
/// keyring); each one after that locks the address out for twice as long
/// as the last, from [`FIRST_LOCKOUT`] up to [`MAX_LOCKOUT`]. During a
/// lockout every attempt from the address is refused without looking at
/// the key, so a guesser learns nothing, however many connections it opens.
/// A success is never delayed outside a lockout and does not reset the
/// count: a guesser holding some valid low-privilege key cannot use it to
/// wipe the record of its guesses.
pub struct LoginLimiter {
    by_addr: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, Strikes>>,
}

pub const FREE_FAILURES: u32 = 5;
pub const FIRST_LOCKOUT: std::time::Duration = std::time::Duration::from_millis(500);
pub const MAX_LOCKOUT: std::time::Duration = std::time::Duration::from_secs(60);
pub const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(600);
/// Addresses tracked at most; beyond it, records past their lockout go first.
const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy)]
struct Strikes {
    failures: u32,
    last: std::time::Instant,
    locked_until: std::time::Instant,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter {
            by_addr: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl LoginLimiter {
    /// Err(wait) while `addr` is locked out.
    pub fn admit(
        &self,
        addr: std::net::IpAddr,
        now: std::time::Instant,
    ) -> Result<(), std::time::Duration> {
        match self.by_addr.lock().get(&addr) {
            Some(s) if s.locked_until > now => Err(s.locked_until - now),
            _ => Ok(()),
        }
    }

    /// Records a failed login from `addr`; returns the lockout it starts, if any.
    pub fn failed(
        &self,
        addr: std::net::IpAddr,
        now: std::time::Instant,
    ) -> Option<std::time::Duration> {
        let mut m = self.by_addr.lock();
        if m.len() >= MAX_TRACKED && !m.contains_key(&addr) {
            m.retain(|_, s| s.locked_until > now && now.duration_since(s.last) < FORGET_AFTER);
        }
        let s = m.entry(addr).or_insert(Strikes {
            failures: 0,
            last: now,
            locked_until: now,
        });
        if now.duration_since(s.last) >= FORGET_AFTER {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        s.last = now;
        let over = s.failures.checked_sub(FREE_FAILURES).filter(|n| *n > 0)?;
        let lock = FIRST_LOCKOUT
            .saturating_mul(1u32 << (over - 1).min(16))
            .min(MAX_LOCKOUT);
        s.locked_until = now + lock;
        Some(lock)
    }
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
            nonce: String::new(),
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
    fn failed_logins_lock_out_with_doubling_delays() {
        let l = LoginLimiter::default();
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(l.failed(a, t0), None);
            assert!(l.admit(a, t0).is_ok());
        }
        assert_eq!(l.failed(a, t0), Some(FIRST_LOCKOUT));
        assert!(l.admit(a, t0).is_err());
        assert!(l.admit(b, t0).is_ok(), "another address is not affected");
        let t1 = t0 + FIRST_LOCKOUT;
        assert!(l.admit(a, t1).is_ok());
        assert_eq!(l.failed(a, t1), Some(FIRST_LOCKOUT * 2));
        for _ in 0..30 {
            l.failed(a, t1);
        }
        assert_eq!(l.failed(a, t1), Some(MAX_LOCKOUT));
        // Forgotten after a quiet spell.
        let t2 = t1 + MAX_LOCKOUT + FORGET_AFTER;
        assert!(l.admit(a, t2).is_ok());
        assert_eq!(l.failed(a, t2), None);
    }

    #[test]
    fn keys_look_like_ceph_keys() {
        let k = derive_key(b"master", "client.admin", 1, "", 1_700_000_000);
        assert!(k.starts_with("AQ"), "{k}");
        assert_eq!(k.len(), 40);
        assert_ne!(
            k,
            derive_key(b"master", "client.admin", 2, "", 1_700_000_000)
        );
        let (n1, n2) = (new_nonce(), new_nonce());
        assert_ne!(n1, n2);
        assert_ne!(
            derive_key(b"master", "client.x", 1, &n1, 1_700_000_000),
            derive_key(b"master", "client.x", 1, &n2, 1_700_000_000)
        );
        assert!(same_hash(&key_hash(&k), &key_hash(&k)));
    }
}

//! Central configuration, as `ceph config set WHO KEY VALUE`: values live in
//! the site database, keyed by who (`global`, `client`, `client.NAME`) and
//! option. Only known options are accepted, checked against their type, so
//! a typo fails at `config set`, not silently at run time.

use tern_types::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    Size,
    Str,
}

pub struct Opt {
    pub name: &'static str,
    pub kind: Kind,
    pub default: DefaultValue,
    pub help: &'static str,
}

/// An option's default. Numbers that other crates also need are their
/// constants, so each is written down once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    Text(&'static str),
    Int(u64),
    Float(f64),
}

impl std::fmt::Display for DefaultValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DefaultValue::Text(s) => f.write_str(s),
            DefaultValue::Int(n) => write!(f, "{n}"),
            DefaultValue::Float(x) => write!(f, "{x}"),
        }
    }
}

/// `rbd_lock_lease_seconds`: how long an exclusive lock lives without
/// renewal, and the range a site accepts.
pub const LOCK_LEASE_SECS: f64 = 15.0;
pub const LOCK_LEASE_MIN_SECS: f64 = 1.0;
pub const LOCK_LEASE_MAX_SECS: f64 = 3600.0;

macro_rules! opts {
    ($($name:literal $kind:ident $default:expr, $help:literal;)*) => {
        pub const OPTIONS: &[Opt] = &[$(Opt { name: $name, kind: Kind::$kind, default: $default, help: $help }),*];
    };
}

use DefaultValue::{Float, Int, Text};
use tern_store::journal as j;
use tern_types::defaults as d;

opts! {
    "rbd_default_features" Str Text("layering,exclusive-lock,object-map,fast-diff,deep-flatten"), "features of new images when none are given";
    "rbd_default_order" Int Int(22), "object size of new images as a power of two";
    "rbd_default_stripe_unit" Size Int(0), "stripe unit of new images (0: object size)";
    "rbd_default_stripe_count" Int Int(0), "stripe count of new images (0: 1)";
    "rbd_journal_object_size" Size Int(j::DEFAULT_SEGMENT_SIZE), "size of one journal segment";
    "rbd_journal_splay_width" Int Int(4), "accepted for compatibility; tern writes one ordered journal";
    "rbd_journal_max_size" Size Int(j::DEFAULT_MAX_SIZE), "journal size past which a lagging reader is disconnected";
    "rbd_journal_commit_age" Float Float(j::DEFAULT_COMMIT_AGE_US as f64 / 1e6), "seconds after which a flush-mode journal syncs entries no flush has made durable";
    "rbd_journal_durability" Str Text("strict"), "strict: a write is acknowledged once its journal entry is on stable storage; flush: at the next flush or FUA, like a disk cache";
    "rbd_mirror_concurrent_image_syncs" Int Int(d::MIRROR_CONCURRENT_IMAGE_SYNCS), "images the mirror daemon fully syncs at once";
    "rbd_mirror_journal_commit_age" Float Float(5.0), "seconds between replay-position commits to the primary";
    "rbd_mirror_sync_point_update_age" Float Float(30.0), "seconds between sync-point updates during an initial sync";
    "rbd_mirror_pool_replayers_refresh_interval" Int Int(30), "seconds between peer/pool rescans";
    "rbd_mirror_image_state_check_interval" Int Int(30), "seconds between image state checks";
    "rbd_mirror_heartbeat_interval" Float Float(1.0), "seconds between mirror daemon heartbeats";
    "rbd_mirror_memory_target" Size Int(d::MIRROR_MEMORY_TARGET), "bytes of unapplied replay data a daemon may hold";
    "rbd_mirror_bandwidth_limit" Size Int(0), "bytes per second of replication traffic per daemon (0: none)";
    "rbd_mirror_peer_bandwidth_limit" Size Int(0), "bytes per second of replication traffic per peer (0: none)";
    "rbd_mirror_compression" Str Text("none"), "compression of replication traffic: none or zstd";
    "rbd_mirroring_max_mirroring_snapshots" Int Int(5), "mirror snapshots kept per image";
    "rbd_lock_lease_seconds" Float Float(LOCK_LEASE_SECS), "seconds an exclusive lock lives without renewal";
    "nbd_listen" Str Text("127.0.0.1:10809"), "address the NBD server listens on";
    "log_level" Str Text("info"), "ternd log level";
}

/// Allowed ranges of numeric options (inclusive). A value outside is
/// refused at `config set`, never clamped later: what `config get` shows is
/// what runs.
pub const RANGES: &[(&str, f64, f64)] = &[
    ("rbd_default_order", 12.0, 30.0),
    ("rbd_default_stripe_unit", 0.0, (1u64 << 30) as f64),
    ("rbd_default_stripe_count", 0.0, 4096.0),
    (
        "rbd_journal_object_size",
        j::MIN_SEGMENT_SIZE as f64,
        (1u64 << 30) as f64,
    ),
    ("rbd_journal_splay_width", 1.0, 256.0),
    (
        "rbd_journal_max_size",
        j::MIN_MAX_SIZE as f64,
        (1u64 << 50) as f64,
    ),
    ("rbd_journal_commit_age", 0.0, 60.0),
    ("rbd_mirror_concurrent_image_syncs", 1.0, 1024.0),
    ("rbd_mirror_journal_commit_age", 0.001, 3600.0),
    ("rbd_mirror_sync_point_update_age", 0.001, 86400.0),
    ("rbd_mirror_pool_replayers_refresh_interval", 1.0, 86400.0),
    ("rbd_mirror_image_state_check_interval", 1.0, 86400.0),
    ("rbd_mirror_heartbeat_interval", 0.01, 60.0),
    (
        "rbd_mirror_memory_target",
        (1u64 << 20) as f64,
        (1u64 << 40) as f64,
    ),
    ("rbd_mirror_bandwidth_limit", 0.0, (1u64 << 40) as f64),
    ("rbd_mirror_peer_bandwidth_limit", 0.0, (1u64 << 40) as f64),
    ("rbd_mirroring_max_mirroring_snapshots", 3.0, 1000.0),
    (
        "rbd_lock_lease_seconds",
        LOCK_LEASE_MIN_SECS,
        LOCK_LEASE_MAX_SECS,
    ),
];

pub fn range_of(name: &str) -> Option<(f64, f64)> {
    RANGES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, lo, hi)| (*lo, *hi))
}

pub fn find(name: &str) -> Result<&'static Opt, Error> {
    OPTIONS.iter().find(|o| o.name == name).ok_or_else(|| {
        let close: Vec<&str> = OPTIONS
            .iter()
            .filter(|o| {
                let tail = name.rsplit('_').next().unwrap_or(name);
                o.name.contains(tail)
            })
            .map(|o| o.name)
            .take(3)
            .collect();
        let hint = if close.is_empty() {
            String::new()
        } else {
            format!(" (did you mean {}?)", close.join(", "))
        };
        Error::invalid(format!(
            "unknown option '{name}'{hint}: `tern config help` lists the options"
        ))
    })
}

pub fn validate_who(who: &str) -> Result<(), Error> {
    let ok = matches!(who, "global" | "client" | "mon" | "osd" | "mgr")
        || who.strip_prefix("client.").is_some_and(|n| !n.is_empty())
        || who
            .strip_prefix("image.")
            .is_some_and(|i| tern_types::ImageId::parse(i).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "'{who}' is not a config section: use global, client or client.NAME"
        )))
    }
}

/// Checks and normalises a value for its option's type.
pub fn check_value(opt: &Opt, value: &str) -> Result<String, Error> {
    if opt.name == "rbd_journal_durability" && !matches!(value, "strict" | "flush") {
        return Err(Error::invalid(format!(
            "rbd_journal_durability: '{value}' is not strict or flush"
        )));
    }
    let bad = |want: &str| {
        Error::invalid(format!(
            "{}: '{}' is not {want}",
            opt.name,
            tern_types::escaped(value)
        ))
    };
    let v = match opt.kind {
        Kind::Int => value
            .trim()
            .parse::<i64>()
            .map_err(|_| bad("an integer"))?
            .to_string(),
        Kind::Float => {
            let f: f64 = value.trim().parse().map_err(|_| bad("a number"))?;
            if !f.is_finite() || f < 0.0 {
                return Err(bad("a non-negative number"));
            }
            value.trim().to_string()
        }
        Kind::Bool => match value.trim() {
            "true" | "1" | "yes" | "on" => "true".into(),
            "false" | "0" | "no" | "off" => "false".into(),
            _ => return Err(bad("true or false")),
        },
        Kind::Size => tern_types::size::parse_size_default_unit(value, 1)
            .map_err(|_| bad("a size (e.g. 20M)"))?
            .to_string(),
        Kind::Str => value.to_string(),
    };
    if let Some((lo, hi)) = range_of(opt.name) {
        let x: f64 = v.parse().unwrap_or(f64::NAN);
        if !(lo..=hi).contains(&x) {
            let show = |b: f64| {
                if opt.kind == Kind::Size && b >= 1024.0 {
                    tern_types::format_size(b as u64)
                } else {
                    b.to_string()
                }
            };
            return Err(Error::invalid(format!(
                "{}: {} is out of range: allowed {} to {}",
                opt.name,
                tern_types::escaped(value.trim()),
                show(lo),
                show(hi)
            )));
        }
    }
    Ok(v)
}

/// Sections consulted for `who`, most specific first.
pub fn lookup_chain(who: &str) -> Vec<String> {
    let mut v = vec![who.to_string()];
    if who.starts_with("client.") {
        v.push("client".into());
    }
    if who != "global" {
        v.push("global".into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = find("rbd_mirror_concurrent_image_syncs").unwrap();
        assert_eq!(check_value(o, "20").unwrap(), "20");
        assert!(check_value(o, "x").is_err());
        assert!(find("rbd_mirror_bogus").is_err());
        assert_eq!(
            check_value(find("rbd_mirror_bandwidth_limit").unwrap(), "20M").unwrap(),
            "20971520"
        );
        let e = check_value(find("rbd_default_order").unwrap(), "40").unwrap_err();
        assert!(e.message.contains("allowed 12 to 30"), "{e:?}");
        assert!(check_value(find("rbd_journal_object_size").unwrap(), "1K").is_err());
        assert!(check_value(find("rbd_mirroring_max_mirroring_snapshots").unwrap(), "2").is_err());
        assert!(check_value(find("rbd_lock_lease_seconds").unwrap(), "0").is_err());
        for (name, _, _) in RANGES {
            let o = find(name).unwrap();
            assert!(
                check_value(o, &o.default.to_string()).is_ok(),
                "{name} default out of range"
            );
        }
        assert!(validate_who("client.rbd-mirror").is_ok());
        assert!(validate_who("nobody").is_err());
        assert_eq!(
            lookup_chain("client.x"),
            vec!["client.x", "client", "global"]
        );
    }
}

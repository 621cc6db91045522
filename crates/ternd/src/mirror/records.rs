//! What a site keeps about mirroring, one JSON record per key of the
//! store's `Mirror` table (see the module above), and the checks on the
//! names and values in them.

use super::*;

pub const PEER_CLIENT: &str = "client.rbd-mirror-peer";

/// A peer of a pool, as the site keeps it.
pub type PeerRec = tern_types::api::MirrorPeer;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PoolMirror {
    pub mode: PoolMirrorMode,
    pub site_name: String,
    pub mirror_uuid: String,
    #[serde(default)]
    pub peers: Vec<PeerRec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ImageMirror {
    pub global_id: String,
    pub mode: ImageMirrorMode,
    pub state: ImageMirrorState,
    pub primary: bool,
    pub epoch: u64,
    #[serde(default)]
    pub demoted: bool,
    /// For non-primary images: the mirror uuid of the site it copies.
    #[serde(default)]
    pub primary_mirror_uuid: String,
    #[serde(default)]
    pub resync_requested: bool,
    /// The requested resync copies everything (`resync --full`).
    #[serde(default)]
    pub resync_full: bool,
    /// A sync from the primary in progress: the image head is being
    /// overwritten and is consistent only at its last complete snapshot.
    #[serde(default)]
    pub sync: Option<SyncState>,
    /// Journal mode, non-primary: how far the primary's journal is
    /// replayed here (every entry up to `tid` of the journal of the site
    /// with mirror uuid `primary_mirror_uuid` is applied).
    #[serde(default)]
    pub journal_pos: Option<JournalPos>,
    /// How this image last became primary (see [`Fork`]).
    #[serde(default)]
    pub fork: Option<Fork>,
    /// What the last completed resync did ("delta …" / "full …").
    #[serde(default)]
    pub last_resync: String,
    /// Non-primary: the promotion epoch of the primary whose data (and
    /// demotion) this copy holds. A plain promotion here builds on it: the
    /// new epoch is one past it, and no site may have passed it.
    #[serde(default)]
    pub primary_epoch: u64,
    /// A promotion under way (see [`Promotion`]).
    #[serde(default)]
    pub promoting: Option<Promotion>,
}

/// A promotion, recorded before its primary snapshot is taken: the
/// snapshot is the promotion's commit point, so a crash between the two is
/// settled at the next start — finished if the snapshot exists, forgotten
/// if not — and never leaves a primary without its snapshot or fork.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Promotion {
    pub epoch: u64,
    /// The image's newest snapshot id before the promotion snapshot.
    pub after_snap: u64,
    /// The fork to record (its `snap_id` is the promotion snapshot's).
    pub fork: Option<Fork>,
}

/// What this site learnt from its peers, just before a promotion, of their
/// copies of the image.
#[derive(Debug, Clone, Default)]
pub struct PeerView {
    /// The highest promotion epoch any peer's copy carries.
    pub max_epoch: u64,
    /// (site name, epoch) of the copy that carries it.
    pub max_epoch_site: String,
    /// Peers whose copy is primary right now.
    pub primary_at: Vec<String>,
    /// Peers that could not be asked (name and why).
    pub unreachable: Vec<(String, String)>,
}

/// Refuses a mirror daemon's step on a copy that was promoted after the
/// step's work began: the daemon read the image at epoch `expect`, and a
/// promotion since moved it on, so the step belongs to a role this image
/// no longer has.
pub(super) fn check_fence(
    pool: &str,
    name: &str,
    m: &ImageMirror,
    expect: Option<u64>,
) -> Result<(), Error> {
    if let Some(e) = expect
        && e != m.epoch
    {
        return Err(Error::new(
            ErrorKind::Fenced,
            format!(
                "'{pool}/{name}' changed role (epoch {e} → {}) after this mirroring step began: the step is refused",
                m.epoch
            ),
        ));
    }
    Ok(())
}

/// Recorded at promotion: the point where this image's history left the
/// site it copied. A demoted former primary resyncs from here by delta:
/// its own writes after `journal_tid` (journal mode) are what diverged.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Fork {
    pub from_mirror_uuid: String,
    /// Journal mode: the last entry of `from`'s journal applied here.
    pub journal_tid: u64,
    /// The primary snapshot taken at promotion.
    pub snap_id: u64,
    pub forced: bool,
    /// The primary's time (unix µs) of the newest write held here then.
    pub data_as_of_us: u64,
    pub at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct JournalPos {
    pub primary_mirror_uuid: String,
    pub tid: u64,
    /// Entries up to this snapshot's own entry are in a copy: skip them.
    #[serde(default)]
    pub skip_to: String,
    /// The primary's time (unix µs) of entry `tid`.
    #[serde(default)]
    pub timestamp_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SyncState {
    pub primary_mirror_uuid: String,
    pub primary_snap_id: u64,
    pub demoted: bool,
    pub size: u64,
    pub last_copied_object_number: u64,
    pub started: u64,
    /// Set once the copy is whole, before its snapshot is taken: the
    /// resync summary to record. A crash after the snapshot is settled at
    /// start by finishing the sync with it (see `Mirror::settle_interrupted`).
    #[serde(default)]
    pub finishing: Option<String>,
}

/// What a site's mirror daemon last reported of an image.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SiteStatus {
    #[serde(flatten)]
    pub report: tern_types::api::MirrorSiteStatus,
    /// Set by the site when it stored the report (its own clock).
    #[serde(default)]
    pub received: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Daemon {
    pub service_id: String,
    pub instance_id: String,
    pub client_id: String,
    pub hostname: String,
    pub version: String,
    pub site_name: String,
    pub last_heartbeat: u64,
    #[serde(default)]
    pub received_ms: u64,
}

/// How long a silent daemon stays listed (as down) before its record goes.
pub const DAEMON_FORGET_MS: u64 = 600_000;

/// The keys of daemon records silent for longer than [`DAEMON_FORGET_MS`]
/// (or unreadable).
pub(super) fn forgotten_daemons(records: &[(String, String)], now: u64) -> Vec<String> {
    records
        .iter()
        .filter(|(_, v)| {
            serde_json::from_str::<Daemon>(v).map_or(true, |d| {
                now.saturating_sub(d.received_ms) > DAEMON_FORGET_MS
            })
        })
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod daemon_tests {
    use super::*;

    #[test]
    fn silent_daemons_are_forgotten_after_ten_minutes() {
        let rec = |id: &str, received_ms: u64| {
            let d = Daemon {
                service_id: id.into(),
                instance_id: id.into(),
                client_id: "mirror".into(),
                hostname: "h".into(),
                version: "v".into(),
                site_name: "site-a".into(),
                last_heartbeat: received_ms / 1000,
                received_ms,
            };
            (
                format!("daemon/site-a/{id}"),
                serde_json::to_string(&d).unwrap(),
            )
        };
        let now = 10_000_000;
        let records = vec![
            rec("live", now - 1_000),
            rec("down-9min", now - 540_000),
            rec("gone-11min", now - 660_000),
            ("daemon/site-a/damaged".to_string(), "{".to_string()),
        ];
        assert_eq!(
            forgotten_daemons(&records, now),
            ["daemon/site-a/gone-11min", "daemon/site-a/damaged"]
        );
    }
}

pub use tern_types::time::now_ms;

pub(super) fn get<T: for<'a> Deserialize<'a>>(
    store: &Store,
    key: &str,
) -> Result<Option<T>, Error> {
    match store.kv_get(KvTable::Mirror, key)? {
        Some(v) => serde_json::from_str(&v).map(Some).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("mirror record {key} is damaged: {e}"),
            )
        }),
        None => Ok(None),
    }
}

pub(super) fn put<T: Serialize>(store: &Store, key: &str, v: &T) -> Result<(), Error> {
    store
        .kv_put(
            KvTable::Mirror,
            key,
            &serde_json::to_string(v).expect("serialisable"),
        )
        .map_err(Error::from)
}

/// A peer that the snapshot cap overtook (see `Mirror::prune`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Behind {
    /// The newest snapshot it had acknowledged then (0: none).
    pub acked: u64,
    /// Snapshots newer than that, pruned before it synced them.
    pub pruned_unsynced: u64,
    /// Its base went too: its next sync is a full copy.
    pub base_lost: bool,
    pub cap: u64,
}

/// Longest site name accepted, in bytes.
pub const MAX_SITE_NAME: usize = 64;

/// A site name is shown in listings, status and metrics and keys status
/// records: visible characters only, bounded, and no '/'.
pub fn valid_site_name(name: &str) -> Result<(), Error> {
    tern_types::validate_visible("site name", name, MAX_SITE_NAME)?;
    if name.contains('/') {
        return Err(Error::invalid(format!(
            "site name '{}' may not contain '/'",
            tern_types::escaped(name)
        )));
    }
    Ok(())
}

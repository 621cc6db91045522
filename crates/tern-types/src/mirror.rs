//! The words of mirroring: modes, roles, directions and states, as rbd
//! names them. Sites keep them in JSON records, the API carries them as
//! enums, the CLI prints the words.

use serde::{Deserialize, Serialize};

named_enum! {
    /// Mirroring of a pool: off, per image, or every image.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    "mirror mode"
    pub enum PoolMirrorMode {
        // A record written before the pool was ever enabled has no mode.
        #[default]
        #[serde(alias = "")]
        Disabled = "disabled",
        Image = "image",
        Pool = "pool",
    }
}

impl PoolMirrorMode {
    /// What `mirror pool enable` accepts: image or pool.
    pub fn enabling(word: &str) -> Result<PoolMirrorMode, crate::error::Error> {
        match PoolMirrorMode::parse(word) {
            Some(m) if m != PoolMirrorMode::Disabled => Ok(m),
            _ => Err(crate::error::Error::invalid(format!(
                "mirror mode '{}' must be 'image' or 'pool'",
                crate::text::escaped(word)
            ))),
        }
    }
}

named_enum! {
    /// How an image's copies follow it.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    "mirror image mode"
    pub enum ImageMirrorMode {
        #[default]
        Snapshot = "snapshot",
        Journal = "journal",
    }
}

impl ImageMirrorMode {
    /// The mode a pool-mode pool mirrors an image in: journal mode for
    /// journaled images (as rbd), snapshot mode for the rest.
    pub fn for_features(f: crate::Features) -> Self {
        if f.has(crate::Features::JOURNALING) {
            ImageMirrorMode::Journal
        } else {
            ImageMirrorMode::Snapshot
        }
    }
}

named_enum! {
    /// Whether an image is mirrored (rbd's mirror image state).
    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    "mirror image state"
    pub enum ImageMirrorState {
        #[default]
        Enabled = "enabled",
        Disabling = "disabling",
        Disabled = "disabled",
    }
}

named_enum! {
    /// Which way images move between this site and a peer.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    "direction"
    pub enum PeerDirection {
        RxOnly = "rx-only",
        #[default]
        RxTx = "rx-tx",
        TxOnly = "tx-only",
    }
}

named_enum! {
    /// A mirror snapshot's role, as rbd shows it. Stored snapshot records
    /// keep serde's own variant names.
    #[derive(Default, Serialize, Deserialize)]
    "mirror snapshot state"
    pub enum MirrorSnapState {
        #[default]
        Primary = "primary",
        PrimaryDemoted = "demoted",
        NonPrimary = "non-primary",
        NonPrimaryDemoted = "non-primary demoted",
    }
}

impl MirrorSnapState {
    /// Taken on the primary (at a demotion too): what copies sync to.
    pub fn is_primary(self) -> bool {
        matches!(
            self,
            MirrorSnapState::Primary | MirrorSnapState::PrimaryDemoted
        )
    }
}

named_enum! {
    /// Who made a snapshot: a user, or mirroring.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    "snapshot namespace"
    pub enum SnapNamespaceType {
        #[default]
        User = "user",
        Mirror = "mirror",
    }
}

named_enum! {
    /// What a mirror daemon is doing with an image (the part of rbd's
    /// `up+replaying` after the `+`).
    #[derive(Default, Serialize, Deserialize)]
    "mirror image status state"
    pub enum MirrorStatusState {
        #[default]
        #[serde(rename = "unknown")]
        Unknown = "unknown",
        #[serde(rename = "starting_replay")]
        StartingReplay = "starting_replay",
        #[serde(rename = "replaying")]
        Replaying = "replaying",
        #[serde(rename = "syncing")]
        Syncing = "syncing",
        #[serde(rename = "stopped")]
        Stopped = "stopped",
        #[serde(rename = "error")]
        Error = "error",
    }
}

/// rbd's compound state: whether the daemon is up, and what it does.
pub fn status_state(up: bool, state: MirrorStatusState) -> String {
    format!("{}+{state}", if up { "up" } else { "down" })
}

named_enum! {
    /// Why an image's status is what it is: the typed reason beside
    /// Ceph's description, so nobody has to parse descriptions.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    "status reason"
    pub enum StatusReason {
        #[default]
        Unknown = "unknown",
        Primary = "primary",
        Starting = "starting",
        Replaying = "replaying",
        CatchingUp = "catching-up",
        Syncing = "syncing",
        Demoted = "demoted",
        ResyncRequested = "resync-requested",
        SplitBrain = "split-brain",
        Error = "error",
        PeerUnreachable = "peer-unreachable",
        Unreachable = "unreachable",
        DaemonDown = "daemon-down",
        Behind = "behind",
    }
}

named_enum! {
    /// Health of a mirrored pool, its daemons and its images.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "UPPERCASE")]
    "mirror health"
    pub enum MirrorHealth {
        #[default]
        Ok = "OK",
        Warning = "WARNING",
        Error = "ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_through_serde_and_parse() {
        for d in PeerDirection::ALL {
            let json = serde_json::to_string(d).unwrap();
            assert_eq!(json, format!("\"{d}\""));
            assert_eq!(PeerDirection::parse(d.as_str()), Some(*d));
        }
        for s in MirrorStatusState::ALL {
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        for r in StatusReason::ALL {
            assert_eq!(serde_json::to_string(r).unwrap(), format!("\"{r}\""));
        }
        for h in MirrorHealth::ALL {
            assert_eq!(serde_json::to_string(h).unwrap(), format!("\"{h}\""));
        }
        let old: PoolMirrorMode = serde_json::from_str("\"\"").unwrap();
        assert_eq!(old, PoolMirrorMode::Disabled);
        assert_eq!(
            serde_json::to_string(&MirrorSnapState::NonPrimaryDemoted).unwrap(),
            "\"NonPrimaryDemoted\""
        );
    }

    #[test]
    fn an_unknown_word_is_refused_with_the_known_ones() {
        let e = "sideways".parse::<PeerDirection>().unwrap_err();
        assert_eq!(
            e.message,
            "direction 'sideways' must be rx-only, rx-tx or tx-only"
        );
    }
}

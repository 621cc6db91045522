//! How a site is, and what an entity may do on it.

use serde::{Deserialize, Serialize};

named_enum! {
    /// A site's health, in Ceph's words.
    #[derive(Default, Serialize, Deserialize)]
    "health"
    pub enum Health {
        #[default]
        #[serde(rename = "HEALTH_OK")]
        Ok = "HEALTH_OK",
        #[serde(rename = "HEALTH_WARN")]
        Warn = "HEALTH_WARN",
        #[serde(rename = "HEALTH_ERR")]
        Err = "HEALTH_ERR",
    }
}

named_enum! {
    /// What an entity may do. Ordered from most to least powerful for display only.
    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    "profile"
    pub enum Profile {
        /// Everything, including pools, users and config.
        Admin = "admin",
        /// Read and write images (create, resize, remove) in its pools.
        Rbd = "rbd",
        /// Read images, list and inspect.
        RbdReadOnly = "rbd-read-only",
        /// The local mirror daemon: like rbd, plus mirror bookkeeping.
        RbdMirror = "rbd-mirror",
        /// A remote site's mirror daemon: read images, snapshots and journals,
        /// report peer status; never write image data.
        RbdMirrorPeer = "rbd-mirror-peer",
    }
}

//! The words of image journals.

use serde::{Deserialize, Serialize};

named_enum! {
    /// When an appended entry is durable. Stored journal options keep
    /// serde's own variant names.
    #[derive(Default, Serialize, Deserialize)]
    "journal durability"
    pub enum JournalDurability {
        /// Before the mutation is acknowledged (group-committed fdatasync).
        #[default]
        Strict = "strict",
        /// At the next flush or FUA write, like a disk's volatile write cache.
        /// Entries still reach the segment file (page cache) before the object
        /// files, so a process crash loses nothing; a power cut may lose the
        /// unflushed tail of the journal while the object files kept some of
        /// those writes, as a disk's cache may.
        OnFlush = "flush",
    }
}

named_enum! {
    /// What a journal client (a replayer holding back trimming) asks.
    "journal client action"
    pub enum JournalClientAction {
        Register = "register",
        Unregister = "unregister",
        Commit = "commit",
        Get = "get",
    }
}

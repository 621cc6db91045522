//! The command grammar (DESIGN §8): rbd's and ceph's words.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Block storage with built-in cross-site disaster recovery"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Cluster name: reads <conf dir>/<NAME>.conf (default: $TERN_CLUSTER or "tern").
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// Cluster config file (instead of --cluster).
    #[arg(short = 'c', long, global = true)]
    pub conf: Option<PathBuf>,
    /// Client id: acts as client.ID (default admin).
    #[arg(long, global = true)]
    pub id: Option<String>,
    /// Full entity name, e.g. client.admin.
    #[arg(short = 'n', long = "name", global = true)]
    pub client_name: Option<String>,
    /// Keyring file (default <conf dir>/<cluster>.<entity>.keyring).
    #[arg(short = 'k', long, global = true)]
    pub keyring: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Plain)]
    pub format: Format,
    /// Indent JSON output.
    #[arg(long, global = true)]
    pub pretty_format: bool,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Plain,
    Json,
    #[value(name = "json-pretty")]
    JsonPretty,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Pools: create, init, ls, stats, rm.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Ceph's `ceph osd …` words (only `osd pool …`).
    #[command(subcommand)]
    Osd(OsdCmd),
    /// Create an image.
    Create(CreateArgs),
    /// List images in a pool.
    #[command(visible_alias = "list")]
    Ls {
        /// Pool (default rbd).
        pool: Option<String>,
        #[arg(short = 'p', long = "pool", hide = true)]
        pool_opt: Option<String>,
        /// Long listing (size, format).
        #[arg(short = 'l', long)]
        long: bool,
    },
    /// Show an image.
    Info { spec: String },
    /// Grow or shrink an image.
    Resize {
        spec: String,
        #[arg(short = 's', long, allow_hyphen_values = true)]
        size: String,
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Rename an image inside its pool.
    #[command(visible_alias = "mv")]
    Rename { src: String, dst: String },
    /// Remove an image and its data.
    #[command(visible_alias = "remove")]
    Rm {
        spec: String,
        /// Also a non-primary mirror copy (the DR copy of another site's image).
        #[arg(long)]
        force: bool,
    },
    /// Import a raw file (or - for stdin) as a new image.
    Import(ImportArgs),
    /// Export an image or snapshot to a raw file (or - for stdout); holes stay holes.
    Export {
        spec: String,
        path: String,
        /// 1: raw bytes; 2: rbd's "rbd image v2" format with every snapshot.
        #[arg(long, default_value_t = 1)]
        export_format: u8,
    },
    /// Snapshots: create, ls, rm, rename, rollback, protect, unprotect, purge.
    #[command(subcommand)]
    Snap(SnapCmd),
    /// List extents changed since a snapshot (or all allocated ones).
    Diff {
        spec: String,
        #[arg(long)]
        from_snap: Option<String>,
        #[arg(long)]
        whole_object: bool,
    },
    /// Write the changes between two points as an rbd export-diff stream.
    ExportDiff {
        spec: String,
        path: String,
        #[arg(long)]
        from_snap: Option<String>,
        #[arg(long)]
        whole_object: bool,
        /// 1: "rbd diff v1" (rbd's default); 2: "rbd diff v2".
        #[arg(long, default_value_t = 1)]
        export_format: u8,
    },
    /// Apply an rbd export-diff stream to an image: all of it or nothing.
    ImportDiff { path: String, spec: String },
    /// Exclusive locks: ls, rm.
    #[command(subcommand)]
    Lock(LockCmd),
    /// Turn image features on or off on a live image (rbd feature …).
    #[command(subcommand)]
    Feature(FeatureCmd),
    /// The journal of a journaled image: info, status, inspect, export.
    #[command(subcommand)]
    Journal(JournalCmd),
    /// Block devices backed by images: map, unmap, list.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Mirroring between sites (rbd mirror …).
    #[command(subcommand)]
    Mirror(MirrorCmd),
    /// Disaster recovery for a whole pool: failover and failback, with
    /// preflight checks, waits, a log and an RPO report.
    #[command(subcommand)]
    Dr(DrCmd),
    /// A local two-site lab on loopback: up, down, status.
    Lab {
        #[arg(value_parser = ["up", "down", "status"])]
        action: String,
        /// Where the lab keeps its sites, configs and logs.
        #[arg(long, default_value = "lab")]
        dir: std::path::PathBuf,
    },
    /// Measure I/O against an image, like `rbd bench`.
    Bench(BenchArgs),
    /// Site health and usage, like `ceph status`, with the mirror daemons
    /// seen and their heartbeats.
    Status,
    /// Print a shell completion script: `tern completion bash > /etc/bash_completion.d/tern`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (tern.1 and one per subcommand) into a directory.
    Man {
        #[arg(default_value = "man")]
        dir: PathBuf,
    },
    /// Central configuration, like `ceph config`.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Users and keys, like `ceph auth`.
    #[command(subcommand)]
    Auth(AuthCmd),
}

#[derive(Subcommand)]
pub enum OsdCmd {
    #[command(subcommand)]
    Pool(PoolCmd),
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create a pool (Ceph's pg numbers are accepted and ignored).
    Create {
        pool: String,
        pg_num: Option<u32>,
        pgp_num: Option<u32>,
    },
    /// Mark a pool for rbd use (`rbd pool init`).
    Init {
        pool: String,
        #[arg(long, default_value = "rbd")]
        application: String,
    },
    /// List pools.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        detail: bool,
    },
    /// Usage and I/O counters of a pool.
    Stats { pool: Option<String> },
    /// Remove a pool; refuses one that holds images unless --force.
    #[command(visible_aliases = ["delete", "remove"])]
    Rm {
        pool: String,
        /// Ceph's repeated pool name, accepted.
        pool_again: Option<String>,
        #[arg(long = "yes-i-really-really-mean-it")]
        yes: bool,
        /// Also remove every image in the pool.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct LayoutArgs {
    /// Object size (e.g. 4M); default 4 MiB.
    #[arg(long)]
    pub object_size: Option<String>,
    /// Object size as a power of two (12..30).
    #[arg(long, conflicts_with = "object_size")]
    pub order: Option<u32>,
    /// Image features (rbd names), comma separated or repeated.
    #[arg(long = "image-feature")]
    pub features: Vec<String>,
    #[arg(long)]
    pub stripe_unit: Option<String>,
    #[arg(long)]
    pub stripe_count: Option<u64>,
}

#[derive(Args)]
pub struct CreateArgs {
    pub spec: String,
    /// Size with suffix K, M, G, T (a plain number is MiB, as in rbd).
    #[arg(short = 's', long, allow_hyphen_values = true)]
    pub size: String,
    #[command(flatten)]
    pub layout: LayoutArgs,
}

#[derive(Args)]
pub struct ImportArgs {
    /// Source file, or - for stdin.
    pub path: String,
    /// Target image spec (default: the file's name in pool rbd).
    pub spec: Option<String>,
    /// 1: raw bytes; 2: rbd's "rbd image v2" format (with snapshots).
    #[arg(long, default_value_t = 1)]
    pub export_format: u8,
    #[command(flatten)]
    pub layout: LayoutArgs,
}

#[derive(Args)]
pub struct BenchArgs {
    pub spec: String,
    #[arg(long, value_enum)]
    pub io_type: IoType,
    #[arg(long, default_value = "4K")]
    pub io_size: String,
    #[arg(long, default_value_t = 16)]
    pub io_threads: usize,
    #[arg(long, default_value = "1G")]
    pub io_total: String,
    #[arg(long, value_enum, default_value_t = IoPattern::Seq)]
    pub io_pattern: IoPattern,
    /// Percentage of reads for readwrite.
    #[arg(long, default_value_t = 50)]
    pub rw_mix_read: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoType {
    Read,
    Write,
    #[value(alias = "rw")]
    Readwrite,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoPattern {
    Seq,
    #[value(alias = "random")]
    Rand,
}

#[derive(Subcommand)]
#[command(disable_help_subcommand = true)]
pub enum ConfigCmd {
    /// Set an option for a section (global, client, client.NAME).
    Set {
        who: String,
        key: String,
        value: String,
    },
    /// The effective value(s) for a section.
    Get { who: String, key: Option<String> },
    /// Remove a set value.
    #[command(visible_alias = "remove")]
    Rm { who: String, key: String },
    /// Every value set.
    Dump,
    /// Known options and their defaults.
    Help { key: Option<String> },
    /// Per-image options (rbd config image …): set, get, rm, ls.
    #[command(subcommand)]
    Image(ConfigImageCmd),
}

#[derive(Subcommand)]
pub enum ConfigImageCmd {
    /// Set an rbd_* option for one image (e.g. rbd_journal_max_size).
    Set {
        spec: String,
        key: String,
        value: String,
    },
    /// The effective value of an option for the image.
    Get { spec: String, key: String },
    /// Remove the image's own value (the global one applies again).
    #[command(visible_alias = "remove")]
    Rm { spec: String, key: String },
    /// Every option's effective value for the image.
    #[command(visible_alias = "list")]
    Ls { spec: String },
}

#[derive(Subcommand)]
pub enum FeatureCmd {
    /// Enable features (exclusive-lock, object-map, fast-diff, journaling).
    Enable {
        spec: String,
        #[arg(required = true)]
        features: Vec<String>,
    },
    /// Disable features.
    Disable {
        spec: String,
        #[arg(required = true)]
        features: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum JournalCmd {
    /// Size, segments, positions and options of the journal.
    Info { spec: String },
    /// The journal's clients and how far behind each is.
    Status { spec: String },
    /// Read every segment and entry from disk and verify every crc.
    Inspect {
        spec: String,
        /// Also list each entry.
        #[arg(long)]
        verbose: bool,
    },
    /// Write the journal's entries to PATH ('-': stdout) in tern's entry
    /// encoding; with --format json, one JSON object per entry.
    Export {
        spec: String,
        path: String,
        /// First tid to export (default: the oldest held).
        #[arg(long)]
        from_tid: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum AuthCmd {
    /// Create an entity with caps, or return it if it exists with the same caps.
    #[command(name = "get-or-create", visible_alias = "get-or-create-key")]
    GetOrCreate {
        entity: String,
        /// Pairs of service and cap: mon 'profile rbd' osd 'profile rbd pool=P'.
        caps: Vec<String>,
        /// Write the keyring to FILE instead of stdout.
        #[arg(short = 'o', long = "out-file")]
        out: Option<PathBuf>,
    },
    /// Show an entity and its key.
    Get {
        entity: String,
        #[arg(short = 'o', long = "out-file")]
        out: Option<PathBuf>,
    },
    /// Print just the key.
    #[command(name = "print-key", visible_alias = "get-key")]
    PrintKey { entity: String },
    /// List entities.
    #[command(visible_alias = "list")]
    Ls,
    /// Remove an entity: its key stops working at once, and a later
    /// get-or-create of the same name gets a new key.
    #[command(visible_alias = "del")]
    Rm { entity: String },
    /// Replace an entity's caps, keeping its key: mon 'profile rbd' osd 'profile rbd pool=P'.
    Caps {
        entity: String,
        /// Pairs of service and cap, as for get-or-create.
        caps: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum SnapCmd {
    /// Take a snapshot: pool/image@snap.
    #[command(visible_alias = "add")]
    Create {
        spec: String,
    },
    /// List snapshots (--all: mirror snapshots too).
    #[command(visible_alias = "list")]
    Ls {
        spec: String,
        #[arg(short = 'a', long)]
        all: bool,
    },
    /// Remove a snapshot.
    #[command(visible_alias = "remove")]
    Rm {
        spec: String,
    },
    /// Rename a snapshot.
    #[command(visible_alias = "mv")]
    Rename {
        src: String,
        dst: String,
    },
    /// Return the image to a snapshot.
    #[command(visible_alias = "revert")]
    Rollback {
        spec: String,
    },
    /// Keep a snapshot from being removed.
    Protect {
        spec: String,
    },
    Unprotect {
        spec: String,
    },
    /// Remove every unprotected user snapshot of an image.
    Purge {
        spec: String,
    },
}

#[derive(Subcommand)]
pub enum LockCmd {
    /// Show the exclusive lock of an image.
    #[command(visible_alias = "list")]
    Ls { spec: String },
    /// Break a lock; its owner is fenced and its writes are refused.
    #[command(visible_alias = "remove")]
    Rm {
        spec: String,
        lock_id: String,
        locker: String,
    },
}

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Attach pool/image[@snap] as a block device; prints the device path.
    Map {
        spec: String,
        /// Map read-only (snapshots always are).
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a mapped device (by device path or image spec).
    Unmap { target: String },
    /// Mapped devices.
    #[command(visible_alias = "ls")]
    List,
}

#[derive(Subcommand)]
pub enum MirrorCmd {
    #[command(subcommand)]
    Pool(MirrorPoolCmd),
    #[command(subcommand)]
    Image(MirrorImageCmd),
    /// Mirror snapshot schedules.
    #[command(subcommand)]
    Snapshot(MirrorSnapshotCmd),
}

#[derive(Subcommand)]
pub enum MirrorSnapshotCmd {
    #[command(subcommand)]
    Schedule(ScheduleCmd),
}

#[derive(Args, Clone)]
pub struct ScheduleLevel {
    /// Pool (default rbd).
    #[arg(short = 'p', long)]
    pub pool: Option<String>,
    /// Image (name, or pool/image).
    #[arg(long)]
    pub image: Option<String>,
}

#[derive(Subcommand)]
pub enum ScheduleCmd {
    /// Add a schedule: INTERVAL like 15m, 1h, 1d; optional start time HH:MM:SS (UTC).
    Add {
        #[command(flatten)]
        level: ScheduleLevel,
        interval: String,
        start_time: Option<String>,
        #[arg(long = "start-time")]
        start_time_opt: Option<String>,
    },
    /// Remove one schedule (or all at that level without INTERVAL).
    #[command(visible_alias = "remove")]
    Rm {
        #[command(flatten)]
        level: ScheduleLevel,
        interval: Option<String>,
        start_time: Option<String>,
        #[arg(long = "start-time")]
        start_time_opt: Option<String>,
    },
    #[command(visible_alias = "list")]
    Ls {
        #[command(flatten)]
        level: ScheduleLevel,
        #[arg(short = 'R', long)]
        recursive: bool,
    },
    /// When each image's next scheduled snapshot is due.
    Status {
        #[command(flatten)]
        level: ScheduleLevel,
    },
}

#[derive(Subcommand)]
pub enum MirrorPoolCmd {
    /// Enable mirroring on a pool: `pool` mirrors every image, `image` those enabled one by one.
    Enable {
        pool: String,
        mode: String,
        #[arg(long)]
        site_name: Option<String>,
    },
    Disable {
        pool: String,
    },
    /// Mode, site name and peers.
    Info {
        pool: String,
        #[arg(long)]
        all: bool,
    },
    /// Health and per-image states, from the mirror daemons' reports.
    Status {
        pool: String,
        #[arg(long)]
        verbose: bool,
    },
    #[command(subcommand)]
    Peer(MirrorPeerCmd),
    /// Promote every mirrored image of the pool.
    Promote {
        pool: String,
        #[arg(long)]
        force: bool,
    },
    /// Demote every primary mirrored image of the pool.
    Demote {
        pool: String,
    },
}

#[derive(Subcommand)]
pub enum MirrorPeerCmd {
    /// Add a peer by hand (bootstrap tokens are easier).
    Add {
        pool: String,
        /// client.NAME@SITE
        remote: String,
        #[arg(long)]
        remote_mon_host: String,
        #[arg(long)]
        remote_key_file: Option<std::path::PathBuf>,
        #[arg(long)]
        remote_fingerprint: String,
        #[arg(long)]
        remote_fsid: String,
        #[arg(long, default_value = "rx-tx")]
        direction: String,
        #[arg(long)]
        remote_pool: Option<String>,
    },
    Remove {
        pool: String,
        uuid: String,
    },
    /// Change a peer: client, site-name, mon-host, key, direction, tls-fingerprint.
    Set {
        pool: String,
        uuid: String,
        key: String,
        value: String,
    },
    #[command(subcommand)]
    Bootstrap(MirrorBootstrapCmd),
}

#[derive(Subcommand)]
pub enum MirrorBootstrapCmd {
    /// Print a token another site imports to peer with this one.
    Create {
        pool: String,
        #[arg(long)]
        site_name: Option<String>,
    },
    /// Peer with the site that made the token (FILE or - for stdin).
    Import {
        pool: String,
        path: String,
        #[arg(long)]
        site_name: Option<String>,
        #[arg(long, default_value = "rx-tx")]
        direction: String,
        /// The pool on the token's site, when its name differs.
        #[arg(long)]
        remote_pool: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum MirrorImageCmd {
    /// Mirror an image (snapshot mode; journal mode needs the journaling feature).
    Enable {
        spec: String,
        #[arg(default_value = "snapshot")]
        mode: String,
    },
    Disable {
        spec: String,
        #[arg(long)]
        force: bool,
    },
    Promote {
        spec: String,
        #[arg(long)]
        force: bool,
    },
    Demote {
        spec: String,
    },
    /// Make this non-primary copy equal to the primary again: by default
    /// copies only what diverged since the last common point; `--full`
    /// copies the whole image (after damage behind tern's back, such as
    /// `verify` reports).
    Resync {
        spec: String,
        #[arg(long)]
        full: bool,
    },
    /// Take a mirror snapshot now (the peers copy it).
    Snapshot {
        spec: String,
    },
    Status {
        spec: String,
    },
    /// Compare this non-primary copy with the primary at the last synced
    /// mirror snapshot, by BLAKE3 hashes computed on each site.
    Verify {
        spec: String,
        /// Bytes per compared extent.
        #[arg(long, default_value = "4M")]
        chunk: String,
    },
}

#[derive(Subcommand)]
pub enum DrCmd {
    /// Make this site primary for every mirrored image of the pool. Plain:
    /// waits until each image's demotion at its primary site is replayed
    /// here (no data loss). --force: promotes at once (the primary site is
    /// lost); the report says how far behind each image was.
    Failover(DrArgs),
    /// Hand the pool back to the peer site: checks it is in sync, demotes
    /// every image here and waits until the peer has replayed the
    /// demotions; with --to, also promotes them there.
    Failback(DrArgs),
}

#[derive(Args)]
pub struct DrArgs {
    /// The pool.
    #[arg(long, short = 'p')]
    pub pool: String,
    /// Failover only: promote without the old primary (it is lost).
    #[arg(long)]
    pub force: bool,
    /// Check and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds to wait for each phase before giving up.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Append the log here (default /var/log/tern/dr-<kind>-<time>.log,
    /// or ./ when that is not writable).
    #[arg(long)]
    pub log: Option<std::path::PathBuf>,
    /// Failback only: the cluster name (config) of the site to hand back
    /// to; its images are promoted there once they hold the demotions.
    #[arg(long)]
    pub to: Option<String>,
}

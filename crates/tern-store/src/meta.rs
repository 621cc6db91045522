//! The metadata database (`meta.redb`): pools, images and small key-value
//! tables. Every multi-step change is one write transaction committed with
//! `Durability::Immediate`, so a crash never leaves half of one.
//!
//! Tables (keys and values are strings; records are JSON so that new fields
//! can be added with `#[serde(default)]` and read by older code):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `store` | `format` | store format version, decimal |
//! | `counters` | `next_pool_id` | u64 |
//! | `pools` | pool name | [`PoolInfo`] |
//! | `images` | `<pool id, 16 hex>/<image name>` | [`ImageRecord`] |
//! | `image_ids` | image id | the image's `images` key |
//! | `snaps` | `<image id>/<snap id, 16 hex>` | [`SnapInfo`] |
//! | `kv_site`, `kv_users`, `kv_config` | caller's key | caller's value |

use crate::error::StoreError;
use crate::types::{ImageInfo, KvTable, PoolInfo, SnapInfo, SnapNamespace};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use tern_types::{Features, ImageId, Layout};

/// The store format this code writes. Bump it (and teach `open` to read the
/// old one) when a change would confuse older code.
pub const FORMAT_VERSION: u32 = 1;

type Str = TableDefinition<'static, &'static str, &'static str>;
const STORE: Str = TableDefinition::new("store");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const POOLS: Str = TableDefinition::new("pools");
const IMAGES: Str = TableDefinition::new("images");
const IMAGE_IDS: Str = TableDefinition::new("image_ids");
const SNAPS: Str = TableDefinition::new("snaps");
const KV_SITE: Str = TableDefinition::new("kv_site");
const KV_USERS: Str = TableDefinition::new("kv_users");
const KV_CONFIG: Str = TableDefinition::new("kv_config");
const KV_MIRROR: Str = TableDefinition::new("kv_mirror");

fn kv_def(t: KvTable) -> Str {
    match t {
        KvTable::Site => KV_SITE,
        KvTable::Users => KV_USERS,
        KvTable::Config => KV_CONFIG,
        KvTable::Mirror => KV_MIRROR,
    }
}

/// An image as stored. It names its pool by id so that the record does not
/// depend on the pool's name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    pub pool_id: u64,
    pub name: String,
    pub size: u64,
    pub layout: Layout,
    #[serde(default)]
    pub features: Features,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub modified: u64,
    /// Id of the newest snapshot ever taken (0: none). Writes made while it
    /// is N belong to epoch N.
    #[serde(default)]
    pub snap_seq: u64,
}

fn image_key(pool_id: u64, name: &str) -> String {
    format!("{pool_id:016x}/{name}")
}

fn snap_prefix(image: &ImageId) -> String {
    format!("{image}/")
}

fn snap_key(image: &ImageId, id: u64) -> String {
    format!("{image}/{id:016x}")
}

/// Which snapshot an update or removal is about.
pub enum SnapSel<'a> {
    Name(&'a str),
    Id(u64),
}

fn db_err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Meta {
        op,
        source: e.into(),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: &str,
    json: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::BadRecord {
        table,
        key: key.to_string(),
        source,
    })
}

fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialize")
}

pub struct Meta {
    db: Database,
    /// This opening's generation (`counters/boot`, bumped by every open):
    /// object headers record which generation wrote their write intent.
    pub boot: u32,
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::OpenMeta {
            path: path.to_path_buf(),
            source,
        })?;
        let mut meta = Meta { db, boot: 0 };
        meta.boot = meta.write("initialise", |tx| {
            // Opening every table once makes them exist, so read
            // transactions never meet a missing table.
            for def in [
                STORE, POOLS, IMAGES, IMAGE_IDS, SNAPS, KV_SITE, KV_USERS, KV_CONFIG, KV_MIRROR,
            ] {
                tx.open_table(def).map_err(db_err("open table"))?;
            }
            let boot = {
                let mut c = tx.open_table(COUNTERS).map_err(db_err("open table"))?;
                let b = c
                    .get("boot")
                    .map_err(db_err("read boot"))?
                    .map(|v| v.value())
                    .unwrap_or(0)
                    + 1;
                c.insert("boot", b).map_err(db_err("write boot"))?;
                b as u32
            };
            let mut store = tx.open_table(STORE).map_err(db_err("open table"))?;
            let found = store
                .get("format")
                .map_err(db_err("read format"))?
                .map(|v| v.value().to_string());
            match found {
                None => {
                    store
                        .insert("format", FORMAT_VERSION.to_string().as_str())
                        .map_err(db_err("write format"))?;
                }
                Some(v) => match v.parse::<u32>() {
                    Ok(n) if n <= FORMAT_VERSION => {}
                    Ok(n) => {
                        return Err(StoreError::FormatTooNew {
                            path: path.to_path_buf(),
                            found: n,
                            supported: FORMAT_VERSION,
                        });
                    }
                    Err(_) => {
                        return Err(StoreError::BadFormat {
                            path: path.to_path_buf(),
                            found: v,
                        });
                    }
                },
            }
            Ok(boot)
        })?;
        Ok(meta)
    }

    /// Runs `f` in one write transaction and commits it durably; on error
    /// the transaction is dropped, which aborts it.
    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut tx = self.db.begin_write().map_err(db_err(op))?;
        // Immediate is redb's default; said here because the store's
        // contract depends on it.
        tx.set_durability(Durability::Immediate)
            .map_err(db_err(op))?;
        let v = f(&tx)?;
        tx.commit().map_err(db_err(op))?;
        Ok(v)
    }

    fn read_str(&self, def: Str, key: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err("read"))?;
        let t = tx.open_table(def).map_err(db_err("read"))?;
        Ok(t.get(key)
            .map_err(db_err("read"))?
            .map(|v| v.value().to_string()))
    }

    fn scan_prefix(&self, def: Str, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err("scan"))?;
        let t = tx.open_table(def).map_err(db_err("scan"))?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(db_err("scan"))? {
            let (k, v) = item.map_err(db_err("scan"))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_string()));
        }
        Ok(out)
    }

    // ---- key-value tables ----

    pub fn kv_get(&self, t: KvTable, key: &str) -> Result<Option<String>, StoreError> {
        self.read_str(kv_def(t), key)
    }

    pub fn kv_put(&self, t: KvTable, key: &str, value: &str) -> Result<(), StoreError> {
        self.write("kv put", |tx| {
            let mut tab = tx.open_table(kv_def(t)).map_err(db_err("kv put"))?;
            tab.insert(key, value).map_err(db_err("kv put"))?;
            Ok(())
        })
    }

    pub fn kv_delete(&self, t: KvTable, key: &str) -> Result<bool, StoreError> {
        self.write("kv delete", |tx| {
            let mut tab = tx.open_table(kv_def(t)).map_err(db_err("kv delete"))?;
            Ok(tab.remove(key).map_err(db_err("kv delete"))?.is_some())
        })
    }

    pub fn kv_list(&self, t: KvTable, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.scan_prefix(kv_def(t), prefix)
    }

    // ---- pools ----

    pub fn pool_create(&self, name: &str, created: u64) -> Result<PoolInfo, StoreError> {
        self.write("pool create", |tx| {
            let mut pools = tx.open_table(POOLS).map_err(db_err("pool create"))?;
            if pools.get(name).map_err(db_err("pool create"))?.is_some() {
                return Err(StoreError::PoolExists {
                    pool: name.to_string(),
                });
            }
            let mut counters = tx.open_table(COUNTERS).map_err(db_err("pool create"))?;
            let id = counters
                .get("next_pool_id")
                .map_err(db_err("pool create"))?
                .map(|v| v.value())
                .unwrap_or(1);
            counters
                .insert("next_pool_id", id + 1)
                .map_err(db_err("pool create"))?;
            let info = PoolInfo {
                id,
                name: name.to_string(),
                application: None,
                created,
            };
            pools
                .insert(name, encode(&info).as_str())
                .map_err(db_err("pool create"))?;
            Ok(info)
        })
    }

    pub fn pool_set_application(&self, name: &str, app: &str) -> Result<PoolInfo, StoreError> {
        self.write("pool init", |tx| {
            let mut pools = tx.open_table(POOLS).map_err(db_err("pool init"))?;
            let mut info = get_pool(&pools, name)?;
            if info.application.as_deref() != Some(app) {
                info.application = Some(app.to_string());
                pools
                    .insert(name, encode(&info).as_str())
                    .map_err(db_err("pool init"))?;
            }
            Ok(info)
        })
    }

    pub fn pool_get(&self, name: &str) -> Result<PoolInfo, StoreError> {
        match self.read_str(POOLS, name)? {
            Some(v) => decode("pools", name, &v),
            None => Err(StoreError::PoolNotFound {
                pool: name.to_string(),
            }),
        }
    }

    pub fn pool_list(&self) -> Result<Vec<PoolInfo>, StoreError> {
        self.scan_prefix(POOLS, "")?
            .iter()
            .map(|(k, v)| decode("pools", k, v))
            .collect()
    }

    /// Deletes the pool and, if `force`, all its images, in one transaction.
    /// Returns the images removed so the caller can delete their data.
    pub fn pool_remove(&self, name: &str, force: bool) -> Result<Vec<ImageRecord>, StoreError> {
        self.write("pool remove", |tx| {
            let mut pools = tx.open_table(POOLS).map_err(db_err("pool remove"))?;
            let info = get_pool(&pools, name)?;
            let mut images = tx.open_table(IMAGES).map_err(db_err("pool remove"))?;
            let prefix = image_key(info.id, "");
            let mut removed = Vec::new();
            for item in images
                .range(prefix.as_str()..)
                .map_err(db_err("pool remove"))?
            {
                let (k, v) = item.map_err(db_err("pool remove"))?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                removed.push(decode::<ImageRecord>("images", k.value(), v.value())?);
            }
            if !removed.is_empty() && !force {
                return Err(StoreError::PoolNotEmpty {
                    pool: name.to_string(),
                    images: removed.len() as u64,
                });
            }
            let mut ids = tx.open_table(IMAGE_IDS).map_err(db_err("pool remove"))?;
            for r in &removed {
                images
                    .remove(image_key(info.id, &r.name).as_str())
                    .map_err(db_err("pool remove"))?;
                ids.remove(r.id.as_str()).map_err(db_err("pool remove"))?;
                remove_all_snaps(tx, &r.id)?;
            }
            pools.remove(name).map_err(db_err("pool remove"))?;
            Ok(removed)
        })
    }

    // ---- images ----

    /// All image records of a pool, sorted by name (hidden ones included).
    pub fn image_list(&self, pool_id: u64) -> Result<Vec<ImageRecord>, StoreError> {
        self.scan_prefix(IMAGES, &image_key(pool_id, ""))?
            .iter()
            .map(|(k, v)| decode("images", k, v))
            .collect()
    }

    pub fn image_get(&self, pool: &str, name: &str) -> Result<(PoolInfo, ImageRecord), StoreError> {
        let p = self.pool_get(pool)?;
        match self.read_str(IMAGES, &image_key(p.id, name))? {
            Some(v) => {
                let r = decode("images", name, &v)?;
                Ok((p, r))
            }
            None => Err(StoreError::ImageNotFound {
                spec: format!("{pool}/{name}"),
            }),
        }
    }

    /// Inserts a new image; `make` is given a fresh image id (unique in the
    /// site) and the pool id.
    pub fn image_create(
        &self,
        pool: &str,
        name: &str,
        make: impl Fn(ImageId, u64) -> ImageRecord,
    ) -> Result<(PoolInfo, ImageRecord), StoreError> {
        self.write("image create", |tx| {
            let pools = tx.open_table(POOLS).map_err(db_err("image create"))?;
            let p = get_pool(&pools, pool)?;
            let mut images = tx.open_table(IMAGES).map_err(db_err("image create"))?;
            let key = image_key(p.id, name);
            if images
                .get(key.as_str())
                .map_err(db_err("image create"))?
                .is_some()
            {
                return Err(StoreError::ImageExists {
                    spec: format!("{pool}/{name}"),
                });
            }
            let mut ids = tx.open_table(IMAGE_IDS).map_err(db_err("image create"))?;
            let id = loop {
                let id = ImageId::generate();
                if ids
                    .get(id.as_str())
                    .map_err(db_err("image create"))?
                    .is_none()
                {
                    break id;
                }
            };
            let rec = make(id, p.id);
            images
                .insert(key.as_str(), encode(&rec).as_str())
                .map_err(db_err("image create"))?;
            ids.insert(rec.id.as_str(), key.as_str())
                .map_err(db_err("image create"))?;
            Ok((p, rec))
        })
    }

    /// Applies `f` to an image record in one transaction.
    pub fn image_update(
        &self,
        pool: &str,
        name: &str,
        f: impl FnOnce(&mut ImageRecord),
    ) -> Result<(PoolInfo, ImageRecord), StoreError> {
        self.write("image update", |tx| {
            let pools = tx.open_table(POOLS).map_err(db_err("image update"))?;
            let p = get_pool(&pools, pool)?;
            let mut images = tx.open_table(IMAGES).map_err(db_err("image update"))?;
            let key = image_key(p.id, name);
            let mut rec = get_image(&images, &key, pool, name)?;
            f(&mut rec);
            images
                .insert(key.as_str(), encode(&rec).as_str())
                .map_err(db_err("image update"))?;
            Ok((p, rec))
        })
    }

    pub fn image_rename(
        &self,
        pool: &str,
        old: &str,
        new: &str,
        modified: u64,
    ) -> Result<ImageRecord, StoreError> {
        self.write("image rename", |tx| {
            let pools = tx.open_table(POOLS).map_err(db_err("image rename"))?;
            let p = get_pool(&pools, pool)?;
            let mut images = tx.open_table(IMAGES).map_err(db_err("image rename"))?;
            let old_key = image_key(p.id, old);
            let new_key = image_key(p.id, new);
            let mut rec = get_image(&images, &old_key, pool, old)?;
            if old == new {
                return Ok(rec);
            }
            if images
                .get(new_key.as_str())
                .map_err(db_err("image rename"))?
                .is_some()
            {
                return Err(StoreError::ImageExists {
                    spec: format!("{pool}/{new}"),
                });
            }
            rec.name = new.to_string();
            rec.modified = modified;
            images
                .remove(old_key.as_str())
                .map_err(db_err("image rename"))?;
            images
                .insert(new_key.as_str(), encode(&rec).as_str())
                .map_err(db_err("image rename"))?;
            let mut ids = tx.open_table(IMAGE_IDS).map_err(db_err("image rename"))?;
            ids.insert(rec.id.as_str(), new_key.as_str())
                .map_err(db_err("image rename"))?;
            Ok(rec)
        })
    }

    pub fn image_remove(&self, pool: &str, name: &str) -> Result<ImageRecord, StoreError> {
        self.write("image remove", |tx| {
            let pools = tx.open_table(POOLS).map_err(db_err("image remove"))?;
            let p = get_pool(&pools, pool)?;
            let mut images = tx.open_table(IMAGES).map_err(db_err("image remove"))?;
            let key = image_key(p.id, name);
            let rec = get_image(&images, &key, pool, name)?;
            let snaps = list_snaps(tx, &rec.id)?;
            if snaps.iter().any(|s| s.namespace == SnapNamespace::User) {
                return Err(StoreError::ImageHasSnapshots {
                    spec: format!("{pool}/{name}"),
                });
            }
            // Mirror snapshots belong to the image's replication, not to a
            // user: they go with it.
            remove_all_snaps(tx, &rec.id)?;
            images
                .remove(key.as_str())
                .map_err(db_err("image remove"))?;
            let mut ids = tx.open_table(IMAGE_IDS).map_err(db_err("image remove"))?;
            ids.remove(rec.id.as_str())
                .map_err(db_err("image remove"))?;
            Ok(rec)
        })
    }

    /// Every image id that has a record: the data directories to keep.
    pub fn image_ids(&self) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .scan_prefix(IMAGE_IDS, "")?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
}

impl Meta {
    // ---- snapshots ----

    /// Snapshots of an image, by id.
    pub fn snap_list(&self, image: &ImageId) -> Result<Vec<SnapInfo>, StoreError> {
        self.scan_prefix(SNAPS, &snap_prefix(image))?
            .iter()
            .map(|(k, v)| decode("snaps", k, v))
            .collect()
    }

    /// Adds a snapshot with id `snap_seq + 1` and bumps `snap_seq`, in one
    /// transaction. Returns the updated image record and the snapshot.
    pub fn snap_create(
        &self,
        pool: &str,
        image: &str,
        make: impl FnOnce(&ImageRecord) -> SnapInfo,
    ) -> Result<(ImageRecord, SnapInfo), StoreError> {
        self.write("snapshot create", |tx| {
            let (key, mut rec) = image_in_tx(tx, pool, image)?;
            let snap = make(&rec);
            if list_snaps(tx, &rec.id)?.iter().any(|s| s.name == snap.name) {
                return Err(StoreError::SnapExists {
                    spec: format!("{pool}/{image}@{}", snap.name),
                });
            }
            rec.snap_seq = snap.id;
            put_image(tx, &key, &rec)?;
            put_snap(tx, &rec.id, &snap)?;
            Ok((rec, snap))
        })
    }

    /// Applies `f` to one snapshot (it may refuse), checking that names stay
    /// unique. Returns the updated snapshot and all snapshots after the change.
    pub fn snap_update(
        &self,
        pool: &str,
        image: &str,
        sel: SnapSel<'_>,
        f: impl FnOnce(&mut SnapInfo) -> Result<(), StoreError>,
    ) -> Result<(SnapInfo, Vec<SnapInfo>), StoreError> {
        self.write("snapshot update", |tx| {
            let (_, rec) = image_in_tx(tx, pool, image)?;
            let mut all = list_snaps(tx, &rec.id)?;
            let i = find_snap(&all, &sel, pool, image)?;
            let old_name = all[i].name.clone();
            f(&mut all[i])?;
            let new_name = all[i].name.clone();
            if new_name != old_name && all.iter().filter(|s| s.name == new_name).count() > 1 {
                return Err(StoreError::SnapExists {
                    spec: format!("{pool}/{image}@{new_name}"),
                });
            }
            put_snap(tx, &rec.id, &all[i])?;
            Ok((all[i].clone(), all))
        })
    }

    /// Removes the snapshots `pick` selects from the current list (it may
    /// refuse). Returns the removed ones and those that remain.
    pub fn snap_remove(
        &self,
        pool: &str,
        image: &str,
        pick: impl FnOnce(&[SnapInfo]) -> Result<Vec<u64>, StoreError>,
    ) -> Result<(Vec<SnapInfo>, Vec<SnapInfo>), StoreError> {
        self.write("snapshot remove", |tx| {
            let (_, rec) = image_in_tx(tx, pool, image)?;
            let all = list_snaps(tx, &rec.id)?;
            let ids = pick(&all)?;
            let mut t = tx.open_table(SNAPS).map_err(db_err("snapshot remove"))?;
            let (mut gone, mut kept) = (Vec::new(), Vec::new());
            for s in all {
                if ids.contains(&s.id) {
                    t.remove(snap_key(&rec.id, s.id).as_str())
                        .map_err(db_err("snapshot remove"))?;
                    gone.push(s);
                } else {
                    kept.push(s);
                }
            }
            Ok((gone, kept))
        })
    }
}

/// Index of the selected snapshot in `all`, or SnapNotFound.
pub fn find_snap(
    all: &[SnapInfo],
    sel: &SnapSel<'_>,
    pool: &str,
    image: &str,
) -> Result<usize, StoreError> {
    all.iter()
        .position(|s| match sel {
            SnapSel::Name(n) => s.name == *n,
            SnapSel::Id(id) => s.id == *id,
        })
        .ok_or_else(|| StoreError::SnapNotFound {
            spec: match sel {
                SnapSel::Name(n) => format!("{pool}/{image}@{n}"),
                SnapSel::Id(id) => format!("{pool}/{image}@{{id {id}}}"),
            },
        })
}

fn image_in_tx(
    tx: &WriteTransaction,
    pool: &str,
    name: &str,
) -> Result<(String, ImageRecord), StoreError> {
    let pools = tx.open_table(POOLS).map_err(db_err("read pool"))?;
    let p = get_pool(&pools, pool)?;
    let images = tx.open_table(IMAGES).map_err(db_err("read image"))?;
    let key = image_key(p.id, name);
    let rec = get_image(&images, &key, pool, name)?;
    Ok((key, rec))
}

fn put_image(tx: &WriteTransaction, key: &str, rec: &ImageRecord) -> Result<(), StoreError> {
    let mut images = tx.open_table(IMAGES).map_err(db_err("write image"))?;
    images
        .insert(key, encode(rec).as_str())
        .map_err(db_err("write image"))?;
    Ok(())
}

fn put_snap(tx: &WriteTransaction, image: &ImageId, s: &SnapInfo) -> Result<(), StoreError> {
    let mut t = tx.open_table(SNAPS).map_err(db_err("write snapshot"))?;
    t.insert(snap_key(image, s.id).as_str(), encode(s).as_str())
        .map_err(db_err("write snapshot"))?;
    Ok(())
}

fn list_snaps(tx: &WriteTransaction, image: &ImageId) -> Result<Vec<SnapInfo>, StoreError> {
    let t = tx.open_table(SNAPS).map_err(db_err("read snapshots"))?;
    let prefix = snap_prefix(image);
    let mut out = Vec::new();
    for item in t
        .range(prefix.as_str()..)
        .map_err(db_err("read snapshots"))?
    {
        let (k, v) = item.map_err(db_err("read snapshots"))?;
        if !k.value().starts_with(&prefix) {
            break;
        }
        out.push(decode("snaps", k.value(), v.value())?);
    }
    Ok(out)
}

fn remove_all_snaps(tx: &WriteTransaction, image: &ImageId) -> Result<(), StoreError> {
    let ids: Vec<u64> = list_snaps(tx, image)?.iter().map(|s| s.id).collect();
    let mut t = tx.open_table(SNAPS).map_err(db_err("remove snapshots"))?;
    for id in ids {
        t.remove(snap_key(image, id).as_str())
            .map_err(db_err("remove snapshots"))?;
    }
    Ok(())
}

fn get_pool(
    pools: &impl ReadableTable<&'static str, &'static str>,
    name: &str,
) -> Result<PoolInfo, StoreError> {
    match pools.get(name).map_err(db_err("read pool"))? {
        Some(v) => decode("pools", name, v.value()),
        None => Err(StoreError::PoolNotFound {
            pool: name.to_string(),
        }),
    }
}

fn get_image(
    images: &impl ReadableTable<&'static str, &'static str>,
    key: &str,
    pool: &str,
    name: &str,
) -> Result<ImageRecord, StoreError> {
    match images.get(key).map_err(db_err("read image"))? {
        Some(v) => decode("images", key, v.value()),
        None => Err(StoreError::ImageNotFound {
            spec: format!("{pool}/{name}"),
        }),
    }
}

/// What callers see of an image record.
pub(crate) fn info_of(pool: &str, r: ImageRecord, snap_count: u64) -> ImageInfo {
    ImageInfo {
        snap_count,
        id: r.id,
        pool: pool.to_string(),
        name: r.name,
        size: r.size,
        layout: r.layout,
        features: r.features,
        created: r.created,
        modified: r.modified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_format_is_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("meta.redb");
        drop(Meta::open(&path).unwrap());
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(STORE).unwrap().insert("format", "2").unwrap();
            tx.commit().unwrap();
        }
        let e = Meta::open(&path).err().expect("refused");
        assert!(
            matches!(
                e,
                StoreError::FormatTooNew {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.kind(), tern_types::ErrorKind::VersionMismatch);
        assert!(e.to_string().contains("upgrade tern"), "{e}");
    }

    #[test]
    fn records_ignore_unknown_fields_and_default_missing_ones() {
        let json = r#"{"id":"abc","pool_id":1,"name":"i","size":10,
            "layout":{"object_size":4096,"stripe_unit":4096,"stripe_count":1},
            "from_the_future":true}"#;
        let r: ImageRecord = decode("images", "k", json).unwrap();
        assert_eq!(r.features, Features(0));
        assert_eq!(r.created, 0);
    }
}

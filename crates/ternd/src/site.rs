//! A site's identity and its users: what `ternd` creates on first start
//! (site id, name, TLS key pair, master secret, `client.admin`) and reads on
//! every later one.
//!
//! Data directory:
//! ```text
//! meta.redb, objects/   the store (tern-store)
//! master.key            32 random bytes, 0600: derives every entity key
//! tls/cert.pem key.pem  the site's self-signed certificate (key 0600)
//! ternd.addr            the address ternd listens on, written at each start
//! ```

use crate::auth::{self, Need, Profile, UserRecord};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tern_client::config::write_private;
use tern_store::{KvTable, Store};
use tern_types::ErrorKind;
use tern_types::error::Error;

pub const ADMIN: &str = "client.admin";

pub use tern_types::time::now_secs;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!("{what} {}: {e}", path.display()),
    )
}

pub struct Tls {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: String,
}

/// One image's journal replay position: (primary mirror uuid, last tid
/// applied), its lock held while applying.
pub type ReplaySlot = Arc<parking_lot::Mutex<(String, u64)>>;

pub struct Site {
    pub store: Arc<Store>,
    pub data_dir: PathBuf,
    pub site_id: String,
    pub site_name: String,
    pub tls: Tls,
    pub started: Instant,
    master: Vec<u8>,
    users: RwLock<HashMap<String, UserRecord>>,
    /// Failed logins per source address.
    logins: auth::LoginLimiter,
    /// Journal replay per non-primary image id: (primary mirror uuid, last
    /// tid applied). Its lock serialises appliers, so an apply still
    /// running for a killed mirror daemon and its successor's never
    /// interleave, and no entry is applied again once passed (the image
    /// never steps back to an older state).
    pub replay: parking_lot::Mutex<HashMap<String, ReplaySlot>>,
    /// NBD I/O counters and latency histograms (for /metrics).
    pub io: crate::metrics::IoMetrics,
}

impl Site {
    /// Opens the site in `data_dir`, initialising it on first use.
    pub fn open_or_init(data_dir: &Path, site_name: &str) -> Result<Site, Error> {
        std::fs::create_dir_all(data_dir).map_err(|e| io_err("cannot create", data_dir, e))?;
        let store = Arc::new(Store::open(data_dir)?);
        let master_path = data_dir.join("master.key");
        let master = match std::fs::read(&master_path) {
            Ok(m) if m.len() == 32 => m,
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{} is not 32 bytes: restore it from backup",
                        master_path.display()
                    ),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let m: [u8; 32] = rand::random();
                write_private_bytes(&master_path, &m)?;
                m.to_vec()
            }
            Err(e) => return Err(io_err("cannot read", &master_path, e)),
        };
        let site_id = match store.kv_get(KvTable::Site, "site_id")? {
            Some(id) => id,
            None => {
                crate::mirror::valid_site_name(site_name)?;
                let id = uuid::Uuid::new_v4().to_string();
                store.kv_put(KvTable::Site, "site_name", site_name)?;
                store.kv_put(KvTable::Site, "created", &now_secs().to_string())?;
                // Written last: its presence means the site is initialised.
                store.kv_put(KvTable::Site, "site_id", &id)?;
                tracing::info!(site_id = %id, site_name, "initialised a new site");
                id
            }
        };
        let site_name = store
            .kv_get(KvTable::Site, "site_name")?
            .unwrap_or_default();
        let tls = load_or_make_tls(data_dir)?;
        let site = Site {
            store,
            data_dir: data_dir.to_path_buf(),
            site_id,
            site_name,
            tls,
            started: Instant::now(),
            master,
            users: RwLock::new(HashMap::new()),
            logins: auth::LoginLimiter::default(),
            replay: parking_lot::Mutex::new(HashMap::new()),
            io: crate::metrics::IoMetrics::default(),
        };
        site.reload_users()?;
        if !site.users.read().contains_key(ADMIN) {
            site.get_or_create_user(ADMIN, &auth::admin_caps())?;
        }
        Ok(site)
    }

    fn reload_users(&self) -> Result<(), Error> {
        let mut map = HashMap::new();
        for (k, v) in self.store.kv_list(KvTable::Users, "")? {
            let rec: UserRecord = serde_json::from_str(&v).map_err(|e| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("user record {k} is damaged: {e}"),
                )
            })?;
            map.insert(k, rec);
        }
        *self.users.write() = map;
        Ok(())
    }

    pub fn key_of(&self, rec: &UserRecord) -> String {
        auth::derive_key(
            &self.master,
            &rec.entity,
            rec.generation,
            &rec.nonce,
            rec.created,
        )
    }

    /// Checks a presented key from source address `from`; returns the
    /// entity's record. Failures are rate-limited per address (see
    /// [`auth::LoginLimiter`]).
    pub fn authenticate(
        &self,
        entity: Option<&str>,
        key: Option<&str>,
        from: Option<std::net::IpAddr>,
    ) -> Result<UserRecord, Error> {
        let (Some(entity), Some(key)) = (entity, key) else {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                "no credentials: the request carried no entity and key (check the keyring)",
            ));
        };
        // A caller with no address (not TCP) shares one record.
        let from = from.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let now = Instant::now();
        if let Err(wait) = self.logins.admit(from, now) {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                format!(
                    "too many failed logins from {from}: logins from it are refused for {:.1} s more; check the keyring, then retry",
                    wait.as_secs_f64()
                ),
            ));
        }
        let users = self.users.read();
        let rec = users
            .get(entity)
            .filter(|r| auth::same_hash(&r.key_sha256, &auth::key_hash(key)));
        match rec {
            Some(r) => Ok(r.clone()),
            None => {
                let lockout = self.logins.failed(from, now);
                tracing::warn!(entity = ?entity, %from, "failed login");
                // One message for both cases, so a caller cannot probe which entities exist.
                let mut msg = format!(
                    "authentication failed for {}: unknown entity or wrong key",
                    tern_types::escaped(entity)
                );
                if let Some(l) = lockout {
                    msg.push_str(&format!(
                        " (too many failed logins from {from}: further logins from it are refused for {:.1} s)",
                        l.as_secs_f64()
                    ));
                }
                Err(Error::new(ErrorKind::Unauthenticated, msg))
            }
        }
    }

    pub fn authorize(&self, who: &UserRecord, need: Need<'_>) -> Result<(), Error> {
        if who.allows(need) {
            Ok(())
        } else {
            Err(who.denial(need))
        }
    }

    /// Ceph's get-or-create: returns the existing entity if its caps match,
    /// refuses if they differ, creates it otherwise. The bool says "created".
    pub fn get_or_create_user(
        &self,
        entity: &str,
        caps: &BTreeMap<String, String>,
    ) -> Result<(UserRecord, bool), Error> {
        auth::validate_entity(entity)?;
        let (profile, pools) = auth::parse_caps(caps)?;
        if let Some(existing) = self.users.read().get(entity) {
            if &existing.caps != caps && !caps.is_empty() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "key for {entity} exists but its caps differ ({}): remove it first or ask with the same caps",
                        fmt_caps(&existing.caps)
                    ),
                ));
            }
            return Ok((existing.clone(), false));
        }
        if caps.is_empty() {
            return Err(Error::invalid(format!(
                "{entity} does not exist and no caps were given"
            )));
        }
        let created = now_secs();
        let mut rec = UserRecord {
            entity: entity.to_string(),
            generation: 1,
            created,
            key_sha256: String::new(),
            caps: caps.clone(),
            profile,
            pools,
            nonce: auth::new_nonce(),
        };
        rec.key_sha256 = auth::key_hash(&self.key_of(&rec));
        let json = serde_json::to_string(&rec).expect("serialisable");
        self.store.kv_put(KvTable::Users, entity, &json)?;
        self.users.write().insert(entity.to_string(), rec.clone());
        tracing::info!(entity, profile = profile.as_str(), "created user");
        Ok((rec, true))
    }

    /// Ceph's `auth caps`: replaces an entity's caps, keeping its key.
    pub fn set_user_caps(
        &self,
        entity: &str,
        caps: &BTreeMap<String, String>,
        caller: &str,
    ) -> Result<UserRecord, Error> {
        auth::validate_entity(entity)?;
        if caps.is_empty() {
            return Err(Error::invalid(format!(
                "no caps given for {entity}: name them as SERVICE 'CAP' pairs"
            )));
        }
        let (profile, pools) = auth::parse_caps(caps)?;
        let mut users = self.users.write();
        let mut rec = users.get(entity).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("entity {entity} does not exist: create it with `tern auth get-or-create`"),
            )
        })?;
        if entity == caller && profile != Profile::Admin {
            return Err(Error::invalid(format!(
                "refusing to take admin caps from {entity}: it is the entity making this call"
            )));
        }
        rec.caps = caps.clone();
        rec.profile = profile;
        rec.pools = pools;
        let json = serde_json::to_string(&rec).expect("serialisable");
        self.store.kv_put(KvTable::Users, entity, &json)?;
        users.insert(entity.to_string(), rec.clone());
        tracing::info!(entity, profile = profile.as_str(), "changed caps");
        Ok(rec)
    }

    pub fn get_user(&self, entity: &str) -> Result<UserRecord, Error> {
        self.users.read().get(entity).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("entity {entity} does not exist"),
            )
        })
    }

    pub fn list_users(&self) -> Vec<UserRecord> {
        let mut v: Vec<_> = self.users.read().values().cloned().collect();
        v.sort_by(|a, b| a.entity.cmp(&b.entity));
        v
    }

    pub fn remove_user(&self, entity: &str, caller: &str) -> Result<(), Error> {
        if entity == caller {
            return Err(Error::invalid(format!(
                "refusing to remove {entity}: it is the entity making this call"
            )));
        }
        self.get_user(entity)?;
        self.store.kv_delete(KvTable::Users, entity)?;
        self.users.write().remove(entity);
        tracing::info!(entity, "removed user");
        Ok(())
    }

    pub fn is_admin_profile(rec: &UserRecord) -> bool {
        rec.profile == Profile::Admin
    }
}

pub fn fmt_caps(caps: &BTreeMap<String, String>) -> String {
    caps.iter()
        .map(|(k, v)| format!("{k} '{v}'"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_private_bytes(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err("cannot create", path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("cannot write", path, e))
}

fn load_or_make_tls(data_dir: &Path) -> Result<Tls, Error> {
    let dir = data_dir.join("tls");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert_path.exists() {
        let mut params = rcgen::CertificateParams::new(vec![
            "tern-site".to_string(),
            "localhost".to_string(),
        ])
        .map_err(|e| Error::new(ErrorKind::Internal, format!("certificate parameters: {e}")))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tern-site");
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("key generation: {e}")))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("self-signing: {e}")))?;
        std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create", &dir, e))?;
        write_private(&key_path, &key.serialize_pem())
            .map_err(|e| io_err("cannot write", &key_path, e))?;
        write_private(&cert_path, &cert.pem())
            .map_err(|e| io_err("cannot write", &cert_path, e))?;
    }
    let cert_pem =
        std::fs::read_to_string(&cert_path).map_err(|e| io_err("cannot read", &cert_path, e))?;
    let key_pem =
        std::fs::read_to_string(&key_path).map_err(|e| io_err("cannot read", &key_path, e))?;
    let der = pem_to_der(&cert_pem).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            format!("{} holds no certificate", cert_path.display()),
        )
    })?;
    let fingerprint = tern_client::connect::fingerprint_of(&der);
    Ok(Tls {
        cert_pem,
        key_pem,
        fingerprint,
    })
}

fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

impl Site {
    /// The effective value of an option for `who` (set value or default).
    pub fn config_value(&self, who: &str, key: &str) -> Result<String, Error> {
        let opt = crate::options::find(key)?;
        for w in crate::options::lookup_chain(who) {
            if let Some(v) = self.store.kv_get(KvTable::Config, &format!("{w}\0{key}"))? {
                return Ok(v);
            }
        }
        Ok(opt.default.to_string())
    }

    /// A numeric option's effective value (0 if unreadable).
    pub fn config_f64(&self, who: &str, key: &str) -> f64 {
        self.config_value(who, key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The journal options for config section `who` (`global`, or
    /// `image.<id>` for one image's overrides on top of it).
    pub fn journal_options(&self, who: &str) -> tern_store::JournalOptions {
        let size = |k| self.config_f64(who, k) as u64;
        let durability = match self.config_value(who, "rbd_journal_durability").as_deref() {
            Ok("flush") => tern_store::JournalDurability::OnFlush,
            _ => tern_store::JournalDurability::Strict,
        };
        tern_store::JournalOptions {
            segment_size: size("rbd_journal_object_size")
                .max(tern_store::journal::MIN_SEGMENT_SIZE),
            max_size: size("rbd_journal_max_size").max(tern_store::journal::MIN_MAX_SIZE),
            durability,
            commit_age_us: (self.config_f64(who, "rbd_journal_commit_age") * 1e6) as u64,
            ..tern_store::JournalOptions::default()
        }
    }

    /// Hands the configured journal options to the store: the global ones
    /// and every image's overrides. Run at start and after config changes.
    pub fn apply_journal_config(&self) -> Result<(), Error> {
        self.store
            .set_journal_options(self.journal_options("global"));
        let mut ids = std::collections::BTreeSet::new();
        for (k, _) in self.store.kv_list(KvTable::Config, "image.")? {
            if let Some((who, _)) = k.split_once('\0') {
                ids.insert(who.to_string());
            }
        }
        for who in ids {
            if let Some(id) = who
                .strip_prefix("image.")
                .and_then(|i| tern_types::ImageId::parse(i).ok())
            {
                let o = self.journal_options(&who);
                self.store.set_image_journal_options(&id, Some(o));
            }
        }
        Ok(())
    }
}

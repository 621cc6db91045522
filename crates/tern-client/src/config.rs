//! The client side of a site's identity: a cluster config file (INI, like
//! ceph.conf) naming endpoints and the pinned TLS fingerprint, and keyring
//! files in Ceph's format.
//!
//! ```text
//! # site-a.conf
//! [global]
//! fsid = 5c2b…            site id
//! site_name = site-a
//! mon_host = 127.0.0.1:6789
//! tls_fingerprint = 3f9a…  SHA-256 of the site certificate (DER), hex
//! ```
//!
//! Lookup: `--conf FILE`, else `<conf dir>/<cluster>.conf`; the conf dir is
//! `$TERN_CONF_DIR`, else `~/.config/tern`, else `/etc/tern`.

use crate::ClientError;
use ini::Ini;
use std::path::{Path, PathBuf};
use tern_types::ErrorKind;

pub const DEFAULT_CLUSTER: &str = "tern";

/// Where config and keyring files live unless a path is given.
pub fn conf_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TERN_CONF_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join(".config/tern"),
        _ => PathBuf::from("/etc/tern"),
    }
}

/// How the client checks the site's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Accept exactly the certificate whose SHA-256 (hex) is given.
    Pinned(String),
    /// Plaintext: only for loopback labs started with `ternd --insecure`.
    Insecure,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub cluster: String,
    pub path: Option<PathBuf>,
    pub fsid: String,
    pub site_name: String,
    pub endpoints: Vec<String>,
    pub tls: TlsMode,
    pub keyring: Option<PathBuf>,
}

fn conf_err(path: &Path, what: impl std::fmt::Display) -> ClientError {
    ClientError::new(
        ErrorKind::InvalidArgument,
        format!("config {}: {what}", path.display()),
    )
}

impl ClusterConfig {
    /// Loads `conf` if given, else the named cluster's file from the conf dir.
    pub fn load(cluster: Option<&str>, conf: Option<&Path>) -> Result<ClusterConfig, ClientError> {
        let cluster = cluster
            .map(String::from)
            .or_else(|| std::env::var("TERN_CLUSTER").ok())
            .unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        let path = match conf {
            Some(p) => p.to_path_buf(),
            None => conf_dir().join(format!("{cluster}.conf")),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ClientError::new(
                ErrorKind::NotFound,
                format!(
                    "cannot read cluster config {}: {e}. Start a site with `ternd --data DIR \
                     --cluster {cluster}` (it writes this file), or pass --conf FILE",
                    path.display()
                ),
            )
        })?;
        let mut c = Self::parse(&text, &path)?;
        c.cluster = cluster;
        c.path = Some(path);
        Ok(c)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ClusterConfig, ClientError> {
        let ini = Ini::load_from_str(text).map_err(|e| conf_err(path, e))?;
        let g = ini
            .section(Some("global"))
            .ok_or_else(|| conf_err(path, "no [global] section"))?;
        let get = |k: &str| {
            g.get(k)
                .or_else(|| g.get(k.replace('_', " ")))
                .map(str::trim)
        };
        let endpoints: Vec<String> = get("mon_host")
            .ok_or_else(|| conf_err(path, "no mon_host"))?
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let tls = match (get("tls_fingerprint"), get("tls")) {
            (_, Some("off" | "false" | "insecure")) => TlsMode::Insecure,
            (Some(fp), _) => TlsMode::Pinned(normalize_fingerprint(fp)),
            (None, _) => return Err(conf_err(path, "no tls_fingerprint (and tls is not off)")),
        };
        Ok(ClusterConfig {
            cluster: DEFAULT_CLUSTER.into(),
            path: None,
            fsid: get("fsid").unwrap_or_default().to_string(),
            site_name: get("site_name").unwrap_or_default().to_string(),
            endpoints,
            tls,
            keyring: get("keyring").map(PathBuf::from),
        })
    }

    pub fn render(&self) -> String {
        let mut s = String::from("[global]\n");
        s += &format!("fsid = {}\n", self.fsid);
        s += &format!("site_name = {}\n", self.site_name);
        s += &format!("mon_host = {}\n", self.endpoints.join(","));
        match &self.tls {
            TlsMode::Pinned(fp) => s += &format!("tls_fingerprint = {fp}\n"),
            TlsMode::Insecure => s += "tls = off\n",
        }
        if let Some(k) = &self.keyring {
            s += &format!("keyring = {}\n", k.display());
        }
        s
    }

    /// The keyring file for `entity`: `--keyring`, the config's `keyring`,
    /// else `<dir of config>/<cluster>.<entity>.keyring`.
    pub fn keyring_path(&self, entity: &str) -> PathBuf {
        if let Some(k) = &self.keyring {
            return k.clone();
        }
        let dir = self
            .path
            .as_ref()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_else(conf_dir);
        dir.join(format!("{}.{entity}.keyring", self.cluster))
    }
}

/// Accepts `AB:CD:…`, `sha256:abcd…` or plain hex; returns lowercase hex.
pub fn normalize_fingerprint(fp: &str) -> String {
    let fp = fp.trim();
    let fp = fp
        .strip_prefix("sha256:")
        .or_else(|| fp.strip_prefix("SHA256:"))
        .unwrap_or(fp);
    fp.chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// A Ceph keyring: `[client.NAME]` sections with `key = …` and `caps X = "…"`.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    pub entries: Vec<KeyringEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyringEntry {
    pub entity: String,
    pub key: String,
    pub caps: Vec<(String, String)>,
}

impl Keyring {
    pub fn load(path: &Path) -> Result<Keyring, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::new(
                ErrorKind::Unauthenticated,
                format!("cannot read keyring {}: {e}", path.display()),
            )
        })?;
        Self::parse(&text).map_err(|e| conf_err(path, e.message))
    }

    pub fn parse(text: &str) -> Result<Keyring, ClientError> {
        let ini = Ini::load_from_str(text)
            .map_err(|e| ClientError::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let mut entries = Vec::new();
        for (sec, props) in ini.iter() {
            let Some(entity) = sec else { continue };
            let Some(key) = props.get("key") else {
                continue;
            };
            let caps = props
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("caps ")
                        .map(|svc| (svc.trim().to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            entries.push(KeyringEntry {
                entity: entity.to_string(),
                key: key.trim().to_string(),
                caps,
            });
        }
        Ok(Keyring { entries })
    }

    pub fn key_for(&self, entity: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.entity == entity)
            .map(|e| e.key.as_str())
    }

    /// The only key in the file, when the caller does not know the entity.
    pub fn single(&self) -> Option<&KeyringEntry> {
        if self.entries.len() == 1 {
            self.entries.first()
        } else {
            None
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for e in &self.entries {
            s += &format!("[{}]\n\tkey = {}\n", e.entity, e.key);
            for (svc, cap) in &e.caps {
                s += &format!("\tcaps {svc} = \"{cap}\"\n");
            }
        }
        s
    }
}

/// Writes a file readable only by its owner (keys, configs that name keys).
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyring_roundtrip() {
        let k = Keyring {
            entries: vec![KeyringEntry {
                entity: "client.admin".into(),
                key: "AQBxyz==".into(),
                caps: vec![("mon".into(), "allow *".into())],
            }],
        };
        let back = Keyring::parse(&k.render()).unwrap();
        assert_eq!(back.entries, k.entries);
    }

    #[test]
    fn config_roundtrip() {
        let c = ClusterConfig {
            cluster: "x".into(),
            path: None,
            fsid: "f".into(),
            site_name: "site-a".into(),
            endpoints: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            tls: TlsMode::Pinned("ab".into()),
            keyring: None,
        };
        let back = ClusterConfig::parse(&c.render(), Path::new("x")).unwrap();
        assert_eq!(back.endpoints, c.endpoints);
        assert_eq!(back.tls, c.tls);
        assert_eq!(normalize_fingerprint("AB:CD"), "abcd");
    }
}

//! The bootstrap token of `mirror pool peer bootstrap create|import`.

use super::valid_site_name;
use serde::{Deserialize, Serialize};
use tern_types::error::Error;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token {
    pub fsid: String,
    pub client_id: String,
    pub key: String,
    pub mon_host: String,
    #[serde(default)]
    pub site_name: String,
    #[serde(default)]
    pub tls_fingerprint: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub mirror_uuid: String,
}

impl Token {
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_string(self).expect("json"))
    }

    pub fn decode(s: &str) -> Result<Token, Error> {
        use base64::Engine;
        let bad = |why: &str| Error::invalid(format!("malformed bootstrap token: {why}"));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| bad("not base64"))?;
        let t: Token = serde_json::from_slice(&raw)
            .map_err(|e| bad(&format!("not the expected JSON ({e})")))?;
        tern_types::SiteId::parse(&t.fsid).map_err(|_| bad("fsid is not a site id"))?;
        if t.key.is_empty() || t.client_id.is_empty() {
            return Err(bad("no key or client_id"));
        }
        if t.tls_fingerprint.len() != 64
            || !t.tls_fingerprint.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(bad(
                "tls_fingerprint is missing or not a SHA-256 (a Ceph token cannot be used: tern pins certificates)",
            ));
        }
        if t.mon_host_list().is_empty() {
            return Err(bad("mon_host names no endpoint"));
        }
        if !t.site_name.is_empty() {
            valid_site_name(&t.site_name).map_err(|e| bad(&e.message))?;
        }
        crate::auth::validate_entity(&format!("client.{}", t.client_id))
            .map_err(|e| bad(&e.message))?;
        if !t.pool.is_empty() {
            tern_types::validate_name("pool", &t.pool).map_err(|e| bad(&e.message))?;
        }
        Ok(t)
    }

    /// Accepts ours (`h:p,h:p`) and Ceph's (`[v2:h:p/0,v1:h:p/0]`).
    pub fn mon_host_list(&self) -> Vec<String> {
        self.mon_host
            .trim_matches(|c| c == '[' || c == ']')
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .filter(|s| !s.starts_with("v1:"))
            .map(|s| {
                s.trim_start_matches("v2:")
                    .trim_end_matches("/0")
                    .to_string()
            })
            .collect()
    }
}

//! Bootstrap tokens (`mirror pool peer bootstrap create|import`): minting
//! one for this site, and importing one made on another site: proving it
//! against that site, storing the peer, and for rx-tx registering this
//! site there as its peer.

use crate::mirror::{self, Mirror, PeerDirection, PoolMirrorMode};
use crate::site::Site;
use crate::work::blocking;
use std::collections::BTreeMap;
use std::sync::Arc;
use tern_proto::convert::FromWire;
use tern_proto::v1 as pb;
use tern_store::KvTable;
use tern_types::ErrorKind;
use tern_types::api::MirrorPeer;
use tern_types::error::Error;

/// A token for `pool`, naming this site `site_name` if given (stored).
pub fn create(site: &Arc<Site>, pool: &str, site_name: &str) -> Result<String, Error> {
    let m = Mirror { site: site.clone() };
    let mut p = m.pool_enabled(pool)?;
    if !site_name.is_empty() && p.site_name != site_name {
        mirror::valid_site_name(site_name)?;
        p.site_name = site_name.to_string();
        m.save_pool(pool, &p)?;
    }
    let (user, _) = site.get_or_create_user(mirror::PEER_CLIENT, &peer_caps())?;
    Ok(mirror::Token {
        fsid: site.site_id.clone(),
        client_id: mirror::PEER_CLIENT.trim_start_matches("client.").into(),
        key: site.key_of(&user),
        mon_host: site_endpoints(site)?.join(","),
        site_name: p.site_name.clone(),
        tls_fingerprint: site.tls.fingerprint.clone(),
        pool: pool.to_string(),
        mirror_uuid: p.mirror_uuid.clone(),
    }
    .encode())
}

/// Imports a token made on another site; returns the stored peer.
pub async fn import(
    site: &Arc<Site>,
    r: pb::MirrorBootstrapImportRequest,
) -> Result<mirror::PeerRec, Error> {
    let direction: PeerDirection = FromWire::from_wire(r.direction)?;
    if !r.site_name.is_empty() {
        mirror::valid_site_name(&r.site_name)?;
    }
    let token = mirror::Token::decode(&r.token)?;
    let (m, pool) = (Mirror { site: site.clone() }, r.pool.clone());
    let mut local = blocking(move || m.pool_enabled(&pool)).await?;
    // Nothing is stored until the token is proven (below).
    let rename_local = !r.site_name.is_empty() && local.site_name != r.site_name;
    if rename_local {
        local.site_name = r.site_name.clone();
    }
    if !token.site_name.is_empty() && token.site_name == local.site_name {
        return Err(Error::invalid(format!(
            "the token names site '{}', which is this site's own name: import a token made on the other site, or give the sites different names",
            token.site_name
        )));
    }
    // Prove the token: reach the site it names, pinned to its certificate, with its key.
    let remote_pool = if r.remote_pool.is_empty() {
        token.pool.clone()
    } else {
        r.remote_pool.clone()
    };
    let remote_pool = if remote_pool.is_empty() {
        r.pool.clone()
    } else {
        remote_pool
    };
    let endpoints = token.mon_host_list();
    let tls = tern_client::config::TlsMode::Pinned(token.tls_fingerprint.to_ascii_lowercase());
    let entity = format!("client.{}", token.client_id);
    let remote = tern_client::SiteClient::connect_with(&endpoints[0], &tls, &entity, &token.key)?;
    let hello = remote.hello().await.map_err(|e| token_error(&token, e))?;
    if hello.site_id != token.fsid {
        return Err(Error::new(
            ErrorKind::Unauthenticated,
            format!(
                "the token says site {} but {} is site {}: the token was altered or is for another site",
                token.fsid, endpoints[0], hello.site_id
            ),
        ));
    }
    let rp = remote
        .mirror()
        .pool_info(&remote_pool, false)
        .await
        .map_err(|e| token_error(&token, e))?;
    if rp.mode == PoolMirrorMode::Disabled {
        return Err(Error::invalid(format!(
            "mirroring is not enabled on pool '{remote_pool}' at site {}: run `tern mirror pool enable {remote_pool} image` there first",
            tern_types::escaped(&hello.site_name)
        )));
    }
    // The site's own word on its name, against what the token says.
    let remote_name = if rp.site_name.is_empty() {
        hello.site_name.clone()
    } else {
        rp.site_name.clone()
    };
    if !token.site_name.is_empty() && token.site_name != remote_name {
        return Err(Error::new(
            ErrorKind::Unauthenticated,
            format!(
                "the token says site name '{}' but the site at {} calls itself '{}': the token was altered; nothing was stored",
                token.site_name,
                endpoints[0],
                tern_types::escaped(&remote_name)
            ),
        ));
    }
    mirror::valid_site_name(&remote_name)?;
    if rename_local {
        let (m, pool, name) = (
            Mirror { site: site.clone() },
            r.pool.clone(),
            local.site_name.clone(),
        );
        blocking(move || {
            let mut p = m.pool_enabled(&pool)?;
            p.site_name = name;
            m.save_pool(&pool, &p)
        })
        .await?;
    }
    let peer = mirror::PeerRec {
        uuid: String::new(),
        site_name: remote_name,
        client_name: entity.clone(),
        direction,
        mirror_uuid: rp.mirror_uuid.clone(),
        fsid: token.fsid.clone(),
        mon_host: endpoints.clone(),
        tls_fingerprint: token.tls_fingerprint.to_ascii_lowercase(),
        remote_pool: remote_pool.clone(),
        key: token.key.clone(),
    };
    let (m, pool) = (Mirror { site: site.clone() }, r.pool.clone());
    let stored = blocking(move || m.peer_upsert(&pool, peer)).await?;
    if direction == PeerDirection::RxTx {
        // The reverse direction: a key minted here for the other site's daemon.
        let site = site.clone();
        let me = blocking(move || {
            let (user, _) = site.get_or_create_user(mirror::PEER_CLIENT, &peer_caps())?;
            Ok::<_, Error>(MirrorPeer {
                uuid: String::new(),
                site_name: local.site_name.clone(),
                client_name: mirror::PEER_CLIENT.into(),
                direction: PeerDirection::RxTx,
                mirror_uuid: local.mirror_uuid.clone(),
                fsid: site.site_id.clone(),
                mon_host: site_endpoints(&site)?,
                tls_fingerprint: site.tls.fingerprint.clone(),
                remote_pool: r.pool.clone(),
                key: site.key_of(&user),
            })
        })
        .await?;
        remote
            .mirror_daemon()
            .peer_register(&remote_pool, me)
            .await
            .map_err(|e| token_error(&token, e))?;
    }
    Ok(stored)
}

fn peer_caps() -> BTreeMap<String, String> {
    [("mon", "profile rbd-mirror-peer"), ("osd", "profile rbd")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn site_endpoints(site: &Site) -> Result<Vec<String>, Error> {
    Ok(site
        .store
        .kv_get(KvTable::Site, "endpoints")?
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_default())
}

/// Turns a failure to use a token into advice.
fn token_error(t: &mirror::Token, e: tern_client::ClientError) -> Error {
    let msg = match e.kind {
        ErrorKind::Unauthenticated if e.message.contains("fingerprint") => format!(
            "the site at {} does not have the certificate the token pins: the token was altered or the site re-initialised ({})",
            t.mon_host, e.message
        ),
        ErrorKind::Unauthenticated => format!(
            "site {} refused the token's key for client.{}: the token was altered, or its peer user was removed \
             (create a new token there with `tern mirror pool peer bootstrap create`)",
            t.site_name, t.client_id
        ),
        ErrorKind::Unavailable => format!(
            "cannot reach the token's site at {}: {}",
            t.mon_host, e.message
        ),
        _ => e.message.clone(),
    };
    Error::new(e.kind, msg)
}

//! The client files ternd leaves beside itself, so `tern --cluster NAME`
//! works at once on the site's machine.

use crate::Options;
use crate::site::{self, Site};
use tern_client::config::{ClusterConfig, Keyring, KeyringEntry, TlsMode, write_private};
use tern_types::ErrorKind;
use tern_types::error::Error;

/// Writes `<conf dir>/<cluster>.conf` and the admin keyring, so `tern
/// --cluster NAME` works at once on this machine.
pub fn write(site: &Site, opts: &Options, endpoint: &str) -> Result<(), Error> {
    let conf = ClusterConfig {
        cluster: opts.cluster.clone(),
        path: None,
        fsid: site.site_id.clone(),
        site_name: site.site_name.clone(),
        endpoints: vec![endpoint.to_string()],
        tls: if opts.insecure {
            TlsMode::Insecure
        } else {
            TlsMode::Pinned(site.tls.fingerprint.clone())
        },
        keyring: None,
    };
    let admin = site.get_user(site::ADMIN)?;
    let ring = Keyring {
        entries: vec![KeyringEntry {
            entity: admin.entity.clone(),
            key: site.key_of(&admin),
            caps: admin
                .caps
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
        }],
    };
    let conf_path = opts.conf_dir.join(format!("{}.conf", opts.cluster));
    let ring_path = opts
        .conf_dir
        .join(format!("{}.{}.keyring", opts.cluster, site::ADMIN));
    let werr = |p: &std::path::Path, e: std::io::Error| {
        let message = format!("cannot write {}: {e}", p.display());
        Error::with_source(ErrorKind::Internal, message, e)
    };
    write_private(&conf_path, &conf.render()).map_err(|e| werr(&conf_path, e))?;
    write_private(&ring_path, &ring.render()).map_err(|e| werr(&ring_path, e))?;
    tracing::info!(conf = %conf_path.display(), keyring = %ring_path.display(), "client config written");
    Ok(())
}

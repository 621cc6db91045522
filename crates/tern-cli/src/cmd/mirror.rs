//! `tern mirror …`: rbd's mirroring words, with Ceph-shaped JSON so
//! existing scripts (`jq '.summary.health'`, `.images[].state`) work.

use super::image_spec;
use crate::cli::{
    MirrorBootstrapCmd, MirrorCmd, MirrorImageCmd, MirrorPeerCmd, MirrorPoolCmd, MirrorSnapshotCmd,
    ScheduleCmd, ScheduleLevel,
};
use crate::ctx::{Ctx, Result, invalid};
use serde_json::{Value, json};
use tern_client::{ClientError, SiteClient};
use tern_types::ImageSpec;
use tern_types::api::{BootstrapImport, MirrorImageStatus, MirrorPeer, MirrorSiteStatus, Schedule};
use tern_types::mirror::{ImageMirrorMode, PoolMirrorMode};
use tern_types::time::datetime;

pub async fn run(ctx: &Ctx, cmd: MirrorCmd) -> Result<()> {
    let c = ctx.connect().await?;
    match cmd {
        MirrorCmd::Pool(p) => pool(ctx, &c, p).await,
        MirrorCmd::Image(i) => image(ctx, &c, i).await,
        MirrorCmd::Snapshot(MirrorSnapshotCmd::Schedule(s)) => schedule(ctx, &c, s).await,
    }
}

fn level(l: &ScheduleLevel) -> Result<(String, String)> {
    let pool = l.pool.clone().unwrap_or_else(|| "rbd".into());
    match &l.image {
        Some(i) if i.contains('/') => {
            let s = image_spec(i)?;
            Ok((s.pool, s.image))
        }
        Some(i) => Ok((pool, i.clone())),
        None => Ok((pool, String::new())),
    }
}

async fn schedule(ctx: &Ctx, c: &SiteClient, cmd: ScheduleCmd) -> Result<()> {
    match cmd {
        ScheduleCmd::Add {
            level: l,
            interval,
            start_time,
            start_time_opt,
        } => {
            let (pool, image) = level(&l)?;
            let start_time = start_time_opt.or(start_time).unwrap_or_default();
            c.mirror()
                .schedule_add(Schedule {
                    pool,
                    image,
                    interval,
                    start_time,
                })
                .await?;
        }
        ScheduleCmd::Rm {
            level: l,
            interval,
            start_time,
            start_time_opt,
        } => {
            let (pool, image) = level(&l)?;
            let start_time = start_time_opt.or(start_time).unwrap_or_default();
            c.mirror()
                .schedule_remove(Schedule {
                    pool,
                    image,
                    interval: interval.unwrap_or_default(),
                    start_time,
                })
                .await?;
        }
        ScheduleCmd::Ls {
            level: l,
            recursive,
        } => {
            let (pool, image) = level(&l)?;
            let pool = if recursive && l.pool.is_none() && l.image.is_none() {
                String::new()
            } else {
                pool
            };
            let schedules = c
                .mirror()
                .schedule_list(
                    Schedule {
                        pool,
                        image,
                        ..Default::default()
                    },
                    recursive,
                )
                .await?;
            if ctx.json() {
                ctx.print_json(&json!(
                    schedules
                        .iter()
                        .map(
                            |s| json!({"pool": s.pool, "namespace": "", "image": s.image,
                    "interval": s.interval, "start_time": s.start_time})
                        )
                        .collect::<Vec<_>>()
                ));
            } else if recursive {
                let rows: Vec<Vec<String>> = schedules
                    .iter()
                    .map(|s| {
                        let when = if s.start_time.is_empty() {
                            format!("every {}", s.interval)
                        } else {
                            format!("every {} starting at {}", s.interval, s.start_time)
                        };
                        vec![
                            s.pool.clone(),
                            "-".into(),
                            if s.image.is_empty() {
                                "-".into()
                            } else {
                                s.image.clone()
                            },
                            when,
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::out::table(&["POOL", "NAMESPACE", "IMAGE", "SCHEDULE"], &rows)
                );
            } else {
                for s in &schedules {
                    if s.start_time.is_empty() {
                        println!("every {}", s.interval);
                    } else {
                        println!("every {} starting at {}", s.interval, s.start_time);
                    }
                }
            }
        }
        ScheduleCmd::Status { level: l } => {
            let (pool, image) = level(&l)?;
            let scheduled = c
                .mirror()
                .schedule_status(Schedule {
                    pool,
                    image,
                    ..Default::default()
                })
                .await?;
            if ctx.json() {
                ctx.print_json(
                    &json!({"scheduled": scheduled.iter().map(|s| json!({"image": s.image,
                    "schedule_time": datetime(s.time)})).collect::<Vec<_>>()}),
                );
            } else {
                let rows: Vec<Vec<String>> = scheduled
                    .iter()
                    .map(|s| vec![datetime(s.time), s.image.clone()])
                    .collect();
                print!("{}", crate::out::table(&["SCHEDULE TIME", "IMAGE"], &rows));
            }
        }
    }
    Ok(())
}

fn peer_json(p: &MirrorPeer) -> Value {
    json!({"uuid": p.uuid, "direction": p.direction, "site_name": p.site_name,
           "mirror_uuid": p.mirror_uuid, "client_name": p.client_name,
           "fsid": p.fsid, "mon_host": p.mon_host.join(","), "remote_pool": p.remote_pool})
}

fn site_json(s: &MirrorSiteStatus) -> Value {
    json!({
        "site_name": s.site_name,
        "mirror_uuids": s.mirror_uuids,
        "state": s.state_label(),
        "description": s.description,
        "last_update": datetime(s.last_update),
        // Typed fields beside Ceph's, so nobody has to parse descriptions.
        "reason": s.reason,
        "up": s.up,
        "lag_seconds": s.lag_seconds,
        "last_sync": if s.last_sync > 0 { json!(datetime(s.last_sync)) } else { Value::Null },
        "progress": s.progress,
        "bytes_synced": s.bytes_synced,
    })
}

fn image_status_json(st: &MirrorImageStatus) -> Value {
    let local = &st.local;
    json!({
        "name": st.name,
        "global_id": st.global_id,
        "state": local.state_label(),
        "description": local.description,
        "daemon_service": {"service_id": st.daemon_id, "instance_id": st.daemon_id, "daemon_id": "rbd-mirror", "hostname": hostname()},
        "last_update": datetime(local.last_update),
        "reason": local.reason,
        "lag_seconds": local.lag_seconds,
        "progress": local.progress,
        "bytes_synced": local.bytes_synced,
        "last_sync": if local.last_sync > 0 { json!(datetime(local.last_sync)) } else { Value::Null },
        "peer_sites": st.peer_sites.iter().map(site_json).collect::<Vec<_>>(),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn print_image_status(st: &MirrorImageStatus) {
    let local = &st.local;
    println!("{}:", st.name);
    println!("  global_id:   {}", st.global_id);
    println!("  state:       {}", local.state_label());
    println!("  description: {}", local.description);
    if !st.daemon_id.is_empty() {
        println!("  service:     {} on {}", st.daemon_id, hostname());
    }
    println!("  last_update: {}", datetime(local.last_update));
    if !st.peer_sites.is_empty() {
        println!("  peer_sites:");
        for p in &st.peer_sites {
            println!("    name: {}", p.site_name);
            println!("    state: {}", p.state_label());
            println!("    description: {}", p.description);
            println!("    last_update: {}", datetime(p.last_update));
        }
    }
}

async fn pool(ctx: &Ctx, c: &SiteClient, cmd: MirrorPoolCmd) -> Result<()> {
    match cmd {
        MirrorPoolCmd::Enable {
            pool,
            mode,
            site_name,
        } => {
            let mode = PoolMirrorMode::enabling(&mode)?;
            c.mirror()
                .pool_enable(&pool, mode, &site_name.unwrap_or_default())
                .await?;
        }
        MirrorPoolCmd::Disable { pool } => {
            c.mirror().pool_disable(&pool).await?;
        }
        MirrorPoolCmd::Info { pool, all } => {
            let i = c.mirror().pool_info(&pool, false).await?;
            if ctx.json() {
                let mut v = json!({"mode": i.mode, "site_name": i.site_name,
                    "peers": i.peers.iter().map(peer_json).collect::<Vec<_>>()});
                if all {
                    v["mirror_uuid"] = json!(i.mirror_uuid);
                }
                ctx.print_json(&v);
            } else {
                println!("Mode: {}", i.mode);
                println!("Site Name: {}", i.site_name);
                if all {
                    println!("Mirror UUID: {}", i.mirror_uuid);
                }
                println!();
                if i.peers.is_empty() {
                    println!("Peer Sites: none");
                } else {
                    println!("Peer Sites: ");
                    for p in &i.peers {
                        println!();
                        println!("UUID: {}", p.uuid);
                        println!("Name: {}", p.site_name);
                        println!("Mirror UUID: {}", p.mirror_uuid);
                        println!("Direction: {}", p.direction);
                        println!("Client: {}", p.client_name);
                        println!("Mon Host: {}", p.mon_host.join(","));
                    }
                }
            }
        }
        MirrorPoolCmd::Status { pool, verbose } => {
            let s = c.mirror().pool_status(&pool, verbose).await?;
            if ctx.json() {
                let mut v = json!({"summary": {"health": s.health, "daemon_health": s.daemon_health,
                    "image_health": s.image_health, "states": s.states}});
                // Images always: scripts written for Ceph read `.images[]` without --verbose.
                v["images"] = json!(s.images.iter().map(image_status_json).collect::<Vec<_>>());
                if verbose {
                    v["daemons"] = json!(s.daemons.iter().map(|d| json!({
                        "service_id": d.service_id, "instance_id": d.instance_id, "client_id": d.client_id,
                        "hostname": d.hostname, "ceph_version": d.version, "tern_version": d.version,
                        "leader": true, "health": d.health})).collect::<Vec<_>>());
                }
                ctx.print_json(&v);
            } else {
                println!("health: {}", s.health);
                println!("daemon health: {}", s.daemon_health);
                println!("image health: {}", s.image_health);
                let total: u64 = s.states.values().sum();
                println!("images: {total} total");
                let mut states: Vec<_> = s.states.iter().collect();
                states.sort();
                for (k, n) in states {
                    println!("    {n} {k}");
                }
                if verbose {
                    println!();
                    println!("DAEMONS");
                    for d in &s.daemons {
                        println!("service {}:", d.service_id);
                        println!("  instance_id: {}", d.instance_id);
                        println!("  client_id: {}", d.client_id);
                        println!("  hostname: {}", d.hostname);
                        println!("  version: {}", d.version);
                        println!("  leader: true");
                        println!("  health: {}", d.health);
                    }
                    println!();
                    println!("IMAGES");
                    for i in &s.images {
                        print_image_status(i);
                        println!();
                    }
                }
            }
        }
        MirrorPoolCmd::Peer(p) => peer(ctx, c, p).await?,
        MirrorPoolCmd::Promote { pool, force } => {
            let list = c.mirror().image_list(&pool).await?;
            let mut failed = 0;
            for i in list.images.iter().filter(|i| !i.primary) {
                let r = c
                    .mirror()
                    .image_promote(&ImageSpec::new(&pool, &i.name), force)
                    .await;
                report(ctx, &pool, &i.name, "promoted", r.map(|_| ()), &mut failed);
            }
            if failed > 0 {
                return Err(tern_client::ClientError::new(
                    tern_types::ErrorKind::Busy,
                    format!("{failed} image(s) not promoted"),
                ));
            }
        }
        MirrorPoolCmd::Demote { pool } => {
            let list = c.mirror().image_list(&pool).await?;
            let mut failed = 0;
            for i in list.images.iter().filter(|i| i.primary) {
                let r = c
                    .mirror()
                    .image_demote(&ImageSpec::new(&pool, &i.name))
                    .await;
                report(ctx, &pool, &i.name, "demoted", r.map(|_| ()), &mut failed);
            }
            if failed > 0 {
                return Err(tern_client::ClientError::new(
                    tern_types::ErrorKind::Busy,
                    format!("{failed} image(s) not demoted"),
                ));
            }
        }
    }
    Ok(())
}

fn report(ctx: &Ctx, pool: &str, name: &str, what: &str, r: Result<()>, failed: &mut u32) {
    match r {
        Ok(()) if !ctx.json() => eprintln!("{pool}/{name}: {what}"),
        Ok(()) => {}
        Err(e) => {
            *failed += 1;
            eprintln!("{pool}/{name}: {}", e.message);
        }
    }
}

async fn peer(ctx: &Ctx, c: &SiteClient, cmd: MirrorPeerCmd) -> Result<()> {
    match cmd {
        MirrorPeerCmd::Add {
            pool,
            remote,
            remote_mon_host,
            remote_key_file,
            remote_fingerprint,
            remote_fsid,
            direction,
            remote_pool,
        } => {
            let (client, site) = remote.split_once('@').ok_or_else(|| {
                invalid("the remote is client.NAME@SITE (e.g. client.rbd-mirror-peer@site-a)")
            })?;
            let key = match remote_key_file {
                Some(f) => std::fs::read_to_string(&f)
                    .map_err(|e| invalid(format!("cannot read {}: {e}", f.display())))?
                    .trim()
                    .to_string(),
                None => return Err(invalid("--remote-key-file is required")),
            };
            let peer = MirrorPeer {
                uuid: String::new(),
                site_name: site.into(),
                client_name: client.into(),
                direction: direction.parse()?,
                mirror_uuid: String::new(),
                fsid: remote_fsid,
                mon_host: remote_mon_host.split(',').map(String::from).collect(),
                tls_fingerprint: tern_client::config::normalize_fingerprint(&remote_fingerprint),
                remote_pool: remote_pool.unwrap_or_else(|| pool.clone()),
                key,
            };
            let p = c.mirror().peer_add(&pool, peer).await?;
            println!("{}", p.uuid);
        }
        MirrorPeerCmd::Remove { pool, uuid } => {
            c.mirror().peer_remove(&pool, &uuid).await?;
        }
        MirrorPeerCmd::Set {
            pool,
            uuid,
            key,
            value,
        } => {
            c.mirror().peer_set(&pool, &uuid, &key, &value).await?;
        }
        MirrorPeerCmd::Bootstrap(MirrorBootstrapCmd::Create { pool, site_name }) => {
            let token = c
                .mirror()
                .bootstrap_create(&pool, &site_name.unwrap_or_default())
                .await?;
            println!("{token}");
        }
        MirrorPeerCmd::Bootstrap(MirrorBootstrapCmd::Import {
            pool,
            path,
            site_name,
            direction,
            remote_pool,
        }) => {
            let token = if path == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| invalid(format!("reading the token from stdin: {e}")))?;
                s
            } else {
                std::fs::read_to_string(&path)
                    .map_err(|e| invalid(format!("cannot read token file '{path}': {e}")))?
            };
            let p = c
                .mirror()
                .bootstrap_import(BootstrapImport {
                    pool,
                    site_name: site_name.unwrap_or_default(),
                    direction: direction.parse()?,
                    token: token.trim().to_string(),
                    remote_pool: remote_pool.unwrap_or_default(),
                })
                .await?;
            if ctx.json() {
                ctx.print_json(&peer_json(&p));
            }
        }
    }
    Ok(())
}

async fn image(ctx: &Ctx, c: &SiteClient, cmd: MirrorImageCmd) -> Result<()> {
    match cmd {
        MirrorImageCmd::Enable { spec, mode } => {
            let s = image_spec(&spec)?;
            let mode: ImageMirrorMode = mode.parse()?;
            c.mirror().image_enable(&s.head(), mode).await?;
            if !ctx.json() {
                eprintln!("Mirroring enabled");
            }
        }
        MirrorImageCmd::Disable { spec, force } => {
            let s = image_spec(&spec)?;
            c.mirror().image_disable(&s.head(), force).await?;
            if !ctx.json() {
                eprintln!("Mirroring disabled");
            }
        }
        MirrorImageCmd::Promote { spec, force } => {
            let s = image_spec(&spec)?;
            c.mirror().image_promote(&s.head(), force).await?;
            if !ctx.json() {
                eprintln!("Image promoted to primary");
            }
        }
        MirrorImageCmd::Demote { spec } => {
            let s = image_spec(&spec)?;
            c.mirror().image_demote(&s.head()).await?;
            if !ctx.json() {
                eprintln!("Image demoted to non-primary");
            }
        }
        MirrorImageCmd::Resync { spec, full } => {
            let s = image_spec(&spec)?;
            c.mirror().image_resync(&s.head(), full).await?;
            if !ctx.json() {
                eprintln!(
                    "Flagged image for {} resync from primary",
                    if full { "a full" } else { "a" }
                );
            }
        }
        MirrorImageCmd::Snapshot { spec } => {
            let s = image_spec(&spec)?;
            let snap = c.mirror().image_snapshot(&s.head()).await?;
            if ctx.json() {
                ctx.print_json(&json!({"snap_id": snap.id, "snap_name": snap.name}));
            } else {
                println!("Snapshot ID: {}", snap.id);
            }
        }
        MirrorImageCmd::Verify { spec, chunk } => verify(ctx, c, &spec, &chunk).await?,
        MirrorImageCmd::Status { spec } => {
            let s = image_spec(&spec)?;
            let st = c.mirror().image_status(&s.head()).await?;
            if ctx.json() {
                ctx.print_json(&image_status_json(&st));
            } else {
                print_image_status(&st);
            }
        }
    }
    Ok(())
}

async fn verify(ctx: &Ctx, c: &SiteClient, spec: &str, chunk: &str) -> Result<()> {
    use tern_types::ErrorKind;
    let s = image_spec(spec)?;
    let chunk = tern_types::size::parse_size_default_unit(chunk, 1)?;
    let local = c.mirror().image_info(&s.head()).await?;
    if local.primary {
        return Err(invalid(format!(
            "{spec} is primary here: run verify on a site that holds a non-primary copy"
        )));
    }
    let copy = local
        .mirror_snaps
        .iter()
        .filter(|x| x.is_complete_mirror(|m| !m.is_primary()))
        .max_by_key(|x| x.id)
        .ok_or_else(|| {
            ClientError::new(
                ErrorKind::Busy,
                format!("{spec} has no complete copy yet: wait for the first sync"),
            )
        })?;
    let pool = c.mirror().pool_info(&s.pool, true).await?;
    let peer = pool
        .peers
        .iter()
        .find(|p| p.mirror_uuid == copy.primary_mirror_uuid)
        .ok_or_else(|| {
            ClientError::new(
                ErrorKind::NotFound,
                "the site this copy came from is no longer a peer of the pool",
            )
        })?;
    let ep = peer.mon_host.first().cloned().unwrap_or_default();
    let tls = tern_client::config::TlsMode::Pinned(peer.tls_fingerprint.clone());
    let remote = SiteClient::connect_with(&ep, &tls, &peer.client_name, &peer.key)?;
    let rlist = remote.mirror().image_list(&peer.remote_pool).await?;
    let rimg = rlist
        .images
        .iter()
        .find(|i| i.global_id == local.global_id)
        .ok_or_else(|| {
            ClientError::new(
                ErrorKind::NotFound,
                format!("{} has no image {}", peer.site_name, local.global_id),
            )
        })?;
    let rsnap = rimg.mirror_snaps.iter().find(|x| x.id == copy.primary_snap_id).ok_or_else(|| {
        ClientError::new(
            ErrorKind::Busy,
            format!("{} no longer has the snapshot this copy was synced to: verify after the next sync", peer.site_name),
        )
    })?;
    let at = |pool: &str, name: &str, snap: &str| ImageSpec {
        snap: Some(snap.to_string()),
        ..ImageSpec::new(pool, name)
    };
    let (mine_at, theirs_at) = (
        at(&s.pool, &s.image, &copy.name),
        at(&peer.remote_pool, &rimg.name, &rsnap.name),
    );
    let (mine, theirs) = tokio::join!(
        c.image().checksum(&mine_at, chunk),
        remote.image().checksum(&theirs_at, chunk)
    );
    let (mine, theirs) = (mine?, theirs?);
    let mut bad: Vec<(u64, u64)> = Vec::new();
    if mine.size != theirs.size {
        bad.push((mine.size.min(theirs.size), mine.size.abs_diff(theirs.size)));
    }
    for (i, (a, b)) in mine.hashes.iter().zip(theirs.hashes.iter()).enumerate() {
        if a != b {
            let off = i as u64 * mine.chunk_size;
            bad.push((off, mine.chunk_size.min(mine.size - off)));
        }
    }
    if ctx.json() {
        ctx.print_json(&json!({"image": spec, "equal": bad.is_empty(), "compared_extents": mine.hashes.len(),
            "chunk_size": mine.chunk_size, "snapshot": copy.name, "primary_site": peer.site_name,
            "differing": bad.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>()}));
    } else if bad.is_empty() {
        println!(
            "{spec}: equal to {} at mirror snapshot {} ({} extents of {} bytes compared)",
            peer.site_name,
            copy.primary_snap_id,
            mine.hashes.len(),
            mine.chunk_size
        );
    } else {
        println!(
            "{spec}: {} extent(s) differ from {} at mirror snapshot {}:",
            bad.len(),
            peer.site_name,
            copy.primary_snap_id
        );
        for (o, l) in &bad {
            println!("  offset {o} length {l}");
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ClientError::new(
            ErrorKind::Corrupt,
            format!(
                "{spec}: the copy differs from the primary in {} extent(s); \
                 `tern mirror image resync --full {spec}` copies the image again",
                bad.len()
            ),
        ))
    }
}

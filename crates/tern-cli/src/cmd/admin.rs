use crate::cli::{AuthCmd, ConfigCmd};
use crate::ctx::{Ctx, Result, invalid};
use crate::out::table;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use tern_client::config::{Keyring, KeyringEntry, write_private};
use tern_types::api::AuthEntity;
use tern_types::format_size;

pub async fn status(ctx: &Ctx) -> Result<()> {
    let c = ctx.connect().await?;
    let s = c.site().status().await?;
    // Mirroring: every mirrored pool's health and the daemons seen.
    let mut mirroring = Vec::new();
    for p in c.pool().list().await? {
        if let Ok(m) = c.mirror().pool_status(&p.name, false).await {
            mirroring.push((p.name, m));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if ctx.json() {
        ctx.print_json(&json!({
            "fsid": s.site_id,
            "site_name": s.site_name,
            "health": {"status": s.health, "checks": s.health_checks},
            "version": s.version,
            "uptime_secs": s.uptime_secs,
            "endpoints": s.endpoints,
            "nbd_endpoint": s.nbd_endpoint,
            "pools": s.pools,
            "images": s.images,
            "usage": {"provisioned_bytes": s.provisioned_bytes, "used_bytes": s.used_bytes,
                      "avail_bytes": s.avail_bytes, "total_bytes": s.total_bytes},
            "mirroring": mirroring.iter().map(|(pool, m)| json!({
                "pool": pool,
                "health": m.health,
                "daemon_health": m.daemon_health,
                "image_health": m.image_health,
                "states": m.states,
                "daemons": m.daemons.iter().map(|d| json!({
                    "service_id": d.service_id,
                    "instance_id": d.instance_id,
                    "client_id": d.client_id,
                    "hostname": d.hostname,
                    "up": d.up,
                    "last_heartbeat": d.last_heartbeat,
                    "heartbeat_age_secs": now.saturating_sub(d.last_heartbeat),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!("  site:");
    println!("    id:     {}", s.site_id);
    println!("    name:   {}", s.site_name);
    println!("    health: {}", s.health);
    for chk in &s.health_checks {
        println!("            {chk}");
    }
    println!();
    println!("  services:");
    println!(
        "    ternd: up {}s, version {}, listening on {}",
        s.uptime_secs,
        s.version,
        s.endpoints.join(", ")
    );
    if !s.nbd_endpoint.is_empty() {
        println!("    nbd:   nbd://{}/POOL/IMAGE[@SNAP]", s.nbd_endpoint);
    }
    let mut seen = std::collections::BTreeMap::new();
    for (_, m) in &mirroring {
        for d in &m.daemons {
            seen.insert(d.service_id.clone(), d.clone());
        }
    }
    if mirroring.is_empty() {
        println!("    rbd-mirror: no pool is mirrored");
    } else if seen.is_empty() {
        println!("    rbd-mirror: no daemon has reported");
    } else {
        let up = seen.values().filter(|d| d.up).count();
        println!("    rbd-mirror: {} daemon(s), {up} up", seen.len());
        for d in seen.values() {
            println!(
                "      {} ({} on {}): {}, heartbeat {} s ago",
                d.service_id,
                d.client_id,
                d.hostname,
                if d.up { "up" } else { "DOWN" },
                now.saturating_sub(d.last_heartbeat)
            );
        }
    }
    println!();
    println!("  data:");
    println!("    pools:  {} pools, {} images", s.pools, s.images);
    println!(
        "    usage:  {} used, {} provisioned, {} / {} avail",
        format_size(s.used_bytes),
        format_size(s.provisioned_bytes),
        format_size(s.avail_bytes),
        format_size(s.total_bytes)
    );
    if !mirroring.is_empty() {
        println!();
        println!("  mirroring:");
        for (pool, m) in &mirroring {
            let mut states: Vec<_> = m.states.iter().collect();
            states.sort();
            let states: Vec<String> = states.iter().map(|(k, v)| format!("{v} {k}")).collect();
            println!(
                "    {pool}: health {} (daemons {}, images {}){}{}",
                m.health,
                m.daemon_health,
                m.image_health,
                if states.is_empty() { "" } else { "; " },
                states.join(", ")
            );
        }
    }
    Ok(())
}

pub async fn config(ctx: &Ctx, cmd: ConfigCmd) -> Result<()> {
    if let ConfigCmd::Help { key } = &cmd {
        // Help is local knowledge of the options; ask the site so it is never stale.
        let c = ctx.connect().await?;
        let all = c
            .config()
            .get("global", key.as_deref().unwrap_or_default())
            .await?;
        for e in all {
            println!("{} (default/effective: {})", e.key, e.value);
        }
        return Ok(());
    }
    if let ConfigCmd::Image(c) = cmd {
        return super::journal::config_image(ctx, c).await;
    }
    let c = ctx.connect().await?;
    match cmd {
        ConfigCmd::Set { who, key, value } => {
            c.config().set(&who, &key, &value).await?;
        }
        ConfigCmd::Get { who, key } => {
            let single = key.is_some();
            let r = c
                .config()
                .get(&who, key.as_deref().unwrap_or_default())
                .await?;
            if ctx.json() {
                if single {
                    ctx.print_json(&json!(
                        r.first().map(|e| e.value.clone()).unwrap_or_default()
                    ));
                } else {
                    let m: HashMap<_, _> =
                        r.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
                    ctx.print_json(&json!(m));
                }
            } else if single {
                println!("{}", r.first().map(|e| e.value.as_str()).unwrap_or(""));
            } else {
                let rows: Vec<Vec<String>> = r
                    .iter()
                    .map(|e| vec![e.key.clone(), e.value.clone()])
                    .collect();
                print!("{}", table(&["OPTION", "VALUE"], &rows));
            }
        }
        ConfigCmd::Rm { who, key } => {
            c.config().remove(&who, &key).await?;
        }
        ConfigCmd::Dump => {
            let r = c.config().dump().await?;
            if ctx.json() {
                let v: Vec<_> = r
                    .iter()
                    .map(|e| json!({"section": e.who, "name": e.key, "value": e.value}))
                    .collect();
                ctx.print_json(&json!(v));
            } else {
                let rows: Vec<Vec<String>> = r
                    .iter()
                    .map(|e| vec![e.who.clone(), e.key.clone(), e.value.clone()])
                    .collect();
                print!("{}", table(&["WHO", "OPTION", "VALUE"], &rows));
            }
        }
        ConfigCmd::Help { .. } | ConfigCmd::Image(_) => unreachable!(),
    }
    Ok(())
}

fn entity_keyring(e: &AuthEntity) -> Keyring {
    let mut caps: Vec<(String, String)> =
        e.caps.iter().map(|(a, b)| (a.clone(), b.clone())).collect();
    caps.sort();
    Keyring {
        entries: vec![KeyringEntry {
            entity: e.entity.clone(),
            key: e.key.clone(),
            caps,
        }],
    }
}

fn emit_entity(ctx: &Ctx, e: &AuthEntity, out: Option<&std::path::Path>) -> Result<()> {
    let ring = entity_keyring(e);
    if let Some(path) = out {
        write_private(path, &ring.render())
            .map_err(|err| invalid(format!("cannot write keyring {}: {err}", path.display())))?;
        return Ok(());
    }
    if ctx.json() {
        ctx.print_json(
            &json!([{"entity": e.entity, "key": e.key, "caps": e.caps, "profile": e.profile}]),
        );
    } else {
        print!("{}", ring.render());
    }
    Ok(())
}

/// Ceph's cap arguments: SERVICE 'CAP' pairs.
fn cap_pairs(caps: Vec<String>) -> Result<BTreeMap<String, String>> {
    if !caps.len().is_multiple_of(2) {
        return Err(invalid(
            "caps come in pairs: SERVICE 'CAP' (e.g. mon 'profile rbd' osd 'profile rbd')",
        ));
    }
    Ok(caps
        .chunks(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect())
}

pub async fn auth(ctx: &Ctx, cmd: AuthCmd) -> Result<()> {
    let c = ctx.connect().await?;
    match cmd {
        AuthCmd::GetOrCreate { entity, caps, out } => {
            let caps = cap_pairs(caps)?;
            let e = c.auth().get_or_create(&entity, caps).await?;
            emit_entity(ctx, &e, out.as_deref())?;
        }
        AuthCmd::Get { entity, out } => {
            let e = c.auth().get(&entity).await?;
            emit_entity(ctx, &e, out.as_deref())?;
        }
        AuthCmd::PrintKey { entity } => {
            let e = c.auth().get(&entity).await?;
            println!("{}", e.key);
        }
        AuthCmd::Ls => {
            let l = c.auth().list().await?;
            if ctx.json() {
                let v: Vec<_> = l
                    .iter()
                    .map(|e| json!({"entity": e.entity, "caps": e.caps, "profile": e.profile}))
                    .collect();
                ctx.print_json(&json!({"auth_dump": v}));
            } else {
                for e in &l {
                    println!("{}", e.entity);
                    let mut caps: Vec<_> = e.caps.iter().collect();
                    caps.sort();
                    for (svc, cap) in caps {
                        println!("\tcaps: [{svc}] {cap}");
                    }
                }
            }
        }
        AuthCmd::Caps { entity, caps } => {
            let caps = cap_pairs(caps)?;
            let e = c.auth().caps(&entity, caps).await?;
            if ctx.json() {
                ctx.print_json(&json!({"entity": e.entity, "caps": e.caps, "profile": e.profile}));
            } else {
                eprintln!("updated caps for {}", e.entity);
            }
        }
        AuthCmd::Rm { entity } => {
            c.auth().remove(&entity).await?;
            if !ctx.json() {
                eprintln!("removed {entity}");
            }
        }
    }
    Ok(())
}

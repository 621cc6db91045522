use super::{image_spec, snap_spec};
use crate::cli::{LockCmd, SnapCmd};
use crate::ctx::{Ctx, Result, invalid};
use crate::out::table;
use serde_json::json;
use tern_types::api::SnapInfo;
use tern_types::format_size;
use tern_types::mirror::SnapNamespaceType;
use tern_types::time::ctime;

pub async fn run(ctx: &Ctx, cmd: SnapCmd) -> Result<()> {
    let c = ctx.connect().await?;
    match cmd {
        SnapCmd::Create { spec } => {
            let (s, snap) = snap_spec(&spec)?;
            let info = c.snap().create(&s.head(), &snap).await?;
            if ctx.json() {
                ctx.print_json(&json!({"id": info.id, "name": info.name, "size": info.size}));
            } else {
                eprintln!("Creating snap: 100% complete...done.");
            }
        }
        SnapCmd::Ls { spec, all } => {
            let s = image_spec(&spec)?;
            let snaps = c.snap().list(&s.head(), all).await?;
            let ns = |x: &SnapInfo| {
                if x.namespace == SnapNamespaceType::Mirror {
                    format!(
                        "mirror ({} peer_uuids:[{}]{})",
                        x.mirror_state_word(),
                        x.mirror_peer_uuids.join(", "),
                        if x.mirror_complete { "" } else { " incomplete" }
                    )
                } else {
                    "user".to_string()
                }
            };
            if ctx.json() {
                let v: Vec<_> = snaps
                    .iter()
                    .map(|x| {
                        let mut j = json!({"id": x.id, "name": x.name, "size": x.size,
                            "protected": if x.protected { "true" } else { "false" }, "timestamp": ctime(x.created)});
                        if all {
                            j["namespace"] = json!({"type": x.namespace, "state": x.mirror_state_word(),
                                "complete": x.mirror_complete, "mirror_peer_uuids": x.mirror_peer_uuids,
                                "primary_snap_id": x.primary_snap_id});
                        }
                        j
                    })
                    .collect();
                ctx.print_json(&json!(v));
            } else if !snaps.is_empty() {
                let mut headers = vec!["SNAPID", "NAME", "SIZE", "PROTECTED", "TIMESTAMP"];
                if all {
                    headers.push("NAMESPACE");
                }
                let rows: Vec<Vec<String>> = snaps
                    .iter()
                    .map(|x| {
                        let mut r = vec![
                            x.id.to_string(),
                            x.name.clone(),
                            format_size(x.size),
                            if x.protected {
                                "yes".into()
                            } else {
                                String::new()
                            },
                            ctime(x.created),
                        ];
                        if all {
                            r.push(ns(x));
                        }
                        r
                    })
                    .collect();
                print!("{}", table(&headers, &rows));
            }
        }
        SnapCmd::Rm { spec } => {
            let (s, snap) = snap_spec(&spec)?;
            c.snap().remove(&s.head(), &snap).await?;
            if !ctx.json() {
                eprintln!("Removing snap: 100% complete...done.");
            }
        }
        SnapCmd::Rename { src, dst } => {
            let (s, snap) = snap_spec(&src)?;
            let new = match dst.split_once('@') {
                Some((img, n)) => {
                    let d = image_spec(img)?;
                    if d.pool != s.pool || d.image != s.image {
                        return Err(invalid("a snapshot can only be renamed within its image"));
                    }
                    n.to_string()
                }
                None => dst.clone(),
            };
            c.snap().rename(&s.head(), &snap, &new).await?;
        }
        SnapCmd::Rollback { spec } => {
            let (s, snap) = snap_spec(&spec)?;
            c.snap().rollback(&s.head(), &snap).await?;
            if !ctx.json() {
                eprintln!("Rolling back to snapshot: 100% complete...done.");
            }
        }
        SnapCmd::Protect { spec } => {
            let (s, snap) = snap_spec(&spec)?;
            c.snap().protect(&s.head(), &snap, true).await?;
        }
        SnapCmd::Unprotect { spec } => {
            let (s, snap) = snap_spec(&spec)?;
            c.snap().protect(&s.head(), &snap, false).await?;
        }
        SnapCmd::Purge { spec } => {
            let s = image_spec(&spec)?;
            let removed = c.snap().purge(&s.head()).await?;
            if ctx.json() {
                ctx.print_json(&json!({"removed": removed}));
            } else {
                eprintln!("Removing all snapshots: 100% complete...done. ({removed} removed)");
            }
        }
    }
    Ok(())
}

pub async fn lock(ctx: &Ctx, cmd: LockCmd) -> Result<()> {
    let c = ctx.connect().await?;
    match cmd {
        LockCmd::Ls { spec } => {
            let s = image_spec(&spec)?;
            let locks = c.lock().list(&s.head()).await?;
            if ctx.json() {
                let v: Vec<_> = locks
                    .iter()
                    .map(|l| json!({"id": l.id, "locker": l.locker, "address": l.address,
                        "age_secs": l.age_secs, "lease_ms": l.lease_ms, "expires_in_ms": l.expires_in_ms}))
                    .collect();
                ctx.print_json(&json!(v));
            } else if !locks.is_empty() {
                println!("There is {} exclusive lock on this image.", locks.len());
                let rows: Vec<Vec<String>> = locks
                    .iter()
                    .map(|l| {
                        vec![
                            l.locker.clone(),
                            l.id.clone(),
                            if l.address.is_empty() {
                                "-".into()
                            } else {
                                l.address.clone()
                            },
                            format!("{}s", l.age_secs),
                            format!("{:.1}s", l.expires_in_ms as f64 / 1000.0),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["Locker", "ID", "Address", "Age", "Lease left"], &rows)
                );
            }
        }
        LockCmd::Rm {
            spec,
            lock_id,
            locker,
        } => {
            let s = image_spec(&spec)?;
            c.lock().break_lock(&s.head(), &lock_id, &locker).await?;
        }
    }
    Ok(())
}

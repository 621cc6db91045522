//! `tern feature`, `tern journal` and `tern config image`.

use super::image_spec;
use crate::cli::{ConfigImageCmd, FeatureCmd, JournalCmd};
use crate::ctx::{Ctx, Result};
use crate::out::table;
use futures::StreamExt;
use serde_json::json;
use std::io::Write;
use tern_client::ClientError;
use tern_store::journal::{JournalEntry, JournalOp};
use tern_types::ImageSpec;
use tern_types::api::JournalClientInfo;
use tern_types::error::ErrorKind;
use tern_types::format_size;

pub async fn feature(ctx: &Ctx, cmd: FeatureCmd) -> Result<()> {
    let (spec, enable, features) = match cmd {
        FeatureCmd::Enable { spec, features } => (spec, true, features),
        FeatureCmd::Disable { spec, features } => (spec, false, features),
    };
    let s = image_spec(&spec)?;
    let c = ctx.connect().await?;
    let (en, dis) = if enable {
        (features, vec![])
    } else {
        (vec![], features)
    };
    let info = c.image().features(&s.head(), en, dis).await?;
    if ctx.json() {
        ctx.print_json(&json!({"features": info.feature_names}));
    }
    Ok(())
}

pub async fn config_image(ctx: &Ctx, cmd: ConfigImageCmd) -> Result<()> {
    let who = |spec: &str| -> Result<String> {
        let s = image_spec(spec)?;
        Ok(format!("image:{}/{}", s.pool, s.image))
    };
    let c = ctx.connect().await?;
    match cmd {
        ConfigImageCmd::Set { spec, key, value } => {
            c.config().set(&who(&spec)?, &key, &value).await?;
        }
        ConfigImageCmd::Rm { spec, key } => {
            c.config().remove(&who(&spec)?, &key).await?;
        }
        ConfigImageCmd::Get { spec, key } => {
            let r = c.config().get(&who(&spec)?, &key).await?;
            let v = r.first().map(|e| e.value.clone()).unwrap_or_default();
            if ctx.json() {
                ctx.print_json(&json!(v));
            } else {
                println!("{v}");
            }
        }
        ConfigImageCmd::Ls { spec } => {
            let r = c.config().get(&who(&spec)?, "").await?;
            let rbd: Vec<_> = r.iter().filter(|e| e.key.starts_with("rbd_")).collect();
            if ctx.json() {
                let v: Vec<_> = rbd
                    .iter()
                    .map(|e| json!({"name": e.key, "value": e.value}))
                    .collect();
                ctx.print_json(&json!(v));
            } else {
                let rows: Vec<Vec<String>> = rbd
                    .iter()
                    .map(|e| vec![e.key.clone(), e.value.clone()])
                    .collect();
                print!("{}", table(&["Name", "Value"], &rows));
            }
        }
    }
    Ok(())
}

fn client_json(c: &JournalClientInfo) -> serde_json::Value {
    json!({
        "id": c.id,
        "commit_tid": c.commit_tid,
        "entries_behind": c.entries_behind,
        "state": if c.disconnected { "disconnected" } else { "connected" },
    })
}

fn op_json(e: &JournalEntry) -> serde_json::Value {
    let mut v = json!({"tid": e.tid, "timestamp_us": e.timestamp_us, "op": e.op.name()});
    let m = v.as_object_mut().expect("object");
    match &e.op {
        JournalOp::Write { offset, data } => {
            m.insert("offset".into(), json!(offset));
            m.insert("length".into(), json!(data.len()));
        }
        JournalOp::Discard { offset, len } | JournalOp::WriteZeroes { offset, len } => {
            m.insert("offset".into(), json!(offset));
            m.insert("length".into(), json!(len));
        }
        JournalOp::Resize { size } => {
            m.insert("size".into(), json!(size));
        }
        JournalOp::SnapCreate { id, name, .. } => {
            m.insert("snap_id".into(), json!(id));
            m.insert("snap_name".into(), json!(name));
        }
        JournalOp::SnapRemove { id } | JournalOp::SnapRollback { id } => {
            m.insert("snap_id".into(), json!(id));
        }
        JournalOp::Flush => {}
        JournalOp::Marker { kind, payload } => {
            m.insert("kind".into(), json!(kind));
            m.insert(
                "payload".into(),
                json!(String::from_utf8_lossy(payload).into_owned()),
            );
        }
    }
    v
}

pub async fn run(ctx: &Ctx, cmd: JournalCmd) -> Result<()> {
    let c = ctx.connect().await?;
    match cmd {
        JournalCmd::Info { spec } => {
            let s = image_spec(&spec)?;
            let i = c.journal().info(&s.head()).await?;
            if ctx.json() {
                let segs: Vec<_> = i
                    .segments
                    .iter()
                    .map(|g| json!({"segment": g.segno, "first_tid": g.first_tid, "entries": g.entries, "bytes": g.bytes}))
                    .collect();
                ctx.print_json(&json!({
                    "image_id": i.image_id,
                    "bytes": i.bytes,
                    "segments": segs,
                    "first_tid": i.first_tid,
                    "last_tid": i.last_tid,
                    "durable_tid": i.durable_tid,
                    "applied_tid": i.applied_tid,
                    "object_size": i.segment_size,
                    "max_size": i.max_size,
                    "splay_width": i.splay_width,
                    "durability": i.durability.as_str(),
                    "commit_age": i.commit_age,
                    "syncs": i.syncs,
                    "clients": i.clients.iter().map(client_json).collect::<Vec<_>>(),
                }));
            } else {
                println!("rbd journal '{}':", i.image_id);
                println!("\theader_oid: journal.{}", i.image_id);
                println!("\tobject_oid_prefix: journal_data.{}.", i.image_id);
                println!(
                    "\torder: {} ({})",
                    63 - i.segment_size.max(1).leading_zeros(),
                    format_size(i.segment_size)
                );
                println!("\tsplay_width: {}", i.splay_width);
                println!("\tdurability: {}", i.durability);
                println!(
                    "\tsize: {} in {} segments (max {})",
                    format_size(i.bytes),
                    i.segments.len(),
                    format_size(i.max_size)
                );
                println!(
                    "\ttids: first {} last {} durable {} applied {}",
                    i.first_tid, i.last_tid, i.durable_tid, i.applied_tid
                );
            }
        }
        JournalCmd::Status { spec } => {
            let s = image_spec(&spec)?;
            let i = c.journal().info(&s.head()).await?;
            if ctx.json() {
                ctx.print_json(&json!({
                    "minimum_set": i.segments.first().map(|g| g.segno).unwrap_or(0),
                    "active_set": i.segments.last().map(|g| g.segno).unwrap_or(0),
                    "last_tid": i.last_tid,
                    "durable_tid": i.durable_tid,
                    "registered_clients": i.clients.iter().map(client_json).collect::<Vec<_>>(),
                }));
            } else {
                println!(
                    "minimum_set: {}",
                    i.segments.first().map(|g| g.segno).unwrap_or(0)
                );
                println!(
                    "active_set: {}",
                    i.segments.last().map(|g| g.segno).unwrap_or(0)
                );
                println!("last_tid: {}  durable_tid: {}", i.last_tid, i.durable_tid);
                println!("registered clients:");
                for cl in &i.clients {
                    println!(
                        "\t[id={}, commit_tid={}, entries_behind={}, state={}]",
                        cl.id,
                        cl.commit_tid,
                        cl.entries_behind,
                        if cl.disconnected {
                            "disconnected"
                        } else {
                            "connected"
                        }
                    );
                }
            }
        }
        JournalCmd::Inspect { spec, verbose } => {
            let s = image_spec(&spec)?;
            let r = c.journal().inspect(&s.head()).await?;
            let entries = if verbose {
                let mut v = Vec::new();
                read_entries(&c, &s.head(), None, |e| {
                    v.push(op_json(&e));
                    Ok(())
                })
                .await?;
                Some(v)
            } else {
                None
            };
            if ctx.json() {
                let mut out = json!({
                    "segments": r.segments, "entries": r.entries, "bytes": r.bytes,
                    "first_tid": r.first_tid, "last_tid": r.last_tid,
                    "counts": r.counts, "errors": r.errors,
                });
                if let Some(v) = entries {
                    out["entry_list"] = json!(v);
                }
                ctx.print_json(&out);
            } else {
                if let Some(v) = &entries {
                    for e in v {
                        println!("{e}");
                    }
                }
                println!(
                    "Summary: {} segments, {} entries ({}), tids {}..{}",
                    r.segments,
                    r.entries,
                    format_size(r.bytes),
                    r.first_tid,
                    r.last_tid
                );
                for (op, n) in &r.counts {
                    println!("\t{op}: {n}");
                }
                if r.errors.is_empty() {
                    println!("No errors detected");
                } else {
                    for e in &r.errors {
                        println!("error: {e}");
                    }
                }
            }
            if !r.errors.is_empty() {
                return Err(ClientError::new(
                    ErrorKind::Corrupt,
                    format!("journal of {spec} has {} problem(s)", r.errors.len()),
                ));
            }
        }
        JournalCmd::Export {
            spec,
            path,
            from_tid,
        } => {
            let s = image_spec(&spec)?;
            let mut out: Box<dyn Write> = if path == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&path).map_err(|e| {
                        ClientError::new(ErrorKind::InvalidArgument, format!("{path}: {e}"))
                    })?,
                ))
            };
            let json = ctx.json();
            let mut n = 0u64;
            read_entries(&c, &s.head(), from_tid, |e| {
                if json {
                    writeln!(out, "{}", op_json(&e))?;
                } else {
                    out.write_all(&e.encode())?;
                }
                n += 1;
                Ok(())
            })
            .await?;
            out.flush()
                .map_err(|e| ClientError::new(ErrorKind::Internal, format!("{path}: {e}")))?;
            if path != "-" {
                eprintln!("Exported {n} journal entries to {path}");
            }
        }
    }
    Ok(())
}

/// Reads every durable entry from `from` (default: the oldest held) and
/// hands each, crc-checked, to `f`.
async fn read_entries(
    c: &tern_client::SiteClient,
    image: &ImageSpec,
    from: Option<u64>,
    mut f: impl FnMut(JournalEntry) -> std::io::Result<()>,
) -> Result<()> {
    let mut stream = c
        .journal()
        .read(image, from.unwrap_or(0), false, 0, "")
        .await?;
    while let Some(chunk) = stream.next().await.transpose()? {
        let mut b = &chunk.entries[..];
        while !b.is_empty() {
            let (e, used) = JournalEntry::decode(b).map_err(|e| {
                ClientError::new(ErrorKind::Corrupt, format!("journal stream: {e}"))
            })?;
            f(e).map_err(|e| ClientError::new(ErrorKind::Internal, format!("writing: {e}")))?;
            b = &b[used..];
        }
    }
    Ok(())
}

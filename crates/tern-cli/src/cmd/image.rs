use super::image_spec;
use crate::cli::{CreateArgs, LayoutArgs};
use crate::ctx::{Ctx, Result, invalid};
use crate::out::table;
use serde_json::json;
use tern_types::api::{ImageCreate, ImageInfo};
use tern_types::size::{parse_size, parse_size_default_unit};
use tern_types::time::ctime;
use tern_types::{format_size, validate_name};

/// Fills the layout and feature fields of a create request.
pub fn apply_layout(req: &mut ImageCreate, l: &LayoutArgs) -> Result<()> {
    if let Some(os) = &l.object_size {
        req.object_size = parse_size_default_unit(os, 1)?;
    }
    if let Some(order) = l.order {
        if !(12..=30).contains(&order) {
            return Err(invalid(format!("order {order} must be between 12 and 30")));
        }
        req.object_size = 1 << order;
    }
    if let Some(su) = &l.stripe_unit {
        req.stripe_unit = parse_size_default_unit(su, 1)?;
    }
    req.stripe_count = l.stripe_count.unwrap_or(0);
    if l.stripe_count == Some(0) {
        return Err(invalid("stripe count must be at least 1"));
    }
    if !l.features.is_empty() {
        let f = tern_types::Features::parse_list(&l.features)?;
        f.validate()?;
        req.features = l.features.clone();
    }
    Ok(())
}

pub fn image_json(i: &ImageInfo) -> serde_json::Value {
    let mut v = json!({
        "name": i.name,
        "id": i.id,
        "size": i.size,
        "objects": i.objects,
        "order": i.object_size.trailing_zeros(),
        "object_size": i.object_size,
        "snapshot_count": i.snapshot_count,
        "block_name_prefix": format!("rbd_data.{}", i.id),
        "format": 2,
        "features": i.feature_names,
        "op_features": [],
        "flags": [],
        "create_timestamp": ctime(i.created),
        "modify_timestamp": ctime(i.modified),
    });
    if i.stripe_unit != i.object_size || i.stripe_count != 1 {
        v["stripe_unit"] = json!(i.stripe_unit);
        v["stripe_count"] = json!(i.stripe_count);
    }
    v
}

pub async fn create(ctx: &Ctx, a: CreateArgs) -> Result<()> {
    let spec = image_spec(&a.spec)?;
    let size = parse_size(&a.size)?;
    if size == 0 {
        return Err(invalid(
            "image size must be greater than 0 (e.g. --size 10G)",
        ));
    }
    let mut req = ImageCreate {
        pool: spec.pool,
        image: spec.image,
        size,
        ..Default::default()
    };
    apply_layout(&mut req, &a.layout)?;
    let c = ctx.connect().await?;
    let info = c.image().create(req).await?;
    if ctx.json() {
        ctx.print_json(&image_json(&info));
    }
    Ok(())
}

pub async fn ls(ctx: &Ctx, pool: String, long: bool) -> Result<()> {
    validate_name("pool", &pool)?;
    let c = ctx.connect().await?;
    let images = c.image().list(&pool).await?;
    match (ctx.json(), long) {
        (true, false) => ctx.print_json(&json!(images.iter().map(|i| &i.name).collect::<Vec<_>>())),
        (true, true) => ctx.print_json(&json!(
            images
                .iter()
                .map(|i| json!({"image": i.name, "id": i.id, "size": i.size, "format": 2}))
                .collect::<Vec<_>>()
        )),
        (false, false) => images.iter().for_each(|i| println!("{}", i.name)),
        (false, true) => {
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        format_size(i.size),
                        String::new(),
                        "2".into(),
                        String::new(),
                        String::new(),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                print!(
                    "{}",
                    table(&["NAME", "SIZE", "PARENT", "FMT", "PROT", "LOCK"], &rows)
                );
            }
        }
    }
    Ok(())
}

pub async fn info(ctx: &Ctx, spec: &str) -> Result<()> {
    let spec = tern_types::ImageSpec::parse(spec)?;
    let c = ctx.connect().await?;
    let i = c.image().info(&spec).await?;
    // Mirroring, as rbd info shows it (plus how it became primary).
    let m = if i.snap.is_empty() {
        c.mirror().image_info(&spec.head()).await.ok()
    } else {
        None
    };
    if ctx.json() {
        let mut v = image_json(&i);
        if !i.snap.is_empty() {
            v["protected"] = serde_json::json!(i.protected);
            v["snap_id"] = serde_json::json!(i.snap_id);
        }
        if let Some(m) = &m {
            v["mirroring"] = serde_json::json!({
                "state": m.state,
                "mode": m.mode,
                "global_id": m.global_id,
                "primary": m.primary,
                "promotion_epoch": m.epoch,
                "resync_requested": m.resync_requested,
                "last_resync": m.last_resync,
                "promoted_from": (!m.fork_mirror_uuid.is_empty()).then(|| serde_json::json!({
                    "mirror_uuid": m.fork_mirror_uuid,
                    "forced": m.fork_forced,
                    "journal_tid": m.fork_journal_tid,
                    "snap_id": m.fork_snap_id,
                    "data_as_of_us": m.fork_data_as_of_us,
                    "at": m.fork_at,
                })),
            });
            v["last_resync"] = serde_json::json!(m.last_resync);
        }
        ctx.print_json(&v);
        return Ok(());
    }
    println!("rbd image '{}':", i.name);
    println!("\tsize {} in {} objects", format_size(i.size), i.objects);
    println!(
        "\torder {} ({} objects)",
        i.object_size.trailing_zeros(),
        format_size(i.object_size)
    );
    println!("\tsnapshot_count: {}", i.snapshot_count);
    println!("\tid: {}", i.id);
    println!("\tblock_name_prefix: rbd_data.{}", i.id);
    println!("\tformat: 2");
    println!("\tfeatures: {}", i.feature_names.join(", "));
    println!("\top_features: ");
    println!("\tflags: ");
    if i.stripe_unit != i.object_size || i.stripe_count != 1 {
        println!("\tstripe unit: {}", format_size(i.stripe_unit));
        println!("\tstripe count: {}", i.stripe_count);
    }
    if !i.snap.is_empty() {
        println!("\tprotected: {}", i.protected);
    }
    println!("\tcreate_timestamp: {}", ctime(i.created));
    println!("\tmodify_timestamp: {}", ctime(i.modified));
    println!("\tused: {}", format_size(i.used_bytes));
    if let Some(m) = m {
        println!("\tmirroring state: {}", m.state);
        println!("\tmirroring mode: {}", m.mode);
        println!("\tmirroring global id: {}", m.global_id);
        println!("\tmirroring primary: {}", m.primary);
        println!("\tmirroring promotion epoch: {}", m.epoch);
        if m.resync_requested {
            println!("\tmirroring resync: requested");
        }
        if !m.last_resync.is_empty() {
            println!("\tmirroring last resync: {}", m.last_resync);
        }
        if m.primary && !m.fork_mirror_uuid.is_empty() {
            println!(
                "\tmirroring promoted: {}{} from mirror uuid {}{}",
                ctime(m.fork_at),
                if m.fork_forced { " (forced)" } else { "" },
                m.fork_mirror_uuid,
                if m.fork_journal_tid > 0 {
                    format!(", holding its journal to entry {}", m.fork_journal_tid)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

pub async fn resize(ctx: &Ctx, spec: &str, size: &str, allow_shrink: bool) -> Result<()> {
    let spec = image_spec(spec)?;
    let size = parse_size(size)?;
    if size == 0 {
        return Err(invalid("image size must be greater than 0"));
    }
    let c = ctx.connect().await?;
    let info = c.image().resize(&spec.head(), size, allow_shrink).await?;
    if ctx.json() {
        ctx.print_json(&image_json(&info));
    } else {
        eprintln!("Resizing image: 100% complete...done.");
    }
    Ok(())
}

pub async fn rename(ctx: &Ctx, src: &str, dst: &str) -> Result<()> {
    let s = image_spec(src)?;
    // rbd accepts a bare destination name meaning "same pool".
    let d = if dst.contains('/') {
        image_spec(dst)?
    } else {
        tern_types::ImageSpec::new(&s.pool, dst)
    };
    validate_name("image", &d.image)?;
    if d.pool != s.pool {
        return Err(invalid(format!(
            "cannot rename across pools ('{}' to '{}')",
            s.pool, d.pool
        )));
    }
    let c = ctx.connect().await?;
    c.image().rename(&s.head(), &d.image).await?;
    Ok(())
}

pub async fn rm(ctx: &Ctx, spec: &str, force: bool) -> Result<()> {
    let spec = image_spec(spec)?;
    let c = ctx.connect().await?;
    c.image().remove(&spec.head(), force).await?;
    if !ctx.json() {
        eprintln!("Removing image: 100% complete...done.");
    }
    Ok(())
}

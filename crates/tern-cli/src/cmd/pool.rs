use crate::cli::PoolCmd;
use crate::ctx::{Ctx, Result, invalid};
use crate::out::table;
use serde_json::json;
use tern_types::{format_size, validate_name};

pub async fn run(ctx: &Ctx, cmd: PoolCmd) -> Result<()> {
    let c = ctx.connect().await?;
    match cmd {
        PoolCmd::Create { pool, .. } => {
            validate_name("pool", &pool)?;
            c.pool().create(&pool).await?;
            if ctx.json() {
                ctx.print_json(&json!({"pool": pool, "created": true}));
            } else {
                eprintln!("pool '{pool}' created");
            }
        }
        PoolCmd::Init { pool, application } => {
            c.pool().init(&pool, &application).await?;
        }
        PoolCmd::Ls { detail } => {
            let pools = c.pool().list().await?;
            if ctx.json() {
                let v: Vec<_> = pools
                    .iter()
                    .map(|p| json!({"pool_id": p.id, "pool_name": p.name, "application": p.application, "created": p.created}))
                    .collect();
                ctx.print_json(&json!(v));
            } else if detail {
                for p in &pools {
                    let app = if p.application.is_empty() {
                        "-"
                    } else {
                        &p.application
                    };
                    println!(
                        "pool {} '{}' application {app} created {}",
                        p.id,
                        p.name,
                        tern_types::time::ctime(p.created)
                    );
                }
            } else {
                for p in &pools {
                    println!("{}", p.name);
                }
            }
        }
        PoolCmd::Stats { pool } => {
            let pools = match pool {
                Some(p) => vec![p],
                None => c.pool().list().await?.into_iter().map(|p| p.name).collect(),
            };
            let mut all = Vec::new();
            for p in pools {
                all.push(c.pool().stats(&p).await?);
            }
            if ctx.json() {
                let v: Vec<_> = all
                    .iter()
                    .map(|s| {
                        json!({"pool_name": s.pool, "images": s.images, "provisioned_bytes": s.provisioned_bytes,
                            "used_bytes": s.used_bytes, "objects": s.objects,
                            "client_io": {"read_ops": s.read_ops, "write_ops": s.write_ops,
                                "read_bytes": s.read_bytes, "write_bytes": s.write_bytes}})
                    })
                    .collect();
                ctx.print_json(&json!(v));
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|s| {
                        vec![
                            s.pool.clone(),
                            s.images.to_string(),
                            format_size(s.provisioned_bytes),
                            format_size(s.used_bytes),
                            s.objects.to_string(),
                            format!("{} rd, {} wr", s.read_ops, s.write_ops),
                            format!(
                                "{} rd, {} wr",
                                format_size(s.read_bytes),
                                format_size(s.write_bytes)
                            ),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "POOL",
                            "IMAGES",
                            "PROVISIONED",
                            "USED",
                            "OBJECTS",
                            "CLIENT OPS",
                            "CLIENT BYTES"
                        ],
                        &rows
                    )
                );
            }
        }
        PoolCmd::Rm {
            pool,
            pool_again,
            yes: _,
            force,
        } => {
            if let Some(again) = &pool_again
                && again != &pool
            {
                return Err(invalid(format!(
                    "pool names differ ('{pool}' vs '{again}'): repeat the same name to confirm"
                )));
            }
            c.pool().remove(&pool, force).await?;
            if !ctx.json() {
                eprintln!("pool '{pool}' removed");
            }
        }
    }
    Ok(())
}

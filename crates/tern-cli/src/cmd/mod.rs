mod admin;
mod bench;
mod device;
mod diff;
mod dr;
mod image;
mod io;
mod journal;
mod lab;
mod mirror;
mod pool;
mod snap;

use crate::cli::{Cli, Cmd, OsdCmd};
use crate::ctx::{Ctx, Result};
use tern_types::ImageSpec;

pub async fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx { g: cli.global };
    match cli.cmd {
        Cmd::Pool(c) | Cmd::Osd(OsdCmd::Pool(c)) => pool::run(&ctx, c).await,
        Cmd::Create(a) => image::create(&ctx, a).await,
        Cmd::Ls {
            pool,
            pool_opt,
            long,
        } => {
            image::ls(
                &ctx,
                pool.or(pool_opt).unwrap_or_else(|| "rbd".into()),
                long,
            )
            .await
        }
        Cmd::Info { spec } => image::info(&ctx, &spec).await,
        Cmd::Resize {
            spec,
            size,
            allow_shrink,
        } => image::resize(&ctx, &spec, &size, allow_shrink).await,
        Cmd::Rename { src, dst } => image::rename(&ctx, &src, &dst).await,
        Cmd::Rm { spec, force } => image::rm(&ctx, &spec, force).await,
        Cmd::Import(a) if a.export_format == 2 => diff::import_v2(&ctx, a).await,
        Cmd::Import(a) => io::import(&ctx, a).await,
        Cmd::Export {
            spec,
            path,
            export_format: 2,
        } => diff::export_v2(&ctx, &spec, &path).await,
        Cmd::Export { spec, path, .. } => io::export(&ctx, &spec, &path).await,
        Cmd::Snap(c) => snap::run(&ctx, c).await,
        Cmd::Lock(c) => snap::lock(&ctx, c).await,
        Cmd::Feature(c) => journal::feature(&ctx, c).await,
        Cmd::Journal(c) => journal::run(&ctx, c).await,
        Cmd::Device(c) => device::run_cmd(&ctx, c).await,
        Cmd::Mirror(c) => mirror::run(&ctx, c).await,
        Cmd::Dr(c) => dr::run(&ctx, c).await,
        Cmd::Lab { action, dir } => lab::run(&action, &dir),
        Cmd::Diff {
            spec,
            from_snap,
            whole_object,
        } => diff::list(&ctx, &spec, from_snap, whole_object).await,
        Cmd::ExportDiff {
            spec,
            path,
            from_snap,
            whole_object,
            export_format,
        } => diff::export_diff(&ctx, &spec, &path, from_snap, whole_object, export_format).await,
        Cmd::ImportDiff { path, spec } => diff::import_diff(&ctx, &path, &spec).await,
        Cmd::Bench(a) => bench::run(&ctx, a).await,
        Cmd::Status => admin::status(&ctx).await,
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "tern", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            std::fs::create_dir_all(&dir)
                .and_then(|_| clap_mangen::generate_to(cmd, &dir))
                .map_err(|e| {
                    crate::ctx::invalid(format!("cannot write man pages to {}: {e}", dir.display()))
                })?;
            eprintln!("man pages written to {}", dir.display());
            Ok(())
        }
        Cmd::Config(c) => admin::config(&ctx, c).await,
        Cmd::Auth(c) => admin::auth(&ctx, c).await,
    }
}

/// Parses an image spec (no snapshot allowed here).
pub fn image_spec(s: &str) -> Result<ImageSpec> {
    let spec = ImageSpec::parse(s)?;
    if spec.snap.is_some() {
        return Err(crate::ctx::invalid(format!(
            "'{s}': this command takes an image, not a snapshot"
        )));
    }
    Ok(spec)
}

/// Parses `pool/image@snap` and insists on the snapshot part.
pub fn snap_spec(s: &str) -> Result<(ImageSpec, String)> {
    let spec = ImageSpec::parse(s)?;
    match spec.snap.clone() {
        Some(snap) => Ok((spec, snap)),
        None => Err(crate::ctx::invalid(format!(
            "'{s}' names no snapshot: use pool/image@snap"
        ))),
    }
}

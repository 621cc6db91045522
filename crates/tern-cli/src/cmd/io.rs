use super::image_spec;
use crate::cli::ImportArgs;
use crate::ctx::{Ctx, Result, invalid};
use serde_json::json;
use tern_client::ClientError;
use tern_client::transfer::{self, ExportSink, ImportTarget};
use tern_types::ErrorKind;
use tern_types::api::ImageCreate;

fn io_error(what: &str, path: &str, e: std::io::Error) -> ClientError {
    ClientError::new(
        tern_client::io_error_kind(&e),
        format!("{what} '{}': {e}", tern_types::escaped(path)),
    )
}

pub async fn import(ctx: &Ctx, a: ImportArgs) -> Result<()> {
    let spec_text = match &a.spec {
        Some(s) => s.clone(),
        None if a.path == "-" => {
            return Err(invalid("importing from stdin needs a target image spec"));
        }
        None => std::path::Path::new(&a.path)
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| invalid(format!("cannot derive an image name from '{}'", a.path)))?
            .to_string(),
    };
    let spec = image_spec(&spec_text)?;
    let mut req = ImageCreate {
        pool: spec.pool.clone(),
        image: spec.image.clone(),
        ..Default::default()
    };
    super::image::apply_layout(&mut req, &a.layout)?;
    let c = ctx.connect().await?;
    let stream = a.path == "-"
        || {
            let ft = std::fs::metadata(&a.path)
                .map_err(|e| io_error("cannot stat", &a.path, e))?
                .file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_char_device() {
                return Err(invalid(format!(
                    "'{}' is a character device, not a regular file or block device: it has no size to import \
                 (to import a stream, pipe a bounded one: `head -c SIZE {} | tern import - SPEC`)",
                    tern_types::escaped(&a.path),
                    tern_types::escaped(&a.path)
                )));
            }
            // A pipe (`<(cmd)`) or socket is read to its end, as stdin.
            ft.is_fifo() || ft.is_socket()
        };
    let (reply, total) = if stream {
        let bar = ctx.progress(0, "Importing image");
        let p = |n: u64| {
            if let Some(b) = &bar {
                b.set_position(n)
            }
        };
        let r = if a.path == "-" {
            transfer::import(&c, tokio::io::stdin(), ImportTarget::Create(req), &p).await
        } else {
            let f = tokio::fs::File::open(&a.path)
                .await
                .map_err(|e| io_error("cannot open", &a.path, e))?;
            transfer::import(
                &c,
                tokio::io::BufReader::with_capacity(1 << 20, f),
                ImportTarget::Create(req),
                &p,
            )
            .await
        };
        if let Some(b) = bar {
            b.finish_and_clear()
        }
        (r?, 0)
    } else {
        let mut f = tokio::fs::File::open(&a.path)
            .await
            .map_err(|e| io_error("cannot open", &a.path, e))?;
        let meta = f
            .metadata()
            .await
            .map_err(|e| io_error("cannot stat", &a.path, e))?;
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            // A block device: its metadata says 0; its end says its size.
            use tokio::io::AsyncSeekExt;
            let n = f
                .seek(std::io::SeekFrom::End(0))
                .await
                .map_err(|e| io_error("cannot size", &a.path, e))?;
            f.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(|e| io_error("cannot seek", &a.path, e))?;
            n
        };
        if len == 0 {
            return Err(invalid(format!(
                "'{}' is empty: an image needs a size > 0",
                tern_types::escaped(&a.path)
            )));
        }
        req.size = len;
        let bar = ctx.progress(len, "Importing image");
        let p = |n: u64| {
            if let Some(b) = &bar {
                b.set_position(n)
            }
        };
        let r = transfer::import(
            &c,
            tokio::io::BufReader::with_capacity(1 << 20, f),
            ImportTarget::Create(req),
            &p,
        )
        .await;
        if let Some(b) = bar {
            b.finish_and_clear()
        }
        (r?, len)
    };
    let _ = total;
    if ctx.json() {
        ctx.print_json(&json!({"image": spec.to_string(), "bytes_written": reply.bytes_written, "bytes_zero": reply.bytes_zero}));
    } else {
        eprintln!("Importing image: 100% complete...done.");
    }
    Ok(())
}

pub async fn export(ctx: &Ctx, spec: &str, path: &str) -> Result<()> {
    let spec = tern_types::ImageSpec::parse(spec)?;
    let c = ctx.connect().await?;
    let info = c.image().info(&spec).await?;
    let bar = if path == "-" {
        None
    } else {
        ctx.progress(info.size, "Exporting image")
    };
    let p = |n: u64| {
        if let Some(b) = &bar {
            b.set_position(n)
        }
    };
    let res = if path == "-" {
        transfer::export(&c, &spec, ExportSink::Stream(tokio::io::stdout()), &p).await
    } else {
        if std::path::Path::new(path).exists() {
            return Err(ClientError::new(
                ErrorKind::AlreadyExists,
                format!("'{path}' exists: remove it or choose another path"),
            ));
        }
        let f = tokio::fs::File::create(path)
            .await
            .map_err(|e| io_error("cannot create", path, e))?;
        let r = transfer::export(&c, &spec, ExportSink::<tokio::io::Stdout>::File(f), &p).await;
        if r.is_err() {
            let _ = std::fs::remove_file(path);
        }
        r
    };
    if let Some(b) = bar {
        b.finish_and_clear()
    }
    let (data, zero) = res?;
    if ctx.json() && path != "-" {
        ctx.print_json(&json!({"image": spec.to_string(), "bytes_data": data, "bytes_zero": zero}));
    } else if path != "-" {
        eprintln!("Exporting image: 100% complete...done.");
    }
    Ok(())
}

//! `diff`, `export-diff`/`import-diff` and `export`/`import --export-format 2`
//! in rbd's stream formats (see tern_client::rbd_diff).

use super::image_spec;
use crate::cli::ImportArgs;
use crate::ctx::{Ctx, Result, invalid};
use crate::out::table;
use futures::StreamExt;
use serde_json::json;
use tern_client::rbd_diff::{DiffError, DiffReader, DiffWriter, ImageHeaderV2, Record};
use tern_client::{ClientError, SiteClient};
use tern_types::api::{
    DataChunk, DiffRequest, DiffTarget, ImageCreate, ReadStream, SnapInfo, WriteMessage, WriteOpen,
};
use tern_types::{ErrorKind, ImageSpec};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

fn diff_err(e: DiffError) -> ClientError {
    let kind = match e {
        DiffError::Io(_) => ErrorKind::InvalidArgument,
        _ => ErrorKind::InvalidArgument,
    };
    ClientError::new(kind, format!("{e}; nothing was changed"))
}

fn io_err(what: &str, e: std::io::Error) -> ClientError {
    let kind = if e.kind() == std::io::ErrorKind::AlreadyExists {
        ErrorKind::AlreadyExists
    } else if e.kind() == std::io::ErrorKind::NotFound {
        ErrorKind::NotFound
    } else {
        ErrorKind::InvalidArgument
    };
    ClientError::new(kind, format!("{what}: {e}"))
}

async fn open_out(path: &str) -> Result<Box<dyn AsyncWrite + Unpin + Send>> {
    if path == "-" {
        return Ok(Box::new(tokio::io::stdout()));
    }
    let f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(|e| io_err(&format!("cannot create '{path}'"), e))?;
    Ok(Box::new(tokio::io::BufWriter::with_capacity(1 << 20, f)))
}

async fn open_in(path: &str) -> Result<Box<dyn AsyncRead + Unpin + Send>> {
    if path == "-" {
        return Ok(Box::new(tokio::io::stdin()));
    }
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| io_err(&format!("cannot open '{path}'"), e))?;
    Ok(Box::new(tokio::io::BufReader::with_capacity(1 << 20, f)))
}

pub async fn list(ctx: &Ctx, spec: &str, from: Option<String>, whole_object: bool) -> Result<()> {
    let s = ImageSpec::parse(spec)?;
    let c = ctx.connect().await?;
    let r = c
        .snap()
        .diff(DiffRequest {
            image: s,
            from_snap: from.unwrap_or_default(),
            whole_object,
            ..Default::default()
        })
        .await?;
    if ctx.json() {
        let v: Vec<_> = r
            .extents
            .iter()
            .map(|e| json!({"offset": e.offset, "length": e.length, "exists": if e.data { "true" } else { "false" }}))
            .collect();
        ctx.print_json(&json!(v));
    } else if !r.extents.is_empty() {
        let rows: Vec<Vec<String>> = r
            .extents
            .iter()
            .map(|e| {
                vec![
                    e.offset.to_string(),
                    e.length.to_string(),
                    if e.data { "data" } else { "zero" }.into(),
                ]
            })
            .collect();
        print!("{}", table(&["Offset", "Length", "Type"], &rows));
    }
    Ok(())
}

/// Writes the data records of `from`→`to` into `w`.
async fn write_changes<W: AsyncWrite + Unpin>(
    c: &SiteClient,
    w: &mut DiffWriter<W>,
    image: ImageSpec,
    from: Option<&str>,
    whole_object: bool,
) -> Result<u64> {
    let mut stream = c
        .io()
        .read_stream(ReadStream {
            image,
            diff: true,
            diff_from: from.unwrap_or("").to_string(),
            whole_object,
            ..Default::default()
        })
        .await?;
    let mut bytes = 0;
    let werr = |e| io_err("writing the diff", e);
    while let Some(ch) = stream.next().await.transpose()? {
        if ch.zero {
            w.zero(ch.offset, ch.length).await.map_err(werr)?;
        } else {
            bytes += ch.data.len() as u64;
            w.write(ch.offset, &ch.data).await.map_err(werr)?;
        }
    }
    Ok(bytes)
}

pub async fn export_diff(
    ctx: &Ctx,
    spec: &str,
    path: &str,
    from: Option<String>,
    whole_object: bool,
    format: u8,
) -> Result<()> {
    if !matches!(format, 1 | 2) {
        return Err(invalid("--export-format is 1 or 2"));
    }
    let s = ImageSpec::parse(spec)?;
    let c = ctx.connect().await?;
    let info = c.image().info(&s).await?;
    let out = open_out(path).await?;
    let werr = |e| io_err("writing the diff", e);
    let res: Result<u64> = async {
        let mut w = DiffWriter::new(out, format).await.map_err(werr)?;
        if let Some(f) = &from {
            w.snap(true, f).await.map_err(werr)?;
        }
        if let Some(t) = &s.snap {
            w.snap(false, t).await.map_err(werr)?;
        }
        w.size(info.size).await.map_err(werr)?;
        let bytes = write_changes(&c, &mut w, s.clone(), from.as_deref(), whole_object).await?;
        w.end().await.map_err(werr)?;
        Ok(bytes)
    }
    .await;
    if res.is_err() && path != "-" {
        let _ = std::fs::remove_file(path);
    }
    let bytes = res?;
    if ctx.json() && path != "-" {
        ctx.print_json(&json!({"image": spec, "from_snap": from, "data_bytes": bytes}));
    } else if path != "-" {
        eprintln!("Exporting image: 100% complete...done.");
    }
    Ok(())
}

/// The metadata records of one diff, up to its first data record.
struct DiffMeta {
    from: Option<String>,
    to: Option<String>,
    size: Option<u64>,
    protected: bool,
    first: Record,
}

async fn read_meta<R: AsyncRead + Unpin>(r: &mut DiffReader<R>) -> Result<DiffMeta> {
    let mut m = DiffMeta {
        from: None,
        to: None,
        size: None,
        protected: false,
        first: Record::End,
    };
    loop {
        match r.next().await.map_err(diff_err)? {
            Record::FromSnap(n) => m.from = Some(n),
            Record::ToSnap(n) => m.to = Some(n),
            Record::Size(s) => m.size = Some(s),
            Record::Protected(p) => m.protected = p,
            rec => {
                m.first = rec;
                return Ok(m);
            }
        }
    }
}

/// Streams one diff's data into `target` through an atomic write stream.
async fn send_diff<R: AsyncRead + Unpin>(
    c: &SiteClient,
    r: &mut DiffReader<R>,
    meta: DiffMeta,
    target: ImageSpec,
) -> Result<u64> {
    let size = meta
        .size
        .ok_or_else(|| invalid("the diff has no size record ('s'); nothing was changed"))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteMessage>(4);
    let open = WriteOpen {
        image: Some(target),
        diff: Some(DiffTarget {
            from_snap: meta.from.clone().unwrap_or_default(),
            to_snap: meta.to.clone().unwrap_or_default(),
            size,
        }),
        ..Default::default()
    };
    tx.send(WriteMessage::Open(Box::new(open))).await.ok();
    let c2 = c.clone();
    let call = tokio::spawn(async move { c2.io().write_stream(tokio_stream_iter(rx)).await });
    let mut total = 0u64;
    let mut rec = meta.first;
    let mut buf = vec![0u8; 4 << 20];
    let fed: Result<()> = async {
        loop {
            match rec {
                Record::End => {
                    let commit = WriteMessage::Commit {
                        final_size: 0,
                        total_bytes: total,
                    };
                    tx.send(commit).await.ok();
                    return Ok(());
                }
                Record::Zero { offset, length } => {
                    total += length;
                    let ch = DataChunk {
                        offset,
                        length,
                        zero: true,
                        data: Default::default(),
                    };
                    if tx.send(WriteMessage::Chunk(ch)).await.is_err() {
                        return Ok(());
                    }
                }
                Record::Write { offset, length } => {
                    let mut at = offset;
                    loop {
                        let n = r.read_data(&mut buf).await.map_err(diff_err)?;
                        if n == 0 {
                            break;
                        }
                        let ch = DataChunk {
                            offset: at,
                            length: n as u64,
                            zero: false,
                            data: buf[..n].to_vec().into(),
                        };
                        if tx.send(WriteMessage::Chunk(ch)).await.is_err() {
                            return Ok(());
                        }
                        at += n as u64;
                    }
                    total += length;
                }
                Record::FromSnap(_)
                | Record::ToSnap(_)
                | Record::Size(_)
                | Record::Protected(_) => {
                    return Err(invalid(
                        "metadata record after data records; nothing was changed",
                    ));
                }
            }
            rec = r.next().await.map_err(diff_err)?;
        }
    }
    .await;
    // Without a commit the site rolls the image back.
    drop(tx);
    let reply = call
        .await
        .map_err(|e| ClientError::new(ErrorKind::Internal, e.to_string()))?;
    fed?;
    reply?;
    Ok(total)
}

fn tokio_stream_iter(
    rx: tokio::sync::mpsc::Receiver<WriteMessage>,
) -> impl futures::Stream<Item = WriteMessage> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

pub async fn import_diff(ctx: &Ctx, path: &str, spec: &str) -> Result<()> {
    let s = image_spec(spec)?;
    let c = ctx.connect().await?;
    // Fail early on an unknown image, before reading any input.
    c.image().info(&s.head()).await?;
    let input = open_in(path).await?;
    let mut r = DiffReader::new(input).await.map_err(diff_err)?;
    let meta = read_meta(&mut r).await?;
    let total = send_diff(&c, &mut r, meta, s.head()).await?;
    if ctx.json() {
        ctx.print_json(&json!({"image": s.to_string(), "bytes": total}));
    } else {
        eprintln!("Importing image diff: 100% complete...done.");
    }
    Ok(())
}

pub async fn export_v2(ctx: &Ctx, spec: &str, path: &str) -> Result<()> {
    let s = image_spec(spec)?;
    let c = ctx.connect().await?;
    let info = c.image().info(&s.head()).await?;
    let snaps = c.snap().list(&s.head(), false).await?;
    let mut out = open_out(path).await?;
    let werr = |e| io_err("writing the export", e);
    let res: Result<()> = async {
        ImageHeaderV2 {
            order: info.object_size.trailing_zeros() as u64,
            features: Some(info.features),
            stripe_unit: info.stripe_unit,
            stripe_count: info.stripe_count,
            meta: Vec::new(),
            diffs: snaps.len() as u64 + 1,
        }
        .write(&mut out)
        .await
        .map_err(werr)?;
        let mut prev: Option<String> = None;
        let points: Vec<Option<&SnapInfo>> = snaps
            .iter()
            .map(Some)
            .chain(std::iter::once(None))
            .collect();
        for p in points {
            let mut w = DiffWriter::new(&mut out, 2).await.map_err(werr)?;
            if let Some(f) = &prev {
                w.snap(true, f).await.map_err(werr)?;
            }
            let size = match p {
                Some(snap) => {
                    w.snap(false, &snap.name).await.map_err(werr)?;
                    snap.size
                }
                None => info.size,
            };
            // Ceph's order: the protection status before the size.
            if let Some(snap) = p {
                w.protected(snap.protected).await.map_err(werr)?;
            }
            w.size(size).await.map_err(werr)?;
            let at = ImageSpec {
                snap: p.map(|x| x.name.clone()),
                ..s.head()
            };
            write_changes(&c, &mut w, at, prev.as_deref(), false).await?;
            w.end().await.map_err(werr)?;
            prev = p.map(|x| x.name.clone());
        }
        out.flush().await.map_err(werr)?;
        Ok(())
    }
    .await;
    if res.is_err() && path != "-" {
        let _ = std::fs::remove_file(path);
    }
    res?;
    if !ctx.json() && path != "-" {
        eprintln!("Exporting image: 100% complete...done.");
    }
    Ok(())
}

pub async fn import_v2(ctx: &Ctx, a: ImportArgs) -> Result<()> {
    let spec_text = a
        .spec
        .clone()
        .ok_or_else(|| invalid("import --export-format 2 needs a target image spec"))?;
    let s = image_spec(&spec_text)?;
    let c = ctx.connect().await?;
    let mut input = open_in(&a.path).await?;
    let res = import_v2_into(&c, &mut input, &s, &a).await;
    if let Err(e) = res {
        // All or nothing: remove what was created.
        if e.kind != ErrorKind::AlreadyExists {
            let r = s.head();
            if let Ok(l) = c.snap().list(&r, false).await {
                for snap in l.iter().filter(|x| x.protected) {
                    let _ = c.snap().protect(&r, &snap.name, false).await;
                }
            }
            let _ = c.snap().purge(&r).await;
            let _ = c.image().remove(&r, false).await;
        }
        return Err(e);
    }
    if !ctx.json() {
        eprintln!("Importing image: 100% complete...done.");
    }
    Ok(())
}

async fn import_v2_into<R: AsyncRead + Unpin>(
    c: &SiteClient,
    input: &mut R,
    s: &ImageSpec,
    a: &ImportArgs,
) -> Result<()> {
    let h = ImageHeaderV2::read(input).await.map_err(|e| match e {
        // Said as it was before the header had its own reader.
        DiffError::Malformed(m) => invalid(m),
        e => diff_err(e),
    })?;
    for (key, _) in &h.meta {
        eprintln!(
            "rbd: image-meta '{}' not imported: tern images carry no metadata",
            key.escape_debug()
        );
    }
    let (order, features, su, sc, n) =
        (h.order, h.features, h.stripe_unit, h.stripe_count, h.diffs);
    let target = s.head();
    for i in 0..n {
        let mut r = DiffReader::new(&mut *input).await.map_err(diff_err)?;
        if r.version != 2 {
            return Err(invalid(
                "diffs inside an export-format 2 stream must be 'rbd diff v2'",
            ));
        }
        let meta = read_meta(&mut r).await?;
        if i == 0 {
            let size = meta
                .size
                .ok_or_else(|| invalid("the first diff has no size record"))?;
            let mut req = ImageCreate {
                pool: s.pool.clone(),
                image: s.image.clone(),
                size,
                object_size: 1u64 << order.clamp(12, 30),
                stripe_unit: su,
                stripe_count: sc,
                features: features
                    .map(|f| vec![(f & 0x7f).to_string()])
                    .unwrap_or_default(),
            };
            super::image::apply_layout(&mut req, &a.layout)?;
            if !a.layout.features.is_empty() {
                req.features = a.layout.features.clone();
            }
            c.image().create(req).await?;
        }
        let (to, protected) = (meta.to.clone(), meta.protected);
        send_diff(c, &mut r, meta, target.clone()).await?;
        if protected && let Some(to) = to {
            c.snap().protect(&target, &to, true).await?;
        }
    }
    Ok(())
}

//! Whole-image import and export over the streaming calls, sparse both ways:
//! runs of zeros are neither sent nor stored on import, and holes come back
//! as zero extents on export and are written as holes to a file.

use crate::{ClientError, SiteClient};
use futures::StreamExt;
use std::io::SeekFrom;
use tern_types::api::{DataChunk, ImageCreate, ReadStream, WriteMessage, WriteOpen, Written};
use tern_types::{ErrorKind, ImageSpec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

/// Bytes per message on the data path (DESIGN §4: 1–4 MiB).
pub const CHUNK: usize = 4 << 20;
/// Granularity at which zero runs are found in imported data.
pub const ZERO_BLOCK: usize = 4096;

/// Splits `buf` into maximal runs of all-zero and not-all-zero blocks.
pub fn zero_runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
        let zero = block.iter().all(|b| *b == 0);
        let off = i * ZERO_BLOCK;
        match runs.last_mut() {
            Some((_, len, z)) if *z == zero => *len += block.len(),
            _ => runs.push((off, block.len(), zero)),
        }
    }
    runs
}

async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// What to import into.
pub enum ImportTarget {
    /// Create a new image; `size` 0 means "as long as the input".
    Create(ImageCreate),
    /// Overwrite an existing image from offset 0.
    Existing(ImageSpec),
}

/// Streams `input` into the site. With [`ImportTarget::Create`] the image
/// appears only once the whole input arrived; on any failure nothing is left.
pub async fn import<R: AsyncRead + Unpin>(
    client: &SiteClient,
    mut input: R,
    target: ImportTarget,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Written, ClientError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteMessage>(4);
    let creating = matches!(target, ImportTarget::Create(_));
    let open = match target {
        ImportTarget::Create(c) => WriteOpen {
            create: Some(c),
            ..Default::default()
        },
        ImportTarget::Existing(r) => WriteOpen {
            image: Some(r),
            ..Default::default()
        },
    };
    tx.send(WriteMessage::Open(Box::new(open))).await.ok();
    let c = client.clone();
    let call = tokio::spawn(async move {
        c.io()
            .write_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let read_result: Result<(), ClientError> = async {
        loop {
            let n = read_full(&mut input, &mut buf).await.map_err(|e| {
                ClientError::new(
                    ErrorKind::InvalidArgument,
                    format!("reading the input: {e}"),
                )
            })?;
            if n == 0 {
                break;
            }
            for (off, len, zero) in zero_runs(&buf[..n]) {
                let chunk = DataChunk {
                    offset: offset + off as u64,
                    length: len as u64,
                    zero,
                    data: if zero {
                        bytes::Bytes::new()
                    } else {
                        bytes::Bytes::copy_from_slice(&buf[off..off + len])
                    },
                };
                if tx.send(WriteMessage::Chunk(chunk)).await.is_err() {
                    // The server ended the call; its status says why.
                    return Ok(());
                }
            }
            offset += n as u64;
            progress(offset);
        }
        let commit = WriteMessage::Commit {
            final_size: if creating { offset } else { 0 },
            total_bytes: offset,
        };
        tx.send(commit).await.ok();
        Ok(())
    }
    .await;
    // Dropping the sender without a commit tells the server to discard everything.
    drop(tx);
    let reply = call
        .await
        .map_err(|e| ClientError::new(ErrorKind::Internal, e.to_string()))?;
    read_result?;
    reply
}

/// Where an export goes.
pub enum ExportSink<W> {
    /// A regular file: holes are skipped with seeks and the file is sized at the end.
    File(tokio::fs::File),
    /// A pipe: zeros are written out.
    Stream(W),
}

/// Streams an image (or a range of it) out of the site. Returns (data bytes, zero bytes).
pub async fn export<W: AsyncWrite + Unpin>(
    client: &SiteClient,
    image: &ImageSpec,
    mut sink: ExportSink<W>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(u64, u64), ClientError> {
    let info = client.image().info(image).await?;
    let mut stream = client
        .io()
        .read_stream(ReadStream {
            image: image.clone(),
            ..Default::default()
        })
        .await?;
    let io_err = |e: std::io::Error| {
        let kind = match crate::error::io_error_kind(&e) {
            ErrorKind::NoSpace => ErrorKind::NoSpace,
            _ => ErrorKind::Internal,
        };
        let hint = if kind == ErrorKind::NoSpace {
            ": free space there or export elsewhere"
        } else {
            ""
        };
        ClientError::new(kind, format!("writing the output: {e}{hint}"))
    };
    let zeros = vec![0u8; CHUNK];
    let (mut data_bytes, mut zero_bytes, mut pos) = (0u64, 0u64, 0u64);
    while let Some(chunk) = stream.next().await.transpose()? {
        if chunk.offset != pos {
            return Err(ClientError::new(
                ErrorKind::Corrupt,
                format!("export stream skipped from {pos} to {}", chunk.offset),
            ));
        }
        if chunk.zero {
            zero_bytes += chunk.length;
            match &mut sink {
                ExportSink::File(f) => {
                    f.seek(SeekFrom::Current(chunk.length as i64))
                        .await
                        .map_err(io_err)?;
                }
                ExportSink::Stream(w) => {
                    let mut left = chunk.length as usize;
                    while left > 0 {
                        let n = left.min(zeros.len());
                        w.write_all(&zeros[..n]).await.map_err(io_err)?;
                        left -= n;
                    }
                }
            }
        } else {
            if chunk.data.len() as u64 != chunk.length {
                return Err(ClientError::new(
                    ErrorKind::Corrupt,
                    "export chunk length mismatch",
                ));
            }
            data_bytes += chunk.length;
            match &mut sink {
                ExportSink::File(f) => f.write_all(&chunk.data).await.map_err(io_err)?,
                ExportSink::Stream(w) => w.write_all(&chunk.data).await.map_err(io_err)?,
            }
        }
        pos += chunk.length;
        progress(pos);
    }
    if pos != info.size {
        return Err(ClientError::new(
            ErrorKind::Unavailable,
            format!(
                "export ended at byte {pos} of {}: the connection was cut",
                info.size
            ),
        ));
    }
    match &mut sink {
        ExportSink::File(f) => {
            f.set_len(info.size).await.map_err(io_err)?;
            f.sync_all().await.map_err(io_err)?;
        }
        ExportSink::Stream(w) => w.flush().await.map_err(io_err)?,
    }
    Ok((data_bytes, zero_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        let mut b = vec![0u8; 4096 * 4];
        b[4096 * 2 + 7] = 1;
        assert_eq!(
            zero_runs(&b),
            vec![(0, 8192, true), (8192, 4096, false), (12288, 4096, true)]
        );
        assert_eq!(zero_runs(&[1, 2, 3]), vec![(0, 3, false)]);
    }
}

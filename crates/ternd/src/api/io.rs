//! `Io`: image data. Small reads and writes, and the two streams: export
//! (crate::export) and import (crate::import).

use super::{Api, PoolCounters, Reply, image, status_of};
use crate::auth::Need;
use crate::export::{self, Export};
use crate::import::Import;
use tern_proto::v1 as pb;
use tern_types::error::Error;
use tonic::{Request, Response, Streaming};

#[tonic::async_trait]
impl pb::io_server::Io for Api {
    async fn read(&self, req: Request<pb::ReadRequest>) -> Reply<pb::ReadReply> {
        self.run(
            req,
            |q| Ok(Need::Read(&image(&q.image)?.pool)),
            |c, q| {
                if q.length > tern_proto::MAX_MESSAGE as u64 - 4096 {
                    return Err(Error::invalid("read larger than 16 MiB: use ReadStream"));
                }
                let r = q.image.unwrap_or_default();
                let (img, snap) = c.open_at(&r)?;
                let mut data = vec![0u8; q.length as usize];
                img.read_at(snap.map(|s| s.id), q.offset, &mut data)?;
                let n = c.counters.of(&r.pool);
                PoolCounters::count(&n.read_ops, 1);
                PoolCounters::count(&n.read_bytes, data.len() as u64);
                Ok(pb::ReadReply { data })
            },
        )
        .await
    }

    async fn write(&self, req: Request<pb::WriteRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let r = q.image.unwrap_or_default();
                let img = c.open_for_write(&r, &q.lock_cookie)?;
                img.write(q.offset, &q.data, q.fua)?;
                let n = c.counters.of(&r.pool);
                PoolCounters::count(&n.write_ops, 1);
                PoolCounters::count(&n.write_bytes, q.data.len() as u64);
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn discard(&self, req: Request<pb::RangeRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let img = c.open_for_write(&q.image.unwrap_or_default(), &q.lock_cookie)?;
                img.discard(q.offset, q.length)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn write_zeroes(&self, req: Request<pb::RangeRequest>) -> Reply<pb::Empty> {
        self.run(
            req,
            |q| Ok(Need::Write(&image(&q.image)?.pool)),
            |c, q| {
                let img = c.open_for_write(&q.image.unwrap_or_default(), &q.lock_cookie)?;
                img.write_zeroes(q.offset, q.length)?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    async fn flush(&self, req: Request<pb::ImageRef>) -> Reply<pb::Empty> {
        self.run(
            req,
            |r| Ok(Need::Write(&r.pool)),
            |c, r| {
                c.open(&r)?.flush()?;
                Ok(pb::Empty {})
            },
        )
        .await
    }

    type ReadStreamStream = crate::budget::Rx<pb::DataChunk>;

    async fn read_stream(
        &self,
        req: Request<pb::ReadStreamRequest>,
    ) -> Reply<Self::ReadStreamStream> {
        let c = self.call(&req, Need::Read(&image(&req.get_ref().image)?.pool))?;
        let conn = req.extensions().get::<crate::listen::ConnInfo>().cloned();
        let q = req.into_inner();
        let plan = c.run(move |c| Export::plan(c, q)).await?;
        let (tx, rx) = self.budget.stream(plan.chunk as usize, conn.map(|c| c.0));
        tokio::spawn(export::send(plan, tx));
        Ok(Response::new(rx))
    }

    async fn write_stream(
        &self,
        req: Request<Streaming<pb::WriteStreamMessage>>,
    ) -> Reply<pb::WriteStreamReply> {
        // Authenticated here; the pool is known only from the first message.
        let c = self.call(&req, Need::SiteRead)?;
        let mut stream = req.into_inner();
        use pb::write_stream_message::Msg;
        let first = stream.message().await?.and_then(|m| m.msg);
        let Some(Msg::Open(open)) = first else {
            return Err(status_of(Error::invalid(
                "a write stream must start with an open message",
            )));
        };
        let mut import = Import::open(&c, open).await?;
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m.msg,
                Ok(None) => {
                    import.abort().await;
                    return Err(status_of(Error::invalid(
                        "the write stream ended before its commit: the import was discarded",
                    )));
                }
                Err(e) => {
                    import.abort().await;
                    return Err(e);
                }
            };
            let res = match msg {
                Some(Msg::Chunk(ch)) => import.chunk(ch).await,
                Some(Msg::Commit(cm)) => return import.commit(cm).await.map(Response::new),
                _ => Err(status_of(Error::invalid(
                    "unexpected message in a write stream",
                ))),
            };
            if let Err(e) = res {
                import.abort().await;
                return Err(e);
            }
        }
    }
}

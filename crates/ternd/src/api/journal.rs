//! `Journal`: a journaled image's journal, its clients, and reading it.

use super::{Api, Reply, image, status_of};
use crate::auth::Need;
use crate::convert::{journal_client_pb, journal_info_pb};
use crate::work::blocking;
use tern_proto::convert::FromWire;
use tern_proto::v1 as pb;
use tern_types::ErrorKind;
use tern_types::error::Error;
use tern_types::journal::JournalClientAction as Action;
use tonic::{Request, Response};

#[tonic::async_trait]
impl pb::journal_server::Journal for Api {
    async fn journal_info(&self, req: Request<pb::ImageRef>) -> Reply<pb::JournalInfoReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let j = c.site.store.journal(&r.pool, &r.image)?;
                let i = j.info();
                let who = format!("image.{}", i.image_id);
                let age = c.site.config_f64(&who, "rbd_journal_commit_age");
                let splay = c.site.config_f64(&who, "rbd_journal_splay_width");
                Ok(journal_info_pb(&i, age, splay as u64))
            },
        )
        .await
    }

    async fn journal_inspect(&self, req: Request<pb::ImageRef>) -> Reply<pb::JournalInspectReply> {
        self.run(
            req,
            |r| Ok(Need::Read(&r.pool)),
            |c, r| {
                let rep = c.site.store.journal(&r.pool, &r.image)?.inspect()?;
                Ok(pb::JournalInspectReply {
                    segments: rep.segments,
                    entries: rep.entries,
                    bytes: rep.bytes,
                    first_tid: rep.first_tid.unwrap_or(0),
                    last_tid: rep.last_tid.unwrap_or(0),
                    counts: rep.counts.into_iter().collect(),
                    errors: rep.errors,
                })
            },
        )
        .await
    }

    type JournalReadStream = crate::budget::Rx<pb::JournalChunk>;

    async fn journal_read(
        &self,
        req: Request<pb::JournalReadRequest>,
    ) -> Reply<Self::JournalReadStream> {
        let c = self.call(&req, Need::Read(&image(&req.get_ref().image)?.pool))?;
        let conn = req
            .extensions()
            .get::<crate::listen::ConnInfo>()
            .map(|c| c.0.clone());
        let q = req.into_inner();
        let r = q.image.clone().unwrap_or_default();
        let j = c
            .run(move |c| Ok(c.site.store.journal(&r.pool, &r.image)?))
            .await?;
        let max = if q.max_bytes == 0 {
            4 << 20
        } else {
            q.max_bytes.clamp(4096, 8 << 20)
        };
        let (tx, rx) = self.budget.stream(max as usize, conn);
        // A following reader never ends by itself: a stop drops it, which
        // ends its stream and lets the server finish.
        self.tasks.spawn_until_stop(async move {
            let mut skip = q.skip_to_snap.clone();
            let mut next = if q.from_tid == 0 {
                j.info().first_tid
            } else {
                q.from_tid
            };
            loop {
                // Room first: entries read are charged until sent.
                let Ok(mut room) = tx.reserve(max as usize).await else {
                    return;
                };
                let jj = j.clone();
                let read = blocking(move || {
                    let entries = jj.read_from(next, max)?;
                    if entries.is_empty() && q.follow {
                        // A stream, not polling: woken by the next commit.
                        jj.wait_for(next - 1, std::time::Duration::from_secs(1));
                    }
                    Ok::<_, tern_store::StoreError>((entries, jj.durable_tid()))
                })
                .await;
                let (entries, durable) = match read {
                    Ok(v) => v,
                    Err(e) => {
                        tx.fail(status_of(e));
                        return;
                    }
                };
                if entries.is_empty() {
                    if !q.follow || tx.is_closed() {
                        return;
                    }
                    continue;
                }
                let last_tid = entries[entries.len() - 1].tid;
                next = last_tid + 1;
                let mut entries = &entries[..];
                if !skip.is_empty() {
                    use tern_store::journal::JournalOp;
                    match entries.iter().position(
                        |e| matches!(&e.op, JournalOp::SnapCreate { name, .. } if *name == skip),
                    ) {
                        Some(i) => {
                            entries = &entries[i..];
                            skip.clear();
                        }
                        None => continue,
                    }
                }
                let first_tid = entries[0].tid;
                let mut buf = Vec::new();
                for e in entries {
                    e.encode_into(&mut buf);
                }
                let chunk = pb::JournalChunk {
                    entries: buf,
                    first_tid,
                    last_tid,
                    durable_tid: durable,
                };
                tx.push(&mut room, chunk);
            }
        });
        Ok(Response::new(rx))
    }

    async fn journal_extents(
        &self,
        req: Request<pb::JournalExtentsRequest>,
    ) -> Reply<pb::DiffReply> {
        self.run(req, |q| Ok(Need::Read(&image(&q.image)?.pool)), |c, q| {
            use tern_store::journal::JournalOp;
            let (r, after) = (q.image.unwrap_or_default(), q.after_tid);
            let j = c.site.store.journal(&r.pool, &r.image)?;
            let gone = |why: String| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "the journal of {}/{} cannot list the writes after entry {after}: {why}",
                        r.pool, r.image
                    ),
                )
            };
            let mut v: Vec<(u64, u64)> = Vec::new();
            let mut expect = after + 1;
            for e in j.entries(after + 1) {
                let e = e.map_err(|e| gone(e.to_string()))?;
                if e.tid != expect {
                    return Err(gone(format!("it starts at entry {}", e.tid)));
                }
                expect += 1;
                match e.op {
                    JournalOp::Write { offset, data } => v.push((offset, data.len() as u64)),
                    JournalOp::Discard { offset, len } | JournalOp::WriteZeroes { offset, len } => {
                        v.push((offset, len))
                    }
                    JournalOp::Resize { .. } | JournalOp::SnapRollback { .. } => {
                        return Err(gone(format!(
                            "entry {} is a {} (not a set of extents)",
                            e.tid,
                            e.op.name()
                        )));
                    }
                    _ => {}
                }
            }
            if expect == after + 1 && j.info().first_tid > after + 1 && j.last_tid() > after {
                return Err(gone("they were trimmed".into()));
            }
            let extents = merge_extents(v)
                .into_iter()
                .map(|(offset, length)| pb::DiffExtent {
                    offset,
                    length,
                    data: true,
                })
                .collect();
            Ok(pb::DiffReply {
                extents,
                size: 0,
                granularity: 1,
            })
        })
        .await
    }

    async fn journal_client(
        &self,
        req: Request<pb::JournalClientRequest>,
    ) -> Reply<pb::JournalClientInfo> {
        // Reading positions is reading; holding back trimming is what a
        // peer's replayer (or an image writer) may do.
        let pool = image(&req.get_ref().image)?.pool.clone();
        let action: Action = FromWire::from_wire(req.get_ref().action).map_err(status_of)?;
        let c = if action == Action::Get {
            self.call(&req, Need::Read(&pool))?
        } else {
            match self.call(&req, Need::MirrorPeer(&pool)) {
                Ok(c) => c,
                Err(_) => self.call(&req, Need::Write(&pool))?,
            }
        };
        let q = req.into_inner();
        let info = c
            .run(move |c| {
                let r = q.image.unwrap_or_default();
                let j = c.site.store.journal(&r.pool, &r.image)?;
                Ok(match action {
                    Action::Register => j.register_client(&q.client)?,
                    Action::Unregister => {
                        let info = j.client(&q.client)?;
                        j.unregister_client(&q.client)?;
                        info
                    }
                    Action::Commit => {
                        j.commit(&q.client, q.tid)?;
                        j.client(&q.client)?
                    }
                    Action::Get => j.client(&q.client)?,
                })
            })
            .await?;
        Ok(Response::new(journal_client_pb(&info)))
    }
}

/// Sorted, non-overlapping, adjacent ranges joined.
fn merge_extents(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|e| e.1 > 0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => {
                last.1 = last.1.max(o + l - last.0);
            }
            _ => out.push((o, l)),
        }
    }
    out
}

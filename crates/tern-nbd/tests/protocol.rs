//! Protocol edge cases driven byte by byte over an in-memory duplex.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{MemDevice, MemExports, RawClient};
use tern_nbd::wire::*;
use tern_nbd::{NbdError, ServerConfig, serve_connection, serve_connection_until};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

const MIB: u64 = 1024 * 1024;
type Server = JoinHandle<Result<(), NbdError>>;

fn exports() -> (Arc<MemDevice>, Arc<MemDevice>, MemExports) {
    let disk = MemDevice::new(MIB, false);
    let ro = MemDevice::new(MIB, true);
    let e = MemExports::default()
        .with("disk", disk.clone())
        .with("ro", ro.clone());
    (disk, ro, e)
}

async fn start(e: MemExports, cfg: ServerConfig) -> (RawClient<DuplexStream>, Server) {
    let (c, s) = tokio::io::duplex(1 << 20);
    let srv = tokio::spawn(serve_connection(s, Arc::new(e), Arc::new(cfg)));
    (RawClient::hello(c).await.unwrap(), srv)
}

async fn finish(srv: Server) -> Result<(), NbdError> {
    tokio::time::timeout(Duration::from_secs(10), srv)
        .await
        .expect("server ends")
        .expect("server does not panic")
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[tokio::test]
async fn unknown_option_is_refused_and_haggling_continues() {
    let (_, _, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    let r = c.opt(4242, b"whatever").await.unwrap();
    assert_eq!(r[0].kind, REP_ERR_UNSUP);
    assert_eq!(r[0].option, 4242);
    let r = c.opt(OPT_LIST, &[]).await.unwrap();
    assert_eq!(r.iter().filter(|r| r.kind == REP_SERVER).count(), 2);
    let (size, flags) = c.go("disk").await.unwrap().unwrap();
    assert_eq!(size, MIB);
    assert!(flags & TFLAG_SEND_TRIM != 0 && flags & TFLAG_READ_ONLY == 0);
    c.request(CMD_DISC, 0, 0, 0, 0, &[]).await.unwrap();
    finish(srv).await.unwrap();
}

#[tokio::test]
async fn unknown_export_gets_err_unknown_with_message() {
    let (_, _, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    let r = c.opt(OPT_GO, &go_data("nope", &[])).await.unwrap();
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].data).contains("no export named"));
    let r = c
        .opt(
            OPT_INFO,
            &go_data("ro", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        )
        .await
        .unwrap();
    let kinds: Vec<(u32, u16)> = r
        .iter()
        .map(|r| {
            (
                r.kind,
                r.data
                    .first()
                    .map_or(0, |_| u16::from_be_bytes([r.data[0], r.data[1]])),
            )
        })
        .collect();
    assert!(kinds.contains(&(REP_INFO, INFO_EXPORT)));
    assert!(kinds.contains(&(REP_INFO, INFO_NAME)));
    assert!(kinds.contains(&(REP_INFO, INFO_DESCRIPTION)));
    let bs = r
        .iter()
        .find(|r| r.kind == REP_INFO && r.data[..2] == [0, 3])
        .unwrap();
    assert_eq!(bs.data[2..], [0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let r = c.opt(OPT_ABORT, &[]).await.unwrap();
    assert_eq!(r[0].kind, REP_ACK);
    finish(srv).await.unwrap();
}

#[tokio::test]
async fn export_name_path_and_unknown_export_name_closes() {
    let (_, _, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    c.send_opt(OPT_EXPORT_NAME, b"disk").await.unwrap();
    let mut b = [0u8; 10];
    tokio::io::AsyncReadExt::read_exact(&mut c.io, &mut b)
        .await
        .unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), MIB);
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (0, 1));
    let mut data = [1u8; 512];
    tokio::io::AsyncReadExt::read_exact(&mut c.io, &mut data)
        .await
        .unwrap();
    assert_eq!(data, [0u8; 512]);
    drop(c);
    finish(srv).await.unwrap();

    let (_, _, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    c.send_opt(OPT_EXPORT_NAME, b"nope").await.unwrap();
    assert!(c.closed().await);
    assert!(matches!(finish(srv).await, Err(NbdError::Refused(_))));
}

#[tokio::test]
async fn bad_client_flags_close() {
    let (_, _, e) = exports();
    let (c, s) = tokio::io::duplex(4096);
    let srv = tokio::spawn(serve_connection(
        s,
        Arc::new(e),
        Arc::new(ServerConfig::default()),
    ));
    let mut c = c;
    let mut g = [0u8; 18];
    tokio::io::AsyncReadExt::read_exact(&mut c, &mut g)
        .await
        .unwrap();
    c.write_all(&0x8000_0000u32.to_be_bytes()).await.unwrap();
    assert!(matches!(finish(srv).await, Err(NbdError::ClientFlags(_))));
}

#[tokio::test]
async fn huge_option_lengths() {
    let (_, _, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    // Over the in-memory limit but skippable: refused, haggling continues.
    let r = c.opt(4242, &vec![0u8; 2 << 20]).await.unwrap();
    assert_eq!(r[0].kind, REP_ERR_TOO_BIG);
    assert!(c.go("disk").await.unwrap().is_ok());
    drop(c);
    finish(srv).await.unwrap();

    let (_, _, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.io.write_all(&h).await.unwrap();
    assert!(c.closed().await);
    assert!(matches!(
        finish(srv).await,
        Err(NbdError::OptionTooLarge { .. })
    ));
}

#[tokio::test]
async fn forced_tls_refuses_clear_text_options() {
    let (_, _, e) = exports();
    let cfg = ServerConfig {
        require_tls: true,
        ..ServerConfig::default()
    };
    let (mut c, srv) = start(e, cfg).await;
    for opt in [OPT_LIST, OPT_STRUCTURED_REPLY] {
        assert_eq!(c.opt(opt, &[]).await.unwrap()[0].kind, REP_ERR_TLS_REQD);
    }
    assert_eq!(
        c.opt(OPT_GO, &go_data("disk", &[])).await.unwrap()[0].kind,
        REP_ERR_TLS_REQD
    );
    // No acceptor configured: STARTTLS itself is unsupported.
    assert_eq!(
        c.opt(OPT_STARTTLS, &[]).await.unwrap()[0].kind,
        REP_ERR_UNSUP
    );
    c.send_opt(OPT_EXPORT_NAME, b"disk").await.unwrap();
    assert!(c.closed().await);
    assert!(finish(srv).await.is_err());
}

#[tokio::test]
async fn simple_reply_errors() {
    let (disk, _, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    c.go("disk").await.unwrap().unwrap();
    // Out of range read.
    c.request(CMD_READ, 0, 1, MIB - 10, 20, &[]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EINVAL, 1));
    // Oversize read.
    c.request(CMD_READ, 0, 2, 0, 64 << 20, &[]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EINVAL, 2));
    // Offset overflow.
    c.request(CMD_READ, 0, 3, u64::MAX - 1, 4, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EINVAL, 3));
    // Write past the end: ENOSPC, and its payload is consumed (next request parses).
    c.request(CMD_WRITE, 0, 4, MIB - 2, 4, &[1, 2, 3, 4])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_ENOSPC, 4));
    c.request(CMD_WRITE, CMD_FLAG_FUA, 5, 0, 4, &[1, 2, 3, 4])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (0, 5));
    assert_eq!(disk.contents()[..4], [1, 2, 3, 4]);
    // Block status without structured replies.
    c.request(CMD_BLOCK_STATUS, 0, 6, 0, 4096, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EINVAL, 6));
    // Fast zero on a device that is not fast.
    disk.fast_zero.store(false, Ordering::SeqCst);
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 7, 0, 4096, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_ENOTSUP, 7));
    assert_eq!(
        disk.contents()[..4],
        [1, 2, 3, 4],
        "fast-zero refusal wrote nothing"
    );
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 8, 0, 4096, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (0, 8));
    assert_eq!(disk.contents()[..4], [0, 0, 0, 0]);
    assert_eq!(
        disk.allocated_pages(),
        1,
        "NO_HOLE keeps the page allocated"
    );
    c.request(CMD_FLUSH, 0, 9, 0, 0, &[]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (0, 9));
    c.request(99, 0, 10, 0, 0, &[]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EINVAL, 10));
    // Oversize write: EINVAL, then the server hangs up (it cannot resync).
    c.request(CMD_WRITE, 0, 11, 0, (32 << 20) + 1, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EINVAL, 11));
    assert!(c.closed().await);
    assert!(matches!(
        finish(srv).await,
        Err(NbdError::PayloadTooLarge(_))
    ));
}

#[tokio::test]
async fn writes_on_read_only_export_get_eperm() {
    let (_, ro, e) = exports();
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    let (_, flags) = c.go("ro").await.unwrap().unwrap();
    assert!(flags & TFLAG_READ_ONLY != 0);
    assert!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES) == 0);
    c.request(CMD_WRITE, 0, 1, 0, 4, &[9; 4]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EPERM, 1));
    c.request(CMD_TRIM, 0, 2, 0, 4096, &[]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EPERM, 2));
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (NBD_EPERM, 3));
    assert_eq!(ro.allocated_pages(), 0);
    // Bad magic: the connection is closed.
    c.io.write_all(&[0xde; 28]).await.unwrap();
    assert!(c.closed().await);
    assert!(matches!(finish(srv).await, Err(NbdError::Wire(_))));
}

#[tokio::test]
async fn structured_reads_holes_and_block_status() {
    let (disk, _, e) = exports();
    disk.put(8192, &[0xaa; 4096]);
    disk.snapshot("x");
    disk.put(16384, &[0xbb; 4096]);
    let (mut c, srv) = start(e, ServerConfig::default()).await;
    assert_eq!(
        c.opt(OPT_STRUCTURED_REPLY, &[]).await.unwrap()[0].kind,
        REP_ACK
    );
    let l = c
        .opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &["tern:"]))
        .await
        .unwrap();
    assert_eq!(l.len(), 2);
    assert_eq!(&l[0].data[4..], b"tern:changed-since:x");
    let s = c
        .opt(
            OPT_SET_META_CONTEXT,
            &meta_data(
                "disk",
                &["base:allocation", "tern:changed-since:x", "bogus:y"],
            ),
        )
        .await
        .unwrap();
    assert_eq!(s.len(), 3, "two contexts then ACK: {s:?}");
    let base_id = u32::from_be_bytes(s[0].data[..4].try_into().unwrap());
    let changed_id = u32::from_be_bytes(s[1].data[..4].try_into().unwrap());
    assert_ne!(base_id, changed_id);
    let (_, flags) = c.go("disk").await.unwrap().unwrap();
    assert!(flags & TFLAG_SEND_DF != 0);

    // Read [4096, 20480): hole, data, hole, data.
    c.request(CMD_READ, 0, 7, 4096, 16384, &[]).await.unwrap();
    let mut got = vec![0xffu8; 16384];
    loop {
        let (f, t, cookie, p) = c.chunk().await.unwrap();
        assert_eq!(cookie, 7);
        let off = u64::from_be_bytes(p[..8].try_into().unwrap()) - 4096;
        match t {
            REPLY_TYPE_OFFSET_DATA => {
                got[off as usize..off as usize + p.len() - 8].copy_from_slice(&p[8..])
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                got[off as usize..off as usize + n].fill(0);
            }
            other => panic!("unexpected chunk {other}"),
        }
        if f & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(got, disk.contents()[4096..20480]);

    // DF: exactly one data chunk.
    c.request(CMD_READ, CMD_FLAG_DF, 8, 0, 16384, &[])
        .await
        .unwrap();
    let (f, t, _, p) = c.chunk().await.unwrap();
    assert_eq!(
        (f, t, p.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 16384 + 8)
    );

    // Block status over both contexts.
    c.request(CMD_BLOCK_STATUS, 0, 9, 0, 32768, &[])
        .await
        .unwrap();
    let mut seen = std::collections::HashMap::new();
    loop {
        let (f, t, _, p) = c.chunk().await.unwrap();
        assert_eq!(t, REPLY_TYPE_BLOCK_STATUS);
        let id = u32::from_be_bytes(p[..4].try_into().unwrap());
        let ext: Vec<(u32, u32)> = p[4..]
            .chunks(8)
            .map(|e| {
                (
                    u32::from_be_bytes(e[..4].try_into().unwrap()),
                    u32::from_be_bytes(e[4..].try_into().unwrap()),
                )
            })
            .collect();
        seen.insert(id, ext);
        if f & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        seen[&base_id],
        vec![(8192, 3), (4096, 0), (4096, 3), (4096, 0), (12288, 3)]
    );
    assert_eq!(seen[&changed_id], vec![(16384, 0), (4096, 1), (12288, 0)]);

    // REQ_ONE: one extent per context.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 10, 0, 32768, &[])
        .await
        .unwrap();
    for _ in 0..2 {
        let (_, _, _, p) = c.chunk().await.unwrap();
        assert_eq!(p.len(), 12);
    }

    // Errors arrive as structured error chunks with a message.
    c.request(CMD_READ, 0, 11, MIB, 1, &[]).await.unwrap();
    let (f, t, cookie, p) = c.chunk().await.unwrap();
    assert_eq!((f, t, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 11));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), NBD_EINVAL);
    let n = u16::from_be_bytes([p[4], p[5]]) as usize;
    assert!(String::from_utf8_lossy(&p[6..6 + n]).contains("past the end"));

    c.request(CMD_DISC, 0, 0, 0, 0, &[]).await.unwrap();
    finish(srv).await.unwrap();
    assert_eq!(disk.closes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_closes() {
    let (disk, _, e) = exports();
    *disk.delay.lock().unwrap() = Duration::from_millis(300);
    let (c, s) = tokio::io::duplex(1 << 20);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(serve_connection_until(
        s,
        Arc::new(e),
        Arc::new(ServerConfig::default()),
        async {
            let _ = rx.await;
        },
    ));
    let mut c = RawClient::hello(c).await.unwrap();
    c.go("disk").await.unwrap().unwrap();
    c.request(CMD_WRITE, 0, 1, 0, 4, &[5; 4]).await.unwrap();
    c.request(CMD_FLUSH, 0, 2, 0, 0, &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(()).unwrap();
    let mut cookies = vec![
        c.simple_reply().await.unwrap(),
        c.simple_reply().await.unwrap(),
    ];
    cookies.sort();
    assert_eq!(cookies, vec![(0, 1), (0, 2)]);
    assert!(c.closed().await);
    finish(srv).await.unwrap();
    assert_eq!(disk.contents()[..4], [5; 4]);
    assert_eq!(disk.closes.load(Ordering::SeqCst), 1);
}

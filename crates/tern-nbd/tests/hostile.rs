//! Seeded random and half-valid byte streams fed to the handshake and to the
//! transmission phase: the server must never panic or hang, only answer,
//! error, or close.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{MemDevice, MemExports, RawClient};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tern_nbd::wire::*;
use tern_nbd::{ServerConfig, serve_connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Seeds per test; `TERN_NBD_FUZZ_CASES` raises it for a longer soak
/// (`TERN_NBD_FUZZ_CASES=50000 cargo test -p tern-nbd --test hostile`).
fn cases() -> u64 {
    std::env::var("TERN_NBD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}
const SIZE: u64 = 1 << 20;

fn exports() -> Arc<MemExports> {
    let disk = MemDevice::new(SIZE, false);
    disk.snapshot("s");
    Arc::new(
        MemExports::default()
            .with("disk", disk)
            .with("ro", MemDevice::new(SIZE, true)),
    )
}

/// Sends `bytes`, closes our write side, reads everything the server says,
/// and requires the server task to end (any result but a panic) in time.
/// Returns how many bytes the server sent.
async fn feed(
    client: DuplexStream,
    srv: tokio::task::JoinHandle<Result<(), tern_nbd::NbdError>>,
    bytes: Vec<u8>,
    seed: u64,
) -> usize {
    let (mut r, mut w) = tokio::io::split(client);
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    // The server may hang up mid-stream; that is a valid outcome.
    let _ = w.write_all(&bytes).await;
    let _ = w.shutdown().await;
    drop(w);
    let res = tokio::time::timeout(Duration::from_secs(10), srv)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: server hung"));
    assert!(res.is_ok(), "seed {seed}: server panicked: {res:?}");
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: server never closed"))
        .unwrap()
}

fn random_option(rng: &mut ChaCha8Rng, out: &mut Vec<u8>) {
    let opt: u32 = if rng.random_bool(0.8) {
        rng.random_range(0..12)
    } else {
        rng.random()
    };
    let data: Vec<u8> = match rng.random_range(0..4) {
        0 => vec![],
        1 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
        2 => {
            // Plausible GO/INFO/meta payload with a random tail.
            let name = ["disk", "ro", "", "nope"][rng.random_range(0..4)];
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&rng.random::<u32>().to_be_bytes()[..rng.random_range(0..5)]);
            d
        }
        _ => vec![0; rng.random_range(0..4096)],
    };
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    // Sometimes lie about the length.
    let len = if rng.random_bool(0.9) {
        data.len() as u32
    } else {
        rng.random()
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_handshakes() {
    for seed in 0..cases() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (c, s) = tokio::io::duplex(1 << 16);
        let cfg = ServerConfig {
            require_tls: seed % 7 == 0,
            handshake_timeout: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        let srv = tokio::spawn(serve_connection(s, exports(), Arc::new(cfg)));
        let mut bytes = Vec::new();
        match rng.random_range(0..3) {
            0 => bytes.extend((0..rng.random_range(0..512)).map(|_| rng.random::<u8>())),
            _ => {
                let flags: u32 = if rng.random_bool(0.9) {
                    rng.random_range(0..4)
                } else {
                    rng.random()
                };
                bytes.extend_from_slice(&flags.to_be_bytes());
                for _ in 0..rng.random_range(0..8) {
                    random_option(&mut rng, &mut bytes);
                }
                if rng.random_bool(0.3) {
                    bytes.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>()));
                }
            }
        }
        feed(c, srv, bytes, seed).await;
    }
}

fn random_request(rng: &mut ChaCha8Rng, out: &mut Vec<u8>) {
    let command: u16 = if rng.random_bool(0.9) {
        rng.random_range(0..9)
    } else {
        rng.random()
    };
    let flags: u16 = if rng.random_bool(0.7) {
        rng.random_range(0..32)
    } else {
        rng.random()
    };
    let offset: u64 = match rng.random_range(0..4) {
        0 => rng.random_range(0..SIZE),
        1 => SIZE - rng.random_range(0..8192),
        2 => rng.random(),
        _ => 0,
    };
    let length: u32 = match rng.random_range(0..5) {
        0 => rng.random_range(0..16384),
        1 => 0,
        2 => MAX_PAYLOAD + rng.random_range(0..2),
        3 => rng.random(),
        _ => 4096,
    };
    if command == CMD_WRITE && length > 65536 && rng.random_bool(0.8) {
        // Keep most streams going past big writes rather than ending them.
        return;
    }
    let r = Request {
        flags,
        command,
        cookie: rng.random(),
        offset,
        length,
    };
    out.extend_from_slice(&encode_request(&r));
    if command == CMD_WRITE {
        // Usually the full payload; sometimes truncated (the stream then ends mid-payload).
        let n = if rng.random_bool(0.9) {
            length as usize
        } else {
            rng.random_range(0..=length.min(65536) as usize)
        };
        out.extend((0..n.min(65536)).map(|_| rng.random::<u8>()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_transmission() {
    let mut replied = 0;
    for seed in 0..cases() {
        let mut rng = ChaCha8Rng::seed_from_u64(1_000_000_000 + seed);
        let (c, s) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(serve_connection(
            s,
            exports(),
            Arc::new(ServerConfig::default()),
        ));
        let mut c = RawClient::hello(c).await.unwrap();
        if rng.random_bool(0.5) {
            assert_eq!(
                c.opt(OPT_STRUCTURED_REPLY, &[]).await.unwrap()[0].kind,
                REP_ACK
            );
            let mut d = 4u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"disk");
            d.extend_from_slice(&2u32.to_be_bytes());
            for q in ["base:allocation", "tern:changed-since:s"] {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            c.opt(OPT_SET_META_CONTEXT, &d).await.unwrap();
        }
        let name = if rng.random_bool(0.8) { "disk" } else { "ro" };
        c.go(name).await.unwrap().unwrap();
        let mut bytes = Vec::new();
        for _ in 0..rng.random_range(1..40) {
            if rng.random_bool(0.05) {
                bytes.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>()));
            } else {
                random_request(&mut rng, &mut bytes);
            }
        }
        replied += feed(c.io, srv, bytes, seed).await;
    }
    // Guards against a harness that silently tests nothing.
    eprintln!("server sent {replied} bytes of replies");
    assert!(replied > 100_000);
}

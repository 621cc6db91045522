//! Fuzz targets (proptest, bounded, part of the normal suite) for the NBD
//! parsers that read untrusted bytes: request headers, option headers and
//! payloads, and whole sessions through the server. Random bytes and
//! structured mutations of valid inputs; no input may panic, and what
//! parses must encode back to the same bytes. Each target prints how many
//! inputs it tried. `TERN_FUZZ_SCALE=10` runs ten times as many.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{MemDevice, MemExports};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tern_nbd::wire::*;
use tern_nbd::{ServerConfig, serve_connection};
use tern_types::mutate::{Mutation, apply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cases(n: u32) -> u32 {
    let scale: u32 = std::env::var("TERN_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    n * scale.max(1)
}

fn runner(n: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(n),
        failure_persistence: None,
        ..Config::default()
    })
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(
        (any::<u8>(), any::<usize>(), any::<u64>())
            .prop_map(|(k, a, v)| Mutation::from_parts(k, a, v)),
        0..5,
    )
}

fn report(target: &str, n: u32) {
    eprintln!("fuzz {target}: {n} inputs, 0 crashes");
}

fn request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
}

#[test]
fn fuzz_request_header() {
    let n = cases(200_000);
    runner(n)
        .run(
            &prop_oneof![
                proptest::collection::vec(any::<u8>(), REQUEST_LEN),
                (request(), mutations()).prop_map(|(r, m)| {
                    let mut b = apply(&encode_request(&r), &m);
                    b.resize(REQUEST_LEN, 0);
                    b
                }),
            ],
            |b| {
                let arr: [u8; REQUEST_LEN] = b[..].try_into().unwrap();
                if let Ok(r) = parse_request(&arr) {
                    prop_assert_eq!(encode_request(&r), arr);
                }
                let _ = parse_option_header(arr[..OPTION_HEADER_LEN].try_into().unwrap());
                Ok(())
            },
        )
        .unwrap();
    report("nbd request/option header", n);
}

fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_payload(name: &str, queries: &[String]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[test]
fn fuzz_option_payloads() {
    let n = cases(100_000);
    let name = "[a-z/@:]{0,24}";
    runner(n)
        .run(
            &(
                name,
                proptest::collection::vec(any::<u16>(), 0..6),
                proptest::collection::vec("[a-z:/]{0,12}", 0..4),
                mutations(),
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            |(name, infos, queries, m, noise)| {
                let info = info_payload(&name, &infos);
                prop_assert_eq!(parse_info_request(&info), Ok((name.clone(), infos)));
                let meta = meta_payload(&name, &queries);
                prop_assert_eq!(parse_meta_context_request(&meta), Ok((name, queries)));
                for b in [apply(&info, &m), apply(&meta, &m), noise] {
                    let _ = parse_info_request(&b);
                    let _ = parse_meta_context_request(&b);
                }
                Ok(())
            },
        )
        .unwrap();
    report("nbd option payloads", n);
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A well-formed session: handshake to "disk", a few requests, DISC.
fn session(structured: bool, reqs: &[(u16, u64, u32)]) -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if structured {
        b.extend(option(OPT_STRUCTURED_REPLY, &[]));
        b.extend(option(
            OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:allocation".into()]),
        ));
    }
    b.extend(option(OPT_GO, &info_payload("disk", &[INFO_BLOCK_SIZE])));
    for (i, &(command, offset, length)) in reqs.iter().enumerate() {
        b.extend(encode_request(&Request {
            flags: 0,
            command,
            cookie: i as u64,
            offset,
            length,
        }));
        if command == CMD_WRITE {
            b.extend(std::iter::repeat_n(0x5a, length as usize));
        }
    }
    b.extend(encode_request(&Request {
        flags: 0,
        command: CMD_DISC,
        cookie: 99,
        offset: 0,
        length: 0,
    }));
    b
}

#[test]
fn fuzz_sessions() {
    const SIZE: u64 = 1 << 20;
    let n = cases(50_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // DISC ends a session early; the session adds its own at the end.
    let command = (0u16..8).prop_map(|c| if c == CMD_DISC { CMD_FLUSH } else { c });
    let reqs = proptest::collection::vec((command, 0..SIZE, 0u32..8192), 0..6);
    runner(n)
        .run(
            &(any::<bool>(), reqs, mutations()),
            |(structured, reqs, m)| {
                let bytes = apply(&session(structured, &reqs), &m);
                rt.block_on(async {
                    let exports =
                        Arc::new(MemExports::default().with("disk", MemDevice::new(SIZE, false)));
                    let (c, s) = tokio::io::duplex(1 << 16);
                    let cfg = ServerConfig {
                        handshake_timeout: Duration::from_secs(5),
                        ..ServerConfig::default()
                    };
                    let srv = tokio::spawn(serve_connection(s, exports, Arc::new(cfg)));
                    let (mut r, mut w) = tokio::io::split(c);
                    let drain = tokio::spawn(async move {
                        let mut buf = vec![0u8; 1 << 16];
                        let mut total = 0;
                        while let Ok(n) = r.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            total += n;
                        }
                        total
                    });
                    let _ = w.write_all(&bytes).await;
                    let _ = w.shutdown().await;
                    let res = tokio::time::timeout(Duration::from_secs(10), srv)
                        .await
                        .expect("server hung");
                    assert!(res.is_ok(), "server panicked: {res:?}");
                    drop(w);
                    let sent = tokio::time::timeout(Duration::from_secs(10), drain)
                        .await
                        .expect("server never closed")
                        .unwrap();
                    if m.is_empty() {
                        // Unmutated, the session is served to its end: a
                        // greeting, the option replies and one reply per
                        // request.
                        assert!(matches!(res, Ok(Ok(()))), "valid session refused: {res:?}");
                        assert!(sent >= 18 + 20 + 16 * reqs.len(), "only {sent} bytes back");
                    }
                });
                Ok(())
            },
        )
        .unwrap();
    report("nbd sessions", n);
}

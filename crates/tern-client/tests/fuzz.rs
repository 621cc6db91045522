//! Fuzz targets (proptest, bounded, part of the normal suite) for the rbd
//! stream formats tern reads from files and pipes: "rbd diff v1", "rbd
//! diff v2" (import-diff) and "rbd image v2" (import --export-format 2).
//! Random bytes and structured mutations of valid streams; no input may
//! panic or loop, and valid streams read back exactly as written. Prints
//! the inputs tried; `TERN_FUZZ_SCALE=10` runs ten times as many.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tern_client::rbd_diff::{DiffReader, DiffWriter, ImageHeaderV2, Record};
use tern_types::mutate::{Mutation, apply};

fn cases(n: u32) -> u32 {
    let scale: u32 = std::env::var("TERN_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    n * scale.max(1)
}

fn runner(n: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: n,
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

/// A record as written: `Write` carries its data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    From(String),
    To(String),
    Size(u64),
    Protected(bool),
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

fn rec() -> impl Strategy<Value = Rec> {
    prop_oneof![
        "[a-z0-9._-]{1,12}".prop_map(Rec::From),
        "[a-z0-9._-]{1,12}".prop_map(Rec::To),
        (0u64..(1 << 50)).prop_map(Rec::Size),
        any::<bool>().prop_map(Rec::Protected),
        (
            0u64..(1 << 40),
            proptest::collection::vec(any::<u8>(), 0..48)
        )
            .prop_map(|(o, d)| Rec::Write(o, d)),
        (0u64..(1 << 40), 0u64..(1 << 30)).prop_map(|(o, l)| Rec::Zero(o, l)),
    ]
}

async fn write_diff(out: &mut Vec<u8>, version: u8, recs: &[Rec]) {
    let mut w = DiffWriter::new(&mut *out, version).await.unwrap();
    for r in recs {
        match r {
            Rec::From(n) => w.snap(true, n).await.unwrap(),
            Rec::To(n) => w.snap(false, n).await.unwrap(),
            Rec::Size(s) => w.size(*s).await.unwrap(),
            Rec::Protected(p) => w.protected(*p).await.unwrap(),
            Rec::Write(o, d) => w.write(*o, d).await.unwrap(),
            Rec::Zero(o, l) => w.zero(*o, *l).await.unwrap(),
        }
    }
    w.end().await.unwrap();
}

/// Reads one diff to its end record; `Err` on any refusal. Terminates on
/// any input: every step consumes input or fails.
async fn read_diff<R: tokio::io::AsyncRead + Unpin>(
    mut r: DiffReader<R>,
) -> Result<(Vec<Rec>, R), String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let rec = r.next().await.map_err(|e| e.to_string())?;
        out.push(match rec {
            Record::End => return Ok((out, r.into_inner())),
            Record::FromSnap(n) => Rec::From(n),
            Record::ToSnap(n) => Rec::To(n),
            Record::Size(s) => Rec::Size(s),
            Record::Protected(p) => Rec::Protected(p),
            Record::Zero { offset, length } => Rec::Zero(offset, length),
            Record::Write { offset, length } => {
                let mut d = Vec::new();
                loop {
                    let n = r.read_data(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    d.extend_from_slice(&buf[..n]);
                }
                if d.len() as u64 != length {
                    return Err("short write data".into());
                }
                Rec::Write(offset, d)
            }
        });
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

#[test]
fn fuzz_rbd_diff_v1_v2() {
    let n = cases(50_000);
    let rt = rt();
    let input = (
        any::<bool>(),
        proptest::collection::vec(rec(), 0..6),
        mutations(),
        proptest::collection::vec(any::<u8>(), 0..128),
    );
    runner(n)
        .run(&input, |(v2, recs, m, noise)| {
            let version = if v2 { 2 } else { 1 };
            // v1 has no protection record.
            let recs: Vec<Rec> = recs
                .into_iter()
                .filter(|r| v2 || !matches!(r, Rec::Protected(_)))
                .collect();
            rt.block_on(async {
                let mut b = Vec::new();
                write_diff(&mut b, version, &recs).await;
                let r = DiffReader::new(&b[..]).await.unwrap();
                let (got, rest) = read_diff(r).await.unwrap();
                assert_eq!(got, recs);
                assert!(rest.is_empty());
                let mut banner_then_noise = b[..12].to_vec();
                banner_then_noise.extend_from_slice(&noise);
                for bytes in [apply(&b, &m), noise.clone(), banner_then_noise] {
                    if let Ok(r) = DiffReader::new(&bytes[..]).await {
                        let _ = read_diff(r).await;
                    }
                }
            });
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz rbd diff v1/v2: {n} inputs, 0 crashes");
}

/// Reads a whole export-format 2 stream as `import --export-format 2`
/// does: the header, then its diffs.
async fn read_export(mut b: &[u8]) -> Result<(ImageHeaderV2, Vec<Vec<Rec>>), String> {
    let h = ImageHeaderV2::read(&mut b)
        .await
        .map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    for _ in 0..h.diffs {
        let r = DiffReader::new(b).await.map_err(|e| e.to_string())?;
        if r.version != 2 {
            return Err("v1 diff inside".into());
        }
        let (recs, rest) = read_diff(r).await?;
        diffs.push(recs);
        b = rest;
    }
    Ok((h, diffs))
}

#[test]
fn fuzz_export_format_2() {
    let n = cases(50_000);
    let rt = rt();
    let input = (
        (
            12u64..31,
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            any::<u64>(),
        ),
        proptest::collection::vec(proptest::collection::vec(rec(), 0..4), 1..4),
        mutations(),
        proptest::collection::vec(any::<u8>(), 0..128),
    );
    runner(n)
        .run(&input, |((order, features, su, sc), diffs, m, noise)| {
            rt.block_on(async {
                let h = ImageHeaderV2 {
                    order,
                    features,
                    stripe_unit: su,
                    stripe_count: sc,
                    meta: (0..su % 3)
                        .map(|i| (format!("key{i}"), "v".repeat(sc as usize % 5)))
                        .collect(),
                    diffs: diffs.len() as u64,
                };
                let mut b = Vec::new();
                h.write(&mut b).await.unwrap();
                for d in &diffs {
                    write_diff(&mut b, 2, d).await;
                }
                assert_eq!(read_export(&b).await.unwrap(), (h, diffs));
                let _ = read_export(&apply(&b, &m)).await;
                let _ = read_export(&noise).await;
                let mut x = b"rbd image v2\n".to_vec();
                x.extend_from_slice(&noise);
                let _ = read_export(&x).await;
            });
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz export-format 2: {n} inputs, 0 crashes");
}

//! Fuzz targets (proptest, bounded, part of the normal suite) for journal
//! segments, which the store reads back after a crash and peers receive
//! over the wire: segment headers and entry sequences, as random bytes
//! and as mutations of valid segments, with the crcs resealed half the
//! time so the payload decoders are reached too. No input may panic;
//! valid entries and headers decode to what was encoded. Prints the
//! inputs tried; `TERN_FUZZ_SCALE=10` runs ten times as many.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tern_store::journal::format::{
    ENTRY_HEADER_LEN, JournalEntry, JournalOp, SEG_HEADER_LEN, SegmentHeader,
};
use tern_store::{MirrorSnap, MirrorSnapState, SnapNamespace};
use tern_types::ImageId;
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

fn op() -> impl Strategy<Value = JournalOp> {
    let ns = prop_oneof![
        Just(SnapNamespace::User),
        (any::<bool>(), "[a-f0-9-]{0,12}").prop_map(|(complete, peer)| {
            SnapNamespace::Mirror(MirrorSnap {
                state: MirrorSnapState::NonPrimary,
                complete,
                mirror_peer_uuids: vec![peer],
                ..MirrorSnap::default()
            })
        }),
    ];
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(offset, data)| JournalOp::Write { offset, data }),
        (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| JournalOp::Discard { offset, len }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, len)| JournalOp::WriteZeroes { offset, len }),
        any::<u64>().prop_map(|size| JournalOp::Resize { size }),
        (any::<u64>(), "[a-z0-9.]{0,16}", ns).prop_map(|(id, name, namespace)| {
            JournalOp::SnapCreate {
                id,
                name,
                namespace,
            }
        }),
        any::<u64>().prop_map(|id| JournalOp::SnapRemove { id }),
        any::<u64>().prop_map(|id| JournalOp::SnapRollback { id }),
        Just(JournalOp::Flush),
        ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(kind, payload)| JournalOp::Marker { kind, payload }),
    ]
}

/// Recomputes every entry crc it can find in `b` (entries laid end to
/// end from `at`), so a mutation of a payload is judged by its decoder,
/// not only by the checksum.
fn reseal(b: &mut [u8], mut at: usize) {
    while at + ENTRY_HEADER_LEN <= b.len() {
        let Ok(total) = JournalEntry::check_header(&b[at..]) else {
            return;
        };
        if at + total > b.len() {
            return;
        }
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&b[at + ENTRY_HEADER_LEN..at + total]),
            &b[at..at + 28],
        );
        b[at + 28..at + 32].copy_from_slice(&crc.to_le_bytes());
        at += total;
    }
}

/// What a segment reader does: the header, then entries until one does
/// not decode. Returns the entries.
fn read_segment(b: &[u8]) -> Vec<JournalEntry> {
    let mut out = Vec::new();
    if SegmentHeader::decode(b).is_err() {
        return out;
    }
    let mut at = SEG_HEADER_LEN;
    while at < b.len() {
        match JournalEntry::decode(&b[at..]) {
            Ok((e, n)) => {
                assert!(
                    n >= ENTRY_HEADER_LEN && at + n <= b.len(),
                    "length {n} at {at}"
                );
                out.push(e);
                at += n;
            }
            Err(_) => break,
        }
    }
    out
}

#[test]
fn fuzz_journal_segments() {
    let n = cases(50_000);
    let id = ImageId::parse("abc123").unwrap();
    let input = (
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(op(), 0..5),
        mutations(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..200),
    );
    runner(n)
        .run(&input, |(segno, first_tid, ops, m, seal, noise)| {
            let hdr = SegmentHeader::new(&id, segno, first_tid);
            prop_assert_eq!(SegmentHeader::decode(&hdr.encode()).ok(), Some(hdr.clone()));
            let mut seg = hdr.encode().to_vec();
            let entries: Vec<JournalEntry> = ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| JournalEntry {
                    tid: first_tid.wrapping_add(i as u64),
                    timestamp_us: segno ^ 0x5555,
                    op,
                })
                .collect();
            for e in &entries {
                let b = e.encode();
                prop_assert_eq!(b.len(), e.encoded_len());
                prop_assert_eq!(JournalEntry::decode(&b).ok(), Some((e.clone(), b.len())));
                seg.extend_from_slice(&b);
            }
            prop_assert_eq!(read_segment(&seg), entries);
            let mut bad = apply(&seg, &m);
            if seal {
                reseal(&mut bad, SEG_HEADER_LEN);
            }
            read_segment(&bad);
            let _ = JournalEntry::decode(&bad[SEG_HEADER_LEN.min(bad.len())..]);
            read_segment(&noise);
            let _ = JournalEntry::decode(&noise);
            let mut noise = noise;
            reseal(&mut noise, 0);
            let _ = JournalEntry::decode(&noise);
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz journal segments: {n} inputs, 0 crashes");
}

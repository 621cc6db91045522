//! `kill -9` of ternd at 20 random moments under a write workload with
//! periodic flushes: after each restart every write acknowledged before the
//! last completed flush is intact, and metadata (pools, images created
//! before the kill) is consistent.

use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_testkit::{Site, rt};
use tern_types::ImageSpec;

const BLOCK: u64 = 4096;
const IMAGE: u64 = 32 << 20;

/// A block's content names the write that produced it: every 8-byte word is
/// (write sequence << 24 | block index), so a read tells which write landed.
fn block_bytes(seq: u64, block: u64) -> Vec<u8> {
    let tag = (seq << 24) | block;
    tag.to_le_bytes().repeat((BLOCK / 8) as usize)
}

fn block_tag(b: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(b[..8].try_into().unwrap());
    if b.chunks(8)
        .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == first)
    {
        Some(first >> 24)
    } else {
        None
    }
}

#[derive(Default)]
struct Ledger {
    /// Per block: the sequence that must be there at least (state at the last completed flush).
    durable: HashMap<u64, u64>,
    /// Per block: writes issued after that flush began (they may or may not have landed).
    maybe: HashMap<u64, Vec<u64>>,
}

#[test]
fn kill9_loses_no_flushed_write() {
    let mut s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/dur", "--size", "32M", "--object-size", "1M"]);
    let rt = rt();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut seq = 1u64;
    let mut created: Vec<String> = Vec::new();
    for round in 0..20 {
        let c = s.client(&rt);
        let r = ImageSpec::new("rbd", "dur");
        let run_ms = rng.random_range(30..400);
        let wseed: u64 = rng.random();
        let l = ledger.clone();
        let start_seq = seq;
        // The writer runs until the kill makes its calls fail.
        let writer = rt.spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(wseed);
            let mut seq = start_seq;
            let mut since_flush: Vec<(u64, u64)> = Vec::new();
            loop {
                if rng.random_range(0..8) == 0 {
                    // Everything acknowledged before this flush must survive once it returns.
                    let acked = std::mem::take(&mut since_flush);
                    if c.io().flush(&r).await.is_err() {
                        // Unknown outcome: these stay "maybe".
                        return seq;
                    }
                    let mut led = l.lock().unwrap();
                    for (b, s) in acked {
                        led.durable.insert(b, s);
                        if let Some(v) = led.maybe.get_mut(&b) {
                            v.retain(|x| *x > s);
                        }
                    }
                    continue;
                }
                let first = rng.random_range(0..IMAGE / BLOCK - 16);
                let n = rng.random_range(1..=16u64);
                let mut data = Vec::with_capacity((n * BLOCK) as usize);
                {
                    let mut led = l.lock().unwrap();
                    for b in first..first + n {
                        data.extend(block_bytes(seq, b));
                        led.maybe.entry(b).or_default().push(seq);
                    }
                }
                let res = c.io().write(&r, first * BLOCK, data, false, "").await;
                if res.is_err() {
                    return seq + 1;
                }
                for b in first..first + n {
                    since_flush.push((b, seq));
                }
                seq += 1;
            }
        });
        // A metadata change in flight too.
        let name = format!("meta{round}");
        s.tern_ok(&["create", &format!("rbd/{name}"), "--size", "1M"]);
        created.push(name);
        std::thread::sleep(Duration::from_millis(run_ms));
        s.kill9();
        seq = rt.block_on(writer).unwrap() + 1;
        s.restart();

        // Check every block against the ledger.
        let c = s.client(&rt);
        let mut data = Vec::with_capacity(IMAGE as usize);
        for off in (0..IMAGE).step_by(8 << 20) {
            let r = ImageSpec::new("rbd", "dur");
            data.extend(rt.block_on(c.io().read(&r, off, 8 << 20)).unwrap());
        }
        let led = ledger.lock().unwrap();
        for b in 0..IMAGE / BLOCK {
            let got = &data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let tag = if got.iter().all(|x| *x == 0) {
                Some(0)
            } else {
                block_tag(got)
            };
            let Some(tag) = tag else {
                panic!("round {round}: block {b} is torn")
            };
            let durable = led.durable.get(&b).copied().unwrap_or(0);
            let maybe = led.maybe.get(&b).map(Vec::as_slice).unwrap_or(&[]);
            assert!(
                tag == durable || maybe.contains(&tag),
                "round {round}: block {b} holds write {tag}, expected {durable} or one of {maybe:?}"
            );
            if tag != 0 {
                assert_eq!(
                    got,
                    block_bytes(tag, b).as_slice(),
                    "round {round}: block {b} belongs elsewhere"
                );
            }
        }
        drop(led);
        // Whatever is on disk now is the new baseline: collapse the ledger to it.
        let mut led = ledger.lock().unwrap();
        for b in 0..IMAGE / BLOCK {
            let got = &data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let tag = if got.iter().all(|x| *x == 0) {
                0
            } else {
                block_tag(got).unwrap()
            };
            // Not yet flushed after restart, but the kill already put it in the page cache
            // of a dead process's files; a flush now makes it the durable state.
            led.durable.insert(b, tag);
        }
        led.maybe.clear();
        drop(led);
        rt.block_on(c.io().flush(&ImageSpec::new("rbd", "dur")))
            .unwrap();

        // Metadata: every image whose create returned exists, the pool is intact.
        let mut listed: Vec<String> = serde_json::from_value(s.tern_json(&["ls", "rbd"])).unwrap();
        listed.retain(|n| n != "dur");
        let mut want = created.clone();
        want.sort();
        assert_eq!(listed, want, "round {round}: image list after restart");
        assert_eq!(s.tern_json(&["info", "rbd/dur"])["size"], IMAGE);
    }
}
